//! KubeVirt's front-end: what an unmodified virt-handler speaks to its launcher, over the
//! same core [`crate::vm::Handle`] as launcher.v1 (no libvirt calls here).
//!
//! - `info`: `kubevirt.cmd.info.CmdInfo` (which cmd versions we serve: `[1]`);
//! - `cmd`: `kubevirt.cmd.v1.Cmd`, the lifecycle calls, served on the launcher's socket beside
//!   launcher.v1 and answered in-band (`Response{success, message}`) as KubeVirt's own
//!   launcher does: each handler decodes, sends one command to the core and maps the answer;
//! - `domain`: the `api.Domain` JSON virt-handler reads (GetDomain, notify events);
//! - `notify`: the client of the handler's notify server;
//! - `migration`: the migration peer of virt-handler's proxies, the VMI's migration state;
//! - `options`: the handler's migration options JSON;
//! - `probe`: `virt-probe`, the client the pod's exec and guest-agent-ping probes run.

pub mod auth;
pub mod cmd;
pub mod domain;
pub mod guest;
pub mod info;
pub mod migration;
pub mod notify;
pub mod options;
pub mod probe;

/// The generated protobuf types and service traits of KubeVirt's cmd protocol.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod cmd {
        pub mod v1 {
            tonic::include_proto!("kubevirt.cmd.v1");
        }
        pub mod info {
            tonic::include_proto!("kubevirt.cmd.info");
        }
        pub mod auth {
            tonic::include_proto!("kubevirt.cmd.auth");
        }
    }
}
