//! VM snapshots in the storage directory: KubeVirt's `VirtualMachineSnapshot` /
//! `VirtualMachineRestore` on one machine.
//!
//! ```text
//! <storage>/snapshots/<namespace>/<name>/<volume>.img    the point-in-time copy of the claim
//!                                                        behind the VM's volume <volume>
//! <storage>/snapshots/<namespace>/<name>/snapshot.json   the manifest; written last,
//!                                                        atomically: a snapshot is complete
//!                                                        (KubeVirt's readyToUse) exactly
//!                                                        when it exists
//! <storage>/snapshots/<namespace>/.<name>.lock           flock held while it is taken,
//!                                                        restored, cloned or deleted
//! ```
//!
//! Taking one needs the running VM (the core, `vm::snapshot`, copies the disks with libvirt's
//! backup job); this module owns the layout, the manifest, listing, deleting, restoring onto
//! the stopped VM's claims, and the copy a DataVolume `source.snapshot` clones.
//!
//! Restore: only while no launcher runs the VM (the machine-wide VM lock of
//! [`crate::pod::lock_vm`] is taken for the restore, so none can start meanwhile); every
//! volume is first copied next to its claim (`<claim>/.restore/`), fsynced, and only then are
//! the copies renamed over the claims' images, one `rename` each: a claim is never
//! half-written, and a restore that fails before the renames leaves every claim as it was.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::claim::{self, ClaimMeta};
use super::import::{self, io_reason, Job};
use super::progress::ProgressStyle;
use super::spec::ClaimRef;
use super::DataVolumeError;

pub const MANIFEST: &str = "snapshot.json";
const RESTORE_DIR: &str = ".restore";

/// KubeVirt's snapshot indications (`VirtualMachineSnapshotIndication`).
pub const INDICATION_ONLINE: &str = "Online";
pub const INDICATION_GUEST_AGENT: &str = "GuestAgent";
pub const INDICATION_NO_GUEST_AGENT: &str = "NoGuestAgent";

/// Errors of snapshots; each names the snapshot (`namespace/name`) and the reason, on one line.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {snapshot}: {reason}")]
    Refused { snapshot: String, reason: String },
    #[error("snapshot {snapshot}: not found in {}", dir.display())]
    NotFound { snapshot: String, dir: PathBuf },
    #[error("snapshot {snapshot}: {}: {reason}", path.display())]
    Io {
        snapshot: String,
        path: PathBuf,
        reason: String,
    },
    #[error("snapshot {snapshot}: {source}")]
    Copy {
        snapshot: String,
        #[source]
        source: Box<DataVolumeError>,
    },
}

/// One volume of a snapshot: which claim it copies, and the claim's metadata at that time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotVolume {
    /// The VM's volume name.
    pub volume: String,
    /// The claim's `claim.json` when the snapshot was taken (name, size, mode, access modes).
    pub claim: ClaimMeta,
    /// The copy, a raw image of `claim.size` bytes, relative to the snapshot's directory.
    pub file: String,
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub name: String,
    pub namespace: String,
    /// The VirtualMachine the snapshot is of.
    pub vm: String,
    /// RFC 3339 UTC: the point in time of the copy.
    pub creation_time: String,
    /// KubeVirt's indications: `Online`, and `GuestAgent` (filesystems frozen through the
    /// agent: application-consistent) or `NoGuestAgent` (crash-consistent).
    pub indications: Vec<String>,
    /// How long the guest's filesystems were frozen, in milliseconds (0 without the agent).
    pub frozen_ms: u64,
    /// How the disks were copied (`libvirt-backup-push`).
    pub method: String,
    pub volumes: Vec<SnapshotVolume>,
}

impl Manifest {
    pub fn size(&self) -> u64 {
        self.volumes.iter().map(|v| v.claim.size).sum()
    }
}

/// A snapshot as listed: complete (its manifest) or not (taken or deleted when interrupted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    Ready(Box<Manifest>),
    Incomplete { namespace: String, name: String },
}

pub fn snapshots_root(storage: &Path) -> PathBuf {
    storage.join("snapshots")
}

pub fn snapshot_dir(storage: &Path, s: &ClaimRef) -> PathBuf {
    snapshots_root(storage).join(&s.namespace).join(&s.name)
}

fn lock_path(storage: &Path, s: &ClaimRef) -> PathBuf {
    snapshots_root(storage)
        .join(&s.namespace)
        .join(format!(".{}.lock", s.name))
}

/// The file a volume's copy is kept in.
pub fn volume_file(volume: &str) -> String {
    format!("{volume}.img")
}

/// Checks that `namespace/name` can name a snapshot (never a path).
pub fn check_ref(namespace: &str, name: &str) -> Result<ClaimRef, SnapshotError> {
    let snapshot = format!("{namespace}/{name}");
    if !crate::spec::is_dns1123_label(namespace) {
        return Err(SnapshotError::Refused {
            snapshot,
            reason: "the namespace is not a DNS-1123 label".into(),
        });
    }
    if !crate::spec::is_dns1123_subdomain(name) {
        return Err(SnapshotError::Refused {
            snapshot,
            reason:
                "the name is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')"
                    .into(),
        });
    }
    Ok(ClaimRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

fn io(s: &ClaimRef, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (snapshot, path) = (s.to_string(), path.to_path_buf());
    move |e| SnapshotError::Io {
        snapshot,
        path,
        reason: io_reason(&e),
    }
}

/// Takes the snapshot's lock (exclusive, without waiting: another operation on it is running).
fn lock(storage: &Path, s: &ClaimRef) -> Result<Flock<File>, SnapshotError> {
    let path = lock_path(storage, s);
    let parent = path.parent().unwrap_or(storage);
    fs::create_dir_all(parent).map_err(io(s, parent))?;
    let file = File::create(&path).map_err(io(s, &path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| SnapshotError::Refused {
        snapshot: s.to_string(),
        reason: "another snapshot, restore, clone or delete of it is running".into(),
    })
}

/// A snapshot being taken: its directory exists and is locked; [`Pending::commit`] writes the
/// manifest, [`Pending::abandon`] (or dropping it) removes what was written.
#[derive(Debug)]
pub struct Pending {
    pub snapshot: ClaimRef,
    pub dir: PathBuf,
    committed: bool,
    _lock: Flock<File>,
}

/// Starts taking snapshot `s`: refused when a complete one of that name exists; what an
/// interrupted one left is removed.
pub fn begin(storage: &Path, s: &ClaimRef) -> Result<Pending, SnapshotError> {
    let lock = lock(storage, s)?;
    let dir = snapshot_dir(storage, s);
    if dir.join(MANIFEST).exists() {
        return Err(SnapshotError::Refused {
            snapshot: s.to_string(),
            reason: format!(
                "already exists in {} (delete it first, or choose another name)",
                dir.display()
            ),
        });
    }
    if dir.exists() {
        tracing::info!(snapshot = %s, "removing what an interrupted snapshot left");
        fs::remove_dir_all(&dir).map_err(io(s, &dir))?;
    }
    fs::create_dir_all(&dir).map_err(io(s, &dir))?;
    Ok(Pending {
        snapshot: s.clone(),
        dir,
        committed: false,
        _lock: lock,
    })
}

impl Pending {
    /// fsyncs the copies and writes the manifest last: the snapshot is complete.
    pub fn commit(mut self, manifest: &Manifest) -> Result<(), SnapshotError> {
        let s = self.snapshot.clone();
        for v in &manifest.volumes {
            let p = self.dir.join(&v.file);
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&s, &p))?;
        }
        claim::sync_dir(&self.dir).map_err(io(&s, &self.dir))?;
        let path = self.dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Io {
            snapshot: s.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        claim::write_atomic(&path, &json).map_err(io(&s, &path))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The manifest of the complete snapshot `s`.
pub fn read(storage: &Path, s: &ClaimRef) -> Result<Manifest, SnapshotError> {
    let dir = snapshot_dir(storage, s);
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotFound {
                snapshot: s.to_string(),
                dir: snapshots_root(storage),
            })
        }
        Err(e) => return Err(io(s, &path)(e)),
    };
    serde_json::from_str(&text).map_err(|e| SnapshotError::Io {
        snapshot: s.to_string(),
        path,
        reason: format!("unreadable manifest: {e}"),
    })
}

/// The snapshots in `storage` (of `namespace`, or all), sorted by namespace and name.
pub fn list(storage: &Path, namespace: Option<&str>) -> Vec<Listed> {
    let root = snapshots_root(storage);
    let mut out = Vec::new();
    let namespaces: Vec<String> = match namespace {
        Some(n) => vec![n.to_string()],
        None => read_names(&root),
    };
    for ns in namespaces {
        for name in read_names(&root.join(&ns)) {
            let Ok(s) = check_ref(&ns, &name) else {
                continue;
            };
            out.push(match read(storage, &s) {
                Ok(m) => Listed::Ready(Box::new(m)),
                Err(_) => Listed::Incomplete {
                    namespace: ns.clone(),
                    name,
                },
            });
        }
    }
    out
}

/// Directory names in `dir` (not hidden), sorted.
fn read_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Deletes snapshot `s` (the manifest first: an interrupted delete leaves an incomplete
/// snapshot, never one that looks complete with a file missing).
pub fn delete(storage: &Path, s: &ClaimRef) -> Result<(), SnapshotError> {
    let _lock = lock(storage, s)?;
    let dir = snapshot_dir(storage, s);
    if !dir.exists() {
        return Err(SnapshotError::NotFound {
            snapshot: s.to_string(),
            dir: snapshots_root(storage),
        });
    }
    let manifest = dir.join(MANIFEST);
    match fs::remove_file(&manifest) {
        Ok(()) => claim::sync_dir(&dir).map_err(io(s, &dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(s, &manifest)(e)),
    }
    fs::remove_dir_all(&dir).map_err(io(s, &dir))
}

/// What a restore did, per volume: the claim and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub volume: String,
    pub claim: ClaimRef,
    pub size: u64,
}

/// Restores snapshot `s` onto its VM's claims: refused while a launcher runs the VM.
pub fn restore(
    storage: &Path,
    s: &ClaimRef,
    style: ProgressStyle,
) -> Result<Vec<Restored>, SnapshotError> {
    let _lock = lock(storage, s)?;
    let manifest = read(storage, s)?;
    let dir = snapshot_dir(storage, s);
    // No launcher may run the VM meanwhile; one that runs it now refuses the restore.
    let domain = format!("{}_{}", manifest.namespace, manifest.vm);
    let _vm_lock = crate::pod::lock_vm(
        Path::new(crate::pod::VM_LOCK_DIR),
        &domain,
        Path::new("virt-launcher snapshot restore"),
    )
    .map_err(|e| SnapshotError::Refused {
        snapshot: s.to_string(),
        reason: match e {
            crate::pod::PodError::VmBusy { vm, holder } => format!(
                "VM {vm} is running (its launcher's runtime directory is {holder}); stop it, then restore"
            ),
            e => e.to_string(),
        },
    })?;

    // Claim locks (the import lock), held until the claims are replaced.
    let mut locks = Vec::new();
    for v in &manifest.volumes {
        let c = ClaimRef {
            namespace: v.claim.namespace.clone(),
            name: v.claim.name.clone(),
        };
        // The manifest is ours, but it is a file: never trust a name from it as a path.
        check_ref(&c.namespace, &c.name)?;
        let lp = claim::lock_path(storage, &c);
        let parent = lp.parent().unwrap_or(storage);
        fs::create_dir_all(parent).map_err(io(s, parent))?;
        let f = File::create(&lp).map_err(io(s, &lp))?;
        let l = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| {
            SnapshotError::Refused {
                snapshot: s.to_string(),
                reason: format!("claim {c} is being imported or cloned; try again when it is done"),
            }
        })?;
        locks.push(l);
    }

    // 1. Copy every volume next to its claim; nothing is replaced yet.
    let mut staged = Vec::new();
    let result = (|| {
        for v in &manifest.volumes {
            let c = ClaimRef {
                namespace: v.claim.namespace.clone(),
                name: v.claim.name.clone(),
            };
            let cdir = claim::claim_dir(storage, &c);
            let created = !cdir.exists();
            fs::create_dir_all(&cdir).map_err(io(s, &cdir))?;
            let staging = cdir.join(RESTORE_DIR);
            if staging.exists() {
                fs::remove_dir_all(&staging).map_err(io(s, &staging))?;
            }
            fs::create_dir(&staging).map_err(io(s, &staging))?;
            staged.push((v, c.clone(), cdir.clone(), staging.clone(), created));
            let label = c.to_string();
            let job = Job {
                dv: &label,
                style,
                staging: &staging,
                size_hint: "the snapshot's claim size",
                source: None,
            };
            let src = dir.join(&v.file);
            let copy = import::from_claim(&job, &src, Some(v.claim.size))
                .and_then(|(disk, size)| import::finish(&job, &disk, size, false).map(|_| disk));
            copy.map_err(|e| SnapshotError::Copy {
                snapshot: s.to_string(),
                source: Box::new(e),
            })?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (_, _, cdir, staging, created) in &staged {
            let _ = fs::remove_dir_all(staging);
            if *created {
                let _ = fs::remove_dir(cdir);
            }
        }
        return Err(e);
    }

    // 2. Replace: one rename per claim, then its claim.json (as recorded at the snapshot).
    let mut done = Vec::new();
    for (v, c, cdir, staging, _) in staged {
        let image = cdir.join(claim::image_name(v.claim.volume_mode));
        let disk = staging.join("disk.img");
        fs::rename(&disk, &image).map_err(io(s, &image))?;
        // A claim of the other mode left from before would shadow nothing, but confuse.
        let other = match v.claim.volume_mode {
            super::VolumeMode::Filesystem => claim::BLOCK_IMAGE,
            super::VolumeMode::Block => claim::FS_IMAGE,
        };
        let _ = fs::remove_file(cdir.join(other));
        let _ = fs::remove_dir(&staging);
        let mut meta = v.claim.clone();
        meta.completed_at = claim::rfc3339(SystemTime::now());
        claim::write_meta(&cdir, &meta).map_err(io(s, &cdir.join(claim::META_FILE)))?;
        claim::sync_dir(&cdir).map_err(io(s, &cdir))?;
        done.push(Restored {
            volume: v.volume.clone(),
            claim: c,
            size: v.claim.size,
        });
    }
    Ok(done)
}

/// Takes snapshot `s` of the stopped VM in `vm_file` (KubeVirt's offline snapshot: no
/// indications): a copy of each of its claims, refused while a launcher runs the VM (take it
/// through that launcher: `launcherctl snapshot`).
pub fn take_offline(
    storage: &Path,
    vm_file: &Path,
    name: &str,
    style: ProgressStyle,
) -> Result<Manifest, SnapshotError> {
    let vm = super::load_vm(vm_file).map_err(|e| SnapshotError::Refused {
        snapshot: name.to_string(),
        reason: e.to_string(),
    })?;
    let vmi = vm.into_vmi();
    let namespace = vmi.namespace().to_string();
    let s = check_ref(&namespace, name)?;
    let refused = |reason: String| SnapshotError::Refused {
        snapshot: s.to_string(),
        reason,
    };
    let domain = format!("{namespace}_{}", vmi.metadata.name);
    let _vm_lock = crate::pod::lock_vm(
        Path::new(crate::pod::VM_LOCK_DIR),
        &domain,
        Path::new("virt-launcher snapshot create"),
    )
    .map_err(|e| {
        refused(match e {
            crate::pod::PodError::VmBusy { vm, holder } => format!(
                "VM {vm} is running (its launcher's runtime directory is {holder}); take the snapshot through it: launcherctl snapshot {name}"
            ),
            e => e.to_string(),
        })
    })?;
    let mut claims = Vec::new();
    for v in &vmi.spec.volumes {
        let claim_name = if let Some(d) = &v.data_volume {
            &d.name
        } else if let Some(p) = &v.persistent_volume_claim {
            &p.claim_name
        } else {
            continue;
        };
        let c = check_ref(&namespace, claim_name).map_err(|_| {
            refused(format!(
                "volume {}: {claim_name:?} is not a claim name",
                v.name
            ))
        })?;
        let dir = claim::claim_dir(storage, &c);
        let Some(meta) = claim::read_meta(&dir) else {
            return Err(refused(format!(
                "claim {c} of volume {} is gone (no complete claim in {})",
                v.name,
                dir.display()
            )));
        };
        claims.push((v.name.clone(), c, meta));
    }
    if claims.is_empty() {
        return Err(refused("the VM has no claims to snapshot".into()));
    }
    let pending = begin(storage, &s)?;
    let mut volumes = Vec::new();
    for (volume, c, meta) in claims {
        let scratch = pending.dir.join(format!(".copy-{volume}"));
        fs::create_dir(&scratch).map_err(io(&s, &scratch))?;
        let label = c.to_string();
        let job = Job {
            dv: &label,
            style,
            staging: &scratch,
            size_hint: "the claim's size",
            source: None,
        };
        let src = claim::claim_dir(storage, &c).join(claim::image_name(meta.volume_mode));
        let (disk, size) = import::from_claim(&job, &src, None)
            .and_then(|(d, size)| import::finish(&job, &d, size, false).map(|_| (d, size)))
            .map_err(|e| SnapshotError::Copy {
                snapshot: s.to_string(),
                source: Box::new(e),
            })?;
        let file = volume_file(&volume);
        let dest = pending.dir.join(&file);
        fs::rename(&disk, &dest).map_err(io(&s, &dest))?;
        let _ = fs::remove_dir(&scratch);
        let mut meta = meta;
        meta.size = size;
        volumes.push(SnapshotVolume {
            volume,
            claim: meta,
            file,
        });
    }
    let manifest = Manifest {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vm: vmi.metadata.name.clone(),
        creation_time: claim::rfc3339(SystemTime::now()),
        indications: Vec::new(),
        frozen_ms: 0,
        method: "copy (VM stopped)".into(),
        volumes,
    };
    pending.commit(&manifest)?;
    Ok(manifest)
}

/// The copy a DataVolume `source.snapshot` clones: `name` is a snapshot holding exactly one
/// volume, or `<snapshot>.<volume>` for one volume of a snapshot holding several.
pub(crate) fn clone_source(
    storage: &Path,
    r: &ClaimRef,
) -> Result<(PathBuf, SnapshotVolume, Flock<File>), String> {
    let try_one = |snap: &str, volume: Option<&str>| -> Option<Result<_, String>> {
        let s = check_ref(&r.namespace, snap).ok()?;
        let m = read(storage, &s).ok()?;
        let v = match volume {
            Some(vol) => match m.volumes.iter().find(|v| v.volume == vol) {
                Some(v) => v.clone(),
                None => return Some(Err(format!("snapshot {s} has no volume {vol:?}"))),
            },
            None if m.volumes.len() == 1 => m.volumes[0].clone(),
            None => {
                let names: Vec<&str> = m.volumes.iter().map(|v| v.volume.as_str()).collect();
                return Some(Err(format!(
                    "snapshot {s} holds {} volumes ({}): name one as {}.<volume>",
                    names.len(),
                    names.join(", "),
                    s.name
                )));
            }
        };
        let lock = match lock(storage, &s) {
            Ok(l) => l,
            Err(e) => return Some(Err(e.to_string())),
        };
        Some(Ok((snapshot_dir(storage, &s).join(&v.file), v, lock)))
    };
    if let Some(r) = try_one(&r.name, None) {
        return r;
    }
    if let Some((snap, vol)) = r.name.rsplit_once('.') {
        if let Some(r) = try_one(snap, Some(vol)) {
            return r;
        }
    }
    Err(format!(
        "no complete snapshot {r} (nor {}) in {}",
        r.name
            .rsplit_once('.')
            .map(|(a, b)| format!("volume {b} of a snapshot {}/{a}", r.namespace))
            .unwrap_or_else(|| "<snapshot>.<volume>".into()),
        snapshots_root(storage).display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datavolume::VolumeMode;

    fn meta(name: &str, size: u64) -> ClaimMeta {
        ClaimMeta {
            name: name.into(),
            namespace: "default".into(),
            source: serde_json::json!({"blank": {}}),
            requested: "1Mi".into(),
            size,
            volume_mode: VolumeMode::Filesystem,
            access_modes: vec!["ReadWriteOnce".into()],
            shared: false,
            completed_at: String::new(),
        }
    }

    fn manifest(name: &str, vols: &[(&str, &str)]) -> Manifest {
        Manifest {
            name: name.into(),
            namespace: "default".into(),
            vm: format!("vm-{}", std::process::id()),
            creation_time: claim::rfc3339(SystemTime::now()),
            indications: vec![INDICATION_ONLINE.into(), INDICATION_NO_GUEST_AGENT.into()],
            frozen_ms: 0,
            method: "test".into(),
            volumes: vols
                .iter()
                .map(|(v, c)| SnapshotVolume {
                    volume: v.to_string(),
                    claim: meta(c, 8192),
                    file: volume_file(v),
                })
                .collect(),
        }
    }

    /// Take (by hand), list, restore onto claims, clone-source lookup, delete; an
    /// interrupted snapshot is incomplete and never restored; unknown names say so.
    #[test]
    fn snapshot_lifecycle_in_the_storage_directory() {
        let storage = std::env::temp_dir().join(format!("vl-snap-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&storage);
        let s = check_ref("default", "s1").unwrap();
        let p = begin(&storage, &s).unwrap();
        let m = manifest("s1", &[("root", "root-dv"), ("data", "data-dv")]);
        for v in &m.volumes {
            fs::write(p.dir.join(&v.file), vec![v.volume.as_bytes()[0]; 8192]).unwrap();
        }
        // A second take of the same name while the first runs is refused.
        assert!(begin(&storage, &s)
            .unwrap_err()
            .to_string()
            .contains("another snapshot"));
        p.commit(&m).unwrap();
        assert!(begin(&storage, &s)
            .unwrap_err()
            .to_string()
            .contains("already exists"));

        // An interrupted one: no manifest.
        let broken = check_ref("default", "broken").unwrap();
        // What a snapshot whose process died left: copies, no manifest, no lock held.
        let bdir = snapshot_dir(&storage, &broken);
        fs::create_dir_all(&bdir).unwrap();
        fs::write(bdir.join("root.img"), b"partial").unwrap();
        let listed = list(&storage, None);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(matches!(&listed[0], Listed::Incomplete { name, .. } if name == "broken"));
        assert!(matches!(&listed[1], Listed::Ready(m) if m.name == "s1"));
        let e = restore(&storage, &broken, ProgressStyle::Log)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "snapshot default/broken: not found in {}",
                snapshots_root(&storage).display()
            )
        );

        // Taking it again starts over; abandoned, nothing of it is left.
        let again = begin(&storage, &broken).unwrap();
        assert!(!bdir.join("root.img").exists());
        drop(again);
        assert!(!bdir.exists());

        // Claims with other contents: restored to the snapshot's.
        let root_dir = claim::claim_dir(&storage, &check_ref("default", "root-dv").unwrap());
        fs::create_dir_all(&root_dir).unwrap();
        fs::write(root_dir.join("disk.img"), vec![0u8; 100]).unwrap();
        // A restore that fails on its second volume (its copy is gone) changes no claim.
        let data_copy = snapshot_dir(&storage, &s).join("data.img");
        let kept = storage.join("data.img.kept");
        fs::rename(&data_copy, &kept).unwrap();
        let e = restore(&storage, &s, ProgressStyle::Log)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("snapshot default/s1: "), "{e}");
        assert_eq!(fs::read(root_dir.join("disk.img")).unwrap(), vec![0u8; 100]);
        assert!(!root_dir.join(RESTORE_DIR).exists());
        let data_dir = claim::claim_dir(&storage, &check_ref("default", "data-dv").unwrap());
        assert!(
            !data_dir.exists(),
            "the claim it would have created is not left"
        );
        fs::rename(&kept, &data_copy).unwrap();

        let done = restore(&storage, &s, ProgressStyle::Log).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(
            fs::read(root_dir.join("disk.img")).unwrap(),
            vec![b'r'; 8192]
        );
        let data_dir = claim::claim_dir(&storage, &check_ref("default", "data-dv").unwrap());
        assert_eq!(
            fs::read(data_dir.join("disk.img")).unwrap(),
            vec![b'd'; 8192]
        );
        assert_eq!(claim::read_meta(&data_dir).unwrap().size, 8192);
        assert!(!root_dir.join(RESTORE_DIR).exists());

        // Clone sources: one volume of several needs its name.
        let e = clone_source(&storage, &check_ref("default", "s1").unwrap()).unwrap_err();
        assert!(e.contains("holds 2 volumes (root, data)"), "{e}");
        let (path, v, _l) =
            clone_source(&storage, &check_ref("default", "s1.data").unwrap()).unwrap();
        assert_eq!(v.volume, "data");
        assert_eq!(path, snapshot_dir(&storage, &s).join("data.img"));
        drop(_l);
        let e = clone_source(&storage, &check_ref("default", "nope").unwrap()).unwrap_err();
        assert!(e.starts_with("no complete snapshot default/nope"), "{e}");

        delete(&storage, &s).unwrap();
        assert!(!snapshot_dir(&storage, &s).exists());
        let e = delete(&storage, &s).unwrap_err().to_string();
        assert!(e.starts_with("snapshot default/s1: not found"), "{e}");
        let _ = fs::remove_dir_all(&storage);
    }

    #[test]
    fn names_are_never_paths() {
        for (ns, n) in [
            ("default", "../x"),
            ("default", "a/b"),
            ("..", "x"),
            ("default", ""),
        ] {
            assert!(check_ref(ns, n).is_err(), "{ns}/{n}");
        }
    }
}
