//! The state of the core and the operations on the domain. Private to `vm`: the only way in is
//! a [`super::Command`] sent through a [`super::Handle`] to the owner task (`vm::Supervisor`),
//! which runs the operations one at a time (stops first) and applies libvirt events.
//!
//! The status, the VMI and the console path are published through `watch` channels and the
//! event log, so reads never wait for libvirt or for an operation; every libvirt call runs on
//! tokio's blocking pool.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use super::error::ControlError;
use super::plan::Planner;
use super::state::{Event, EventKind, EventLog, Phase, State, Status};
use crate::libvirt::{Hypervisor, LibvirtError};
use crate::spec::VirtualMachineInstance;

/// How long a detach waits for the guest to release the disk, unless configured.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a lost libvirtd may take to come back before the launcher gives up on it.
pub const LIBVIRTD_BACK: Duration = Duration::from_secs(30);
/// Default auto-thaw for a freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// The core's state, shared by the owner task and the child tasks it runs operations in.
pub(crate) struct Launcher {
    pub(crate) hv: Arc<Hypervisor>,
    pub(crate) planner: Planner,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) vmi: watch::Sender<Option<Arc<VirtualMachineInstance>>>,
    /// The owner's request channel (an automatic thaw is queued there like any command).
    pub(crate) owner: mpsc::UnboundedSender<super::handle::Request>,
    /// The owner's channel for what operations tell it (a detach waiting for the guest).
    pub(crate) internal: mpsc::UnboundedSender<super::Internal>,
    /// Becomes true once a domain was started (or arrived by migration).
    pub(crate) started: AtomicBool,
    pub(crate) freeze_generation: AtomicU64,
    pub(crate) domain_type: String,
    pub(crate) console_log: watch::Sender<Option<PathBuf>>,
    /// This pod's sockets, for receiving a migration.
    pub(crate) sockets: Option<super::migration::PodSockets>,
    /// How long a detach waits for the guest.
    pub(crate) detach_timeout: Duration,
    /// One reconnection to libvirtd at a time (the loop and a start may both notice a loss).
    pub(crate) reconnecting: tokio::sync::Mutex<()>,
    /// How many times a new connection to libvirtd was opened.
    pub(crate) connections: AtomicU64,
    /// libvirtd's pid file, to kill a daemon that hangs (the pod's supervisor restarts it).
    pub(crate) libvirtd_pid_file: Option<PathBuf>,
    /// The live domain's disks as last read, and the [`Launcher::live_generation`] they were
    /// read at: a Sync reuses them instead of asking libvirt for the whole domain XML again.
    pub(crate) live_cache: Mutex<Option<(u64, Vec<crate::domain::live::LiveDisk>)>>,
    /// Bumped whenever the domain may have changed: our own device calls, every domain event,
    /// a reconnect. A cached read from an older generation is never used.
    pub(crate) live_generation: AtomicU64,
}

impl Launcher {
    pub(crate) fn new(
        hv: Arc<Hypervisor>,
        config: super::CoreConfig,
        owner: mpsc::UnboundedSender<super::handle::Request>,
        internal: mpsc::UnboundedSender<super::Internal>,
    ) -> Arc<Launcher> {
        let super::CoreConfig {
            planner,
            sockets,
            detach_timeout,
            libvirtd_pid_file,
        } = config;
        let domain_type = format!("{:?}", planner.domain_type).to_lowercase();
        Arc::new(Launcher {
            hv,
            planner,
            status: watch::Sender::new(Status::default()),
            events: Arc::new(EventLog::new(4096)),
            vmi: watch::Sender::new(None),
            owner,
            internal,
            started: AtomicBool::new(false),
            freeze_generation: AtomicU64::new(0),
            domain_type,
            console_log: watch::Sender::new(None),
            sockets,
            detach_timeout,
            reconnecting: tokio::sync::Mutex::new(()),
            connections: AtomicU64::new(0),
            libvirtd_pid_file,
            live_cache: Mutex::new(None),
            live_generation: AtomicU64::new(0),
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
        self.started.load(Ordering::SeqCst)
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
        self.console_log.send_replace(Some(path));
    }

    /// The VMI as last synced (or prepared for).
    pub(crate) fn vmi(&self) -> Option<Arc<VirtualMachineInstance>> {
        self.vmi.borrow().clone()
    }

    pub(crate) fn set_vmi(&self, vmi: VirtualMachineInstance) {
        self.vmi.send_replace(Some(Arc::new(vmi)));
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    pub(crate) fn domain_name(&self) -> Result<String, ControlError> {
        let s = self.status.borrow();
        if s.name.is_empty() || matches!(s.state, State::None) {
            return Err(ControlError::NoDomain);
        }
        Ok(s.name.clone())
    }

    /// Records a domain state change and publishes it.
    pub fn set_state(&self, state: State, reason: &str) {
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

    /// Publishes a free-form event (daemon restarts, agent, final).
    pub fn publish(&self, kind: EventKind, message: &str) {
        let mut e = Event::new(kind);
        e.message = message.to_string();
        let s = self.status();
        e.state = s.state;
        e.reason = s.reason;
        self.events.push(e);
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hypervisor) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let hv = self.hv.clone();
        Ok(tokio::task::spawn_blocking(move || f(&hv)).await??)
    }
}
