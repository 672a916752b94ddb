//! Standalone containerDisk volumes, as in a pod: the volume's `image` is pulled from its
//! registry ([`super::registry`]) into a local cache, and the VM runs on it read-only under a
//! qcow2 overlay that is made afresh at every start and removed at stop (the launcher does
//! that; see [`ContainerDisks`]), so the guest's writes do not outlive the run, as in KubeVirt.
//!
//! ```text
//! <cache>/sha256-<hex>/disk.img    the disk of the image whose manifest has that digest
//!                                  (read-only; a new image is a new directory: an old one
//!                                  is never rewritten under a running overlay)
//! <cache>/refs/<sha256 of ref>     "<digest>\n<reference>\n": what a tag last resolved to
//! <cache>/.pull-<pid>-<volume>/    scratch space of a pull in progress (an interrupted
//!                                  one is removed by the next pull)
//! <cache>/.lock                    flock held while pulling
//! <runtime>/container-disks/disk_<index>.img → the cached disk (the launcher's
//!                                  containerDisk directory, KubeVirt's naming)
//! ```
//!
//! `imagePullPolicy` is kubelet's: `Always` (the default for `:latest` or no tag) asks the
//! registry what the tag names at every start; `IfNotPresent` (the default otherwise) uses the
//! cached image of the reference when there is one; `Never` uses only the cache.
//! `path` names the disk file in the image (default: the one file under `/disk/`).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::import::io_reason;
use super::progress::{Progress, ProgressStyle};
use super::registry::{Client, ImageRef, RegistryError};
use crate::pod::image::Magic;
use crate::pod::process::Command;
use crate::spec::VirtualMachineInstance;

/// Default cache of pulled containerDisk images.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/virt-launcher/container-disks";

#[derive(Debug, thiserror::Error)]
pub enum ContainerDiskError {
    #[error("volume {volume}: containerDisk image {image:?}: {reason}")]
    Pull {
        volume: String,
        image: String,
        reason: String,
    },
    #[error("volume {volume}: {}: {reason}", path.display())]
    Io {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    #[error("containerDisk images: the TLS set-up failed: {0}")]
    Tls(String),
}

/// How [`prepare`] runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The image cache (`--container-disk-cache`).
    pub cache_dir: PathBuf,
    pub progress: ProgressStyle,
}

/// The containerDisk files of one run: the links to the cache and the overlays. Dropping it
/// removes them (the overlay lives exactly as long as the run).
#[derive(Debug, Default)]
pub struct ContainerDisks {
    links_dir: Option<PathBuf>,
    overlays: Vec<PathBuf>,
}

impl ContainerDisks {
    /// The links `prepare` made in `links_dir` (by `virt-launcher-import`), to be removed when
    /// the returned value drops.
    pub fn adopt(links_dir: PathBuf) -> ContainerDisks {
        ContainerDisks {
            links_dir: Some(links_dir),
            overlays: Vec::new(),
        }
    }

    /// Leave the links in place (the import process hands them to the launcher).
    pub fn keep(mut self) {
        self.links_dir = None;
        self.overlays.clear();
    }

    /// Remove the overlays of the VMI's containerDisk volumes (each one's directory, found
    /// with `overlay(volume)`) now, before a start, and again at drop.
    pub fn discard_overlays(
        &mut self,
        vmi: &VirtualMachineInstance,
        overlay: impl Fn(&str) -> PathBuf,
    ) {
        self.overlays = vmi
            .spec
            .volumes
            .iter()
            .filter(|v| v.container_disk.is_some() && crate::spec::is_dns1123_label(&v.name))
            .map(|v| overlay(&v.name))
            .collect();
        self.remove_overlays();
    }

    fn remove_overlays(&self) {
        for o in &self.overlays {
            let dir = o.parent().unwrap_or(o);
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), error = %io_reason(&e), "cannot remove a containerDisk overlay");
                }
            }
        }
    }
}

impl Drop for ContainerDisks {
    fn drop(&mut self) {
        self.remove_overlays();
        if let Some(d) = &self.links_dir {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// Whether the VMI has containerDisk volumes.
pub fn wanted(vmi: &VirtualMachineInstance) -> bool {
    vmi.spec.volumes.iter().any(|v| v.container_disk.is_some())
}

/// Pull (or find in the cache) the image of every containerDisk volume and link its disk as
/// `<links_dir>/disk_<index>.img`, with the imports' HTTP agent.
pub fn prepare(
    vmi: &VirtualMachineInstance,
    opts: &Options,
    links_dir: &Path,
) -> Result<ContainerDisks, ContainerDiskError> {
    // An image's registry on a loopback address is reached over plain http; others over https
    // with the system roots.
    let agent = super::http::http_agent(&super::http::TlsOptions::default())
        .map_err(|e| ContainerDiskError::Tls(e.to_string()))?;
    prepare_with_agent(vmi, opts, links_dir, &agent)
}

/// [`prepare`] with the given agent (a TLS one for https registries).
pub fn prepare_with_agent(
    vmi: &VirtualMachineInstance,
    opts: &Options,
    links_dir: &Path,
    agent: &ureq::Agent,
) -> Result<ContainerDisks, ContainerDiskError> {
    let mut out = ContainerDisks::default();
    if !wanted(vmi) {
        return Ok(out);
    }
    let io = |volume: &str, path: &Path| {
        let (volume, path) = (volume.to_string(), path.to_path_buf());
        move |e: std::io::Error| ContainerDiskError::Io {
            volume,
            path,
            reason: io_reason(&e),
        }
    };
    if links_dir.exists() {
        fs::remove_dir_all(links_dir).map_err(io("*", links_dir))?;
    }
    fs::create_dir_all(links_dir).map_err(io("*", links_dir))?;
    out.links_dir = Some(links_dir.to_path_buf());
    let cache = std::path::absolute(&opts.cache_dir).unwrap_or(opts.cache_dir.clone());
    fs::create_dir_all(cache.join("refs")).map_err(io("*", &cache))?;
    let lock_path = cache.join(".lock");
    let lock_file = File::create(&lock_path).map_err(io("*", &lock_path))?;
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((f, _)) => {
            tracing::info!(cache = %cache.display(), "waiting for another launcher pulling into the containerDisk cache");
            Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, e)| io("*", &lock_path)(std::io::Error::from(e)))?
        }
    };

    // Pulls that were interrupted (a launcher killed mid-pull): nobody else pulls while we
    // hold the lock.
    if let Ok(rd) = fs::read_dir(&cache) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".pull-") {
                tracing::info!(path = %e.path().display(), "removing an interrupted containerDisk pull");
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    for (index, v) in vmi.spec.volumes.iter().enumerate() {
        let Some(cd) = &v.container_disk else {
            continue;
        };
        let volume = v.name.as_str();
        if !crate::spec::is_dns1123_label(volume) {
            // podfacts reports it; nothing here may use the name as a path.
            continue;
        }
        let fail = |reason: String| ContainerDiskError::Pull {
            volume: volume.to_string(),
            image: cd.image.clone(),
            reason,
        };
        let image = ImageRef::parse(&cd.image).map_err(|e| fail(e.to_string()))?;
        let policy = match cd.image_pull_policy.as_deref() {
            None | Some("") if image.is_latest() => "Always",
            None | Some("") => "IfNotPresent",
            Some(p @ ("Always" | "IfNotPresent" | "Never")) => p,
            Some(other) => {
                return Err(fail(format!(
                    "imagePullPolicy {other:?} is not Always, IfNotPresent or Never"
                )))
            }
        };
        let want_path = match cd.path.as_deref() {
            None | Some("") | Some("/disk") | Some("/disk/") => None,
            Some(p) => Some(p.trim_start_matches('/').to_string()),
        };
        let ref_key = format!(
            "{image}{}",
            want_path
                .as_deref()
                .map(|p| format!(" path={p}"))
                .unwrap_or_default()
        );
        let ref_file = cache
            .join("refs")
            .join(hex(&Sha256::digest(ref_key.as_bytes())));
        let cached = read_ref(&ref_file)
            .map(|d| disk_path(&cache, &d))
            .filter(|p| p.is_file());
        let disk = match (policy, cached) {
            ("IfNotPresent" | "Never", Some(p)) => {
                tracing::info!(volume, image = %image, disk = %p.display(), "containerDisk image in the cache");
                p
            }
            ("Never", None) => {
                return Err(fail(format!(
                    "not in the cache {} and imagePullPolicy is Never",
                    cache.display()
                )))
            }
            _ => pull(
                volume,
                &image,
                want_path.as_deref(),
                &cache,
                agent,
                opts.progress,
            )
            .map_err(fail)
            .and_then(|(digest, p)| {
                write_ref(&ref_file, &digest, &ref_key).map_err(io(volume, &ref_file))?;
                Ok(p)
            })?,
        };
        let link = links_dir.join(format!("disk_{index}.img"));
        std::os::unix::fs::symlink(&disk, &link).map_err(io(volume, &link))?;
    }
    Ok(out)
}

/// `<cache>/sha256-<hex>/disk.img` of a manifest digest `sha256:<hex>`.
fn disk_path(cache: &Path, digest: &str) -> PathBuf {
    cache.join(digest.replace(':', "-")).join("disk.img")
}

fn read_ref(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let digest = text.lines().next()?.trim();
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| digest.to_string())
}

fn write_ref(path: &Path, digest: &str, reference: &str) -> std::io::Result<()> {
    super::claim::write_atomic(path, format!("{digest}\n{reference}\n").as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Resolve `image` at the registry and make sure its disk is in the cache; returns the
/// manifest digest and the cached disk.
fn pull(
    volume: &str,
    image: &ImageRef,
    want_path: Option<&str>,
    cache: &Path,
    agent: &ureq::Agent,
    style: ProgressStyle,
) -> Result<(String, PathBuf), String> {
    let mut client = Client::new(agent, image.clone(), None);
    let manifest = client.manifest().map_err(|e| e.to_string())?;
    let disk = disk_path(cache, &manifest.digest);
    if disk.is_file() {
        tracing::info!(volume, image = %image, digest = %manifest.digest, "containerDisk image already in the cache");
        return Ok((manifest.digest, disk));
    }
    tracing::info!(volume, image = %image, digest = %manifest.digest, layers = manifest.layers.len(), "pulling containerDisk image");
    let scratch = cache.join(format!(".pull-{}-{volume}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)
        .map_err(|e| format!("{}: {}", scratch.display(), io_reason(&e)))?;
    let result = (|| {
        let file = scratch.join("disk.img");
        let label = format!("containerDisk {volume}");
        let mut progress = Progress::new(&label, "download", None, style);
        let found = match want_path {
            None => client.extract_disk(&manifest, &file, None, &mut |done, total| {
                progress.set_total(total);
                progress.set(done);
            }),
            Some(p) => client.extract_file(&manifest, p, &file, &mut |done, total| {
                progress.set_total(total);
                progress.set(done);
            }),
        }
        .map_err(|e| match e {
            RegistryError::TooLarge { .. } => e.to_string(),
            other => other.to_string(),
        })?;
        progress.finish();
        check_base(&file).map_err(|r| format!("{}: {r}", found.name))?;
        let f = File::open(&file).map_err(|e| io_reason(&e))?;
        f.sync_all().map_err(|e| io_reason(&e))?;
        let mut perms = f.metadata().map_err(|e| io_reason(&e))?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        fs::set_permissions(&file, perms).map_err(|e| io_reason(&e))?;
        let target = disk.parent().unwrap_or(cache);
        fs::rename(&scratch, target)
            .map_err(|e| format!("{}: {}", target.display(), io_reason(&e)))?;
        super::claim::sync_dir(cache).map_err(|e| io_reason(&e))?;
        tracing::info!(volume, digest = %manifest.digest, file = %found.name, bytes = found.bytes, "containerDisk image cached");
        Ok((manifest.digest.clone(), disk.clone()))
    })();
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// A containerDisk base is raw or self-contained qcow2 (a backing or data file would make
/// QEMU read host files).
fn check_base(file: &Path) -> Result<(), String> {
    match crate::pod::image::sniff(file).map_err(|e| io_reason(&e))? {
        Magic::Raw => Ok(()),
        Magic::Qcow2 => {
            let out = Command::new("qemu-img")
                .args(["info", "--output=json", "-f", "qcow2"])
                .arg(file)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.success() {
                return Err(format!(
                    "not a valid qcow2 image: {}",
                    super::import::one_line(&out.stderr)
                ));
            }
            let info: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| format!("qemu-img info printed no JSON: {e}"))?;
            if info.get("backing-filename").is_some()
                || info.pointer("/format-specific/data/data-file").is_some()
            {
                return Err(
                    "the qcow2 image has a backing or data file; a containerDisk must be self-contained"
                        .into(),
                );
            }
            Ok(())
        }
        Magic::Gzip => {
            Err("gzip-compressed: a containerDisk is raw or qcow2, not compressed".into())
        }
        Magic::Xz => Err("xz-compressed: a containerDisk is raw or qcow2, not compressed".into()),
        Magic::Unsupported(name) => Err(format!(
            "{name} is not a containerDisk format (raw or qcow2)"
        )),
    }
}
