//! Lifecycle and supervision: start the daemons, start the domain, follow its events, honour
//! the pod's grace period, and leave nothing running behind.

pub mod reaper;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::libvirt::events::StopReason;
use crate::libvirt::{DomainEvent, Hypervisor, LibvirtError, LifecycleKind, RawEvent};
use crate::pod::daemons::{self, Daemon, DaemonError, DaemonEvent, Daemons};
use crate::pod::PodLayout;
use reaper::Reaper;

/// What to run.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// libvirt domain name (`<namespace>_<name>`).
    pub domain: String,
    /// The converted domain XML.
    pub xml: String,
    /// `terminationGracePeriodSeconds`: from SIGTERM to destroy.
    pub grace: Duration,
    /// How long the domain may take to start (`--qemu-timeout`).
    pub qemu_timeout: Duration,
    /// The guest's serial console log, relayed into our log as `subcomponent: console`.
    pub console_log: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot set up process supervision: {0}")]
    Setup(std::io::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("the domain did not start within --qemu-timeout ({0:?})")]
    StartTimeout(Duration),
    #[error("internal task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// How the VM's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reason: StopReason,
    /// Whether the launcher had asked for the stop (SIGTERM / grace expiry).
    pub requested: bool,
}

impl Outcome {
    /// Exit 0 for a clean stop or a migration, non-zero for a crash or failure.
    pub fn exit_code(&self) -> i32 {
        if self.reason.is_clean() {
            0
        } else {
            1
        }
    }
}

/// Runs the VM until it stops. Always stops the daemons and kills leftover processes before
/// returning, whether the VM ran or not.
pub async fn run(layout: &PodLayout, plan: &LaunchPlan) -> Result<Outcome, SupervisorError> {
    let reaper = Reaper::start().map_err(SupervisorError::Setup)?;
    let (daemon_tx, daemon_rx) = mpsc::unbounded_channel();
    let mut daemons = Daemons::start(&reaper, layout, daemon_tx).await?;
    let (stop_follow, stop_follow_rx) = watch::channel(false);
    let result = supervise(layout, plan, daemon_rx, stop_follow_rx).await;
    let _ = stop_follow.send(true);
    daemons.stop().await;
    kill_leftovers().await;
    result
}

async fn supervise(
    layout: &PodLayout,
    plan: &LaunchPlan,
    mut daemon_events: mpsc::UnboundedReceiver<DaemonEvent>,
    stop_follow: watch::Receiver<bool>,
) -> Result<Outcome, SupervisorError> {
    let (raw_tx, mut raw_events) = mpsc::unbounded_channel::<RawEvent>();
    let uri = layout.libvirt_uri();
    let hv =
        Arc::new(tokio::task::spawn_blocking(move || Hypervisor::connect(&uri, raw_tx)).await??);
    let mut sigterm = signal(SignalKind::terminate()).map_err(SupervisorError::Setup)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(SupervisorError::Setup)?;

    tracing::info!(domain = %plan.domain, "starting domain");
    let started = Instant::now();
    let (h, xml) = (hv.clone(), plan.xml.clone());
    match tokio::time::timeout(
        plan.qemu_timeout,
        tokio::task::spawn_blocking(move || h.define_and_start(&xml)),
    )
    .await
    {
        Err(_) => return Err(SupervisorError::StartTimeout(plan.qemu_timeout)),
        Ok(r) => r??,
    }
    tracing::info!(domain = %plan.domain, elapsed_ms = started.elapsed().as_millis() as u64, "domain running");
    daemons::follow_file("qemu", layout.qemu_log(&plan.domain), stop_follow.clone());
    if let Some(console) = &plan.console_log {
        daemons::follow_file("console", console.clone(), stop_follow);
    }

    let mut deadline: Option<Instant> = None;
    let mut destroyed = false;
    loop {
        let sleep = async {
            match deadline {
                Some(d) if !destroyed => tokio::time::sleep_until(d.into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => request_stop(&hv, plan, "SIGTERM", &mut deadline).await,
            _ = sigint.recv() => request_stop(&hv, plan, "SIGINT", &mut deadline).await,
            _ = sleep => {
                tracing::warn!(domain = %plan.domain, grace_s = plan.grace.as_secs(), "grace period over; destroying the domain");
                destroyed = true;
                let h = hv.clone();
                let name = plan.domain.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || h.destroy(&name)).await? {
                    tracing::error!(error = %e, "destroy failed");
                }
            }
            Some(ev) = raw_events.recv() => {
                let ev = DomainEvent::from(ev);
                if ev.domain().is_some_and(|d| d != plan.domain) {
                    continue;
                }
                tracing::info!(event = %serde_json::to_string(&ev).unwrap_or_default(), "domain event");
                match ev {
                    DomainEvent::Lifecycle { kind: LifecycleKind::Stopped(reason), .. } => {
                        return finish(&hv, plan, reason, deadline.is_some()).await;
                    }
                    DomainEvent::ConnectionClosed { .. } => {
                        if let Some(outcome) = reconnect(&hv, plan).await? {
                            return finish(&hv, plan, outcome, deadline.is_some()).await;
                        }
                    }
                    _ => {}
                }
            }
            Some(ev) = daemon_events.recv() => {
                tracing::info!(event = ?ev, "daemon event");
                if let DaemonEvent::Restarted { daemon: Daemon::Libvirtd, .. } = ev {
                    if let Some(outcome) = reconnect(&hv, plan).await? {
                        return finish(&hv, plan, outcome, deadline.is_some()).await;
                    }
                }
            }
        }
    }
}

/// SIGTERM/SIGINT: press the ACPI button once and start the grace clock. A second signal
/// changes nothing (the clock already runs).
async fn request_stop(
    hv: &Arc<Hypervisor>,
    plan: &LaunchPlan,
    signal: &str,
    deadline: &mut Option<Instant>,
) {
    if deadline.is_some() {
        tracing::info!(
            signal,
            "stop already requested; waiting for the guest or the grace period"
        );
        return;
    }
    *deadline = Some(Instant::now() + plan.grace);
    tracing::info!(
        signal,
        grace_s = plan.grace.as_secs(),
        "shutting the guest down (ACPI power button)"
    );
    let (h, name) = (hv.clone(), plan.domain.clone());
    match tokio::task::spawn_blocking(move || h.shutdown_acpi(&name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ACPI shutdown request failed; the domain is destroyed when the grace period ends")
        }
        Err(e) => tracing::error!(error = %e, "shutdown task failed"),
    }
}

/// Reconnects after libvirtd went away. Returns the stop reason if the domain is gone.
async fn reconnect(
    hv: &Arc<Hypervisor>,
    plan: &LaunchPlan,
) -> Result<Option<StopReason>, SupervisorError> {
    if hv.is_connected() {
        return Ok(None);
    }
    hv.disconnect();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let h = hv.clone();
        match tokio::task::spawn_blocking(move || h.reconnect()).await? {
            Ok(()) => break,
            Err(e) if Instant::now() < until => {
                tracing::debug!(error = %e, "libvirtd not back yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (h, name) = (hv.clone(), plan.domain.clone());
    let state = tokio::task::spawn_blocking(move || h.state(&name)).await?;
    tracing::info!(state = ?state.as_ref().map(|s| s.name()).ok(), "reconnected to libvirtd");
    Ok(match state {
        Ok(s) if s.is_shut_off() => Some(StopReason::Unknown),
        Err(LibvirtError::NoDomain(_)) => Some(StopReason::Unknown),
        _ => None,
    })
}

/// The domain stopped: report it and remove its definition.
async fn finish(
    hv: &Arc<Hypervisor>,
    plan: &LaunchPlan,
    reason: StopReason,
    requested: bool,
) -> Result<Outcome, SupervisorError> {
    let (h, name) = (hv.clone(), plan.domain.clone());
    let _ = tokio::task::spawn_blocking(move || h.undefine(&name)).await?;
    let outcome = Outcome { reason, requested };
    tracing::info!(domain = %plan.domain, reason = ?reason, requested, exit_code = outcome.exit_code(), "domain stopped");
    Ok(outcome)
}

/// Kills every process still parented to us (an orphaned QEMU after a daemon crash), and
/// waits for the reaper to collect them.
async fn kill_leftovers() {
    let me = std::process::id() as i32;
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for pid in &children {
            tracing::warn!(pid, ?sig, "terminating leftover process");
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && !children_of(me).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Live (non-zombie) children of `parent`, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
            ppid == Some(parent) && state != Some("Z")
        })
        .collect()
}
