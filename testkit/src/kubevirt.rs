//! Test pieces that play KubeVirt's virt-handler against a launcher.

pub mod cmd;

pub use cmd::*;
