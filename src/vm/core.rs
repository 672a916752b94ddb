//! The launcher's core: every operation on the domain, the state it keeps current from libvirt
//! events, and the event log. The gRPC layer and the signal loop both drive this type; it knows
//! nothing of either.
//!
//! Concurrency: operations that change the domain take `op` (one at a time, in arrival order);
//! reads (`status`, `subscribe`) never wait for libvirt or for an operation; every libvirt call
//! runs on tokio's blocking pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

pub use super::error::ControlError;
use super::plan::Planner;
use super::state::{Event, EventKind, EventLog, Gap, Phase, State, Status};
use crate::libvirt::{Hypervisor, LibvirtError};
use crate::spec::VirtualMachineInstance;

/// How long a detach waits for the guest to release the disk, unless configured.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a lost libvirtd may take to come back before the launcher gives up on it.
pub const LIBVIRTD_BACK: Duration = Duration::from_secs(30);
/// Default auto-thaw for a freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// A stop the API asked for; the supervisor loop carries it out (it owns the grace clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Graceful(Duration),
    Kill,
}

/// The core. Shared as `Arc<Launcher>`.
pub struct Launcher {
    pub(crate) hv: Arc<Hypervisor>,
    pub(crate) planner: Planner,
    pub(crate) status: RwLock<Status>,
    pub(crate) events: EventLog,
    pub(crate) op: tokio::sync::Mutex<()>,
    pub(crate) vmi: Mutex<Option<VirtualMachineInstance>>,
    pub(crate) stop: mpsc::UnboundedSender<StopRequest>,
    /// Detaches waiting for the guest: alias → waiter.
    pub(crate) removals: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    /// Becomes true once a domain was started (or arrived by migration).
    pub(crate) started: AtomicBool,
    pub(crate) freeze_generation: AtomicU64,
    pub(crate) domain_type: String,
    pub(crate) console_log: Mutex<Option<std::path::PathBuf>>,
    /// This pod's sockets, for receiving a migration.
    pub(crate) sockets: Option<super::migration::PodSockets>,
    /// A CancelMigration arrived.
    pub(crate) cancel: AtomicBool,
    /// How long a detach waits for the guest, in milliseconds.
    pub(crate) detach_timeout_ms: AtomicU64,
    /// Statistics of the last completed job (a migration), from its JOB_COMPLETED event.
    pub(crate) last_job: Mutex<Option<Vec<(String, f64)>>>,
    /// One reconnection to libvirtd at a time (the loop and a start may both notice a loss).
    pub(crate) reconnecting: tokio::sync::Mutex<()>,
    /// How many times a new connection to libvirtd was opened.
    pub(crate) connections: AtomicU64,
    /// libvirtd's pid file, to kill a daemon that hangs (the pod's supervisor restarts it).
    pub(crate) libvirtd_pid_file: Mutex<Option<PathBuf>>,
    /// The live domain's disks as last read, and the [`Launcher::live_generation`] they were
    /// read at: a Sync reuses them instead of asking libvirt for the whole domain XML again.
    pub(crate) live_cache: Mutex<Option<(u64, Vec<crate::domain::live::LiveDisk>)>>,
    /// Bumped whenever the domain may have changed: our own device calls, every domain event,
    /// a reconnect. A cached read from an older generation is never used.
    pub(crate) live_generation: AtomicU64,
}

impl Launcher {
    pub fn new(
        hv: Arc<Hypervisor>,
        planner: Planner,
        stop: mpsc::UnboundedSender<StopRequest>,
        sockets: Option<super::migration::PodSockets>,
    ) -> Arc<Launcher> {
        let domain_type = format!("{:?}", planner.domain_type).to_lowercase();
        Arc::new(Launcher {
            hv,
            planner,
            status: RwLock::new(Status::default()),
            events: EventLog::new(4096),
            op: tokio::sync::Mutex::new(()),
            vmi: Mutex::new(None),
            stop,
            removals: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
            freeze_generation: AtomicU64::new(0),
            domain_type,
            console_log: Mutex::new(None),
            sockets,
            cancel: AtomicBool::new(false),
            detach_timeout_ms: AtomicU64::new(DETACH_TIMEOUT.as_millis() as u64),
            last_job: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            connections: AtomicU64::new(0),
            libvirtd_pid_file: Mutex::new(None),
            live_cache: Mutex::new(None),
            live_generation: AtomicU64::new(0),
        })
    }

    /// Where libvirtd's pid is kept: with it, a libvirtd that accepts connections but answers
    /// nothing is killed, and the pod's daemon supervisor starts a fresh one.
    pub fn set_libvirtd_pid_file(&self, path: PathBuf) {
        *self
            .libvirtd_pid_file
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(path);
    }

    /// SIGKILLs a hung libvirtd (QEMU keeps running; the restarted daemon takes it back).
    pub(crate) fn kill_hung_libvirtd(&self, why: &LibvirtError) {
        let Some(file) = self
            .libvirtd_pid_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let pid = std::fs::read_to_string(&file)
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

    /// How long a detach waits for the guest to release the disk.
    pub fn set_detach_timeout(&self, timeout: Duration) {
        self.detach_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::SeqCst);
    }

    pub(crate) fn detach_timeout(&self) -> Duration {
        Duration::from_millis(self.detach_timeout_ms.load(Ordering::SeqCst))
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
        let mut s = self
            .status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.last_seq = self.events.last_seq();
        s
    }

    /// The running VMI's grace period (default 30 s before any VMI).
    pub fn grace(&self) -> Duration {
        self.lock_vmi()
            .as_ref()
            .map(|v| v.termination_grace_period())
            .unwrap_or(Duration::from_secs(30))
    }

    /// The VMI as last synced, as JSON.
    pub fn vmi_json(&self) -> Result<Vec<u8>, ControlError> {
        let vmi = self.lock_vmi();
        let vmi = vmi.as_ref().ok_or(ControlError::NoDomain)?;
        let mut doc =
            serde_json::to_value(vmi).map_err(|e| ControlError::Internal(e.to_string()))?;
        // As `kubectl get vmi -o json` shows it: fields that are not set are left out, not
        // written as `null` (that doubled the size of every Sync built from this).
        drop_nulls(&mut doc);
        serde_json::to_vec(&doc).map_err(|e| ControlError::Internal(e.to_string()))
    }

    /// The guest's serial console log, once a domain was planned.
    pub fn console_log(&self) -> Option<std::path::PathBuf> {
        self.console_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn subscribe(&self, after: u64) -> Result<(Vec<Event>, broadcast::Receiver<Event>), Gap> {
        self.events.subscribe(after)
    }

    pub fn last_seq(&self) -> u64 {
        self.events.last_seq()
    }

    pub(crate) fn lock_vmi(&self) -> std::sync::MutexGuard<'_, Option<VirtualMachineInstance>> {
        self.vmi.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn domain_name(&self) -> Result<String, ControlError> {
        let s = self.status.read().unwrap_or_else(|p| p.into_inner());
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

    #[test]
    pub(crate) fn nulls_are_left_out_at_every_depth() {
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
