//! Volumes and disks → `<disk>` elements.

use super::facts::PodFacts;
use super::{err, names, ConvertError, MAX_MEMORY_BYTES};
use crate::domain::{
    BackingStore, BlockIo, DataStore, Disk, DiskAddress, DiskDevice, DiskSource, DriveAddress,
    Driver,
};
use crate::spec::{is_dns1123_label, Quantity, VirtualMachineInstance, Volume};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Largest disk capacity accepted for emptyDisk/hostDisk (same bound as memory: 16 TiB... x64).
const MAX_DISK_BYTES: u64 = MAX_MEMORY_BYTES * 64;

pub(crate) struct Storage {
    pub disks: Vec<Disk>,
    pub iothreads: u32,
    pub uses_usb: bool,
    /// Some spec disk (attached now or not) is on scsi.
    pub uses_scsi: bool,
    /// The virtio-scsi controller's iothread (a scsi disk asked for `dedicatedIOThread`).
    pub scsi_iothread: Option<u32>,
    /// `(bootOrder, field)` of every disk, for the duplicate check with interfaces.
    pub boot_orders: Vec<(u32, String)>,
}

/// What a volume is, after validation.
enum Kind<'a> {
    /// PVC or DataVolume.
    Pvc {
        hotplug: bool,
        read_only: bool,
    },
    Ephemeral,
    ContainerDisk {
        index: usize,
    },
    EmptyDisk,
    HostDisk {
        path: &'a str,
    },
    NoCloud,
    ConfigDrive,
    ConfigMap,
    Secret,
    ServiceAccount,
    DownwardApi,
    Sysprep,
}

fn volume_kind<'a>(i: usize, v: &'a Volume) -> Result<Kind<'a>, ConvertError> {
    let f = format!("spec.volumes[{i}]");
    let mut kinds: Vec<(&str, Kind<'a>)> = Vec::new();
    if let Some(p) = &v.persistent_volume_claim {
        if p.claim_name.is_empty() {
            return Err(err(
                format!("{f}.persistentVolumeClaim.claimName"),
                "required",
            ));
        }
        kinds.push((
            "persistentVolumeClaim",
            Kind::Pvc {
                hotplug: p.hotpluggable.unwrap_or(false),
                read_only: p.read_only.unwrap_or(false),
            },
        ));
    }
    if let Some(d) = &v.data_volume {
        if d.name.is_empty() {
            return Err(err(format!("{f}.dataVolume.name"), "required"));
        }
        kinds.push((
            "dataVolume",
            Kind::Pvc {
                hotplug: d.hotpluggable.unwrap_or(false),
                read_only: false,
            },
        ));
    }
    if let Some(e) = &v.ephemeral {
        if e.persistent_volume_claim
            .as_ref()
            .is_none_or(|p| p.claim_name.is_empty())
        {
            return Err(err(
                format!("{f}.ephemeral.persistentVolumeClaim.claimName"),
                "required",
            ));
        }
        kinds.push(("ephemeral", Kind::Ephemeral));
    }
    if let Some(c) = &v.container_disk {
        if c.image.trim().is_empty() {
            return Err(err(format!("{f}.containerDisk.image"), "required"));
        }
        if let Some(p) = &c.path {
            confined_components(p).map_err(|r| err(format!("{f}.containerDisk.path"), r))?;
        }
        kinds.push(("containerDisk", Kind::ContainerDisk { index: i }));
    }
    if let Some(e) = &v.empty_disk {
        let cap = e
            .capacity
            .as_ref()
            .ok_or_else(|| err(format!("{f}.emptyDisk.capacity"), "required"))?;
        disk_size(cap, &format!("{f}.emptyDisk.capacity"))?;
        kinds.push(("emptyDisk", Kind::EmptyDisk));
    }
    if let Some(h) = &v.host_disk {
        let hf = format!("{f}.hostDisk");
        host_path(&h.path).map_err(|r| err(format!("{hf}.path"), r))?;
        match h.disk_type.as_str() {
            "Disk" => {}
            "DiskOrCreate" => {
                let cap = h.capacity.as_ref().ok_or_else(|| {
                    err(
                        format!("{hf}.capacity"),
                        "required when type is DiskOrCreate",
                    )
                })?;
                disk_size(cap, &format!("{hf}.capacity"))?;
            }
            other => {
                return Err(err(
                    format!("{hf}.type"),
                    format!("{other:?} is not Disk or DiskOrCreate"),
                ))
            }
        }
        kinds.push(("hostDisk", Kind::HostDisk { path: &h.path }));
    }
    for (name, src, kind) in [
        ("cloudInitNoCloud", &v.cloud_init_no_cloud, Kind::NoCloud),
        (
            "cloudInitConfigDrive",
            &v.cloud_init_config_drive,
            Kind::ConfigDrive,
        ),
    ] {
        if let Some(c) = src {
            let has_data = c.user_data.is_some()
                || c.user_data_base64.is_some()
                || c.secret_ref.is_some()
                || c.network_data.is_some()
                || c.network_data_base64.is_some()
                || c.network_data_secret_ref.is_some();
            if !has_data {
                return Err(err(
                    format!("{f}.{name}"),
                    "needs userData, userDataBase64, secretRef or networkData",
                ));
            }
            kinds.push((name, kind));
        }
    }
    if let Some(c) = &v.config_map {
        if c.name.is_empty() {
            return Err(err(format!("{f}.configMap.name"), "required"));
        }
        kinds.push(("configMap", Kind::ConfigMap));
    }
    if let Some(s) = &v.secret {
        if s.secret_name.is_empty() {
            return Err(err(format!("{f}.secret.secretName"), "required"));
        }
        kinds.push(("secret", Kind::Secret));
    }
    if v.service_account.is_some() {
        kinds.push(("serviceAccount", Kind::ServiceAccount));
    }
    if v.downward_api.is_some() {
        kinds.push(("downwardAPI", Kind::DownwardApi));
    }
    if let Some(sp) = &v.sysprep {
        let sf = format!("{f}.sysprep");
        match (&sp.config_map, &sp.secret) {
            (Some(_), Some(_)) => {
                return Err(err(sf, "has both configMap and secret; give one"));
            }
            (None, None) => {
                return Err(err(
                    sf,
                    "needs configMap or secret (holding autounattend.xml or unattend.xml)",
                ));
            }
            (Some(r), None) | (None, Some(r)) if r.name.is_empty() => {
                let which = if sp.config_map.is_some() {
                    "configMap"
                } else {
                    "secret"
                };
                return Err(err(format!("{sf}.{which}.name"), "required"));
            }
            _ => {}
        }
        kinds.push(("sysprep", Kind::Sysprep));
    }
    match kinds.len() {
        0 => Err(err(
            f,
            format!("volume {:?} has no supported source (persistentVolumeClaim, dataVolume, containerDisk, ephemeral, emptyDisk, hostDisk, cloudInitNoCloud, cloudInitConfigDrive, configMap, secret, serviceAccount, downwardAPI, sysprep)", v.name),
        )),
        1 => Ok(kinds.pop().map(|(_, k)| k).ok_or_else(|| err(f, "no source"))?),
        _ => Err(err(
            f,
            format!(
                "volume {:?} has more than one source: {}",
                v.name,
                kinds.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn disk_size(q: &Quantity, field: &str) -> Result<u64, ConvertError> {
    let bytes = q.value().map_err(|e| err(field, e.to_string()))?;
    if bytes == 0 || bytes > MAX_DISK_BYTES {
        return Err(err(
            field,
            format!("{:?} is out of range (1 byte .. 1 PiB)", q.0),
        ));
    }
    Ok(bytes)
}

/// A relative path's normal components; rejects `..`, `.`-only, NUL, empty. A leading `/` is
/// allowed and ignored (the path is interpreted inside a base directory).
pub fn confined_components(p: &str) -> Result<Vec<&str>, String> {
    if p.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    let mut out = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => out.push(s.to_str().ok_or("is not UTF-8")?),
            Component::ParentDir => return Err(format!("{p:?} contains '..'")),
            Component::Prefix(_) => return Err(format!("{p:?} is not a Unix path")),
        }
    }
    if out.is_empty() {
        return Err(format!("{p:?} names no file"));
    }
    Ok(out)
}

/// `p` resolved inside `base`; never leaves it.
/// Where the pod has a kernel-boot artifact: KubeVirt mounts the kernel-boot container's files
/// flat, by file name (`<base>/<basename>`, container-disk.go
/// GetKernelBootArtifactPathFromLauncherView). The path is still checked as [`confine`] does.
pub fn kernel_boot_artifact(base: &Path, p: &str) -> Result<PathBuf, String> {
    let parts = confined_components(p)?;
    let name = parts.last().ok_or_else(|| format!("{p:?} names no file"))?;
    Ok(base.join(name))
}

pub fn confine(base: &Path, p: &str) -> Result<PathBuf, String> {
    let mut out = base.to_path_buf();
    for c in confined_components(p)? {
        out.push(c);
    }
    Ok(out)
}

/// hostDisk paths are host paths of a file: absolute, no `..` (standalone uses the path
/// itself; in KubeVirt's pod its directory is mounted at `vmi-disks/<volume>/`).
fn host_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} is not an absolute path"));
    }
    if std::path::Path::new(p).file_name().is_none() || p.ends_with('/') {
        return Err(format!("{p:?} names no file"));
    }
    confined_components(p).map(|_| ())
}

fn is_hotplug_ready(vmi: &VirtualMachineInstance, volume: &str) -> bool {
    vmi.volume_status(volume)
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "MountedToPod" || p == "Ready")
}

/// Cache mode: explicit value honoured (validated), shareable forces `none`, else `none` when
/// `O_DIRECT` works on the backing storage and `writethrough` otherwise.
pub(crate) fn cache_mode(
    explicit: Option<&str>,
    shareable: bool,
    direct_capable: bool,
) -> Result<&'static str, String> {
    let explicit = match explicit {
        None => None,
        Some("none") => Some("none"),
        Some("writethrough") => Some("writethrough"),
        Some("writeback") => Some("writeback"),
        Some(other) => {
            return Err(format!(
                "{other:?} is not one of none, writethrough, writeback"
            ))
        }
    };
    let wanted = match (explicit, shareable) {
        (Some(c), true) if c != "none" => {
            return Err(format!(
            "a shareable disk needs cache none (got {c}): other writers would not see cached data"
        ))
        }
        (Some(c), _) => c,
        (None, true) => "none",
        (None, false) if direct_capable => "none",
        (None, false) => "writethrough",
    };
    if wanted == "none" && !direct_capable {
        return Err(
            "cache none needs O_DIRECT, which the volume's filesystem does not support".into(),
        );
    }
    Ok(wanted)
}

/// io mode: explicit value (validated; `native` needs cache none), else `native` for block
/// devices and preallocated images with cache none, else left to QEMU.
pub(crate) fn io_mode(
    explicit: Option<&str>,
    cache: &str,
    block_or_preallocated: bool,
) -> Result<Option<&'static str>, String> {
    match explicit {
        Some("native") if cache != "none" => {
            Err(format!("io native needs cache none (cache is {cache})"))
        }
        Some("native") => Ok(Some("native")),
        Some("threads") => Ok(Some("threads")),
        Some("default") => Ok(None),
        Some(other) => Err(format!("{other:?} is not one of native, threads, default")),
        None if cache == "none" && block_or_preallocated => Ok(Some("native")),
        None => Ok(None),
    }
}

struct Pending<'a> {
    name: &'a str,
    bus: &'static str,
    disk: Disk,
    /// Index in `spec.domain.devices.disks`.
    index: usize,
}

fn parse_bus(
    field: &str,
    bus: Option<&str>,
    default: &'static str,
    allowed: &[&'static str],
    device: &str,
) -> Result<&'static str, ConvertError> {
    let b = bus.unwrap_or(default);
    if let Some(ok) = allowed.iter().find(|a| **a == b) {
        return Ok(ok);
    }
    let known = ["virtio", "sata", "scsi", "usb"];
    if known.contains(&b) {
        Err(err(
            field,
            format!(
                "a {device} cannot use bus {b}; allowed: {}",
                allowed.join(", ")
            ),
        ))
    } else {
        Err(err(
            field,
            format!(
                "unknown bus {b:?}; allowed for a {device}: {}",
                allowed.join(", ")
            ),
        ))
    }
}

/// `dddd:bb:ss.f` (hex; function 0-7) → a PCI address.
fn parse_pci_address(s: &str) -> Option<DiskAddress> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, function) = rest.split_once('.')?;
    let hex = |t: &str, n: usize| {
        (t.len() == n && t.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(t, 16).ok())
            .flatten()
    };
    let function = hex(function, 1).filter(|f| *f <= 7)?;
    let slot = hex(slot, 2).filter(|s| *s <= 0x1f)?;
    Some(DiskAddress::Pci {
        domain: u16::try_from(hex(domain, 4)?).ok()?,
        bus: u8::try_from(hex(bus, 2)?).ok()?,
        slot: u8::try_from(slot).ok()?,
        function: u8::try_from(function).ok()?,
    })
}

pub(crate) fn convert_disks(
    vmi: &VirtualMachineInstance,
    facts: &PodFacts,
    vcpus: u32,
) -> Result<Storage, ConvertError> {
    let paths = &facts.paths;
    let devices = &vmi.spec.domain.devices;
    let virtio_model = if devices.use_virtio_transitional == Some(true) {
        "virtio-transitional"
    } else {
        "virtio-non-transitional"
    };

    // Volumes: names, uniqueness, one source each.
    let mut volumes: BTreeMap<&str, (usize, &Volume, Kind<'_>)> = BTreeMap::new();
    let mut singletons: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, v) in vmi.spec.volumes.iter().enumerate() {
        let f = format!("spec.volumes[{i}].name");
        if !is_dns1123_label(&v.name) {
            return Err(err(
                f,
                format!(
                    "{:?} is not a DNS-1123 label (lower-case letters, digits and '-', at most 63)",
                    v.name
                ),
            ));
        }
        let kind = volume_kind(i, v)?;
        let single = match kind {
            // Several cloudInitNoCloud volumes are allowed (KubeVirt's webhook does not limit
            // them): every one is the same ISO, made from the first (checked below).
            Kind::ConfigDrive => Some("cloudInitConfigDrive"),
            Kind::ServiceAccount => Some("serviceAccount"),
            _ => None,
        };
        if let Some(s) = single {
            if let Some(prev) = singletons.insert(s, i) {
                return Err(err(
                    format!("spec.volumes[{i}]"),
                    format!("only one {s} volume is allowed (spec.volumes[{prev}] is one too)"),
                ));
            }
        }
        if let Some((prev, _, _)) = volumes.insert(&v.name, (i, v, kind)) {
            return Err(err(
                f,
                format!(
                    "volume name {:?} is already used by spec.volumes[{prev}]",
                    v.name
                ),
            ));
        }
    }

    let mut seen_disks: BTreeMap<&str, usize> = BTreeMap::new();
    let mut boot_orders: Vec<(u32, String)> = Vec::new();
    let mut pending: Vec<Pending<'_>> = Vec::new();
    // Bus of every spec disk, attached now or not (iothread numbering follows the spec).
    let mut buses: Vec<&'static str> = Vec::new();
    for (i, d) in devices.disks.iter().enumerate() {
        let f = format!("spec.domain.devices.disks[{i}]");
        if !is_dns1123_label(&d.name) {
            return Err(err(
                format!("{f}.name"),
                format!(
                    "{:?} is not a DNS-1123 label (lower-case letters, digits and '-', at most 63)",
                    d.name
                ),
            ));
        }
        if let Some(prev) = seen_disks.insert(&d.name, i) {
            return Err(err(
                format!("{f}.name"),
                format!(
                    "disk name {:?} is already used by spec.domain.devices.disks[{prev}]",
                    d.name
                ),
            ));
        }
        let Some((_, _, kind)) = volumes.get(d.name.as_str()) else {
            return Err(err(
                format!("{f}.name"),
                format!("no volume named {:?} in spec.volumes", d.name),
            ));
        };

        let set = [d.disk.is_some(), d.cdrom.is_some(), d.lun.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if set > 1 {
            return Err(err(f, "only one of disk, cdrom, lun may be set"));
        }
        let (device, bus, readonly_req) = if let Some(c) = &d.cdrom {
            let bus = parse_bus(
                &format!("{f}.cdrom.bus"),
                c.bus.as_deref(),
                "sata",
                &["sata", "scsi", "usb"],
                "cdrom",
            )?;
            // KubeVirt: a cdrom is read-only unless `readonly: false`.
            (DiskDevice::Cdrom, bus, c.readonly.unwrap_or(true))
        } else if let Some(l) = &d.lun {
            let bus = parse_bus(
                &format!("{f}.lun.bus"),
                l.bus.as_deref(),
                "scsi",
                &["scsi"],
                "lun",
            )?;
            (DiskDevice::Lun, bus, l.readonly.unwrap_or(false))
        } else {
            let t = d.disk.clone().unwrap_or_default();
            let bus = parse_bus(
                &format!("{f}.disk.bus"),
                t.bus.as_deref(),
                "virtio",
                &["virtio", "sata", "scsi", "usb"],
                "disk",
            )?;
            (DiskDevice::Disk, bus, t.readonly.unwrap_or(false))
        };
        buses.push(bus);
        let bus_field = format!(
            "{f}.{}.bus",
            match device {
                DiskDevice::Disk => "disk",
                DiskDevice::Cdrom => "cdrom",
                DiskDevice::Lun => "lun",
            }
        );

        // Hot-plug: only virtio/scsi can hot-plug; only attached once mounted into the pod.
        let (hotplug, pvc_read_only) = match kind {
            Kind::Pvc { hotplug, read_only } => (*hotplug, *read_only),
            _ => (false, false),
        };
        if hotplug && !matches!(bus, "virtio" | "scsi") {
            return Err(err(
                bus_field,
                format!(
                    "volume {:?} is hot-pluggable; bus {bus} cannot hot-plug (use virtio or scsi)",
                    d.name
                ),
            ));
        }

        // libvirt refuses a read-only sata hard disk (its IDE/AHCI emulation has none);
        // KubeVirt's admission refuses `disk.readonly` on sata for the same reason.
        if matches!(device, DiskDevice::Disk) && bus == "sata" && (readonly_req || pvc_read_only) {
            let why = if readonly_req {
                "readonly: true"
            } else {
                "its claim is mounted readOnly"
            };
            return Err(err(
                bus_field,
                format!(
                    "sata hard disks cannot be read-only ({why}): use bus virtio or scsi, or a cdrom"
                ),
            ));
        }

        let mut boot_order = None;
        if let Some(order) = d.boot_order {
            let bf = format!("{f}.bootOrder");
            let o = u32::try_from(order)
                .ok()
                .filter(|o| *o >= 1)
                .ok_or_else(|| err(&bf, format!("{order} is not a positive integer")))?;
            boot_orders.push((o, bf));
            boot_order = Some(o);
        }

        if hotplug && !is_hotplug_ready(vmi, &d.name) {
            continue;
        }

        let name = d.name.as_str();
        let block = facts.block_volumes.contains(name);
        let (source, format, backing, direct_capable, is_block) = match kind {
            Kind::Pvc { hotplug: true, .. } => {
                let src = if block {
                    DiskSource::Block(paths.hotplug_path(name, true))
                } else {
                    DiskSource::File(paths.hotplug_path(name, false))
                };
                let direct = facts.direct_io && !facts.no_direct_io.contains(name);
                (src, "raw", None, block || direct, block)
            }
            Kind::Pvc { .. } => {
                if block {
                    (
                        DiskSource::Block(paths.pvc_block(name)),
                        "raw",
                        None,
                        true,
                        true,
                    )
                } else {
                    (
                        DiskSource::File(paths.pvc_image(name)),
                        "raw",
                        None,
                        facts.direct_io && !facts.no_direct_io.contains(name),
                        false,
                    )
                }
            }
            Kind::Ephemeral => {
                let base = if block {
                    DiskSource::Block(paths.pvc_block(name))
                } else {
                    DiskSource::File(paths.pvc_image(name))
                };
                let bs = BackingStore {
                    format: "raw",
                    source: base,
                };
                (
                    DiskSource::File(paths.overlay(name)),
                    "qcow2",
                    Some(bs),
                    facts.direct_io && !facts.no_direct_io.contains(name),
                    false,
                )
            }
            Kind::ContainerDisk { index } => {
                let bs = facts.image_formats.get(name).map(|fmt| BackingStore {
                    format: fmt.as_str(),
                    source: DiskSource::File(paths.container_disk(*index)),
                });
                (
                    DiskSource::File(paths.overlay(name)),
                    "qcow2",
                    bs,
                    facts.direct_io,
                    false,
                )
            }
            Kind::EmptyDisk => (
                DiskSource::File(paths.empty_disk(name)),
                "qcow2",
                None,
                facts.direct_io,
                false,
            ),
            Kind::HostDisk { path } => (
                DiskSource::File(paths.host_disk(name, path)),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::NoCloud => (
                DiskSource::File(paths.cloud_init_no_cloud_iso()),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::ConfigDrive => (
                DiskSource::File(paths.cloud_init_config_drive_iso()),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::Sysprep => (
                DiskSource::File(paths.sysprep_iso(name)),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::ConfigMap => (
                DiskSource::File(paths.config_map_iso(name)),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::Secret => (
                DiskSource::File(paths.secret_iso(name)),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::ServiceAccount => (
                DiskSource::File(paths.service_account_iso()),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
            Kind::DownwardApi => (
                DiskSource::File(paths.downward_api_iso(name)),
                "raw",
                None,
                facts.direct_io,
                false,
            ),
        };

        // Changed-block tracking (KubeVirt: storage/volume.go convertVolumeWithCBT, hostDisk
        // likewise): the disk becomes the qcow2 overlay `<cbt_dir>/<volume>.qcow2` whose raw
        // data file (`<dataStore>`) is the volume; the dirty bitmaps live in the overlay. A
        // lun passes its block device through and cannot sit behind an overlay, so it is left
        // as it is. The overlay is a file: its cache mode follows the file-backed probe.
        let cbt = vmi.cbt_applies()
            && d.lun.is_none()
            && matches!(kind, Kind::Pvc { .. } | Kind::HostDisk { .. });
        let (source, format, data_store, direct_capable, is_block) = if cbt {
            (
                DiskSource::File(paths.cbt_overlay(name)),
                "qcow2",
                Some(DataStore {
                    format: "raw",
                    source,
                }),
                facts.direct_io && !facts.no_direct_io.contains(name),
                false,
            )
        } else {
            (source, format, None, direct_capable, is_block)
        };

        let mut reservations = None;
        if let Some(l) = &d.lun {
            if !is_block || !matches!(kind, Kind::Pvc { .. }) {
                return Err(err(
                    format!("{f}.lun"),
                    format!("volume {:?} is not a Block-mode PVC/DataVolume; a lun passes a block device through", d.name),
                ));
            }
            if l.reservation == Some(true) {
                reservations = Some(facts.pr_helper_socket.clone());
            }
        }

        let shareable = d.shareable.unwrap_or(false);
        let cache = cache_mode(d.cache.as_deref(), shareable, direct_capable)
            .map_err(|r| err(format!("{f}.cache"), r))?;
        let preallocated = !cbt && facts.preallocated_volumes.contains(name);
        // A thick-provisioned claim keeps its blocks: no `discard='unmap'` (KubeVirt's
        // PreallocatedVolumes, which virt-handler derives from the claim's
        // `persistentVolumeClaimInfo.preallocated` in the VMI's volumeStatus).
        let keep_allocated = facts.preallocated_volumes.contains(name)
            || vmi
                .volume_status(name)
                .and_then(|s| s.persistent_volume_claim_info.as_ref())
                .and_then(|p| p.preallocated)
                == Some(true);
        let io = io_mode(d.io.as_deref(), cache, is_block || preallocated)
            .map_err(|r| err(format!("{f}.io"), r))?;
        let error_policy = match d.error_policy.as_deref().unwrap_or("stop") {
            p @ ("stop" | "report" | "ignore" | "enospace") => p.to_string(),
            other => {
                return Err(err(
                    format!("{f}.errorPolicy"),
                    format!("{other:?} is not one of stop, report, ignore, enospace"),
                ))
            }
        };
        if let Some(s) = &d.serial {
            if s.is_empty()
                || s.len() > 36
                || !s
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-'))
            {
                return Err(err(
                    format!("{f}.serial"),
                    format!("{s:?} must be 1-36 characters of A-Z a-z 0-9 _ . + -"),
                ));
            }
        }
        // KubeVirt (storage/disk.go): `custom` wins; else `matchVolume` takes the sizes the pod
        // probed on the volume (PodFacts::volume_block_io).
        let match_volume = d
            .block_size
            .as_ref()
            .and_then(|b| b.match_volume.as_ref())
            .is_some_and(crate::spec::FeatureState::on);
        let blockio = match d.block_size.as_ref().and_then(|b| b.custom.as_ref()) {
            None if match_volume => Some(*facts.volume_block_io.get(name).ok_or_else(|| {
                err(
                    format!("{f}.blockSize.matchVolume"),
                    format!("no block sizes were probed for volume {name:?}"),
                )
            })?),
            None => None,
            Some(c) => {
                let bf = format!("{f}.blockSize.custom");
                let ok = |v: u64| v.is_power_of_two() && (512..=2 * 1024 * 1024).contains(&v);
                if !ok(c.logical) || !ok(c.physical) {
                    return Err(err(
                        bf,
                        format!("logical {} / physical {} must be powers of two between 512 and 2097152", c.logical, c.physical),
                    ));
                }
                if c.logical > c.physical {
                    return Err(err(
                        bf,
                        format!(
                            "logical {} is larger than physical {}",
                            c.logical, c.physical
                        ),
                    ));
                }
                Some(BlockIo {
                    logical: c.logical,
                    physical: c.physical,
                    discard_granularity: c.discard_granularity,
                })
            }
        };
        let dedicated = d.dedicated_io_thread.unwrap_or(false);
        if dedicated && !matches!(bus, "virtio" | "scsi") {
            return Err(err(
                format!("{f}.dedicatedIOThread"),
                format!("needs bus virtio or scsi (the disk uses {bus})"),
            ));
        }
        let queues = (bus == "virtio" && devices.block_multi_queue == Some(true)).then_some(vcpus);

        let readonly = readonly_req || pvc_read_only;
        // KubeVirt (storage/disk.go): `pciAddress` only on virtio, as `dddd:bb:ss.f`.
        let pci_address = match d.disk.as_ref().and_then(|t| t.pci_address.as_deref()) {
            None => None,
            Some(a) => {
                let pf = format!("{f}.disk.pciAddress");
                if bus != "virtio" {
                    return Err(err(
                        pf,
                        format!("a PCI address needs bus virtio (the disk uses {bus})"),
                    ));
                }
                Some(parse_pci_address(a).ok_or_else(|| {
                    err(
                        pf,
                        format!("{a:?} is not a PCI address (domain:bus:slot.function, e.g. 0000:01:00.0)"),
                    )
                })?)
            }
        };
        let tray = d.cdrom.as_ref().map(|c| match c.tray.as_deref() {
            None | Some("closed") => Ok("closed".to_string()),
            Some("open") => Ok("open".to_string()),
            Some(other) => Err(err(
                format!("{f}.cdrom.tray"),
                format!("{other:?} is not open or closed"),
            )),
        });
        let tray = tray.transpose()?;
        pending.push(Pending {
            name,
            bus,
            index: i,
            disk: Disk {
                device,
                source,
                driver: Driver {
                    format,
                    cache: Some(cache.to_string()),
                    io: io.map(str::to_string),
                    error_policy: Some(error_policy),
                    // KubeVirt (storage/volume.go): a PVC's disk gets discard whatever its
                    // device, so a cdrom on a PVC too; other cdroms get none.
                    discard: ((device != DiskDevice::Cdrom || matches!(kind, Kind::Pvc { .. }))
                        && !keep_allocated)
                        .then_some("unmap"),
                    iothread: None,
                    iothread_pool: vec![],
                    queues,
                },
                data_store,
                backing_store: backing,
                target_dev: String::new(),
                bus: bus.to_string(),
                tray,
                model: (bus == "virtio").then(|| virtio_model.to_string()),
                readonly,
                shareable,
                serial: d.serial.clone(),
                boot_order,
                alias: format!("ua-{name}"),
                blockio,
                reservations,
                address: pci_address,
            },
        });
    }

    // The NoCloud volumes share one ISO: read-only views of it (cdroms, read-only disks) may
    // be several, but a writable one must be the only one (QEMU locks a writable image).
    let nocloud: Vec<&Pending<'_>> = pending
        .iter()
        .filter(|p| matches!(volumes.get(p.name), Some((_, _, Kind::NoCloud))))
        .collect();
    if nocloud.len() > 1 {
        if let Some(w) = nocloud.iter().find(|p| !p.disk.readonly) {
            return Err(err(
                format!("spec.domain.devices.disks[{}]", w.index),
                format!(
                    "disk {:?} writes the NoCloud ISO that {} other cloudInitNoCloud disk(s) also use; make it a cdrom or readonly",
                    w.name,
                    nocloud.len() - 1
                ),
            ));
        }
    }

    // bootOrder must be unique across disks (interfaces are checked by the caller).
    let mut orders: BTreeMap<u32, &str> = BTreeMap::new();
    for (o, field) in &boot_orders {
        if let Some(prev) = orders.insert(*o, field) {
            return Err(err(
                field,
                format!(
                    "bootOrder {o} is already used by {}",
                    prev.trim_end_matches(".bootOrder")
                ),
            ));
        }
    }

    // Target names.
    let wanted: Vec<(&'static str, Option<&str>)> = pending
        .iter()
        .map(|p| {
            let kept = vmi.volume_status(p.name).and_then(|s| s.target.as_deref());
            (names::prefix_for_bus(p.bus), kept)
        })
        .collect();
    for (p, dev) in pending.iter_mut().zip(names::assign(&wanted)) {
        // KubeVirt (storage/disk.go assignDiskToSCSIController): a scsi disk or lun sits on the
        // virtio-scsi controller 0, bus 0, unit = its name's index (sdh → 7). A scsi cdrom
        // keeps libvirt's choice, as in KubeVirt.
        if p.bus == "scsi" && p.disk.device != DiskDevice::Cdrom {
            p.disk.address = names::drive_index("sd", &dev)
                .and_then(|i| u32::try_from(i).ok())
                .map(|unit| {
                    DiskAddress::Drive(DriveAddress {
                        controller: 0,
                        bus: 0,
                        unit,
                    })
                });
        }
        p.disk.target_dev = dev;
    }

    let (iothreads, scsi_iothread) = assign_iothreads(vmi, &buses, &mut pending)?;
    let uses_usb = pending.iter().any(|p| p.bus == "usb");
    let uses_scsi = buses.contains(&"scsi");
    Ok(Storage {
        disks: pending.into_iter().map(|p| p.disk).collect(),
        iothreads,
        uses_usb,
        uses_scsi,
        scsi_iothread,
        boot_orders,
    })
}

/// KubeVirt's iothread layout (converter/iothreads/iothreads.go GetIOThreadsCountType,
/// storage/disk.go assignDiskIOThread), numbered over the spec's disks so that a disk keeps its
/// thread when a hot-plugged one is attached later:
/// - iothreads are used when `ioThreadsPolicy` is set or some disk asks for `dedicatedIOThread`;
/// - `shared` (or no policy): a pool of 1 thread; `auto`: a pool of 2 × the CPU request (else
///   the CPU limit, else 1), at least 1. The pool holds one thread per non-dedicated disk (any
///   bus) up to that limit minus the dedicated disks. Pool threads are `1..=pool`, given
///   round-robin to the non-dedicated virtio disks; each dedicated virtio disk gets its own
///   thread after the pool. `<iothreads>` = pool + dedicated.
/// - `supplementalPool`: `supplementalPoolThreadCount` threads, and every virtio disk's
///   `<driver>` lists them all (`<iothreads><iothread id=…/>`), so that QEMU spreads the disk's
///   queues over the pool (per-queue iothread mapping, libvirt ≥ 10 / QEMU ≥ 9).
///   `dedicatedIOThread` has no effect under this policy, as in KubeVirt.
fn assign_iothreads(
    vmi: &VirtualMachineInstance,
    buses: &[&'static str],
    pending: &mut [Pending<'_>],
) -> Result<(u32, Option<u32>), ConvertError> {
    let domain = &vmi.spec.domain;
    let disks = &domain.devices.disks;
    let dedicated = |i: usize| disks[i].dedicated_io_thread == Some(true);
    let any_dedicated = (0..disks.len()).any(dedicated);
    if domain.io_threads_policy.as_deref() != Some("supplementalPool")
        && domain
            .io_threads
            .as_ref()
            .is_some_and(|t| t.supplemental_pool_thread_count.is_some())
    {
        // KubeVirt's webhook refuses the count without the policy it belongs to.
        return Err(err(
            "spec.domain.ioThreads.supplementalPoolThreadCount",
            "only with ioThreadsPolicy supplementalPool",
        ));
    }
    let limit = match domain.io_threads_policy.as_deref() {
        None if !any_dedicated => return Ok((0, None)),
        None | Some("shared") => 1,
        // KubeVirt: iothreads share the emulator thread's own CPU.
        Some("auto")
            if vmi.is_cpu_dedicated()
                && domain.cpu.as_ref().and_then(|c| c.isolate_emulator_thread) == Some(true) =>
        {
            1
        }
        Some("auto") => {
            let r = &domain.resources;
            let cpus = match r
                .requests
                .get("cpu")
                .map(|q| ("spec.domain.resources.requests.cpu", q))
                .or_else(|| {
                    r.limits
                        .get("cpu")
                        .map(|q| ("spec.domain.resources.limits.cpu", q))
                }) {
                Some((field, q)) => q
                    .milli_value()
                    .map_err(|e| err(field, e.to_string()))?
                    .div_ceil(1000),
                None => 1,
            };
            u32::try_from(cpus.saturating_mul(2)).unwrap_or(u32::MAX)
        }
        Some("supplementalPool") => {
            let f = "spec.domain.ioThreads.supplementalPoolThreadCount";
            let n = domain
                .io_threads
                .as_ref()
                .and_then(|t| t.supplemental_pool_thread_count)
                .ok_or_else(|| err(f, "required with ioThreadsPolicy supplementalPool"))?;
            if !(1..=super::MAX_VCPUS).contains(&n) {
                return Err(err(
                    f,
                    format!("{n} is out of range (1..{})", super::MAX_VCPUS),
                ));
            }
            let pool: Vec<u32> = (1..=n).collect();
            for p in pending.iter_mut().filter(|p| p.bus == "virtio") {
                p.disk.driver.iothread_pool = pool.clone();
            }
            return Ok((n, None));
        }
        Some(other) => {
            return Err(err(
                "spec.domain.ioThreadsPolicy",
                format!("{other:?} is not one of shared, auto, supplementalPool"),
            ))
        }
    };
    let n_dedicated = (0..disks.len()).filter(|i| dedicated(*i)).count() as u32;
    let mut pool = disks.len() as u32 - n_dedicated;
    if pool + n_dedicated > limit {
        pool = limit.saturating_sub(n_dedicated).max(1);
    }
    // Thread of each spec disk (virtio only), in spec order.
    let mut thread = vec![None; disks.len()];
    let (mut next_dedicated, mut next_pool) = (pool + 1, 1u32);
    for (i, bus) in buses.iter().enumerate() {
        if *bus != "virtio" {
            continue;
        }
        thread[i] = Some(if dedicated(i) {
            next_dedicated += 1;
            next_dedicated - 1
        } else {
            let t = next_pool;
            next_pool = next_pool % pool.max(1) + 1;
            t
        });
    }
    for p in pending.iter_mut() {
        p.disk.driver.iothread = thread[p.index];
    }
    // KubeVirt (compute/controllers.go computeScsiControllerThread): a dedicated scsi disk
    // gives the virtio-scsi controller the pool thread after the virtio disks' round-robin.
    let scsi_dedicated = (0..disks.len()).any(|i| dedicated(i) && buses[i] == "scsi");
    Ok((pool + n_dedicated, scsi_dedicated.then_some(next_pool)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KubeVirt's converter_test "Should use correct IOThreads policies" table: one dedicated
    /// disk, then six shared virtio disks, with a CPU request of `cpus`.
    #[test]
    fn iothread_numbering_matches_kubevirt() {
        let run = |policy: &str, cpus: u32| {
            let mut disks = vec![
                serde_json::json!({"name": "d0", "disk": {"bus": "virtio"}, "dedicatedIOThread": true}),
                serde_json::json!({"name": "d1", "disk": {"bus": "virtio"}, "dedicatedIOThread": false}),
            ];
            let mut volumes = vec![];
            for i in 2..7 {
                disks.push(serde_json::json!({"name": format!("d{i}"), "disk": {"bus": "virtio"}}));
            }
            for i in 0..7 {
                volumes.push(serde_json::json!({"name": format!("d{i}"), "persistentVolumeClaim": {"claimName": "c"}}));
            }
            let vmi = serde_json::json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "metadata": {"name": "t"},
                "spec": {"domain": {"ioThreadsPolicy": policy,
                    "resources": {"requests": {"memory": "1Gi", "cpu": cpus.to_string()}},
                    "devices": {"disks": disks}}, "volumes": volumes}
            });
            let vmi = crate::spec::from_str(&vmi.to_string(), "t").expect("vmi");
            let d = crate::convert::convert(&vmi, &PodFacts::defaults(&vmi)).expect("converts");
            let ids: Vec<u32> = d
                .devices
                .disks
                .iter()
                .map(|d| d.driver.iothread.expect("iothread"))
                .collect();
            (d.iothreads, ids)
        };
        assert_eq!(run("shared", 1), (2, vec![2, 1, 1, 1, 1, 1, 1]));
        assert_eq!(run("shared", 2), (2, vec![2, 1, 1, 1, 1, 1, 1]));
        assert_eq!(run("auto", 1), (2, vec![2, 1, 1, 1, 1, 1, 1]));
        assert_eq!(run("auto", 2), (4, vec![4, 1, 2, 3, 1, 2, 3]));
        assert_eq!(run("auto", 3), (6, vec![6, 1, 2, 3, 4, 5, 1]));
        assert_eq!(run("auto", 4), (7, vec![7, 1, 2, 3, 4, 5, 6]));
        assert_eq!(run("auto", 5), (7, vec![7, 1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn cache_decisions() {
        assert_eq!(cache_mode(None, false, true), Ok("none"));
        assert_eq!(cache_mode(None, false, false), Ok("writethrough"));
        assert_eq!(cache_mode(None, true, true), Ok("none"));
        assert!(cache_mode(None, true, false).is_err());
        assert_eq!(cache_mode(Some("writeback"), false, true), Ok("writeback"));
        assert!(cache_mode(Some("writeback"), true, true).is_err());
        assert!(cache_mode(Some("none"), false, false).is_err());
        assert!(cache_mode(Some("unsafe"), false, true).is_err());
    }

    #[test]
    fn io_decisions() {
        assert_eq!(io_mode(None, "none", true), Ok(Some("native")));
        assert_eq!(io_mode(None, "none", false), Ok(None));
        assert_eq!(io_mode(None, "writethrough", true), Ok(None));
        assert!(io_mode(Some("native"), "writethrough", true).is_err());
        assert_eq!(io_mode(Some("threads"), "none", true), Ok(Some("threads")));
        assert!(io_mode(Some("fast"), "none", true).is_err());
    }

    #[test]
    fn path_confinement() {
        let base = Path::new("/k");
        assert_eq!(
            confine(base, "/boot/vmlinuz"),
            Ok(PathBuf::from("/k/boot/vmlinuz"))
        );
        assert_eq!(
            confine(base, "boot/./initrd"),
            Ok(PathBuf::from("/k/boot/initrd"))
        );
        assert!(confine(base, "../etc/shadow").is_err());
        assert!(confine(base, "/boot/../../etc").is_err());
        assert!(confine(base, "/").is_err());
        assert!(confine(base, "a\0b").is_err());
        assert!(host_path("relative/disk.img").is_err());
        assert!(host_path("/data/../etc/disk.img").is_err());
        assert!(host_path("/data/disk.img").is_ok());
    }
}
