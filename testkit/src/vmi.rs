//! The VMIs tests and benchmarks run: the test guest with Filesystem-mode PVCs, and the
//! conversion VMI that mixes every kind of volume and bus.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use serde_json::{json, Value};

/// One disk of the test VM: a Filesystem-mode PVC (`<pvcs>/<name>/disk.img`, sparse).
#[derive(Debug, Clone)]
pub struct Disk {
    pub name: String,
    pub bus: &'static str,
    pub size_mib: u64,
}

impl Disk {
    pub fn new(name: impl Into<String>, bus: &'static str, size_mib: u64) -> Disk {
        Disk {
            name: name.into(),
            bus,
            size_mib,
        }
    }

    /// The claim's disk image under the PVC directory `pvcs`.
    pub fn image(&self, pvcs: &Path) -> std::path::PathBuf {
        pvcs.join(&self.name).join("disk.img")
    }

    /// Creates the claim's directory and its sparse disk image under `pvcs`.
    pub fn create(&self, pvcs: &Path) -> io::Result<()> {
        let image = self.image(pvcs);
        let dir = image.parent().expect("a claim directory");
        fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
        sparse_file(&image, self.size_mib << 20)
    }
}

/// A sparse file of `bytes` at `path`.
pub fn sparse_file(path: &Path, bytes: u64) -> io::Result<()> {
    fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| at(path, e))
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A VMI booting the test guest (scripts/build-guest.sh) by kernel boot, as
/// `kubectl get vmi -o yaml` would show the parts the launcher reads.
#[derive(Debug, Clone, Copy)]
pub struct GuestVmi<'a> {
    /// `metadata.name` (namespace `default`: the domain is `default_<name>`).
    pub name: &'a str,
    /// `metadata.uid` (a migration target checks it).
    pub uid: Option<&'a str>,
    pub grace_seconds: u64,
    /// The guest's kernel command line (scripts/guest-init.sh reads its `lv.*` parameters).
    pub kernel_args: &'a str,
    pub disks: &'a [Disk],
    /// `metadata.annotations` lines (`key: value`).
    pub annotations: &'a [String],
    /// Report every claim as ReadWriteMany in `status.volumeStatus` (a live migration needs
    /// shared storage).
    pub rwx: bool,
}

/// The test guest's console and kernel arguments without any `lv.*` parameter.
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet";

impl GuestVmi<'_> {
    /// The VMI as YAML.
    pub fn yaml(&self) -> String {
        let mut disks = String::new();
        let mut volumes = String::new();
        let mut status = String::new();
        for d in self.disks {
            let _ = write!(
                disks,
                "        - name: {}\n          disk:\n            bus: {}\n",
                d.name, d.bus
            );
            let _ = write!(
                volumes,
                "    - name: {n}\n      persistentVolumeClaim:\n        claimName: {n}\n",
                n = d.name
            );
            if self.rwx {
                let _ = write!(
                    status,
                    "    - name: {n}\n      phase: Ready\n      persistentVolumeClaimInfo:\n        \
                     claimName: {n}\n        accessModes: [ReadWriteMany]\n",
                    n = d.name
                );
            }
        }
        if !status.is_empty() {
            status = format!("status:\n  volumeStatus:\n{status}");
        }
        let mut metadata = format!("  name: {}\n  namespace: default\n", self.name);
        if let Some(uid) = self.uid {
            let _ = writeln!(metadata, "  uid: {uid}");
        }
        if !self.annotations.is_empty() {
            metadata.push_str("  annotations:\n");
            for a in self.annotations {
                let _ = writeln!(metadata, "    {a}");
            }
        }
        format!(
            "apiVersion: kubevirt.io/v1\n\
             kind: VirtualMachineInstance\n\
             metadata:\n{metadata}\
             spec:\n  terminationGracePeriodSeconds: {grace}\n  domain:\n\
             \x20   resources:\n      requests:\n        memory: 128Mi\n\
             \x20   firmware:\n      kernelBoot:\n        kernelArgs: \"{args}\"\n\
             \x20       container:\n          image: test-guest\n\
             \x20         kernelPath: /vmlinuz\n          initrdPath: /initramfs.gz\n\
             \x20   devices:\n      disks:\n{disks}\
             \x20 volumes:\n{volumes}{status}",
            grace = self.grace_seconds,
            args = self.kernel_args,
        )
    }

    /// Writes the VMI to `vmi` and creates its PVC images under `pvcs`.
    pub fn write(&self, vmi: &Path, pvcs: &Path) -> io::Result<()> {
        for d in self.disks {
            d.create(pvcs)?;
        }
        fs::write(vmi, self.yaml()).map_err(|e| at(vmi, e))
    }
}

/// A VMI with `n` disks cycling through the volume kinds and buses the converter handles
/// (PVC, DataVolume, containerDisk, emptyDisk, ephemeral and hot-plugged volumes on virtio,
/// SCSI and SATA): what the conversion benchmarks convert.
pub fn mixed_disks(n: usize) -> Value {
    let mut disks = Vec::new();
    let mut volumes = Vec::new();
    let mut status = Vec::new();
    for i in 0..n {
        let name = format!("disk-{i}");
        let (disk, volume) = match i % 6 {
            0 => (
                json!({"name": name, "disk": {"bus": "virtio"}}),
                json!({"name": name, "persistentVolumeClaim": {"claimName": name}}),
            ),
            1 => (
                json!({"name": name, "disk": {"bus": "scsi"}}),
                json!({"name": name, "dataVolume": {"name": name}}),
            ),
            2 => (
                json!({"name": name, "disk": {"bus": "virtio"}, "dedicatedIOThread": true}),
                json!({"name": name, "containerDisk": {"image": "quay.io/x/y:1"}}),
            ),
            3 => (
                json!({"name": name, "cdrom": {"bus": "sata"}}),
                json!({"name": name, "emptyDisk": {"capacity": "1Gi"}}),
            ),
            4 => (
                json!({"name": name, "disk": {"bus": "virtio"}, "cache": "writethrough"}),
                json!({"name": name, "ephemeral": {"persistentVolumeClaim": {"claimName": name}}}),
            ),
            _ => (
                json!({"name": name, "disk": {"bus": "scsi"}}),
                json!({"name": name, "persistentVolumeClaim": {"claimName": name, "hotpluggable": true}}),
            ),
        };
        if i % 6 == 5 {
            status.push(json!({"name": name, "phase": "Ready"}));
        }
        disks.push(disk);
        volumes.push(volume);
    }
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "bench", "namespace": "ns", "uid": "0c9f7a6e-2f7d-4c57-9a59-8b3f6a0c2d11"},
        "spec": {
            "domain": {
                "cpu": {"cores": 4},
                "resources": {"requests": {"memory": "4Gi"}},
                "ioThreadsPolicy": "shared",
                "devices": {"disks": disks, "interfaces": [{"name": "default", "masquerade": {}}]}
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": volumes
        },
        "status": {"volumeStatus": status}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_vmi_parses_with_every_option() {
        let disks = [Disk::new("a", "virtio", 1), Disk::new("b", "scsi", 2)];
        let annotations = ["example.org/x: \"1\"".to_string()];
        let vmi = GuestVmi {
            name: "t",
            uid: Some("00000000-0000-4000-8000-000000000001"),
            grace_seconds: 7,
            kernel_args: KERNEL_ARGS,
            disks: &disks,
            annotations: &annotations,
            rwx: true,
        };
        let v = virt_launcher::spec::from_str(&vmi.yaml(), "test").expect("parses");
        assert_eq!(v.metadata.name, "t");
        assert_eq!(v.spec.termination_grace_period_seconds, Some(7));
        assert_eq!(v.spec.volumes.len(), 2);
        assert_eq!(
            v.metadata
                .annotations
                .get("example.org/x")
                .map(String::as_str),
            Some("1")
        );
    }

    #[test]
    fn mixed_disks_parses() {
        let v =
            virt_launcher::spec::from_str(&mixed_disks(13).to_string(), "test").expect("parses");
        assert_eq!(v.spec.volumes.len(), 13);
    }
}
