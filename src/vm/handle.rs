//! The one way into the core: a [`Command`] sent through a [`Handle`] to the owner task, which
//! answers through a oneshot; and the reads, which come from the watched status, the VMI, and
//! the event log and never wait for libvirt or for the command being handled.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::agent::ExecOutcome;
use super::error::ControlError;
use super::migration::{MigrateOptions, MigrationOutcome, MigrationPeer};
use super::state::{Event, EventLog, Gap, Status, TargetInfo};
use crate::libvirt::DomainStats;
use crate::spec::VirtualMachineInstance;

/// Everything the core can be asked to do.
pub enum Command {
    /// Start the VMI, or reconcile the running domain to it (hot-plug, unplug, expand).
    Sync(VirtualMachineInstance),
    /// Press the ACPI button and start the grace clock (None: the VMI's grace period).
    Shutdown {
        grace: Option<Duration>,
    },
    /// Destroy the domain now.
    Kill,
    Pause,
    Unpause,
    Reboot,
    /// Freeze the guest's filesystems; they are thawed by themselves after `timeout`.
    Freeze {
        timeout: Duration,
    },
    Unfreeze,
    /// The domain's statistics.
    Stats,
    /// Run a command in the guest through the guest agent; wait `timeout` for it to exit.
    Exec {
        path: String,
        args: Vec<String>,
        timeout: Duration,
    },
    /// Ping the guest agent; it must answer within `timeout`.
    GuestPing {
        timeout: Duration,
    },
    /// libvirt's and QEMU's versions.
    Versions,
    /// The live domain XML.
    DomainXml,
    /// Get ready to receive `vmi` by migration (`disk_sizes`: volume to bytes, for block
    /// migration).
    PrepareMigrationTarget {
        vmi: VirtualMachineInstance,
        disk_sizes: HashMap<String, u64>,
    },
    /// Migrate the running VM to the target launcher `peer` speaks for.
    Migrate {
        peer: Box<dyn MigrationPeer>,
        options: MigrateOptions,
    },
    /// Stop the migration under way; the VM stays here.
    CancelMigration,
    /// Reset the guest (the reset button: no shutdown).
    Reset,
    /// KubeVirt's Sync, from virt-handler: from now on the handler drives the domain's end
    /// (see [`Command::AcpiShutdown`], [`Command::Delete`]; a stopped domain stays defined
    /// until Delete). Starts the domain only when none has run and the VMI's `status.phase`
    /// is neither `Running` nor final; reconciles a running domain; leaves a stopped one be.
    HandlerSync(VirtualMachineInstance),
    /// KubeVirt's SyncVirtualMachineCPUs: the running domain gets the vCPUs of the VMI's
    /// sockets online (CPU hot-plug up to the `maxSockets` it started with).
    HandlerSyncVcpus(VirtualMachineInstance),
    /// KubeVirt's Shutdown: press the ACPI button (again, each time: a booting guest may miss
    /// it); the first one stamps `KubevirtMetadata::deletion_timestamp`. No grace clock: the
    /// handler decides on Kill. Nothing to do (no domain, or stopped) is no error.
    AcpiShutdown,
    /// KubeVirt's Delete: remove the stopped domain's definition; the launcher then ends
    /// (its final event says so). No domain is no error (and ends nothing).
    Delete,
    /// KubeVirt's SyncMigrationTarget: get ready to receive `vmi` through the handler's
    /// proxies (creates `proxy_dir`, where the incoming QEMU listens); the KubeVirt metadata
    /// gets the migration's `uid` and start, and its end once the incoming job is over.
    /// Again for the same VMI while waiting: nothing more to do.
    HandlerMigrationTarget {
        vmi: VirtualMachineInstance,
        migration_uid: String,
        proxy_dir: PathBuf,
    },
    /// KubeVirt's MigrateVirtualMachine: answered once the migration has started (or was
    /// refused); its progress and result go only into the KubeVirt metadata (`uid`:
    /// the handler's migration uid). The same uid again while it runs: nothing to do.
    HandlerMigrate {
        migration_uid: String,
        peer: Box<dyn MigrationPeer>,
        options: MigrateOptions,
    },
    /// KubeVirt's SignalTargetPodCleanup addressed to this pod: a migration target whose VM
    /// has not arrived ends (nothing of it is left); otherwise nothing to do.
    TargetCleanup,
    /// Snapshot every claim of the running VM into the storage directory as `name`.
    Snapshot {
        name: String,
    },
}

impl Command {
    /// Stops and the cancellation of a migration go before everything else, even while an
    /// operation runs.
    pub(crate) fn is_urgent(&self) -> bool {
        matches!(
            self,
            Command::Shutdown { .. }
                | Command::Kill
                | Command::CancelMigration
                | Command::AcpiShutdown
                | Command::Delete
                | Command::TargetCleanup
        )
    }

    /// Commands only virt-handler sends (KubeVirt's front-end): the handler drives the end.
    pub(crate) fn is_handlers(&self) -> bool {
        matches!(
            self,
            Command::HandlerSync(_)
                | Command::HandlerSyncVcpus(_)
                | Command::AcpiShutdown
                | Command::Delete
                | Command::HandlerMigrationTarget { .. }
                | Command::HandlerMigrate { .. }
                | Command::TargetCleanup
        )
    }

    /// Operations that change the domain run one at a time, in arrival order; reads of
    /// libvirt (statistics, versions) and the guest agent's probes run beside them.
    pub(crate) fn is_exclusive(&self) -> bool {
        !matches!(
            self,
            Command::Stats
                | Command::Versions
                | Command::DomainXml
                | Command::Exec { .. }
                | Command::GuestPing { .. }
        ) && !self.is_urgent()
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Command::Sync(_) => "Sync",
            Command::Shutdown { .. } => "Shutdown",
            Command::Kill => "Kill",
            Command::Pause => "Pause",
            Command::Unpause => "Unpause",
            Command::Reboot => "Reboot",
            Command::Freeze { .. } => "Freeze",
            Command::Unfreeze => "Unfreeze",
            Command::Stats => "Stats",
            Command::Exec { .. } => "Exec",
            Command::GuestPing { .. } => "GuestPing",
            Command::Versions => "Versions",
            Command::DomainXml => "DomainXml",
            Command::PrepareMigrationTarget { .. } => "PrepareMigrationTarget",
            Command::Migrate { .. } => "Migrate",
            Command::CancelMigration => "CancelMigration",
            Command::Reset => "Reset",
            Command::HandlerSync(_) => "HandlerSync",
            Command::HandlerSyncVcpus(_) => "HandlerSyncVcpus",
            Command::AcpiShutdown => "AcpiShutdown",
            Command::Delete => "Delete",
            Command::HandlerMigrationTarget { .. } => "HandlerMigrationTarget",
            Command::HandlerMigrate { .. } => "HandlerMigrate",
            Command::TargetCleanup => "TargetCleanup",
            Command::Snapshot { .. } => "Snapshot",
        }
    }
}

/// What a command answers.
// A reply is moved once, through a oneshot: its size does not matter.
#[derive(Debug)]
pub enum Reply {
    /// Done; nothing to report.
    Done,
    /// The domain after a Sync.
    Status(Box<Status>),
    /// How many filesystems were frozen or thawed.
    Filesystems(i32),
    /// The statistics, and the volume of each disk target they cover.
    Stats {
        stats: DomainStats,
        disks: Vec<(String, String)>,
    },
    Versions {
        libvirt: String,
        qemu: String,
    },
    /// Where the prepared target listens.
    Target(TargetInfo),
    /// The live domain XML.
    Xml(String),
    /// How a command run in the guest ended.
    Exec(ExecOutcome),
    /// How the migration ended.
    Migrated(MigrationOutcome),
    /// The snapshot taken.
    Snapshot(Box<super::snapshot::SnapshotOutcome>),
}

/// The answer to a command.
pub type Answer = Result<Reply, ControlError>;

/// What the owner task receives.
pub(crate) enum Request {
    Command(Box<Command>, oneshot::Sender<Answer>),
    /// The automatic thaw of freeze number `generation` is due.
    AutoThaw {
        generation: u64,
    },
}

/// A cheap, cloneable way into the core, for the front-ends.
#[derive(Clone)]
pub struct Handle {
    pub(crate) requests: mpsc::UnboundedSender<Request>,
    pub(crate) urgent: mpsc::UnboundedSender<Request>,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) vmi: watch::Receiver<Option<Arc<VirtualMachineInstance>>>,
    pub(crate) console_log: watch::Receiver<Option<PathBuf>>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) domain_type: String,
    /// KubeVirt's pod: `<share dir>/migrationproxy`.
    pub(crate) migration_proxy_dir: Option<PathBuf>,
}

impl Handle {
    /// Sends `command` to the core and waits for its answer.
    pub async fn send(&self, command: Command) -> Answer {
        let (tx, rx) = oneshot::channel();
        let channel = if command.is_urgent() {
            &self.urgent
        } else {
            &self.requests
        };
        channel
            .send(Request::Command(Box::new(command), tx))
            .map_err(|_| ControlError::Stopping)?;
        // The owner ended with the request unanswered.
        rx.await.map_err(|_| ControlError::Stopping)?
    }

    /// The domain as last known.
    pub fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.last_seq = self.events.last_seq();
        s
    }

    /// Waits until the domain's status satisfies `done` (at once if it does now); `false` when
    /// the core ended first.
    pub async fn wait_status(&self, done: impl FnMut(&Status) -> bool) -> bool {
        self.status.clone().wait_for(done).await.is_ok()
    }

    /// The events after `after`, and the live ones to come.
    pub fn subscribe(&self, after: u64) -> Result<(Vec<Event>, broadcast::Receiver<Event>), Gap> {
        self.events.subscribe(after)
    }

    /// The VMI as last synced, as JSON (as `kubectl get vmi -o json` shows it: fields that
    /// are not set are left out, not written as `null`; that doubled the size of every Sync
    /// built from this).
    pub fn vmi_json(&self) -> Result<Vec<u8>, ControlError> {
        let vmi = self.vmi.borrow().clone().ok_or(ControlError::NoDomain)?;
        let mut doc =
            serde_json::to_value(&*vmi).map_err(|e| ControlError::Internal(e.to_string()))?;
        drop_nulls(&mut doc);
        serde_json::to_vec(&doc).map_err(|e| ControlError::Internal(e.to_string()))
    }

    /// The guest's serial console log, once a domain was planned.
    pub fn console_log(&self) -> Option<PathBuf> {
        self.console_log.borrow().clone()
    }

    /// `kvm` or `qemu`.
    pub fn domain_type(&self) -> &str {
        &self.domain_type
    }

    /// KubeVirt's pod: where the handler's migration proxies (and an incoming QEMU) put
    /// their sockets.
    pub fn migration_proxy_dir(&self) -> Option<&std::path::Path> {
        self.migration_proxy_dir.as_deref()
    }
}

/// Removes every `null` member of the objects in `v`, at any depth.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle on bare channels (no owner, no libvirt).
    fn handle() -> (
        Handle,
        mpsc::UnboundedReceiver<Request>,
        mpsc::UnboundedReceiver<Request>,
    ) {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let h = Handle {
            requests,
            urgent,
            status: watch::channel(Status::default()).1,
            vmi: watch::channel(None).1,
            console_log: watch::channel(None).1,
            events: Arc::new(EventLog::new(16)),
            domain_type: "qemu".into(),
            migration_proxy_dir: None,
        };
        (h, requests_rx, urgent_rx)
    }

    fn answer(req: Option<Request>, reply: Reply) -> &'static str {
        match req {
            Some(Request::Command(cmd, tx)) => {
                let _ = tx.send(Ok(reply));
                cmd.name()
            }
            _ => "nothing",
        }
    }

    #[tokio::test]
    async fn stops_and_cancel_take_the_urgent_channel_and_the_rest_the_queue() {
        let (h, mut requests, mut urgent) = handle();
        for (cmd, want_urgent) in [
            (Command::Kill, true),
            (Command::Shutdown { grace: None }, true),
            (Command::CancelMigration, true),
            (Command::Pause, false),
            (Command::Stats, false),
            (Command::Unfreeze, false),
        ] {
            let name = cmd.name();
            let h = h.clone();
            let call = tokio::spawn(async move { h.send(cmd).await });
            let got = if want_urgent {
                answer(urgent.recv().await, Reply::Done)
            } else {
                answer(requests.recv().await, Reply::Done)
            };
            assert_eq!(got, name);
            assert!(matches!(call.await.unwrap(), Ok(Reply::Done)), "{name}");
        }
        assert!(requests.try_recv().is_err() && urgent.try_recv().is_err());
    }

    #[test]
    fn only_domain_changes_are_exclusive() {
        assert!(Command::Pause.is_exclusive() && Command::Unfreeze.is_exclusive());
        assert!(!Command::Stats.is_exclusive() && !Command::Versions.is_exclusive());
        assert!(!Command::Kill.is_exclusive() && Command::Kill.is_urgent());
        assert!(!Command::Reboot.is_urgent());
    }

    #[tokio::test]
    async fn a_stopped_core_answers_that_it_is_stopping() {
        let (h, requests, urgent) = handle();
        drop((requests, urgent));
        for cmd in [Command::Pause, Command::Kill] {
            let e = h.send(cmd).await.unwrap_err();
            assert!(matches!(e, ControlError::Stopping), "{e}");
            assert!(e.to_string().contains("stopping"), "{e}");
        }
        // An owner that takes a command and drops it unanswered (it stopped meanwhile).
        let (h, mut requests, _urgent) = handle();
        let owner = tokio::spawn(async move { drop(requests.recv().await) });
        let e = h.send(Command::Reboot).await.unwrap_err();
        assert!(matches!(e, ControlError::Stopping), "{e}");
        owner.await.unwrap();
    }

    #[test]
    fn reads_come_from_the_watched_status_and_the_log() {
        let (mut h, _r, _u) = handle();
        let (tx, rx) = watch::channel(Status::default());
        h.status = rx;
        tx.send_modify(|s| s.name = "default_vm".into());
        h.events
            .push(Event::new(super::super::state::EventKind::Daemon));
        let s = h.status();
        assert_eq!(s.name, "default_vm");
        assert_eq!(s.last_seq, 1);
        assert!(matches!(h.vmi_json(), Err(ControlError::NoDomain)));
    }

    #[test]
    fn nulls_are_left_out_at_every_depth() {
        let mut v = serde_json::json!({
            "a": null,
            "b": {"c": null, "d": 1, "e": {}},
            "f": [{"g": null, "h": [null]}]
        });
        drop_nulls(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"b": {"d": 1, "e": {}}, "f": [{"h": [null]}]})
        );
    }
}
