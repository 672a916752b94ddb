//! Volumes: hot-plug (attach), hot-unplug (detach, waiting for the guest to release the disk),
//! online expansion, and the cache of the live domain's disks that keeps a Sync from reading
//! the whole domain XML again.

use std::path::Path;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::core::{ControlError, Launcher};
use super::ledger::Ledger;
use super::state::{DiskStatus, Phase};
use crate::domain::live::LiveDomain;
use crate::domain::Disk;
use crate::spec::VirtualMachineInstance;

impl Launcher {
    /// Online expansion: a Filesystem-mode `disk.img` grows to the claim's new usable size; a
    /// Block-mode disk to its device's size. The guest sees the new size at once. Shrinking is
    /// refused (it would cut off data). `known` is the size the launcher last saw.
    pub(crate) async fn expand(
        &self,
        name: &str,
        vmi: &VirtualMachineInstance,
        volume: &str,
        live: &crate::domain::live::LiveDisk,
        known: Option<u64>,
    ) -> Result<(), ControlError> {
        let (Some(target), Some(source)) = (live.target_dev(), live.source_path()) else {
            return Ok(());
        };
        if live.device.as_deref().is_some_and(|d| d != "disk") {
            return Ok(());
        }
        let path = Path::new(source);
        let is_block = attached_volume(live).block;
        let claim_size = super::plan::wanted_image_size(vmi, volume);
        // A file grows only when its claim's capacity says so: without a capacity, or with the
        // size last seen, there is nothing to look at (no file system call on the Sync's path).
        if !is_block && (claim_size.is_none() || claim_size == known) {
            return Ok(());
        }
        let current = size_of(path);
        let wanted = if is_block {
            current
        } else {
            claim_size.unwrap_or(current)
        };
        // Ask QEMU only when something says the disk grew: a claim capacity beyond the image,
        // or a block device larger than the size we last saw (one monitor round trip per disk
        // on every Sync would make hot-plug slow for VMs with many disks).
        let may_have_grown = if is_block {
            known.is_none_or(|k| current > k)
        } else {
            wanted > current
        };
        if wanted >= current && !may_have_grown {
            return Ok(());
        }
        let (t, n) = (target.to_string(), name.to_string());
        let seen = self.blocking(move |hv| hv.block_capacity(&n, &t)).await?;
        if wanted < current && !is_block {
            return Err(self.volume_failed(volume, format!("the claim shrank to {wanted} bytes but disk.img holds {current}: shrinking is not supported")));
        }
        if wanted <= seen {
            return Ok(());
        }
        if !is_block {
            let grown = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(wanted));
            if let Err(e) = grown {
                return Err(self.volume_failed(volume, format!("cannot grow {source}: {e}")));
            }
        }
        let (t, n) = (target.to_string(), name.to_string());
        // A resize changes no cached disk field (their sizes are not cached).
        let resized = self
            .blocking(move |hv| hv.block_resize(&n, &t, wanted))
            .await;
        if let Err(e) = resized {
            return Err(self.volume_failed(volume, format!("live resize failed: {e}")));
        }
        let v = volume.to_string();
        self.update(move |s| {
            if let Some(d) = s.disk_mut(&v) {
                d.size_bytes = wanted;
            }
        });
        self.set_phase(
            volume,
            Phase::Ready,
            &format!("expanded from {seen} to {wanted} bytes"),
        );
        Ok(())
    }

    pub(crate) async fn live_disks(
        &self,
        name: &str,
    ) -> Result<Vec<crate::domain::live::LiveDisk>, ControlError> {
        let generation = self.live_generation.load(Ordering::SeqCst);
        if let Some((g, disks)) = self.live_cache().as_ref() {
            if *g == generation {
                return Ok(disks.clone());
            }
        }
        let n = name.to_string();
        let xml = self.blocking(move |hv| hv.xml(&n)).await?;
        let live = LiveDomain::parse(&xml)
            .map_err(|e| ControlError::Internal(format!("live domain XML: {e}")))?;
        let disks = live.disks().to_vec();
        // MACs libvirt chose that the status lacks (a VM that arrived by migration).
        if self
            .status
            .borrow()
            .domain
            .interfaces
            .iter()
            .any(|i| i.mac.is_empty())
        {
            self.update(move |s| s.domain.learn_macs(&live));
        }
        // Kept under the generation read before the call: a change during it makes it stale.
        *self.live_cache() = Some((generation, disks.clone()));
        Ok(disks)
    }

    pub(crate) fn live_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(u64, Vec<crate::domain::live::LiveDisk>)>> {
        self.live_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The domain may have changed: the next Sync reads its disks from libvirt again.
    pub(crate) fn domain_changed(&self) {
        self.live_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The disk we just attached, added to the cached disks when the cache is current, so the
    /// next Sync need not read the whole domain XML again for a change we made ourselves. The
    /// generation moves on all the same: a read that started before the attach (a prefetch)
    /// stores its result under the old generation, which is then stale. Any other change
    /// meanwhile has moved the generation too, and the cache is read again as usual.
    pub(crate) fn live_cache_add(&self, disk: crate::domain::live::LiveDisk) {
        let mut cache = self.live_cache();
        let generation = self.live_generation.fetch_add(1, Ordering::SeqCst);
        match cache.as_mut() {
            Some((g, disks)) if *g == generation => {
                if !disks.iter().any(|d| d.alias() == disk.alias()) {
                    disks.push(disk);
                }
                *g = generation + 1;
            }
            _ => *cache = None,
        }
    }

    /// Reads the live disks ahead of the next Sync (after a Sync changed the domain), so that
    /// the read is off the next Sync's path. Errors are the next Sync's to report.
    pub async fn prefetch_live_disks(&self) {
        if !self.has_started() {
            return;
        }
        if let Ok(name) = self.domain_name() {
            let _ = self.live_disks(&name).await;
        }
    }

    /// Hot-plugs one disk. On any failure the VM keeps running and the volume is Failed.
    pub(crate) async fn attach(
        &self,
        name: &str,
        vmi: &VirtualMachineInstance,
        disk: &Disk,
        live: &[crate::domain::live::LiveDisk],
    ) -> Result<(), ControlError> {
        let volume = disk.volume().to_string();
        let mut disk = disk.clone();
        // The converter's target may be taken by a disk attached earlier: pick a free one.
        if live
            .iter()
            .any(|l| l.target_dev() == Some(disk.target_dev.as_str()))
        {
            let taken: Vec<&str> = live.iter().filter_map(|l| l.target_dev()).collect();
            match free_target(&disk.target_dev, &taken) {
                Some(t) => disk.target_dev = t,
                None => {
                    let e = ControlError::Volume {
                        volume: volume.clone(),
                        reason: "no free target name".into(),
                    };
                    self.add_failed(vmi, &disk, &e.to_string());
                    return Err(e);
                }
            }
        }
        // Never trust the name: the hot-plug path must stay in the hot-plug directory after
        // symlinks are followed.
        let paths = self.planner.paths.paths_for(vmi);
        let block = matches!(disk.source, crate::domain::DiskSource::Block(_));
        if let Err(e) = crate::pod::facts::confined_hotplug_path(&paths, &volume, block) {
            let e = ControlError::Volume {
                volume: volume.clone(),
                reason: e.reason(),
            };
            self.add_failed(vmi, &disk, &e.to_string());
            return Err(e);
        }
        let (v, status) = (
            volume.clone(),
            disk_status(&disk, vmi, Phase::Attaching, ""),
        );
        self.update(move |s| {
            s.disks.retain(|d| d.volume != v);
            s.disks.push(status);
        });
        self.set_phase(&volume, Phase::Attaching, "");
        // Changed-block tracking: a hot-plugged PVC sits behind its overlay too, made now that
        // the volume is mounted (KubeVirt: the Mounted phase, before the attach).
        if let Err(e) = crate::pod::prepare::cbt_overlays([&disk]) {
            return Err(self.volume_failed(&volume, e.to_string()));
        }
        if let Err(reason) = check_openable(disk.source_path(), disk.readonly) {
            return Err(self.volume_failed(&volume, reason));
        }
        let xml = disk.to_xml();
        if let Err(e) = self.hv.attach_device(name, &xml).await {
            // What a failed attach left in the domain is libvirt's to say: read it again.
            self.domain_changed();
            return Err(self.volume_failed(&volume, format!("attach failed: {e}")));
        }
        match crate::domain::live::LiveDisk::parse(&xml) {
            Ok(l) => self.live_cache_add(l),
            Err(_) => self.domain_changed(),
        }
        self.set_phase(&volume, Phase::Ready, "");
        Ok(())
    }

    /// Marks `volume` Failed with `reason` (an event says why) and returns the error.
    pub(crate) fn volume_failed(&self, volume: &str, reason: impl Into<String>) -> ControlError {
        let e = ControlError::Volume {
            volume: volume.to_string(),
            reason: reason.into(),
        };
        self.set_phase(volume, Phase::Failed, &e.to_string());
        e
    }

    pub(crate) fn add_failed(&self, vmi: &VirtualMachineInstance, disk: &Disk, message: &str) {
        let volume = disk.volume().to_string();
        let (v, status) = (
            volume.clone(),
            disk_status(disk, vmi, Phase::Failed, message),
        );
        self.update(move |s| {
            s.disks.retain(|d| d.volume != v);
            s.disks.push(status);
        });
        self.set_phase(&volume, Phase::Failed, message);
    }

    /// Unplugs one disk and waits for the guest to release it (DEVICE_REMOVED), up to
    /// [`DETACH_TIMEOUT`]. Never reports success before the guest did.
    pub(crate) async fn detach(
        &self,
        name: &str,
        volume: &str,
        live: &crate::domain::live::LiveDisk,
    ) -> Result<(), ControlError> {
        let alias = format!("ua-{volume}");
        // The owner hands over the guest's answer (DEVICE_REMOVED or DEVICE_REMOVAL_FAILED); it
        // hears of this waiter before libvirt is asked, so the event cannot come first.
        let (tx, rx) = oneshot::channel();
        let _ = self.internal.send(super::Internal::AwaitRemoval {
            alias: alias.clone(),
            answer: tx,
        });
        self.set_phase(volume, Phase::Detaching, "");
        let xml = detach_xml(live);
        let n = name.to_string();
        let detached = self.blocking(move |hv| hv.detach_device(&n, &xml)).await;
        self.domain_changed();
        if let Err(e) = detached {
            let _ = self.internal.send(super::Internal::ForgetRemoval { alias });
            return Err(self.volume_failed(volume, format!("detach failed: {e}")));
        }
        // libvirt may already have seen the removal (synchronous for cooperative guests); the
        // event is delivered either way.
        let timeout = self.detach_timeout();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(true)) => {
                self.set_phase(volume, Phase::Detached, "");
                let v = volume.to_string();
                self.update(move |s| s.disks.retain(|d| d.volume != v));
                Ok(())
            }
            Ok(_) => Err(self.volume_failed(volume, "the guest refused to release the disk")),
            Err(_) => {
                let _ = self.internal.send(super::Internal::ForgetRemoval { alias });
                let e = self.volume_failed(
                    volume,
                    format!(
                        "the guest did not release the disk within {}s; it is still attached",
                        timeout.as_secs_f32()
                    ),
                );
                Err(e)
            }
        }
    }

    /// Changed-block tracking: an unplugged volume's overlay is deleted (KubeVirt's
    /// DeleteQCOW2Overlay), so that a later hot-plug starts a new one. Only the overlay the
    /// disk was attached through, in the overlay directory.
    pub(crate) fn delete_cbt_overlay(
        &self,
        vmi: &VirtualMachineInstance,
        volume: &str,
        live: &crate::domain::live::LiveDisk,
    ) -> Result<(), ControlError> {
        if !vmi.cbt_applies() {
            return Ok(());
        }
        let overlay = self.planner.paths.paths_for(vmi).cbt_overlay(volume);
        let attached_through = live
            .source
            .as_ref()
            .and_then(|s| s.file.as_deref())
            .is_some_and(|f| Path::new(f) == overlay);
        if !attached_through {
            return Ok(());
        }
        match std::fs::remove_file(&overlay) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ControlError::Volume {
                volume: volume.to_string(),
                reason: format!(
                    "detached, but its changed-block tracking overlay {} stays: {e}",
                    overlay.display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The guest released the disk with alias `alias` after its detach had stopped waiting
    /// (timed out): the owner records that the disk is gone now.
    pub(crate) fn released_late(ledger: &Ledger, alias: &str) {
        let volume = alias.strip_prefix("ua-").unwrap_or(alias).to_string();
        if ledger.status().disks.iter().any(|d| d.volume == volume) {
            ledger.set_phase(&volume, Phase::Detached, "the guest released the disk late");
            ledger.update(|s| s.disks.retain(|d| d.volume != volume));
        }
    }
}

/// How the domain holds a disk (see [`crate::pod::facts::AttachedVolume`]).
pub(crate) fn attached_volume(
    l: &crate::domain::live::LiveDisk,
) -> crate::pod::facts::AttachedVolume {
    crate::pod::facts::AttachedVolume {
        block: l.disk_type.as_deref() == Some("block"),
        direct_io: l.driver.as_ref().and_then(|d| d.cache.as_deref()) == Some("none"),
    }
}

pub(crate) fn is_hotplug(vmi: &VirtualMachineInstance, volume: &str) -> bool {
    vmi.spec
        .volumes
        .iter()
        .any(|v| v.name == volume && v.is_hotpluggable())
}

pub(crate) fn disk_status(
    d: &Disk,
    vmi: &VirtualMachineInstance,
    phase: Phase,
    message: &str,
) -> DiskStatus {
    let volume = d.volume().to_string();
    let status = vmi.volume_status(&volume);
    DiskStatus {
        target: d.target_dev.clone(),
        bus: d.bus.clone(),
        source: d.source_path().display().to_string(),
        phase,
        message: message.to_string(),
        hotplugged: is_hotplug(vmi, &volume),
        shared: d.shareable || status.is_some_and(|s| s.is_shared()),
        readonly: d.readonly || d.device == crate::domain::DiskDevice::Cdrom,
        size_bytes: size_of(d.source_path()),
        device: d.device.as_str().to_string(),
        block: matches!(d.source, crate::domain::DiskSource::Block(_)),
        volume,
    }
}

pub(crate) fn size_of(path: &Path) -> u64 {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    // stat() never opens the path (opening a FIFO would block); only a block device is opened,
    // to seek to its end.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.file_type().is_block_device() => std::fs::File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap_or(0),
        _ => 0,
    }
}

/// The backing path must exist and open with the access the disk needs.
fn check_openable(path: &Path, readonly: bool) -> Result<(), String> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!readonly);
    o.open(path)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The first free target with the same prefix (`vd`, `sd`) as `wanted`.
fn free_target(wanted: &str, taken: &[&str]) -> Option<String> {
    let prefix: String = wanted.chars().take(2).collect();
    (0..26 * 27)
        .map(|i| {
            if i < 26 {
                format!("{prefix}{}", (b'a' + i as u8) as char)
            } else {
                let j = i - 26;
                format!(
                    "{prefix}{}{}",
                    (b'a' + (j / 26) as u8) as char,
                    (b'a' + (j % 26) as u8) as char
                )
            }
        })
        .find(|t| !taken.contains(&t.as_str()))
}

/// The minimal `<disk>` libvirt needs to find a live disk for detach.
fn detach_xml(l: &crate::domain::live::LiveDisk) -> String {
    let mut x = String::from("<disk>");
    if let Some(alias) = l.alias() {
        x += &format!("<alias name='{}'/>", crate::domain::escape_attr(alias));
    }
    if let Some(t) = l.target_dev() {
        x += &format!("<target dev='{}'/>", crate::domain::escape_attr(t));
    }
    x += "</disk>";
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn free_targets_fill_gaps_with_the_same_prefix() {
        assert_eq!(free_target("vdb", &["vda", "vdb"]).as_deref(), Some("vdc"));
        assert_eq!(free_target("sda", &["vda"]).as_deref(), Some("sda"));
        let many: Vec<String> = (0..26)
            .map(|i| format!("vd{}", (b'a' + i) as char))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(free_target("vda", &refs).as_deref(), Some("vdaa"));
    }

    #[test]
    pub(crate) fn openable_check_names_the_path() {
        let err = check_openable(Path::new("/nonexistent/hp.img"), true).unwrap_err();
        assert!(err.contains("/nonexistent/hp.img"), "{err}");
    }
}
