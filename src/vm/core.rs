//! The launcher's core: every operation on the domain, the state it keeps current from libvirt
//! events, and the event log. The gRPC layer and the signal loop both drive this type; it knows
//! nothing of either.
//!
//! Concurrency: operations that change the domain take `op` (one at a time, in arrival order);
//! reads (`status`, `subscribe`) never wait for libvirt or for an operation; every libvirt call
//! runs on tokio's blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

pub use super::error::ControlError;
use super::plan::Planner;
use super::state::{DiskStatus, Event, EventKind, EventLog, Gap, Phase, State, Status};
use crate::domain::live::LiveDomain;
use crate::domain::Disk;
use crate::libvirt::events::StopReason;
use crate::libvirt::{self, DomainEvent, DomainStats, Hypervisor, LibvirtError, LifecycleKind};
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
    hv: Arc<Hypervisor>,
    pub(super) planner: Planner,
    status: RwLock<Status>,
    pub(super) events: EventLog,
    pub(super) op: tokio::sync::Mutex<()>,
    vmi: Mutex<Option<VirtualMachineInstance>>,
    stop: mpsc::UnboundedSender<StopRequest>,
    /// Detaches waiting for the guest: alias → waiter.
    removals: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    /// Becomes true once a domain was started (or arrived by migration).
    pub(super) started: AtomicBool,
    freeze_generation: AtomicU64,
    domain_type: String,
    pub(super) console_log: Mutex<Option<std::path::PathBuf>>,
    /// This pod's sockets, for receiving a migration.
    pub(super) sockets: Option<super::migration::PodSockets>,
    /// A CancelMigration arrived.
    pub(super) cancel: AtomicBool,
    /// How long a detach waits for the guest, in milliseconds.
    detach_timeout_ms: AtomicU64,
    /// Statistics of the last completed job (a migration), from its JOB_COMPLETED event.
    pub(super) last_job: Mutex<Option<Vec<(String, f64)>>>,
    /// One reconnection to libvirtd at a time (the loop and a start may both notice a loss).
    reconnecting: tokio::sync::Mutex<()>,
    /// How many times a new connection to libvirtd was opened.
    connections: AtomicU64,
    /// libvirtd's pid file, to kill a daemon that hangs (the pod's supervisor restarts it).
    libvirtd_pid_file: Mutex<Option<PathBuf>>,
    /// The live domain's disks as last read, and the [`Launcher::live_generation`] they were
    /// read at: a Sync reuses them instead of asking libvirt for the whole domain XML again.
    live_cache: Mutex<Option<(u64, Vec<crate::domain::live::LiveDisk>)>>,
    /// Bumped whenever the domain may have changed: our own device calls, every domain event,
    /// a reconnect. A cached read from an older generation is never used.
    live_generation: AtomicU64,
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
    fn kill_hung_libvirtd(&self, why: &LibvirtError) {
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
    pub(super) async fn ensure_connected(&self) -> Result<bool, LibvirtError> {
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

    fn detach_timeout(&self) -> Duration {
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

    pub(super) fn lock_vmi(&self) -> std::sync::MutexGuard<'_, Option<VirtualMachineInstance>> {
        self.vmi.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().unwrap_or_else(|p| p.into_inner()));
    }

    fn domain_name(&self) -> Result<String, ControlError> {
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

    fn set_phase(&self, volume: &str, phase: Phase, message: &str) {
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

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hypervisor) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let hv = self.hv.clone();
        Ok(tokio::task::spawn_blocking(move || f(&hv)).await??)
    }

    // ------------------------------------------------------------------ Sync

    /// Starts the VMI, or reconciles the running domain to it.
    pub async fn sync(&self, vmi: VirtualMachineInstance) -> Result<Status, ControlError> {
        let _op = self.op.lock().await;
        if !self.has_started() {
            self.start(vmi).await?;
        } else {
            self.reconcile(vmi).await?;
        }
        Ok(self.status())
    }

    async fn start(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        let plan = self.planner.plan(&vmi)?;
        self.planner.prepare(&vmi, &plan)?;
        *self.console_log.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(plan.facts.paths.serial_log());
        let name = plan.domain.name().to_string();
        self.update(|s| {
            s.name = name.clone();
            s.uid = vmi.metadata.uid.clone().unwrap_or_default();
            s.disks = plan
                .domain
                .devices
                .disks
                .iter()
                .map(|d| disk_status(d, &vmi, Phase::Attaching, ""))
                .collect();
        });
        self.set_state(State::Starting, "sync");
        *self.lock_vmi() = Some(vmi.clone());
        let xml = plan.domain.to_xml();
        tracing::info!(domain = %name, "starting domain");
        let t = std::time::Instant::now();
        let connection = self.connections.load(Ordering::SeqCst);
        let define = xml.clone();
        let result = match self.blocking(move |hv| hv.define_and_start(&define)).await {
            // libvirtd died under the call (killed, crashed): it is being restarted.
            Err(e)
                if !self.hv.is_connected()
                    || self.connections.load(Ordering::SeqCst) != connection =>
            {
                self.start_again(&name, &xml, e).await
            }
            r => r,
        };
        if let Err(e) = result {
            self.set_state(State::Shutoff, "failed");
            return Err(e);
        }
        self.started.store(true, Ordering::SeqCst);
        tracing::info!(domain = %name, elapsed_ms = t.elapsed().as_millis() as u64, "domain running");
        let volumes: Vec<String> = self
            .status()
            .disks
            .iter()
            .map(|d| d.volume.clone())
            .collect();
        for v in volumes {
            self.set_phase(&v, Phase::Ready, "");
        }
        Ok(())
    }

    /// libvirtd died while it was starting the domain. Once it is back (the pod's daemon
    /// supervisor restarts it within a second), the domain either runs (libvirtd had finished
    /// starting it and reattaches to its QEMU: adopted) or not (libvirtd kills a QEMU it was
    /// still setting up): then any QEMU of this domain libvirtd does not know of is killed, so
    /// that nothing else holds the disks, and the domain is started once more. A second failure
    /// is returned, saying what happened.
    async fn start_again(
        &self,
        name: &str,
        xml: &str,
        first: ControlError,
    ) -> Result<(), ControlError> {
        tracing::warn!(domain = %name, error = %first, "libvirtd died while starting the domain; starting it again once libvirtd is back");
        self.publish(
            EventKind::Daemon,
            "libvirtd died during the domain's start; retrying",
        );
        let lost = |what: String| {
            ControlError::Precondition(format!(
                "libvirtd died while starting the domain ({first}); {what}"
            ))
        };
        self.ensure_connected()
            .await
            .map_err(|e| lost(format!("it did not come back: {e}")))?;
        match self.settled_state(name).await {
            Some(s) if s.is_running() => {
                tracing::info!(domain = %name, "libvirtd, back, runs the domain: adopting it");
                self.set_state(State::Running, "started");
                return Ok(());
            }
            Some(s) if !s.is_shut_off() => {
                tracing::warn!(domain = %name, state = s.name(), "destroying the half-started domain");
                let n = name.to_string();
                let _ = self.blocking(move |hv| hv.destroy(&n)).await;
            }
            _ => {}
        }
        crate::pod::children::kill_orphan_qemu(name).await;
        let n = name.to_string();
        if self
            .blocking(move |hv| hv.exists(&n))
            .await
            .unwrap_or(false)
        {
            let n = name.to_string();
            let _ = self.blocking(move |hv| hv.undefine(&n)).await;
        }
        let x = xml.to_string();
        self.blocking(move |hv| hv.define_and_start(&x))
            .await
            .map_err(|e| lost(format!("starting it again failed: {e}")))?;
        tracing::info!(domain = %name, "domain started on the second attempt");
        Ok(())
    }

    /// The domain's state once libvirtd has finished dealing with a domain it found starting
    /// when it came back (it kills those); None: no such domain.
    async fn settled_state(&self, name: &str) -> Option<crate::libvirt::DomainState> {
        let until = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let n = name.to_string();
            let state = match self.blocking(move |hv| hv.state(&n)).await {
                Ok(s) => Some(s),
                Err(ControlError::NoDomain) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "domain state");
                    None
                }
            };
            if let Some(s) = state.filter(|s| s.is_running() || s.is_shut_off()) {
                return Some(s);
            }
            if std::time::Instant::now() > until {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reconcile(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        // One look at the state for the whole Sync: what it attaches or detaches below changes
        // only volumes this snapshot does not decide on.
        let before = self.status();
        let given = vmi.metadata.uid.clone().unwrap_or_default();
        if before.uid != given {
            return Err(ControlError::WrongUid {
                running: before.uid,
                given,
            });
        }
        let t0 = std::time::Instant::now();
        let name = self.domain_name()?;
        let live = self.live_disks(&name).await?;
        let looked = t0.elapsed();
        // The hot-plugged volumes the domain holds are planned as it holds them, not probed
        // again: a Sync's cost stays the same however many disks are attached.
        let attached = live
            .iter()
            .filter_map(|l| Some((l.volume_name()?.to_string(), attached_volume(l))))
            .collect();
        let plan = self.planner.plan_running(&vmi, &attached)?;
        let planned = t0.elapsed();
        *self.lock_vmi() = Some(vmi.clone());
        let wanted_volumes: Vec<&str> = plan
            .domain
            .devices
            .disks
            .iter()
            .map(|d| d.volume())
            .collect();

        // Attach what the spec has and the domain lacks (hot-pluggable volumes only).
        let mut failures = Vec::new();
        for disk in &plan.domain.devices.disks {
            if !is_hotplug(&vmi, disk.volume())
                || live.iter().any(|l| l.volume_name() == Some(disk.volume()))
            {
                continue;
            }
            if let Err(e) = self.attach(&name, &vmi, disk, &live).await {
                failures.push(e);
            }
        }
        let attach_done = t0.elapsed();
        // Detach hot-plugged disks the spec no longer has.
        for l in &live {
            let Some(volume) = l.volume_name() else {
                continue;
            };
            let was_hotplugged = before
                .disks
                .iter()
                .any(|d| d.volume == volume && d.hotplugged);
            if was_hotplugged && !wanted_volumes.contains(&volume) {
                if let Err(e) = self.detach(&name, volume, l).await {
                    failures.push(e);
                }
            }
        }
        // Failed attaches of volumes the spec no longer has are forgotten; a failed detach
        // stays visible (the disk is still attached).
        let attached: Vec<&str> = live.iter().filter_map(|l| l.volume_name()).collect();
        self.update(|s| {
            s.disks.retain(|d| {
                d.phase != Phase::Failed
                    || wanted_volumes.contains(&d.volume.as_str())
                    || attached.contains(&d.volume.as_str())
            })
        });
        // Grow disks whose claim grew (those still attached).
        for l in &live {
            let Some(volume) = l.volume_name() else {
                continue;
            };
            if !wanted_volumes.contains(&volume) {
                continue;
            }
            let known = before
                .disks
                .iter()
                .find(|d| d.volume == volume)
                .map(|d| d.size_bytes);
            if let Err(e) = self.expand(&name, &vmi, volume, l, known).await {
                failures.push(e);
            }
        }
        tracing::debug!(
            live_xml_us = looked.as_micros() as u64,
            plan_us = (planned - looked).as_micros() as u64,
            attach_us = (attach_done - planned).as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "sync reconciled"
        );
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Online expansion: a Filesystem-mode `disk.img` grows to the claim's new usable size; a
    /// Block-mode disk to its device's size. The guest sees the new size at once. Shrinking is
    /// refused (it would cut off data). `known` is the size the launcher last saw.
    async fn expand(
        &self,
        name: &str,
        vmi: &VirtualMachineInstance,
        volume: &str,
        live: &crate::domain::live::LiveDisk,
        known: Option<u64>,
    ) -> Result<(), ControlError> {
        let (Some(target), Some(source)) = (live.target_dev(), live.source_path()) else {
            return Ok(());
        };
        if live.device.as_deref().is_some_and(|d| d != "disk") {
            return Ok(());
        }
        let path = Path::new(source);
        let is_block = attached_volume(live).block;
        let claim_size = super::plan::wanted_image_size(vmi, volume);
        // A file grows only when its claim's capacity says so: without a capacity, or with the
        // size last seen, there is nothing to look at (no file system call on the Sync's path).
        if !is_block && (claim_size.is_none() || claim_size == known) {
            return Ok(());
        }
        let current = size_of(path);
        let wanted = if is_block {
            current
        } else {
            claim_size.unwrap_or(current)
        };
        // Ask QEMU only when something says the disk grew: a claim capacity beyond the image,
        // or a block device larger than the size we last saw (one monitor round trip per disk
        // on every Sync would make hot-plug slow for VMs with many disks).
        let may_have_grown = if is_block {
            known.is_none_or(|k| current > k)
        } else {
            wanted > current
        };
        if wanted >= current && !may_have_grown {
            return Ok(());
        }
        let (t, n) = (target.to_string(), name.to_string());
        let seen = self.blocking(move |hv| hv.block_capacity(&n, &t)).await?;
        if wanted < current && !is_block {
            return Err(self.volume_failed(volume, format!("the claim shrank to {wanted} bytes but disk.img holds {current}: shrinking is not supported")));
        }
        if wanted <= seen {
            return Ok(());
        }
        if !is_block {
            let grown = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(wanted));
            if let Err(e) = grown {
                return Err(self.volume_failed(volume, format!("cannot grow {source}: {e}")));
            }
        }
        let (t, n) = (target.to_string(), name.to_string());
        // A resize changes no cached disk field (their sizes are not cached).
        let resized = self
            .blocking(move |hv| hv.block_resize(&n, &t, wanted))
            .await;
        if let Err(e) = resized {
            return Err(self.volume_failed(volume, format!("live resize failed: {e}")));
        }
        self.update(|s| {
            if let Some(d) = s.disk_mut(volume) {
                d.size_bytes = wanted;
            }
        });
        self.set_phase(
            volume,
            Phase::Ready,
            &format!("expanded from {seen} to {wanted} bytes"),
        );
        Ok(())
    }

    async fn live_disks(
        &self,
        name: &str,
    ) -> Result<Vec<crate::domain::live::LiveDisk>, ControlError> {
        let generation = self.live_generation.load(Ordering::SeqCst);
        if let Some((g, disks)) = self.live_cache().as_ref() {
            if *g == generation {
                return Ok(disks.clone());
            }
        }
        let n = name.to_string();
        let xml = self.blocking(move |hv| hv.xml(&n)).await?;
        let live = LiveDomain::parse(&xml)
            .map_err(|e| ControlError::Internal(format!("live domain XML: {e}")))?;
        let disks = live.disks().to_vec();
        // Kept under the generation read before the call: a change during it makes it stale.
        *self.live_cache() = Some((generation, disks.clone()));
        Ok(disks)
    }

    fn live_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(u64, Vec<crate::domain::live::LiveDisk>)>> {
        self.live_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The domain may have changed: the next Sync reads its disks from libvirt again.
    fn domain_changed(&self) {
        self.live_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The disk we just attached, added to the cached disks when the cache is current, so the
    /// next Sync need not read the whole domain XML again for a change we made ourselves. The
    /// generation moves on all the same: a read that started before the attach (a prefetch)
    /// stores its result under the old generation, which is then stale. Any other change
    /// meanwhile has moved the generation too, and the cache is read again as usual.
    fn live_cache_add(&self, disk: crate::domain::live::LiveDisk) {
        let mut cache = self.live_cache();
        let generation = self.live_generation.fetch_add(1, Ordering::SeqCst);
        match cache.as_mut() {
            Some((g, disks)) if *g == generation => {
                if !disks.iter().any(|d| d.alias() == disk.alias()) {
                    disks.push(disk);
                }
                *g = generation + 1;
            }
            _ => *cache = None,
        }
    }

    /// Reads the live disks ahead of the next Sync (after a Sync changed the domain), so that
    /// the read is off the next Sync's path. Errors are the next Sync's to report.
    pub async fn prefetch_live_disks(&self) {
        if !self.has_started() {
            return;
        }
        if let Ok(name) = self.domain_name() {
            let _ = self.live_disks(&name).await;
        }
    }

    /// Hot-plugs one disk. On any failure the VM keeps running and the volume is Failed.
    async fn attach(
        &self,
        name: &str,
        vmi: &VirtualMachineInstance,
        disk: &Disk,
        live: &[crate::domain::live::LiveDisk],
    ) -> Result<(), ControlError> {
        let volume = disk.volume().to_string();
        let mut disk = disk.clone();
        // The converter's target may be taken by a disk attached earlier: pick a free one.
        if live
            .iter()
            .any(|l| l.target_dev() == Some(disk.target_dev.as_str()))
        {
            let taken: Vec<&str> = live.iter().filter_map(|l| l.target_dev()).collect();
            match free_target(&disk.target_dev, &taken) {
                Some(t) => disk.target_dev = t,
                None => {
                    let e = ControlError::Volume {
                        volume: volume.clone(),
                        reason: "no free target name".into(),
                    };
                    self.add_failed(vmi, &disk, &e.to_string());
                    return Err(e);
                }
            }
        }
        // Never trust the name: the hot-plug path must stay in the hot-plug directory after
        // symlinks are followed.
        let paths = self.planner.paths.paths_for(vmi);
        let block = matches!(disk.source, crate::domain::DiskSource::Block(_));
        if let Err(e) = crate::pod::facts::confined_hotplug_path(&paths, &volume, block) {
            let e = ControlError::Volume {
                volume: volume.clone(),
                reason: e.to_string(),
            };
            self.add_failed(vmi, &disk, &e.to_string());
            return Err(e);
        }
        self.update(|s| {
            s.disks.retain(|d| d.volume != volume);
            s.disks.push(disk_status(&disk, vmi, Phase::Attaching, ""));
        });
        self.set_phase(&volume, Phase::Attaching, "");
        if let Err(reason) = check_openable(disk.source_path(), disk.readonly) {
            return Err(self.volume_failed(&volume, reason));
        }
        let xml = disk.to_xml();
        if let Err(e) = self.hv.attach_device(name, &xml).await {
            // What a failed attach left in the domain is libvirt's to say: read it again.
            self.domain_changed();
            return Err(self.volume_failed(&volume, format!("attach failed: {e}")));
        }
        match crate::domain::live::LiveDisk::parse(&xml) {
            Ok(l) => self.live_cache_add(l),
            Err(_) => self.domain_changed(),
        }
        self.set_phase(&volume, Phase::Ready, "");
        Ok(())
    }

    /// Marks `volume` Failed with `reason` (an event says why) and returns the error.
    fn volume_failed(&self, volume: &str, reason: impl Into<String>) -> ControlError {
        let e = ControlError::Volume {
            volume: volume.to_string(),
            reason: reason.into(),
        };
        self.set_phase(volume, Phase::Failed, &e.to_string());
        e
    }

    fn add_failed(&self, vmi: &VirtualMachineInstance, disk: &Disk, message: &str) {
        let volume = disk.volume().to_string();
        self.update(|s| {
            s.disks.retain(|d| d.volume != volume);
            s.disks.push(disk_status(disk, vmi, Phase::Failed, message));
        });
        self.set_phase(&volume, Phase::Failed, message);
    }

    /// Unplugs one disk and waits for the guest to release it (DEVICE_REMOVED), up to
    /// [`DETACH_TIMEOUT`]. Never reports success before the guest did.
    async fn detach(
        &self,
        name: &str,
        volume: &str,
        live: &crate::domain::live::LiveDisk,
    ) -> Result<(), ControlError> {
        let alias = format!("ua-{volume}");
        let (tx, rx) = oneshot::channel();
        self.removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(alias.clone(), tx);
        self.set_phase(volume, Phase::Detaching, "");
        let xml = detach_xml(live);
        let n = name.to_string();
        let detached = self.blocking(move |hv| hv.detach_device(&n, &xml)).await;
        self.domain_changed();
        if let Err(e) = detached {
            self.removals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&alias);
            return Err(self.volume_failed(volume, format!("detach failed: {e}")));
        }
        // libvirt may already have seen the removal (synchronous for cooperative guests); the
        // event is delivered either way.
        let timeout = self.detach_timeout();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(true)) => {
                self.set_phase(volume, Phase::Detached, "");
                self.update(|s| s.disks.retain(|d| d.volume != volume));
                Ok(())
            }
            Ok(_) => Err(self.volume_failed(volume, "the guest refused to release the disk")),
            Err(_) => {
                self.removals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&alias);
                let e = self.volume_failed(
                    volume,
                    format!(
                        "the guest did not release the disk within {}s; it is still attached",
                        timeout.as_secs_f32()
                    ),
                );
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------------ simple operations

    pub fn request_stop(&self, req: StopRequest) -> Result<(), ControlError> {
        if !self.awaiting_migration() {
            self.domain_name()?;
        }
        self.stop
            .send(req)
            .map_err(|_| ControlError::Precondition("the launcher is stopping".into()))
    }

    pub async fn pause(&self) -> Result<(), ControlError> {
        let _op = self.op.lock().await;
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.pause(&name)).await
    }

    pub async fn unpause(&self) -> Result<(), ControlError> {
        let _op = self.op.lock().await;
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.resume(&name)).await
    }

    pub async fn reboot(&self) -> Result<(), ControlError> {
        let _op = self.op.lock().await;
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.reboot(&name)).await
    }

    /// Freezes the guest's filesystems; thaws them by itself after `timeout`.
    pub async fn freeze(self: &Arc<Self>, timeout: Duration) -> Result<i32, ControlError> {
        let _op = self.op.lock().await;
        let name = self.domain_name()?;
        let n = name.clone();
        let frozen = self
            .blocking(move |hv| hv.fs_freeze(&n))
            .await
            .map_err(agent_error)?;
        let generation = self.freeze_generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.publish(
            EventKind::Agent,
            &format!(
                "froze {frozen} filesystems; automatic thaw in {}s",
                timeout.as_secs()
            ),
        );
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if me.freeze_generation.load(Ordering::SeqCst) == generation {
                let _op = me.op.lock().await;
                if me.freeze_generation.load(Ordering::SeqCst) != generation {
                    return;
                }
                let n = name.clone();
                match me.blocking(move |hv| hv.fs_thaw(&n)).await {
                    Ok(k) => me.publish(
                        EventKind::Agent,
                        &format!("freeze timed out: thawed {k} filesystems"),
                    ),
                    Err(e) => tracing::error!(error = %e, "automatic thaw failed"),
                }
            }
        });
        Ok(frozen)
    }

    pub async fn unfreeze(&self) -> Result<i32, ControlError> {
        let _op = self.op.lock().await;
        let name = self.domain_name()?;
        self.freeze_generation.fetch_add(1, Ordering::SeqCst);
        let thawed = self
            .blocking(move |hv| hv.fs_thaw(&name))
            .await
            .map_err(agent_error)?;
        self.publish(EventKind::Agent, &format!("thawed {thawed} filesystems"));
        Ok(thawed)
    }

    pub async fn stats(&self) -> Result<(DomainStats, Vec<(String, String)>), ControlError> {
        let name = self.domain_name()?;
        let disks: Vec<(String, String)> = self
            .status()
            .disks
            .iter()
            .filter(|d| d.phase == Phase::Ready)
            .map(|d| (d.volume.clone(), d.target.clone()))
            .collect();
        let targets: Vec<String> = disks.iter().map(|(_, t)| t.clone()).collect();
        let stats = self.blocking(move |hv| hv.stats(&name, &targets)).await?;
        Ok((stats, disks))
    }

    // ------------------------------------------------------------------ events

    /// Applies a libvirt event to the state. Returns the stop reason when the domain is gone.
    pub fn on_domain_event(&self, ev: &DomainEvent) -> Option<StopReason> {
        self.domain_changed();
        match ev {
            DomainEvent::Lifecycle { kind, .. } => match kind {
                // On a migration target the incoming QEMU starts paused, waiting for the
                // data; the VM is ours only when it resumes here.
                LifecycleKind::Started if self.awaiting_migration() => {
                    self.set_state(State::Starting, "incoming migration")
                }
                LifecycleKind::Started => self.set_state(State::Running, "started"),
                LifecycleKind::Resumed => {
                    self.adopt_incoming();
                    self.set_state(State::Running, "unpaused")
                }
                LifecycleKind::Suspended => self.set_state(State::Paused, "paused"),
                LifecycleKind::ShuttingDown => {
                    self.set_state(State::ShuttingDown, "guest shutdown")
                }
                LifecycleKind::Crashed => self.set_state(State::Crashed, "crashed"),
                LifecycleKind::Stopped(r) => {
                    let state = if r.is_clean() {
                        State::Shutoff
                    } else {
                        State::Crashed
                    };
                    self.set_state(state, &format!("{r:?}").to_lowercase());
                    return Some(*r);
                }
                _ => {}
            },
            DomainEvent::DeviceRemoved { alias, .. } => self.resolve_removal(alias, true),
            DomainEvent::DeviceRemovalFailed { alias, .. } => self.resolve_removal(alias, false),
            DomainEvent::IoError {
                alias,
                path,
                reason,
                ..
            } => {
                let volume = alias.strip_prefix("ua-").unwrap_or(alias);
                tracing::error!(volume, path, reason, "I/O error on volume");
                let mut e = Event::new(EventKind::IoError);
                e.volume = volume.to_string();
                e.message = format!("I/O error on {path}: {reason}");
                e.state = self.status().state;
                self.events.push(e);
            }
            DomainEvent::AgentConnected { connected, .. } => self.publish(
                EventKind::Agent,
                if *connected {
                    "guest agent connected"
                } else {
                    "guest agent disconnected"
                },
            ),
            DomainEvent::JobCompleted { stats, .. } => {
                *self.last_job.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats.clone())
            }
            DomainEvent::Reboot { .. } => self.publish(EventKind::Domain, "guest rebooted"),
            DomainEvent::Watchdog { action, .. } => self.publish(
                EventKind::Domain,
                &format!("watchdog fired (action {action})"),
            ),
            _ => {}
        }
        None
    }

    fn resolve_removal(&self, alias: &str, removed: bool) {
        let waiter = self
            .removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(alias);
        match waiter {
            Some(tx) => {
                let _ = tx.send(removed);
            }
            // The guest let go after its detach had already timed out: the disk is gone now.
            None if removed => {
                let volume = alias.strip_prefix("ua-").unwrap_or(alias).to_string();
                if self.status().disks.iter().any(|d| d.volume == volume) {
                    self.set_phase(&volume, Phase::Detached, "the guest released the disk late");
                    self.update(|s| s.disks.retain(|d| d.volume != volume));
                }
            }
            None => {}
        }
    }
}

fn agent_error(e: ControlError) -> ControlError {
    match e {
        ControlError::Libvirt(LibvirtError::Call { code, message, .. })
            if code == libvirt::VIR_ERR_AGENT_UNRESPONSIVE =>
        {
            ControlError::Precondition(format!("the guest agent is not connected: {message}"))
        }
        ControlError::Libvirt(LibvirtError::Call { code, message, .. })
            if code == libvirt::VIR_ERR_ARGUMENT_UNSUPPORTED
                || code == libvirt::VIR_ERR_OPERATION_UNSUPPORTED
                || code == libvirt::VIR_ERR_OPERATION_INVALID
                || message.contains("agent") =>
        {
            ControlError::Precondition(format!("the guest agent cannot do this: {message}"))
        }
        e => e,
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

/// How the domain holds a disk (see [`crate::pod::facts::AttachedVolume`]).
fn attached_volume(l: &crate::domain::live::LiveDisk) -> crate::pod::facts::AttachedVolume {
    crate::pod::facts::AttachedVolume {
        block: l.disk_type.as_deref() == Some("block"),
        direct_io: l.driver.as_ref().and_then(|d| d.cache.as_deref()) == Some("none"),
    }
}

fn is_hotplug(vmi: &VirtualMachineInstance, volume: &str) -> bool {
    vmi.spec
        .volumes
        .iter()
        .any(|v| v.name == volume && v.is_hotpluggable())
}

pub(super) fn disk_status(
    d: &Disk,
    vmi: &VirtualMachineInstance,
    phase: Phase,
    message: &str,
) -> DiskStatus {
    let volume = d.volume().to_string();
    let status = vmi.volume_status(&volume);
    DiskStatus {
        target: d.target_dev.clone(),
        bus: d.bus.clone(),
        source: d.source_path().display().to_string(),
        phase,
        message: message.to_string(),
        hotplugged: is_hotplug(vmi, &volume),
        shared: d.shareable || status.is_some_and(|s| s.is_shared()),
        readonly: d.readonly || d.device == crate::domain::DiskDevice::Cdrom,
        size_bytes: size_of(d.source_path()),
        volume,
    }
}

pub(super) fn size_of(path: &Path) -> u64 {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    // stat() never opens the path (opening a FIFO would block); only a block device is opened,
    // to seek to its end.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.file_type().is_block_device() => std::fs::File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap_or(0),
        _ => 0,
    }
}

/// The backing path must exist and open with the access the disk needs.
fn check_openable(path: &Path, readonly: bool) -> Result<(), String> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!readonly);
    o.open(path)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The first free target with the same prefix (`vd`, `sd`) as `wanted`.
fn free_target(wanted: &str, taken: &[&str]) -> Option<String> {
    let prefix: String = wanted.chars().take(2).collect();
    (0..26 * 27)
        .map(|i| {
            if i < 26 {
                format!("{prefix}{}", (b'a' + i as u8) as char)
            } else {
                let j = i - 26;
                format!(
                    "{prefix}{}{}",
                    (b'a' + (j / 26) as u8) as char,
                    (b'a' + (j % 26) as u8) as char
                )
            }
        })
        .find(|t| !taken.contains(&t.as_str()))
}

/// The minimal `<disk>` libvirt needs to find a live disk for detach.
fn detach_xml(l: &crate::domain::live::LiveDisk) -> String {
    let mut x = String::from("<disk>");
    if let Some(alias) = l.alias() {
        x += &format!("<alias name='{}'/>", crate::domain::escape_attr(alias));
    }
    if let Some(t) = l.target_dev() {
        x += &format!("<target dev='{}'/>", crate::domain::escape_attr(t));
    }
    x += "</disk>";
    x
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn free_targets_fill_gaps_with_the_same_prefix() {
        assert_eq!(free_target("vdb", &["vda", "vdb"]).as_deref(), Some("vdc"));
        assert_eq!(free_target("sda", &["vda"]).as_deref(), Some("sda"));
        let many: Vec<String> = (0..26)
            .map(|i| format!("vd{}", (b'a' + i) as char))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(free_target("vda", &refs).as_deref(), Some("vdaa"));
    }

    #[test]
    fn openable_check_names_the_path() {
        let err = check_openable(Path::new("/nonexistent/hp.img"), true).unwrap_err();
        assert!(err.contains("/nonexistent/hp.img"), "{err}");
    }
}
