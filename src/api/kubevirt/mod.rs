//! The KubeVirt front-end: what KubeVirt's virt-handler speaks to a launcher, over the same
//! core `Handle` as launcher.v1.

pub mod domain;
pub mod notify;
