//! Lifecycle: start the domain (and start it again when libvirtd died under the start),
//! reconcile the running domain to a new VMI, stop/pause/reboot requests, statistics, and the
//! domain's state as libvirt events report it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::core::{ControlError, Launcher};
use super::ledger::{Ledger, Report};
use super::state::{DomainFacts, Event, EventKind, Phase, State};
use super::volumes::{attached_volume, disk_status, is_hotplug};
use crate::libvirt::events::{PauseReason, StopReason};
use crate::libvirt::{DomainEvent, DomainStats, LifecycleKind};
use crate::spec::VirtualMachineInstance;

impl Launcher {
    /// Starts the VMI, or reconciles the running domain to it. The status to answer with is
    /// the owner's once it has applied what this Sync reported.
    pub async fn sync(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        if !self.has_started() {
            self.start(vmi).await
        } else {
            // Ours only: virt-handler's Sync carries a grown memory too, and grows it through
            // SyncVirtualMachineMemory (UNIMPLEMENTED here), as KubeVirt's launcher ignores it
            // in SyncVMI.
            if let Some(started) = self.vmi() {
                crate::convert::check_running_memory(&started, &vmi)
                    .map_err(|e| ControlError::Plan(e.into()))?;
            }
            self.reconcile(vmi).await
        }
    }

    /// KubeVirt's Sync (see [`super::Command::HandlerSync`]): idempotent, as virt-handler
    /// calls it on every reconcile. Returns once the domain is started, without waiting for
    /// the guest.
    pub async fn handler_sync(&self, mut vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        vmi.apply_volume_status_hotplug();
        if !self.has_started() {
            let phase = vmi.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Running" | "Succeeded" | "Failed")) {
                // The VM ran (elsewhere, or here before) or has ended: never started again.
                tracing::info!(
                    phase,
                    "Sync of a VMI that is running or final: not starting it"
                );
                return Ok(());
            }
            return self.start(vmi).await;
        }
        let before = self.status();
        if matches!(before.state, State::Shutoff | State::Crashed) {
            let given = vmi.metadata.uid.clone().unwrap_or_default();
            if before.uid != given {
                return Err(ControlError::WrongUid {
                    running: before.uid,
                    given,
                });
            }
            // The domain stopped; the handler deletes it next. Nothing to reconcile.
            return Ok(());
        }
        // Paused by an error (a full claim, a watchdog), not by a Pause: resumed, as
        // KubeVirt's launcher does on a Sync (the error may be gone; if not, it pauses again).
        if before.state == State::Paused
            && matches!(before.reason.as_str(), "ioerror" | "watchdog" | "api error")
            && before.uid == vmi.metadata.uid.clone().unwrap_or_default()
        {
            tracing::info!(reason = %before.reason, "Sync of a VM paused by an error: resuming it");
            let name = self.domain_name()?;
            self.blocking(move |hv| hv.resume(&name)).await?;
        }
        self.reconcile(vmi).await
    }

    pub(crate) async fn start(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        let plan = self.planner.plan(&vmi)?;
        self.planner.prepare(&vmi, &plan)?;
        self.network_phase2(&vmi, &plan.domain)?;
        self.set_console_log(plan.facts.paths.serial_log());
        let name = plan.domain.name().to_string();
        let disks: Vec<_> = plan
            .domain
            .devices
            .disks
            .iter()
            .map(|d| disk_status(d, &vmi, Phase::Attaching, ""))
            .collect();
        let volumes: Vec<String> = disks.iter().map(|d| d.volume.clone()).collect();
        let (n, uid) = (name.clone(), vmi.metadata.uid.clone().unwrap_or_default());
        let grace = vmi.termination_grace_period().as_secs() as i64;
        let facts = DomainFacts::of(&plan.domain);
        let learn_macs = facts.interfaces.iter().any(|i| i.mac.is_empty());
        self.update(move |s| {
            s.name = n;
            s.uid = uid;
            s.disks = disks;
            // KubeVirt's GracePeriod.DeletionGracePeriodSeconds, as its converter sets it.
            s.kubevirt.deletion_grace_period_seconds = grace;
            *s.domain = facts;
        });
        self.set_state(State::Starting, "sync");
        self.set_vmi(vmi);
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
        self.report(Report::Started);
        if learn_macs {
            self.learn_macs(&name).await;
        }
        tracing::info!(domain = %name, elapsed_ms = t.elapsed().as_millis() as u64, "domain running");
        for v in volumes {
            self.set_phase(&v, Phase::Ready, "");
        }
        Ok(())
    }

    /// Network phase 2 (see [`crate::pod::net`]): the taps are there, the DHCP servers run.
    pub(crate) fn network_phase2(
        &self,
        vmi: &VirtualMachineInstance,
        domain: &crate::domain::Domain,
    ) -> Result<(), ControlError> {
        let mut running = self.network.lock().unwrap_or_else(|e| e.into_inner());
        crate::pod::net::setup(
            vmi,
            domain,
            &self.planner.paths.paths_for(vmi).config_dir,
            std::path::Path::new(crate::pod::net::RESOLV_CONF),
            &mut running,
        )
        .map_err(|e| ControlError::Plan(e.into()))?;
        // Each guest's lease, once given, goes into the status (GetDomain, the notified domain).
        for (interface, ip, mut leased) in running.take_started() {
            let internal = self.internal.clone();
            tokio::spawn(async move {
                if leased.wait_for(|l| *l).await.is_ok() {
                    let f = move |s: &mut super::state::Status| {
                        if let Some(i) =
                            s.domain.interfaces.iter_mut().find(|i| i.name == interface)
                        {
                            let ip = ip.to_string();
                            if !i.ips.contains(&ip) {
                                i.ips.push(ip);
                            }
                        }
                    };
                    let _ = internal.send(super::Internal::Report(super::ledger::Report::Status(
                        Box::new(f),
                    )));
                }
            });
        }
        Ok(())
    }

    /// Records the MACs libvirt chose for the interfaces the VMI gave none.
    pub(crate) async fn learn_macs(&self, name: &str) {
        let n = name.to_string();
        match self.blocking(move |hv| hv.xml(&n)).await {
            Ok(xml) => match crate::domain::live::LiveDomain::parse(&xml) {
                Ok(live) => self.update(move |s| s.domain.learn_macs(&live)),
                Err(e) => tracing::warn!(error = %e, "live domain XML"),
            },
            Err(e) => tracing::warn!(error = %e, "reading the interfaces' MACs"),
        }
    }

    /// libvirtd died while it was starting the domain. Once it is back (the pod's daemon
    /// supervisor restarts it within a second), the domain either runs (libvirtd had finished
    /// starting it and reattaches to its QEMU: adopted) or not (libvirtd kills a QEMU it was
    /// still setting up): then any QEMU of this domain libvirtd does not know of is killed, so
    /// that nothing else holds the disks, and the domain is started once more. A second failure
    /// is returned, saying what happened.
    pub(crate) async fn start_again(
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
    pub(crate) async fn settled_state(&self, name: &str) -> Option<crate::libvirt::DomainState> {
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

    pub(crate) async fn reconcile(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
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
        // The VMI the domain runs (for what may not change while it runs).
        let started = self.vmi();
        if let Some(started) = &started {
            // Before the plan: a VMI with more sockets than the running VM's maxSockets is
            // refused for its sockets, not for its maxSockets.
            crate::convert::check_running_cpu(started, &vmi)
                .map_err(|e| ControlError::Plan(e.into()))?;
        }
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
        self.set_vmi(vmi.clone());
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
                } else if let Err(e) = self.delete_cbt_overlay(&vmi, volume, l) {
                    failures.push(e);
                }
            }
        }
        // Failed attaches of volumes the spec no longer has are forgotten; a failed detach
        // stays visible (the disk is still attached).
        let keep: Vec<String> = wanted_volumes
            .iter()
            .copied()
            .chain(live.iter().filter_map(|l| l.volume_name()))
            .map(str::to_string)
            .collect();
        self.update(move |s| {
            s.disks
                .retain(|d| d.phase != Phase::Failed || keep.contains(&d.volume))
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
        // CPU hot-plug: the VMI's sockets, online.
        // (What may change was checked before the plan.)
        if let Err(e) = self.update_vcpus(&name, &vmi, None).await {
            failures.push(e);
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

    /// KubeVirt's SyncVirtualMachineCPUs (`UpdateVCPUs`): the running domain gets the vCPUs
    /// of the VMI's sockets online.
    pub async fn sync_vcpus(&self, vmi: VirtualMachineInstance) -> Result<(), ControlError> {
        let before = self.status();
        let given = vmi.metadata.uid.clone().unwrap_or_default();
        if before.uid != given {
            return Err(ControlError::WrongUid {
                running: before.uid,
                given,
            });
        }
        let name = self.domain_name()?;
        let started = self.vmi();
        self.update_vcpus(&name, &vmi, started.as_deref()).await
    }

    /// CPU hot-plug (KubeVirt's `UpdateVCPUs`): plugs or unplugs vCPUs so that the running
    /// domain has those of `vmi`'s sockets online (`virDomainSetVcpusFlags`, live and in the
    /// definition). Only `sockets` may change while the VM runs, and only up to the
    /// `maxSockets` it started with; anything else is refused naming the field.
    pub(crate) async fn update_vcpus(
        &self,
        name: &str,
        vmi: &VirtualMachineInstance,
        started: Option<&VirtualMachineInstance>,
    ) -> Result<(), ControlError> {
        let bad = |field: &str, reason: String| {
            ControlError::Plan(crate::convert::err(field, reason).into())
        };
        if let Some(started) = started {
            crate::convert::check_running_cpu(started, vmi)
                .map_err(|e| ControlError::Plan(e.into()))?;
        }
        let wanted =
            crate::convert::vcpu_topology(vmi).map_err(|e| ControlError::Plan(e.into()))?;
        let n = name.to_string();
        let (online, max) = self.blocking(move |hv| hv.vcpus(&n)).await?;
        let count = wanted.online();
        if count == online {
            return Ok(());
        }
        let per_socket = wanted.cores * wanted.threads;
        let sockets = count / per_socket.max(1);
        if count > max {
            return Err(bad(
                "spec.domain.cpu.sockets",
                if max == online {
                    format!(
                        "{sockets} sockets: the VM runs {online} vCPUs and was started without \
                         spec.domain.cpu.maxSockets, so no vCPU can be hot-plugged; restart it"
                    )
                } else {
                    format!(
                        "{sockets} sockets is more than the {} of spec.domain.cpu.maxSockets \
                         the VM was started with",
                        max / per_socket.max(1)
                    )
                },
            ));
        }
        tracing::info!(domain = %name, from = online, to = count, "CPU hot-plug: setting the online vCPUs");
        let n = name.to_string();
        self.blocking(move |hv| hv.set_vcpus(&n, count)).await?;
        self.publish(
            EventKind::Domain,
            &format!("vCPUs online: {online} -> {count} ({sockets} sockets)"),
        );
        Ok(())
    }

    /// Whether there is anything to stop: a domain, or a prepared migration target.
    pub(crate) fn check_stop(&self) -> Result<(), ControlError> {
        if !self.awaiting_migration() {
            self.domain_name()?;
        }
        Ok(())
    }

    pub async fn pause(&self) -> Result<(), ControlError> {
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.pause(&name)).await
    }

    pub async fn unpause(&self) -> Result<(), ControlError> {
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.resume(&name)).await
    }

    pub async fn reboot(&self) -> Result<(), ControlError> {
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.reboot(&name)).await
    }

    pub async fn reset(&self) -> Result<(), ControlError> {
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.reset(&name)).await
    }

    /// The live domain XML, as libvirt has it.
    pub async fn domain_xml(&self) -> Result<String, ControlError> {
        let name = self.domain_name()?;
        self.blocking(move |hv| hv.xml(&name)).await
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

    /// Applies a libvirt event to the owner's ledger. Returns the stop reason when the domain
    /// is gone.
    pub(crate) fn on_domain_event(&self, ledger: &Ledger, ev: &DomainEvent) -> Option<StopReason> {
        self.domain_changed();
        match ev {
            DomainEvent::Lifecycle { kind, .. } => match kind {
                // On a migration target the incoming QEMU starts paused, waiting for the
                // data; the VM is ours only when it resumes here.
                LifecycleKind::Started if self.awaiting_migration() => {
                    ledger.set_state(State::Starting, "incoming migration")
                }
                LifecycleKind::Started => ledger.set_state(State::Running, "started"),
                LifecycleKind::Resumed => {
                    self.adopt_incoming(ledger);
                    ledger.set_state(State::Running, "unpaused")
                }
                // A VM migrated paused (`VIR_MIGRATE_PAUSED`) arrives as libvirt's end of the
                // incoming job: paused, not resumed.
                LifecycleKind::Suspended(why @ PauseReason::Paused)
                    if self.awaiting_migration() =>
                {
                    self.adopt_incoming(ledger);
                    ledger.set_state(State::Paused, why.as_str())
                }
                LifecycleKind::Suspended(why) => ledger.set_state(State::Paused, why.as_str()),
                LifecycleKind::ShuttingDown => {
                    ledger.set_state(State::ShuttingDown, "guest shutdown")
                }
                // libvirt's CRASHED event is the guest's panic (QEMU still runs).
                LifecycleKind::Crashed => ledger.set_state(State::Crashed, "panicked"),
                LifecycleKind::Stopped(r) => {
                    // QEMU is gone, and the agent's channel with it (libvirt sends no agent
                    // event for that).
                    ledger.update(|s| s.domain.agent_connected = false);
                    let state = if r.is_clean() {
                        State::Shutoff
                    } else {
                        State::Crashed
                    };
                    ledger.set_state(state, &format!("{r:?}").to_lowercase());
                    return Some(*r);
                }
                _ => {}
            },
            // DEVICE_REMOVED and DEVICE_REMOVAL_FAILED go to the detach waiting for them (the
            // owner's removals).
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
                e.state = ledger.status().state;
                ledger.push(e);
            }
            DomainEvent::AgentConnected { connected, .. } => {
                let c = *connected;
                ledger.update(|s| s.domain.agent_connected = c);
                ledger.publish(
                    EventKind::Agent,
                    if *connected {
                        "guest agent connected"
                    } else {
                        "guest agent disconnected"
                    },
                );
            }
            // JOB_COMPLETED goes to the migration that waits for it (the owner's link).
            DomainEvent::Reboot { .. } => ledger.publish(EventKind::Domain, "guest rebooted"),
            DomainEvent::Watchdog { action, .. } => ledger.publish(
                EventKind::Domain,
                &format!("watchdog fired (action {action})"),
            ),
            _ => {}
        }
        None
    }
}
