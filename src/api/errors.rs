//! The core's errors → gRPC status with structured details a program can act on. The core
//! classifies its own errors ([`ControlError::classify`]); this only maps the classification.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::vm::{ControlError, ErrorKind};

/// The ErrorInfo domain of our errors.
pub const ERROR_DOMAIN: &str = "launcher.kubevirt.io";

pub fn to_status(e: &ControlError) -> Status {
    let msg = e.to_string();
    let c = e.classify();
    let code = match c.kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    match c.field {
        Some((field, reason)) => Status::with_error_details(
            code,
            msg,
            ErrorDetails::with_bad_request_violation(field, reason),
        ),
        None => {
            let metadata: HashMap<String, String> = c
                .metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            Status::with_error_details(
                code,
                msg,
                ErrorDetails::with_error_info(c.reason, ERROR_DOMAIN, metadata),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_invalid_argument_with_the_field_path() {
        let e = ControlError::Spec(crate::spec::SpecError::Field {
            origin: "SyncRequest.vmi".into(),
            field: "spec.domain.devices.disks[3].bus".into(),
            reason: "lun disks cannot use the virtio bus".into(),
        });
        let s = to_status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(
            br.field_violations[0].field,
            "spec.domain.devices.disks[3].bus"
        );
    }

    #[test]
    fn details_carry_the_reason_and_metadata() {
        let e = ControlError::WrongUid {
            running: "a".into(),
            given: "b".into(),
        };
        let s = to_status(&e);
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_details_error_info().expect("ErrorInfo detail");
        assert_eq!(info.reason, "WrongVMI");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.get("givenUid").map(String::as_str), Some("b"));
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
