//! virt-launcher: turns a KubeVirt `VirtualMachineInstance` into a running libvirt/QEMU domain
//! and supervises it for the lifetime of its pod.
//!
//! Layers, one per concern (each module has its own error type):
//! - [`spec`]: the KubeVirt v1 model (serde), loaded from JSON or YAML.
//! - [`datavolume`]: standalone DataVolumes: claims imported (http/pvc/blank) into a local
//!   storage directory before the pod facts are probed.
//! - [`podfacts`]: facts about the pod gathered once before conversion (I/O lives here).
//! - [`convert`]: a pure function from (VMI, pod facts) to a typed [`domain`] model.
//! - [`domain`]: the libvirt domain model and its XML form.
//! - [`libvirt`]: blocking libvirt access through a small pure-Rust client of libvirt's remote
//!   RPC protocol (no libvirt C library is linked).
//! - [`pod`]: the pod's private runtime: namespaces, directories, libvirtd and virtlogd.
//! - [`supervisor`]: lifecycle, signals, reaping and grace periods.
//!
//! The crate has no `unsafe` code (`forbid(unsafe_code)`); system calls go through `nix`.

#![forbid(unsafe_code)]

pub mod api;
pub mod convert;
pub mod datavolume;
pub mod domain;
pub mod libvirt;
pub mod logging;
pub mod pod;
pub mod podfacts;
pub mod prepare;
pub mod spec;
pub mod supervisor;
