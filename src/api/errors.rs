//! [`ControlError`] → gRPC status with structured details a program can act on.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::libvirt::LibvirtError;
use crate::pod::facts::PodFactsError;
use crate::spec::SpecError;
use crate::vm::core::ControlError;
use crate::vm::plan::PlanError;

/// The ErrorInfo domain of our errors.
pub const ERROR_DOMAIN: &str = "launcher.kubevirt.io";

fn info(code: Code, msg: String, reason: &str, meta: &[(&str, String)]) -> Status {
    let metadata: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Status::with_error_details(
        code,
        msg,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

fn bad_field(field: &str, reason: &str, msg: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        msg,
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

pub fn to_status(e: &ControlError) -> Status {
    let msg = e.to_string();
    match e {
        ControlError::Spec(SpecError::Field { field, reason, .. }) => bad_field(field, reason, msg),
        ControlError::Spec(SpecError::UnknownKind { .. }) => bad_field("kind", &msg, msg.clone()),
        ControlError::Spec(_) => bad_field("vmi", &msg, msg.clone()),
        ControlError::Plan(PlanError::Convert(c)) => bad_field(&c.field, &c.reason, msg),
        ControlError::Plan(PlanError::Facts(PodFactsError::Volume { volume, .. })) => info(
            Code::FailedPrecondition,
            msg,
            "VolumeNotPresent",
            &[("volume", volume.clone())],
        ),
        ControlError::Plan(PlanError::Facts(PodFactsError::VolumeName { volume })) => bad_field(
            "spec.volumes",
            &format!("volume {volume:?} is not a DNS-1123 label"),
            msg,
        ),
        ControlError::Plan(_) => info(Code::FailedPrecondition, msg, "PodNotReady", &[]),
        ControlError::NoDomain => info(Code::FailedPrecondition, msg, "NoDomain", &[]),
        ControlError::WrongUid { running, given } => info(
            Code::FailedPrecondition,
            msg,
            "WrongVMI",
            &[("runningUid", running.clone()), ("givenUid", given.clone())],
        ),
        ControlError::Precondition(_) => info(Code::FailedPrecondition, msg, "WrongState", &[]),
        ControlError::Unavailable => info(Code::Unavailable, msg, "LibvirtReconnecting", &[]),
        ControlError::Volume { volume, reason } => info(
            Code::FailedPrecondition,
            msg,
            "VolumeFailed",
            &[("volume", volume.clone()), ("reason", reason.clone())],
        ),
        ControlError::Libvirt(LibvirtError::Call { op, code, message }) => info(
            Code::Internal,
            msg,
            "LibvirtError",
            &[
                ("operation", op.to_string()),
                ("libvirtCode", code.to_string()),
                ("libvirtMessage", message.clone()),
            ],
        ),
        ControlError::Libvirt(_) | ControlError::Internal(_) => {
            info(Code::Internal, msg, "Internal", &[])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::ConvertError;

    #[test]
    fn a_bad_field_is_invalid_argument_with_the_field_path() {
        let e = ControlError::Plan(PlanError::Convert(ConvertError {
            field: "spec.domain.devices.disks[3].bus".into(),
            reason: "lun disks cannot use the virtio bus".into(),
        }));
        let s = to_status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(
            br.field_violations[0].field,
            "spec.domain.devices.disks[3].bus"
        );
    }

    #[test]
    fn libvirt_errors_carry_the_libvirt_code() {
        let e = ControlError::Libvirt(LibvirtError::Call {
            op: "attach device",
            code: 38,
            message: "boom".into(),
        });
        let s = to_status(&e);
        assert_eq!(s.code(), Code::Internal);
        let info = s.get_details_error_info().expect("ErrorInfo detail");
        assert_eq!(
            info.metadata.get("libvirtCode").map(String::as_str),
            Some("38")
        );
        assert_eq!(
            to_status(&ControlError::Unavailable).code(),
            Code::Unavailable
        );
        assert_eq!(
            to_status(&ControlError::NoDomain).code(),
            Code::FailedPrecondition
        );
    }
}
