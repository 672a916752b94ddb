//! The core: lifecycle and supervision of the VM: start the domain, follow its events, honour
//! the pod's grace period, and leave nothing running behind.
//!
//! One way in: front-ends hold a [`Handle`] and send it [`Command`]s; the owner task
//! ([`Supervisor::run`]) handles them in order, stops first, and answers each through a
//! oneshot. Operations that change the domain run one at a time as child tasks (a Sync waiting
//! for a guest to release a disk, or a migration being monitored, never keeps a stop, a libvirt
//! event or a read waiting); statistics and versions run beside them. Reads (status, event log,
//! VMI, console path) come from watched state and never wait for libvirt.
//!
//! Files: `handle` (Command, Reply, Handle), `lifecycle` (start, reconcile, pause/reboot,
//! domain events), `volumes` (attach, detach, expand, live-disk cache), `agent` (freeze/thaw),
//! `migration` (`source`, `target`, and the [`migration::MigrationPeer`] a front-end
//! implements), `state` (status and event log), `ledger` (the owner's books: the only writer
//! of the watched status and the event log; operations send it reports), `plan` (VMI to
//! domain in this pod), `error` (the core's error and its classification), `core` (what the
//! operations share: configuration, the read sides of the ledger, the libvirt connection).

pub mod agent;
mod core;
pub mod error;
pub mod handle;
mod ledger;
mod lifecycle;
pub mod migration;
pub mod plan;
pub mod snapshot;
pub mod state;
mod volumes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::libvirt::events::StopReason;
use crate::libvirt::{DomainEvent, Hypervisor, LibvirtError, RawEvent};
use crate::pod::daemons::{self, Daemon, DaemonEvent};
use crate::pod::PodLayout;
use crate::spec::VirtualMachineInstance;
use core::Launcher;
pub use core::{DETACH_TIMEOUT, FREEZE_TIMEOUT, LIBVIRTD_BACK};
pub use error::{Classified, ControlError, ErrorKind};
use handle::Request;
pub use handle::{Answer, Command, Handle, Reply};
use ledger::{Ledger, Report};
use migration::{MigrationInbox, MigrationLink};
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
    /// What SIGTERM (and SIGINT) does.
    pub on_sigterm: OnSigterm,
    /// KubeVirt's pod: `<share dir>/migrationproxy`, where virt-handler's migration proxies
    /// meet the launcher's libvirt and QEMU.
    pub migration_proxy_dir: Option<std::path::PathBuf>,
    /// Standalone `run --vm`: the storage directory and the VM's claims (what a snapshot
    /// copies); `None` elsewhere (snapshots are refused).
    pub storage: Option<snapshot::SnapshotStorage>,
    /// Warn when the guest writes nothing to its serial console for this long after the
    /// relay began (a guest that boots usually does); `None`: no warning.
    pub console_silence: Option<Duration>,
    /// Standalone `run --migration-target`: `vmi` is not started but awaited by live
    /// migration (the target prepared for it at once); the map sizes the destination images
    /// a block migration copies into (volume name to bytes, as the source reports them).
    pub incoming: Option<std::collections::HashMap<String, u64>>,
}

/// What the launcher does on SIGTERM once a domain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSigterm {
    /// Standalone: the ACPI power button, and the domain destroyed when the VMI's grace
    /// period is over.
    #[default]
    ShutDown,
    /// KubeVirt's pod is being deleted: mark `MarkedForGracefulShutdown` in the KubeVirt
    /// metadata (virt-handler, told of it, drives the shutdown through the cmd API) and destroy
    /// the domain ourselves after `grace` (`--grace-period-seconds`), as KubeVirt's launcher
    /// does (`cmd/virt-launcher/virt-launcher.go`, `pkg/virt-launcher/monitor.go`).
    MarkForHandler { grace: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot set up process supervision: {0}")]
    Setup(std::io::Error),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot await the VM as a migration target: {0}")]
    Prepare(ControlError),
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

/// What the core is configured with.
pub(crate) struct CoreConfig {
    pub planner: Planner,
    pub sockets: Option<migration::PodSockets>,
    pub detach_timeout: Duration,
    pub libvirtd_pid_file: Option<std::path::PathBuf>,
    pub storage: Option<snapshot::SnapshotStorage>,
}

/// The owner of the domain's state, before it runs: connected to libvirtd, listening for
/// signals. Front-ends get a [`Handle`] ([`Supervisor::handle`]) before [`Supervisor::run`].
pub struct Supervisor {
    core: Arc<Launcher>,
    ledger: Ledger,
    handle: Handle,
    opts: RunOptions,
    relays: Relays,
    inputs: Inputs,
}

/// Everything the owner waits on.
struct Inputs {
    raw_events: mpsc::UnboundedReceiver<RawEvent>,
    daemon_events: mpsc::UnboundedReceiver<DaemonEvent>,
    urgent: mpsc::UnboundedReceiver<Request>,
    requests: mpsc::UnboundedReceiver<Request>,
    internal: mpsc::UnboundedReceiver<Internal>,
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
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (urgent_tx, urgent) = mpsc::unbounded_channel();
        let config = CoreConfig {
            planner: opts.planner.clone(),
            sockets: Some(migration::PodSockets {
                libvirt_uri: layout.libvirt_uri(),
                runtime_dir: layout.root().to_path_buf(),
            }),
            detach_timeout: opts.detach_timeout,
            libvirtd_pid_file: Some(layout.pid_dir().join("libvirtd.pid")),
            storage: opts.storage.clone(),
        };
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (ledger, views) = Ledger::new(requests_tx.clone());
        let core = Launcher::new(hv, config, views, internal_tx);
        let handle = Handle {
            requests: requests_tx,
            urgent: urgent_tx,
            status: core.status.clone(),
            vmi: core.vmi.clone(),
            console_log: core.console_log.clone(),
            events: core.events.clone(),
            domain_type: core.domain_type().to_string(),
            migration_proxy_dir: opts.migration_proxy_dir.clone(),
        };
        let sigterm = signal(SignalKind::terminate()).map_err(SupervisorError::Setup)?;
        let sigint = signal(SignalKind::interrupt()).map_err(SupervisorError::Setup)?;
        let relays = Relays {
            layout: layout.clone(),
            log_max_bytes: opts.log_max_bytes,
            stop: pod.stop_follow,
            started: false,
            console_silence: opts.console_silence,
        };
        Ok(Supervisor {
            core,
            ledger,
            handle,
            opts,
            relays,
            inputs: Inputs {
                raw_events,
                daemon_events: pod.daemon_events,
                urgent,
                requests,
                internal,
                sigterm,
                sigint,
            },
        })
    }

    /// The way into the core, for the front-ends.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Starts the VMI given (if any) and handles commands and events until the VM stops; the
    /// last event published says how it ended.
    pub async fn run(self) -> Result<Outcome, SupervisorError> {
        let Supervisor {
            core,
            mut ledger,
            opts,
            relays,
            mut inputs,
            ..
        } = self;
        let result = async {
            // Whatever comes first (a VM to prepare, a Sync, an incoming migration) finds them
            // loaded or loading.
            warm_capabilities(&core);
            match (opts.vmi.clone(), opts.incoming.clone()) {
                (Some(vmi), Some(disk_sizes)) => {
                    core.prepare_migration_target(vmi, disk_sizes)
                        .await
                        .map_err(SupervisorError::Prepare)?;
                }
                (Some(vmi), None) => core.sync(vmi).await?,
                (None, _) => {}
            }
            owner_loop(&core, &opts, relays, &mut inputs, &mut ledger).await
        }
        .await;
        // What operations reported and the owner has not applied yet still goes in, before
        // the final event.
        let mut removals = Removals::new();
        while let Ok(msg) = inputs.internal.try_recv() {
            on_internal(&mut ledger, &mut removals, msg);
        }
        if let Ok(outcome) = &result {
            ledger.publish(
                EventKind::Final,
                &format!("launcher exiting with code {}", outcome.exit_code()),
            );
            // Watchers receive the final event before the socket goes away (the server's
            // graceful shutdown then writes what they took); nobody watching, no wait.
            if !core.events.delivered(Duration::from_millis(200)).await {
                tracing::debug!("a watcher had not taken the final event after 200 ms");
            }
        }
        result
    }
}

/// Has the daemon load QEMU's capabilities now, in the background. A fresh daemon loads them at
/// the first define, on the VM's start path: ~50 ms from libvirt's cache, and in KubeVirt's
/// pod, whose cache starts empty, a probe of QEMU (~0.6 s here).
/// - A launcher that waits for its VM (KubeVirt's handler Syncs once the pod is Ready, a
///   standalone Sync, an incoming migration): the Sync finds them loaded.
/// - A launcher started with its VM: they load while the VM's files (a cloud-init ISO) and
///   network are prepared (spawn → running 493 → 455 ms for a VM with cloud-init, medians of
///   10 here).
///
/// A define that comes first waits for the same load, not a second one (libvirt's capability
/// cache is locked while it fills). A failure changes nothing: the define reports what is
/// wrong.
fn warm_capabilities(core: &Launcher) {
    let hv = core.hypervisor().clone();
    let virttype = core.domain_type().to_string();
    tokio::spawn(async move {
        let t = Instant::now();
        match hv
            .domain_capabilities("x86_64", Some("q35"), &virttype)
            .await
        {
            Ok(_) => tracing::info!(
                elapsed_ms = t.elapsed().as_secs_f64() * 1e3,
                "QEMU capabilities loaded ahead of the VM"
            ),
            Err(e) => tracing::debug!(error = %e, "QEMU capabilities not loaded ahead of the VM"),
        }
    });
}

/// Relays the QEMU log and the guest console into our log once a domain exists (started
/// here, or arrived by migration).
struct Relays {
    layout: PodLayout,
    log_max_bytes: u64,
    stop: watch::Receiver<bool>,
    started: bool,
    console_silence: Option<Duration>,
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
        if let Some(after) = self.console_silence {
            tokio::spawn(warn_if_silent(console.clone(), after, self.stop.clone()));
        }
        daemons::follow_file("console", console, max, self.stop.clone());
        self.started = true;
    }
}

/// One warning when the console log (and its rotated copy) has not grown `after` the relay
/// began: a guest that boots says something on its serial console, one that hangs in the
/// firmware or in a kernel without `console=ttyS0` does not.
async fn warn_if_silent(
    console: std::path::PathBuf,
    after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let sizes = || {
        let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut rotated = console.as_os_str().to_owned();
        rotated.push(".1");
        (len(&console), len(std::path::Path::new(&rotated)))
    };
    let before = sizes();
    tokio::select! {
        _ = tokio::time::sleep(after) => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    if sizes() == before {
        tracing::warn!(
            console_log = %console.display(),
            seconds = after.as_secs(),
            "the guest has written nothing to its serial console for {} s: a booting guest \
             usually does; check that its disk or kernel boots and that the kernel's console \
             is ttyS0 (console=ttyS0)",
            after.as_secs()
        );
    }
}

/// The loop's view of a requested stop.
struct Stopping {
    deadline: Option<Instant>,
    /// KubeVirt mode: when the domain is destroyed after SIGTERM (`--grace-period-seconds`).
    kill_at: Option<Instant>,
    destroyed: bool,
    /// A stop came during a migration: the ACPI button is pressed once the cancelled
    /// migration has ended (the migration tells the owner it is done), or at the latest then.
    acpi_after_migration: Option<AcpiPending>,
    /// virt-handler drives this launcher (it sent one of its commands): a domain that stops
    /// stays defined until its Delete, and Shutdown never destroys by itself.
    handler: bool,
    /// In the handler's mode: the domain stopped (why), and waits for Delete.
    stopped: Option<StopReason>,
    /// The pod was signalled (SIGTERM, SIGINT): a stop ends the launcher in any mode.
    signalled: bool,
}

impl Stopping {
    /// The domain stopped for `reason`: the launcher ends (its outcome), unless virt-handler
    /// drives it, which deletes the stopped domain itself (KubeVirt's Delete).
    async fn domain_stopped(
        &mut self,
        core: &Arc<Launcher>,
        ledger: &Ledger,
        reason: StopReason,
    ) -> Option<Outcome> {
        if !self.handler
            || self.signalled
            || reason == StopReason::Migrated
            || core.awaiting_migration()
        {
            return Some(finish(core, reason, self.deadline.is_some()).await);
        }
        if self.stopped.is_none() {
            tracing::info!(reason = ?reason, "domain stopped; kept defined until the handler deletes it");
            let state = ledger.status().state;
            if !matches!(state, state::State::Shutoff | state::State::Crashed) {
                // Gone without an event (found by the liveness check or a reconnect).
                let s = if reason.is_clean() {
                    state::State::Shutoff
                } else {
                    state::State::Crashed
                };
                ledger.set_state(s, &format!("{reason:?}").to_lowercase());
            }
        }
        self.stopped = Some(reason);
        None
    }
}

/// An ACPI shutdown waiting for a cancelled migration to end.
struct AcpiPending {
    why: &'static str,
    grace: Duration,
    until: Instant,
}

/// How long a stop waits for the migration it cancelled to end before it presses the button.
const MIGRATION_CANCEL_WAIT: Duration = Duration::from_secs(10);

/// A stop asked for through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopRequest {
    Graceful(Duration),
    Kill,
}

/// The operations the owner runs one at a time: whether one runs, and those waiting their
/// turn, in arrival order.
struct Queue<T> {
    busy: bool,
    waiting: std::collections::VecDeque<T>,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Queue {
            busy: false,
            waiting: Default::default(),
        }
    }

    /// `item` arrived: it is returned if it may start now, else it waits its turn.
    fn admit(&mut self, item: T) -> Option<T> {
        if self.busy {
            self.waiting.push_back(item);
            None
        } else {
            self.busy = true;
            Some(item)
        }
    }

    /// The running operation ended: the next one to start, if any.
    fn finished(&mut self) -> Option<T> {
        let next = self.waiting.pop_front();
        self.busy = next.is_some();
        next
    }
}

/// The owner task: handles stops first (signals, Shutdown, Kill, CancelMigration), then the
/// end of an operation, libvirt and daemon events, and then the next command. Operations run
/// as child tasks, one exclusive operation at a time (a Sync waiting for a detach, or a
/// migration being monitored, never keeps a stop, an event or a read waiting); each tells the
/// owner when it is done.
async fn owner_loop(
    core: &Arc<Launcher>,
    opts: &RunOptions,
    mut relays: Relays,
    inputs: &mut Inputs,
    ledger: &mut Ledger,
) -> Result<Outcome, SupervisorError> {
    let Inputs {
        raw_events,
        daemon_events,
        urgent,
        requests,
        internal,
        sigterm,
        sigint,
    } = inputs;
    let mut queue = Queue::new();
    let mut link = MigrationLink::default();
    let mut removals = Removals::new();
    let launched = Instant::now();
    let mut stopping = Stopping {
        deadline: None,
        kill_at: None,
        destroyed: false,
        acpi_after_migration: None,
        handler: false,
        stopped: None,
        signalled: false,
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
        let sigterm_grace_over = async {
            match stopping.kill_at {
                Some(d) if !stopping.destroyed => tokio::time::sleep_until(d.into()).await,
                _ => std::future::pending().await,
            }
        };
        let migration_cancel_over = async {
            match &stopping.acpi_after_migration {
                Some(p) => tokio::time::sleep_until(p.until.into()).await,
                None => std::future::pending().await,
            }
        };
        let start_timeout = async {
            // A prepared migration target waits for its VM as long as it takes to come.
            if core.has_started() || core.awaiting_migration() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep_until((launched + opts.qemu_timeout).into()).await
            }
        };
        tokio::select! {
            biased;
            // First what operations report: it already happened, and a stop or an event is
            // judged on the state it left (a domain that started, a migration that ended).
            // Before libvirt's events too: a detach says it waits before it asks libvirt.
            Some(msg) = internal.recv() => {
                if let Handled::Done { synced } = on_internal(ledger, &mut removals, msg) {
                    if synced {
                        // Read the domain's disks for the next Sync now, off that Sync's path.
                        let core = core.clone();
                        tokio::spawn(async move { core.prefetch_live_disks().await });
                    }
                    if let Some(next) = queue.finished() {
                        spawn_operation(core, ledger, next, &mut link);
                    }
                    if stopping.acpi_after_migration.is_some() && !core.migration_running() {
                        if let Some(p) = stopping.acpi_after_migration.take() {
                            press_acpi(core, p.why, p.grace).await;
                        }
                    }
                }
            }
            _ = sigterm.recv() => {
                if !core.has_started() { return Ok(Outcome { reason: None, requested: true }); }
                stopping.signalled = true;
                if let Some(reason) = stopping.stopped {
                    return Ok(finish(core, reason, true).await);
                }
                on_signal(core, ledger, opts.on_sigterm, "SIGTERM", &mut stopping, &link).await;
            }
            _ = sigint.recv() => {
                if !core.has_started() { return Ok(Outcome { reason: None, requested: true }); }
                stopping.signalled = true;
                if let Some(reason) = stopping.stopped {
                    return Ok(finish(core, reason, true).await);
                }
                on_signal(core, ledger, opts.on_sigterm, "SIGINT", &mut stopping, &link).await;
            }
            Some(req) = urgent.recv() => {
                if let Request::Command(cmd, _) = &req {
                    stopping.handler |= cmd.is_handlers();
                }
                if let Some(outcome) = on_urgent(core, ledger, req, &mut stopping, &link).await {
                    return Ok(outcome);
                }
            }
            _ = grace_over => destroy(core, "grace period over", &mut stopping).await,
            _ = sigterm_grace_over => {
                destroy(core, "--grace-period-seconds after SIGTERM over", &mut stopping).await
            }
            _ = migration_cancel_over => {
                if let Some(p) = stopping.acpi_after_migration.take() {
                    tracing::warn!("the cancelled migration has not ended; shutting down anyway");
                    press_acpi(core, p.why, p.grace).await;
                }
            }
            _ = start_timeout => return Err(SupervisorError::StartTimeout(opts.qemu_timeout)),
            // Events can be lost (a daemon restart at the wrong moment): check now and then that
            // the domain we think runs still does, so a stop never goes unnoticed.
            _ = liveness.tick(), if core.has_started() && stopping.stopped.is_none() => {
                if let Some(reason) = gone(core).await {
                    tracing::warn!(reason = ?reason, "the domain stopped without an event");
                    drain_after_stop(core, ledger, raw_events, internal, reason, &mut link, &mut removals).await;
                    if let Some(outcome) = stopping.domain_stopped(core, ledger, reason).await {
                        return Ok(outcome);
                    }
                }
            }
            Some(ev) = raw_events.recv() => {
                let Some(ev) = our_event(core, ev) else {
                    continue;
                };
                if let DomainEvent::ConnectionClosed { .. } = ev {
                    if let Some(reason) = reconnect(core).await? {
                        if let Some(outcome) = stopping.domain_stopped(core, ledger, reason).await {
                            return Ok(outcome);
                        }
                    }
                } else if stale_stop(core, &ev).await {
                    tracing::info!("ignoring the stop of an earlier, failed start: the domain runs");
                } else if let Some(reason) = apply_event(core, ledger, &mut link, &mut removals, &ev) {
                    if stopping.stopped.is_some() {
                        continue;
                    }
                    drain_after_stop(core, ledger, raw_events, internal, reason, &mut link, &mut removals).await;
                    if let Some(outcome) = stopping.domain_stopped(core, ledger, reason).await {
                        return Ok(outcome);
                    }
                }
            }
            Some(ev) = daemon_events.recv() => {
                match &ev {
                    DaemonEvent::Died { daemon, exit } => {
                        tracing::info!(daemon = daemon.name(), event = "died", exit = %exit, "daemon event")
                    }
                    DaemonEvent::Restarted { daemon, pid } => {
                        tracing::info!(daemon = daemon.name(), event = "restarted", pid, "daemon event")
                    }
                    DaemonEvent::RestartFailed { daemon, error } => {
                        tracing::info!(daemon = daemon.name(), event = "restartFailed", error = %error, "daemon event")
                    }
                }
                ledger.publish(EventKind::Daemon, &format!("{ev:?}"));
                if let DaemonEvent::Restarted { daemon: Daemon::Libvirtd, .. } = ev {
                    if let Some(reason) = reconnect(core).await? {
                        if let Some(outcome) = stopping.domain_stopped(core, ledger, reason).await {
                            return Ok(outcome);
                        }
                    }
                }
            }
            Some(req) = requests.recv() => {
                if let Request::Command(cmd, _) = &req {
                    stopping.handler |= cmd.is_handlers();
                    if cmd.is_urgent() {
                        if let Some(outcome) = on_urgent(core, ledger, req, &mut stopping, &link).await {
                            return Ok(outcome);
                        }
                        continue;
                    }
                }
                admit(core, ledger, req, &mut queue, &mut link);
            }
        }
    }
}

/// Starts `req` now or queues it behind the exclusive operation running.
fn admit(
    core: &Arc<Launcher>,
    ledger: &Ledger,
    req: Request,
    queue: &mut Queue<Request>,
    link: &mut MigrationLink,
) {
    if let Request::Command(cmd, _) = &req {
        if !cmd.is_exclusive() {
            tokio::spawn(execute(core.clone(), req, None));
            return;
        }
    }
    let req = match req {
        // A thaw or a freeze came since: this automatic thaw is off.
        Request::AutoThaw { generation } if !ledger.thaw_due(generation) => return,
        // A second migration is refused at once, not after the first one ended.
        Request::Command(cmd, reply)
            if matches!(*cmd, Command::Migrate { .. }) && core.migration_running() =>
        {
            let _ = reply.send(Err(ControlError::Precondition(
                "a migration is already running".into(),
            )));
            return;
        }
        // virt-handler asking again for the migration it started: nothing to do (KubeVirt's
        // launcher answers so at once, `live-migration-source.go:307-317`); another one while
        // a migration runs: refused at once.
        Request::Command(cmd, reply) if handler_migration_started(&cmd, ledger) => {
            let _ = reply.send(Ok(Reply::Done));
            return;
        }
        Request::Command(cmd, reply)
            if matches!(*cmd, Command::HandlerMigrate { .. }) && core.migration_running() =>
        {
            let _ = reply.send(Err(ControlError::Precondition(
                "a migration is already running".into(),
            )));
            return;
        }
        req => req,
    };
    if let Some(req) = queue.admit(req) {
        spawn_operation(core, ledger, req, link);
    }
}

/// Whether `cmd` is virt-handler's Migrate of the migration that started here and has not
/// ended.
fn handler_migration_started(cmd: &Command, ledger: &Ledger) -> bool {
    let Command::HandlerMigrate { migration_uid, .. } = cmd else {
        return false;
    };
    ledger.status().kubevirt.migration.is_some_and(|m| {
        m.uid == *migration_uid && m.start_timestamp.is_some() && m.end_timestamp.is_none()
    })
}

/// Runs an exclusive operation as a child task that tells the owner when it is done (after
/// everything it reported, on the same channel).
fn spawn_operation(core: &Arc<Launcher>, ledger: &Ledger, req: Request, link: &mut MigrationLink) {
    let inbox = match &req {
        Request::Command(cmd, _)
            if matches!(
                **cmd,
                Command::Migrate { .. } | Command::HandlerMigrate { .. }
            ) =>
        {
            Some(link.open())
        }
        _ => None,
    };
    // An automatic thaw made stale while it waited its turn ends at once.
    let req = match req {
        Request::AutoThaw { generation } if !ledger.thaw_due(generation) => None,
        req => Some(req),
    };
    let core = core.clone();
    tokio::spawn(async move {
        let synced = match req {
            Some(req) => execute(core.clone(), req, inbox).await,
            None => None,
        };
        let _ = core.internal.send(Internal::Done { synced });
    });
}

/// Carries out one request and answers it; a Sync is answered by the owner (with the status
/// once what the Sync reported is applied): its caller and result are returned.
async fn execute(
    core: Arc<Launcher>,
    req: Request,
    inbox: Option<MigrationInbox>,
) -> Option<SyncEnd> {
    let (cmd, reply) = match req {
        Request::Command(cmd, reply) => (cmd, reply),
        Request::AutoThaw { .. } => {
            core.auto_thaw().await;
            return None;
        }
    };
    let name = cmd.name();
    if reply.is_closed() {
        // The caller gave up (its deadline passed) while this waited its turn.
        tracing::debug!(command = name, "caller gone; not started");
        return None;
    }
    let answer = match *cmd {
        Command::Sync(vmi) => {
            let t0 = Instant::now();
            let result = core.sync(vmi).await;
            tracing::debug!(total_us = t0.elapsed().as_micros() as u64, "Sync handled");
            if let Err(e) = &result {
                tracing::debug!(command = name, error = %e, "command failed");
            }
            return Some(SyncEnd { reply, result });
        }
        Command::Pause => core.pause().await.map(|()| Reply::Done),
        Command::Unpause => core.unpause().await.map(|()| Reply::Done),
        Command::Reboot => core.reboot().await.map(|()| Reply::Done),
        Command::Reset => core.reset().await.map(|()| Reply::Done),
        Command::HandlerSync(vmi) => {
            let result = core.handler_sync(vmi).await;
            if let Err(e) = &result {
                tracing::debug!(command = name, error = %e, "command failed");
            }
            return Some(SyncEnd { reply, result });
        }
        Command::HandlerSyncVcpus(vmi) => core.sync_vcpus(vmi).await.map(|()| Reply::Done),
        Command::Freeze { timeout } => core.freeze(timeout).await.map(Reply::Filesystems),
        Command::Unfreeze => core.unfreeze().await.map(Reply::Filesystems),
        Command::Snapshot { name } => core
            .snapshot(&name)
            .await
            .map(|o| Reply::Snapshot(Box::new(o))),
        Command::Stats => core
            .stats()
            .await
            .map(|(stats, disks)| Reply::Stats { stats, disks }),
        Command::Exec {
            path,
            args,
            timeout,
        } => core
            .guest_exec(&path, &args, timeout)
            .await
            .map(Reply::Exec),
        Command::GuestPing { timeout } => core.guest_ping(timeout).await.map(|()| Reply::Done),
        Command::DomainXml => core.domain_xml().await.map(Reply::Xml),
        Command::Versions => core
            .blocking(|hv| hv.versions())
            .await
            .map(|(libvirt, qemu)| Reply::Versions { libvirt, qemu }),
        Command::PrepareMigrationTarget { vmi, disk_sizes } => core
            .prepare_migration_target(vmi, disk_sizes)
            .await
            .map(Reply::Target),
        Command::HandlerMigrationTarget {
            vmi,
            migration_uid,
            proxy_dir,
        } => core
            .handler_prepare_target(vmi, migration_uid, proxy_dir)
            .await
            .map(|()| Reply::Done),
        Command::HandlerMigrate {
            migration_uid,
            peer,
            options,
        } => {
            match inbox {
                Some(inbox) => {
                    core.handler_migrate(migration_uid, peer, options, inbox, reply)
                        .await
                }
                None => {
                    let _ = reply.send(Err(ControlError::Internal(
                        "a migration started without its link to the owner".into(),
                    )));
                }
            }
            return None;
        }
        Command::Migrate { peer, options } => match inbox {
            Some(inbox) => core
                .migrate(peer.as_ref(), options, inbox)
                .await
                .map(Reply::Migrated),
            None => Err(ControlError::Internal(
                "a migration started without its link to the owner".into(),
            )),
        },
        Command::Shutdown { .. }
        | Command::Kill
        | Command::CancelMigration
        | Command::AcpiShutdown
        | Command::Delete
        | Command::TargetCleanup => Err(ControlError::Internal(format!(
            "{name} is handled by the owner"
        ))),
    };
    if let Err(e) = &answer {
        tracing::debug!(command = name, error = %e, "command failed");
    }
    let _ = reply.send(answer);
    None
}

/// A Sync that ended: its caller, and how it went.
pub(crate) struct SyncEnd {
    reply: oneshot::Sender<Answer>,
    result: Result<(), ControlError>,
}

/// What the owner made of an operation's message.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    Applied,
    /// The operation ended; `synced`: it was a Sync that succeeded.
    Done {
        synced: bool,
    },
}

/// Handles what an operation told the owner.
fn on_internal(ledger: &mut Ledger, removals: &mut Removals, msg: Internal) -> Handled {
    match msg {
        Internal::Report(r) => ledger.apply(r),
        Internal::AwaitRemoval { alias, answer } => {
            removals.insert(alias, answer);
        }
        Internal::ForgetRemoval { alias } => {
            removals.remove(&alias);
        }
        Internal::Done { synced } => {
            let Some(SyncEnd { reply, result }) = synced else {
                return Handled::Done { synced: false };
            };
            let ok = result.is_ok();
            let _ = reply.send(result.map(|()| Reply::Status(Box::new(ledger.status()))));
            return Handled::Done { synced: ok };
        }
    }
    Handled::Applied
}

/// Handles a stop or a CancelMigration. Returns the outcome when the launcher is done.
async fn on_urgent(
    core: &Arc<Launcher>,
    ledger: &Ledger,
    req: Request,
    stopping: &mut Stopping,
    link: &MigrationLink,
) -> Option<Outcome> {
    let Request::Command(cmd, reply) = req else {
        return None;
    };
    let stop = match *cmd {
        Command::CancelMigration => {
            let answer = core.check_cancel().map(|()| {
                // KubeVirt's metadata says an abort is under way (`AbortStatus: Aborting`)
                // until the migration has ended.
                ledger.update(|s| {
                    if let Some(m) = s
                        .kubevirt
                        .migration
                        .as_mut()
                        .filter(|m| m.end_timestamp.is_none() && m.abort_status.is_empty())
                    {
                        m.abort_status = "Aborting".into();
                    }
                });
                link.cancel();
                Reply::Done
            });
            let _ = reply.send(answer);
            return None;
        }
        Command::TargetCleanup => {
            let _ = reply.send(Ok(Reply::Done));
            if core.awaiting_migration() {
                tracing::info!("virt-handler gave up the migration to this pod: exiting");
                return Some(Outcome {
                    reason: None,
                    requested: true,
                });
            }
            tracing::info!("cleanup of this target pod asked for, but a VM runs here: ignored");
            return None;
        }
        Command::Shutdown { grace } => StopRequest::Graceful(grace.unwrap_or_else(|| core.grace())),
        Command::AcpiShutdown => {
            let _ = reply.send(acpi_shutdown(core, ledger, stopping).await);
            return None;
        }
        Command::Delete => {
            let (answer, outcome) = delete(core, ledger, stopping).await;
            let _ = reply.send(answer);
            return outcome;
        }
        // The stopped domain waits for its Delete: nothing to kill.
        Command::Kill if stopping.stopped.is_some() => {
            let _ = reply.send(Ok(Reply::Done));
            return None;
        }
        Command::Kill => StopRequest::Kill,
        _ => {
            let _ = reply.send(Err(ControlError::Internal("not a stop".into())));
            return None;
        }
    };
    if let Err(e) = core.check_stop() {
        let _ = reply.send(Err(e));
        return None;
    }
    let _ = reply.send(Ok(Reply::Done));
    match stop {
        // A prepared migration target told to give up, or a stop before any VM.
        _ if !core.has_started() => {
            return Some(Outcome {
                reason: None,
                requested: true,
            })
        }
        StopRequest::Graceful(grace) => {
            begin_stop(core, "Shutdown call", grace, stopping, link).await
        }
        StopRequest::Kill => {
            stopping.deadline.get_or_insert_with(Instant::now);
            destroy(core, "Kill call", stopping).await;
        }
    }
    None
}

/// KubeVirt's Shutdown (see [`Command::AcpiShutdown`]).
async fn acpi_shutdown(core: &Arc<Launcher>, ledger: &Ledger, stopping: &Stopping) -> Answer {
    if stopping.stopped.is_some() || !core.has_started() || core.domain_name().is_err() {
        return Ok(Reply::Done);
    }
    if ledger.status().kubevirt.deletion_timestamp.is_none() {
        let now = std::time::SystemTime::now();
        ledger.update(|s| s.kubevirt.deletion_timestamp = Some(now));
        ledger.publish(
            EventKind::Domain,
            "graceful shutdown requested: deletion timestamp set",
        );
    }
    tracing::info!("shutting the guest down (ACPI power button), as the handler asked");
    match acpi_button(core).await {
        Ok(Ok(())) => Ok(Reply::Done),
        // Stopped meanwhile: nothing left to shut down.
        Ok(Err(LibvirtError::NoDomain(_))) => Ok(Reply::Done),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

/// KubeVirt's Delete (see [`Command::Delete`]): the answer, and the launcher's outcome when
/// it ends.
async fn delete(
    core: &Arc<Launcher>,
    ledger: &Ledger,
    stopping: &Stopping,
) -> (Answer, Option<Outcome>) {
    let reason = match stopping.stopped {
        Some(reason) => Some(reason),
        None if core.has_started() => {
            let e = ControlError::Precondition(
                "the domain is still running: shut it down or kill it first".into(),
            );
            return (Err(e), None);
        }
        // No domain was ever defined here: nothing to delete.
        None if core.domain_name().is_err() => return (Ok(Reply::Done), None),
        // Defined, but its start failed: deleted all the same.
        None => None,
    };
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    match tokio::task::spawn_blocking(move || hv.undefine(&name)).await {
        Ok(Ok(())) | Ok(Err(LibvirtError::NoDomain(_))) => {}
        Ok(Err(e)) => return (Err(e.into()), None),
        Err(e) => return (Err(e.into()), None),
    }
    ledger.update(|s| s.deleted = true);
    tracing::info!(domain = %core.status().name, "domain deleted, as the handler asked; exiting");
    let outcome = Outcome {
        reason,
        requested: true,
    };
    (Ok(Reply::Done), Some(outcome))
}

/// The events libvirt sends right after a stop still count: after STOPPED(migrated) comes
/// JOB_COMPLETED with the migration's statistics (its measured downtime), a fraction of a
/// millisecond later, and the Migrate call waits for them. Handle what is queued; after a
/// migration keep handling events and reports until the Migrate call has ended (it says so;
/// at most [`MIGRATION_END_WAIT`]), and only then let the definition be removed.
async fn drain_after_stop(
    core: &Arc<Launcher>,
    ledger: &mut Ledger,
    raw_events: &mut mpsc::UnboundedReceiver<RawEvent>,
    internal: &mut mpsc::UnboundedReceiver<Internal>,
    reason: StopReason,
    link: &mut MigrationLink,
    removals: &mut Removals,
) {
    let handle =
        |ev: RawEvent, ledger: &mut Ledger, link: &mut MigrationLink, removals: &mut Removals| {
            if let Some(ev) = our_event(core, ev) {
                let _ = apply_event(core, ledger, link, removals, &ev);
            }
        };
    let until = Instant::now() + MIGRATION_END_WAIT;
    loop {
        while let Ok(msg) = internal.try_recv() {
            on_internal(ledger, removals, msg);
        }
        while let Ok(ev) = raw_events.try_recv() {
            handle(ev, ledger, link, removals);
        }
        if reason != StopReason::Migrated || !core.migration_running() || Instant::now() >= until {
            return;
        }
        tokio::select! {
            Some(ev) = raw_events.recv() => handle(ev, ledger, link, removals),
            Some(msg) = internal.recv() => {
                on_internal(ledger, removals, msg);
            }
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
}

/// Applies a libvirt event: to the state, and a completed job's statistics to the migration
/// waiting for them. Returns the stop reason when the domain is gone.
fn apply_event(
    core: &Arc<Launcher>,
    ledger: &Ledger,
    link: &mut MigrationLink,
    removals: &mut Removals,
    ev: &DomainEvent,
) -> Option<StopReason> {
    match ev {
        // A snapshot's backup job ends with the same event: it is not a migration's.
        DomainEvent::JobCompleted { stats, .. } if !snapshot::is_backup_job(stats) => {
            link.job_completed(stats)
        }
        DomainEvent::DeviceRemoved { alias, .. } => removed(ledger, removals, alias, true),
        DomainEvent::DeviceRemovalFailed { alias, .. } => removed(ledger, removals, alias, false),
        _ => {}
    }
    let stopped = core.on_domain_event(ledger, ev);
    // The agent answers (the status says so now): poll it for what KubeVirt reports of the
    // guest.
    if let DomainEvent::AgentConnected {
        connected: true, ..
    } = ev
    {
        agent::start_polling(core);
    }
    stopped
}

/// The detaches waiting for the guest to release a disk: alias → where the answer goes.
type Removals = std::collections::HashMap<String, oneshot::Sender<bool>>;

/// What an operation (or a child task of one) tells the owner, in order.
pub(crate) enum Internal {
    /// A change for the owner to apply to the state it keeps.
    Report(Report),
    /// The exclusive operation running ended (everything it reported came before this); a
    /// Sync's caller waits for the status as the owner has it then.
    Done { synced: Option<SyncEnd> },
    /// A detach of the disk with this alias waits for the guest's answer (true: released).
    AwaitRemoval {
        alias: String,
        answer: oneshot::Sender<bool>,
    },
    /// That detach stopped waiting (libvirt refused it, or it timed out).
    ForgetRemoval { alias: String },
}

/// The guest answered the detach of disk `alias`: the detach waiting gets the answer; a
/// release nobody waits for any more (the detach timed out) removes the disk all the same.
fn removed(ledger: &Ledger, removals: &mut Removals, alias: &str, released: bool) {
    if hand_over(removals, alias, released) {
        Launcher::released_late(ledger, alias);
    }
}

/// Gives the guest's answer to the detach waiting for it; true when the disk was released
/// and nobody waits for that any more.
fn hand_over(removals: &mut Removals, alias: &str, released: bool) -> bool {
    let late = match removals.remove(alias) {
        Some(waiter) => waiter.send(released).is_err(),
        None => true,
    };
    late && released
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
async fn begin_stop(
    core: &Arc<Launcher>,
    why: &'static str,
    grace: Duration,
    stopping: &mut Stopping,
    link: &MigrationLink,
) {
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
    if core.check_cancel().is_ok() {
        link.cancel();
        tracing::warn!(why, "stop requested during a migration: cancelling it");
        stopping.acpi_after_migration = Some(AcpiPending {
            why,
            grace,
            until: Instant::now() + MIGRATION_CANCEL_WAIT,
        });
        return;
    }
    press_acpi(core, why, grace).await;
}

/// SIGTERM or SIGINT while a domain runs (see [`OnSigterm`]).
async fn on_signal(
    core: &Arc<Launcher>,
    ledger: &mut Ledger,
    policy: OnSigterm,
    why: &'static str,
    stopping: &mut Stopping,
    link: &MigrationLink,
) {
    match policy {
        OnSigterm::ShutDown => begin_stop(core, why, core.grace(), stopping, link).await,
        OnSigterm::MarkForHandler { grace } => {
            // Its own timer: a Shutdown from virt-handler meanwhile still presses the button.
            if stopping.kill_at.is_none() {
                tracing::info!(
                    why,
                    grace_s = grace.as_secs(),
                    "marked for graceful shutdown; the domain is destroyed when the grace period ends"
                );
                stopping.kill_at = Some(Instant::now() + grace);
            }
            if !core.status().kubevirt.marked_for_graceful_shutdown {
                ledger.apply(Report::Status(Box::new(|s: &mut state::Status| {
                    s.kubevirt.marked_for_graceful_shutdown = true
                })));
                ledger.publish(EventKind::Domain, "marked for graceful shutdown");
            }
        }
    }
}

/// Presses the domain's ACPI power button (off the runtime), after ending the guest-agent
/// polls ([`agent::quiet_agent`]): the libvirt call's result, in the blocking task's.
async fn acpi_button(
    core: &Arc<Launcher>,
) -> Result<Result<(), LibvirtError>, tokio::task::JoinError> {
    agent::quiet_agent(core);
    let (hv, name) = (core.hypervisor().clone(), core.status().name);
    tokio::task::spawn_blocking(move || hv.shutdown_acpi(&name)).await
}

/// Presses the guest's ACPI power button.
async fn press_acpi(core: &Arc<Launcher>, why: &str, grace: Duration) {
    tracing::info!(
        why,
        grace_s = grace.as_secs(),
        "shutting the guest down (ACPI power button)"
    );
    match acpi_button(core).await {
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
    stopping.acpi_after_migration = None;
    agent::quiet_agent(core);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_operations_run_one_at_a_time_in_arrival_order() {
        let mut q = Queue::new();
        assert_eq!(q.admit("a"), Some("a"));
        assert_eq!(q.admit("b"), None);
        assert_eq!(q.admit("c"), None);
        assert_eq!(q.finished(), Some("b"));
        assert_eq!(q.admit("d"), None);
        assert_eq!(q.finished(), Some("c"));
        assert_eq!(q.finished(), Some("d"));
        assert_eq!(q.finished(), None);
        // Idle again: the next one starts at once.
        assert_eq!(q.admit("e"), Some("e"));
    }

    fn report(r: Report) -> Internal {
        Internal::Report(r)
    }

    #[tokio::test]
    async fn a_sync_is_answered_with_the_status_after_everything_it_reported() {
        let (requests, _r) = mpsc::unbounded_channel();
        let (mut ledger, views) = Ledger::new(requests);
        let mut removals = Removals::new();
        let (reply, answer) = oneshot::channel();
        let handled: Vec<Handled> = [
            report(Report::Status(Box::new(|s: &mut state::Status| {
                s.name = "default_vm".into()
            }))),
            report(Report::State {
                state: state::State::Running,
                reason: "started".into(),
            }),
            report(Report::Started),
            Internal::Done {
                synced: Some(SyncEnd {
                    reply,
                    result: Ok(()),
                }),
            },
        ]
        .into_iter()
        .map(|m| on_internal(&mut ledger, &mut removals, m))
        .collect();
        assert_eq!(
            handled,
            [
                Handled::Applied,
                Handled::Applied,
                Handled::Applied,
                Handled::Done { synced: true }
            ]
        );
        let Ok(Reply::Status(s)) = answer.await.unwrap() else {
            panic!("a Sync answers with the status");
        };
        assert_eq!(s.name, "default_vm");
        assert_eq!(s.state, state::State::Running);
        assert_eq!(s.last_seq, 1);
        assert!(*views.started.borrow());
    }

    #[tokio::test]
    async fn a_failed_sync_answers_its_error_and_other_operations_just_end() {
        let (requests, _r) = mpsc::unbounded_channel();
        let (mut ledger, _views) = Ledger::new(requests);
        let mut removals = Removals::new();
        let (reply, answer) = oneshot::channel();
        let done = Internal::Done {
            synced: Some(SyncEnd {
                reply,
                result: Err(ControlError::NoDomain),
            }),
        };
        assert_eq!(
            on_internal(&mut ledger, &mut removals, done),
            Handled::Done { synced: false }
        );
        assert!(matches!(answer.await.unwrap(), Err(ControlError::NoDomain)));
        let other = Internal::Done { synced: None };
        assert_eq!(
            on_internal(&mut ledger, &mut removals, other),
            Handled::Done { synced: false }
        );
        // A detach's wait is registered and forgotten through the same channel.
        let (answer, _rx) = oneshot::channel();
        let alias = "ua-hp".to_string();
        let wait = Internal::AwaitRemoval {
            alias: alias.clone(),
            answer,
        };
        assert_eq!(
            on_internal(&mut ledger, &mut removals, wait),
            Handled::Applied
        );
        assert!(removals.contains_key(&alias));
        let forget = Internal::ForgetRemoval { alias };
        on_internal(&mut ledger, &mut removals, forget);
        assert!(removals.is_empty());
    }

    #[test]
    fn the_guests_answer_goes_to_the_detach_waiting_or_counts_as_a_late_release() {
        let mut removals = Removals::new();
        let (tx, mut rx) = oneshot::channel();
        removals.insert("ua-a".into(), tx);
        assert!(!hand_over(&mut removals, "ua-a", true));
        assert_eq!(rx.try_recv(), Ok(true));
        // The detach timed out (its receiver is gone) just before the guest let go.
        let (tx, rx) = oneshot::channel();
        removals.insert("ua-b".into(), tx);
        drop(rx);
        assert!(hand_over(&mut removals, "ua-b", true));
        // Nobody waits: a release is late, a refusal changes nothing.
        assert!(hand_over(&mut removals, "ua-c", true));
        assert!(!hand_over(&mut removals, "ua-c", false));
        assert!(removals.is_empty());
    }
}
