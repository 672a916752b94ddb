//! KubeVirt's front-end: what an unmodified virt-handler speaks to its launcher, served over
//! the same core [`crate::vm::Handle`] as launcher.v1 and on the same socket.
//!
//! - `info`: `kubevirt.cmd.info.CmdInfo` (which cmd versions we serve: `[1]`);
//! - `cmd`: `kubevirt.cmd.v1.Cmd`, the lifecycle calls, answered in-band
//!   (`Response{success, message}`) as KubeVirt's own launcher does.
//!
//! No libvirt calls here: each handler decodes, sends one command to the core and maps the
//! answer.

pub mod cmd;
pub mod info;

/// The generated protobuf types and service traits of KubeVirt's protocols.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod cmd {
        pub mod v1 {
            tonic::include_proto!("kubevirt.cmd.v1");
        }
        pub mod info {
            tonic::include_proto!("kubevirt.cmd.info");
        }
    }
}
