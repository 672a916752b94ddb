//! The core's error, and its classification: what a front-end needs to answer a caller
//! (a code and structured details) without looking inside the errors of the layers below.

use crate::libvirt::LibvirtError;
use crate::pod::facts::PodFactsError;
use crate::spec::SpecError;

use super::plan::PlanError;

/// Why an operation failed, in terms a controller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("no domain is running")]
    NoDomain,
    #[error("the running domain belongs to VMI uid {running:?}; this VMI has uid {given:?}")]
    WrongUid { running: String, given: String },
    #[error("{0}")]
    Precondition(String),
    #[error("libvirtd is restarting; retry")]
    Unavailable,
    /// The core has ended: the launcher is on its way out, its domain stopped and undefined.
    #[error("the launcher is stopping")]
    Stopping,
    #[error("volume {volume}: {reason}")]
    Volume { volume: String, reason: String },
    #[error(transparent)]
    Libvirt(LibvirtError),
    #[error("internal task failed: {0}")]
    Internal(String),
}

impl From<LibvirtError> for ControlError {
    fn from(e: LibvirtError) -> Self {
        match e {
            LibvirtError::Disconnected => ControlError::Unavailable,
            LibvirtError::NoDomain(_) => ControlError::NoDomain,
            e => ControlError::Libvirt(e),
        }
    }
}

impl From<tokio::task::JoinError> for ControlError {
    fn from(e: tokio::task::JoinError) -> Self {
        ControlError::Internal(e.to_string())
    }
}

/// What kind of failure an error is, in the vocabulary of gRPC's canonical codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong: a field of the spec, named by [`Classified::field`].
    InvalidArgument,
    /// The request is fine but the launcher, the pod or the domain is not in a state for it.
    FailedPrecondition,
    /// libvirtd is away for a moment: retry.
    Unavailable,
    /// Anything else (a libvirt call failed, a task died).
    Internal,
}

/// An error as a front-end reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub kind: ErrorKind,
    /// A short machine-readable reason (`VolumeNotPresent`, `WrongVMI`, ...); empty for
    /// [`ErrorKind::InvalidArgument`], which names a field instead.
    pub reason: &'static str,
    /// For [`ErrorKind::InvalidArgument`]: the offending field as the user wrote it, and why.
    pub field: Option<(String, String)>,
    /// Details a program can act on (the volume, the uids, libvirt's error code).
    pub metadata: Vec<(&'static str, String)>,
}

impl Classified {
    fn bad_field(field: &str, why: &str) -> Self {
        Classified {
            kind: ErrorKind::InvalidArgument,
            reason: "",
            field: Some((field.to_string(), why.to_string())),
            metadata: Vec::new(),
        }
    }

    fn of(kind: ErrorKind, reason: &'static str, metadata: Vec<(&'static str, String)>) -> Self {
        Classified {
            kind,
            reason,
            field: None,
            metadata,
        }
    }
}

impl ControlError {
    /// How a caller should see this error.
    pub fn classify(&self) -> Classified {
        use ErrorKind::*;
        match self {
            ControlError::Spec(SpecError::Field { field, reason, .. }) => {
                Classified::bad_field(field, reason)
            }
            ControlError::Spec(SpecError::UnknownKind { .. }) => {
                Classified::bad_field("kind", &self.to_string())
            }
            ControlError::Spec(_) => Classified::bad_field("vmi", &self.to_string()),
            ControlError::Plan(PlanError::Convert(c)) => Classified::bad_field(&c.field, &c.reason),
            ControlError::Plan(PlanError::Facts(PodFactsError::Volume { volume, .. })) => {
                Classified::of(
                    FailedPrecondition,
                    "VolumeNotPresent",
                    vec![("volume", volume.clone())],
                )
            }
            ControlError::Plan(PlanError::Facts(PodFactsError::VolumeName { volume })) => {
                Classified::bad_field(
                    "spec.volumes",
                    &format!("volume {volume:?} is not a DNS-1123 label"),
                )
            }
            ControlError::Plan(_) => Classified::of(FailedPrecondition, "PodNotReady", vec![]),
            ControlError::NoDomain => Classified::of(FailedPrecondition, "NoDomain", vec![]),
            ControlError::WrongUid { running, given } => Classified::of(
                FailedPrecondition,
                "WrongVMI",
                vec![("runningUid", running.clone()), ("givenUid", given.clone())],
            ),
            ControlError::Precondition(_) => {
                Classified::of(FailedPrecondition, "WrongState", vec![])
            }
            ControlError::Stopping => Classified::of(FailedPrecondition, "Stopping", vec![]),
            ControlError::Unavailable => Classified::of(Unavailable, "LibvirtReconnecting", vec![]),
            ControlError::Volume { volume, reason } => Classified::of(
                FailedPrecondition,
                "VolumeFailed",
                vec![("volume", volume.clone()), ("reason", reason.clone())],
            ),
            ControlError::Libvirt(LibvirtError::Call { op, code, message }) => Classified::of(
                Internal,
                "LibvirtError",
                vec![
                    ("operation", op.to_string()),
                    ("libvirtCode", code.to_string()),
                    ("libvirtMessage", message.clone()),
                ],
            ),
            ControlError::Libvirt(_) | ControlError::Internal(_) => {
                Classified::of(Internal, "Internal", vec![])
            }
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
        let c = e.classify();
        assert_eq!(c.kind, ErrorKind::InvalidArgument);
        assert_eq!(
            c.field,
            Some((
                "spec.domain.devices.disks[3].bus".to_string(),
                "lun disks cannot use the virtio bus".to_string()
            ))
        );
    }

    #[test]
    fn a_missing_volume_is_a_precondition_naming_the_volume() {
        let e = ControlError::Plan(PlanError::Facts(PodFactsError::Volume {
            volume: "data".into(),
            path: "/v/data/disk.img".into(),
            reason: "missing".into(),
        }));
        let c = e.classify();
        assert_eq!(c.kind, ErrorKind::FailedPrecondition);
        assert_eq!(c.reason, "VolumeNotPresent");
        assert_eq!(c.metadata, vec![("volume", "data".to_string())]);
    }

    #[test]
    fn libvirt_errors_carry_the_libvirt_code() {
        let e = ControlError::Libvirt(LibvirtError::Call {
            op: "attach device",
            code: 38,
            message: "boom".into(),
        });
        let c = e.classify();
        assert_eq!(c.kind, ErrorKind::Internal);
        assert!(c.metadata.contains(&("libvirtCode", "38".to_string())));
        assert_eq!(
            ControlError::Unavailable.classify().kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            ControlError::from(LibvirtError::Disconnected)
                .classify()
                .kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            ControlError::NoDomain.classify().kind,
            ErrorKind::FailedPrecondition
        );
    }
}
