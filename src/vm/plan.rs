//! From a VMI to what the supervisor runs: gather pod facts, convert, prepare files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::convert::facts::{PodFacts, PodPaths};
use crate::convert::{self, ConvertError};
use crate::domain::{Domain, DomainType};
use crate::pod::facts::{self as podfacts, AttachedVolume, PodFactsError};
use crate::pod::prepare::{self, PrepareError};
use crate::spec::{cdi, VirtualMachineInstance};

/// Where this launcher's pod keeps things, as given on the command line (None: KubeVirt's
/// in-pod default).
#[derive(Debug, Clone, Default)]
pub struct PathOverrides {
    pub vmi_disks_dir: Option<PathBuf>,
    pub hotplug_disks_dir: Option<PathBuf>,
    pub block_dev_dir: Option<PathBuf>,
    pub kernel_boot_dir: Option<PathBuf>,
    pub private_dir: Option<PathBuf>,
    pub ephemeral_disks_dir: Option<PathBuf>,
    /// `--container-disk-dir` in KubeVirt's pod.
    pub container_disks_dir: Option<PathBuf>,
    /// See [`PodPaths::trusted_roots`]: set only by the launcher (standalone DataVolumes).
    pub trusted_roots: Vec<PathBuf>,
    /// Standalone: hostDisks at their host paths (see [`PodPaths::host_disk_at_host_path`]).
    pub host_disk_at_host_path: bool,
}

impl PathOverrides {
    /// KubeVirt's layout for `vmi`, with the overrides applied.
    pub fn paths_for(&self, vmi: &VirtualMachineInstance) -> PodPaths {
        let mut p = PodPaths::kubevirt_defaults(vmi);
        let set = |dst: &mut PathBuf, src: &Option<PathBuf>| {
            if let Some(s) = src {
                *dst = s.clone();
            }
        };
        set(&mut p.vmi_disks_dir, &self.vmi_disks_dir);
        set(&mut p.hotplug_disks_dir, &self.hotplug_disks_dir);
        set(&mut p.block_dev_dir, &self.block_dev_dir);
        set(&mut p.kernel_boot_dir, &self.kernel_boot_dir);
        set(&mut p.private_dir, &self.private_dir);
        set(&mut p.ephemeral_disks_dir, &self.ephemeral_disks_dir);
        set(&mut p.container_disks_dir, &self.container_disks_dir);
        p.trusted_roots = self.trusted_roots.clone();
        p.host_disk_at_host_path = self.host_disk_at_host_path;
        p
    }
}

/// Everything needed to turn a VMI into a domain in this pod.
#[derive(Debug, Clone)]
pub struct Planner {
    pub domain_type: DomainType,
    pub paths: PathOverrides,
    /// Outside KubeVirt (`virt-launcher run`): the network used when no handler built the
    /// pod network (see [`PodFacts::standalone_network`]). `None` in KubeVirt's pod.
    pub standalone_network: Option<crate::convert::facts::StandaloneNetwork>,
}

/// Why a VMI cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("volume {volume}: cannot create {}: {source}", path.display())]
    CreateImage {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Facts(#[from] PodFactsError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Network(#[from] crate::pod::net::NetError),
}

/// A converted VMI, ready to define (`domain.to_xml()`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub facts: PodFacts,
    pub domain: Domain,
}

impl Planner {
    /// Probes the pod and converts (safe to call to validate a spec; its only side effect is
    /// [`create_missing_images`]).
    pub fn plan(&self, vmi: &VirtualMachineInstance) -> Result<Plan, PlanError> {
        self.plan_running(vmi, &BTreeMap::new())
    }

    /// [`Planner::plan`] for a running domain, which holds the hot-plugged volumes in
    /// `attached` (see [`podfacts::probe_running`]).
    pub fn plan_running(
        &self,
        vmi: &VirtualMachineInstance,
        attached: &BTreeMap<String, AttachedVolume>,
    ) -> Result<Plan, PlanError> {
        create_missing_images(vmi, &self.paths.paths_for(vmi))?;
        let mut facts =
            podfacts::probe_running(vmi, self.paths.paths_for(vmi), self.domain_type, attached)?;
        if !crate::pod::net::phase1_present() {
            facts.standalone_network = self.standalone_network.clone();
        }
        let domain = convert::convert(vmi, &facts)?;
        pcie_fits(vmi, &domain)?;
        Ok(Plan { facts, domain })
    }

    /// Creates the files the domain needs (ISOs, overlays, empty disks, changed-block
    /// tracking overlays).
    pub fn prepare(&self, vmi: &VirtualMachineInstance, plan: &Plan) -> Result<(), PlanError> {
        prepare::prepare(vmi, &plan.facts)?;
        Ok(prepare::cbt_overlays(&plan.domain.devices.disks)?)
    }
}

/// Slots of a q35 machine's `pcie.0` that libvirt can give to root ports: 1 to 30 (0 is the
/// host bridge, 31 the ICH9 functions), less one per video device (libvirt puts the primary
/// one on `pcie.0`). Measured with libvirt 11.3 / QEMU 10.0: 229 virtio disks beside a SCSI
/// controller, a virtio-serial controller and a balloon run; 230 fail to define ("a PCI slot
/// is needed to connect a PCI controller model='pcie-root-port', but none is available").
const Q35_ROOT_PORT_SLOTS: usize = 30;
/// libvirt puts up to 8 root ports in one slot (multifunction).
const ROOT_PORTS_PER_SLOT: usize = 8;

/// Whether the domain's PCIe devices fit a q35 machine: every virtio disk, interface,
/// controller (SCSI, virtio-serial, USB), balloon, RNG and virtio input takes a root port of
/// its own (libvirt puts the spare root ports to use first). The disk that does not fit is
/// named, as the user wrote it; libvirt's own error names no device.
pub fn pcie_fits(vmi: &VirtualMachineInstance, domain: &Domain) -> Result<(), ConvertError> {
    if !domain.os.machine.contains("q35") {
        return Ok(());
    }
    let d = &domain.devices;
    let slots = Q35_ROOT_PORT_SLOTS.saturating_sub(d.videos.len());
    let ports = slots * ROOT_PORTS_PER_SLOT;
    let others = d.interfaces.len()
        + d.controllers
            .iter()
            .filter(|c| {
                matches!(c.kind, "scsi" | "virtio-serial")
                    || c.kind == "usb" && c.model.as_deref() != Some("none")
            })
            .count()
        + d.memballoon.as_ref().is_some_and(|m| m.model != "none") as usize
        + d.rngs.len()
        + d.inputs.iter().filter(|i| i.bus == "virtio").count();
    let virtio: Vec<&str> = d
        .disks
        .iter()
        .filter(|disk| disk.bus == "virtio")
        .map(|disk| disk.alias.strip_prefix("ua-").unwrap_or(&disk.alias))
        .collect();
    let room = ports.saturating_sub(others);
    let Some(first) = virtio.get(room) else {
        return Ok(());
    };
    let index = vmi
        .spec
        .domain
        .devices
        .disks
        .iter()
        .position(|x| x.name == *first);
    let field = match index {
        Some(i) => format!("spec.domain.devices.disks[{i}]"),
        None => format!("volume {first}"),
    };
    Err(convert::ConvertError {
        field,
        reason: format!(
            "disk {first:?} does not fit the {} machine's PCIe topology: {} virtio disks are \
             given, at most {room} fit beside the VM's {others} other PCIe devices ({slots} \
             slots of {ROOT_PORTS_PER_SLOT} root ports); put more disks on a virtio-scsi bus \
             (bus: scsi), which takes no root port per disk",
            domain.os.machine,
            virtio.len(),
        ),
    })
}

/// The size KubeVirt gives `disk.img` on a claim of `capacity` bytes: CDI's usable space
/// (see [`cdi::usable_space`]) with the claim's filesystem overhead, CDI's default when the
/// status names none or a nonsense one.
pub fn usable_size(capacity: u64, overhead: Option<&str>) -> u64 {
    cdi::usable_space(capacity, cdi::FilesystemOverhead::or_default(overhead))
}

/// The size `disk.img` of `volume` should have, from the claim's capacity in the VMI status.
pub fn wanted_image_size(vmi: &VirtualMachineInstance, volume: &str) -> Option<u64> {
    let status = vmi.volume_status(volume)?;
    let capacity = status.capacity_bytes()?;
    let overhead = status
        .persistent_volume_claim_info
        .as_ref()
        .and_then(|p| p.filesystem_overhead.as_deref());
    Some(usable_size(capacity, overhead))
}

/// As KubeVirt does, a Filesystem-mode claim that is mounted (its directory exists) but has no
/// `disk.img` gets a sparse one sized to the claim's capacity less the filesystem overhead.
/// Without a known capacity nothing is created (the probe then names the missing file).
fn create_missing_images(
    vmi: &VirtualMachineInstance,
    paths: &crate::convert::facts::PodPaths,
) -> Result<(), PlanError> {
    for v in claim_volumes(vmi) {
        if let Some(size) = wanted_image_size(vmi, v) {
            create_image(paths, v, size)?;
        }
    }
    Ok(())
}

/// The non-hot-plug PVC and DataVolume volumes of `vmi` (the ones at `<volumes dir>/<name>`).
fn claim_volumes(vmi: &VirtualMachineInstance) -> impl Iterator<Item = &str> {
    vmi.spec.volumes.iter().filter_map(|v| {
        let pvc = v
            .persistent_volume_claim
            .as_ref()
            .map(|p| p.hotpluggable)
            .or(v.data_volume.as_ref().map(|d| d.hotpluggable));
        (matches!(pvc, Some(None) | Some(Some(false))) && crate::spec::is_dns1123_label(&v.name))
            .then_some(v.name.as_str())
    })
}

/// Creates `<volumes dir>/<volume>/disk.img`, sparse, of `size` bytes, when the claim is
/// mounted (its directory exists) and has neither a `disk.img` nor a block node. Returns the
/// path when it created the file.
fn create_image(
    paths: &crate::convert::facts::PodPaths,
    volume: &str,
    size: u64,
) -> Result<Option<PathBuf>, PlanError> {
    let dir = paths.vmi_disks_dir.join(volume);
    let image = dir.join("disk.img");
    if !dir.is_dir() || image.exists() || paths.pvc_block(volume).exists() {
        return Ok(None);
    }
    // A `<volume>` directory that is a symlink out of the volumes directory gets nothing.
    crate::pod::facts::confined_pvc_dir(paths, volume)?;
    let err = |source| PlanError::CreateImage {
        volume: volume.to_string(),
        path: image.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&image)
        .map_err(err)?;
    f.set_len(size).map_err(err)?;
    tracing::info!(volume, path = %image.display(), size, "created sparse disk.img for the claim");
    Ok(Some(image))
}

/// On a block-migration target: each local claim of `vmi` named in `sizes` whose `disk.img` is
/// missing gets a sparse one of the source's size, for the copy to land in. A claim the VMI
/// status says is ReadWriteMany is never created (it must be the source's own storage).
/// Returns the volumes and paths created.
pub fn create_copy_targets(
    vmi: &VirtualMachineInstance,
    paths: &crate::convert::facts::PodPaths,
    sizes: &std::collections::HashMap<String, u64>,
) -> Result<Vec<(String, PathBuf)>, PlanError> {
    let mut created = Vec::new();
    for v in claim_volumes(vmi) {
        let Some(&size) = sizes.get(v) else {
            continue;
        };
        if size == 0 || vmi.volume_status(v).is_some_and(|s| s.is_shared()) {
            continue;
        }
        match create_image(paths, v, size) {
            Ok(Some(p)) => created.push((v.to_string(), p)),
            Ok(None) => {}
            Err(e) => {
                for (_, p) in &created {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many_disks(n: usize) -> VirtualMachineInstance {
        let disks: String = (0..n)
            .map(|i| format!("      - name: d{i}\n        disk: {{bus: virtio}}\n"))
            .collect();
        let volumes: String = (0..n)
            .map(|i| format!("  - name: d{i}\n    emptyDisk: {{capacity: 1Mi}}\n"))
            .collect();
        crate::spec::from_str(
            &format!(
                "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {{name: m}}\n\
                 spec:\n  domain:\n    resources: {{requests: {{memory: 64Mi}}}}\n    devices:\n      \
                 disks:\n      - name: cd\n        cdrom: {{bus: sata}}\n{disks}  volumes:\n  - name: cd\n    \
                 emptyDisk: {{capacity: 1Mi}}\n{volumes}"
            ),
            "many.yaml",
        )
        .unwrap()
    }

    /// The measured limit (see [`Q35_ROOT_PORT_SLOTS`]): 229 virtio disks beside the SCSI and
    /// virtio-serial controllers and the balloon; the 230th is named (index 230: a SATA
    /// cdrom comes first and takes no root port).
    #[test]
    fn too_many_disks_for_the_pcie_topology_name_the_first_that_does_not_fit() {
        let convert = |vmi: &VirtualMachineInstance| {
            convert::convert(vmi, &PodFacts::defaults(vmi)).expect("converts")
        };
        let vmi = many_disks(229);
        assert_eq!(pcie_fits(&vmi, &convert(&vmi)), Ok(()));
        let vmi = many_disks(300);
        let e = pcie_fits(&vmi, &convert(&vmi)).unwrap_err();
        assert_eq!(e.field, "spec.domain.devices.disks[230]");
        assert!(
            e.reason.starts_with(
                "disk \"d229\" does not fit the q35 machine's PCIe topology: 300 virtio disks \
                 are given, at most 229 fit beside the VM's 3 other PCIe devices (29 slots of 8 \
                 root ports)"
            ),
            "{}",
            e.reason
        );
    }

    #[test]
    fn usable_size_leaves_the_overhead_and_rounds_to_mib() {
        let gib = 1u64 << 30;
        assert_eq!(
            usable_size(gib, None),
            (gib as f64 * 0.945) as u64 & !((1 << 20) - 1)
        );
        assert_eq!(usable_size(gib, Some("0")), gib);
        assert_eq!(usable_size(gib, Some("0.5")), gib / 2);
        // Nonsense overheads fall back to the default.
        assert_eq!(usable_size(gib, Some("2")), usable_size(gib, None));
        assert_eq!(usable_size(gib, Some("x")), usable_size(gib, None));
    }
}
