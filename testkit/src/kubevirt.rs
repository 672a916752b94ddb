//! Test pieces that play KubeVirt's virt-handler against a launcher: the cmd client (`cmd`)
//! and the notify server (`notify`).

pub mod cmd;
pub mod notify;

pub use cmd::*;
pub use notify::{Mode, NotifyServer, Received};
