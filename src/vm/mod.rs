//! The core: lifecycle and supervision of the VM: start the domain, follow its events, honour
//! the pod's grace period, and leave nothing running behind.

pub mod agent;
pub mod core;
pub mod error;
pub mod lifecycle;
pub mod migration;
pub mod plan;
pub mod state;
pub mod volumes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::libvirt::events::StopReason;
use crate::libvirt::{DomainEvent, Hypervisor, LibvirtError, RawEvent};
use crate::pod::daemons::{self, Daemon, DaemonEvent};
use crate::pod::PodLayout;
use crate::spec::VirtualMachineInstance;
use core::{Launcher, StopRequest};
pub use error::{Classified, ControlError, ErrorKind};
use plan::Planner;
use state::EventKind;

/// What to run and how.
pub struct RunOptions {
    pub planner: Planner,
    /// The VMI to start at once (standalone); without one the launcher waits for a Sync.
    pub vmi: Option<VirtualMachineInstance>,
    /// How long the domain may take to appear (`--qemu-timeout`).
    pub qemu_timeout: Duration,
    /// How long a hot-unplug waits for the guest to release the disk.
    pub detach_timeout: Duration,
    /// The size at which the console and QEMU logs are rotated (`--log-max-bytes`).
    pub log_max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot set up process supervision: {0}")]
    Setup(std::io::Error),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no domain was started within --qemu-timeout ({0:?})")]
    StartTimeout(Duration),
    #[error("internal task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// How the VM's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// None: the launcher was stopped before any domain ran.
    pub reason: Option<StopReason>,
    /// Whether the stop was asked for (SIGTERM, Shutdown, Kill).
    pub requested: bool,
}

impl Outcome {
    /// Exit 0 for a clean stop or a migration, non-zero for a crash or failure.
    pub fn exit_code(&self) -> i32 {
        match self.reason {
            None => 0,
            Some(r) if r.is_clean() => 0,
            Some(_) => 1,
        }
    }
}

/// The pod's side of the core: where its daemons are, what they report, and when to stop
/// following their logs.
pub struct Pod {
    pub layout: PodLayout,
    pub daemon_events: mpsc::UnboundedReceiver<DaemonEvent>,
    /// Becomes true when the log relays should stop (the launcher is exiting).
    pub stop_follow: watch::Receiver<bool>,
}

/// The core before it runs: connected to libvirtd, listening for signals. Front-ends are
/// given [`Supervisor::launcher`] before [`Supervisor::run`] is called.
pub struct Supervisor {
    core: Arc<Launcher>,
    opts: RunOptions,
    relays: Relays,
    raw_events: mpsc::UnboundedReceiver<RawEvent>,
    daemon_events: mpsc::UnboundedReceiver<DaemonEvent>,
    stop_rx: mpsc::UnboundedReceiver<StopRequest>,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Supervisor {
    /// Connects to the pod's libvirtd and sets up signal handling.
    pub async fn connect(pod: Pod, opts: RunOptions) -> Result<Supervisor, SupervisorError> {
        let layout = &pod.layout;
        let (raw_tx, raw_events) = mpsc::unbounded_channel::<RawEvent>();
        let uri = layout.libvirt_uri();
        let hv = Arc::new(
            tokio::task::spawn_blocking(move || Hypervisor::connect(&uri, raw_tx)).await??,
        );
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let sockets = migration::PodSockets {
            libvirt_uri: layout.libvirt_uri(),
            runtime_dir: layout.root().to_path_buf(),
        };
        let core = Launcher::new(hv, opts.planner.clone(), stop_tx, Some(sockets));
        core.set_detach_timeout(opts.detach_timeout);
        core.set_libvirtd_pid_file(layout.pid_dir().join("libvirtd.pid"));
        let sigterm = signal(SignalKind::terminate()).map_err(SupervisorError::Setup)?;
        let sigint = signal(SignalKind::interrupt()).map_err(SupervisorError::Setup)?;
        let relays = Relays {
            layout: layout.clone(),
            log_max_bytes: opts.log_max_bytes,
            stop: pod.stop_follow,
            started: false,
        };
        Ok(Supervisor {
            core,
            opts,
            relays,
            raw_events,
            daemon_events: pod.daemon_events,
            stop_rx,
            sigterm,
            sigint,
        })
    }

    /// The core, for the front-ends.
    pub fn launcher(&self) -> Arc<Launcher> {
        self.core.clone()
    }

    /// Starts the VMI given (if any) and runs until the VM stops; the last event published
    /// says how it ended.
    pub async fn run(mut self) -> Result<Outcome, SupervisorError> {
        let core = self.core.clone();
        let result = async {
            if let Some(vmi) = self.opts.vmi.clone() {
                core.sync(vmi).await?;
            }
            let inputs = Inputs {
                raw_events: &mut self.raw_events,
                daemon_events: &mut self.daemon_events,
                stop_rx: &mut self.stop_rx,
                sigterm: &mut self.sigterm,
                sigint: &mut self.sigint,
            };
            event_loop(&core, &self.opts, self.relays, inputs).await
        }
        .await;
        if let Ok(outcome) = &result {
            core.publish(
                EventKind::Final,
                &format!("launcher exiting with code {}", outcome.exit_code()),
            );
            // Give watchers a moment to receive the final event before the socket goes away.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        result
    }
}

/// Relays the QEMU log and the guest console into our log once a domain exists (started
/// here, or arrived by migration).
struct Relays {
    layout: PodLayout,
    log_max_bytes: u64,
    stop: watch::Receiver<bool>,
    started: bool,
}

impl Relays {
    fn start_when_ready(&mut self, core: &Launcher) {
        if self.started {
            return;
        }
        let (Some(console), name) = (core.console_log(), core.status().name) else {
            return;
        };
        let max = self.log_max_bytes;
        daemons::follow_file("qemu", self.layout.qemu_log(&name), max, self.stop.clone());
        daemons::follow_file("console", console, max, self.stop.clone());
        self.started = true;
    }
}

/// The loop's view of a requested stop.
struct Stopping {
    deadline: Option<Instant>,
    destroyed: bool,
}

/// Everything the supervisor loop waits on.
struct Inputs<'a> {
    raw_events: &'a mut mpsc::UnboundedReceiver<RawEvent>,
    daemon_events: &'a mut mpsc::UnboundedReceiver<DaemonEvent>,
    stop_rx: &'a mut mpsc::UnboundedReceiver<StopRequest>,
    sigterm: &'a mut tokio::signal::unix::Signal,
    sigint: &'a mut tokio::signal::unix::Signal,
}

async fn event_loop(
    core: &Arc<Launcher>,
    opts: &RunOptions,
    mut relays: Relays,
    inputs: Inputs<'_>,
) -> Result<Outcome, SupervisorError> {
    let Inputs {
        raw_events,
        daemon_events,
        stop_rx,
        sigterm,
        sigint,
    } = inputs;
    let launched = Instant::now();
    let mut stopping = Stopping {
        deadline: None,
        destroyed: false,
    };
    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        relays.start_when_ready(core);
        let grace_over = async {
            match stopping.deadline {
                Some(d) if !stopping.destroyed => tokio::time::sleep_until(d.into()).await,
                _ => std::future::pending().await,
            }
        };
        let start_timeout = async {
            if core.has_started() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep_until((launched + opts.qemu_timeout).into()).await
            }
        };
        tokio::select! {
            _ = sigterm.recv() => {
                if !core.has_started() { return Ok(Outcome { reason: None, requested: true }); }
                begin_stop(core, "SIGTERM", core.grace(), &mut stopping).await;
            }
            _ = sigint.recv() => {
                if !core.has_started() { return Ok(Outcome { reason: None, requested: true }); }
                begin_stop(core, "SIGINT", core.grace(), &mut stopping).await;
            }
            Some(req) = stop_rx.recv() => match req {
                // A prepared migration target told to give up, or a stop before any VM.
                _ if !core.has_started() => return Ok(Outcome { reason: None, requested: true }),
                StopRequest::Graceful(grace) => begin_stop(core, "Shutdown call", grace, &mut stopping).await,
                StopRequest::Kill => {
                    stopping.deadline.get_or_insert_with(Instant::now);
                    destroy(core, "Kill call", &mut stopping).await;
                }
            },
            _ = grace_over => destroy(core, "grace period over", &mut stopping).await,
            _ = start_timeout => return Err(SupervisorError::StartTimeout(opts.qemu_timeout)),
            // Events can be lost (a daemon restart at the wrong moment): check now and then that
            // the domain we think runs still does, so a stop never goes unnoticed.
            _ = liveness.tick(), if core.has_started() => {
                if let Some(reason) = gone(core).await {
                    tracing::warn!(reason = ?reason, "the domain stopped without an event");
                    drain_after_stop(core, raw_events, reason).await;
                    return Ok(finish(core, reason, stopping.deadline.is_some()).await);
                }
            }
            Some(ev) = raw_events.recv() => {
                let Some(ev) = our_event(core, ev) else {
                    continue;
                };
                if let DomainEvent::ConnectionClosed { .. } = ev {
                    if let Some(reason) = reconnect(core).await? {
                        return Ok(finish(core, reason, stopping.deadline.is_some()).await);
                    }
                } else if stale_stop(core, &ev).await {
                    tracing::info!("ignoring the stop of an earlier, failed start: the domain runs");
                } else if let Some(reason) = core.on_domain_event(&ev) {
                    drain_after_stop(core, raw_events, reason).await;
                    return Ok(finish(core, reason, stopping.deadline.is_some()).await);
                }
            }
            Some(ev) = daemon_events.recv() => {
                tracing::info!(event = ?ev, "daemon event");
                core.publish(EventKind::Daemon, &format!("{ev:?}"));
                if let DaemonEvent::Restarted { daemon: Daemon::Libvirtd, .. } = ev {
                    if let Some(reason) = reconnect(core).await? {
                        return Ok(finish(core, reason, stopping.deadline.is_some()).await);
                    }
                }
            }
        }
    }
}

/// The events libvirt sends right after a stop still count: after STOPPED(migrated) comes
/// JOB_COMPLETED with the migration's statistics (its measured downtime), a fraction of a
/// millisecond later, and the Migrate call waits for them. Handle what is queued; after a
/// migration keep handling events until the Migrate call has ended (at most
/// [`MIGRATION_END_WAIT`]), and only then let the definition be removed.
async fn drain_after_stop(
    core: &Arc<Launcher>,
    raw_events: &mut mpsc::UnboundedReceiver<RawEvent>,
    reason: StopReason,
) {
    let handle = |ev: RawEvent| {
        if let Some(ev) = our_event(core, ev) {
            let _ = core.on_domain_event(&ev);
        }
    };
    let until = Instant::now() + MIGRATION_END_WAIT;
    loop {
        while let Ok(ev) = raw_events.try_recv() {
            handle(ev);
        }
        if reason != StopReason::Migrated || !core.migration_running() || Instant::now() >= until {
            return;
        }
        tokio::select! {
            Some(ev) = raw_events.recv() => handle(ev),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// The event as the domain model has it, logged; None when it is about another domain.
fn our_event(core: &Launcher, ev: RawEvent) -> Option<DomainEvent> {
    let ev = DomainEvent::from(ev);
    if ev.domain().is_some_and(|d| d != core.status().name) {
        return None;
    }
    tracing::info!(event = %serde_json::to_string(&ev).unwrap_or_default(), "domain event");
    Some(ev)
}

/// How long a migrated-away launcher waits for its Migrate call to end before it finishes.
const MIGRATION_END_WAIT: Duration = Duration::from_secs(10);

/// How often the loop checks that the domain still exists (a backstop for lost events).
const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);

/// Whether the domain is gone, and why (None: still there, or libvirtd unreachable).
async fn gone(core: &Arc<Launcher>) -> Option<StopReason> {
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    match tokio::task::spawn_blocking(move || hv.state(&name))
        .await
        .ok()?
    {
        Ok(s) if s.is_shut_off() => Some(s.stop_reason()),
        Err(LibvirtError::NoDomain(_)) => Some(StopReason::Unknown),
        _ => None,
    }
}

/// Press the ACPI button once and start the grace clock. A second request changes nothing.
async fn begin_stop(core: &Arc<Launcher>, why: &str, grace: Duration, stopping: &mut Stopping) {
    if stopping.deadline.is_some() {
        tracing::info!(
            why,
            "stop already requested; waiting for the guest or the grace period"
        );
        return;
    }
    stopping.deadline = Some(Instant::now() + grace);
    // The pod is going away: a migration in flight is abandoned first (the VM stays here and
    // shuts down with the pod; the target is told to clean up).
    if core.cancel_migration().is_ok() {
        tracing::warn!(why, "stop requested during a migration: cancelling it");
        let deadline = Instant::now() + Duration::from_secs(10);
        while core.migration_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tracing::info!(
        why,
        grace_s = grace.as_secs(),
        "shutting the guest down (ACPI power button)"
    );
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    match tokio::task::spawn_blocking(move || hv.shutdown_acpi(&name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ACPI shutdown request failed; the domain is destroyed when the grace period ends")
        }
        Err(e) => tracing::error!(error = %e, "shutdown task failed"),
    }
}

async fn destroy(core: &Arc<Launcher>, why: &str, stopping: &mut Stopping) {
    if stopping.destroyed {
        return;
    }
    stopping.destroyed = true;
    tracing::warn!(why, "destroying the domain");
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    match tokio::task::spawn_blocking(move || hv.destroy(&name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "destroy failed"),
        Err(e) => tracing::error!(error = %e, "destroy task failed"),
    }
}

/// Reconnects after libvirtd went away. Returns the stop reason if the domain is gone.
async fn reconnect(core: &Arc<Launcher>) -> Result<Option<StopReason>, SupervisorError> {
    if !core.ensure_connected().await? {
        return Ok(None);
    }
    let hv = core.hypervisor().clone();
    let name = core.status().name;
    if name.is_empty() {
        return Ok(None);
    }
    let state = tokio::task::spawn_blocking(move || hv.state(&name)).await?;
    tracing::info!(state = ?state.as_ref().map(|s| s.name()).ok(), "reconnected to libvirtd");
    core.publish(EventKind::Daemon, "reconnected to libvirtd");
    Ok(match state {
        Ok(s) if s.is_shut_off() => Some(s.stop_reason()),
        Err(LibvirtError::NoDomain(_)) => Some(StopReason::Unknown),
        _ => None,
    })
}

/// A stop event about a start that failed earlier (libvirtd, back after dying mid-start,
/// killed the half-started QEMU and said so on the new connection) while the domain started
/// since runs: not a stop of ours.
async fn stale_stop(core: &Arc<Launcher>, ev: &DomainEvent) -> bool {
    if !matches!(
        ev,
        DomainEvent::Lifecycle {
            kind: crate::libvirt::LifecycleKind::Stopped(_),
            ..
        }
    ) || !core.has_started()
    {
        return false;
    }
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    matches!(
        tokio::task::spawn_blocking(move || hv.state(&name)).await,
        Ok(Ok(s)) if s.is_running()
    )
}

/// The domain stopped: remove its definition and report it.
async fn finish(core: &Arc<Launcher>, reason: StopReason, requested: bool) -> Outcome {
    if core.awaiting_migration() {
        // The incoming VM never arrived (the migration failed): nothing of ours ran.
        tracing::warn!(reason = ?reason, "the incoming migration failed; exiting");
        return Outcome {
            reason: None,
            requested,
        };
    }
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    let _ = tokio::task::spawn_blocking(move || hv.undefine(&name)).await;
    let outcome = Outcome {
        reason: Some(reason),
        requested,
    };
    tracing::info!(domain = %core.status().name, reason = ?reason, requested, exit_code = outcome.exit_code(), "domain stopped");
    outcome
}
