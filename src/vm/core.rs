//! The state of the core and the operations on the domain. Private to `vm`: the only way in is
//! a [`super::Command`] sent through a [`super::Handle`] to the owner task (`vm::Supervisor`),
//! which runs the operations one at a time (stops first) and applies libvirt events.
//!
//! The status, the VMI and the console path are published by the owner (its `Ledger`) through
//! `watch` channels and the event log, so reads never wait for libvirt or for an operation;
//! operations change them only by sending the owner a `Report`. Every libvirt call runs on
//! tokio's blocking pool.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use super::error::ControlError;
use super::ledger::{Report, Views};
use super::plan::Planner;
use super::state::{EventKind, EventLog, MigrationProgress, Phase, State, Status};
use crate::libvirt::{Hypervisor, LibvirtError};
use crate::spec::VirtualMachineInstance;

/// How long a detach waits for the guest to release the disk, unless configured.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a lost libvirtd may take to come back before the launcher gives up on it.
pub const LIBVIRTD_BACK: Duration = Duration::from_secs(30);
/// Default auto-thaw for a freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the owner task and the child tasks it runs operations in share: the configuration
/// (read-only), the read sides of the owner's [`super::ledger::Ledger`] (the status, whether a
/// domain started, the event log: only the owner writes them; operations send it a
/// [`Report`]), and the connection to libvirtd with what keeps it usable.
pub(crate) struct Launcher {
    pub(crate) hv: Arc<Hypervisor>,
    pub(crate) planner: Planner,
    /// The status as the owner last applied it.
    pub(crate) status: watch::Receiver<Status>,
    /// The event log (the owner alone pushes to it).
    pub(crate) events: Arc<EventLog>,
    /// The VMI as last synced (the owner sets it).
    pub(crate) vmi: watch::Receiver<Option<Arc<VirtualMachineInstance>>>,
    /// The owner's channel for what operations tell it: reports, a detach waiting for the
    /// guest, the end of an operation.
    pub(crate) internal: mpsc::UnboundedSender<super::Internal>,
    /// Becomes true once a domain was started (or arrived by migration); the owner sets it.
    pub(crate) started: watch::Receiver<bool>,
    pub(crate) domain_type: String,
    /// Where the guest's console is logged (the owner sets it).
    pub(crate) console_log: watch::Receiver<Option<PathBuf>>,
    /// This pod's sockets, for receiving a migration.
    pub(crate) sockets: Option<super::migration::PodSockets>,
    /// How long a detach waits for the guest.
    pub(crate) detach_timeout: Duration,
    /// One reconnection to libvirtd at a time. Kept as a lock, not moved to the owner: a start
    /// that finds libvirtd gone under its define must reconnect itself (it runs as the owner's
    /// child task, and the owner itself reconnects when it hears of the loss), and the second
    /// of the two must wait for the first and then find the connection back, not open another.
    pub(crate) reconnecting: tokio::sync::Mutex<()>,
    /// How many times a new connection to libvirtd was opened: a property of the connection
    /// (written under `reconnecting`), read by a start to tell that libvirtd was replaced
    /// under its call. Not domain state.
    pub(crate) connections: AtomicU64,
    /// libvirtd's pid file, to kill a daemon that hangs (the pod's supervisor restarts it).
    pub(crate) libvirtd_pid_file: Option<PathBuf>,
    /// The live domain's disks as last read, and the [`Launcher::live_generation`] they were
    /// read at: a Sync reuses them instead of asking libvirt for the whole domain XML again.
    /// Kept as a lock and an atomic, not moved to the owner: it is read and filled on a
    /// hot-plug Sync's path (and by the prefetch after it), where a round trip through the
    /// owner per look would cost time the hot-plug goal (Sync to attached within 1.2x of raw
    /// libvirt) has no room for; it is a cache of libvirt's answer, never the domain's state,
    /// and a stale generation only means reading libvirt again.
    pub(crate) live_cache: Mutex<Option<(u64, Vec<crate::domain::live::LiveDisk>)>>,
    /// Bumped whenever the domain may have changed: our own device calls, every domain event,
    /// a reconnect. A cached read from an older generation is never used.
    pub(crate) live_generation: AtomicU64,
    /// A guest-agent poller runs (one at a time; it ends when the agent disconnects).
    pub(crate) agent_polling: std::sync::atomic::AtomicBool,
    /// Set once the guest is being shut down: no further guest-agent polls
    /// ([`super::agent::quiet_agent`]).
    pub(crate) agent_quiet: std::sync::atomic::AtomicBool,
    /// Network phase 2's DHCP servers, started with the first domain and kept for the pod's
    /// life (the guest renews and reboots).
    pub(crate) network: Mutex<crate::pod::net::Phase2>,
    /// Where the VM's claims live, for snapshots (standalone `run --vm`).
    pub(crate) storage: Option<super::snapshot::SnapshotStorage>,
}

impl Launcher {
    pub(crate) fn new(
        hv: Arc<Hypervisor>,
        config: super::CoreConfig,
        views: Views,
        internal: mpsc::UnboundedSender<super::Internal>,
    ) -> Arc<Launcher> {
        let super::CoreConfig {
            planner,
            sockets,
            detach_timeout,
            libvirtd_pid_file,
            storage,
        } = config;
        let domain_type = format!("{:?}", planner.domain_type).to_lowercase();
        Arc::new(Launcher {
            hv,
            planner,
            status: views.status,
            events: views.events,
            vmi: views.vmi,
            internal,
            started: views.started,
            domain_type,
            console_log: views.console_log,
            sockets,
            detach_timeout,
            reconnecting: tokio::sync::Mutex::new(()),
            connections: AtomicU64::new(0),
            libvirtd_pid_file,
            live_cache: Mutex::new(None),
            live_generation: AtomicU64::new(0),
            agent_polling: std::sync::atomic::AtomicBool::new(false),
            agent_quiet: std::sync::atomic::AtomicBool::new(false),
            network: Mutex::new(crate::pod::net::Phase2::default()),
            storage,
        })
    }

    /// SIGKILLs a hung libvirtd (QEMU keeps running; the restarted daemon takes it back).
    pub(crate) fn kill_hung_libvirtd(&self, why: &LibvirtError) {
        let Some(file) = &self.libvirtd_pid_file else {
            return;
        };
        let pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let Some(pid) = pid else {
            return;
        };
        // Only ever a libvirtd: a stale pid file must not make us kill anything else.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "libvirtd" {
            return;
        }
        tracing::warn!(pid, error = %why, "libvirtd is hung: killing it so that it is restarted");
        self.publish(EventKind::Daemon, "libvirtd hung: killed and restarted");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Reconnects to libvirtd if the connection is broken (the daemon died; the pod's daemon
    /// supervisor restarts it), waiting up to `LIBVIRTD_BACK` for it. Returns whether it
    /// opened a new connection.
    pub(crate) async fn ensure_connected(&self) -> Result<bool, LibvirtError> {
        let _one = self.reconnecting.lock().await;
        if self.hv.is_connected() {
            return Ok(false);
        }
        self.hv.disconnect();
        let until = std::time::Instant::now() + LIBVIRTD_BACK;
        loop {
            let hv = self.hv.clone();
            match tokio::task::spawn_blocking(move || hv.reconnect())
                .await
                .map_err(|e| LibvirtError::Call {
                    op: "reconnect",
                    code: -1,
                    message: e.to_string(),
                })? {
                Ok(()) => break,
                // Accepted but never answered, after keepalive already gave up on it.
                Err(e @ LibvirtError::Hung { .. }) if std::time::Instant::now() < until => {
                    self.kill_hung_libvirtd(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) if std::time::Instant::now() < until => {
                    tracing::debug!(error = %e, "libvirtd not back yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.connections.fetch_add(1, Ordering::SeqCst);
        // The daemon was away: what it did meanwhile (a start finished, a device gone) is
        // read afresh.
        self.domain_changed();
        Ok(true)
    }

    pub(crate) fn detach_timeout(&self) -> Duration {
        self.detach_timeout
    }

    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    pub fn domain_type(&self) -> &str {
        &self.domain_type
    }

    pub fn has_started(&self) -> bool {
        *self.started.borrow()
    }

    /// The domain as last known; never blocks on libvirt.
    pub fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.last_seq = self.events.last_seq();
        s
    }

    /// The running VMI's grace period (default 30 s before any VMI).
    pub fn grace(&self) -> Duration {
        self.vmi
            .borrow()
            .as_ref()
            .map(|v| v.termination_grace_period())
            .unwrap_or(Duration::from_secs(30))
    }

    /// The guest's serial console log, once a domain was planned.
    pub fn console_log(&self) -> Option<PathBuf> {
        self.console_log.borrow().clone()
    }

    pub(crate) fn set_console_log(&self, path: PathBuf) {
        self.report(Report::ConsoleLog(path));
    }

    /// The VMI as last synced (or prepared for).
    pub(crate) fn vmi(&self) -> Option<Arc<VirtualMachineInstance>> {
        self.vmi.borrow().clone()
    }

    pub(crate) fn set_vmi(&self, vmi: VirtualMachineInstance) {
        self.report(Report::Vmi(Arc::new(vmi)));
    }

    /// Tells the owner to apply `report` (after those sent before it).
    pub(crate) fn report(&self, report: Report) {
        let _ = self.internal.send(super::Internal::Report(report));
    }

    /// Has the owner edit the status.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Status) + Send + 'static) {
        self.report(Report::Status(Box::new(f)));
    }

    pub(crate) fn domain_name(&self) -> Result<String, ControlError> {
        let s = self.status.borrow();
        if s.name.is_empty() || matches!(s.state, State::None) {
            return Err(ControlError::NoDomain);
        }
        Ok(s.name.clone())
    }

    /// Has the owner record a domain state change and publish it.
    pub fn set_state(&self, state: State, reason: &str) {
        self.report(Report::State {
            state,
            reason: reason.to_string(),
        });
    }

    pub(crate) fn set_phase(&self, volume: &str, phase: Phase, message: &str) {
        self.report(Report::Phase {
            volume: volume.to_string(),
            phase,
            message: message.to_string(),
        });
    }

    /// Has the owner publish a free-form event (daemon restarts, agent).
    pub fn publish(&self, kind: EventKind, message: &str) {
        self.report(Report::Event {
            kind,
            message: message.to_string(),
        });
    }

    /// Has the owner publish a migration event.
    pub(crate) fn publish_migration(&self, progress: MigrationProgress, message: &str) {
        self.report(Report::Migration {
            progress,
            message: message.to_string(),
        });
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hypervisor) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let hv = self.hv.clone();
        Ok(tokio::task::spawn_blocking(move || f(&hv)).await??)
    }
}
