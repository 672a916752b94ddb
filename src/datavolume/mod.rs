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
//! Sources: `http` (raw or qcow2, optionally gzip/xz compressed; told apart by magic bytes),
//! `registry` (the one file under `/disk/` of a container image, pulled by [`registry`]; its
//! `secretRef` Secret and `certConfigMap` ConfigMap come from the same manifest file, as
//! `kubectl apply -f` would create them), `pvc` (a copy of another claim in the storage
//! directory, by namespace/name), `snapshot` (a copy of a volume of a VM snapshot, see
//! [`snapshot`]) and `blank`. The cluster-only sources fail with an error that says why.
//!
//! Sizes follow CDI (see [`spec::DataVolumeSpec::disk_size`]): a `spec.pvc` Filesystem claim
//! holds a disk of the request minus CDI's default 5.5 % filesystem overhead (rounded down to
//! 1 MiB), a `spec.storage` claim one of the full request; Block claims are the request. An
//! image whose virtual size exceeds that is refused.
//!
//! Crash safety: an import works in `<claim>/.import/` and renames the finished, fsynced image
//! into place, then writes `claim.json` (atomically) last. A claim is complete exactly when
//! `claim.json` exists; an interrupted import is started over from scratch on the next run.
//! A failed import removes its scratch files, and the claim directory too if the import
//! created it, so the claim is left as it was.
//!
//! Sharing: `claim.json` records `accessModes`; a `ReadWriteMany` claim is `shared`
//! ([`claim_is_shared`]), the signal that two local launchers may use it at once (live
//! migration).

pub mod claim;
pub mod container_disk;
mod import;
mod loopdev;
mod progress;
pub mod registry;
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
pub use spec::{ClaimRef, DataVolumeSpec, Source, VolumeMode};

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
    load_vm_manifest(file).map(|(vm, _)| vm)
}

/// [`load_vm`], and the manifest it came from (its Secrets and ConfigMaps).
fn load_vm_manifest(file: &Path) -> Result<(VirtualMachine, Manifest), DataVolumeError> {
    let manifest = Manifest::read(file)?;
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
    let vm = manifest.deserialize(doc)?;
    Ok((vm, manifest))
}

/// The DataVolume templates of `vm` (whose VMI is `vmi`), read and checked without any I/O:
/// every error names the template's field as written in the VM. [`materialise`] reads them
/// again; the launcher calls this first, so that a bad template fails before any import.
pub fn templates(
    vm: &VirtualMachine,
    vmi: &VirtualMachineInstance,
) -> Result<Vec<DataVolumeSpec>, DataVolumeError> {
    let namespace = vmi.namespace().to_string();
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

/// Make every DataVolume of the VirtualMachine in `vm_file` a complete claim under
/// `opts.storage_dir`, then point `paths` (`vmi_disks_dir`, `block_dev_dir`) at this VM's view
/// of its claims. `vmi` is the VMI the launcher runs (from the same file). Call before
/// [`crate::pod::facts::probe`]; keep the returned [`Claims`] alive while the VM runs.
pub fn materialise(
    vm_file: &Path,
    vmi: &VirtualMachineInstance,
    opts: &Options,
    paths: &mut PodPaths,
) -> Result<Claims, DataVolumeError> {
    let (vm, manifest) = load_vm_manifest(vm_file)?;
    let storage = std::path::absolute(&opts.storage_dir).unwrap_or(opts.storage_dir.clone());
    let specs = templates(&vm, vmi)?;

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
        ensure_claim(s, &storage, opts.progress, &manifest)?;
    }

    build_view(vmi, &storage, paths)
}

/// The claim of `s`, imported unless complete.
fn ensure_claim(
    s: &DataVolumeSpec,
    storage: &Path,
    style: ProgressStyle,
    manifest: &Manifest,
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
        tracing::info!(dataVolume = %dv, "an earlier import was interrupted; starting over");
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    fs::create_dir(&staging).map_err(io(&staging))?;

    let t = std::time::Instant::now();
    tracing::info!(dataVolume = %dv, source = s.source.kind(), claim = %dir.display(), "importing");
    let result = import_into(s, storage, &dir, &staging, style, manifest);
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
    manifest: &Manifest,
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
    };
    let (disk, size) = match &s.source {
        Source::Http { url, headers } => {
            let target = s.disk_size(requested.unwrap_or(0));
            (import::from_http(&job, url, headers, target)?, target)
        }
        Source::Registry {
            url,
            secret_ref,
            cert_config_map,
        } => {
            let target = s.disk_size(requested.unwrap_or(0));
            let field = |f: &str| {
                format!(
                    "spec.dataVolumeTemplates[{}].spec.source.registry.{f}",
                    s.index
                )
            };
            let spec_err = |f: &str, reason: String| DataVolumeError::Spec {
                dv: dv.clone(),
                field: field(f),
                reason,
            };
            let credentials = match secret_ref {
                None => None,
                Some(name) => Some(
                    registry_credentials(manifest, &s.claim.namespace, name)
                        .map_err(|r| spec_err("secretRef", r))?,
                ),
            };
            let ca = match cert_config_map {
                None => None,
                Some(name) => Some(
                    ca_bundle(manifest, &s.claim.namespace, name)
                        .map_err(|r| spec_err("certConfigMap", r))?,
                ),
            };
            let agent = registry_agent(&dv, url, ca.as_deref())?;
            (
                import::from_registry(&job, &agent, url, credentials, target)?,
                target,
            )
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
    };
    import::finish(&job, &disk, size, s.preallocation)?;

    let image = dir.join(claim::image_name(s.volume_mode));
    let io = |path: &Path| io_error(&dv, path);
    fs::rename(&disk, &image).map_err(io(&image))?;
    claim::sync_dir(dir).map_err(io(dir))?;

    let meta = ClaimMeta {
        name: s.claim.name.clone(),
        namespace: s.claim.namespace.clone(),
        source: s.source_json.clone(),
        requested: s
            .requested
            .as_ref()
            .map(|(t, _)| t.clone())
            .unwrap_or_default(),
        size,
        volume_mode: s.volume_mode,
        access_modes: s.access_modes.clone(),
        shared: s.shared(),
        completed_at: claim::rfc3339(SystemTime::now()),
    };
    let meta_path = dir.join(claim::META_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| DataVolumeError::Io {
        dv: dv.clone(),
        path: meta_path.clone(),
        reason: e.to_string(),
    })?;
    if let Err(e) = claim::write_atomic(&meta_path, &json) {
        // Without its marker the image would be imported again anyway; do not leave it behind.
        let _ = fs::remove_file(&image);
        return Err(io(&meta_path)(e));
    }
    Ok(meta)
}

/// The `kind` object `namespace/name` among the manifest's documents.
fn manifest_object<'m>(
    manifest: &'m Manifest,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Option<&'m serde_json::Value> {
    manifest.docs.iter().find(|d| {
        d.get("kind").and_then(|k| k.as_str()) == Some(kind)
            && d.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name)
            && d.pointer("/metadata/namespace")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                == namespace
    })
}

/// A Secret's keys: `data` (base64) and `stringData` (text, which wins, as the API server
/// merges it).
fn secret_keys(
    manifest: &Manifest,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let doc = manifest_object(manifest, "Secret", namespace, name).ok_or_else(|| {
        format!(
            "Secret {namespace}/{name} is not in {} (put it in the same file, as a separate document)",
            manifest.origin
        )
    })?;
    let mut keys = BTreeMap::new();
    if let Some(data) = doc.get("data").and_then(|d| d.as_object()) {
        for (k, v) in data {
            let text = v.as_str().unwrap_or_default();
            let bytes = crate::pod::prepare::decode_base64(text)
                .map_err(|e| format!("Secret {namespace}/{name}: data.{k} is not base64 ({e})"))?;
            keys.insert(k.clone(), bytes);
        }
    }
    if let Some(data) = doc.get("stringData").and_then(|d| d.as_object()) {
        for (k, v) in data {
            keys.insert(
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            );
        }
    }
    Ok(keys)
}

/// User and password from the Secret `secretRef` names (CDI's keys `accessKeyId` and
/// `secretKey`).
fn registry_credentials(
    manifest: &Manifest,
    namespace: &str,
    name: &str,
) -> Result<registry::Credentials, String> {
    let keys = secret_keys(manifest, namespace, name)?;
    let get = |k: &str| {
        keys.get(k)
            .map(|v| {
                String::from_utf8_lossy(v)
                    .trim_end_matches('\n')
                    .to_string()
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                format!(
                    "Secret {namespace}/{name} has no {k} (CDI's key for the registry's {})",
                    if k == "accessKeyId" {
                        "user name"
                    } else {
                        "password"
                    }
                )
            })
    };
    Ok(registry::Credentials {
        username: get("accessKeyId")?,
        password: get("secretKey")?,
    })
}

/// The PEM certificates of the ConfigMap `certConfigMap` names (every key, as CDI mounts them
/// all as the importer's CA directory).
fn ca_bundle(manifest: &Manifest, namespace: &str, name: &str) -> Result<String, String> {
    let doc = manifest_object(manifest, "ConfigMap", namespace, name).ok_or_else(|| {
        format!(
            "ConfigMap {namespace}/{name} is not in {} (put it in the same file, as a separate document)",
            manifest.origin
        )
    })?;
    let pem: String = doc
        .get("data")
        .and_then(|d| d.as_object())
        .map(|d| {
            d.values()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "ConfigMap {namespace}/{name} holds no PEM certificate in its data"
        ));
    }
    Ok(pem)
}

/// The agent for a registry import. A plain-http (loopback) registry does not use a CA; an
/// https one needs the TLS agent (built with `ca` when given), which this build does not have.
fn registry_agent(dv: &str, url: &str, ca: Option<&str>) -> Result<ureq::Agent, DataVolumeError> {
    let https = registry::ImageRef::parse(url)
        .map(|r| r.is_https())
        .unwrap_or(false);
    if ca.is_some() && !https {
        tracing::warn!(
            dataVolume = dv,
            url,
            "certConfigMap unused: the registry is reached over plain http (a loopback address)"
        );
    }
    if https {
        return Err(DataVolumeError::Download {
            dv: dv.to_string(),
            url: url.to_string(),
            reason: "the registry is reached over https, which this build does not support \
                     (no TLS stack); a registry on a loopback address is reached over http"
                .into(),
        });
    }
    Ok(import::agent())
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
