//! libvirt's numeric event codes turned into named, typed events.

use serde::Serialize;

use super::consts as c;

/// An event exactly as libvirt reported it (the numeric codes of libvirt's C API).
#[derive(Debug, Clone, PartialEq)]
pub enum RawEvent {
    Lifecycle {
        domain: String,
        event: i32,
        detail: i32,
    },
    Reboot {
        domain: String,
    },
    Watchdog {
        domain: String,
        action: i32,
    },
    IoError {
        domain: String,
        src_path: String,
        alias: String,
        action: i32,
        reason: String,
    },
    DeviceRemoved {
        domain: String,
        alias: String,
    },
    DeviceRemovalFailed {
        domain: String,
        alias: String,
    },
    JobCompleted {
        domain: String,
        /// The finished job's statistics (a migration's downtime, total time, data).
        stats: Vec<(String, f64)>,
    },
    AgentLifecycle {
        domain: String,
        state: i32,
        reason: i32,
    },
    /// The connection to libvirtd ended (`virConnectCloseReason`: 0 error, 1 end of file).
    ConnectionClosed {
        reason: i32,
    },
}

/// What a lifecycle event says happened to the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LifecycleKind {
    Defined,
    Undefined,
    Started,
    /// Paused; the detail says why.
    Suspended(PauseReason),
    Resumed,
    /// QEMU is gone; the detail says why.
    Stopped(StopReason),
    /// The guest began shutting down (QEMU still runs).
    ShuttingDown,
    PmSuspended,
    Crashed,
    Unknown(i32),
}

/// Why the domain was paused (`virDomainEventSuspendedDetailType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PauseReason {
    /// Asked for (virDomainSuspend).
    Paused,
    /// For the switch-over of a migration.
    Migrated,
    /// An I/O error with error policy stop.
    IoError,
    Watchdog,
    Restored,
    FromSnapshot,
    ApiError,
    /// Post-copy migration running.
    Postcopy,
    PostcopyFailed,
    Unknown,
}

impl PauseReason {
    fn from_detail(detail: u32) -> PauseReason {
        match detail {
            0 => PauseReason::Paused,
            1 => PauseReason::Migrated,
            2 => PauseReason::IoError,
            3 => PauseReason::Watchdog,
            4 => PauseReason::Restored,
            5 => PauseReason::FromSnapshot,
            6 => PauseReason::ApiError,
            7 => PauseReason::Postcopy,
            8 => PauseReason::PostcopyFailed,
            _ => PauseReason::Unknown,
        }
    }

    /// How the core words it in the domain's state reason.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Paused => "paused",
            PauseReason::Migrated => "migration",
            PauseReason::IoError => "ioerror",
            PauseReason::Watchdog => "watchdog",
            PauseReason::Restored => "restored",
            PauseReason::FromSnapshot => "fromsnapshot",
            PauseReason::ApiError => "api error",
            PauseReason::Postcopy => "postcopy",
            PauseReason::PostcopyFailed => "postcopy failed",
            PauseReason::Unknown => "unknown",
        }
    }
}

/// Why the domain stopped (`virDomainEventStoppedDetailType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    Shutdown,
    Destroyed,
    Crashed,
    Migrated,
    Saved,
    Failed,
    FromSnapshot,
    Unknown,
}

impl StopReason {
    /// A stop that is the expected end of a VM's life (exit 0), as opposed to a crash.
    pub fn is_clean(self) -> bool {
        matches!(
            self,
            StopReason::Shutdown | StopReason::Destroyed | StopReason::Migrated | StopReason::Saved
        )
    }
}

/// A domain event, named.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DomainEvent {
    Lifecycle {
        domain: String,
        kind: LifecycleKind,
    },
    Reboot {
        domain: String,
    },
    Watchdog {
        domain: String,
        action: i32,
    },
    IoError {
        domain: String,
        alias: String,
        path: String,
        reason: String,
    },
    DeviceRemoved {
        domain: String,
        alias: String,
    },
    DeviceRemovalFailed {
        domain: String,
        alias: String,
    },
    JobCompleted {
        domain: String,
        /// The finished job's statistics (a migration's downtime, total time, data).
        stats: Vec<(String, f64)>,
    },
    AgentConnected {
        domain: String,
        connected: bool,
    },
    ConnectionClosed {
        reason: i32,
    },
}

impl From<RawEvent> for DomainEvent {
    fn from(raw: RawEvent) -> Self {
        match raw {
            RawEvent::Lifecycle {
                domain,
                event,
                detail,
            } => DomainEvent::Lifecycle {
                domain,
                kind: lifecycle_kind(event, detail),
            },
            RawEvent::Reboot { domain } => DomainEvent::Reboot { domain },
            RawEvent::Watchdog { domain, action } => DomainEvent::Watchdog { domain, action },
            RawEvent::IoError {
                domain,
                src_path,
                alias,
                reason,
                ..
            } => DomainEvent::IoError {
                domain,
                alias,
                path: src_path,
                reason,
            },
            RawEvent::DeviceRemoved { domain, alias } => {
                DomainEvent::DeviceRemoved { domain, alias }
            }
            RawEvent::DeviceRemovalFailed { domain, alias } => {
                DomainEvent::DeviceRemovalFailed { domain, alias }
            }
            RawEvent::JobCompleted { domain, stats } => DomainEvent::JobCompleted { domain, stats },
            RawEvent::AgentLifecycle { domain, state, .. } => DomainEvent::AgentConnected {
                domain,
                connected: state
                    == c::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED as i32,
            },
            RawEvent::ConnectionClosed { reason } => DomainEvent::ConnectionClosed { reason },
        }
    }
}

impl DomainEvent {
    /// The domain the event is about, if it is about one.
    pub fn domain(&self) -> Option<&str> {
        match self {
            DomainEvent::Lifecycle { domain, .. }
            | DomainEvent::Reboot { domain }
            | DomainEvent::Watchdog { domain, .. }
            | DomainEvent::IoError { domain, .. }
            | DomainEvent::DeviceRemoved { domain, .. }
            | DomainEvent::DeviceRemovalFailed { domain, .. }
            | DomainEvent::JobCompleted { domain, .. }
            | DomainEvent::AgentConnected { domain, .. } => Some(domain),
            DomainEvent::ConnectionClosed { .. } => None,
        }
    }
}

fn lifecycle_kind(event: i32, detail: i32) -> LifecycleKind {
    let (event, detail) = (event as u32, detail as u32);
    match event {
        c::VIR_DOMAIN_EVENT_DEFINED => LifecycleKind::Defined,
        c::VIR_DOMAIN_EVENT_UNDEFINED => LifecycleKind::Undefined,
        c::VIR_DOMAIN_EVENT_STARTED => LifecycleKind::Started,
        c::VIR_DOMAIN_EVENT_SUSPENDED => LifecycleKind::Suspended(PauseReason::from_detail(detail)),
        c::VIR_DOMAIN_EVENT_RESUMED => LifecycleKind::Resumed,
        c::VIR_DOMAIN_EVENT_STOPPED => LifecycleKind::Stopped(match detail {
            c::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => StopReason::Shutdown,
            c::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => StopReason::Destroyed,
            c::VIR_DOMAIN_EVENT_STOPPED_CRASHED => StopReason::Crashed,
            c::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => StopReason::Migrated,
            c::VIR_DOMAIN_EVENT_STOPPED_SAVED => StopReason::Saved,
            c::VIR_DOMAIN_EVENT_STOPPED_FAILED => StopReason::Failed,
            c::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => StopReason::FromSnapshot,
            _ => StopReason::Unknown,
        }),
        c::VIR_DOMAIN_EVENT_SHUTDOWN => LifecycleKind::ShuttingDown,
        c::VIR_DOMAIN_EVENT_PMSUSPENDED => LifecycleKind::PmSuspended,
        c::VIR_DOMAIN_EVENT_CRASHED => LifecycleKind::Crashed,
        other => LifecycleKind::Unknown(other as i32),
    }
}

/// The name of a `virDomainState`.
pub fn state_name(state: u32) -> &'static str {
    match state {
        c::VIR_DOMAIN_RUNNING => "Running",
        c::VIR_DOMAIN_BLOCKED => "Blocked",
        c::VIR_DOMAIN_PAUSED => "Paused",
        c::VIR_DOMAIN_SHUTDOWN => "ShuttingDown",
        c::VIR_DOMAIN_SHUTOFF => "Shutoff",
        c::VIR_DOMAIN_CRASHED => "Crashed",
        c::VIR_DOMAIN_PMSUSPENDED => "PMSuspended",
        _ => "NoState",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_details_map_to_reasons() {
        let ev = DomainEvent::from(RawEvent::Lifecycle {
            domain: "default_vm".into(),
            event: c::VIR_DOMAIN_EVENT_STOPPED as i32,
            detail: c::VIR_DOMAIN_EVENT_STOPPED_MIGRATED as i32,
        });
        assert_eq!(
            ev,
            DomainEvent::Lifecycle {
                domain: "default_vm".into(),
                kind: LifecycleKind::Stopped(StopReason::Migrated)
            }
        );
        assert!(StopReason::Migrated.is_clean());
        assert!(!StopReason::Crashed.is_clean());
        assert!(!StopReason::Failed.is_clean());
    }

    #[test]
    fn unknown_event_codes_are_kept() {
        assert_eq!(lifecycle_kind(99, 0), LifecycleKind::Unknown(99));
        assert_eq!(
            lifecycle_kind(c::VIR_DOMAIN_EVENT_SUSPENDED as i32, 2),
            LifecycleKind::Suspended(PauseReason::IoError)
        );
        assert_eq!(
            lifecycle_kind(c::VIR_DOMAIN_EVENT_SUSPENDED as i32, 0),
            LifecycleKind::Suspended(PauseReason::Paused)
        );
        assert_eq!(state_name(42), "NoState");
        assert_eq!(state_name(c::VIR_DOMAIN_PAUSED), "Paused");
    }
}
