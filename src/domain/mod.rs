//! Typed libvirt domain model (write side) and its XML form, plus [`live`], a lenient parser for
//! libvirt's own `dumpxml` output (read side, every field optional).
//!
//! The writer is a small hand-written serialiser over the typed model ([`Domain::to_xml`]): every
//! attribute value and text node is escaped; characters XML 1.0 cannot carry (NUL and other C0
//! controls) are replaced by U+FFFD. The converter rejects such input anyway, so the replacement
//! only guarantees that the output is always well-formed XML.

pub mod live;
mod xml;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// libvirt domain type: `kvm` (hardware) or `qemu` (TCG emulation, e.g. nested CI without /dev/kvm).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    #[default]
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Domain {
    pub domain_type: DomainType,
    pub name: String,
    pub uuid: Option<String>,
    /// `<metadata><kubevirt xmlns="http://kubevirt.io"><uid>` as KubeVirt writes it.
    pub kubevirt_uid: Option<String>,
    pub memory: Memory,
    pub vcpus: u32,
    /// CPU hot-plug (`maxSockets`): `<vcpus>` lists every vCPU; the first `enabled` are on,
    /// those from `fixed` on are hot-pluggable.
    pub vcpu_hotplug: Option<VcpuHotplug>,
    /// Number of `<iothreads>`; 0 means none.
    pub iothreads: u32,
    /// `<cputune>`: vCPU, emulator and iothread pinning (`dedicatedCpuPlacement`).
    pub cputune: Option<CpuTune>,
    pub cpu: Cpu,
    pub os: Os,
    pub sysinfo: Option<Sysinfo>,
    pub features: Features,
    pub clock: Clock,
    pub on_poweroff: &'static str,
    pub on_reboot: &'static str,
    pub on_crash: &'static str,
    pub devices: Devices,
}

impl Domain {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// libvirt domain XML.
    pub fn to_xml(&self) -> String {
        xml::write_domain(self)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memory {
    pub kib: u64,
    /// Memory hot-plug (`memory.maxGuest`): `<maxMemory slots='0'>`, what the memory may grow
    /// to while the VM runs.
    pub max_kib: Option<u64>,
    /// Hugepage size in KiB when the guest is backed by hugepages.
    pub hugepage_kib: Option<u64>,
    /// `<memoryBacking><source type='memfd'/>` and a single NUMA cell holding all vCPUs and
    /// memory (KubeVirt's synthetic NUMA: memfd needs a NUMA topology).
    pub memfd: bool,
    /// `<memoryBacking><access mode='shared'/>`: guest memory another process can map, as
    /// vhost-user back-ends (passt) need.
    pub shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuMode {
    HostModel,
    HostPassthrough,
    /// A named model (`<cpu mode='custom' match='exact'>`).
    Custom(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub mode: CpuMode,
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    /// `(policy, name)`.
    pub features: Vec<(String, String)>,
    /// Emitted as an XML comment inside `<cpu>` to explain a non-obvious choice.
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Os {
    pub arch: String,
    pub machine: String,
    pub loader: Option<Loader>,
    pub nvram: Option<Nvram>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub bios_use_serial: bool,
    /// `<smbios mode='sysinfo'/>` (pairs with [`Domain::sysinfo`]).
    pub smbios_sysinfo: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loader {
    pub path: PathBuf,
    pub secure: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nvram {
    pub path: PathBuf,
    pub template: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysinfo {
    /// `<system><entry name='..'>..</entry>`.
    pub system: Vec<(String, String)>,
    /// `<chassis><entry name='..'>..</entry>` (`spec.domain.chassis`).
    pub chassis: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub acpi: bool,
    /// `Some(eoi)` emits `<apic/>` (with `eoi='on|off'` when set).
    pub apic: Option<Option<bool>>,
    pub smm: bool,
    pub hyperv: Vec<HypervFeature>,
    /// `<kvm><hidden state=…/></kvm>`.
    pub kvm_hidden: Option<bool>,
    /// `<kvm><hint-dedicated state='on'/></kvm>` (dedicated vCPUs).
    pub kvm_hint_dedicated: bool,
    /// `<pvspinlock state=…/>`.
    pub pvspinlock: Option<bool>,
    /// `<vmport state='off'/>` (KubeVirt on x86 when the VMI has `features`).
    pub vmport_off: bool,
}

/// `<cputune>`: each entry is `(id, cpuset)` with the cpuset as libvirt writes it (`3`, `2,3`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTune {
    /// `<vcpupin vcpu=… cpuset=…/>`.
    pub vcpupin: Vec<(u32, String)>,
    /// `<emulatorpin cpuset=…/>`.
    pub emulatorpin: Option<String>,
    /// `<iothreadpin iothread=… cpuset=…/>`.
    pub iothreadpin: Vec<(u32, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuHotplug {
    pub enabled: u32,
    pub fixed: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HypervFeature {
    pub name: &'static str,
    pub on: bool,
    /// Extra attributes (`retries`, `value`).
    pub attrs: Vec<(&'static str, String)>,
    /// `<stimer><direct state=.../></stimer>`
    pub direct: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClockOffset {
    Utc { adjustment: Option<i64> },
    Timezone(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clock {
    pub offset: ClockOffset,
    pub timers: Vec<Timer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer {
    pub name: &'static str,
    pub present: Option<bool>,
    pub tickpolicy: Option<String>,
    pub track: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    pub disks: Vec<Disk>,
    pub controllers: Vec<Controller>,
    pub interfaces: Vec<Interface>,
    pub serials: Vec<Serial>,
    pub consoles: Vec<Console>,
    pub channels: Vec<Channel>,
    pub graphics: Vec<Graphics>,
    pub videos: Vec<Video>,
    pub inputs: Vec<Input>,
    pub memballoon: Option<Memballoon>,
    pub rngs: Vec<Rng>,
    pub watchdogs: Vec<Watchdog>,
    pub sounds: Vec<Sound>,
}

/// `<watchdog model=… action=…>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watchdog {
    pub model: &'static str,
    pub action: &'static str,
    pub alias: String,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
}

/// `<sound model=…>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sound {
    pub model: &'static str,
    pub alias: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDevice {
    Disk,
    Cdrom,
    Lun,
}

impl DiskDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
            DiskDevice::Lun => "lun",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    File(PathBuf),
    Block(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    pub format: &'static str,
    pub cache: Option<String>,
    pub io: Option<String>,
    pub error_policy: Option<String>,
    pub discard: Option<&'static str>,
    pub iothread: Option<u32>,
    /// `<driver><iothreads><iothread id=…/>…</iothreads></driver>`: the disk's queues are
    /// spread over these iothreads (KubeVirt's `supplementalPool`; libvirt ≥ 10, QEMU ≥ 9).
    /// Exclusive with [`Driver::iothread`].
    pub iothread_pool: Vec<u32>,
    pub queues: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingStore {
    pub format: &'static str,
    pub source: DiskSource,
}

/// `<source><dataStore>`: the raw image a qcow2 image keeps its data in (its `data-file`).
/// Changed-block tracking puts a volume behind such a qcow2 overlay so that the bitmaps live in
/// the overlay while the data stays in the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataStore {
    pub format: &'static str,
    pub source: DiskSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub device: DiskDevice,
    pub source: DiskSource,
    /// Only with a file source in qcow2 format (see [`DataStore`]).
    pub data_store: Option<DataStore>,
    pub driver: Driver,
    pub backing_store: Option<BackingStore>,
    pub target_dev: String,
    pub bus: String,
    /// cdrom tray: `open` / `closed`.
    pub tray: Option<String>,
    /// virtio disk model (`virtio-non-transitional`).
    pub model: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    pub serial: Option<String>,
    pub boot_order: Option<u32>,
    pub alias: String,
    pub blockio: Option<BlockIo>,
    /// Persistent reservations through the pr-helper socket (`lun` only).
    pub reservations: Option<PathBuf>,
    /// `<address type='drive' …/>` (scsi disks and luns) or `<address type='pci' …/>`
    /// (a virtio disk's `pciAddress`).
    pub address: Option<DiskAddress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskAddress {
    Drive(DriveAddress),
    /// `domain:bus:slot.function`.
    Pci {
        domain: u16,
        bus: u8,
        slot: u8,
        function: u8,
    },
}

/// A drive address on a disk controller. KubeVirt puts every scsi disk and lun on the
/// virtio-scsi controller 0, bus 0, unit = the index of its `sd*` name: libvirt's own choice
/// would move `sdh` onward to a second, auto-added lsilogic controller (7 units per controller),
/// which a running guest has no PCI slot for.
/// `<blockio logical_block_size=… physical_block_size=… discard_granularity=…/>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIo {
    pub logical: u64,
    pub physical: u64,
    pub discard_granularity: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriveAddress {
    pub controller: u32,
    pub bus: u32,
    pub unit: u32,
}

/// Escapes a string for an XML attribute value.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    xml::escape(s, &mut out);
    out
}

impl Disk {
    /// The disk as a single `<disk>` element (for hot-plug).
    pub fn to_xml(&self) -> String {
        xml::write_single_disk(self)
    }

    /// The VMI volume behind the disk (from its `ua-<volume>` alias).
    pub fn volume(&self) -> &str {
        self.alias.strip_prefix("ua-").unwrap_or(&self.alias)
    }

    /// The backing file or device.
    pub fn source_path(&self) -> &Path {
        match &self.source {
            DiskSource::File(p) | DiskSource::Block(p) => p,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    pub kind: &'static str,
    pub index: Option<u32>,
    pub model: Option<String>,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
    /// `<driver iothread=… queues=…/>` (the virtio-scsi controller under an iothreads policy).
    pub driver: Option<ControllerDriver>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerDriver {
    pub iothread: u32,
    pub queues: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub alias: String,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
    pub mac: Option<String>,
    pub attachment: Attachment,
    pub model: String,
    pub mtu: Option<u32>,
    pub boot_order: Option<u32>,
    /// `<rom enabled='no'/>`: no option ROM (KubeVirt's choice for an interface that does not boot).
    pub rom_off: bool,
}

/// How an interface reaches the pod network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// `<interface type='ethernet'>` on a tap the pod network code created (`managed='no'`).
    Tap(String),
    /// `<interface type='vhostuser'>` with `<backend type='passt'>`: libvirt starts passt
    /// (vhost-user mode, libvirt ≥ 11.1) bound to the pod interface `source_dev`. Needs shared
    /// guest memory ([`Memory::shared`]).
    Passt {
        source_dev: String,
        log_file: PathBuf,
        port_forwards: Vec<PortForward>,
    },
    /// `<interface type='user'>` with `<backend type='passt'>`: libvirt starts passt in its
    /// socket mode (standalone: user-mode networking on the host's connection), forwarding
    /// `port_forwards` from the host.
    User {
        log_file: PathBuf,
        port_forwards: Vec<PortForward>,
    },
    /// `<interface type='bridge'>` on an existing host bridge (standalone bridge binding).
    Bridge(String),
}

impl Attachment {
    /// libvirt's interface type.
    pub fn kind(&self) -> &'static str {
        match self {
            Attachment::Tap(_) => "ethernet",
            Attachment::Passt { .. } => "vhostuser",
            Attachment::User { .. } => "user",
            Attachment::Bridge(_) => "bridge",
        }
    }
}

/// `<portForward proto=…>`: with no ranges, every port of that protocol is forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub proto: &'static str,
    pub ranges: Vec<PortRange>,
}

/// `<range start=… [exclude='yes']/>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    /// The guest's port when it differs from the host's (`to=`).
    pub to: Option<u16>,
    pub exclude: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serial {
    pub socket: PathBuf,
    pub log: Option<PathBuf>,
    pub port: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Console {
    pub port: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    pub socket: PathBuf,
    pub target_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graphics {
    pub vnc_socket: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Video {
    pub model: String,
    pub heads: u32,
    pub vram: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub kind: String,
    pub bus: String,
    pub alias: String,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memballoon {
    pub model: String,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
    pub stats_period: Option<u32>,
    /// `freePageReporting='on|off'` (KubeVirt sets it on every virtio balloon).
    pub free_page_reporting: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    pub model: String,
    pub backend: PathBuf,
    /// `<address type='pci' bus='0x00' slot=…>` on the root complex (KubeVirt's
    /// placePCIDevicesOnRootComplex annotation); None: libvirt places it.
    pub pci_slot: Option<u8>,
}
