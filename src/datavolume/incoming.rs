//! The claims of a migration target (`virt-launcher run --vm FILE --migration-target`): what
//! a cluster's storage gives the target pod of a live migration, on one machine.
//!
//! - A `ReadWriteMany` claim is the source's own: the target must use the source's storage
//!   directory, where the claim is complete.
//! - Any other claim (`ReadWriteOnce`) cannot be opened by two launchers at once: the target
//!   gets its own, in its own storage directory, an empty image of the source's size that a
//!   block migration (`launcherctl migrate --block`) fills over NBD. It becomes a complete
//!   claim (`claim.json`) only once the VM has arrived ([`IncomingClaims::arrived`]); a target
//!   that ends without the VM removes it ([`IncomingClaims::abandon`]). Until then a marker
//!   file says the directory is a target's: a later target replaces it, and a later
//!   `run --vm` imports the claim afresh (no `claim.json`), never booting the empty image.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::claim::{self, ClaimMeta};
use super::{io_error, DataVolumeError, DataVolumeSpec};
use crate::spec::VirtualMachineInstance;

/// Marks a claim directory a migration target created and has not filled yet.
pub const INCOMING_MARKER: &str = ".incoming-migration";

/// The claims a migration target created for the VM it awaits.
#[derive(Debug, Default)]
pub struct IncomingClaims {
    created: Vec<(PathBuf, ClaimMeta)>,
    /// The VM arrived: the claims are complete and stay.
    kept: bool,
}

/// Readies the claims of `vmi` (the VM's DataVolume `templates`) in `storage` for an incoming
/// migration. `source_sizes` is volume name to bytes as the source launcher reports its disks;
/// it sizes the claims created here.
pub fn prepare(
    vmi: &VirtualMachineInstance,
    templates: &[DataVolumeSpec],
    storage: &Path,
    source_sizes: &HashMap<String, u64>,
) -> Result<IncomingClaims, DataVolumeError> {
    let mut out = IncomingClaims::default();
    let result = (|| {
        for s in templates {
            prepare_one(vmi, s, storage, source_sizes, &mut out)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(out),
        Err(e) => {
            out.abandon();
            Err(e)
        }
    }
}

fn prepare_one(
    vmi: &VirtualMachineInstance,
    s: &DataVolumeSpec,
    storage: &Path,
    source_sizes: &HashMap<String, u64>,
    out: &mut IncomingClaims,
) -> Result<(), DataVolumeError> {
    let dv = s.claim.to_string();
    let dir = claim::claim_dir(storage, &s.claim);
    let refuse = |reason: String| DataVolumeError::Incoming {
        dv: dv.clone(),
        reason,
    };
    if let Some(meta) = claim::read_meta(&dir) {
        if meta.shared {
            // The source's claim, shared as a ReadWriteMany volume is in a cluster.
            return Ok(());
        }
        return Err(refuse(format!(
            "{} already holds this ReadWriteOnce claim (the source's own, or an old copy): a \
             migration target needs its own --storage-dir for it, where block migration \
             (launcherctl migrate --block) copies the disk; or make the claim ReadWriteMany \
             (spec.dataVolumeTemplates[{}] accessModes) and share the source's",
            dir.display(),
            s.index
        )));
    }
    if s.shared() {
        return Err(refuse(format!(
            "the claim is ReadWriteMany: the target uses the source's, but {} has none; give \
             the target the source's --storage-dir",
            dir.display()
        )));
    }
    if dir.exists() && !dir.join(INCOMING_MARKER).exists() {
        return Err(refuse(format!(
            "{} exists but is not a complete claim; remove it or use another --storage-dir",
            dir.display()
        )));
    }
    // The volumes of the VM that use this claim; the source reports each one's size.
    let volumes: Vec<&str> = vmi
        .spec
        .volumes
        .iter()
        .filter(|v| {
            v.data_volume.as_ref().map(|d| &d.name) == Some(&s.claim.name)
                || v.persistent_volume_claim.as_ref().map(|p| &p.claim_name) == Some(&s.claim.name)
        })
        .map(|v| v.name.as_str())
        .collect();
    if volumes.is_empty() {
        // Not used by the VM: nothing to migrate.
        return Ok(());
    }
    let size = volumes
        .iter()
        .find_map(|v| source_sizes.get(*v).copied())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            refuse(format!(
                "the source launcher of VM {}/{} does not report the size of volume {} (is it \
                 running on this machine?); a ReadWriteOnce claim is created at the source's size",
                vmi.namespace(),
                vmi.metadata.name,
                volumes[0]
            ))
        })?;
    let io = |path: &Path| io_error(&dv, path);
    if dir.exists() {
        // An earlier target's, never filled: start over.
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let marker = dir.join(INCOMING_MARKER);
    let image = dir.join(claim::image_name(s.volume_mode));
    let meta = s.claim_meta(size, false, String::new());
    // Recorded first: a failure below removes the directory.
    out.created.push((dir.clone(), meta));
    fs::write(&marker, b"a migration target's claim, not filled yet\n").map_err(io(&marker))?;
    let f = fs::File::create(&image).map_err(io(&image))?;
    f.set_len(size).map_err(io(&image))?;
    tracing::info!(dataVolume = %dv, claim = %dir.display(), size,
        "empty claim created for the incoming block migration");
    Ok(())
}

impl IncomingClaims {
    /// The VM arrived: the claims created hold its data now and become complete claims.
    pub fn arrived(&mut self) -> Result<(), DataVolumeError> {
        self.kept = true;
        for (dir, meta) in &self.created {
            let dv = format!("{}/{}", meta.namespace, meta.name);
            let mut meta = meta.clone();
            meta.completed_at = claim::rfc3339(SystemTime::now());
            claim::write_meta(dir, &meta).map_err(io_error(&dv, &dir.join(claim::META_FILE)))?;
            let marker = dir.join(INCOMING_MARKER);
            let _ = fs::remove_file(&marker);
            tracing::info!(dataVolume = %dv, claim = %dir.display(), "the migrated claim is complete");
        }
        Ok(())
    }

    /// The VM never arrived: the claims created are removed (also when dropped before
    /// [`IncomingClaims::arrived`]: a launcher that fails after making them leaves none).
    pub fn abandon(&mut self) {
        for (dir, meta) in self.created.drain(..) {
            if dir.join(claim::META_FILE).exists() {
                continue;
            }
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dataVolume = %format!("{}/{}", meta.namespace, meta.name),
                    claim = %dir.display(), "no VM arrived: the empty claim is removed"),
                Err(e) => tracing::warn!(claim = %dir.display(), error = %e,
                    "cannot remove the empty claim of a migration that did not come"),
            }
        }
    }

    /// Whether this target created any claim (a block migration must fill them).
    pub fn is_empty(&self) -> bool {
        self.created.is_empty()
    }
}

impl Drop for IncomingClaims {
    fn drop(&mut self) {
        if !self.kept {
            self.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VirtualMachine;
    use serde_json::json;

    fn vm(mode: &str) -> (VirtualMachineInstance, Vec<DataVolumeSpec>) {
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm"},
            "spec": {
                "dataVolumeTemplates": [{"metadata": {"name": "data"}, "spec": {
                    "source": {"blank": {}},
                    "storage": {"accessModes": [mode], "resources": {"requests": {"storage": "2Mi"}}}}}],
                "template": {"spec": {"domain": {"devices": {}},
                    "volumes": [{"name": "disk0", "dataVolume": {"name": "data"}}]}}}
        }))
        .unwrap();
        let templates = super::super::templates(&vm, "default").unwrap();
        let vmi: VirtualMachineInstance = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm"},
            "spec": {"domain": {"devices": {}},
                "volumes": [{"name": "disk0", "dataVolume": {"name": "data"}}]}
        }))
        .unwrap();
        (vmi, templates)
    }

    fn storage(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("incoming-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// A ReadWriteOnce claim is made empty at the source's size, marked, and removed unless
    /// the VM arrived; then it is complete.
    #[test]
    fn a_readwriteonce_claim_is_made_for_the_copy_and_kept_only_once_the_vm_arrived() {
        let (vmi, templates) = vm("ReadWriteOnce");
        let dir = storage("rwo");
        let sizes: HashMap<String, u64> = [("disk0".to_string(), 3 << 20)].into();
        let claim = dir.join("claims/default/data");

        let made = prepare(&vmi, &templates, &dir, &sizes).unwrap();
        assert!(!made.is_empty());
        assert_eq!(fs::metadata(claim.join("disk.img")).unwrap().len(), 3 << 20);
        assert!(claim.join(INCOMING_MARKER).exists());
        assert!(
            claim::read_meta(&claim).is_none(),
            "complete before the VM came"
        );
        drop(made);
        assert!(!claim.exists(), "left behind without the VM");

        let mut made = prepare(&vmi, &templates, &dir, &sizes).unwrap();
        made.arrived().unwrap();
        drop(made);
        let meta = claim::read_meta(&claim).expect("complete once arrived");
        assert_eq!((meta.size, meta.shared), (3 << 20, false));
        assert!(!claim.join(INCOMING_MARKER).exists());

        // Now a complete ReadWriteOnce claim is here: another target on it is refused.
        let e = prepare(&vmi, &templates, &dir, &sizes)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("DataVolume default/data: ") && e.contains("--storage-dir"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refusals_name_the_datavolume_and_leave_nothing() {
        // No size from the source.
        let (vmi, templates) = vm("ReadWriteOnce");
        let dir = storage("nosize");
        let e = prepare(&vmi, &templates, &dir, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not report the size of volume disk0"),
            "{e}"
        );
        assert!(!dir.join("claims/default/data").exists());
        // A directory that is neither a claim nor a target's.
        fs::create_dir_all(dir.join("claims/default/data")).unwrap();
        let sizes: HashMap<String, u64> = [("disk0".to_string(), 1 << 20)].into();
        let e = prepare(&vmi, &templates, &dir, &sizes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a complete claim"), "{e}");
        assert!(
            dir.join("claims/default/data").exists(),
            "removed a user's directory"
        );
        // A shared claim that is not here.
        let (vmi, templates) = vm("ReadWriteMany");
        let e = prepare(&vmi, &templates, &storage("rwx"), &sizes)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ReadWriteMany") && e.contains("source's --storage-dir"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
