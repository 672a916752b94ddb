//! The owner's books: the only writer of the watched status, the "started" flag, the freeze
//! generation, and the event log. Operations and their child tasks never write them: they send
//! a [`Report`] to the owner (through `Launcher::report`), and the owner applies the reports in
//! the order they were sent, so the status a watcher sees and the events in the log always
//! agree. Reads stay on the watch channels and the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::handle::Request;
use super::state::{Event, EventKind, EventLog, MigrationProgress, Phase, State, Status};
use crate::spec::VirtualMachineInstance;

/// A change an operation asks the owner to make, applied in the order sent.
pub(crate) enum Report {
    /// The domain's state changed (an event says so).
    State { state: State, reason: String },
    /// A volume's phase changed (an event says so).
    Phase {
        volume: String,
        phase: Phase,
        message: String,
    },
    /// A free-form event (daemon, agent), stamped with the domain's state when applied.
    Event { kind: EventKind, message: String },
    /// A migration event (progress or outcome), stamped with the domain's state when applied.
    Migration {
        progress: MigrationProgress,
        message: String,
    },
    /// An edit of the status with no event of its own (name, disks, migration fields).
    Status(Box<dyn FnOnce(&mut Status) + Send>),
    /// A domain was started here (or arrived by migration).
    Started,
    /// The VMI as last synced (or prepared for).
    Vmi(Arc<VirtualMachineInstance>),
    /// Where the guest's serial console is logged (once a domain was planned).
    ConsoleLog(PathBuf),
    /// The guest's filesystems were frozen: they are thawed by themselves after `timeout`
    /// unless a freeze or a thaw comes first.
    Frozen { timeout: Duration },
    /// A thaw was asked for: the automatic thaw of an earlier freeze is off.
    Thawing,
}

/// What the owner writes and everyone else reads.
pub(crate) struct Ledger {
    status: watch::Sender<Status>,
    started: watch::Sender<bool>,
    vmi: watch::Sender<Option<Arc<VirtualMachineInstance>>>,
    console_log: watch::Sender<Option<PathBuf>>,
    events: Arc<EventLog>,
    /// Bumped by each freeze and each thaw: an automatic thaw of an older freeze is stale.
    freeze_generation: u64,
    /// The owner's request channel, where an automatic thaw is queued like any command.
    requests: mpsc::UnboundedSender<Request>,
}

/// The read sides of the ledger, for the core's operations and the front-ends.
pub(crate) struct Views {
    pub status: watch::Receiver<Status>,
    pub started: watch::Receiver<bool>,
    pub vmi: watch::Receiver<Option<Arc<VirtualMachineInstance>>>,
    pub console_log: watch::Receiver<Option<PathBuf>>,
    pub events: Arc<EventLog>,
}

impl Ledger {
    pub(crate) fn new(requests: mpsc::UnboundedSender<Request>) -> (Ledger, Views) {
        let (status, status_rx) = watch::channel(Status::default());
        let (started, started_rx) = watch::channel(false);
        let (vmi, vmi_rx) = watch::channel(None);
        let (console_log, console_log_rx) = watch::channel(None);
        let events = Arc::new(EventLog::new(4096));
        let views = Views {
            status: status_rx,
            started: started_rx,
            vmi: vmi_rx,
            console_log: console_log_rx,
            events: events.clone(),
        };
        let ledger = Ledger {
            status,
            started,
            vmi,
            console_log,
            events,
            freeze_generation: 0,
            requests,
        };
        (ledger, views)
    }

    /// Applies one report.
    pub(crate) fn apply(&mut self, report: Report) {
        match report {
            Report::State { state, reason } => self.set_state(state, &reason),
            Report::Phase {
                volume,
                phase,
                message,
            } => self.set_phase(&volume, phase, &message),
            Report::Event { kind, message } => self.publish(kind, &message),
            Report::Migration { progress, message } => self.publish_migration(progress, &message),
            Report::Status(edit) => self.status.send_modify(edit),
            Report::Started => {
                self.started.send_replace(true);
            }
            Report::Vmi(vmi) => {
                self.vmi.send_replace(Some(vmi));
            }
            Report::ConsoleLog(path) => {
                self.console_log.send_replace(Some(path));
            }
            Report::Frozen { timeout } => {
                self.freeze_generation += 1;
                let (generation, requests) = (self.freeze_generation, self.requests.clone());
                // The automatic thaw is a request to the owner like any other: it waits its
                // turn behind the operation running then; a thaw or freeze meanwhile makes it
                // stale (the owner drops it).
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = requests.send(Request::AutoThaw { generation });
                });
            }
            Report::Thawing => self.freeze_generation += 1,
        }
    }

    /// Whether the automatic thaw of freeze number `generation` is still due.
    pub(crate) fn thaw_due(&self, generation: u64) -> bool {
        self.freeze_generation == generation
    }

    pub(crate) fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.last_seq = self.events.last_seq();
        s
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    pub(crate) fn mark_started(&self) {
        self.started.send_replace(true);
    }

    /// Records a domain state change and publishes it.
    pub(crate) fn set_state(&self, state: State, reason: &str) {
        self.update(|s| {
            s.state = state;
            s.reason = reason.to_string();
        });
        let mut e = Event::new(EventKind::Domain);
        e.state = state;
        e.reason = reason.to_string();
        self.events.push(e);
    }

    pub(crate) fn set_phase(&self, volume: &str, phase: Phase, message: &str) {
        self.update(|s| {
            if let Some(d) = s.disk_mut(volume) {
                d.phase = phase;
                d.message = message.to_string();
            }
        });
        let mut e = Event::new(EventKind::Volume);
        e.volume = volume.to_string();
        e.phase = Some(phase);
        e.message = message.to_string();
        self.events.push(e);
        match phase {
            Phase::Failed => tracing::warn!(volume, ?phase, message, "volume"),
            _ => tracing::info!(volume, ?phase, message, "volume"),
        }
    }

    /// Publishes a free-form event, stamped with the domain's state.
    pub(crate) fn publish(&self, kind: EventKind, message: &str) {
        let mut e = Event::new(kind);
        e.message = message.to_string();
        self.push_stamped(e);
    }

    pub(crate) fn publish_migration(&self, progress: MigrationProgress, message: &str) {
        let mut e = Event::new(EventKind::Migration);
        e.message = message.to_string();
        e.migration = Some(progress);
        self.push_stamped(e);
    }

    /// Pushes `e` with the domain's current state and reason.
    fn push_stamped(&self, mut e: Event) {
        let s = self.status.borrow();
        e.state = s.state;
        e.reason = s.reason.clone();
        drop(s);
        self.events.push(e);
    }

    /// Pushes `e` as it is.
    pub(crate) fn push(&self, e: Event) {
        self.events.push(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::state::DiskStatus;

    fn disk(volume: &str) -> DiskStatus {
        DiskStatus {
            volume: volume.into(),
            target: "vdb".into(),
            bus: "scsi".into(),
            source: String::new(),
            phase: Phase::Attaching,
            message: String::new(),
            hotplugged: true,
            shared: false,
            readonly: false,
            size_bytes: 0,
            device: "disk".into(),
            block: false,
        }
    }

    #[tokio::test]
    async fn reports_are_applied_in_the_order_sent_and_the_log_agrees_with_the_status() {
        let (requests, _r) = mpsc::unbounded_channel();
        let (mut ledger, views) = Ledger::new(requests);
        let (_, mut live) = views.events.subscribe(0).unwrap();
        for r in [
            Report::Status(Box::new(|s: &mut Status| {
                s.name = "default_vm".into();
                s.disks.push(disk("hp"));
            })),
            Report::State {
                state: State::Running,
                reason: "started".into(),
            },
            Report::Phase {
                volume: "hp".into(),
                phase: Phase::Ready,
                message: String::new(),
            },
            Report::Phase {
                volume: "hp".into(),
                phase: Phase::Failed,
                message: "gone".into(),
            },
            Report::Event {
                kind: EventKind::Agent,
                message: "guest agent connected".into(),
            },
            Report::Started,
        ] {
            ledger.apply(r);
        }
        let s = ledger.status();
        assert_eq!((s.name.as_str(), s.state), ("default_vm", State::Running));
        assert_eq!(s.disks[0].phase, Phase::Failed, "the later phase wins");
        assert_eq!(s.last_seq, 4);
        assert!(*views.started.borrow());
        assert_eq!(views.status.borrow().disks[0].message, "gone");
        let kinds: Vec<_> = (0..4).map(|_| live.try_recv().unwrap()).collect();
        assert_eq!(kinds[1].phase, Some(Phase::Ready));
        assert_eq!(kinds[2].phase, Some(Phase::Failed));
        // A free-form event carries the state applied before it.
        assert_eq!(kinds[3].state, State::Running);
        assert_eq!(kinds[3].reason, "started");
    }

    #[tokio::test]
    async fn a_freeze_schedules_its_thaw_and_a_later_freeze_or_thaw_makes_it_stale() {
        let (requests, mut due) = mpsc::unbounded_channel();
        let (mut ledger, _views) = Ledger::new(requests);
        ledger.apply(Report::Frozen {
            timeout: Duration::from_millis(10),
        });
        let Some(Request::AutoThaw { generation }) = due.recv().await else {
            panic!("no automatic thaw");
        };
        assert!(ledger.thaw_due(generation));
        ledger.apply(Report::Thawing);
        assert!(!ledger.thaw_due(generation));
        ledger.apply(Report::Frozen {
            timeout: Duration::from_millis(20),
        });
        ledger.apply(Report::Frozen {
            timeout: Duration::from_millis(60),
        });
        let mut got = Vec::new();
        for _ in 0..2 {
            if let Some(Request::AutoThaw { generation }) = due.recv().await {
                got.push(ledger.thaw_due(generation));
            }
        }
        assert_eq!(got, [false, true], "only the last freeze's thaw is due");
    }
}
