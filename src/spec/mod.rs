//! The KubeVirt `kubevirt.io/v1` model, as far as the launcher needs it.
//!
//! Types are plain serde structs (camelCase, unknown fields ignored, almost everything optional)
//! so that any VMI a cluster accepts deserialises. Semantic validation (names, sizes, buses) is
//! the converter's job (module `convert`), which names the offending field path.
//!
//! [`load_file`] / [`from_str`] accept JSON or YAML (one or several YAML documents; the first
//! `VirtualMachineInstance` or `VirtualMachine` document is used). For a `VirtualMachine` its
//! `spec.template` becomes the VMI; name, namespace and uid come from the VM's metadata when the
//! template lacks them.

pub mod cdi;
pub mod fields;
mod kubevirt_fields;
mod manifest;
mod quantity;

pub use fields::UnknownFields;
pub use manifest::{Manifest, MAX_FLOW_DEPTH};
pub use quantity::{parse_quantity, Quantity, QuantityError};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// API versions whose VMI/VM shape we understand.
pub const API_VERSIONS: &[&str] = &["kubevirt.io/v1", "kubevirt.io/v1alpha3"];

/// Errors loading a VMI document. Every message names the origin (file) and, where known, the field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not valid JSON/YAML: {reason}")]
    Syntax { origin: String, reason: String },
    #[error("{origin}: {size} bytes: a manifest may be at most {} bytes (4 MiB; a KubeVirt object is at most ~1.5 MiB)", manifest::MAX_MANIFEST_BYTES)]
    TooLarge { origin: String, size: u64 },
    #[error("{origin}: no VirtualMachineInstance or VirtualMachine document found")]
    Empty { origin: String },
    #[error("{origin}: unsupported apiVersion {api_version:?} / kind {kind:?} (want kubevirt.io/v1 VirtualMachineInstance or VirtualMachine)")]
    UnknownKind {
        origin: String,
        api_version: String,
        kind: String,
    },
    #[error("{origin}: field {field}: {reason}")]
    Field {
        origin: String,
        field: String,
        reason: String,
    },
    /// Fields that are not read: unknown to KubeVirt, or not supported here (see [`fields`]).
    #[error("{origin}: {}", fields_text(problems))]
    Fields {
        origin: String,
        problems: Vec<fields::Problem>,
    },
}

fn fields_text(problems: &[fields::Problem]) -> String {
    let mut text: Vec<String> = problems
        .iter()
        .map(|p| format!("field {}: {}", p.path(), p.reason()))
        .collect();
    if problems
        .iter()
        .any(|p| matches!(p, fields::Problem::Unknown { .. }))
    {
        text.push(
            "--allow-unknown-fields runs it anyway (a warning per unknown field)".to_string(),
        );
    }
    text.join("; ")
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualMachineInstance {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: VmiSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<VmiStatus>,
    /// What virt-handler's Sync options (`VirtualMachineOptions`) tell the converter; not
    /// part of the VMI document.
    #[serde(skip)]
    pub handler_options: Option<HandlerOptions>,
    /// Read from a VirtualMachine's `spec.template`: messages name its fields as the user
    /// wrote them ([`VirtualMachineInstance::user_text`]).
    #[serde(skip)]
    pub from_vm: bool,
}

/// The parts of virt-handler's `VirtualMachineOptions` the converter honours, as KubeVirt's
/// converter does (converter.go: SMBios, MemBalloonStatsPeriod, clusterConfig flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HandlerOptions {
    /// Cluster-wide SMBIOS system information (`spec.configuration.smbios`).
    pub smbios: Option<Smbios>,
    /// Balloon statistics period in seconds; 0: no statistics.
    pub mem_balloon_stats_period: u32,
    pub free_page_reporting_disabled: bool,
    pub serial_console_log_disabled: bool,
    /// clusterConfig's BochsDisplayForEFIGuests: an EFI guest's display is `bochs`, not `vga`.
    pub bochs_display_for_efi_guests: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Smbios {
    pub manufacturer: String,
    pub product: String,
    pub version: String,
    pub sku: String,
    pub family: String,
}

impl VirtualMachineInstance {
    /// `text` (an error, a warning) with the VMI's field paths as the user wrote them: for a
    /// VM, `spec.domain.cpu` is `spec.template.spec.domain.cpu`.
    pub fn user_text(&self, text: &str) -> String {
        if !self.from_vm {
            return text.to_string();
        }
        fields::template_paths(text)
    }

    /// `spec.terminationGracePeriodSeconds`, default 30 s (KubeVirt's default for VMs).
    pub fn termination_grace_period(&self) -> Duration {
        Duration::from_secs(self.spec.termination_grace_period_seconds.unwrap_or(30))
    }

    /// Namespace, `default` when unset or empty.
    pub fn namespace(&self) -> &str {
        match self.metadata.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => "default",
        }
    }

    /// KubeVirt's libvirt domain name: `<namespace>_<name>`.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace(), self.metadata.name)
    }

    /// Is changed-block tracking on (status `Initializing` or `Enabled`)?
    pub fn cbt_applies(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.changed_block_tracking.as_ref())
            .is_some_and(ChangedBlockTrackingStatus::applies)
    }

    /// Did the VMI ask for dedicated CPUs (KubeVirt's `IsCPUDedicated`)?
    pub fn is_cpu_dedicated(&self) -> bool {
        self.spec
            .domain
            .cpu
            .as_ref()
            .is_some_and(|c| c.dedicated_cpu_placement == Some(true))
    }

    /// Does QEMU run as a non-root user (KubeVirt's `vmitrait.IsNonRoot`)?
    pub fn is_non_root(&self) -> bool {
        self.metadata
            .annotations
            .contains_key("kubevirt.io/nonroot")
            || self
                .status
                .as_ref()
                .and_then(|s| s.runtime_user)
                .is_some_and(|u| u != 0)
    }

    /// The volume status entry for `name`, if any.
    pub fn volume_status(&self, name: &str) -> Option<&VolumeStatus> {
        self.status
            .as_ref()
            .and_then(|s| s.volume_status.iter().find(|v| v.name == name))
    }

    /// KubeVirt's hot-plug rule, as virt-handler's VMIs carry it: a PVC or DataVolume volume is
    /// hot-plugged when its `status.volumeStatus` entry has `hotplugVolume`, whatever its
    /// `hotpluggable` flag says; that flag is set to match. Volumes without a status entry keep
    /// their flag. (Which hot-plugged disks are attached then follows the entry's phase:
    /// `MountedToPod` or `Ready`.)
    pub fn apply_volume_status_hotplug(&mut self) {
        let Some(status) = &self.status else {
            return;
        };
        for v in &mut self.spec.volumes {
            let Some(entry) = status.volume_status.iter().find(|e| e.name == v.name) else {
                continue;
            };
            let hotplug = Some(entry.hotplug_volume.is_some());
            if let Some(p) = &mut v.persistent_volume_claim {
                p.hotpluggable = hotplug;
            }
            if let Some(d) = &mut v.data_volume {
                d.hotpluggable = hotplug;
            }
        }
    }
}

/// A `VirtualMachine`: kept for `spec.template` and `spec.dataVolumeTemplates`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualMachine {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: VmSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VmSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    pub template: VmiTemplate,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data_volume_templates: Vec<DataVolumeTemplate>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VmiTemplate {
    pub metadata: ObjectMeta,
    pub spec: VmiSpec,
}

/// A CDI DataVolume template; its `spec` is kept verbatim for the importer issue.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataVolumeTemplate {
    pub metadata: ObjectMeta,
    pub spec: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VmiSpec {
    pub domain: DomainSpec,
    pub volumes: Vec<Volume>,
    pub networks: Vec<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DomainSpec {
    pub resources: ResourceRequirements,
    pub memory: Option<MemorySpec>,
    pub cpu: Option<CpuSpec>,
    pub machine: Option<Machine>,
    pub firmware: Option<Firmware>,
    pub clock: Option<Clock>,
    pub features: Option<Features>,
    pub devices: Devices,
    /// `shared`, `auto` or `supplementalPool`.
    pub io_threads_policy: Option<String>,
    /// `ioThreads.supplementalPoolThreadCount` for the `supplementalPool` policy.
    pub io_threads: Option<DiskIoThreads>,
    pub chassis: Option<Chassis>,
}

/// `spec.domain.chassis`: SMBIOS chassis information.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Chassis {
    pub manufacturer: Option<String>,
    pub version: Option<String>,
    pub serial: Option<String>,
    pub asset: Option<String>,
    pub sku: Option<String>,
}

/// `spec.domain.ioThreads`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DiskIoThreads {
    /// Size of the iothread pool every virtio disk's queues are spread over.
    pub supplemental_pool_thread_count: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceRequirements {
    pub requests: BTreeMap<String, Quantity>,
    pub limits: BTreeMap<String, Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MemorySpec {
    pub guest: Option<Quantity>,
    pub hugepages: Option<Hugepages>,
    /// Memory hot-plug: the most `guest` may grow to while the VM runs (`<maxMemory>`).
    pub max_guest: Option<Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Hugepages {
    pub page_size: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CpuSpec {
    pub cores: Option<u32>,
    pub sockets: Option<u32>,
    pub threads: Option<u32>,
    pub model: Option<String>,
    pub features: Vec<CpuFeature>,
    pub dedicated_cpu_placement: Option<bool>,
    /// With `dedicatedCpuPlacement`: the emulator thread gets a CPU of its own from the pod's
    /// CPU set (KubeVirt's `<emulatorpin>`).
    pub isolate_emulator_thread: Option<bool>,
    /// CPU hot-plug: the domain gets `maxSockets` sockets, of which `sockets` are enabled.
    pub max_sockets: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CpuFeature {
    pub name: String,
    pub policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Machine {
    #[serde(rename = "type")]
    pub machine_type: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Firmware {
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub bootloader: Option<Bootloader>,
    pub kernel_boot: Option<KernelBoot>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Bootloader {
    pub bios: Option<Bios>,
    pub efi: Option<Efi>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Bios {
    pub use_serial: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Efi {
    /// KubeVirt's default is `true` when `efi` is present.
    pub secure_boot: Option<bool>,
    pub persistent: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KernelBoot {
    pub kernel_args: Option<String>,
    pub container: Option<KernelBootContainer>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KernelBootContainer {
    pub image: String,
    pub kernel_path: Option<String>,
    pub initrd_path: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Clock {
    pub utc: Option<ClockUtc>,
    pub timezone: Option<String>,
    pub timer: Option<Timers>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClockUtc {
    pub offset_seconds: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Timers {
    pub hpet: Option<Timer>,
    pub kvm: Option<Timer>,
    pub pit: Option<Timer>,
    pub rtc: Option<Timer>,
    pub hyperv: Option<Timer>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Timer {
    pub present: Option<bool>,
    pub tick_policy: Option<String>,
    pub track: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Features {
    pub acpi: Option<FeatureState>,
    pub apic: Option<FeatureApic>,
    pub smm: Option<FeatureState>,
    pub hyperv: Option<FeatureHyperv>,
    /// `kvm.hidden`: hide the KVM signature from the guest.
    pub kvm: Option<FeatureKvm>,
    pub pvspinlock: Option<FeatureState>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureKvm {
    pub hidden: Option<bool>,
}

/// `hyperv.synictimer`: `{enabled, direct: {enabled}}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureSynicTimer {
    pub enabled: Option<bool>,
    pub direct: Option<FeatureState>,
}

impl FeatureSynicTimer {
    pub fn on(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
}

/// `{}` means enabled; `{enabled: false}` disables.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureState {
    pub enabled: Option<bool>,
}

impl FeatureState {
    pub fn on(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureApic {
    pub enabled: Option<bool>,
    pub end_of_interrupt: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureHyperv {
    pub relaxed: Option<FeatureState>,
    pub vapic: Option<FeatureState>,
    pub spinlocks: Option<FeatureSpinlocks>,
    pub vpindex: Option<FeatureState>,
    pub runtime: Option<FeatureState>,
    pub synic: Option<FeatureState>,
    pub synictimer: Option<FeatureSynicTimer>,
    pub reset: Option<FeatureState>,
    pub vendorid: Option<FeatureVendorId>,
    pub frequencies: Option<FeatureState>,
    pub reenlightenment: Option<FeatureState>,
    pub tlbflush: Option<FeatureState>,
    pub ipi: Option<FeatureState>,
    pub evmcs: Option<FeatureState>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureSpinlocks {
    pub enabled: Option<bool>,
    pub spinlocks: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureVendorId {
    pub enabled: Option<bool>,
    pub vendorid: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Devices {
    pub disks: Vec<Disk>,
    pub interfaces: Vec<Interface>,
    pub inputs: Vec<Input>,
    pub rng: Option<serde_json::Value>,
    pub autoattach_serial_console: Option<bool>,
    pub autoattach_graphics_device: Option<bool>,
    pub autoattach_mem_balloon: Option<bool>,
    pub use_virtio_transitional: Option<bool>,
    pub block_multi_queue: Option<bool>,
    /// No virtio-scsi controller unless a disk is on scsi (KubeVirt's requiresSCSIController).
    pub disable_hotplug: Option<bool>,
    pub watchdog: Option<Watchdog>,
    pub sound: Option<SoundDevice>,
    pub tpm: Option<TpmDevice>,
    /// Assigned by device plugins (PCI or mediated devices): refused by the converter.
    pub gpus: Vec<HostDevice>,
    /// Assigned by device plugins (PCI or mediated devices): refused by the converter.
    pub host_devices: Vec<HostDevice>,
}

/// An element of `devices.gpus` or `devices.hostDevices`: a device plugin's resource.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HostDevice {
    pub name: String,
    /// The device plugin's resource name (e.g. `nvidia.com/TU104GL_Tesla_T4`).
    pub device_name: String,
}

/// `devices.watchdog`: one watchdog device, of one model.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Watchdog {
    pub name: String,
    /// The Intel 6300ESB (x86).
    pub i6300esb: Option<WatchdogModel>,
    /// s390x's diag288.
    pub diag288: Option<WatchdogModel>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WatchdogModel {
    /// `poweroff`, `reset` or `shutdown` (KubeVirt's default: `reset`).
    pub action: Option<String>,
}

/// `devices.sound`: one sound card.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SoundDevice {
    pub name: String,
    /// `ich9` (the default) or `ac97`.
    pub model: Option<String>,
}

/// `devices.tpm`: an emulated TPM 2.0 (swtpm).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TpmDevice {
    /// false: no TPM (as if the field were absent).
    pub enabled: Option<bool>,
    /// The TPM's state kept across restarts (a backend-storage PVC in KubeVirt).
    pub persistent: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Disk {
    pub name: String,
    pub disk: Option<DiskTarget>,
    pub cdrom: Option<CdromTarget>,
    pub lun: Option<LunTarget>,
    pub boot_order: Option<i64>,
    pub serial: Option<String>,
    #[serde(rename = "dedicatedIOThread")]
    pub dedicated_io_thread: Option<bool>,
    /// `none`, `writethrough` or `writeback`.
    pub cache: Option<String>,
    /// `native`, `threads` or `default`.
    pub io: Option<String>,
    pub tag: Option<String>,
    pub block_size: Option<BlockSize>,
    pub shareable: Option<bool>,
    /// `stop`, `report`, `ignore` or `enospace`.
    pub error_policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DiskTarget {
    pub bus: Option<String>,
    pub readonly: Option<bool>,
    pub pci_address: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CdromTarget {
    pub bus: Option<String>,
    pub readonly: Option<bool>,
    /// `open` or `closed` (default).
    pub tray: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LunTarget {
    pub bus: Option<String>,
    pub readonly: Option<bool>,
    pub reservation: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BlockSize {
    pub custom: Option<CustomBlockSize>,
    pub match_volume: Option<FeatureState>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CustomBlockSize {
    pub logical: u64,
    pub physical: u64,
    pub discard_granularity: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Interface {
    pub name: String,
    pub model: Option<String>,
    pub mac_address: Option<String>,
    pub boot_order: Option<i64>,
    pub masquerade: Option<serde_json::Value>,
    pub bridge: Option<serde_json::Value>,
    pub sriov: Option<serde_json::Value>,
    pub slirp: Option<serde_json::Value>,
    pub passt: Option<serde_json::Value>,
    /// The core passt binding (`passtBinding: {}`, KubeVirt ≥ 1.8): libvirt's passt backend.
    pub passt_binding: Option<serde_json::Value>,
    pub binding: Option<serde_json::Value>,
    pub mtu: Option<u32>,
    /// Ports to forward to the guest (passt forwards all when none is listed).
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Port {
    pub name: Option<String>,
    /// `TCP` (default) or `UDP`.
    pub protocol: Option<String>,
    pub port: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Input {
    pub name: String,
    #[serde(rename = "type")]
    pub input_type: String,
    pub bus: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Network {
    pub name: String,
    pub pod: Option<serde_json::Value>,
    pub multus: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Volume {
    pub name: String,
    pub persistent_volume_claim: Option<PvcSource>,
    pub data_volume: Option<DataVolumeSource>,
    pub container_disk: Option<ContainerDiskSource>,
    pub ephemeral: Option<EphemeralSource>,
    pub empty_disk: Option<EmptyDiskSource>,
    pub host_disk: Option<HostDiskSource>,
    pub cloud_init_no_cloud: Option<CloudInitSource>,
    pub cloud_init_config_drive: Option<CloudInitSource>,
    pub config_map: Option<ObjectRefSource>,
    pub secret: Option<SecretSource>,
    pub service_account: Option<ServiceAccountSource>,
    #[serde(rename = "downwardAPI")]
    pub downward_api: Option<serde_json::Value>,
    /// Windows' unattended set-up: a ConfigMap or Secret holding `autounattend.xml` or
    /// `unattend.xml`, given to the guest as an ISO cdrom.
    pub sysprep: Option<SysprepSource>,
}

/// `volumes[].sysprep`: where the answer file comes from (one of the two).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SysprepSource {
    pub config_map: Option<LocalObjectReference>,
    pub secret: Option<LocalObjectReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalObjectReference {
    pub name: String,
}

impl Volume {
    /// A PVC or DataVolume marked `hotpluggable`: attached and detached while the VM runs.
    pub fn is_hotpluggable(&self) -> bool {
        self.persistent_volume_claim
            .as_ref()
            .and_then(|p| p.hotpluggable)
            .unwrap_or(false)
            || self
                .data_volume
                .as_ref()
                .and_then(|d| d.hotpluggable)
                .unwrap_or(false)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PvcSource {
    pub claim_name: String,
    pub read_only: Option<bool>,
    pub hotpluggable: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataVolumeSource {
    pub name: String,
    pub hotpluggable: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerDiskSource {
    pub image: String,
    pub path: Option<String>,
    pub image_pull_policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EphemeralSource {
    pub persistent_volume_claim: Option<PvcSource>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EmptyDiskSource {
    pub capacity: Option<Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HostDiskSource {
    pub path: String,
    /// `Disk` or `DiskOrCreate`.
    #[serde(rename = "type")]
    pub disk_type: String,
    pub capacity: Option<Quantity>,
    pub shared: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudInitSource {
    pub user_data: Option<String>,
    pub user_data_base64: Option<String>,
    pub network_data: Option<String>,
    pub network_data_base64: Option<String>,
    pub secret_ref: Option<LocalObjectReference>,
    pub network_data_secret_ref: Option<LocalObjectReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectRefSource {
    pub name: String,
    pub optional: Option<bool>,
    pub volume_label: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SecretSource {
    pub secret_name: String,
    pub optional: Option<bool>,
    pub volume_label: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceAccountSource {
    pub service_account_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VmiStatus {
    pub phase: Option<String>,
    pub volume_status: Vec<VolumeStatus>,
    /// Changed-block tracking: `Initializing` or `Enabled` puts PVC, DataVolume and hostDisk
    /// volumes behind a qcow2 overlay whose data file is the volume (`<dataStore>`).
    pub changed_block_tracking: Option<ChangedBlockTrackingStatus>,
    /// uid QEMU runs as; non-zero means a non-root pod (KubeVirt's default, 107).
    pub runtime_user: Option<u64>,
    pub interfaces: Vec<InterfaceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ChangedBlockTrackingStatus {
    /// `PendingRestart`, `Initializing`, `Enabled`, `Disabled`, ...
    pub state: Option<String>,
}

impl ChangedBlockTrackingStatus {
    /// KubeVirt applies the overlays in both `Initializing` and `Enabled`.
    pub fn applies(&self) -> bool {
        matches!(self.state.as_deref(), Some("Initializing" | "Enabled"))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InterfaceStatus {
    pub name: Option<String>,
    /// The pod interface the VMI interface is bound to (`eth0`, `pod<hash>`).
    pub pod_interface_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeStatus {
    pub name: String,
    /// Guest device name libvirt gave the disk (`vda`, `sdb`, ...), kept across restarts.
    pub target: Option<String>,
    /// `Pending`, `Bound`, `AttachedToNode`, `MountedToPod`, `Ready`, `Detaching`, ...
    pub phase: Option<String>,
    pub hotplug_volume: Option<serde_json::Value>,
    /// What the controller knows of the claim: access modes (ReadWriteMany = shared storage
    /// a migration target can reach) and capacity (a larger one means the PVC was expanded).
    pub persistent_volume_claim_info: Option<PvcInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PvcInfo {
    pub claim_name: Option<String>,
    pub access_modes: Vec<String>,
    pub volume_mode: Option<String>,
    pub capacity: std::collections::BTreeMap<String, Quantity>,
    pub requests: std::collections::BTreeMap<String, Quantity>,
    pub preallocated: Option<bool>,
    /// Fraction of the filesystem kept free, e.g. "0.055".
    pub filesystem_overhead: Option<String>,
}

impl VolumeStatus {
    /// ReadWriteMany: the claim is reachable from every node.
    pub fn is_shared(&self) -> bool {
        self.persistent_volume_claim_info
            .as_ref()
            .is_some_and(|p| p.access_modes.iter().any(|m| m == "ReadWriteMany"))
    }

    /// The claim's capacity in bytes, when the status states one.
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.persistent_volume_claim_info
            .as_ref()?
            .capacity
            .get("storage")?
            .value()
            .ok()
    }
}

/// Read `path` (JSON or YAML) holding a VirtualMachineInstance or a VirtualMachine.
pub fn load_file(path: &Path) -> Result<VirtualMachineInstance, SpecError> {
    Manifest::read(path)?.vmi()
}

/// A user's VMI or VM file, every field of it read or reported ([`Manifest::vmi_checked`]).
pub fn load_file_checked(
    path: &Path,
    unknown: UnknownFields,
) -> Result<VirtualMachineInstance, SpecError> {
    Manifest::read(path)?.vmi_checked(unknown)
}

/// Parse `text` (JSON or YAML); `origin` names the source in error messages.
pub fn from_str(text: &str, origin: &str) -> Result<VirtualMachineInstance, SpecError> {
    Manifest::parse(text, origin)?.vmi()
}

impl Manifest {
    /// The VMI of this manifest: its first `VirtualMachineInstance` or `VirtualMachine`
    /// document (or its only document, whatever it is, so that a wrong kind is named).
    /// Fields outside the model are ignored: what KubeVirt's handler sends was validated by
    /// the cluster, possibly a newer one.
    pub fn vmi(&self) -> Result<VirtualMachineInstance, SpecError> {
        self.vmi_with(None)
    }

    /// [`Manifest::vmi`] of a user's file: a field KubeVirt does not know is an error
    /// (kubectl's strict field validation; a warning with [`UnknownFields::Warn`]), and so is
    /// a KubeVirt field the launcher does not implement, unless it is harmless
    /// ([`fields::harmless`]).
    pub fn vmi_checked(&self, unknown: UnknownFields) -> Result<VirtualMachineInstance, SpecError> {
        self.vmi_with(Some(unknown))
    }

    fn vmi_with(&self, check: Option<UnknownFields>) -> Result<VirtualMachineInstance, SpecError> {
        let is_ours = |v: &serde_json::Value| {
            matches!(
                manifest::str_field(v, "kind"),
                "VirtualMachineInstance" | "VirtualMachine"
            )
        };
        let docs = &self.docs;
        let Some(doc) = docs
            .iter()
            .find(|v| is_ours(v))
            .or_else(|| (docs.len() == 1).then(|| &docs[0]))
        else {
            return Err(SpecError::Empty {
                origin: self.origin.clone(),
            });
        };
        let api_version = manifest::str_field(doc, "apiVersion");
        let kind = manifest::str_field(doc, "kind");
        if !API_VERSIONS.contains(&api_version) || !is_ours(doc) {
            return Err(SpecError::UnknownKind {
                origin: self.origin.clone(),
                api_version: api_version.to_string(),
                kind: kind.to_string(),
            });
        }
        if kind == "VirtualMachine" {
            // KubeVirt expands these from VirtualMachineInstancetype/Preference objects in the
            // cluster; a launcher has none to read, and dropping them would run another VM.
            for field in ["instancetype", "preference"] {
                if doc.get("spec").and_then(|s| s.get(field)).is_some() {
                    return Err(SpecError::Field {
                        origin: self.origin.clone(),
                        field: format!("spec.{field}"),
                        reason: format!(
                            "{field}s are not resolved here (they live in the cluster): run \
                             `virtctl expand --vm <name>` and give the launcher the expanded VM"
                        ),
                    });
                }
            }
        }
        let root = fields::root_type(kind);
        if let Some(policy) = check {
            let unknown = fields::unknown(doc, root);
            if policy == UnknownFields::Warn {
                for p in &unknown {
                    tracing::warn!(
                        field = p.path(),
                        "{}; ignored (--allow-unknown-fields)",
                        p.reason()
                    );
                }
            } else if !unknown.is_empty() {
                return Err(SpecError::Fields {
                    origin: self.origin.clone(),
                    problems: unknown,
                });
            }
        }
        // KubeVirt's fields the model skips: harmless, or not supported.
        let mut skipped = Vec::new();
        let mut on_skip = |path: Vec<fields::Seg>| skipped.push(path);
        let (mut vmi, spec) = if kind == "VirtualMachine" {
            let vmi = self
                .deserialize_tracking::<VirtualMachine>(doc, &mut on_skip)?
                .into_vmi();
            (vmi, doc.pointer("/spec/template/spec"))
        } else {
            (
                self.deserialize_tracking::<VirtualMachineInstance>(doc, &mut on_skip)?,
                doc.get("spec"),
            )
        };
        if check.is_some() {
            let mut unsupported = Vec::new();
            for segs in skipped.iter().filter(|segs| fields::known(root, segs)) {
                let path = fields::display(segs);
                match fields::verdict(kind, doc, segs) {
                    fields::Verdict::Harmless => {}
                    fields::Verdict::Without(what) => tracing::warn!(field = %path, "{what}"),
                    fields::Verdict::Unsupported => {
                        unsupported.push(fields::Problem::Unsupported { path })
                    }
                }
            }
            if !unsupported.is_empty() {
                return Err(SpecError::Fields {
                    origin: self.origin.clone(),
                    problems: unsupported,
                });
            }
        }
        let filesystems: Vec<&str> = spec
            .and_then(|s| s.pointer("/domain/devices/filesystems"))
            .and_then(|f| f.as_array())
            .map(|f| f.iter().filter_map(|f| f.get("name")?.as_str()).collect())
            .unwrap_or_default();
        vmi.default_volume_disks(&filesystems);
        Ok(vmi)
    }
}

impl VirtualMachineInstance {
    /// What the guest would boot from is missing (no disk, no kernel, no interface to boot
    /// from): the VM would start and show nothing, looking like one that boots. A line for
    /// the user, or None.
    pub fn nothing_to_boot(&self) -> Option<String> {
        let d = &self.spec.domain;
        let kernel = d
            .firmware
            .as_ref()
            .and_then(|f| f.kernel_boot.as_ref())
            .and_then(|k| k.container.as_ref())
            .is_some_and(|c| c.kernel_path.is_some());
        let netboot = d.devices.interfaces.iter().any(|i| i.boot_order.is_some());
        (d.devices.disks.is_empty() && !kernel && !netboot).then(|| {
            "the VM has nothing to boot from: no disk (spec.domain.devices.disks), no kernel \
             (spec.domain.firmware.kernelBoot) and no interface with a bootOrder; it will run \
             without an operating system"
                .to_string()
        })
    }

    /// KubeVirt's defaulting (`SetDefaultVolumeDisk`, at a VMI's creation and in the VM
    /// controller): a volume that no disk and no filesystem (`filesystems`) names gets a disk
    /// of its own (`disk: {}`, virtio), which the user then sees in the guest rather than a
    /// volume silently dropped.
    pub fn default_volume_disks(&mut self, filesystems: &[&str]) {
        let devices = &mut self.spec.domain.devices;
        for v in &self.spec.volumes {
            let named = devices.disks.iter().any(|d| d.name == v.name)
                || filesystems.contains(&v.name.as_str());
            if !named {
                tracing::info!(volume = %v.name, "the volume has no disk: adding one (virtio), as KubeVirt does");
                devices.disks.push(Disk {
                    name: v.name.clone(),
                    disk: Some(DiskTarget::default()),
                    ..Default::default()
                });
            }
        }
    }
}

impl VirtualMachine {
    /// The VMI this VM would create: `spec.template`, with the VM's name/namespace/uid as fallback.
    pub fn into_vmi(self) -> VirtualMachineInstance {
        let mut meta = self.spec.template.metadata;
        if meta.name.is_empty() {
            meta.name = self.metadata.name;
        }
        if meta.namespace.is_none() {
            meta.namespace = self.metadata.namespace;
        }
        if meta.uid.is_none() {
            meta.uid = self.metadata.uid;
        }
        VirtualMachineInstance {
            api_version: self.api_version,
            kind: "VirtualMachineInstance".to_string(),
            metadata: meta,
            spec: self.spec.template.spec,
            status: None,
            handler_options: None,
            from_vm: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As KubeVirt defaults a VMI: a volume without a disk gets one; one a filesystem uses
    /// does not; in a VM's template as in a VMI.
    #[test]
    fn a_volume_without_a_disk_gets_one_as_kubevirt_adds_it() {
        let spec = "domain:\n  devices:\n    disks:\n    - name: a\n      disk: {bus: sata}\n    filesystems:\n    - name: fs\n      virtiofs: {}\nvolumes:\n- name: a\n  emptyDisk: {capacity: 1Mi}\n- name: b\n  persistentVolumeClaim: {claimName: b}\n- name: fs\n  persistentVolumeClaim: {claimName: fs}\n";
        let indent = |text: &str, n: usize| {
            text.lines()
                .map(|l| format!("{}{l}\n", " ".repeat(n)))
                .collect::<String>()
        };
        let vmi = format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: x\nspec:\n{}",
            indent(spec, 2)
        );
        let vm = format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: x\nspec:\n  template:\n    spec:\n{}",
            indent(spec, 6)
        );
        for text in [vmi, vm] {
            let vmi = from_str(&text, "t.yaml").expect("parses");
            let disks: Vec<(&str, Option<&str>)> = vmi
                .spec
                .domain
                .devices
                .disks
                .iter()
                .map(|d| {
                    (
                        d.name.as_str(),
                        d.disk.as_ref().and_then(|t| t.bus.as_deref()),
                    )
                })
                .collect();
            assert_eq!(disks, [("a", Some("sata")), ("b", None)], "{text}");
            assert!(vmi.spec.domain.devices.disks[1].disk.is_some());
        }
    }

    /// A VMI as `kubectl get vmi -o yaml` prints it (KubeVirt 1.x, with memory hot-plug room).
    const KUBECTL_GET_VMI: &str = r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  annotations:
    kubevirt.io/latest-observed-api-version: v1
    kubevirt.io/vm-generation: "1"
  creationTimestamp: "2026-12-02T10:00:00Z"
  finalizers: [kubevirt.io/virtualMachineControllerFinalize, foregroundDeleteVirtualMachine]
  generation: 10
  labels: {kubevirt.io/nodeName: node01, kubevirt.io/vm: testvm}
  managedFields:
  - apiVersion: kubevirt.io/v1
    fieldsType: FieldsV1
    fieldsV1: {"f:metadata": {"f:labels": {".": {}}}}
    manager: virt-controller
    operation: Update
    time: "2026-12-02T10:00:00Z"
  name: testvm
  namespace: default
  ownerReferences:
  - {apiVersion: kubevirt.io/v1, blockOwnerDeletion: true, controller: true, kind: VirtualMachine, name: testvm, uid: 0b6f6e6c-1111-4c8e-9d1e-000000000001}
  resourceVersion: "12345"
  uid: 0b6f6e6c-1111-4c8e-9d1e-000000000002
spec:
  architecture: ARCH
  domain:
    cpu: {cores: 1, maxSockets: 4, model: host-model, sockets: 1, threads: 1}
    devices:
      disks:
      - {disk: {bus: virtio}, name: containerdisk}
      interfaces:
      - {masquerade: {}, name: default}
    features: {acpi: {enabled: true}}
    firmware: {serial: 5c6b5c43-0000-0000-0000-000000000000, uuid: 5a9fc181-957e-5c32-9e5a-2de5e9673531}
    machine: {type: q35}
    memory: {guest: 128Mi, maxGuest: 512Mi}
    resources:
      requests: {memory: 128Mi}
  evictionStrategy: None
  nodeSelector: {kubernetes.io/hostname: node01}
  networks:
  - {name: default, pod: {}}
  terminationGracePeriodSeconds: 0
  volumes:
  - {containerDisk: {image: quay.io/kubevirt/cirros-container-disk-demo, imagePullPolicy: IfNotPresent}, name: containerdisk}
status:
  activePods: {5a9fc181-957e-5c32-9e5a-2de5e9673531: node01}
  conditions:
  - {lastProbeTime: null, lastTransitionTime: "2026-12-02T10:00:05Z", status: "True", type: Ready}
  currentCPUTopology: {cores: 1, sockets: 1, threads: 1}
  guestOSInfo: {}
  interfaces:
  - {infoSource: domain, ipAddress: 10.244.0.20, mac: "52:54:00:00:00:01", name: default, queueCount: 1}
  launcherContainerImageVersion: quay.io/kubevirt/virt-launcher:v1.6.0
  machine: {type: pc-q35-rhel9.6.0}
  memory: {guestAtBoot: 128Mi, guestCurrent: 128Mi, guestRequested: 128Mi}
  migrationMethod: BlockMigration
  migrationTransport: Unix
  nodeName: node01
  phase: Running
  phaseTransitionTimestamps:
  - {phase: Running, phaseTransitionTimestamp: "2026-12-02T10:00:05Z"}
  qosClass: Burstable
  runtimeUser: 0
  selinuxContext: none
  virtualMachineRevisionName: revision-start-vm-1
  volumeStatus:
  - {name: containerdisk, target: vda}
"#;

    fn checked(text: &str, unknown: UnknownFields) -> Result<VirtualMachineInstance, SpecError> {
        Manifest::parse(text, "vmi.yaml")?.vmi_checked(unknown)
    }

    #[test]
    fn a_vmi_as_kubectl_prints_it_is_accepted_whole() {
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "amd64",
        };
        let vmi = checked(
            &KUBECTL_GET_VMI.replace("ARCH", arch),
            UnknownFields::Refuse,
        )
        .expect("kubectl's VMI is accepted");
        assert_eq!(vmi.domain_name(), "default_testvm");
        // Another architecture than the host's is not harmless.
        let e = checked(
            &KUBECTL_GET_VMI.replace("ARCH", "s390x"),
            UnknownFields::Refuse,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "vmi.yaml: field spec.architecture: a KubeVirt field this launcher does not \
             support: remove it to run the VM without it"
        );
    }

    #[test]
    fn unknown_fields_are_errors_with_the_path_as_written_and_a_suggestion() {
        let vm =
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: vm}\nspec:\n  \
                  template:\n    spec:\n      domain:\n        cpu: {sokets: 2}\n        \
                  resources: {requests: {memory: 64Mi}}\n        devices: {}\n";
        let e = checked(vm, UnknownFields::Refuse).unwrap_err().to_string();
        assert_eq!(
            e,
            "vm.yaml: field spec.template.spec.domain.cpu.sokets: unknown field (KubeVirt has \
             no such field): did you mean \"sockets\"?; --allow-unknown-fields runs it anyway \
             (a warning per unknown field)"
                .replace("vm.yaml", "vmi.yaml")
        );
        // The opt-out: the field is ignored (with a warning), the rest is read.
        let vmi = checked(vm, UnknownFields::Warn).expect("allowed");
        assert_eq!(vmi.spec.domain.cpu.and_then(|c| c.sockets), None);
        // The lenient reader (KubeVirt's handler) ignores it, as before.
        assert!(from_str(vm, "vm.yaml").is_ok());
    }

    #[test]
    fn kubevirt_fields_not_implemented_are_refused_by_name() {
        // Fields our model lacks; a TPM or GPUs are modelled and refused by the converter.
        let vmi = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {name: x}\n\
                   spec:\n  domain:\n    devices:\n      panicDevices:\n      - {model: isa}\n      \
                   downwardMetrics: {}\n    resources: {requests: {memory: 64Mi}}\n  \
                   startStrategy: Paused\n";
        let e = checked(vmi, UnknownFields::Warn).unwrap_err().to_string();
        assert_eq!(
            e,
            "vmi.yaml: field spec.domain.devices.downwardMetrics: a KubeVirt field this launcher \
             does not support: remove it to run the VM without it; field \
             spec.domain.devices.panicDevices: a \
             KubeVirt field this launcher does not support: remove it to run the VM without it; \
             field spec.startStrategy: a KubeVirt field this launcher does not support: remove \
             it to run the VM without it"
        );
    }

    #[test]
    fn an_instancetype_or_preference_is_refused_naming_the_field() {
        for field in ["instancetype", "preference"] {
            let yaml = format!("apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm\nspec:\n  {field}:\n    name: u1.medium\n  template:\n    spec:\n      domain:\n        devices: {{}}\n");
            let e = from_str(&yaml, "vm.yaml").unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "vm.yaml: field spec.{field}: {field}s are not resolved"
                )) && e.contains("virtctl expand"),
                "{e}"
            );
        }
    }

    #[test]
    fn vm_template_becomes_vmi_with_vm_metadata() {
        let yaml = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: my-vm\n  uid: \"1234\"\nspec:\n  template:\n    spec:\n      domain:\n        devices:\n          disks:\n          - name: d\n            disk: {bus: virtio}\n      volumes:\n      - name: d\n        dataVolume: {name: d}\n";
        let vmi = from_str(yaml, "t.yaml").expect("parses");
        assert_eq!(vmi.metadata.name, "my-vm");
        assert_eq!(vmi.metadata.uid.as_deref(), Some("1234"));
        assert_eq!(vmi.kind, "VirtualMachineInstance");
        assert_eq!(vmi.domain_name(), "default_my-vm");
        assert_eq!(
            vmi.spec.volumes[0]
                .data_volume
                .as_ref()
                .map(|d| d.name.as_str()),
            Some("d")
        );
    }

    #[test]
    fn multi_document_yaml_picks_the_vm() {
        let yaml = "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: x}\n---\napiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {name: a, namespace: ns}\n";
        let vmi = from_str(yaml, "t.yaml").expect("parses");
        assert_eq!(vmi.domain_name(), "ns_a");
        assert_eq!(vmi.termination_grace_period(), Duration::from_secs(30));
    }

    #[test]
    fn unknown_kind_is_named() {
        let err = from_str(r#"{"apiVersion":"v1","kind":"Pod"}"#, "p.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("p.json") && msg.contains("Pod") && msg.contains("\"v1\""),
            "{msg}"
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let err = from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","spec":{"domain":{"cpu":{"cores":"many"}}}}"#,
            "v.json",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("spec.domain.cpu.cores"), "{msg}");
        assert!(msg.contains("v.json"), "{msg}");
    }

    #[test]
    fn the_handlers_volume_status_decides_hot_plug() {
        let mut vmi = from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",
                "metadata":{"name":"a"},
                "spec":{"volumes":[
                    {"name":"hp","persistentVolumeClaim":{"claimName":"hp"}},
                    {"name":"flagged","dataVolume":{"name":"dv","hotpluggable":true}},
                    {"name":"cold","persistentVolumeClaim":{"claimName":"c","hotpluggable":true}},
                    {"name":"unknown","persistentVolumeClaim":{"claimName":"u","hotpluggable":true}}]},
                "status":{"volumeStatus":[
                    {"name":"hp","phase":"AttachedToNode","hotplugVolume":{"attachPodName":"x"}},
                    {"name":"flagged","phase":"Ready","hotplugVolume":{}},
                    {"name":"cold","phase":"Ready"}]}}"#,
            "v.json",
        )
        .unwrap();
        vmi.apply_volume_status_hotplug();
        let hot: Vec<(&str, bool)> = vmi
            .spec
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.is_hotpluggable()))
            .collect();
        assert_eq!(
            hot,
            [
                ("hp", true),
                ("flagged", true),
                ("cold", false),
                ("unknown", true)
            ]
        );
    }
}

/// Is `s` a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters)?
/// KubeVirt requires this of volume, disk and interface names; it also makes the name safe as a
/// path component (no `/`, `..` or NUL).
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Is `s` a DNS-1123 subdomain (dot-separated labels, at most 253 characters)? Object names.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "my-vm-disk", "0", "a1-b2"] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            "A",
            "-a",
            "a-",
            "a\0b",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        assert!(is_dns1123_subdomain("my.vm-1"));
        assert!(!is_dns1123_subdomain("my..vm"));
    }
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    #[test]
    fn deep_yaml_flow_nesting_is_refused_quickly() {
        let head = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  x: ";
        let t = std::time::Instant::now();
        let e = from_str(&format!("{head}{}", "[".repeat(1 << 20)), "t").unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        // Brackets in a scalar count too, but a real spec is far from the bound.
        let ok = format!("{head}\"{}\"\n  name: v\n", "[".repeat(MAX_FLOW_DEPTH - 10));
        assert!(from_str(&ok, "t").is_ok());
    }
}
