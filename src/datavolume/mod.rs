//! Standalone DataVolumes: what CDI and a CSI driver do in a cluster, done on one machine
//! before the launcher starts the VM.
//!
//! [`materialise`] reads a `kubevirt.io/v1` VirtualMachine's `spec.dataVolumeTemplates`, makes
//! each DataVolume a claim directory under the storage directory (see [`claim`] for the
//! layout), imports it unless it is already complete, and points the launcher's volume paths at
//! a per-VM view of the claims, so that [`crate::pod::facts::probe`] finds Filesystem claims as
//! `<volume>/disk.img` and Block claims as a block device node `<volume>` — exactly the pod
//! layout KubeVirt uses.
//!
//! Sources: `http` (http or https; raw or qcow2, optionally gzip/xz compressed; told apart by
//! magic bytes), `s3` (SigV4-signed, path-style), `registry` (the one file under `/disk/` of a
//! container image, pulled by [`registry`]), `pvc` (a copy of another claim in the storage
//! directory, by namespace/name), `snapshot` (a copy of a volume of a VM snapshot, see
//! [`snapshot`]) and `blank`. Secrets (`secretRef`) and ConfigMaps (`certConfigMap`) come from
//! the same manifest file, as `kubectl apply -f` would create them. The cluster-only sources
//! fail with an error that says why.
//!
//! Sizes follow CDI (see [`spec::DataVolumeSpec::disk_size`]): a `spec.pvc` Filesystem claim
//! holds a disk of the request minus CDI's default 5.5 % filesystem overhead (rounded down to
//! 1 MiB), a `spec.storage` claim one of the full request; Block claims are the request. An
//! image whose virtual size exceeds that is refused.
//!
//! Crash safety: an import works in `<claim>/.import/` and renames the finished, fsynced image
//! into place, then writes `claim.json` (atomically) last. A claim is complete exactly when
//! `claim.json` exists. An interrupted import (killed, or the launcher stopped) is done again
//! on the next run, except that an http/s3 download resumes where it stopped with a Range
//! request, when its record (`.import/download.json`) names the same source and the server
//! gave an `ETag` or `Last-Modified` to check that the file is unchanged (see
//! [`http::Partial`]); it is then unpacked and converted again. As CDI's scratch space: the
//! partial file never is the claim's disk. A failed import removes its scratch files, and the
//! claim directory too if the import created it, so the claim is left as it was.
//!
//! Sharing: `claim.json` records `accessModes`; a `ReadWriteMany` claim is `shared`
//! ([`claim_is_shared`]), the signal that two local launchers may use it at once (live
//! migration).

pub mod claim;
pub mod container_disk;
pub mod http;
mod import;
pub mod incoming;
mod loopdev;
mod progress;
mod refs;
pub mod registry;
pub mod s3;
pub mod snapshot;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use crate::convert::facts::PodPaths;
use crate::spec::{Manifest, SpecError, VirtualMachine, VirtualMachineInstance};

pub use claim::ClaimMeta;
pub(crate) use progress::Progress;
pub use progress::ProgressStyle;
pub use spec::{ClaimRef, DataVolumeSpec, Remote, Source, VolumeMode};

use import::{io_reason, Job};

/// Default storage directory of `virt-launcher run --vm`.
pub const DEFAULT_STORAGE_DIR: &str = "/var/lib/virt-launcher/storage";

/// Errors of standalone DataVolumes; each names the DataVolume (`namespace/name`) and what is
/// wrong, on one line.
#[derive(Debug, thiserror::Error)]
pub enum DataVolumeError {
    #[error("{file}: {reason}")]
    Load { file: String, reason: String },
    /// The manifest could not be read or parsed (names the file, and the field if any).
    #[error(transparent)]
    Manifest(#[from] SpecError),
    #[error("DataVolume {dv}: {field}: {reason}")]
    Spec {
        dv: String,
        field: String,
        reason: String,
    },
    #[error("DataVolume {dv}: {what} is not supported in standalone mode: {reason}")]
    Unsupported {
        dv: String,
        what: String,
        reason: String,
    },
    #[error("DataVolume {dv}: cannot import {url}: {reason}")]
    Download {
        dv: String,
        url: String,
        reason: String,
    },
    #[error("DataVolume {dv}: bad image: {reason}")]
    Image { dv: String, reason: String },
    #[error("DataVolume {dv}: image virtual size {virtual_size} bytes exceeds the claim's usable size {usable} bytes ({hint})")]
    TooLarge {
        dv: String,
        virtual_size: u64,
        usable: u64,
        /// Where the usable size comes from.
        hint: String,
    },
    #[error("DataVolume {dv}: clone source claim {source_claim}: {reason}")]
    CloneSource {
        dv: String,
        source_claim: String,
        reason: String,
    },
    #[error("DataVolume {dv}: {}: {reason}", path.display())]
    Io {
        dv: String,
        path: PathBuf,
        reason: String,
    },
    #[error("DataVolume {dv}: {source}")]
    Tool {
        dv: String,
        #[source]
        source: crate::pod::process::ProcessError,
    },
    #[error("DataVolume {dv}: the claim in {} was imported as {recorded} but the template asks for {wanted}; remove the claim directory to import it again", dir.display())]
    ModeMismatch {
        dv: String,
        dir: PathBuf,
        recorded: &'static str,
        wanted: &'static str,
    },
    #[error("volume {volume}: {kind} {claim} is not in spec.dataVolumeTemplates and has no claim in {}", dir.display())]
    MissingClaim {
        volume: String,
        kind: &'static str,
        claim: String,
        dir: PathBuf,
    },
    /// The import process's own error line (it names the DataVolume).
    #[error("{0}")]
    Import(String),
    /// A migration target cannot have this claim (`run --migration-target`).
    #[error("DataVolume {dv}: {reason}")]
    Incoming { dv: String, reason: String },
    #[error("the import process {}: {reason}", path.display())]
    Importer { path: PathBuf, reason: String },
    #[error("volume {volume}: {}: {reason}", path.display())]
    View {
        volume: String,
        path: PathBuf,
        reason: String,
    },
}

/// How [`materialise`] runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where claims live (`<dir>/claims/<namespace>/<name>`).
    pub storage_dir: PathBuf,
    pub progress: ProgressStyle,
    /// The `virt-launcher-import` binary (see [`importer_path`]).
    pub importer: PathBuf,
}

/// The import binary's name; it sits next to `virt-launcher`.
pub const IMPORTER: &str = "virt-launcher-import";

/// `$VIRT_LAUNCHER_IMPORT`, else `virt-launcher-import` in the directory of the running
/// binary (the launcher's image and `cargo build` put them side by side).
pub fn importer_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRT_LAUNCHER_IMPORT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(IMPORTER)))
        .unwrap_or_else(|| PathBuf::from(IMPORTER))
}

/// Claims in use by a running launcher. Dropping it detaches the loop devices this launcher
/// attached for Block claims.
#[derive(Debug, Default)]
pub struct Claims {
    /// Volume name → claim, for every PVC/DataVolume volume of the VM.
    pub volumes: BTreeMap<String, ClaimRef>,
    loops: Vec<loopdev::LoopDevice>,
}

impl Claims {
    /// Writes into the VMI's `status.volumeStatus` what virt-controller copies there from each
    /// volume's claim: its name, access modes and volume mode. What decides whether a live
    /// migration may share a claim (ReadWriteMany) is then the claim's recorded access modes, as
    /// in a cluster. What the file already states for a volume is kept.
    pub fn record_in_status(&self, storage_dir: &Path, vmi: &mut VirtualMachineInstance) {
        for (volume, claim_ref) in &self.volumes {
            let Some(meta) = claim::read_meta(&claim::claim_dir(storage_dir, claim_ref)) else {
                continue;
            };
            let status = vmi.status.get_or_insert_with(Default::default);
            let i = match status.volume_status.iter().position(|v| v.name == *volume) {
                Some(i) => i,
                None => {
                    status.volume_status.push(crate::spec::VolumeStatus {
                        name: volume.clone(),
                        ..Default::default()
                    });
                    status.volume_status.len() - 1
                }
            };
            let info = status.volume_status[i]
                .persistent_volume_claim_info
                .get_or_insert_with(Default::default);
            info.claim_name
                .get_or_insert_with(|| claim_ref.name.clone());
            if info.access_modes.is_empty() {
                info.access_modes = meta.access_modes.clone();
            }
            info.volume_mode
                .get_or_insert_with(|| meta.volume_mode.as_str().to_string());
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        for dev in &self.loops {
            loopdev::detach(dev);
        }
    }
}

/// Is the claim `namespace/name` in `storage_dir` complete and `ReadWriteMany`? Live migration
/// between two local launchers may share such a claim; any other claim (ReadWriteOnce, made by
/// hand without `claim.json`, incomplete, absent) is not shared.
pub fn claim_is_shared(storage_dir: &Path, namespace: &str, name: &str) -> bool {
    claim_meta(storage_dir, namespace, name).is_some_and(|m| m.shared)
}

/// The metadata of a complete claim.
pub fn claim_meta(storage_dir: &Path, namespace: &str, name: &str) -> Option<ClaimMeta> {
    let claim = ClaimRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    if !crate::spec::is_dns1123_label(namespace) || !crate::spec::is_dns1123_subdomain(name) {
        return None;
    }
    claim::read_meta(&claim::claim_dir(storage_dir, &claim))
}

/// Read the VirtualMachine in `file` (JSON or YAML; the first `VirtualMachine` document),
/// through the one manifest reader ([`Manifest`]) and its nesting guard.
pub fn load_vm(file: &Path) -> Result<VirtualMachine, DataVolumeError> {
    vm_of(&Manifest::read(file)?, file)
}

fn vm_of(manifest: &Manifest, file: &Path) -> Result<VirtualMachine, DataVolumeError> {
    let Some(doc) = manifest.find_kind("VirtualMachine") else {
        let found = manifest
            .docs
            .iter()
            .find_map(|d| d.get("kind").and_then(|k| k.as_str()))
            .unwrap_or("nothing");
        return Err(DataVolumeError::Load {
            file: file.display().to_string(),
            reason: format!(
                "--vm wants a kubevirt.io/v1 VirtualMachine, found {found} (a VirtualMachineInstance goes to --vmi)"
            ),
        });
    };
    Ok(manifest.deserialize(doc)?)
}

/// Make every DataVolume of the VirtualMachine in `vm_file` a complete claim under
/// `opts.storage_dir`, then point `paths` (`vmi_disks_dir`, `block_dev_dir`) at this VM's view
/// of its claims. `vmi` is the VMI the launcher runs (from the same file). The import runs in
/// a `virt-launcher-import` process ([`spawn_import`]), so that its TLS stack and buffers
/// never enter the launcher's memory. Call before [`crate::pod::facts::probe`]; keep the
/// returned [`Claims`] alive while the VM runs.
pub fn materialise(
    vm_file: &Path,
    vmi: &VirtualMachineInstance,
    opts: &Options,
    paths: &mut PodPaths,
) -> Result<Claims, DataVolumeError> {
    spawn_import(vm_file, vmi, opts)?.wait()?;
    attach(vmi, opts, paths)
}

/// A running `virt-launcher-import` (the leader of its own process group).
pub struct ImportProcess {
    child: crate::pod::process::Child,
    path: PathBuf,
}

/// Stops an import from another thread.
#[derive(Clone, Copy, Debug)]
pub struct ImportStopper(i32);

impl ImportStopper {
    /// SIGKILL to the import's process group (it and the tools it runs). What it leaves is
    /// scratch space that the next import removes; no claim looks complete.
    pub fn stop(self) {
        use nix::sys::signal::{killpg, Signal};
        let _ = killpg(nix::unistd::Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// Start `virt-launcher-import` for `vm_file`'s DataVolumes, its stderr (logs, progress)
/// shared with ours. Spawn it from a thread that outlives it: it dies with its parent thread
/// (`PR_SET_PDEATHSIG`).
pub fn spawn_import(
    vm_file: &Path,
    vmi: &VirtualMachineInstance,
    opts: &Options,
) -> Result<ImportProcess, DataVolumeError> {
    let storage = std::path::absolute(&opts.storage_dir).unwrap_or(opts.storage_dir.clone());
    spawn_importer(
        &opts.importer,
        opts.progress,
        &[
            "--vm".as_ref(),
            vm_file.as_os_str(),
            "--namespace".as_ref(),
            vmi.namespace().as_ref(),
            "--storage-dir".as_ref(),
            storage.as_os_str(),
        ],
    )
}

/// Start `virt-launcher-import` pulling the containerDisk images of the VMI in `vmi_file`
/// (JSON) into `cache` and linking them as `<links>/disk_<index>.img` (see
/// [`container_disk::prepare`]); as [`spawn_import`], the TLS stack stays in that process.
pub fn spawn_container_disk_pull(
    importer: &Path,
    progress: ProgressStyle,
    vmi_file: &Path,
    cache: &Path,
    links: &Path,
) -> Result<ImportProcess, DataVolumeError> {
    spawn_importer(
        importer,
        progress,
        &[
            "--container-disks-of".as_ref(),
            vmi_file.as_os_str(),
            "--container-disk-cache".as_ref(),
            cache.as_os_str(),
            "--container-disk-links".as_ref(),
            links.as_os_str(),
        ],
    )
}

fn spawn_importer(
    importer: &Path,
    progress: ProgressStyle,
    args: &[&std::ffi::OsStr],
) -> Result<ImportProcess, DataVolumeError> {
    use crate::pod::process::{Command, Stdio};
    let mut cmd = Command::new(importer);
    cmd.args(args)
        .arg("--progress")
        .arg(match progress {
            ProgressStyle::Bar => "bar",
            ProgressStyle::Log => "log",
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let child = cmd.spawn().map_err(|e| DataVolumeError::Importer {
        path: importer.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(ImportProcess {
        child,
        path: importer.to_path_buf(),
    })
}

impl ImportProcess {
    pub fn stopper(&self) -> ImportStopper {
        ImportStopper(self.child.pid())
    }

    /// Waits for the import; its error line becomes ours.
    pub fn wait(self) -> Result<(), DataVolumeError> {
        let path = self.path;
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| DataVolumeError::Importer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if out.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => Err(DataVolumeError::Import(line.trim().to_string())),
            None => Err(DataVolumeError::Importer {
                path,
                reason: format!("ended without a word ({})", out.exit),
            }),
        }
    }
}

/// The DataVolume templates of `vm` (in `namespace`), read and checked without any I/O:
/// every error names the template's field as written in the VM. [`import_claims`] reads them
/// again; the launcher calls this first, so that a bad template fails before any import.
pub fn templates(
    vm: &VirtualMachine,
    namespace: &str,
) -> Result<Vec<DataVolumeSpec>, DataVolumeError> {
    let namespace = namespace.to_string();

    let mut specs = Vec::new();
    let mut names = BTreeSet::new();
    for (i, t) in vm.spec.data_volume_templates.iter().enumerate() {
        if t.metadata.name.is_empty() {
            return Err(DataVolumeError::Spec {
                dv: format!("{namespace}/<spec.dataVolumeTemplates[{i}]>"),
                field: format!("spec.dataVolumeTemplates[{i}].metadata.name"),
                reason: "is required".into(),
            });
        }
        let s = spec::parse(
            &namespace,
            i,
            &t.metadata.name,
            t.metadata.namespace.as_deref(),
            &t.spec,
        )?;
        if !names.insert(s.claim.name.clone()) {
            return Err(DataVolumeError::Spec {
                dv: s.claim.to_string(),
                field: format!("spec.dataVolumeTemplates[{i}].metadata.name"),
                reason: "appears twice in spec.dataVolumeTemplates".into(),
            });
        }
        specs.push(s);
    }
    Ok(specs)
}

/// What `virt-launcher-import` does: every DataVolume of the VirtualMachine in `vm_file`
/// (namespace `namespace`) becomes a complete claim under `opts.storage_dir`, ConfigMaps and
/// Secrets coming from the same file.
pub fn import_claims(
    vm_file: &Path,
    namespace: &str,
    storage_dir: &Path,
    progress: ProgressStyle,
) -> Result<(), DataVolumeError> {
    let manifest = Manifest::read(vm_file)?;
    let vm = vm_of(&manifest, vm_file)?;
    let objects = refs::collect(&manifest, namespace)?;
    let storage = std::path::absolute(storage_dir).unwrap_or(storage_dir.to_path_buf());
    let specs = templates(&vm, namespace)?;

    // Clones of claims that other templates of this VM create come after those.
    let mut pending: Vec<&DataVolumeSpec> = specs.iter().collect();
    while !pending.is_empty() {
        let waits_for = |s: &DataVolumeSpec, pending: &[&DataVolumeSpec]| match &s.source {
            Source::Pvc(src) => pending.iter().any(|p| &p.claim == src),
            _ => false,
        };
        let ready: Vec<usize> = (0..pending.len())
            .filter(|&i| !waits_for(pending[i], &pending))
            .collect();
        // A cycle of clones: run them anyway, the first one reports its missing source.
        let next = ready.first().copied().unwrap_or(0);
        let s = pending.remove(next);
        ensure_claim(s, &storage, progress, &objects)?;
    }
    Ok(())
}

/// Point `paths` at this VM's view of its (complete) claims: see [`materialise`].
pub fn attach(
    vmi: &VirtualMachineInstance,
    opts: &Options,
    paths: &mut PodPaths,
) -> Result<Claims, DataVolumeError> {
    let storage = std::path::absolute(&opts.storage_dir).unwrap_or(opts.storage_dir.clone());
    build_view(vmi, &storage, paths)
}

/// The claim of `s`, imported unless complete.
fn ensure_claim(
    s: &DataVolumeSpec,
    storage: &Path,
    style: ProgressStyle,
    objects: &refs::Objects,
) -> Result<(), DataVolumeError> {
    let dv = s.claim.to_string();
    let dir = claim::claim_dir(storage, &s.claim);
    let io = |path: &Path| io_error(&dv, path);
    let parent = dir.parent().unwrap_or(storage);
    fs::create_dir_all(parent).map_err(io(parent))?;

    // One import per claim at a time (two launchers of VMs sharing a storage directory).
    let lock_path = claim::lock_path(storage, &s.claim);
    let lock_file = File::create(&lock_path).map_err(io(&lock_path))?;
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((f, _)) => {
            tracing::info!(dataVolume = %dv, "waiting for another launcher importing this claim");
            Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, e)| io(&lock_path)(std::io::Error::from(e)))?
        }
    };

    if let Some(meta) = claim::read_meta(&dir) {
        if meta.volume_mode != s.volume_mode {
            return Err(DataVolumeError::ModeMismatch {
                dv,
                dir,
                recorded: meta.volume_mode.as_str(),
                wanted: s.volume_mode.as_str(),
            });
        }
        let image = dir.join(claim::image_name(meta.volume_mode));
        fs::metadata(&image).map_err(io(&image))?;
        if meta.source != s.source_json {
            tracing::warn!(dataVolume = %dv, recorded = %meta.source, template = %s.source_json,
                "the claim was imported from another source; keeping it (remove the claim directory to import again)");
        }
        tracing::info!(dataVolume = %dv, claim = %dir.display(), size = meta.size, "claim complete, reusing it");
        return Ok(());
    }

    let created = !dir.exists();
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let staging = dir.join(claim::STAGING_DIR);
    if staging.exists() {
        // What an interrupted http/s3 import downloaded is kept for its download to resume
        // (with its record, which says where it stopped and of what); the rest is made again.
        let resumable = matches!(s.source, Source::Http(_) | Source::S3(_))
            && staging.join(import::RESUME_RECORD).is_file()
            && staging.join(import::DOWNLOAD).is_file();
        if resumable {
            tracing::info!(dataVolume = %dv, "an earlier import was interrupted; resuming its download");
            for entry in fs::read_dir(&staging).map_err(io(&staging))?.flatten() {
                let name = entry.file_name();
                if name != import::RESUME_RECORD && name != import::DOWNLOAD {
                    let path = entry.path();
                    let removed = if path.is_dir() && !path.is_symlink() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    removed.map_err(io(&path))?;
                }
            }
        } else {
            tracing::info!(dataVolume = %dv, "an earlier import was interrupted; starting over");
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
    }
    if !staging.exists() {
        fs::create_dir(&staging).map_err(io(&staging))?;
    }

    let t = std::time::Instant::now();
    tracing::info!(dataVolume = %dv, source = s.source.kind(), claim = %dir.display(), "importing");
    let result = import_into(s, storage, &dir, &staging, style, objects);
    let _ = fs::remove_dir_all(&staging);
    match result {
        Ok(meta) => {
            tracing::info!(dataVolume = %dv, size = meta.size, seconds = t.elapsed().as_secs_f64(),
                shared = meta.shared, "import complete");
            Ok(())
        }
        Err(e) => {
            if created {
                let _ = fs::remove_dir(&dir);
            }
            Err(e)
        }
    }
}

/// Produce the image in `staging`, move it into the claim, and write `claim.json` last.
fn import_into(
    s: &DataVolumeSpec,
    storage: &Path,
    dir: &Path,
    staging: &Path,
    style: ProgressStyle,
    objects: &refs::Objects,
) -> Result<ClaimMeta, DataVolumeError> {
    let dv = s.claim.to_string();
    let requested = s.requested.as_ref().map(|(_, b)| *b);
    let size_hint = match (&s.requested, s.volume_mode, s.form) {
        (Some((text, _)), VolumeMode::Filesystem, spec::StorageForm::Pvc) => format!(
            "spec.pvc requests {text}, less CDI's {}% filesystem overhead",
            crate::spec::cdi::FilesystemOverhead::DEFAULT.percent()
        ),
        (Some((text, _)), _, form) => format!("{} requests {text}", form.field()),
        (None, _, _) => "the size of the source".to_string(),
    };
    let job = Job {
        dv: &dv,
        style,
        staging,
        size_hint: &size_hint,
        source: Some(&s.source_json),
    };
    let (disk, size) = match &s.source {
        Source::Http(r) | Source::S3(r) => {
            let target = s.disk_size(requested.unwrap_or(0));
            let (agent, request) = remote_request(s, r, objects)?;
            (
                import::from_remote(&job, &r.url, &agent, request.as_ref(), target)?,
                target,
            )
        }
        Source::Registry {
            url,
            secret_ref,
            cert_config_map,
        } => {
            let target = s.disk_size(requested.unwrap_or(0));
            let (agent, credentials) = registry_access(
                s,
                url,
                secret_ref.as_deref(),
                cert_config_map.as_deref(),
                objects,
            )?;
            (
                import::from_registry(&job, &agent, url, credentials, target)?,
                target,
            )
        }
        Source::Snapshot(src) => {
            let (src_image, _, _guard) =
                snapshot::clone_source(storage, src).map_err(|reason| {
                    DataVolumeError::CloneSource {
                        dv: dv.clone(),
                        source_claim: format!("snapshot {src}"),
                        reason,
                    }
                })?;
            import::from_claim(&job, &src_image, requested.map(|r| s.disk_size(r)))?
        }
        Source::Blank => (import::blank(&job)?, s.disk_size(requested.unwrap_or(0))),
        Source::Pvc(src) => {
            let src_dir = claim::claim_dir(storage, src);
            let (src_image, _) =
                claim::existing_image(&src_dir).ok_or_else(|| DataVolumeError::CloneSource {
                    dv: dv.clone(),
                    source_claim: src.to_string(),
                    reason: format!("no disk.img or block.img in {}", src_dir.display()),
                })?;
            // Hold the source's lock while copying so that it is not being imported meanwhile.
            let src_lock = claim::lock_path(storage, src);
            let _guard = File::create(&src_lock)
                .ok()
                .and_then(|f| Flock::lock(f, FlockArg::LockShared).ok());
            import::from_claim(&job, &src_image, requested.map(|r| s.disk_size(r)))?
        }
    };
    import::finish(&job, &disk, size, s.preallocation)?;

    let image = dir.join(claim::image_name(s.volume_mode));
    let io = |path: &Path| io_error(&dv, path);
    fs::rename(&disk, &image).map_err(io(&image))?;
    claim::sync_dir(dir).map_err(io(dir))?;

    let meta = s.claim_meta(size, s.shared(), claim::rfc3339(SystemTime::now()));
    if let Err(e) = claim::write_meta(dir, &meta) {
        // Without its marker the image would be imported again anyway; do not leave it behind.
        let _ = fs::remove_file(&image);
        return Err(io(&dir.join(claim::META_FILE))(e));
    }
    Ok(meta)
}

/// The HTTP agent of a source: the system's CA certificates, and the `ca.pem` of the
/// `certConfigMap` ConfigMap if the source names one (`field_err` names the source's field).
fn tls_agent(
    cert_config_map: Option<&str>,
    objects: &refs::Objects,
    field_err: &dyn Fn(&str, String) -> DataVolumeError,
) -> Result<ureq::Agent, DataVolumeError> {
    let mut tls = http::TlsOptions::default();
    if let Some(cm) = cert_config_map {
        let pem = objects
            .value("ConfigMap", cm, "ca.pem")
            .map_err(|reason| field_err("certConfigMap", reason))?;
        tls.extra_ca_pem = Some(pem.to_vec());
    }
    http::http_agent(&tls).map_err(|e| {
        field_err(
            "certConfigMap",
            format!(
                "ca.pem of ConfigMap {:?}: {e}",
                cert_config_map.unwrap_or("")
            ),
        )
    })
}

/// The agent and credentials of a registry source: the `certConfigMap`'s `ca.pem` trusted
/// besides the system roots (a registry on a loopback address is reached over plain http, as
/// Docker does), the `secretRef`'s `accessKeyId`/`secretKey` as user and password.
fn registry_access(
    s: &DataVolumeSpec,
    url: &str,
    secret_ref: Option<&str>,
    cert_config_map: Option<&str>,
    objects: &refs::Objects,
) -> Result<(ureq::Agent, Option<registry::Credentials>), DataVolumeError> {
    let field_err = |field: &str, reason: String| DataVolumeError::Spec {
        dv: s.claim.to_string(),
        field: format!("{}.spec.source.registry.{field}", s.template),
        reason,
    };
    if let Some(cm) = cert_config_map {
        let pem = objects
            .value("ConfigMap", cm, "ca.pem")
            .map_err(|reason| field_err("certConfigMap", reason))?;
        if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(field_err(
                "certConfigMap",
                format!("ca.pem of ConfigMap {cm:?} holds no PEM certificate"),
            ));
        }
        if !registry::ImageRef::parse(url).is_ok_and(|r| r.is_https()) {
            tracing::warn!(
                dataVolume = %s.claim,
                url,
                "certConfigMap unused: the registry is reached over plain http (a loopback address)"
            );
        }
    }
    let agent = tls_agent(cert_config_map, objects, &field_err)?;
    let credentials = match secret_ref {
        None => None,
        Some(name) => {
            let key = |k: &str| -> Result<String, DataVolumeError> {
                let v = objects
                    .value("Secret", name, k)
                    .map_err(|reason| field_err("secretRef", reason))?;
                let text = String::from_utf8_lossy(v)
                    .trim_end_matches('\n')
                    .to_string();
                if text.is_empty() {
                    return Err(field_err(
                        "secretRef",
                        format!("Secret {name:?}: {k} is empty"),
                    ));
                }
                Ok(text)
            };
            Some(registry::Credentials {
                username: key("accessKeyId")?,
                password: key("secretKey")?,
            })
        }
    };
    Ok((agent, credentials))
}

/// The agent and the request of an http or s3 source, its Secrets and ConfigMap read from the
/// manifest.
fn remote_request(
    s: &DataVolumeSpec,
    r: &Remote,
    objects: &refs::Objects,
) -> Result<(ureq::Agent, Box<dyn http::RequestSource>), DataVolumeError> {
    let kind = s.source.kind();
    let field_err = |field: &str, reason: String| DataVolumeError::Spec {
        dv: s.claim.to_string(),
        field: format!("{}.spec.source.{kind}.{field}", s.template),
        reason,
    };
    let agent = tls_agent(r.cert_config_map.as_deref(), objects, &field_err)?;
    let credentials = match &r.secret_ref {
        None => None,
        Some(name) => {
            let key = |k: &str| -> Result<String, DataVolumeError> {
                let v = objects
                    .value("Secret", name, k)
                    .map_err(|reason| field_err("secretRef", reason))?;
                String::from_utf8(v.to_vec())
                    .map(|t| t.trim().to_string())
                    .map_err(|_| {
                        field_err(
                            "secretRef",
                            format!("Secret {name:?}: {k} is not UTF-8 text"),
                        )
                    })
            };
            Some(s3::Credentials {
                access_key_id: key("accessKeyId")?,
                secret_key: key("secretKey")?,
            })
        }
    };
    if let Source::S3(_) = &s.source {
        let object = s3::ObjectUrl::parse(&r.url).map_err(|reason| field_err("url", reason))?;
        return Ok((
            agent,
            Box::new(s3::S3Request {
                object,
                credentials,
            }),
        ));
    }
    if !r.url.starts_with("http://") && !r.url.starts_with("https://") {
        return Err(DataVolumeError::Download {
            dv: s.claim.to_string(),
            url: r.url.clone(),
            reason: "not an http:// or https:// URL".into(),
        });
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut add = |h: &str| {
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    };
    r.headers.iter().for_each(|h| add(h));
    for (i, name) in r.secret_extra_headers.iter().enumerate() {
        let values = objects
            .secret_values(name)
            .map_err(|reason| field_err(&format!("secretExtraHeaders[{i}]"), reason))?;
        for v in values {
            let text = String::from_utf8_lossy(v);
            if !spec::valid_header(text.trim()) {
                return Err(field_err(
                    &format!("secretExtraHeaders[{i}]"),
                    format!("Secret {name:?} holds a value that is not a \"Name: value\" header"),
                ));
            }
            add(text.trim());
        }
    }
    if let Some(c) = credentials {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.access_key_id, c.secret_key));
        headers.push(("Authorization".into(), format!("Basic {token}")));
    }
    Ok((
        agent,
        Box::new(http::Plain {
            url: r.url.clone(),
            headers,
        }),
    ))
}

/// `<storage>/vms/<ns>/<vm>/{volumes,block}`: one entry per PVC/DataVolume volume, named after
/// the volume, pointing at its claim (or the claim's loop device).
fn build_view(
    vmi: &VirtualMachineInstance,
    storage: &Path,
    paths: &mut PodPaths,
) -> Result<Claims, DataVolumeError> {
    let namespace = vmi.namespace().to_string();
    let view = claim::vm_dir(storage, &namespace, &vmi.metadata.name);
    let volumes_dir = view.join("volumes");
    let block_dir = view.join("block");
    let view_err = |volume: &str, path: &Path, e: std::io::Error| DataVolumeError::View {
        volume: volume.to_string(),
        path: path.to_path_buf(),
        reason: io_reason(&e),
    };
    if !crate::spec::is_dns1123_subdomain(&vmi.metadata.name) {
        return Err(DataVolumeError::View {
            volume: "*".into(),
            path: view,
            reason: "the VirtualMachine's name is not a DNS-1123 name".into(),
        });
    }
    if view.exists() {
        // Only symlinks live here: removing them does not touch the claims.
        fs::remove_dir_all(&view).map_err(|e| view_err("*", &view, e))?;
    }
    for d in [&volumes_dir, &block_dir] {
        fs::create_dir_all(d).map_err(|e| view_err("*", d, e))?;
    }

    let mut claims = Claims::default();
    for v in &vmi.spec.volumes {
        let (kind, claim_name, hotplug) = if let Some(d) = &v.data_volume {
            ("DataVolume", &d.name, d.hotpluggable.unwrap_or(false))
        } else if let Some(p) = &v.persistent_volume_claim {
            (
                "PersistentVolumeClaim",
                &p.claim_name,
                p.hotpluggable.unwrap_or(false),
            )
        } else if let Some(p) = v
            .ephemeral
            .as_ref()
            .and_then(|e| e.persistent_volume_claim.as_ref())
        {
            ("PersistentVolumeClaim", &p.claim_name, false)
        } else {
            continue;
        };
        if hotplug {
            // Hot-plugged volumes come later, through the hot-plug directory.
            continue;
        }
        if !crate::spec::is_dns1123_label(&v.name) || !crate::spec::is_dns1123_subdomain(claim_name)
        {
            // podfacts reports bad volume names; a bad claim name cannot be in the storage dir.
            return Err(DataVolumeError::MissingClaim {
                volume: v.name.clone(),
                kind,
                claim: format!("{namespace}/{claim_name}"),
                dir: claim::claims_root(storage),
            });
        }
        let cref = ClaimRef {
            namespace: namespace.clone(),
            name: claim_name.clone(),
        };
        let dir = claim::claim_dir(storage, &cref);
        let Some((image, mode)) = claim::existing_image(&dir) else {
            return Err(DataVolumeError::MissingClaim {
                volume: v.name.clone(),
                kind,
                claim: cref.to_string(),
                dir: claim::claims_root(storage),
            });
        };
        match mode {
            VolumeMode::Filesystem => {
                let link = volumes_dir.join(&v.name);
                symlink(&dir, &link).map_err(|e| view_err(&v.name, &link, e))?;
            }
            VolumeMode::Block => {
                let dev = loopdev::attach(&image).map_err(|reason| DataVolumeError::View {
                    volume: v.name.clone(),
                    path: image.clone(),
                    reason,
                })?;
                let link = block_dir.join(&v.name);
                symlink(&dev.device, &link).map_err(|e| view_err(&v.name, &link, e))?;
                tracing::info!(volume = %v.name, claim = %cref, device = %dev.device.display(),
                    reused = !dev.owned, "block claim attached");
                claims.loops.push(dev);
            }
        }
        claims.volumes.insert(v.name.clone(), cref);
    }
    paths.vmi_disks_dir = volumes_dir;
    paths.block_dev_dir = block_dir;
    Ok(claims)
}

/// Maps an I/O error on `path` while handling DataVolume `dv` to our error.
fn io_error(dv: &str, path: &Path) -> impl FnOnce(std::io::Error) -> DataVolumeError {
    let (dv, path) = (dv.to_string(), path.to_path_buf());
    move |e| DataVolumeError::Io {
        dv,
        path,
        reason: io_reason(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ReadWriteMany claim of `run --vm` is shared as in a cluster: its recorded access
    /// modes reach the VMI's volume status (a migration reads them there); a ReadWriteOnce one
    /// stays local; what the file states is kept.
    #[test]
    fn claims_record_their_access_modes_in_the_vmi_status() {
        let storage = std::env::temp_dir().join(format!("dv-status-{}", std::process::id()));
        let write = |name: &str, modes: &[&str]| {
            let c = spec::ClaimRef {
                namespace: "default".into(),
                name: name.into(),
            };
            let dir = claim::claim_dir(&storage, &c);
            fs::create_dir_all(&dir).unwrap();
            let meta = ClaimMeta {
                name: name.into(),
                namespace: "default".into(),
                source: serde_json::json!({"blank": {}}),
                requested: "1Mi".into(),
                size: 1 << 20,
                volume_mode: spec::VolumeMode::Filesystem,
                access_modes: modes.iter().map(|m| m.to_string()).collect(),
                shared: modes.contains(&"ReadWriteMany"),
                completed_at: String::new(),
            };
            fs::write(
                dir.join(claim::META_FILE),
                serde_json::to_vec(&meta).unwrap(),
            )
            .unwrap();
            c
        };
        let claims = Claims {
            volumes: [
                ("rwx".to_string(), write("rwx-dv", &["ReadWriteMany"])),
                ("rwo".to_string(), write("rwo-dv", &["ReadWriteOnce"])),
                ("stated".to_string(), write("stated-dv", &["ReadWriteMany"])),
            ]
            .into_iter()
            .collect(),
            loops: Vec::new(),
        };
        let mut vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm"},
            "spec": {"domain": {"devices": {}}},
            "status": {"volumeStatus": [{"name": "stated",
                "persistentVolumeClaimInfo": {"accessModes": ["ReadWriteOnce"]}}]}
        }))
        .unwrap();
        claims.record_in_status(&storage, &mut vmi);
        fs::remove_dir_all(&storage).unwrap();
        let rwx = vmi.volume_status("rwx").unwrap();
        assert!(rwx.is_shared(), "{rwx:?}");
        let info = rwx.persistent_volume_claim_info.as_ref().unwrap();
        assert_eq!(info.claim_name.as_deref(), Some("rwx-dv"));
        assert_eq!(info.volume_mode.as_deref(), Some("Filesystem"));
        assert!(!vmi.volume_status("rwo").unwrap().is_shared());
        assert!(!vmi.volume_status("stated").unwrap().is_shared());
    }

    fn scratch(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dv-load-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.yaml");
        fs::write(&file, text).unwrap();
        file
    }

    /// A VM whose DataVolume template nests 1 MiB of `[`: without the guard the YAML scanner
    /// takes hours over it; the one manifest reader refuses it before scanning, naming the
    /// file and the line.
    #[test]
    fn deeply_nested_vm_and_datavolume_manifests_are_refused() {
        let head = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm\nspec:\n  dataVolumeTemplates:\n  - metadata:\n      name: dv\n    spec:\n      source:\n        http:\n          url: ";
        let file = scratch("deep", &format!("{head}{}", "[".repeat(1 << 20)));
        let e = load_vm(&file).unwrap_err().to_string();
        fs::remove_dir_all(file.parent().unwrap()).unwrap();
        assert!(
            e.starts_with(&format!("{}: ", file.display()))
                && e.contains("more than 256 nested '[' or '{' (line 12)"),
            "{e}"
        );
    }

    #[test]
    fn load_vm_names_the_file_and_the_field() {
        let file = scratch(
            "field",
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: [1]\n",
        );
        let e = load_vm(&file).unwrap_err().to_string();
        fs::remove_dir_all(file.parent().unwrap()).unwrap();
        assert!(
            e.starts_with(&format!("{}: field metadata.name: ", file.display())),
            "{e}"
        );
    }
}
