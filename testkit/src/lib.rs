//! The launcher harness that the integration tests (`tests/common`) and the benchmark
//! (`bench/`) share: the test guest's VMIs and PVC images, the `virt-launcher run` command
//! line, the guest's console lines, the control API client, and what is found in `/proc`
//! (processes, memory, namespaces) to measure a pod and to clean up after it.
//!
//! Tests wrap it in panicking helpers (`tests/common`); the benchmark in `Result`s that stop a
//! run cleanly. Nothing here knows which of the two calls it.

pub mod guest;
pub mod launcher;
pub mod procs;
pub mod vmi;

use std::path::{Path, PathBuf};

/// The workspace root (the launcher's repository).
pub fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A fresh, empty directory at `path` (whatever was there is removed).
pub fn fresh_dir(path: PathBuf) -> std::io::Result<PathBuf> {
    match std::fs::remove_dir_all(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(&path)?;
    Ok(path)
}
