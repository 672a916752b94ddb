//! Test pieces that play KubeVirt's virt-handler against a launcher.

pub mod notify;

pub use notify::{Mode, NotifyServer, Received};
