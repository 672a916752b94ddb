//! Snapshot of the running VM (KubeVirt's `VirtualMachineSnapshot`, online): every claim of the
//! VM copied at one point in time while the guest runs on.
//!
//! The point in time is libvirt's `virDomainBackupBegin` in push mode: QEMU starts a
//! copy-before-write job per disk, so what the guest writes afterwards never reaches the copy.
//! With the guest agent connected the filesystems are frozen just around that call (the
//! agent's freeze, as for virt-freezer) and thawed as soon as it returns; the copy then runs
//! with the guest thawed. Without the agent the snapshot is crash-consistent (KubeVirt's
//! `NoGuestAgent` indication). The copy is a libvirt job, followed here by its statistics
//! (bytes, rate, ETA) until it ends; the manifest is written last.
//!
//! Reflink copies (`FICLONE`) were the other way: they need a filesystem with shared extents
//! (XFS with reflink, btrfs), and without one the copy would have to be made entirely while
//! the guest is frozen. See the README for the measurements.

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
        let mut xml = String::from("<domainbackup mode='push'>\n  <disks>\n");
        for d in &status.disks {
            match volumes.iter().find(|(v, _, _)| v == &d.volume) {
                Some((v, _, target)) => {
                    let file = pending.dir.join(snap::volume_file(v));
                    xml += &format!(
                        "    <disk name='{}' backup='yes' type='file'>\n      <driver type='raw'/>\n      <target file='{}'/>\n    </disk>\n",
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

        // The copy: follow the job until it ends.
        let copy_start = Instant::now();
        let label = format!("snapshot {s}");
        let mut progress: Option<Progress> = None;
        loop {
            let d = domain.clone();
            let stats = self.blocking(move |hv| hv.job_stats(&d, false)).await?;
            if stats.job_type == VIR_DOMAIN_JOB_NONE {
                break;
            }
            let total = stats.get("disk_total").map(|v| v as u64);
            let done = stats.get("disk_processed").map(|v| v as u64).unwrap_or(0);
            let p = progress.get_or_insert_with(|| {
                Progress::new(&label, "snapshot", total, ProgressStyle::Log)
            });
            p.set(done);
            tokio::time::sleep(POLL).await;
        }
        let d = domain.clone();
        let end = self.blocking(move |hv| hv.job_stats(&d, true)).await?;
        if end.job_type != VIR_DOMAIN_JOB_COMPLETED {
            return Err(refused(format!(
                "the copy failed (libvirt job type {}; see the QEMU log); nothing was kept",
                end.job_type
            )));
        }
        let bytes = end.get("disk_total").map(|v| v as u64).unwrap_or_default();
        let p = progress.get_or_insert_with(|| {
            Progress::new(&label, "snapshot", Some(bytes), ProgressStyle::Log)
        });
        p.set(bytes);
        p.finish();
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
