//! VMI + pod facts → libvirt domain. **Pure**: no filesystem, clock or environment access;
//! everything about the pod comes in through [`PodFacts`].
//!
//! Every rejection is a [`ConvertError`] naming the field path (`spec.domain.devices.disks[3].disk.bus`)
//! and the reason.
//!
//! Decisions where KubeVirt's behaviour is not simply copied:
//! - ACPI is on unless `features.acpi.enabled: false` (KubeVirt only defaults it when
//!   `features` is absent; without ACPI a graceful shutdown cannot work).
//! - EFI with secure boot (KubeVirt's default for `efi: {}`) turns SMM on, as libvirt requires.
//! - Domain type `qemu` (TCG): `host-model`/`host-passthrough` need KVM, so the CPU becomes
//!   `qemu64` with an XML comment saying why; a named model is kept.
//! - `<uuid>` = `spec.domain.firmware.uuid`, else `metadata.uid` when it is a UUID, else
//!   KubeVirt's name-derived firmware UUID; the SMBIOS system uuid is the same value (libvirt
//!   rejects a mismatch).
//! - Interfaces: each `masquerade`/`bridge` interface becomes `<interface type='ethernet'>` on
//!   the tap KubeVirt's handler creates (`tap0` for the pod network, `tap<hash>` for Multus;
//!   `managed='no'`), with the pod interface's MTU, the VMI's MAC (else the handler's cached one
//!   for `bridge`, else one derived from the VMI's uid: stable across restarts and migrations)
//!   and `<rom enabled='no'/>` unless it boots. Standalone (no handler: [`PodFacts::standalone_network`])
//!   `masquerade` and `passtBinding` are libvirt's passt in socket mode and `bridge` a host
//!   bridge. In a pod, a `passtBinding` interface becomes KubeVirt's vhost-user interface with libvirt's passt
//!   back-end (see `passt_attachment`), with shared memfd guest memory and one NUMA cell. No
//!   interface is invented when the spec lists none. SR-IOV, slirp, the discontinued `passt`
//!   and binding plugins are rejected.
//! - Changed-block tracking (`status.changedBlockTracking.state` `Initializing`/`Enabled`): PVC,
//!   DataVolume and hostDisk disks become a qcow2 overlay `<cbt_dir>/<volume>.qcow2` with the
//!   volume as its raw `<dataStore>`; the pod runtime must have created the overlay.
//! - Spare `pcie-root-port`s: [`PodFacts::spare_root_ports`] (default 8), overridden per VM by
//!   the annotation [`SPARE_ROOT_PORTS_ANNOTATION`] (0..=32); only for q35 machines.
//! - Serial console log on unless the handler's clusterConfig turns it off; guest agent channel
//!   gets a fixed socket in the private dir.
//! - virt-handler's Sync options ([`crate::spec::HandlerOptions`]): the cluster's SMBIOS, the
//!   balloon's statistics period, free page reporting and the serial console log.
//! - `blockSize.matchVolume`: the block sizes the pod probed on the volume
//!   ([`facts::PodFacts::volume_block_io`]).
//! - The placePCIDevicesOnRootComplex annotation: every PCI device on `pcie.0`, no spare root
//!   ports (KubeVirt's pci-placement.go).
//! - `dedicatedCpuPlacement`: `<cputune>` pins onto the pod's CPU set ([`cpupin`]); tests/model_walk.rs
//!   checks that no other field of the model is accepted and ignored.

pub mod cpupin;
mod disks;
pub mod facts;
pub mod names;
pub mod uuid;

use crate::domain::*;
use crate::spec::{is_dns1123_label, is_dns1123_subdomain, FeatureState, VirtualMachineInstance};
use facts::PodFacts;

pub use disks::{confine, confined_components, kernel_boot_artifact};

/// A rejected spec: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Per-VM override of the number of spare `pcie-root-port` controllers.
pub const SPARE_ROOT_PORTS_ANNOTATION: &str = "virt-launcher.kubevirt.io/spare-pcie-root-ports";
/// Largest accepted guest memory: 16 TiB.
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
/// Largest accepted vCPU count.
pub const MAX_VCPUS: u32 = 512;
const MAX_SPARE_ROOT_PORTS: u32 = 32;
const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// Convert a VMI into a libvirt domain for the pod described by `facts`.
pub fn convert(vmi: &VirtualMachineInstance, facts: &PodFacts) -> Result<Domain, ConvertError> {
    check_metadata(vmi)?;
    let mut memory = memory(vmi)?;
    let (cpu, vcpu_hotplug) = cpu(vmi, facts)?;
    let vcpus = cpu.sockets * cpu.cores * cpu.threads;
    let uuid = domain_uuid(vmi)?;
    let (os, secure_boot) = os(vmi, facts)?;
    let features = features(vmi, secure_boot)?;
    let clock = clock(vmi)?;
    // vCPUs the VM starts with (with maxSockets, the enabled ones).
    let requested_vcpus = vcpu_hotplug.map_or(vcpus, |h| h.enabled);
    let storage = disks::convert_disks(vmi, facts, requested_vcpus)?;
    let cputune = dedicated_cpus(vmi, facts, &cpu, requested_vcpus, storage.iothreads)?;
    let mut features = features;
    features.kvm_hint_dedicated = cputune.is_some();
    let interfaces = interfaces(vmi, facts, &storage.boot_orders)?;
    // vhost-user (passt) maps guest memory: KubeVirt's memory_backing.go and cpu.go
    // configureSyntheticNUMA (memfd, shared access, one NUMA cell) for a passtBinding. KubeVirt
    // decides by the VMI (HasPasstBinding), so a standalone passtBinding, whose socket-mode passt
    // would not need it, gets the same memory backing as in KubeVirt's pod.
    let passt = vmi
        .spec
        .domain
        .devices
        .interfaces
        .iter()
        .any(|i| i.passt_binding.is_some());
    memory.memfd |= passt;
    memory.shared = passt;
    let dev = &vmi.spec.domain.devices;
    let virtio_model = if dev.use_virtio_transitional == Some(true) {
        "virtio-transitional"
    } else {
        "virtio-non-transitional"
    };

    let inputs = inputs(vmi)?;
    let uses_usb = storage.uses_usb || inputs.iter().any(|i| i.bus == "usb");
    let mut controllers = vec![Controller {
        pci_slot: None,
        kind: "usb",
        index: Some(0),
        model: Some(if uses_usb { "qemu-xhci" } else { "none" }.to_string()),
        driver: None,
    }];
    // KubeVirt (compute/controllers.go requiresSCSIController): the virtio-scsi controller is
    // there for hot-plug unless `disableHotplug`, and then only for a disk on scsi.
    if dev.disable_hotplug != Some(true) || storage.uses_scsi {
        controllers.push(Controller {
            pci_slot: None,
            kind: "scsi",
            index: Some(0),
            model: Some(virtio_model.to_string()),
            // Queues: the requested vCPUs (KubeVirt's CalculateRequestedVCPUs).
            driver: storage.scsi_iothread.map(|iothread| ControllerDriver {
                iothread,
                queues: requested_vcpus,
            }),
        });
    }
    controllers.push(Controller {
        pci_slot: None,
        kind: "virtio-serial",
        index: Some(0),
        model: Some(virtio_model.to_string()),
        driver: None,
    });
    // KubeVirt adds no hot-plug ports when every device sits on the root complex.
    let root_complex = places_on_root_complex(vmi);
    let spare = if root_complex {
        0
    } else {
        spare_root_ports(vmi, facts)?
    };
    if os.machine.starts_with("q35") || os.machine.starts_with("pc-q35") {
        // libvirt requires the root complex to be declared (index 0) before any port.
        controllers.push(Controller {
            pci_slot: None,
            kind: "pci",
            index: Some(0),
            model: Some("pcie-root".to_string()),
            driver: None,
        });
        for _ in 0..spare {
            controllers.push(Controller {
                pci_slot: None,
                kind: "pci",
                index: None,
                model: Some("pcie-root-port".to_string()),
                driver: None,
            });
        }
    }

    let paths = &facts.paths;
    let opts = vmi.handler_options.as_ref();
    let (serials, consoles) = if dev.autoattach_serial_console == Some(false) {
        (vec![], vec![])
    } else {
        (
            vec![Serial {
                socket: paths.serial_socket(),
                // KubeVirt (isSerialConsoleLogEnabled): the cluster can turn the log off.
                log: (!opts.is_some_and(|o| o.serial_console_log_disabled))
                    .then(|| paths.serial_log()),
                port: 0,
            }],
            vec![Console { port: 0 }],
        )
    };
    let (graphics, videos) = if dev.autoattach_graphics_device == Some(false) {
        (vec![], vec![])
    } else {
        (
            vec![Graphics {
                vnc_socket: paths.vnc_socket(),
            }],
            // KubeVirt (configureAMD64VideoDevice): bochs for an EFI guest when the cluster
            // asks for it (no VRAM size), else VGA with 16 MiB.
            vec![if opts.is_some_and(|o| o.bochs_display_for_efi_guests)
                && vmi
                    .spec
                    .domain
                    .firmware
                    .as_ref()
                    .and_then(|f| f.bootloader.as_ref())
                    .is_some_and(|b| b.efi.is_some())
            {
                Video {
                    model: "bochs".to_string(),
                    heads: 1,
                    vram: None,
                }
            } else {
                Video {
                    model: "vga".to_string(),
                    heads: 1,
                    vram: Some(16384),
                }
            }],
        )
    };
    let memballoon = Some(if dev.autoattach_mem_balloon == Some(false) {
        Memballoon {
            pci_slot: None,
            model: "none".to_string(),
            stats_period: None,
            free_page_reporting: None,
        }
    } else {
        // KubeVirt (virtwrap/manager.go isFreePageReportingEnabled): on, except for
        // high-performance VMIs (hugepages, dedicated CPUs) and the VMI's opt-out annotation.
        let off = memory.hugepage_kib.is_some()
            || vmi.is_cpu_dedicated()
            || opts.is_some_and(|o| o.free_page_reporting_disabled)
            || vmi
                .metadata
                .annotations
                .get(FREE_PAGE_REPORTING_DISABLED_ANNOTATION)
                .is_some_and(|v| v == "true");
        Memballoon {
            pci_slot: None,
            model: virtio_model.to_string(),
            // The handler's MemBalloonStatsPeriod (0: none), else KubeVirt's default 10 s.
            stats_period: opts
                .map_or(Some(10), |o| Some(o.mem_balloon_stats_period))
                .filter(|p| *p != 0),
            free_page_reporting: Some(!off),
        }
    });
    let (watchdogs, sounds) = watchdog_and_sound(vmi)?;
    let rngs = if dev.rng.is_some() {
        vec![Rng {
            pci_slot: None,
            model: virtio_model.to_string(),
            backend: "/dev/urandom".into(),
        }]
    } else {
        vec![]
    };

    // The cluster's SMBIOS from the handler (KubeVirt compute/sysinfo.go buildSystem), else
    // KubeVirt's default cluster SMBIOS.
    let mut system = match opts.and_then(|o| o.smbios.as_ref()) {
        Some(s) => {
            let mut v = Vec::new();
            for (k, val) in [
                ("manufacturer", &s.manufacturer),
                ("family", &s.family),
                ("product", &s.product),
                ("sku", &s.sku),
                ("version", &s.version),
            ] {
                check_text(
                    &format!("VirtualMachineOptions.VirtualMachineSMBios.{k}"),
                    val,
                    256,
                )?;
                if !val.is_empty() {
                    v.push((k.to_string(), val.clone()));
                }
            }
            v
        }
        None => vec![
            ("manufacturer".to_string(), "KubeVirt".to_string()),
            ("product".to_string(), "None".to_string()),
            ("family".to_string(), "KubeVirt".to_string()),
        ],
    };
    system.push(("uuid".to_string(), uuid.clone()));
    if let Some(serial) = vmi
        .spec
        .domain
        .firmware
        .as_ref()
        .and_then(|f| f.serial.as_ref())
    {
        check_text("spec.domain.firmware.serial", serial, 256)?;
        system.push(("serial".to_string(), serial.clone()));
    }

    // KubeVirt (compute/sysinfo.go buildChassis): all five entries once `chassis` is set.
    let mut chassis = Vec::new();
    if let Some(c) = &vmi.spec.domain.chassis {
        for (k, v) in [
            ("manufacturer", &c.manufacturer),
            ("version", &c.version),
            ("serial", &c.serial),
            ("asset", &c.asset),
            ("sku", &c.sku),
        ] {
            let v = v.clone().unwrap_or_default();
            check_text(&format!("spec.domain.chassis.{k}"), &v, 256)?;
            chassis.push((k.to_string(), v));
        }
    }

    Ok(Domain {
        domain_type: facts.domain_type,
        name: vmi.domain_name(),
        uuid: Some(uuid),
        kubevirt_uid: vmi.metadata.uid.clone(),
        memory,
        vcpus,
        vcpu_hotplug,
        iothreads: storage.iothreads,
        cputune,
        cpu,
        os,
        sysinfo: Some(Sysinfo { system, chassis }),
        features,
        clock,
        on_poweroff: "destroy",
        on_reboot: "restart",
        on_crash: "destroy",
        devices: {
            let mut devices = Devices {
                disks: storage.disks,
                controllers,
                interfaces,
                serials,
                consoles,
                channels: vec![Channel {
                    socket: paths.guest_agent_socket(),
                    target_name: GUEST_AGENT_CHANNEL.to_string(),
                }],
                graphics,
                videos,
                inputs,
                memballoon,
                rngs,
                watchdogs,
                sounds,
            };
            if root_complex {
                place_on_root_complex(&mut devices).map_err(|reason| {
                    err(
                        format!("metadata.annotations[{PLACE_ON_ROOT_COMPLEX_ANNOTATION}]"),
                        reason,
                    )
                })?;
            }
            devices
        },
    })
}

fn places_on_root_complex(vmi: &VirtualMachineInstance) -> bool {
    vmi.metadata
        .annotations
        .get(PLACE_ON_ROOT_COMPLEX_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// KubeVirt's PlacePCIDevicesOnRootComplex (converter/pci-placement.go): every PCI device gets
/// the next free slot on `pcie.0`, in KubeVirt's order (interfaces, controllers but the root
/// complex itself, virtio disks, virtio inputs, watchdogs, the RNG, the balloon), from slot 2 on,
/// skipping 0x1b (the ICH9 sound card) and 0x1f (QEMU's SATA controller). A disk with its own
/// `pciAddress` keeps it and takes no slot.
fn place_on_root_complex(dv: &mut Devices) -> Result<(), String> {
    let mut last: i32 = -1;
    let mut next = || -> Result<Option<u8>, String> {
        let slot = match last + 1 {
            0 | 1 => 2,
            s @ (0x1b | 0x1f) => s + 1,
            s => s,
        };
        if slot >= 0x20 {
            return Err("too many PCI devices for the root bus (slots 0x02-0x1f)".into());
        }
        last = slot;
        Ok(u8::try_from(slot).ok())
    };
    for i in &mut dv.interfaces {
        i.pci_slot = next()?;
    }
    for c in &mut dv.controllers {
        if c.model.as_deref() != Some("pcie-root") {
            c.pci_slot = next()?;
        }
    }
    for d in &mut dv.disks {
        if d.bus == "virtio" && d.address.is_none() {
            if let Some(slot) = next()? {
                d.address = Some(DiskAddress::Pci {
                    domain: 0,
                    bus: 0,
                    slot,
                    function: 0,
                });
            }
        }
    }
    for i in &mut dv.inputs {
        if i.bus == "virtio" {
            i.pci_slot = next()?;
        }
    }
    for w in &mut dv.watchdogs {
        w.pci_slot = next()?;
    }
    for r in &mut dv.rngs {
        r.pci_slot = next()?;
    }
    if let Some(m) = &mut dv.memballoon {
        m.pci_slot = next()?;
    }
    Ok(())
}

/// A device name as a libvirt user alias (`ua-<name>`): KubeVirt's `NewUserDefinedAlias`.
fn user_alias(field: &str, name: &str) -> Result<String, ConvertError> {
    if name.is_empty() {
        return Err(err(field, "required"));
    }
    if !is_dns1123_label(name) {
        return Err(err(field, format!("{name:?} is not a DNS-1123 label")));
    }
    Ok(format!("ua-{name}"))
}

/// `devices.watchdog` and `devices.sound` (KubeVirt compute/watchdog.go, compute/sound.go), and
/// the devices a single host cannot give (refused naming the field): a TPM (no swtpm in the
/// launcher's image), GPUs and host devices (assigned by device plugins).
fn watchdog_and_sound(
    vmi: &VirtualMachineInstance,
) -> Result<(Vec<Watchdog>, Vec<Sound>), ConvertError> {
    let dev = &vmi.spec.domain.devices;
    let mut watchdogs = Vec::new();
    if let Some(wd) = &dev.watchdog {
        let base = "spec.domain.devices.watchdog";
        let alias = user_alias(&format!("{base}.name"), &wd.name)?;
        if wd.diag288.is_some() {
            return Err(err(
                format!("{base}.diag288"),
                "diag288 is s390x's watchdog; this launcher runs x86_64 guests (use i6300esb)",
            ));
        }
        let Some(m) = &wd.i6300esb else {
            return Err(err(
                base,
                format!("watchdog {:?} has no model: set i6300esb", wd.name),
            ));
        };
        let action = match m.action.as_deref() {
            None | Some("") | Some("reset") => "reset",
            Some("poweroff") => "poweroff",
            Some("shutdown") => "shutdown",
            Some(other) => {
                return Err(err(
                    format!("{base}.i6300esb.action"),
                    format!("{other:?} is not one of poweroff, reset, shutdown"),
                ))
            }
        };
        watchdogs.push(Watchdog {
            pci_slot: None,
            model: "i6300esb",
            action,
            alias,
        });
    }
    let mut sounds = Vec::new();
    if let Some(snd) = &dev.sound {
        let base = "spec.domain.devices.sound";
        let alias = user_alias(&format!("{base}.name"), &snd.name)?;
        let model = match snd.model.as_deref() {
            None | Some("") | Some("ich9") => "ich9",
            Some("ac97") => "ac97",
            Some(other) => {
                return Err(err(
                    format!("{base}.model"),
                    format!("{other:?} is not ich9 or ac97"),
                ))
            }
        };
        sounds.push(Sound { model, alias });
    }
    if dev.tpm.as_ref().is_some_and(|t| t.enabled != Some(false)) {
        return Err(err(
            "spec.domain.devices.tpm",
            "an emulated TPM needs swtpm, which the launcher's image does not ship; not supported",
        ));
    }
    for (field, list) in [
        ("spec.domain.devices.gpus", &dev.gpus),
        ("spec.domain.devices.hostDevices", &dev.host_devices),
    ] {
        if !list.is_empty() {
            return Err(err(
                format!("{field}[0]"),
                "host devices are assigned by device plugins (the PCI or mediated devices \
                 virt-handler passes through); not supported",
            ));
        }
    }
    Ok((watchdogs, sounds))
}

/// Reject text XML cannot carry or that has no business in a domain (control characters).
fn check_text(field: &str, s: &str, max: usize) -> Result<(), ConvertError> {
    if s.len() > max {
        return Err(err(field, format!("longer than {max} bytes")));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(err(field, "contains control characters"));
    }
    Ok(())
}

fn check_metadata(vmi: &VirtualMachineInstance) -> Result<(), ConvertError> {
    let m = &vmi.metadata;
    if m.name.is_empty() {
        return Err(err("metadata.name", "required"));
    }
    if !is_dns1123_subdomain(&m.name) {
        return Err(err(
            "metadata.name",
            format!("{:?} is not a DNS-1123 subdomain", m.name),
        ));
    }
    if let Some(ns) = &m.namespace {
        if !ns.is_empty() && !is_dns1123_label(ns) {
            return Err(err(
                "metadata.namespace",
                format!("{ns:?} is not a DNS-1123 label"),
            ));
        }
    }
    if let Some(uid) = &m.uid {
        check_text("metadata.uid", uid, 128)?;
    }
    Ok(())
}

/// KubeVirt's annotation that keeps hugepages off memfd (`"false"`).
pub const MEMFD_ANNOTATION: &str = "kubevirt.io/memfd";
/// KubeVirt's annotation that turns the balloon's free page reporting off (`"true"`).
pub const FREE_PAGE_REPORTING_DISABLED_ANNOTATION: &str =
    "kubevirt.io/free-page-reporting-disabled";

/// KubeVirt's annotation that puts every PCI device on the root complex.
pub const PLACE_ON_ROOT_COMPLEX_ANNOTATION: &str = "kubevirt.io/placePCIDevicesOnRootComplex";

fn domain_uuid(vmi: &VirtualMachineInstance) -> Result<String, ConvertError> {
    if let Some(u) = vmi
        .spec
        .domain
        .firmware
        .as_ref()
        .and_then(|f| f.uuid.as_deref())
    {
        if !uuid::is_uuid(u) {
            return Err(err(
                "spec.domain.firmware.uuid",
                format!("{u:?} is not a UUID"),
            ));
        }
        return Ok(u.to_ascii_lowercase());
    }
    match vmi.metadata.uid.as_deref() {
        Some(u) if uuid::is_uuid(u) => Ok(u.to_ascii_lowercase()),
        _ => Ok(uuid::firmware_uuid_from_name(&vmi.metadata.name)),
    }
}

fn memory(vmi: &VirtualMachineInstance) -> Result<Memory, ConvertError> {
    let d = &vmi.spec.domain;
    let (field, q) = if let Some(g) = d.memory.as_ref().and_then(|m| m.guest.as_ref()) {
        ("spec.domain.memory.guest", g)
    } else if let Some(r) = d.resources.requests.get("memory") {
        ("spec.domain.resources.requests.memory", r)
    } else if let Some(l) = d.resources.limits.get("memory") {
        ("spec.domain.resources.limits.memory", l)
    } else {
        return Err(err(
            "spec.domain.resources.requests.memory",
            "required (or spec.domain.memory.guest)",
        ));
    };
    let bytes = q.value().map_err(|e| err(field, e.to_string()))?;
    if !(1 << 20..=MAX_MEMORY_BYTES).contains(&bytes) {
        return Err(err(
            field,
            format!("{:?} is out of range (1Mi .. 16Ti)", q.0),
        ));
    }
    let kib = bytes.div_ceil(1024);
    let hugepage_kib = match d.memory.as_ref().and_then(|m| m.hugepages.as_ref()) {
        None => None,
        Some(h) => {
            let f = "spec.domain.memory.hugepages.pageSize";
            let size = match h.page_size.as_str() {
                "2Mi" => 2048,
                "1Gi" => 1024 * 1024,
                other => return Err(err(f, format!("{other:?} is not 2Mi or 1Gi"))),
            };
            if kib % size != 0 {
                return Err(err(
                    field,
                    format!(
                        "{:?} is not a multiple of the hugepage size {}",
                        q.0, h.page_size
                    ),
                ));
            }
            Some(size)
        }
    };
    // KubeVirt (compute/memory_backing.go isMemfdRequired): hugepages are backed by memfd,
    // with the synthetic NUMA cell, unless the VMI's annotation turns memfd off.
    let memfd = hugepage_kib.is_some()
        && vmi
            .metadata
            .annotations
            .get(MEMFD_ANNOTATION)
            .is_none_or(|v| v != "false");
    // Memory hot-plug (KubeVirt compute/memory.go): `<maxMemory>` of maxGuest, unless it equals
    // the guest memory. The alignment and minimum are virt-controller's rules
    // (liveupdate/memory ValidateLiveUpdateMemory), checked here for a VMI written by hand.
    let mut max_kib = None;
    if let Some(mq) = d.memory.as_ref().and_then(|m| m.max_guest.as_ref()) {
        let f = "spec.domain.memory.maxGuest";
        let max = mq.value().map_err(|e| err(f, e.to_string()))?;
        let align: u64 = if hugepage_kib == Some(1024 * 1024) {
            1 << 30
        } else {
            2 << 20
        };
        if max > MAX_MEMORY_BYTES {
            return Err(err(f, format!("{:?} is out of range (.. 16Ti)", mq.0)));
        }
        if max < bytes {
            return Err(err(
                f,
                format!(
                    "{:?} is less than the guest memory ({field} {:?})",
                    mq.0, q.0
                ),
            ));
        }
        if max != bytes {
            let block = align >> 20;
            if max % align != 0 {
                return Err(err(
                    f,
                    format!(
                        "{:?} is not a multiple of {block} MiB (the hot-plug block)",
                        mq.0
                    ),
                ));
            }
            if bytes % align != 0 {
                return Err(err(
                    field,
                    format!(
                        "{:?} is not a multiple of {block} MiB, as memory hot-plug (maxGuest) needs",
                        q.0
                    ),
                ));
            }
            max_kib = Some(max / 1024);
        }
    }
    Ok(Memory {
        kib,
        max_kib,
        hugepage_kib,
        memfd,
        shared: false,
    })
}

/// The vCPU topology a VMI asks for: what `<cpu><topology>` and `<vcpus>` are made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuTopology {
    /// With CPU hot-plug, `maxSockets`.
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    /// CPU hot-plug (`maxSockets`): how many vCPUs are enabled.
    pub hotplug: Option<VcpuHotplug>,
}

impl VcpuTopology {
    /// The vCPUs the VM runs with: the enabled ones with CPU hot-plug, else all.
    pub fn online(&self) -> u32 {
        self.hotplug
            .map_or(self.sockets * self.cores * self.threads, |h| h.enabled)
    }

    /// The vCPUs the domain can ever have (`<vcpu>`).
    pub fn max(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }
}

/// The vCPU topology of `vmi` (KubeVirt's `GetCPUTopology` and, with `maxSockets`,
/// compute/cpu.go `configureCPUTopology`), checked as the converter checks it.
pub fn vcpu_topology(vmi: &VirtualMachineInstance) -> Result<VcpuTopology, ConvertError> {
    let spec = vmi.spec.domain.cpu.clone().unwrap_or_default();
    let one = |field: &str, v: Option<u32>| -> Result<u32, ConvertError> {
        match v {
            None => Ok(1),
            Some(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
            Some(n) => Err(err(field, format!("{n} is out of range (1..{MAX_VCPUS})"))),
        }
    };
    let mut cores = one("spec.domain.cpu.cores", spec.cores)?;
    let sockets_set = one("spec.domain.cpu.sockets", spec.sockets)?;
    let threads = one("spec.domain.cpu.threads", spec.threads)?;
    let mut sockets = sockets_set;
    if spec.cores.is_none() && spec.sockets.is_none() && spec.threads.is_none() {
        // No topology: vCPUs from the CPU limit (or request), rounded up, as sockets.
        let r = &vmi.spec.domain.resources;
        let q = r
            .limits
            .get("cpu")
            .map(|q| ("spec.domain.resources.limits.cpu", q))
            .or_else(|| {
                r.requests
                    .get("cpu")
                    .map(|q| ("spec.domain.resources.requests.cpu", q))
            });
        if let Some((field, q)) = q {
            let milli = q.milli_value().map_err(|e| err(field, e.to_string()))?;
            let n = milli.div_ceil(1000).max(1);
            if n > u64::from(MAX_VCPUS) {
                return Err(err(
                    field,
                    format!("{:?} is more than {MAX_VCPUS} vCPUs", q.0),
                ));
            }
            sockets = u32::try_from(n).map_err(|_| err(field, "out of range"))?;
            cores = 1;
        }
    }
    let total = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    if total > u64::from(MAX_VCPUS) {
        return Err(err(
            "spec.domain.cpu",
            format!("sockets × cores × threads = {total} vCPUs, more than {MAX_VCPUS}"),
        ));
    }
    // CPU hot-plug (KubeVirt compute/cpu.go configureCPUTopology): the topology gets
    // `maxSockets` sockets; the vCPUs of the requested sockets are enabled, those of the first
    // socket are not hot-pluggable.
    let mut hotplug = None;
    if let Some(max) = spec.max_sockets.filter(|m| *m != 0) {
        let f = "spec.domain.cpu.maxSockets";
        if max < sockets {
            return Err(err(
                f,
                format!("{max} is less than the {sockets} sockets the VM starts with"),
            ));
        }
        let all = u64::from(max) * u64::from(cores) * u64::from(threads);
        if all > u64::from(MAX_VCPUS) {
            return Err(err(
                f,
                format!("maxSockets × cores × threads = {all} vCPUs, more than {MAX_VCPUS}"),
            ));
        }
        hotplug = Some(VcpuHotplug {
            enabled: sockets * cores * threads,
            fixed: cores * threads,
        });
        sockets = max;
    }
    Ok(VcpuTopology {
        sockets,
        cores,
        threads,
        hotplug,
    })
}

/// `dedicatedCpuPlacement` (see [`cpupin`]): the `<cputune>` pinning the vCPUs (with
/// `maxSockets`, the enabled ones), the emulator thread and the iothreads onto the pod's CPU
/// set. None for a VM without dedicated CPUs.
fn dedicated_cpus(
    vmi: &VirtualMachineInstance,
    facts: &PodFacts,
    cpu: &Cpu,
    enabled_vcpus: u32,
    iothreads: u32,
) -> Result<Option<CpuTune>, ConvertError> {
    let spec = vmi.spec.domain.cpu.clone().unwrap_or_default();
    if !vmi.is_cpu_dedicated() {
        if spec.isolate_emulator_thread == Some(true) {
            // KubeVirt's webhook: isolateEmulatorThread only with dedicatedCpuPlacement.
            return Err(err(
                "spec.domain.cpu.isolateEmulatorThread",
                "only with spec.domain.cpu.dedicatedCpuPlacement: true",
            ));
        }
        return Ok(None);
    }
    let threads = cpu.threads.max(1);
    let supplemental = if vmi.spec.domain.io_threads_policy.as_deref() == Some("supplementalPool") {
        iothreads
    } else {
        0
    };
    let req = cpupin::Request {
        cores: enabled_vcpus / threads,
        threads,
        isolate_emulator: spec.isolate_emulator_thread == Some(true),
        emulator_even_parity: vmi
            .metadata
            .annotations
            .contains_key(cpupin::EMULATOR_EVEN_PARITY_ANNOTATION),
        iothreads,
        supplemental_iothreads: supplemental,
    };
    cpupin::pin(&req, &facts.cpu_set, &facts.cpu_siblings).map(Some)
}

/// What may change in a running VM's CPU (KubeVirt's live update of `sockets`, CPU hot-plug):
/// only `sockets`, up to the `maxSockets` the VM (`started`) runs with. Another `cores` or
/// `threads`, more sockets than that, or any socket change of a VM started without
/// `maxSockets` is refused naming the field.
pub fn check_running_cpu(
    started: &VirtualMachineInstance,
    vmi: &VirtualMachineInstance,
) -> Result<(), ConvertError> {
    let Ok(old) = vcpu_topology(started) else {
        return Ok(());
    };
    // The sockets asked for, whatever maxSockets says.
    let mut asked = vmi.clone();
    if let Some(cpu) = asked.spec.domain.cpu.as_mut() {
        cpu.max_sockets = None;
    }
    let new = vcpu_topology(&asked)?;
    for (field, was, now) in [
        ("spec.domain.cpu.cores", old.cores, new.cores),
        ("spec.domain.cpu.threads", old.threads, new.threads),
    ] {
        if was != now {
            return Err(err(
                field,
                format!(
                    "{now} differs from the {was} the running VM has; only sockets can change \
                     while it runs (CPU hot-plug), the rest needs a restart"
                ),
            ));
        }
    }
    let f = "spec.domain.cpu.sockets";
    let running_sockets = old.hotplug.map_or(old.sockets, |h| {
        h.enabled / (old.cores * old.threads).max(1)
    });
    if started.is_cpu_dedicated() && new.sockets != running_sockets {
        // KubeVirt re-pins every vCPU after a hot-plug (manager.go UpdateVCPUs); this launcher
        // does not, and a plugged vCPU must not run unpinned.
        return Err(err(
            f,
            format!(
                "{} differs from the {running_sockets} the running VM has; CPU hot-plug of a VM \
                 with spec.domain.cpu.dedicatedCpuPlacement (re-pinning) is not supported, \
                 restart it",
                new.sockets
            ),
        ));
    }
    match old.hotplug {
        Some(_) if new.sockets > old.sockets => Err(err(
            f,
            format!(
                "{} is more than the {} of spec.domain.cpu.maxSockets the VM was started with",
                new.sockets, old.sockets
            ),
        )),
        None if new.sockets != old.sockets => Err(err(
            f,
            format!(
                "{} differs from the {} the running VM has, which was started without \
                 spec.domain.cpu.maxSockets (no CPU hot-plug); restart it",
                new.sockets, old.sockets
            ),
        )),
        _ => Ok(()),
    }
}

/// The guest memory of a running VM does not change through a Sync: KubeVirt grows it through
/// `SyncVirtualMachineMemory` (virtio-mem), which this launcher does not implement. Another
/// guest memory is refused naming the field the VMI sets it with.
pub fn check_running_memory(
    started: &VirtualMachineInstance,
    vmi: &VirtualMachineInstance,
) -> Result<(), ConvertError> {
    let (Ok(old), Ok(new)) = (memory(started), memory(vmi)) else {
        // A VMI the converter refuses is refused by the plan, naming its field.
        return Ok(());
    };
    if old.kib == new.kib {
        return Ok(());
    }
    let d = &vmi.spec.domain;
    let field = if d.memory.as_ref().and_then(|m| m.guest.as_ref()).is_some() {
        "spec.domain.memory.guest"
    } else if d.resources.requests.contains_key("memory") {
        "spec.domain.resources.requests.memory"
    } else {
        "spec.domain.resources.limits.memory"
    };
    Err(err(
        field,
        format!(
            "{} MiB differs from the {} MiB the running VM has: memory hot-plug is not \
             supported (restart the VM)",
            new.kib / 1024,
            old.kib / 1024
        ),
    ))
}

fn cpu(
    vmi: &VirtualMachineInstance,
    facts: &PodFacts,
) -> Result<(Cpu, Option<VcpuHotplug>), ConvertError> {
    let spec = vmi.spec.domain.cpu.clone().unwrap_or_default();
    let VcpuTopology {
        sockets,
        cores,
        threads,
        hotplug,
    } = vcpu_topology(vmi)?;
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    let mut comment = None;
    let requested = spec.model.as_deref().unwrap_or("host-model");
    let mode = match (requested, facts.domain_type) {
        ("host-model", DomainType::Kvm) => CpuMode::HostModel,
        ("host-passthrough", DomainType::Kvm) => CpuMode::HostPassthrough,
        (m @ ("host-model" | "host-passthrough"), DomainType::Qemu) => {
            comment = Some(format!(
                "{m} needs KVM; domain type qemu (TCG) emulates the CPU, so the TCG-safe baseline qemu64 is used"
            ));
            CpuMode::Custom("qemu64".to_string())
        }
        (m, _) if valid_name(m) => CpuMode::Custom(m.to_string()),
        (m, _) => {
            return Err(err(
                "spec.domain.cpu.model",
                format!("{m:?} is not a CPU model name"),
            ))
        }
    };
    let mut features = Vec::new();
    for (i, f) in spec.features.iter().enumerate() {
        if !valid_name(&f.name) {
            return Err(err(
                format!("spec.domain.cpu.features[{i}].name"),
                format!("{:?} is not a CPU feature name", f.name),
            ));
        }
        let policy = f.policy.as_deref().unwrap_or("require");
        if !matches!(
            policy,
            "force" | "require" | "optional" | "disable" | "forbid"
        ) {
            return Err(err(
                format!("spec.domain.cpu.features[{i}].policy"),
                format!("{policy:?} is not one of force, require, optional, disable, forbid"),
            ));
        }
        features.push((policy.to_string(), f.name.clone()));
    }
    // KubeVirt (compute/cpu.go configureCPUFeatures, amd64): a named CPU model gets `mpx`
    // disabled unless the spec lists mpx itself (libvirt's model files still require the
    // deprecated feature, which hosts no longer have).
    if spec
        .model
        .as_deref()
        .is_some_and(|m| m != "host-model" && m != "host-passthrough")
        && !spec.features.iter().any(|f| f.name == "mpx")
    {
        features.push(("disable".to_string(), "mpx".to_string()));
    }
    Ok((
        Cpu {
            mode,
            sockets,
            cores,
            threads,
            features,
            comment,
        },
        hotplug,
    ))
}

fn os(vmi: &VirtualMachineInstance, facts: &PodFacts) -> Result<(Os, bool), ConvertError> {
    let machine = vmi
        .spec
        .domain
        .machine
        .as_ref()
        .map(|m| m.machine_type.as_str())
        .filter(|m| !m.is_empty())
        .unwrap_or("q35");
    if machine.len() > 64
        || !machine
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(err(
            "spec.domain.machine.type",
            format!("{machine:?} is not a machine type"),
        ));
    }
    let mut os = Os {
        arch: "x86_64".to_string(),
        machine: machine.to_string(),
        loader: None,
        nvram: None,
        kernel: None,
        initrd: None,
        cmdline: None,
        bios_use_serial: false,
        smbios_sysinfo: true,
    };
    let mut secure_boot = false;
    let fw = vmi.spec.domain.firmware.as_ref();
    if let Some(bl) = fw.and_then(|f| f.bootloader.as_ref()) {
        match (&bl.bios, &bl.efi) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "spec.domain.firmware.bootloader",
                    "bios and efi are mutually exclusive",
                ))
            }
            (Some(b), None) => os.bios_use_serial = b.use_serial == Some(true),
            (None, Some(e)) => {
                secure_boot = e.secure_boot.unwrap_or(true);
                let fwp = &facts.firmware;
                let (code, vars) = if secure_boot {
                    (&fwp.efi_secure_code, &fwp.efi_secure_vars)
                } else {
                    (&fwp.efi_code, &fwp.efi_vars)
                };
                os.loader = Some(Loader {
                    path: code.clone(),
                    secure: secure_boot,
                });
                os.nvram = Some(Nvram {
                    path: facts.paths.nvram(&vmi.metadata.name),
                    template: vars.clone(),
                });
            }
            (None, None) => {}
        }
    }
    if let Some(kb) = fw.and_then(|f| f.kernel_boot.as_ref()) {
        let f = "spec.domain.firmware.kernelBoot";
        let c = kb
            .container
            .as_ref()
            .ok_or_else(|| err(format!("{f}.container"), "required"))?;
        if c.image.trim().is_empty() {
            return Err(err(format!("{f}.container.image"), "required"));
        }
        if c.kernel_path.is_none() && c.initrd_path.is_none() {
            return Err(err(
                format!("{f}.container"),
                "needs kernelPath, initrdPath or both",
            ));
        }
        let base = &facts.paths.kernel_boot_dir;
        if let Some(k) = &c.kernel_path {
            os.kernel = Some(
                disks::kernel_boot_artifact(base, k)
                    .map_err(|r| err(format!("{f}.container.kernelPath"), r))?,
            );
        }
        if let Some(i) = &c.initrd_path {
            os.initrd = Some(
                disks::kernel_boot_artifact(base, i)
                    .map_err(|r| err(format!("{f}.container.initrdPath"), r))?,
            );
        }
        if let Some(args) = &kb.kernel_args {
            if os.kernel.is_none() {
                return Err(err(
                    format!("{f}.kernelArgs"),
                    "kernel arguments need container.kernelPath",
                ));
            }
            check_text(&format!("{f}.kernelArgs"), args, 4096)?;
            os.cmdline = Some(args.clone());
        }
    }
    Ok((os, secure_boot))
}

fn features(vmi: &VirtualMachineInstance, secure_boot: bool) -> Result<Features, ConvertError> {
    let spec = vmi.spec.domain.features.clone().unwrap_or_default();
    let on = |s: &Option<FeatureState>| s.as_ref().is_some_and(FeatureState::on);
    let mut f = Features {
        acpi: spec.acpi.as_ref().is_none_or(FeatureState::on),
        apic: spec
            .apic
            .as_ref()
            .filter(|a| a.enabled.unwrap_or(true))
            .map(|a| a.end_of_interrupt),
        smm: on(&spec.smm) || secure_boot,
        hyperv: vec![],
        // KubeVirt (compute/hypervisor_features.go): `kvm: {}` emits hidden state='off'.
        kvm_hidden: spec.kvm.as_ref().map(|k| k.hidden.unwrap_or(false)),
        kvm_hint_dedicated: false,
        pvspinlock: spec.pvspinlock.as_ref().map(FeatureState::on),
        // KubeVirt (compute/hypervisor_features.go, amd64): vmport off once `features` is set.
        vmport_off: vmi.spec.domain.features.is_some(),
    };
    if secure_boot && spec.smm.as_ref().is_some_and(|s| !s.on()) {
        return Err(err(
            "spec.domain.features.smm.enabled",
            "EFI secure boot needs SMM; enable it or set firmware.bootloader.efi.secureBoot: false",
        ));
    }
    if let Some(h) = &spec.hyperv {
        let simple = |name: &'static str, s: &Option<FeatureState>| {
            s.as_ref().map(|s| HypervFeature {
                name,
                on: s.on(),
                attrs: vec![],
                direct: None,
            })
        };
        f.hyperv.extend(simple("relaxed", &h.relaxed));
        f.hyperv.extend(simple("vapic", &h.vapic));
        if let Some(s) = &h.spinlocks {
            let enabled = s.enabled.unwrap_or(true);
            let retries = s.spinlocks.unwrap_or(4096);
            if enabled && retries < 4096 {
                return Err(err(
                    "spec.domain.features.hyperv.spinlocks.spinlocks",
                    format!("{retries} is below the minimum 4096"),
                ));
            }
            f.hyperv.push(HypervFeature {
                name: "spinlocks",
                on: enabled,
                attrs: if enabled {
                    vec![("retries", retries.to_string())]
                } else {
                    vec![]
                },
                direct: None,
            });
        }
        f.hyperv.extend(simple("vpindex", &h.vpindex));
        f.hyperv.extend(simple("runtime", &h.runtime));
        f.hyperv.extend(simple("synic", &h.synic));
        if let Some(s) = &h.synictimer {
            f.hyperv.push(HypervFeature {
                name: "stimer",
                on: s.on(),
                attrs: vec![],
                direct: s.direct.as_ref().map(FeatureState::on),
            });
        }
        f.hyperv.extend(simple("reset", &h.reset));
        if let Some(v) = &h.vendorid {
            let enabled = v.enabled.unwrap_or(true);
            let id = v.vendorid.clone().unwrap_or_default();
            if enabled
                && (id.is_empty() || id.len() > 12 || !id.bytes().all(|c| c.is_ascii_graphic()))
            {
                return Err(err(
                    "spec.domain.features.hyperv.vendorid.vendorid",
                    "must be 1-12 printable ASCII characters",
                ));
            }
            f.hyperv.push(HypervFeature {
                name: "vendor_id",
                on: enabled,
                attrs: if enabled { vec![("value", id)] } else { vec![] },
                direct: None,
            });
        }
        f.hyperv.extend(simple("frequencies", &h.frequencies));
        f.hyperv
            .extend(simple("reenlightenment", &h.reenlightenment));
        f.hyperv.extend(simple("tlbflush", &h.tlbflush));
        f.hyperv.extend(simple("ipi", &h.ipi));
        f.hyperv.extend(simple("evmcs", &h.evmcs));
    }
    Ok(f)
}

fn clock(vmi: &VirtualMachineInstance) -> Result<Clock, ConvertError> {
    let Some(c) = &vmi.spec.domain.clock else {
        return Ok(Clock {
            offset: ClockOffset::Utc { adjustment: None },
            timers: vec![],
        });
    };
    let offset = match (&c.utc, &c.timezone) {
        (Some(_), Some(_)) => {
            return Err(err(
                "spec.domain.clock",
                "utc and timezone are mutually exclusive",
            ))
        }
        (_, Some(tz)) => {
            if tz.is_empty()
                || tz.len() > 64
                || !tz
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
            {
                return Err(err(
                    "spec.domain.clock.timezone",
                    format!("{tz:?} is not a time zone name"),
                ));
            }
            ClockOffset::Timezone(tz.clone())
        }
        (Some(u), None) => {
            if let Some(o) = u.offset_seconds {
                if o.unsigned_abs() > 100 * 365 * 86400 {
                    return Err(err(
                        "spec.domain.clock.utc.offsetSeconds",
                        format!("{o} is more than a century"),
                    ));
                }
            }
            ClockOffset::Utc {
                adjustment: u.offset_seconds,
            }
        }
        (None, None) => ClockOffset::Utc { adjustment: None },
    };
    let mut timers = Vec::new();
    if let Some(t) = &c.timer {
        for (name, libvirt_name, timer, ticks) in [
            (
                "hpet",
                "hpet",
                &t.hpet,
                &["delay", "catchup", "merge", "discard"][..],
            ),
            ("kvm", "kvmclock", &t.kvm, &[][..]),
            ("pit", "pit", &t.pit, &["delay", "catchup", "discard"][..]),
            ("rtc", "rtc", &t.rtc, &["delay", "catchup"][..]),
            ("hyperv", "hypervclock", &t.hyperv, &[][..]),
        ] {
            let Some(tm) = timer else { continue };
            let f = format!("spec.domain.clock.timer.{name}");
            if let Some(tp) = &tm.tick_policy {
                if !ticks.contains(&tp.as_str()) {
                    return Err(err(
                        format!("{f}.tickPolicy"),
                        format!("{tp:?} is not valid here (allowed: {})", ticks.join(", ")),
                    ));
                }
            }
            if let Some(tr) = &tm.track {
                if name != "rtc" || !matches!(tr.as_str(), "guest" | "wall") {
                    return Err(err(
                        format!("{f}.track"),
                        format!("{tr:?} is not guest or wall (rtc only)"),
                    ));
                }
            }
            timers.push(Timer {
                name: libvirt_name,
                present: Some(tm.present.unwrap_or(true)),
                tickpolicy: tm.tick_policy.clone(),
                track: tm.track.clone(),
            });
        }
    }
    Ok(Clock { offset, timers })
}

fn interfaces(
    vmi: &VirtualMachineInstance,
    facts: &PodFacts,
    disk_boot_orders: &[(u32, String)],
) -> Result<Vec<Interface>, ConvertError> {
    let virtio_model = if vmi.spec.domain.devices.use_virtio_transitional == Some(true) {
        "virtio-transitional"
    } else {
        "virtio-non-transitional"
    };
    let mut networks = std::collections::BTreeMap::new();
    for (i, n) in vmi.spec.networks.iter().enumerate() {
        let f = format!("spec.networks[{i}]");
        if !is_dns1123_label(&n.name) {
            return Err(err(
                format!("{f}.name"),
                format!("{:?} is not a DNS-1123 label", n.name),
            ));
        }
        if n.pod.is_none() && n.multus.is_none() {
            return Err(err(f, "needs pod or multus"));
        }
        if networks.insert(n.name.as_str(), i).is_some() {
            return Err(err(
                format!("{f}.name"),
                format!("network name {:?} is used twice", n.name),
            ));
        }
    }
    for (i, n) in vmi.spec.networks.iter().enumerate() {
        if !vmi
            .spec
            .domain
            .devices
            .interfaces
            .iter()
            .any(|ifc| ifc.name == n.name)
        {
            return Err(err(
                format!("spec.networks[{i}].name"),
                format!(
                    "no interface named {:?} in spec.domain.devices.interfaces",
                    n.name
                ),
            ));
        }
    }
    let mut orders: std::collections::BTreeMap<u32, String> = disk_boot_orders
        .iter()
        .map(|(o, f)| (*o, f.clone()))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut macs = std::collections::BTreeMap::new();
    let vmi_key = vmi.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            vmi.metadata.namespace.as_deref().unwrap_or_default(),
            vmi.metadata.name
        )
    });
    let mut out = Vec::new();
    for (i, ifc) in vmi.spec.domain.devices.interfaces.iter().enumerate() {
        let f = format!("spec.domain.devices.interfaces[{i}]");
        if !is_dns1123_label(&ifc.name) {
            return Err(err(
                format!("{f}.name"),
                format!("{:?} is not a DNS-1123 label", ifc.name),
            ));
        }
        if !seen.insert(ifc.name.as_str()) {
            return Err(err(
                format!("{f}.name"),
                format!("interface name {:?} is used twice", ifc.name),
            ));
        }
        if !networks.contains_key(ifc.name.as_str()) {
            return Err(err(
                format!("{f}.name"),
                format!("no network named {:?} in spec.networks", ifc.name),
            ));
        }
        let net = &vmi.spec.networks[networks[ifc.name.as_str()]];
        let attachment = if ifc.masquerade.is_some() || ifc.bridge.is_some() {
            let multus = net.pod.is_none();
            if multus && ifc.masquerade.is_some() {
                return Err(err(
                    format!("{f}.masquerade"),
                    format!(
                        "masquerade works on the pod network only; network {:?} is a multus network",
                        ifc.name
                    ),
                ));
            }
            let ports = interface_ports(&f, ifc)?;
            match &facts.standalone_network {
                Some(_) if multus => {
                    return Err(err(
                        format!("{f}.name"),
                        format!(
                            "network {:?} is a multus network: it needs KubeVirt's pod network (not standalone)",
                            ifc.name
                        ),
                    ))
                }
                Some(sn) if ifc.masquerade.is_some() => standalone_user(sn, &ports),
                Some(sn) => match &sn.host_bridge {
                    Some(b) => Attachment::Bridge(b.clone()),
                    None => {
                        return Err(err(
                            format!("{f}.bridge"),
                            format!(
                                "interface {:?}: a bridge binding standalone needs a host bridge (--host-bridge NAME)",
                                ifc.name
                            ),
                        ))
                    }
                },
                None => {
                    let pod_iface = names::pod_interface_name(
                        &ifc.name,
                        multus,
                        status_pod_interface(vmi, &ifc.name)?.as_deref(),
                    );
                    Attachment::Tap(names::tap_name(&pod_iface, multus))
                }
            }
        } else if ifc.passt_binding.is_some() {
            if net.pod.is_none() {
                return Err(err(
                    format!("{f}.passtBinding"),
                    format!(
                        "passtBinding works on the pod network only; network {:?} is not one",
                        ifc.name
                    ),
                ));
            }
            match &facts.standalone_network {
                // Standalone, no pod: passt in socket mode, as for masquerade (the same
                // network for the guest; the ports forwarded only when listed or published).
                Some(sn) => standalone_user(sn, &interface_ports(&f, ifc)?),
                None => passt_attachment(vmi, facts, i, ifc)?,
            }
        } else if ifc.sriov.is_some() {
            return Err(err(
                format!("{f}.sriov"),
                "SR-IOV interfaces are not supported by this launcher (host devices are not handed to it)",
            ));
        } else if ifc.slirp.is_some() {
            return Err(err(
                format!("{f}.slirp"),
                "slirp was removed from KubeVirt; use masquerade",
            ));
        } else if ifc.passt.is_some() {
            return Err(err(
                format!("{f}.passt"),
                "the passt binding was discontinued in KubeVirt 1.3; use passtBinding: {}",
            ));
        } else if ifc.binding.is_some() {
            return Err(err(
                format!("{f}.binding"),
                "network binding plugins are not supported; use masquerade, bridge or passtBinding",
            ));
        } else {
            return Err(err(
                f,
                "needs a binding: masquerade, bridge or passtBinding",
            ));
        };
        let model = match ifc.model.as_deref().unwrap_or("virtio") {
            "virtio" => virtio_model.to_string(),
            m @ ("e1000" | "e1000e" | "igb" | "ne2k_pci" | "pcnet" | "rtl8139") => m.to_string(),
            other => {
                return Err(err(
                    format!("{f}.model"),
                    format!(
                    "{other:?} is not one of virtio, e1000, e1000e, igb, ne2k_pci, pcnet, rtl8139"
                ),
                ))
            }
        };
        let mac = match &ifc.mac_address {
            Some(mac) => {
                let parts: Vec<&str> = mac.split([':', '-']).collect();
                if parts.len() != 6
                    || !parts
                        .iter()
                        .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
                {
                    return Err(err(
                        format!("{f}.macAddress"),
                        format!("{mac:?} is not a MAC address"),
                    ));
                }
                let first = u8::from_str_radix(parts[0], 16).unwrap_or_default();
                if first & 1 == 1 {
                    return Err(err(
                        format!("{f}.macAddress"),
                        format!("{mac:?} is a multicast address"),
                    ));
                }
                mac.replace('-', ":").to_ascii_lowercase()
            }
            None => match facts.interface_macs.get(&ifc.name) {
                Some(m) if matches!(attachment, Attachment::Tap(_)) => m.clone(),
                _ => names::stable_mac(&vmi_key, &ifc.name),
            },
        };
        if let Some(prev) = macs.insert(mac.clone(), format!("{f}.macAddress")) {
            return Err(err(
                format!("{f}.macAddress"),
                format!(
                    "{mac} is already the MAC of {}",
                    prev.trim_end_matches(".macAddress")
                ),
            ));
        }
        if let Some(m) = ifc.mtu {
            if !(68..=65535).contains(&m) {
                return Err(err(
                    format!("{f}.mtu"),
                    format!("{m} is out of range (68..65535)"),
                ));
            }
        }
        let boot_order = match ifc.boot_order {
            None => None,
            Some(o) => {
                let bf = format!("{f}.bootOrder");
                let o = u32::try_from(o)
                    .ok()
                    .filter(|o| *o >= 1)
                    .ok_or_else(|| err(&bf, format!("{o} is not a positive integer")))?;
                if let Some(prev) = orders.insert(o, bf.clone()) {
                    return Err(err(
                        bf,
                        format!(
                            "bootOrder {o} is already used by {}",
                            prev.trim_end_matches(".bootOrder")
                        ),
                    ));
                }
                Some(o)
            }
        };
        let mtu = match (&attachment, ifc.mtu) {
            (_, Some(m)) => Some(m),
            (Attachment::Tap(_), None) => facts.interface_mtus.get(&ifc.name).copied(),
            _ => None,
        };
        out.push(Interface {
            pci_slot: None,
            alias: format!("ua-{}", ifc.name),
            mac: Some(mac),
            attachment,
            model,
            mtu,
            // As KubeVirt: no option ROM unless the interface boots (iPXE is not wanted).
            rom_off: boot_order.is_none(),
            boot_order,
        });
    }
    Ok(out)
}

/// An interface's `ports` (masquerade, passt) as (protocol, port), checked: TCP or UDP, the
/// port in 1..65535.
fn interface_ports(
    f: &str,
    ifc: &crate::spec::Interface,
) -> Result<Vec<(&'static str, u16)>, ConvertError> {
    let mut out = Vec::new();
    for (j, port) in ifc.ports.iter().enumerate() {
        let pf = format!("{f}.ports[{j}]");
        let p = u16::try_from(port.port)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| {
                err(
                    format!("{pf}.port"),
                    format!("{} is out of range (1..65535)", port.port),
                )
            })?;
        let proto = match port.protocol.as_deref() {
            None | Some("") => "tcp",
            Some(x) if x.eq_ignore_ascii_case("tcp") => "tcp",
            Some(x) if x.eq_ignore_ascii_case("udp") => "udp",
            Some(x) => {
                return Err(err(
                    format!("{pf}.protocol"),
                    format!("{x:?} is not TCP or UDP"),
                ))
            }
        };
        out.push((proto, p));
    }
    Ok(out)
}

/// The standalone pod network: libvirt's passt back-end in socket mode, forwarding the
/// interface's `ports` (host port = guest port) and the `--publish`ed ones. Nothing is
/// forwarded unless asked for (on a shared host, every port of the host is not the VM's).
fn standalone_user(sn: &facts::StandaloneNetwork, ports: &[(&'static str, u16)]) -> Attachment {
    let mut port_forwards = Vec::new();
    for proto in ["tcp", "udp"] {
        let mut ranges: Vec<PortRange> = ports
            .iter()
            .filter(|(p, _)| *p == proto)
            .map(|(_, port)| PortRange {
                start: *port,
                to: None,
                exclude: false,
            })
            .collect();
        ranges.extend(
            sn.publish
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| PortRange {
                    start: p.host,
                    to: (p.guest != p.host).then_some(p.guest),
                    exclude: false,
                }),
        );
        if !ranges.is_empty() {
            port_forwards.push(PortForward { proto, ranges });
        }
    }
    Attachment::User {
        log_file: sn.passt_log.clone(),
        port_forwards,
    }
}

/// The pod interface name the VMI status recorded for interface `name` (KubeVirt keeps the
/// primary network's there), checked to be an interface name.
fn status_pod_interface(
    vmi: &VirtualMachineInstance,
    name: &str,
) -> Result<Option<String>, ConvertError> {
    let Some((k, dev)) = vmi.status.as_ref().and_then(|s| {
        s.interfaces
            .iter()
            .enumerate()
            .find(|(_, st)| st.name.as_deref() == Some(name))
            .and_then(|(k, st)| Some((k, st.pod_interface_name.as_deref()?)))
    }) else {
        return Ok(None);
    };
    if dev.is_empty() {
        return Ok(None);
    }
    if !is_interface_name(dev) {
        return Err(err(
            format!("status.interfaces[{k}].podInterfaceName"),
            format!("{dev:?} is not a network interface name"),
        ));
    }
    Ok(Some(dev.to_string()))
}

/// A Linux network interface name: 1..=15 of `[A-Za-z0-9._-]`.
fn is_interface_name(dev: &str) -> bool {
    !dev.is_empty()
        && dev.len() <= 15
        && dev
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Envoy's ports, kept from the guest when Istio injects its proxy (KubeVirt
/// pkg/network/istio/ports.go ReservedPorts).
const ISTIO_RESERVED_PORTS: [u16; 10] = [
    15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090,
];

/// A `passtBinding` interface as KubeVirt's converter writes it (converter/network/
/// configurator.go passtBindingOptions, passt.go generatePasstPortForward): vhost-user with
/// libvirt's passt back-end on the pod interface named in `status.interfaces` (`eth0`, the pod
/// network's interface, when the status does not name one: a standalone VMI has no status), its
/// log in the pod's `passt.log`, and the interface's `ports` forwarded (every TCP and UDP port
/// when none is listed; Envoy's ports excluded under Istio).
fn passt_attachment(
    vmi: &VirtualMachineInstance,
    facts: &PodFacts,
    index: usize,
    ifc: &crate::spec::Interface,
) -> Result<Attachment, ConvertError> {
    let f = format!("spec.domain.devices.interfaces[{index}]");
    let status = vmi.status.as_ref().and_then(|s| {
        s.interfaces
            .iter()
            .enumerate()
            .find(|(_, st)| st.name.as_deref() == Some(ifc.name.as_str()))
            .and_then(|(k, st)| Some((k, st.pod_interface_name.as_deref()?)))
    });
    let source_dev = match status {
        None => "eth0".to_string(),
        Some((k, dev)) => {
            let ok = !dev.is_empty()
                && dev.len() <= 15
                && dev
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !ok {
                return Err(err(
                    format!("status.interfaces[{k}].podInterfaceName"),
                    format!("{dev:?} is not a network interface name"),
                ));
            }
            dev.to_string()
        }
    };
    let istio = vmi
        .metadata
        .annotations
        .get("sidecar.istio.io/inject")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let mut tcp: Vec<PortRange> = Vec::new();
    let mut udp: Vec<PortRange> = Vec::new();
    if istio {
        tcp.extend(ISTIO_RESERVED_PORTS.iter().map(|p| PortRange {
            start: *p,
            to: None,
            exclude: true,
        }));
    }
    for (proto, start) in interface_ports(&f, ifc)? {
        let range = PortRange {
            start,
            to: None,
            exclude: false,
        };
        match proto {
            "udp" => udp.push(range),
            _ => tcp.push(range),
        }
    }
    let mut port_forwards = Vec::new();
    if tcp.is_empty() && udp.is_empty() {
        port_forwards.push(PortForward {
            proto: "tcp",
            ranges: vec![],
        });
        port_forwards.push(PortForward {
            proto: "udp",
            ranges: vec![],
        });
    }
    if !tcp.is_empty() {
        port_forwards.push(PortForward {
            proto: "tcp",
            ranges: tcp,
        });
    }
    if !udp.is_empty() {
        port_forwards.push(PortForward {
            proto: "udp",
            ranges: udp,
        });
    }
    Ok(Attachment::Passt {
        source_dev,
        log_file: facts.paths.passt_log.clone(),
        port_forwards,
    })
}

fn inputs(vmi: &VirtualMachineInstance) -> Result<Vec<Input>, ConvertError> {
    let mut out = Vec::new();
    for (i, inp) in vmi.spec.domain.devices.inputs.iter().enumerate() {
        let f = format!("spec.domain.devices.inputs[{i}]");
        if !is_dns1123_label(&inp.name) {
            return Err(err(
                format!("{f}.name"),
                format!("{:?} is not a DNS-1123 label", inp.name),
            ));
        }
        if inp.input_type != "tablet" {
            return Err(err(
                format!("{f}.type"),
                format!("{:?} is not supported (tablet only)", inp.input_type),
            ));
        }
        let bus = match inp.bus.as_deref().unwrap_or("usb") {
            b @ ("usb" | "virtio") => b,
            other => {
                return Err(err(
                    format!("{f}.bus"),
                    format!("{other:?} is not usb or virtio"),
                ))
            }
        };
        out.push(Input {
            pci_slot: None,
            kind: inp.input_type.clone(),
            bus: bus.to_string(),
            alias: format!("ua-{}", inp.name),
        });
    }
    Ok(out)
}

fn spare_root_ports(vmi: &VirtualMachineInstance, facts: &PodFacts) -> Result<u32, ConvertError> {
    match vmi.metadata.annotations.get(SPARE_ROOT_PORTS_ANNOTATION) {
        None => Ok(facts.spare_root_ports.min(MAX_SPARE_ROOT_PORTS)),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_SPARE_ROOT_PORTS)
            .ok_or_else(|| {
                err(
                    format!("metadata.annotations[{SPARE_ROOT_PORTS_ANNOTATION}]"),
                    format!("{v:?} is not a number between 0 and {MAX_SPARE_ROOT_PORTS}"),
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(cpu: serde_json::Value) -> VirtualMachineInstance {
        let vmi = serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "t"},
            "spec": {"domain": {"cpu": cpu, "resources": {"requests": {"memory": "1Gi"}},
                "devices": {}}}
        });
        crate::spec::from_str(&vmi.to_string(), "t").expect("vmi")
    }

    /// Only sockets change while a VM runs, up to the maxSockets it started with.
    #[test]
    fn a_running_vms_cpu_changes_only_in_sockets_up_to_max_sockets() {
        let hp = vmi(serde_json::json!({"sockets": 1, "cores": 2, "maxSockets": 3}));
        let t = vcpu_topology(&hp).unwrap();
        assert_eq!((t.online(), t.max()), (2, 6));
        let with = |cpu| check_running_cpu(&hp, &vmi(cpu)).map_err(|e| e.field);
        assert_eq!(
            with(serde_json::json!({"sockets": 3, "cores": 2, "maxSockets": 3})),
            Ok(())
        );
        // More than maxSockets: the sockets are named, even with a maxSockets to match.
        assert_eq!(
            with(serde_json::json!({"sockets": 4, "cores": 2, "maxSockets": 4})),
            Err("spec.domain.cpu.sockets".into())
        );
        assert_eq!(
            with(serde_json::json!({"sockets": 2, "cores": 1, "maxSockets": 3})),
            Err("spec.domain.cpu.cores".into())
        );
        assert_eq!(
            with(serde_json::json!({"sockets": 2, "cores": 2, "threads": 2, "maxSockets": 3})),
            Err("spec.domain.cpu.threads".into())
        );
        // Memory does not change while the VM runs.
        let m = |g: &str| {
            let mut v = hp.clone();
            v.spec.domain.memory =
                Some(serde_json::from_value(serde_json::json!({"guest": g})).unwrap());
            v
        };
        assert_eq!(check_running_memory(&hp, &m("1Gi")), Ok(()));
        assert_eq!(
            check_running_memory(&hp, &m("2Gi")).map_err(|e| e.field),
            Err("spec.domain.memory.guest".into())
        );
        // Started without maxSockets: no socket change.
        let fixed = vmi(serde_json::json!({"sockets": 2}));
        assert_eq!(
            check_running_cpu(&fixed, &vmi(serde_json::json!({"sockets": 3}))).map_err(|e| e.field),
            Err("spec.domain.cpu.sockets".into())
        );
        assert_eq!(
            check_running_cpu(&fixed, &vmi(serde_json::json!({"sockets": 2}))),
            Ok(())
        );
        // Dedicated CPUs: no hot-plug (the plugged vCPU would run unpinned).
        let pinned = |s: u32| {
            vmi(serde_json::json!({"sockets": s, "maxSockets": 4, "dedicatedCpuPlacement": true}))
        };
        assert_eq!(check_running_cpu(&pinned(2), &pinned(2)), Ok(()));
        let e = check_running_cpu(&pinned(2), &pinned(3)).unwrap_err();
        assert_eq!(e.field, "spec.domain.cpu.sockets");
        assert!(e.reason.contains("dedicatedCpuPlacement"), "{e}");
    }
}
