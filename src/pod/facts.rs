//! Facts about the pod, gathered once before conversion. All filesystem I/O of the conversion
//! pipeline lives here (and in [`crate::pod::prepare`]); [`crate::convert`] is pure.
//!
//! Two ways to get facts:
//! - [`probe`] looks at the real pod: which PVC/DataVolume volumes are block devices, whether
//!   `O_DIRECT` works on the volumes' files, which OVMF files exist, the formats of containerDisk
//!   images. It is also the preflight: a non-hot-plug PVC/DataVolume whose `disk.img` (or block
//!   node) is missing is an error naming the volume and the path.
//! - [`from_file`] reads the `--pod-facts` JSON (`render` and the golden tests): all keys
//!   optional, nothing probed, paths are KubeVirt's defaults. Keys: `blockVolumes`, `directIO`
//!   (default `true`), `domainType` (`kvm`|`qemu`, default `kvm`), `preallocatedVolumes`,
//!   `imageFormats` (`{"<volume>": "raw"|"qcow2"}`), `spareRootPorts` (default 8).
//!   Unknown keys are rejected so a typo does not silently change the domain.

use crate::convert::facts::{FirmwarePaths, ImageFormat, PodFacts, PodPaths};
use crate::domain::DomainType;
use crate::spec::{is_dns1123_label, VirtualMachineInstance};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PodFactsError {
    #[error("volume {volume}: {}: {reason}", path.display())]
    Volume {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    #[error("volume {volume}: name is not a DNS-1123 label, refusing to use it in a path")]
    VolumeName { volume: String },
    #[error("{}: cannot read pod facts: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid pod facts: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    /// A path named by a spec field (kernelPath, initrdPath, hostDisk.path) is unusable.
    #[error("{field}: {}: {reason}", path.display())]
    Field {
        field: String,
        path: PathBuf,
        reason: String,
    },
}

impl PodFactsError {
    /// What is wrong, without the `volume <name>: ` the caller's own error already says.
    pub fn reason(&self) -> String {
        match self {
            PodFactsError::Volume { path, reason, .. } => format!("{}: {reason}", path.display()),
            PodFactsError::VolumeName { .. } => {
                "name is not a DNS-1123 label, refusing to use it in a path".into()
            }
            other => other.to_string(),
        }
    }
}

/// What a confined path must be once resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// A regular file (disk images, kernels, hot-plugged Filesystem volumes).
    File,
    /// A block device node (Block-mode volumes).
    Block,
}

/// `path` with every symlink resolved, if it lies inside `base` (also resolved).
///
/// The rule for every path built from a name in a spec or request: after following symlinks
/// it must still be inside the directory it was built in. A `disk.img` symlinked to another
/// file in the same PVC directory is fine; one leading anywhere else is refused, and so is a
/// `<volume>` directory that is itself a symlink out of the volumes directory.
pub fn confine_existing(base: &Path, path: &Path) -> Result<PathBuf, String> {
    let real_base = base
        .canonicalize()
        .map_err(|e| format!("directory {}: {}", base.display(), io_reason(&e)))?;
    let real = path.canonicalize().map_err(|e| io_reason(&e))?;
    if real.starts_with(&real_base) {
        Ok(real)
    } else {
        Err(format!(
            "resolves to {}, outside {}: refusing to use it",
            real.display(),
            real_base.display()
        ))
    }
}

fn describe(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Checks the type of an existing path without opening it (opening a FIFO would block).
fn check_kind(real: &Path, want: PathKind) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::metadata(real)
        .map_err(|e| io_reason(&e))?
        .file_type();
    let ok = match want {
        PathKind::File => ft.is_file(),
        PathKind::Block => ft.is_block_device(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "is a {}, not a {}",
            describe(ft),
            match want {
                PathKind::File => "regular file",
                PathKind::Block => "block device",
            }
        ))
    }
}

/// [`confine_existing`] against `base`, or else against one of the launcher's own
/// [`PodPaths::trusted_roots`].
pub fn confine_existing_or_trusted(
    base: &Path,
    trusted: &[PathBuf],
    path: &Path,
) -> Result<PathBuf, String> {
    confine_existing(base, path).or_else(|refused| {
        trusted
            .iter()
            .find_map(|root| confine_existing(root, path).ok())
            .ok_or(refused)
    })
}

/// [`confine_existing`] plus the kind check, as a volume error naming `volume` and `path`.
pub fn confined_volume_path(
    volume: &str,
    base: &Path,
    path: &Path,
    want: PathKind,
) -> Result<PathBuf, PodFactsError> {
    let err = |reason| PodFactsError::Volume {
        volume: volume.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let real = confine_existing(base, path).map_err(err)?;
    check_kind(&real, want).map_err(err)?;
    Ok(real)
}

/// The backing path of a hot-plugged volume, checked right before it is attached: the name is
/// a DNS-1123 label, the path (`<hotplug dir>/<volume>.img`, or `<hotplug dir>/<volume>` for a
/// Block volume) exists, stays inside the hot-plug directory after following symlinks, and is
/// a regular file (or a block device). Returns the resolved path; the domain keeps using the
/// pod path. Call it before anything opens the path.
pub fn confined_hotplug_path(
    paths: &PodPaths,
    volume: &str,
    block: bool,
) -> Result<PathBuf, PodFactsError> {
    if !is_dns1123_label(volume) {
        return Err(PodFactsError::VolumeName {
            volume: volume.to_string(),
        });
    }
    let kind = if block {
        PathKind::Block
    } else {
        PathKind::File
    };
    confined_volume_path(
        volume,
        &paths.hotplug_disks_dir,
        &paths.hotplug_path(volume, block),
        kind,
    )
}

/// The directory `<vmi disks dir>/<volume>` of a Filesystem-mode claim, if it exists and is
/// not a way out of the volumes directory (for creating a missing `disk.img` in it).
pub fn confined_pvc_dir(paths: &PodPaths, volume: &str) -> Result<PathBuf, PodFactsError> {
    if !is_dns1123_label(volume) {
        return Err(PodFactsError::VolumeName {
            volume: volume.to_string(),
        });
    }
    let dir = paths.vmi_disks_dir.join(volume);
    let real = confine_existing_or_trusted(&paths.vmi_disks_dir, &paths.trusted_roots, &dir)
        .map_err(|reason| PodFactsError::Volume {
            volume: volume.to_string(),
            path: dir.clone(),
            reason,
        })?;
    if real == paths.vmi_disks_dir.canonicalize().unwrap_or_default() {
        return Err(PodFactsError::Volume {
            volume: volume.to_string(),
            path: dir,
            reason: "is the volumes directory itself".into(),
        });
    }
    Ok(real)
}

/// hostDisk policy. KubeVirt gates hostDisk behind a feature gate (a cluster decision taken
/// before the launcher sees the VMI); the path is a host path the spec's author names
/// directly, so there is no directory to confine it to. What the launcher enforces: an
/// absolute path without `..` (checked by the converter), a regular file when it exists
/// (never a directory, FIFO or device: opening a FIFO would hang the launcher), and for
/// `DiskOrCreate` an existing parent directory; the file is then created without following
/// a symlink (see [`crate::pod::prepare`]).
fn check_host_disk(field: &str, path: &Path, create: bool) -> Result<(), PodFactsError> {
    let err = |reason: String| PodFactsError::Field {
        field: field.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() && create => {
            // A dangling or live symlink in place of a file to create: refuse rather than
            // create (or size) whatever it points to.
            match std::fs::metadata(path) {
                Ok(t) => check_kind_of(t.file_type()).map_err(err),
                Err(_) => Err(err(
                    "is a dangling symlink: refusing to create a file through it".into(),
                )),
            }
        }
        Ok(_) => {
            let m = std::fs::metadata(path).map_err(|e| err(io_reason(&e)))?;
            check_kind_of(m.file_type()).map_err(err)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let parent = path.parent().unwrap_or(Path::new("/"));
            match std::fs::metadata(parent) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(err(format!("{} is not a directory", parent.display()))),
                Err(e) => Err(err(format!("{}: {}", parent.display(), io_reason(&e)))),
            }
        }
        Err(e) => Err(err(io_reason(&e))),
    }
}

fn check_kind_of(ft: std::fs::FileType) -> Result<(), String> {
    if ft.is_file() {
        Ok(())
    } else {
        Err(format!("is a {}, not a regular file", describe(ft)))
    }
}

/// kernelBoot files: resolved inside the kernel boot directory, symlinks included.
fn check_kernel_boot(vmi: &VirtualMachineInstance, paths: &PodPaths) -> Result<(), PodFactsError> {
    let Some(c) = vmi
        .spec
        .domain
        .firmware
        .as_ref()
        .and_then(|f| f.kernel_boot.as_ref())
        .and_then(|k| k.container.as_ref())
    else {
        return Ok(());
    };
    let f = "spec.domain.firmware.kernelBoot.container";
    for (field, value) in [
        ("kernelPath", &c.kernel_path),
        ("initrdPath", &c.initrd_path),
    ] {
        let Some(value) = value else { continue };
        let field = format!("{f}.{field}");
        // A lexically bad path is the converter's error (it names the field too).
        let Ok(path) = crate::convert::kernel_boot_artifact(&paths.kernel_boot_dir, value) else {
            continue;
        };
        let err = |reason| PodFactsError::Field {
            field: field.clone(),
            path: path.clone(),
            reason,
        };
        let real = confine_existing(&paths.kernel_boot_dir, &path).map_err(err)?;
        check_kind(&real, PathKind::File).map_err(err)?;
    }
    Ok(())
}

/// `blockSize.matchVolume` (KubeVirt's storage/disk.go detectOptimalBlockIO): the block sizes
/// of each such disk's volume, where the launcher finds it. A disk with `blockSize.custom`
/// keeps its own sizes, as in KubeVirt.
fn probe_block_sizes(
    vmi: &VirtualMachineInstance,
    paths: &PodPaths,
    facts: &mut PodFacts,
) -> Result<(), PodFactsError> {
    for d in &vmi.spec.domain.devices.disks {
        let Some(b) = &d.block_size else { continue };
        if b.custom.is_some() || !b.match_volume.as_ref().is_some_and(|m| m.on()) {
            continue;
        }
        // A disk without a volume, or a bad volume name, is the converter's error.
        let Some(v) = vmi.spec.volumes.iter().find(|v| v.name == d.name) else {
            continue;
        };
        if !is_dns1123_label(&v.name) {
            continue;
        }
        let (path, block) = volume_backend(v, paths, &facts.block_volumes);
        let probed = if block {
            block_device_io(&path)
        } else {
            filesystem_io(&path)
        };
        let io = probed.map_err(|reason| PodFactsError::Volume {
            volume: v.name.clone(),
            path: path.clone(),
            reason: format!("blockSize.matchVolume: {reason}"),
        })?;
        facts.volume_block_io.insert(v.name.clone(), io);
    }
    Ok(())
}

/// Where a volume's data is in the pod, and whether it is a block device: a claim's image or
/// node (hot-plugged or not), a hostDisk's file; for the images the launcher makes itself
/// (overlays, empty disks, ISOs), the directory they go to (KubeVirt probes the same
/// filesystem through the image).
fn volume_backend(
    v: &crate::spec::Volume,
    paths: &PodPaths,
    block_volumes: &std::collections::BTreeSet<String>,
) -> (PathBuf, bool) {
    let block = block_volumes.contains(&v.name);
    let hotplug = v.is_hotpluggable();
    if v.persistent_volume_claim.is_some() || v.data_volume.is_some() {
        let path = match (hotplug, block) {
            (true, b) => paths.hotplug_path(&v.name, b),
            (false, true) => paths.pvc_block(&v.name),
            (false, false) => paths.pvc_image(&v.name),
        };
        return (path, block);
    }
    if let Some(h) = &v.host_disk {
        return (paths.host_disk(&v.name, &h.path), false);
    }
    if v.container_disk.is_some() || v.ephemeral.is_some() || v.empty_disk.is_some() {
        return (paths.ephemeral_disks_dir.clone(), false);
    }
    (paths.config_dir.clone(), false)
}

/// A block device's sizes from sysfs (the values of the BLKSSZGET/BLKPBSZGET ioctls KubeVirt
/// uses) and its discard granularity, with KubeVirt's corrections: a zero size takes the
/// other's, a granularity that is not a multiple of the logical size becomes the physical size.
fn block_device_io(path: &Path) -> Result<crate::domain::BlockIo, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).map_err(|e| io_reason(&e))?;
    if !meta.file_type().is_block_device() {
        return Err("not a block device".into());
    }
    let (major, minor) = (
        nix::sys::stat::major(meta.rdev()),
        nix::sys::stat::minor(meta.rdev()),
    );
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // A partition has its queue on its disk.
    let queue = [dev.join("queue"), dev.join("../queue")]
        .into_iter()
        .find(|q| q.is_dir())
        .ok_or_else(|| format!("no queue directory under {}", dev.display()))?;
    let read = |name: &str| -> Result<u64, String> {
        let p = queue.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => t
                .trim()
                .parse()
                .map_err(|_| format!("{}: not a number: {t:?}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == "discard_granularity" => {
                Ok(0)
            }
            Err(e) => Err(format!("{}: {}", p.display(), io_reason(&e))),
        }
    };
    let (mut logical, mut physical) = (read("logical_block_size")?, read("physical_block_size")?);
    let mut discard = read("discard_granularity")?;
    if logical == 0 && physical == 0 {
        return Err("the device reports block sizes of 0".into());
    }
    if logical == 0 {
        logical = physical;
    } else if physical == 0 {
        physical = logical;
    }
    if discard % logical != 0 {
        discard = physical;
    }
    Ok(crate::domain::BlockIo {
        logical,
        physical,
        discard_granularity: Some(discard),
    })
}

/// A file's sizes: its filesystem's block size for all three (KubeVirt's
/// getOptimalBlockIOForFile). An image the launcher has not made yet is probed through the
/// nearest directory that exists.
fn filesystem_io(path: &Path) -> Result<crate::domain::BlockIo, String> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| "nothing of the path exists".to_string())?;
    let st = nix::sys::statfs::statfs(existing).map_err(|e| format!("statfs: {e}"))?;
    let size = u64::try_from(st.block_size()).map_err(|_| "statfs: a negative block size")?;
    Ok(crate::domain::BlockIo {
        logical: size,
        physical: size,
        discard_granularity: Some(size),
    })
}

/// The `--pod-facts` file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct FactsFile {
    block_volumes: Vec<String>,
    #[serde(rename = "directIO")]
    direct_io: Option<bool>,
    #[serde(rename = "noDirectIO")]
    no_direct_io: Vec<String>,
    domain_type: Option<DomainType>,
    preallocated_volumes: Vec<String>,
    image_formats: BTreeMap<String, ImageFormat>,
    spare_root_ports: Option<u32>,
    /// Standalone's hostDisk paths (see `PodPaths::host_disk_at_host_path`).
    host_disk_at_host_path: bool,
    /// `blockSize.matchVolume`'s probe, by volume name.
    volume_block_sizes: BTreeMap<String, BlockSizesFile>,
    /// The pod's CPU set (`dedicatedCpuPlacement`).
    cpu_set: Vec<u32>,
    /// The host's cores as sibling-thread lists.
    cpu_siblings: Vec<Vec<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BlockSizesFile {
    logical: u64,
    physical: u64,
    discard_granularity: Option<u64>,
}

/// Read the `--pod-facts` JSON file. No filesystem probing; paths are KubeVirt's defaults.
pub fn from_file(path: &Path, vmi: &VirtualMachineInstance) -> Result<PodFacts, PodFactsError> {
    let text = std::fs::read_to_string(path).map_err(|source| PodFactsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_json(&text, vmi).map_err(|reason| PodFactsError::Parse {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`from_file`] on a string; the error is the reason only.
pub fn from_json(text: &str, vmi: &VirtualMachineInstance) -> Result<PodFacts, String> {
    let file: FactsFile = if text.trim().is_empty() {
        FactsFile::default()
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    };
    let mut facts = PodFacts::defaults(vmi);
    facts.block_volumes = file.block_volumes.into_iter().collect();
    facts.preallocated_volumes = file.preallocated_volumes.into_iter().collect();
    facts.no_direct_io = file.no_direct_io.into_iter().collect();
    facts.image_formats = file.image_formats;
    if let Some(d) = file.direct_io {
        facts.direct_io = d;
    }
    if let Some(t) = file.domain_type {
        facts.domain_type = t;
    }
    if let Some(n) = file.spare_root_ports {
        facts.spare_root_ports = n;
    }
    facts.paths.host_disk_at_host_path = file.host_disk_at_host_path;
    facts.cpu_set = file.cpu_set;
    facts.cpu_set.sort_unstable();
    facts.cpu_set.dedup();
    facts.cpu_siblings = file.cpu_siblings;
    facts.volume_block_io = file
        .volume_block_sizes
        .into_iter()
        .map(|(v, b)| {
            let io = crate::domain::BlockIo {
                logical: b.logical,
                physical: b.physical,
                discard_granularity: b.discard_granularity,
            };
            (v, io)
        })
        .collect();
    Ok(facts)
}

/// The pod's CPU set and the host cores of its CPUs. The launcher's affinity is the pod's CPU
/// set: in a KubeVirt pod the kubelet's static CPU manager confines the pod's cgroup cpuset to
/// its exclusive CPUs, which bounds every process in it (KubeVirt reads the same set from the
/// cgroup); standalone, it is whatever the launcher was started with (`taskset`).
fn probe_cpus() -> (Vec<u32>, Vec<Vec<u32>>) {
    use nix::sched::{sched_getaffinity, CpuSet};
    let Ok(set) = sched_getaffinity(nix::unistd::Pid::this()) else {
        return (Vec::new(), Vec::new());
    };
    let cpus: Vec<u32> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect();
    let mut siblings: Vec<Vec<u32>> = Vec::new();
    for c in &cpus {
        let path = format!("/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list");
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        if let Some(core) = parse_cpu_list(text.trim()) {
            if !siblings.contains(&core) {
                siblings.push(core);
            }
        }
    }
    (cpus, siblings)
}

/// `0-3,6` → `[0, 1, 2, 3, 6]`; None when malformed.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// How a PVC-like volume is attached.
struct PvcLike<'a> {
    name: &'a str,
    hotplug: bool,
}

fn pvc_like_volumes(vmi: &VirtualMachineInstance) -> Vec<PvcLike<'_>> {
    vmi.spec
        .volumes
        .iter()
        .filter_map(|v| {
            if let Some(p) = &v.persistent_volume_claim {
                Some(PvcLike {
                    name: &v.name,
                    hotplug: p.hotpluggable.unwrap_or(false),
                })
            } else if let Some(d) = &v.data_volume {
                Some(PvcLike {
                    name: &v.name,
                    hotplug: d.hotpluggable.unwrap_or(false),
                })
            } else if v
                .ephemeral
                .as_ref()
                .is_some_and(|e| e.persistent_volume_claim.is_some())
            {
                Some(PvcLike {
                    name: &v.name,
                    hotplug: false,
                })
            } else {
                None
            }
        })
        .collect()
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Can `path` be opened with `O_DIRECT`? (Opens read-only; tmpfs and some overlay setups refuse.)
fn opens_with_o_direct(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// Probe a scratch file in `dir` with `O_DIRECT` (used when there is no volume file to test).
fn dir_supports_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".virt-launcher-odirect-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn first_existing(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

fn probe_firmware() -> FirmwarePaths {
    let d = FirmwarePaths::default();
    FirmwarePaths {
        efi_code: first_existing(&[
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        ])
        .unwrap_or(d.efi_code),
        efi_vars: first_existing(&[
            "/usr/share/OVMF/OVMF_VARS.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            "/usr/share/edk2/ovmf/OVMF_VARS.fd",
        ])
        .unwrap_or(d.efi_vars),
        efi_secure_code: first_existing(&[
            "/usr/share/OVMF/OVMF_CODE.secboot.fd",
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
        ])
        .unwrap_or(d.efi_secure_code),
        efi_secure_vars: first_existing(&[
            "/usr/share/OVMF/OVMF_VARS.secboot.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
            "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
        ])
        .unwrap_or(d.efi_secure_vars),
    }
}

/// What the running domain says of a hot-plugged volume it holds. QEMU keeps the volume's file
/// or device open, so this is what the probe found when the volume was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedVolume {
    /// Attached as a block device (`<disk type='block'>`).
    pub block: bool,
    /// Attached with `cache='none'` (its image took `O_DIRECT`).
    pub direct_io: bool,
}

/// Probe the real filesystem under `paths` (see the module docs).
pub fn probe(
    vmi: &VirtualMachineInstance,
    paths: PodPaths,
    domain_type: DomainType,
) -> Result<PodFacts, PodFactsError> {
    probe_running(vmi, paths, domain_type, &BTreeMap::new())
}

/// [`probe`] for a domain that runs: the hot-plugged volumes it already holds (`attached`, by
/// volume name) are taken as the domain has them instead of being probed again (they are never
/// attached again, and checking each one's path on every Sync made a Sync's cost grow with the
/// number of disks). Hot-plugged volumes not attached yet are probed as usual, and
/// [`confined_hotplug_path`] is checked once more right before any attach.
pub fn probe_running(
    vmi: &VirtualMachineInstance,
    paths: PodPaths,
    domain_type: DomainType,
    attached: &BTreeMap<String, AttachedVolume>,
) -> Result<PodFacts, PodFactsError> {
    let mut facts = PodFacts::defaults(vmi);
    facts.domain_type = domain_type;
    facts.firmware = probe_firmware();
    facts.interface_mtus = crate::pod::net::probe_mtus(vmi);
    if vmi.is_cpu_dedicated() {
        (facts.cpu_set, facts.cpu_siblings) = probe_cpus();
    }
    facts.interface_macs = crate::pod::net::probe_bridge_macs(vmi, &paths.config_dir);

    // Claim images (hot-plugged ones aside) probed, and how many of them allow O_DIRECT.
    let (mut claim_images, mut claim_images_direct) = (0usize, 0usize);
    for v in pvc_like_volumes(vmi) {
        if !is_dns1123_label(v.name) {
            return Err(PodFactsError::VolumeName {
                volume: v.name.to_string(),
            });
        }
        if v.hotplug {
            if let Some(a) = attached.get(v.name) {
                if a.block {
                    facts.block_volumes.insert(v.name.to_string());
                } else if !a.direct_io {
                    facts.no_direct_io.insert(v.name.to_string());
                }
                continue;
            }
            // Hot-plugged volumes come and go; they are checked again when attached. One that
            // is already there must not lead out of the hot-plug directory.
            let block = is_block_device(&paths.hotplug_path(v.name, true));
            if std::fs::symlink_metadata(paths.hotplug_path(v.name, block)).is_ok() {
                confined_hotplug_path(&paths, v.name, block)?;
            }
            if block {
                facts.block_volumes.insert(v.name.to_string());
            } else {
                let image = paths.hotplug_path(v.name, false);
                if image.exists() && !opens_with_o_direct(&image) {
                    facts.no_direct_io.insert(v.name.to_string());
                }
            }
            continue;
        }
        if is_block_device(&paths.pvc_block(v.name)) {
            let node = paths.pvc_block(v.name);
            let err = |reason| PodFactsError::Volume {
                volume: v.name.to_string(),
                path: node.clone(),
                reason,
            };
            let real =
                confine_existing_or_trusted(&paths.block_dev_dir, &paths.trusted_roots, &node)
                    .map_err(err)?;
            check_kind(&real, PathKind::Block).map_err(err)?;
            facts.block_volumes.insert(v.name.to_string());
            continue;
        }
        let image = paths.pvc_image(v.name);
        if let Err(e) = std::fs::metadata(&image) {
            return Err(PodFactsError::Volume {
                volume: v.name.to_string(),
                path: image,
                reason: io_reason(&e),
            });
        }
        // Symlinks may point anywhere inside the claim's own directory, nowhere else.
        confined_pvc_dir(&paths, v.name)?;
        confined_volume_path(
            v.name,
            &paths.vmi_disks_dir.join(v.name),
            &image,
            PathKind::File,
        )?;
        claim_images += 1;
        if opens_with_o_direct(&image) {
            claim_images_direct += 1;
        } else {
            facts.no_direct_io.insert(v.name.to_string());
        }
    }

    check_kernel_boot(vmi, &paths)?;
    probe_block_sizes(vmi, &paths, &mut facts)?;
    for (index, v) in vmi.spec.volumes.iter().enumerate() {
        if let Some(h) = &v.host_disk {
            if h.path.starts_with('/') && !h.path.split('/').any(|c| c == "..") {
                check_host_disk(
                    &format!("spec.volumes[{index}].hostDisk.path"),
                    &paths.host_disk(&v.name, &h.path),
                    h.disk_type == "DiskOrCreate",
                )?;
            }
        }
        if v.container_disk.is_some() {
            let image = paths.container_disk(index);
            if std::fs::symlink_metadata(&image).is_ok() {
                // Standalone links each image to the launcher's own cache (a trusted root).
                let err = |reason| PodFactsError::Volume {
                    volume: v.name.clone(),
                    path: image.clone(),
                    reason,
                };
                let real = confine_existing_or_trusted(
                    &paths.container_disks_dir,
                    &paths.trusted_roots,
                    &image,
                )
                .map_err(err)?;
                check_kind(&real, PathKind::File).map_err(err)?;
            }
            let format = crate::pod::image::sniff(&image)
                .map(|m| m.disk_format())
                .map_err(|e| PodFactsError::Volume {
                    volume: v.name.clone(),
                    path: image.clone(),
                    reason: io_reason(&e),
                })?;
            facts.image_formats.insert(v.name.clone(), format);
        }
    }

    // The default (files the launcher makes itself: overlays, cloud-init, empty disks): a
    // probe of the disks directory when there is no claim image, else whether any claim's
    // filesystem allows it; each claim image also answers for itself (`no_direct_io`).
    facts.direct_io = if claim_images == 0 {
        dir_supports_o_direct(&paths.vmi_disks_dir)
    } else {
        claim_images_direct > 0
    };
    facts.paths = paths;
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    /// matchVolume's block device probe reads what the BLKSSZGET/BLKPBSZGET ioctls report
    /// (`blockdev --getss --getpbsz`), on the first block device of this machine with a node.
    #[test]
    fn block_device_sizes_match_the_ioctls() {
        let Some(dev) = std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| Path::new("/dev").join(e.file_name()))
            .find(|p| p.exists())
        else {
            panic!("no block device with a node in /dev to probe");
        };
        let io = block_device_io(&dev).unwrap();
        let out = crate::pod::process::Command::new("blockdev")
            .args(["--getss", "--getpbsz"])
            .arg(&dev)
            .run()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let v: Vec<u64> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(vec![io.logical, io.physical], v, "{}", dev.display());
        assert_eq!(io.discard_granularity.unwrap() % io.logical, 0);
        let file = block_device_io(Path::new("/dev/null")).unwrap_err();
        assert_eq!(file, "not a block device");
    }

    #[test]
    fn a_missing_image_is_probed_through_its_directory() {
        let tmp = std::env::temp_dir();
        let io = filesystem_io(&tmp.join("not-made-yet/disk.qcow2")).unwrap();
        let st = nix::sys::statfs::statfs(&tmp).unwrap();
        assert_eq!(io.logical, st.block_size() as u64);
        assert_eq!(
            (io.physical, io.discard_granularity),
            (io.logical, Some(io.logical))
        );
    }

    fn vmi(json: &str) -> VirtualMachineInstance {
        spec::from_str(json, "test").expect("test vmi parses")
    }

    const PVC_VMI: &str = r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",
        "metadata":{"name":"v","uid":"0c9f7a6e-2f7d-4c57-9a59-8b3f6a0c2d11"},
        "spec":{"volumes":[{"name":"root","persistentVolumeClaim":{"claimName":"c"}},
                           {"name":"hp","dataVolume":{"name":"hp","hotpluggable":true}}]}}"#;

    #[test]
    fn defaults_use_uid_for_private_dir() {
        let p = PodPaths::kubevirt_defaults(&vmi(PVC_VMI));
        assert_eq!(
            p.serial_socket(),
            Path::new(
                "/var/run/kubevirt-private/0c9f7a6e-2f7d-4c57-9a59-8b3f6a0c2d11/virt-serial0"
            )
        );
        assert_eq!(
            p.serial_log().file_name().and_then(|s| s.to_str()),
            Some("virt-serial0-log")
        );
        assert_eq!(
            p.pvc_image("root"),
            Path::new("/var/run/kubevirt-private/vmi-disks/root/disk.img")
        );
        assert_eq!(
            p.hotplug_path("hp", false),
            Path::new("/var/run/kubevirt/hotplug-disks/hp.img")
        );
    }

    #[test]
    fn unsafe_uid_falls_back_to_name() {
        let v = vmi(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"ok","uid":"../../etc"}}"#,
        );
        assert_eq!(
            PodPaths::kubevirt_defaults(&v).private_dir,
            Path::new("/var/run/kubevirt-private/ok")
        );
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        assert_eq!(parse_cpu_list("2-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        let v = vmi(PVC_VMI);
        let f = from_json(r#"{"cpuSet": [3, 1, 1], "cpuSiblings": [[1, 3]]}"#, &v).unwrap();
        assert_eq!((f.cpu_set, f.cpu_siblings), (vec![1, 3], vec![vec![1, 3]]));
    }

    #[test]
    fn facts_file_keys_are_optional_and_typos_rejected() {
        let v = vmi(PVC_VMI);
        let f = from_json(r#"{"blockVolumes":["root"],"domainType":"qemu"}"#, &v).expect("valid");
        assert!(f.block_volumes.contains("root"));
        assert_eq!(f.domain_type, DomainType::Qemu);
        assert!(f.direct_io);
        assert_eq!(
            f.spare_root_ports,
            crate::convert::facts::DEFAULT_SPARE_ROOT_PORTS
        );
        assert!(from_json(r#"{"directIo":false}"#, &v).is_err());
        assert!(from_json("", &v).is_ok());
    }

    /// An empty scratch directory named after `tag`, and the pod's volume paths inside it.
    fn scratch_paths(tag: &str, v: &VirtualMachineInstance) -> (PathBuf, PodPaths) {
        let tmp = std::env::temp_dir().join(format!("vl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let mut paths = PodPaths::kubevirt_defaults(v);
        paths.vmi_disks_dir = tmp.join("vmi-disks");
        paths.block_dev_dir = tmp.join("dev");
        paths.hotplug_disks_dir = tmp.join("hp");
        (tmp, paths)
    }

    #[test]
    fn probe_reports_missing_volume_with_path() {
        let v = vmi(PVC_VMI);
        let (tmp, paths) = scratch_paths("probe", &v);
        let err = probe(&v, paths.clone(), DomainType::Kvm).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("volume root: "), "{msg}");
        assert!(
            msg.ends_with("root/disk.img: No such file or directory"),
            "{msg}"
        );

        std::fs::create_dir_all(tmp.join("vmi-disks/root")).expect("mkdir");
        std::fs::write(tmp.join("vmi-disks/root/disk.img"), b"").expect("write");
        let facts = probe(&v, paths, DomainType::Qemu).expect("probe ok");
        assert_eq!(facts.domain_type, DomainType::Qemu);
        assert!(facts.block_volumes.is_empty());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn attached_hotplug_volumes_are_taken_from_the_domain_not_probed() {
        let v = vmi(PVC_VMI);
        let (tmp, paths) = scratch_paths("attached", &v);
        std::fs::create_dir_all(tmp.join("vmi-disks/root")).expect("mkdir");
        std::fs::create_dir_all(tmp.join("hp")).expect("mkdir");
        std::fs::write(tmp.join("vmi-disks/root/disk.img"), b"").expect("write");
        // hp.img leads out of the hot-plug directory: a probe refuses it...
        std::os::unix::fs::symlink("/etc/hostname", tmp.join("hp/hp.img")).expect("symlink");
        let err = probe(&v, paths.clone(), DomainType::Qemu).unwrap_err();
        assert!(err.to_string().contains("volume hp"), "{err}");
        // ...but the domain already holds what it had when attached: taken as it is.
        for (block, direct_io) in [(true, true), (false, false), (false, true)] {
            let attached =
                BTreeMap::from([("hp".to_string(), AttachedVolume { block, direct_io })]);
            let f = probe_running(&v, paths.clone(), DomainType::Qemu, &attached).expect("probe");
            assert_eq!(f.block_volumes.contains("hp"), block);
            assert_eq!(f.no_direct_io.contains("hp"), !block && !direct_io);
        }
        // A claim (not hot-plugged) is always probed.
        let attached = BTreeMap::from([(
            "root".to_string(),
            AttachedVolume {
                block: true,
                direct_io: true,
            },
        )]);
        std::fs::remove_file(tmp.join("hp/hp.img")).expect("rm");
        std::fs::remove_file(tmp.join("vmi-disks/root/disk.img")).expect("rm");
        let err = probe_running(&v, paths, DomainType::Qemu, &attached).unwrap_err();
        assert!(err.to_string().starts_with("volume root: "), "{err}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
