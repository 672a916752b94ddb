//! A VirtualMachine manifest with `spec.dataVolumeTemplates` (JSON or YAML) as standalone
//! DataVolume import reads it: the VM loader, then each template validated into what import
//! needs, and the disk size derived from it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virt_launcher::datavolume::spec::{self as dvspec, VolumeMode};
use virt_launcher::datavolume::{self, spec::StorageForm};
use virt_launcher::spec::cdi::ALIGN;

/// The loader reads a file: one scratch file per fuzzing process.
fn scratch() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::path::Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("fuzz-datavolume-{}.yaml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(scratch(), data).expect("write the scratch manifest");
    let Ok(vm) = datavolume::load_vm(scratch()) else {
        return;
    };
    let vmi = vm.clone().into_vmi();
    let namespace = vmi.namespace();
    for (index, t) in vm.spec.data_volume_templates.iter().enumerate() {
        if t.metadata.name.is_empty() {
            continue; // refused by the import before it parses the template
        }
        let Ok(s) = dvspec::parse(
            namespace,
            index,
            &t.metadata.name,
            t.metadata.namespace.as_deref(),
            &t.spec,
        ) else {
            continue;
        };
        assert_eq!(s.claim.namespace, namespace);
        assert_eq!(s.claim.name, t.metadata.name);
        if let Some((_, bytes)) = s.requested {
            let size = s.disk_size(bytes);
            match (s.volume_mode, s.form) {
                // Less the filesystem overhead, rounded down.
                (VolumeMode::Filesystem, StorageForm::Pvc) => {
                    assert!(size <= bytes && size % ALIGN == 0, "{bytes} → {size}")
                }
                // Rounded up to 1 MiB (saturating at the top of the range).
                _ => assert!(
                    size == u64::MAX
                        || (size >= bytes && size % ALIGN == 0 && size - bytes < ALIGN),
                    "{bytes} → {size}"
                ),
            }
        }
    }
});
