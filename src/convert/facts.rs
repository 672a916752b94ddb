//! What the converter knows about the pod: its paths, firmware files, which volumes are block
//! devices or take `O_DIRECT`, the formats of containerDisk images. Plain data with KubeVirt's
//! defaults and no I/O; `pod::facts` probes the real pod (or reads `--pod-facts`) and
//! fills it in.

use crate::domain::DomainType;
use crate::spec::VirtualMachineInstance;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Disk image format of a base image (containerDisk) as read from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where KubeVirt puts things in the pod. Every field can be overridden (tests, odd pods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPaths {
    /// `/var/run/kubevirt-private/vmi-disks`: Filesystem-mode PVC at `<dir>/<volume>/disk.img`.
    pub vmi_disks_dir: PathBuf,
    /// `/var/run/kubevirt/hotplug-disks`: `<volume>.img`, or a `<volume>` block node.
    pub hotplug_disks_dir: PathBuf,
    /// `/dev`: Block-mode PVC at `/dev/<volume>`.
    pub block_dev_dir: PathBuf,
    /// `/var/run/kubevirt-ephemeral-disks`: qcow2 overlays (`disk-data/<volume>/disk.qcow2`)
    /// and empty disks (`empty-disks/<volume>.qcow2`).
    pub ephemeral_disks_dir: PathBuf,
    /// `/var/run/kubevirt/container-disks`: containerDisk images as `disk_<volume index>.img`.
    pub container_disks_dir: PathBuf,
    /// Directory holding the kernelBoot container's files; `kernelPath`/`initrdPath` are
    /// resolved inside it and cannot leave it.
    pub kernel_boot_dir: PathBuf,
    /// `/var/run/kubevirt-private/<uid or name>`: serial socket `virt-serial0` and its log
    /// `virt-serial0-log`, VNC socket `virt-vnc`, guest agent socket `virt-guest-agent`,
    /// generated cloud-init ISOs (`noCloud.iso`, `configdrive.iso`), EFI NVRAM.
    pub private_dir: PathBuf,
    /// `/var/run/kubevirt-private`: configMap/secret/serviceAccount sources and their ISOs
    /// (`config-map/<vol>` → `config-map-disks/<vol>.iso`, `secret/<vol>` →
    /// `secret-disks/<vol>.iso`, `service-account-disk/service-account.iso`).
    pub config_dir: PathBuf,
    /// `/var/run/secrets/kubernetes.io/serviceaccount`: the pod's service account token.
    pub service_account_dir: PathBuf,
    /// Changed-block tracking overlays `<volume>.qcow2`: KubeVirt's `/var/lib/libvirt/qemu/cbt`,
    /// or `/var/run/kubevirt-private/libvirt/qemu/cbt` when QEMU runs as non-root.
    pub cbt_dir: PathBuf,
    /// Log of the passt back-end libvirt starts for a `passtBinding` interface (KubeVirt's
    /// `/var/run/kubevirt/passt.log`).
    pub passt_log: PathBuf,
    /// Directories the launcher itself populated with links into other places it owns (the
    /// standalone DataVolume view links each volume to its claim under the storage directory,
    /// and each Block claim to its loop device): a PVC directory or Block node may resolve
    /// into one of these as well as into its own directory. Never set from a spec.
    pub trusted_roots: Vec<PathBuf>,
    /// EFI variable stores (`<name>_VARS.fd`).
    pub nvram_dir: PathBuf,
    /// `<namespace>/<name>` of the VMI (each `_` when not a safe path component): KubeVirt
    /// keys the generated cloud-init ISOs by it under the ephemeral-disk directory.
    pub vmi_dir: PathBuf,
    /// Standalone (`virt-launcher run`): a hostDisk is the host file its `path` names. false
    /// (KubeVirt's pod): virt-controller mounts the path's directory at
    /// `<vmi_disks_dir>/<volume>/`, so the disk is `<vmi_disks_dir>/<volume>/<file name>`.
    pub host_disk_at_host_path: bool,
}

impl PodPaths {
    /// KubeVirt's in-pod layout for this VMI. The private dir is keyed by the VMI's uid (or its
    /// name when it has none); a uid/name that is not a safe path component is replaced by `_`.
    pub fn kubevirt_defaults(vmi: &VirtualMachineInstance) -> Self {
        let key = [
            vmi.metadata.uid.as_deref(),
            Some(vmi.metadata.name.as_str()),
        ]
        .into_iter()
        .flatten()
        .find(|k| is_safe_component(k))
        .unwrap_or("_");
        PodPaths {
            vmi_disks_dir: "/var/run/kubevirt-private/vmi-disks".into(),
            hotplug_disks_dir: "/var/run/kubevirt/hotplug-disks".into(),
            block_dev_dir: "/dev".into(),
            ephemeral_disks_dir: "/var/run/kubevirt-ephemeral-disks".into(),
            container_disks_dir: "/var/run/kubevirt/container-disks".into(),
            kernel_boot_dir: "/var/run/kubevirt/container-disks/kernel-boot".into(),
            private_dir: Path::new("/var/run/kubevirt-private").join(key),
            config_dir: "/var/run/kubevirt-private".into(),
            service_account_dir: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            cbt_dir: if vmi.is_non_root() {
                "/var/run/kubevirt-private/libvirt/qemu/cbt".into()
            } else {
                "/var/lib/libvirt/qemu/cbt".into()
            },
            // KubeVirt's util.PathForNVram (non-root: the backend-storage directory).
            nvram_dir: if vmi.is_non_root() {
                "/var/run/kubevirt-private/libvirt/qemu/nvram".into()
            } else {
                "/var/lib/libvirt/qemu/nvram".into()
            },
            passt_log: "/var/run/kubevirt/passt.log".into(),
            trusted_roots: Vec::new(),
            vmi_dir: Path::new(safe_or(vmi.namespace())).join(safe_or(&vmi.metadata.name)),
            host_disk_at_host_path: false,
        }
    }

    /// Where the hostDisk of `volume` with `path` is (see [`PodPaths::host_disk_at_host_path`];
    /// KubeVirt's `hostdisk.GetMountedHostDiskPath`). `path` is absolute without `..` (the
    /// converter checks it) and `volume` a DNS-1123 label.
    pub fn host_disk(&self, volume: &str, path: &str) -> PathBuf {
        if self.host_disk_at_host_path {
            return PathBuf::from(path);
        }
        let file = Path::new(path).file_name().unwrap_or_default();
        self.vmi_disks_dir.join(volume).join(file)
    }

    /// The serial console's unix socket (`<private_dir>/virt-serial0`).
    pub fn serial_socket(&self) -> PathBuf {
        self.private_dir.join("virt-serial0")
    }

    /// The serial console's log file (`<private_dir>/virt-serial0-log`).
    pub fn serial_log(&self) -> PathBuf {
        self.private_dir.join("virt-serial0-log")
    }

    /// The VNC unix socket (`<private_dir>/virt-vnc`).
    pub fn vnc_socket(&self) -> PathBuf {
        self.private_dir.join("virt-vnc")
    }

    /// The guest agent channel's unix socket (`<private_dir>/virt-guest-agent`).
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.private_dir.join("virt-guest-agent")
    }

    /// Filesystem-mode PVC/DataVolume image.
    pub fn pvc_image(&self, volume: &str) -> PathBuf {
        self.vmi_disks_dir.join(volume).join("disk.img")
    }

    /// Block-mode PVC/DataVolume node.
    pub fn pvc_block(&self, volume: &str) -> PathBuf {
        self.block_dev_dir.join(volume)
    }

    /// Hot-plugged volume: `<volume>.img` (Filesystem) or `<volume>` (Block).
    pub fn hotplug_path(&self, volume: &str, block: bool) -> PathBuf {
        if block {
            self.hotplug_disks_dir.join(volume)
        } else {
            self.hotplug_disks_dir.join(format!("{volume}.img"))
        }
    }

    /// qcow2 overlay of a containerDisk or ephemeral volume.
    pub fn overlay(&self, volume: &str) -> PathBuf {
        self.ephemeral_disks_dir
            .join("disk-data")
            .join(volume)
            .join("disk.qcow2")
    }

    /// Changed-block tracking overlay of a PVC, DataVolume or hostDisk volume: a qcow2 image
    /// whose data file is the volume itself.
    pub fn cbt_overlay(&self, volume: &str) -> PathBuf {
        self.cbt_dir.join(format!("{volume}.qcow2"))
    }

    /// Image of an emptyDisk volume.
    pub fn empty_disk(&self, volume: &str) -> PathBuf {
        self.ephemeral_disks_dir
            .join("empty-disks")
            .join(format!("{volume}.qcow2"))
    }

    /// containerDisk base image; `index` is the volume's index in `spec.volumes`.
    pub fn container_disk(&self, index: usize) -> PathBuf {
        self.container_disks_dir.join(format!("disk_{index}.img"))
    }

    /// Generated NoCloud ISO, where KubeVirt's pod has it
    /// (`<ephemeral>/cloud-init-data/<namespace>/<name>/noCloud.iso`, pkg/cloud-init).
    pub fn cloud_init_no_cloud_iso(&self) -> PathBuf {
        self.cloud_init_dir().join("noCloud.iso")
    }

    /// Generated ConfigDrive ISO (`<ephemeral>/cloud-init-data/<namespace>/<name>/configdrive.iso`).
    pub fn cloud_init_config_drive_iso(&self) -> PathBuf {
        self.cloud_init_dir().join("configdrive.iso")
    }

    fn cloud_init_dir(&self) -> PathBuf {
        self.ephemeral_disks_dir
            .join("cloud-init-data")
            .join(&self.vmi_dir)
    }

    pub fn config_map_source(&self, volume: &str) -> PathBuf {
        self.config_dir.join("config-map").join(volume)
    }
    /// KubeVirt's `config.GetSysprepSourcePath`: where the pod mounts the ConfigMap or Secret.
    pub fn sysprep_source(&self, volume: &str) -> PathBuf {
        self.config_dir.join("sysprep").join(volume)
    }
    /// KubeVirt's `config.GetSysprepDiskPath`.
    pub fn sysprep_iso(&self, volume: &str) -> PathBuf {
        self.config_dir
            .join("sysprep-disks")
            .join(format!("{volume}.iso"))
    }
    pub fn config_map_iso(&self, volume: &str) -> PathBuf {
        self.config_dir
            .join("config-map-disks")
            .join(format!("{volume}.iso"))
    }
    pub fn secret_source(&self, volume: &str) -> PathBuf {
        self.config_dir.join("secret").join(volume)
    }
    pub fn secret_iso(&self, volume: &str) -> PathBuf {
        self.config_dir
            .join("secret-disks")
            .join(format!("{volume}.iso"))
    }
    pub fn downward_api_iso(&self, volume: &str) -> PathBuf {
        self.config_dir
            .join("downwardapi-disks")
            .join(format!("{volume}.iso"))
    }
    pub fn service_account_iso(&self) -> PathBuf {
        self.config_dir
            .join("service-account-disk")
            .join("service-account.iso")
    }

    /// EFI variable store of this VMI, where KubeVirt keeps it.
    pub fn nvram(&self, vmi_name: &str) -> PathBuf {
        self.nvram_dir.join(format!("{vmi_name}_VARS.fd"))
    }
}

/// OVMF firmware files. KubeVirt's defaults live in `/usr/share/OVMF`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwarePaths {
    pub efi_code: PathBuf,
    pub efi_vars: PathBuf,
    pub efi_secure_code: PathBuf,
    pub efi_secure_vars: PathBuf,
}

impl Default for FirmwarePaths {
    fn default() -> Self {
        FirmwarePaths {
            efi_code: "/usr/share/OVMF/OVMF_CODE.fd".into(),
            efi_vars: "/usr/share/OVMF/OVMF_VARS.fd".into(),
            efi_secure_code: "/usr/share/OVMF/OVMF_CODE.secboot.fd".into(),
            efi_secure_vars: "/usr/share/OVMF/OVMF_VARS.secboot.fd".into(),
        }
    }
}

/// Default number of spare `pcie-root-port` controllers (host notes: 2 were not enough).
pub const DEFAULT_SPARE_ROOT_PORTS: u32 = 8;

/// Everything [`crate::convert::convert`] needs to know about the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub domain_type: DomainType,
    /// PVC/DataVolume volumes (by volume name) that are block devices.
    pub block_volumes: BTreeSet<String>,
    /// `O_DIRECT` works on file-backed volumes → `cache='none'`, else `writethrough`.
    pub direct_io: bool,
    /// PVC/DataVolume volumes whose image refuses `O_DIRECT` (a claim on tmpfs, say), probed
    /// one by one: they get `writethrough` whatever [`PodFacts::direct_io`] says, so one such
    /// claim neither fails to attach nor costs the other claims their `cache='none'`.
    pub no_direct_io: BTreeSet<String>,
    pub paths: PodPaths,
    pub firmware: FirmwarePaths,
    /// Volumes whose image is fully preallocated (→ `io='native'` with `cache='none'`).
    pub preallocated_volumes: BTreeSet<String>,
    /// Block sizes probed for the disks with `blockSize.matchVolume`, by volume name
    /// (KubeVirt's storage/disk.go detectOptimalBlockIO: a block device's logical/physical sizes
    /// and discard granularity, a file's filesystem block size for all three).
    pub volume_block_io: BTreeMap<String, crate::domain::BlockIo>,
    /// Formats of containerDisk base images, by volume name; when absent the overlay's own
    /// header names its backing file and `<backingStore>` is left out.
    pub image_formats: BTreeMap<String, ImageFormat>,
    /// Spare `pcie-root-port` controllers for later virtio hot-plug. The VMI annotation
    /// [`crate::convert::SPARE_ROOT_PORTS_ANNOTATION`] overrides it per VM.
    pub spare_root_ports: u32,
    /// Socket of the persistent-reservation helper (`lun` with `reservation: true`).
    pub pr_helper_socket: PathBuf,
    /// MTU of the pod interface behind each `masquerade`/`bridge` interface, by interface
    /// name (the domain interface gets it, as KubeVirt's phase 2 does).
    pub interface_mtus: BTreeMap<String, u32>,
    /// The MAC the handler's phase 1 cached for each `bridge` interface (the pod interface's
    /// own, which the guest takes over), by interface name.
    pub interface_macs: BTreeMap<String, String>,
    /// Set when the launcher runs outside KubeVirt and no handler built the pod network
    /// (no `tap0`): the pod network is passt's user-mode networking, a bridge binding needs
    /// a host bridge.
    pub standalone_network: Option<StandaloneNetwork>,
    /// The pod's CPU set, ascending: the CPUs the kubelet's static CPU manager gave the pod
    /// (its cgroup's cpuset); standalone, the launcher's own affinity. `dedicatedCpuPlacement`
    /// pins the vCPUs onto these. Empty: not known (nothing can be pinned).
    pub cpu_set: Vec<u32>,
    /// The host's cores as lists of sibling hardware threads (`thread_siblings_list`), in
    /// host order; a CPU of [`PodFacts::cpu_set`] on no list is a core of its own.
    pub cpu_siblings: Vec<Vec<u32>>,
}

/// Standalone networking: what the command line gave for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandaloneNetwork {
    /// `--publish HOST:GUEST[/udp]`: host ports forwarded to the guest.
    pub publish: Vec<Published>,
    /// `--host-bridge NAME`: the host bridge a `bridge` interface joins.
    pub host_bridge: Option<String>,
    /// passt's log file.
    pub passt_log: PathBuf,
}

/// One `--publish`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for Published {
    type Err = String;
    /// `HOST:GUEST`, `HOST:GUEST/tcp` or `HOST:GUEST/udp`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ports, proto) = match s.split_once('/') {
            None => (s, "tcp"),
            Some((p, "tcp")) => (p, "tcp"),
            Some((p, "udp")) => (p, "udp"),
            Some((_, other)) => return Err(format!("{other:?} is not tcp or udp")),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p >= 1)
                .ok_or_else(|| format!("{p:?} is not a port (1..65535)"))
        };
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not HOST:GUEST[/tcp|/udp]"))?;
        Ok(Published {
            proto,
            host: port(host)?,
            guest: port(guest)?,
        })
    }
}

impl PodFacts {
    /// Facts with KubeVirt's default paths and nothing probed (`directIO` true, no block volumes).
    pub fn defaults(vmi: &VirtualMachineInstance) -> Self {
        PodFacts {
            domain_type: DomainType::Kvm,
            block_volumes: BTreeSet::new(),
            direct_io: true,
            no_direct_io: BTreeSet::new(),
            paths: PodPaths::kubevirt_defaults(vmi),
            firmware: FirmwarePaths::default(),
            preallocated_volumes: BTreeSet::new(),
            volume_block_io: BTreeMap::new(),
            image_formats: BTreeMap::new(),
            spare_root_ports: DEFAULT_SPARE_ROOT_PORTS,
            pr_helper_socket: "/var/run/kubevirt/daemons/pr/pr-helper.sock".into(),
            interface_mtus: BTreeMap::new(),
            interface_macs: BTreeMap::new(),
            standalone_network: None,
            cpu_set: Vec::new(),
            cpu_siblings: Vec::new(),
        }
    }
}

fn safe_or(s: &str) -> &str {
    if is_safe_component(s) {
        s
    } else {
        "_"
    }
}

/// Is `s` usable as one path component: non-empty, no `/`, NUL, `.` or `..`, printable ASCII.
pub fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
