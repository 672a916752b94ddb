//! virt-launcher: turns a KubeVirt `VirtualMachineInstance` into a running libvirt/QEMU domain
//! and supervises it for the lifetime of its pod.
//!
//! Layers, one per concern, lowest first; a module imports only modules below it
//! (each module has its own error type):
//! - [`spec`]: the KubeVirt v1 model (serde), loaded from JSON or YAML through one manifest
//!   reader; CDI's sizing rule ([`spec::cdi`]).
//! - [`domain`]: the libvirt domain model and its XML form.
//! - [`convert`]: a pure function from (VMI, pod facts) to a typed [`domain`] model; its input
//!   types live with it ([`convert::facts`]).
//! - [`libvirt`]: libvirt access through a small pure-Rust client of libvirt's remote RPC
//!   protocol (no libvirt C library is linked).
//! - [`pod`]: the pod's runtime: paths, namespaces, daemons, child processes (the one owner of
//!   `waitpid`), facts probed from the filesystem, files prepared before a start, image
//!   formats told by their first bytes.
//! - [`datavolume`]: standalone DataVolumes: claims imported (http/pvc/blank) into a local
//!   storage directory before the pod facts are probed.
//! - [`vm`]: the core: the one owner of the domain's state (lifecycle, volumes, migration).
//! - [`api`]: the gRPC control API, a thin front-end over [`vm`].
//!
//! `tests/layers.rs` checks every `crate::` path in `src/` against this order.
//!
//! The crate has no `unsafe` code (`unsafe_code = "forbid"` in the workspace's `[lints]`, for
//! every target); system calls go through `nix`.

pub mod api;
pub mod convert;
pub mod datavolume;
pub mod domain;
pub mod libvirt;
pub mod logging;
pub mod pod;
pub mod spec;
pub mod vm;
