//! Snapshot of the running VM (KubeVirt's `VirtualMachineSnapshot`, online): every claim of the
//! VM copied at one point in time while the guest runs on.
//!
//! The point in time is libvirt's `virDomainBackupBegin`: QEMU starts a copy-before-write
//! filter per disk, so what the guest writes afterwards never reaches the copy. With the guest
//! agent connected the filesystems are frozen just around that call (the agent's freeze, as
//! for virt-freezer) and thawed as soon as it returns. Without the agent the snapshot is
//! crash-consistent (KubeVirt's `NoGuestAgent` indication). The manifest is written last.
//!
//! Pull mode by default: QEMU exports the point in time over NBD on a unix socket in the
//! snapshot's directory and `qemu-img convert` reads it after the thaw (progress from its
//! `-p`); the job is then aborted, which is how a pull-mode backup ends. Push mode (QEMU
//! writes the copies itself, followed by the job's statistics) starts copying inside
//! `backupBegin`, and QEMU's busy main loop then delays the agent's thaw by seconds (measured
//! in the README); it stays selectable with `VIRT_LAUNCHER_SNAPSHOT_COPY=push`.
//!
//! Reflink copies (`FICLONE`) were the other way: they need a filesystem with shared extents
//! (XFS with reflink, btrfs), and without one the copy would have to be made entirely while
//! the guest is frozen.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::core::{ControlError, Launcher, FREEZE_TIMEOUT};
use super::state::{EventKind, State};
use crate::datavolume::snapshot::{self as snap, Manifest, SnapshotVolume};
use crate::datavolume::{claim, ClaimRef, Progress, ProgressStyle};
use crate::libvirt::{VIR_DOMAIN_JOB_COMPLETED, VIR_DOMAIN_JOB_NONE};

/// Where the running VM's claims live (`run --vm --storage-dir`): what a snapshot copies.
#[derive(Debug, Clone, Default)]
pub struct SnapshotStorage {
    pub dir: PathBuf,
    /// Volume name → its claim.
    pub claims: BTreeMap<String, ClaimRef>,
}

/// What a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOutcome {
    pub manifest: Manifest,
    /// The copy's bytes and how long it took after the point in time.
    pub bytes: u64,
    pub copy_ms: u64,
    /// Where the snapshot lives.
    pub directory: PathBuf,
}

/// How often the backup job's statistics are read.
const POLL: Duration = Duration::from_millis(200);

impl Launcher {
    /// Takes snapshot `name` of the running VM.
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotOutcome, ControlError> {
        let vmi = self.vmi.borrow().clone();
        let namespace = vmi
            .as_ref()
            .map(|v| v.namespace().to_string())
            .unwrap_or_else(|| "default".into());
        let vm_name = vmi
            .as_ref()
            .map(|v| v.metadata.name.clone())
            .unwrap_or_default();
        let refused = |reason: String| {
            ControlError::Precondition(format!("snapshot {namespace}/{name}: {reason}"))
        };
        let s = snap::check_ref(&namespace, name)
            .map_err(|e| ControlError::Precondition(e.to_string()))?;
        let Some(storage) = self.storage.clone() else {
            return Err(refused(
                "this launcher has no storage directory (snapshots copy the claims of `virt-launcher run --vm --storage-dir`)".into(),
            ));
        };
        let domain = self
            .domain_name()
            .map_err(|_| refused("no VM is running".into()))?;
        let status = self.status();
        if !matches!(status.state, State::Running | State::Paused) {
            return Err(refused(format!(
                "the VM is {:?}, not running; restore and snapshot a stopped VM with `virt-launcher snapshot`",
                status.state
            )));
        }
        if storage.claims.is_empty() {
            return Err(refused("the VM has no claims to snapshot".into()));
        }

        // Every claim must still be there, complete, and attached as a disk.
        let mut volumes = Vec::new();
        for (volume, c) in &storage.claims {
            let dir = claim::claim_dir(&storage.dir, c);
            let Some(meta) = claim::read_meta(&dir) else {
                return Err(refused(format!(
                    "claim {c} of volume {volume} is gone (no complete claim in {})",
                    dir.display()
                )));
            };
            if !dir.join(claim::image_name(meta.volume_mode)).is_file() {
                return Err(refused(format!(
                    "claim {c} of volume {volume} has no {} in {}",
                    claim::image_name(meta.volume_mode),
                    dir.display()
                )));
            }
            let Some(disk) = status.disks.iter().find(|d| &d.volume == volume) else {
                return Err(refused(format!(
                    "volume {volume} is not attached to the VM"
                )));
            };
            volumes.push((volume.clone(), meta, disk.target.clone()));
        }

        let pending =
            snap::begin(&storage.dir, &s).map_err(|e| ControlError::Precondition(e.to_string()))?;
        let mode = CopyMode::from_env().map_err(refused)?;
        let socket = pending.dir.join(".nbd.sock");
        if mode == CopyMode::Pull && socket.as_os_str().len() > 100 {
            return Err(refused(format!(
                "the storage directory's path is too long for the copy's unix socket ({})",
                socket.display()
            )));
        }
        let mut xml = match mode {
            CopyMode::Push => String::from("<domainbackup mode='push'>\n  <disks>\n"),
            CopyMode::Pull => format!(
                "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n",
                xml_escape(&socket.display().to_string())
            ),
        };
        for d in &status.disks {
            match volumes.iter().find(|(v, _, _)| v == &d.volume) {
                Some((v, _, target)) => {
                    let file = pending.dir.join(match mode {
                        CopyMode::Push => snap::volume_file(v),
                        CopyMode::Pull => format!(".{v}.scratch"),
                    });
                    let (element, kind) = match mode {
                        CopyMode::Push => ("target", "<driver type='raw'/>\n      "),
                        CopyMode::Pull => ("scratch", ""),
                    };
                    xml += &format!(
                        "    <disk name='{}' backup='yes' type='file'>\n      {kind}<{element} file='{}'/>\n    </disk>\n",
                        xml_escape(target),
                        xml_escape(&file.display().to_string())
                    );
                }
                None => {
                    xml += &format!("    <disk name='{}' backup='no'/>\n", xml_escape(&d.target))
                }
            }
        }
        xml += "  </disks>\n</domainbackup>\n";

        // The point in time: frozen just around backupBegin when the agent is connected.
        let agent = status.domain.agent_connected;
        let mut indications = vec![snap::INDICATION_ONLINE.to_string()];
        if agent {
            self.freeze(FREEZE_TIMEOUT)
                .await
                .map_err(|e| refused(format!("cannot freeze the guest's filesystems: {e}")))?;
            indications.push(snap::INDICATION_GUEST_AGENT.into());
        } else {
            indications.push(snap::INDICATION_NO_GUEST_AGENT.into());
        }
        // Frozen from the agent's answer to the thaw's: what this launcher holds the guest for.
        let frozen_at = Instant::now();
        let (d, x) = (domain.clone(), xml.clone());
        let begun = self.blocking(move |hv| hv.backup_begin(&d, &x, 0)).await;
        let point_in_time = std::time::SystemTime::now();
        let begin_ms = frozen_at.elapsed().as_millis() as u64;
        let frozen_ms = if agent {
            if let Err(e) = self.unfreeze().await {
                tracing::error!(error = %e, "thaw after the snapshot's point in time failed (the automatic thaw follows)");
            }
            frozen_at.elapsed().as_millis() as u64
        } else {
            0
        };
        begun.map_err(|e| refused(format!("cannot start the copy: {e}")))?;
        let consistency = if agent {
            format!("guest agent froze the filesystems for {frozen_ms} ms")
        } else {
            "no guest agent: crash-consistent".to_string()
        };
        tracing::info!(snapshot = %s, frozen_ms, backup_begin_ms = begin_ms, agent, "snapshot point in time fixed; copying");
        self.publish(
            EventKind::Volume,
            &format!("snapshot {s}: point in time fixed ({consistency}); copying"),
        );

        let copy_start = Instant::now();
        let label = format!("snapshot {s}");
        let bytes = match mode {
            CopyMode::Push => self.follow_push(&domain, &label).await?,
            CopyMode::Pull => {
                let copied = pull_copies(&volumes, &socket, &pending.dir, &label).await;
                // The pull-mode job ends when it is aborted (libvirt removes the scratch files).
                let d = domain.clone();
                if let Err(e) = self.blocking(move |hv| hv.abort_job(&d)).await {
                    tracing::warn!(error = %e, "ending the snapshot's backup job failed");
                }
                copied.map_err(refused)?
            }
        };
        let copy_ms = copy_start.elapsed().as_millis() as u64;

        let mut manifest_volumes = Vec::new();
        for (volume, mut meta, _) in volumes {
            let file = snap::volume_file(&volume);
            let path = pending.dir.join(&file);
            let len = std::fs::metadata(&path)
                .map_err(|e| refused(format!("{}: {e}", path.display())))?
                .len();
            // What the guest saw at the point in time (an online expansion may have grown it).
            meta.size = len;
            manifest_volumes.push(SnapshotVolume {
                volume,
                claim: meta,
                file,
            });
        }
        let manifest = Manifest {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vm: vm_name,
            creation_time: claim::rfc3339(point_in_time),
            indications,
            frozen_ms,
            method: "libvirt-backup-push".into(),
            volumes: manifest_volumes,
        };
        let directory = pending.dir.clone();
        pending
            .commit(&manifest)
            .map_err(|e| ControlError::Precondition(e.to_string()))?;
        tracing::info!(snapshot = %s, bytes, copy_ms, frozen_ms, "snapshot complete");
        self.publish(
            EventKind::Volume,
            &format!("snapshot {s}: complete ({bytes} bytes in {copy_ms} ms; {consistency})"),
        );
        Ok(SnapshotOutcome {
            manifest,
            bytes,
            copy_ms,
            directory,
        })
    }
}

/// How the copy is made after the point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyMode {
    /// libvirt's backup in push mode: QEMU writes the copies itself, right away.
    Push,
    /// libvirt's backup in pull mode: QEMU exports the point in time over NBD (guest writes
    /// meanwhile go copy-before-write to a scratch file) and `qemu-img convert` reads it,
    /// after the thaw.
    Pull,
}

impl CopyMode {
    /// `VIRT_LAUNCHER_SNAPSHOT_COPY` (`pull`, the default, or `push`: for measurements).
    fn from_env() -> Result<CopyMode, String> {
        match std::env::var("VIRT_LAUNCHER_SNAPSHOT_COPY").as_deref() {
            Err(_) | Ok("") | Ok("pull") => Ok(CopyMode::Pull),
            Ok("push") => Ok(CopyMode::Push),
            Ok(other) => Err(format!(
                "VIRT_LAUNCHER_SNAPSHOT_COPY={other:?}: use pull or push"
            )),
        }
    }
}

impl Launcher {
    /// Push mode: follows the backup job until it ends; its bytes.
    async fn follow_push(&self, domain: &str, label: &str) -> Result<u64, ControlError> {
        let mut progress: Option<Progress> = None;
        loop {
            let d = domain.to_string();
            let stats = self.blocking(move |hv| hv.job_stats(&d, false)).await?;
            if stats.job_type == VIR_DOMAIN_JOB_NONE {
                break;
            }
            let total = stats.get("disk_total").map(|v| v as u64);
            let done = stats.get("disk_processed").map(|v| v as u64).unwrap_or(0);
            let p = progress
                .get_or_insert_with(|| Progress::new(label, "snapshot", total, ProgressStyle::Log));
            p.set(done);
            tokio::time::sleep(POLL).await;
        }
        let d = domain.to_string();
        let end = self.blocking(move |hv| hv.job_stats(&d, true)).await?;
        if end.job_type != VIR_DOMAIN_JOB_COMPLETED {
            return Err(ControlError::Precondition(format!(
                "{label}: the copy failed (libvirt job type {}; see the QEMU log); nothing was kept",
                end.job_type
            )));
        }
        let bytes = end.get("disk_total").map(|v| v as u64).unwrap_or_default();
        let p = progress.get_or_insert_with(|| {
            Progress::new(label, "snapshot", Some(bytes), ProgressStyle::Log)
        });
        p.set(bytes);
        p.finish();
        Ok(bytes)
    }
}

/// Pull mode: `qemu-img convert` of each volume's NBD export (named after its disk target)
/// into `<dir>/<volume>.img`, with progress over all of them; the bytes copied.
async fn pull_copies(
    volumes: &[(String, crate::datavolume::ClaimMeta, String)],
    socket: &std::path::Path,
    dir: &std::path::Path,
    label: &str,
) -> Result<u64, String> {
    let jobs: Vec<(String, u64, String, PathBuf)> = volumes
        .iter()
        .map(|(volume, meta, target)| {
            (
                volume.clone(),
                meta.size,
                format!("nbd+unix:///{target}?socket={}", socket.display()),
                dir.join(snap::volume_file(volume)),
            )
        })
        .collect();
    let label = label.to_string();
    tokio::task::spawn_blocking(move || {
        let total: u64 = jobs.iter().map(|j| j.1).sum();
        let mut progress = Progress::new(&label, "snapshot", Some(total), ProgressStyle::Log);
        let mut base = 0u64;
        for (volume, size, source, dest) in &jobs {
            let mut child = crate::pod::process::Command::new("qemu-img")
                .args(["convert", "-p", "-f", "raw", "-O", "raw"])
                .arg(source)
                .arg(dest)
                .stdout(crate::pod::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("volume {volume}: {e}"))?;
            // `-p` prints "    (12.34/100%)" lines ended by \r.
            if let Some(mut out) = child.stdout.take() {
                let mut buf = [0u8; 256];
                let mut line = Vec::new();
                while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    for &b in &buf[..n] {
                        if b == b'\r' || b == b'\n' {
                            if let Some(pct) = percent(&line) {
                                progress.set(base + (*size as f64 * pct / 100.0) as u64);
                            }
                            line.clear();
                        } else {
                            line.push(b);
                        }
                    }
                }
            }
            let output = child
                .wait_with_output()
                .map_err(|e| format!("volume {volume}: {e}"))?;
            if !output.success() {
                return Err(format!(
                    "volume {volume}: the copy failed: {}",
                    output.failure()
                ));
            }
            base += size;
            progress.set(base);
        }
        progress.finish();
        Ok(total)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The percentage in a `qemu-img -p` line.
fn percent(line: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let inner = text.strip_prefix('(')?.split('/').next()?;
    inner.parse().ok()
}

/// `virDomainJobOperation`'s backup, in a job's `operation` statistic.
const JOB_OPERATION_BACKUP: f64 = 9.0;

/// Whether the statistics of a completed job are a backup's (a snapshot's copy).
pub(crate) fn is_backup_job(stats: &[(String, f64)]) -> bool {
    stats
        .iter()
        .any(|(k, v)| k == "operation" && *v == JOB_OPERATION_BACKUP)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_progress_lines() {
        assert_eq!(percent(b"    (12.50/100%)"), Some(12.5));
        assert_eq!(percent(b"(100.00/100%)"), Some(100.0));
        assert_eq!(percent(b"qemu-img: error"), None);
        assert_eq!(percent(b""), None);
    }

    /// A backup's completed job is a snapshot's, never the migration's.
    #[test]
    fn backup_jobs_are_told_apart() {
        assert!(is_backup_job(&[("operation".into(), 9.0)]));
        assert!(!is_backup_job(&[("operation".into(), 5.0)]));
        assert!(!is_backup_job(&[("downtime".into(), 9.0)]));
    }

    #[test]
    fn names_in_the_backup_xml_are_escaped() {
        assert_eq!(xml_escape("a'b<c>&\""), "a&apos;b&lt;c&gt;&amp;&quot;");
    }
}
