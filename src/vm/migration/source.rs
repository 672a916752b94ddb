//! The source side of a migration: checks, the libvirt call, and the monitor that reports
//! progress and enforces the deadlines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    MigrateOptions, MigrationInbox, MigrationOutcome, MigrationPeer, PeerDisk, PreparedTarget,
    DEFAULT_MAX_DOWNTIME_MS, DEFAULT_PROGRESS_TIMEOUT, DEFAULT_TIMEOUT_PER_GIB,
    INITIAL_DOWNTIME_MS, PROGRESS_INTERVAL,
};
use crate::libvirt::{self, JobStats, MigrateParams};
use crate::vm::core::{ControlError, Launcher};
use crate::vm::state::{MigrationMode, MigrationPhase, MigrationProgress, State, TargetInfo};

impl Launcher {
    /// Migrates the running VM to the prepared target `peer` speaks for.
    pub async fn migrate(
        self: &Arc<Self>,
        peer: &dyn MigrationPeer,
        opts: MigrateOptions,
        inbox: MigrationInbox,
    ) -> Result<MigrationOutcome, ControlError> {
        if self
            .status()
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == MigrationPhase::Running)
        {
            return Err(ControlError::Precondition(
                "a migration is already running".into(),
            ));
        }
        let status = self.status();
        if !self.has_started() || !matches!(status.state, State::Running | State::Paused) {
            return Err(ControlError::Precondition(format!(
                "cannot migrate a domain in state {:?}",
                status.state
            )));
        }
        if status
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == MigrationPhase::Running)
        {
            return Err(ControlError::Precondition(
                "a migration is already running".into(),
            ));
        }
        let vmi = self.vmi().ok_or(ControlError::NoDomain)?;
        if vmi.is_cpu_dedicated() {
            // The domain's <cputune> names the source pod's CPUs; KubeVirt's target re-pins
            // onto its own pod's set (premigration cpu hook), which this launcher does not.
            return Err(ControlError::Precondition(
                "cannot migrate a VM with spec.domain.cpu.dedicatedCpuPlacement: its vCPUs are \
                 pinned to this pod's CPUs and re-pinning on the target is not implemented"
                    .into(),
            ));
        }
        let (target, target_disks, disks_unknown) = query_target(peer).await?;
        let here = super::target::VmIdentity::of(&vmi, &status.domain.uuid);
        if let Err(prepared_for) = here.accepted_by(&target) {
            return Err(ControlError::Precondition(format!(
                "target launcher at {}: it was prepared for {prepared_for}, not for this VM, {}",
                peer.location(),
                here.describe()
            )));
        }
        let local = check_storage(&status, &opts)?;
        if opts.block_migration && !disks_unknown {
            check_copy_sizes(&local, &target_disks)?;
        }
        let here = self.planner.paths.paths_for(&vmi);
        let name = status.name.clone();
        let n = name.clone();
        let xml = self.blocking(move |hv| hv.migratable_xml(&n)).await?;
        let xml = rewrite_paths(
            &xml,
            &[
                (
                    here.private_dir.display().to_string(),
                    target.private_dir.clone(),
                ),
                (
                    here.ephemeral_disks_dir.display().to_string(),
                    target.ephemeral_dir.clone(),
                ),
                (
                    here.vmi_disks_dir.display().to_string(),
                    target.volumes_dir.clone(),
                ),
                (
                    here.hotplug_disks_dir.display().to_string(),
                    target.hotplug_dir.clone(),
                ),
            ],
        );

        let mut flags = libvirt::VIR_MIGRATE_LIVE
            | libvirt::VIR_MIGRATE_PEER2PEER
            | libvirt::VIR_MIGRATE_PERSIST_DEST;
        // Our own storage check above stands in for libvirt's cache-mode heuristic.
        flags |= libvirt::VIR_MIGRATE_UNSAFE;
        if opts.allow_auto_converge {
            flags |= libvirt::VIR_MIGRATE_AUTO_CONVERGE;
        }
        if opts.allow_post_copy {
            flags |= libvirt::VIR_MIGRATE_POSTCOPY;
        }
        // A paused VM stays paused on the target (KubeVirt's launcher does the same): its
        // user paused it, the migration must not run it.
        if self.status().state == crate::vm::state::State::Paused {
            flags |= libvirt::VIR_MIGRATE_PAUSED;
        }
        let mut params = MigrateParams {
            uri: Some(target.migration_uri.clone()),
            dest_xml: Some(xml),
            ..Default::default()
        };
        if opts.bandwidth_mib > 0 {
            params.bandwidth = Some(opts.bandwidth_mib);
        }
        if opts.parallel_connections > 1 {
            flags |= libvirt::VIR_MIGRATE_PARALLEL;
            params.parallel_connections = Some(opts.parallel_connections as i32);
        }
        if opts.block_migration && !local.is_empty() {
            flags |= libvirt::VIR_MIGRATE_NON_SHARED_DISK;
            params.disks_uri = Some(target.disks_uri.clone());
            params.migrate_disks = local.iter().map(|d| d.target.clone()).collect();
        }

        // The downtime limit applies from the first pass (QEMU may switch over at its end);
        // set in time, it needs no migration job yet. Failing that, the monitor sets it.
        let limit = downtime_limit(&opts, 1);
        let n = name.clone();
        let downtime_applied = match self
            .blocking(move |hv| hv.set_max_downtime(&n, limit))
            .await
        {
            Ok(()) => Some(limit),
            Err(e) => {
                tracing::debug!(error = %e, "downtime limit before the start");
                None
            }
        };
        let MigrationInbox {
            cancel,
            job_completed,
        } = inbox;
        let started = Instant::now();
        let running = MigrationProgress::new(MigrationPhase::Running);
        let r = running.clone();
        self.update(move |s| s.migration = Some(r));
        self.publish_migration(running, &format!("migrating to {}", target.libvirt_uri));
        tracing::info!(target = %target.libvirt_uri, "live migration started");

        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let monitor = tokio::spawn(monitor(
            self.clone(),
            name.clone(),
            opts.clone(),
            downtime_applied,
            started,
            done_rx,
            cancel.clone(),
        ));
        let (n, dest) = (name.clone(), target.libvirt_uri.clone());
        let result = self
            .blocking(move |hv| hv.migrate(&n, &dest, params, flags))
            .await;
        let _ = done_tx.send(true);
        // The monitor's last progress is what the owner was last told (its reports may not be
        // applied yet).
        let (monitor_verdict, mut progress) = monitor
            .await
            .unwrap_or_else(|_| (None, MigrationProgress::new(MigrationPhase::Running)));
        progress.elapsed_ms = started.elapsed().as_millis() as u64;
        let outcome = match result {
            Ok(()) => {
                // The measured downtime: libvirt's completed-job statistics, from the
                // JOB_COMPLETED event (the source domain may already be gone), else by asking.
                let done = match tokio::time::timeout(JOB_COMPLETED_WAIT, job_completed).await {
                    Ok(Ok(fields)) => Some(JobStats {
                        job_type: 3,
                        fields,
                    }),
                    _ => {
                        let n = name.clone();
                        self.blocking(move |hv| hv.job_stats(&n, true)).await.ok()
                    }
                };
                if let Some(done) = done {
                    fill(&mut progress, &done);
                }
                progress.phase = MigrationPhase::Succeeded;
                MigrationOutcome {
                    success: true,
                    progress,
                    message: "the VM runs on the target".into(),
                }
            }
            Err(e) => {
                let cancelled = *cancel.borrow();
                progress.phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                let message = match monitor_verdict {
                    Some(why) => format!("{why}; the VM keeps running here"),
                    None if cancelled => "cancelled; the VM keeps running here".to_string(),
                    None => format!("{e}; the VM keeps running here"),
                };
                // The target must not linger: tell its launcher to exit.
                peer.give_up().await;
                MigrationOutcome {
                    success: false,
                    progress,
                    message,
                }
            }
        };
        let p = outcome.progress.clone();
        let (failed, reason) = if outcome.success {
            (false, String::new())
        } else if p.phase == MigrationPhase::Cancelled {
            (true, ABORTED.to_string())
        } else {
            (true, outcome.message.clone())
        };
        let now = std::time::SystemTime::now();
        // One edit: whoever sees the migration ended sees the KubeVirt metadata's end too.
        self.update(move |s| {
            s.migration = Some(p);
            end_kubevirt_migration(s, failed, reason, now);
        });
        self.publish_migration(outcome.progress.clone(), &outcome.message);
        tracing::info!(
            success = outcome.success,
            downtime_ms = outcome.progress.downtime_ms,
            total_ms = outcome.progress.elapsed_ms,
            message = %outcome.message,
            "live migration ended"
        );
        Ok(outcome)
    }
}

/// The storage rules: only shared or read-only disks migrate directly; local writable ones
/// (returned) need block migration.
fn check_storage<'a>(
    status: &'a crate::vm::state::Status,
    opts: &MigrateOptions,
) -> Result<Vec<&'a crate::vm::state::DiskStatus>, ControlError> {
    let local: Vec<&crate::vm::state::DiskStatus> = status
        .disks
        .iter()
        .filter(|d| !d.shared && !d.readonly)
        .collect();
    if !local.is_empty() && !opts.block_migration {
        let names: Vec<&str> = local.iter().map(|d| d.volume.as_str()).collect();
        return Err(ControlError::Precondition(format!(
            "volumes {names:?} are local to this pod (not ReadWriteMany nor shareable): \
             refusing to migrate unless block migration is requested"
        )));
    }
    Ok(local)
}

/// What KubeVirt's launcher reports as the reason of an aborted migration.
const ABORTED: &str = "Live migration has been aborted";

impl Launcher {
    /// KubeVirt's MigrateVirtualMachine (`live-migration-source.go:287-331, 1389-1423`):
    /// checks what can be checked at once and answers `reply`; then migrates, and reports
    /// only through the KubeVirt metadata: `uid`, `StartTimestamp` and `Mode` when it starts,
    /// `EndTimestamp` when it ends, with `Failed` + `FailureReason` when the VM stayed here,
    /// and `AbortStatus` `Succeeded` (the abort asked for stopped it) or `Failed` (it
    /// completed all the same). A migration uid is run once: again while it runs is nothing
    /// to do, again after it ended is refused.
    pub(crate) async fn handler_migrate(
        self: &Arc<Self>,
        migration_uid: String,
        peer: Box<dyn MigrationPeer>,
        opts: MigrateOptions,
        inbox: MigrationInbox,
        reply: tokio::sync::oneshot::Sender<crate::vm::handle::Answer>,
    ) {
        let status = self.status();
        if let Some(m) = status
            .kubevirt
            .migration
            .as_ref()
            .filter(|m| m.uid == migration_uid && m.start_timestamp.is_some())
        {
            let answer = match m.end_timestamp {
                None => Ok(crate::vm::Reply::Done),
                Some(_) => Err(ControlError::Precondition(format!(
                    "migration {migration_uid:?} already ran here (failed: {}, abort status: {:?})",
                    m.failed, m.abort_status
                ))),
            };
            let _ = reply.send(answer);
            return;
        }
        let checked = if self.migration_running() {
            Err(ControlError::Precondition(
                "a migration is already running".into(),
            ))
        } else if !self.has_started() {
            Err(ControlError::NoDomain)
        } else if !matches!(status.state, State::Running | State::Paused) {
            Err(ControlError::Precondition(format!(
                "cannot migrate a domain in state {:?}",
                status.state
            )))
        } else {
            check_storage(&status, &opts).map(|_| ())
        };
        if let Err(e) = checked {
            let _ = reply.send(Err(e));
            return;
        }
        let (uid, now) = (migration_uid.clone(), std::time::SystemTime::now());
        self.update(move |s| {
            s.kubevirt.migration = Some(crate::vm::state::MigrationMetadata {
                uid,
                start_timestamp: Some(now),
                mode: "PreCopy".into(),
                ..Default::default()
            })
        });
        let _ = reply.send(Ok(crate::vm::Reply::Done));
        // Its end is in the metadata with the outcome (see `migrate`); a refusal only here.
        if let Err(e) = self.migrate(peer.as_ref(), opts, inbox).await {
            tracing::warn!(error = %e, "migration refused");
            let now = std::time::SystemTime::now();
            self.update(move |s| end_kubevirt_migration(s, true, e.to_string(), now));
        }
    }
}

/// Ends the KubeVirt metadata's migration (if one started and has not ended): `EndTimestamp`,
/// `Failed` + `FailureReason`, and the result of an abort asked for (`Succeeded` when it
/// stopped the migration, else `Failed`).
fn end_kubevirt_migration(
    s: &mut crate::vm::state::Status,
    failed: bool,
    reason: String,
    now: std::time::SystemTime,
) {
    let Some(m) = s
        .kubevirt
        .migration
        .as_mut()
        .filter(|m| m.start_timestamp.is_some() && m.end_timestamp.is_none())
    else {
        return;
    };
    if m.abort_status == "Aborting" {
        m.abort_status = if failed { "Succeeded" } else { "Failed" }.into();
    }
    if failed {
        m.failed = true;
        m.failure_reason = if m.abort_status == "Succeeded" {
            ABORTED.into()
        } else {
            reason
        };
    }
    m.end_timestamp = Some(now);
}

/// How long a successful migration waits for the JOB_COMPLETED event's statistics before it
/// asks libvirt for them.
const JOB_COMPLETED_WAIT: Duration = Duration::from_secs(2);

/// Block migration copies each local disk into the target's copy of it, which must have the
/// same size (QEMU mirrors into the existing image; a smaller one cannot hold the data, a
/// larger one would change the disk the guest sees).
fn check_copy_sizes(
    local: &[&crate::vm::state::DiskStatus],
    target: &[PeerDisk],
) -> Result<(), ControlError> {
    for d in local {
        let here = crate::vm::volumes::size_of(std::path::Path::new(&d.source));
        let there = target.iter().find(|t| t.volume == d.volume);
        let why = match there {
            None => "the target has no such disk".to_string(),
            Some(t) if t.size_bytes != here => format!(
                "the target's copy ({}) is {} bytes, this one is {here} bytes",
                t.source, t.size_bytes
            ),
            Some(_) => continue,
        };
        return Err(ControlError::Precondition(format!(
            "volume {}: {why}: block migration needs a destination disk of the same size \
             (PrepareMigrationTarget creates a missing one from disk_sizes)",
            d.volume
        )));
    }
    Ok(())
}

/// Asks the target launcher what it was prepared for, and its disks.
async fn query_target(
    peer: &dyn MigrationPeer,
) -> Result<(TargetInfo, Vec<PeerDisk>, bool), ControlError> {
    let unreachable = |e: String| {
        ControlError::Precondition(format!("target launcher at {}: {e}", peer.location()))
    };
    let PreparedTarget {
        target,
        disks,
        disks_unknown,
    } = peer.prepared().await.map_err(unreachable)?;
    let target =
        target.ok_or_else(|| unreachable("it was not prepared as a migration target".into()))?;
    Ok((target, disks, disks_unknown))
}

/// Moves pod-local directories in the domain XML to the target pod's.
pub fn rewrite_paths(xml: &str, moves: &[(String, String)]) -> String {
    let mut out = xml.to_string();
    for (from, to) in moves {
        if from.is_empty() || to.is_empty() || from == to {
            continue;
        }
        let (from, to) = (
            crate::domain::escape_attr(from),
            crate::domain::escape_attr(to),
        );
        for (a, b) in [
            (format!("'{from}/"), format!("'{to}/")),
            (format!("\"{from}/"), format!("\"{to}/")),
            (format!(">{from}/"), format!(">{to}/")),
        ] {
            out = out.replace(&a, &b);
        }
    }
    out
}

/// Copies the statistics libvirt reported into `p`; a field it did not report keeps its value
/// (the completed-job event carries fewer fields than a running job's statistics).
fn fill(p: &mut MigrationProgress, s: &JobStats) {
    let set = |dst: &mut u64, k: &str| {
        if let Some(v) = s.get(k) {
            *dst = v.max(0.0) as u64;
        }
    };
    set(&mut p.data_total, "data_total");
    set(&mut p.data_processed, "data_processed");
    set(&mut p.data_remaining, "data_remaining");
    set(&mut p.iteration, "memory_iteration");
    set(&mut p.downtime_ms, "downtime");
    set(&mut p.elapsed_ms, "time_elapsed");
    if let Some(rate) = s.get("memory_dirty_rate") {
        p.dirty_rate = (rate.max(0.0) * s.get("memory_page_size").unwrap_or(1.0).max(1.0)) as u64;
    }
}

/// The downtime limit for memory pass `pass` (1 = the first): the caller's
/// `max_downtime_ms` throughout, else [`INITIAL_DOWNTIME_MS`] doubled with each further pass up
/// to [`DEFAULT_MAX_DOWNTIME_MS`].
pub fn downtime_limit(opts: &MigrateOptions, pass: u64) -> u64 {
    if opts.max_downtime_ms > 0 {
        return opts.max_downtime_ms;
    }
    let doublings = pass.saturating_sub(1).min(16) as u32;
    INITIAL_DOWNTIME_MS
        .saturating_mul(1 << doublings)
        .min(DEFAULT_MAX_DOWNTIME_MS)
}

/// Reports progress to the owner every [`PROGRESS_INTERVAL`] and enforces the deadlines.
/// Returns why it aborted the migration, if it did, and the last progress it reported.
async fn monitor(
    core: Arc<Launcher>,
    name: String,
    opts: MigrateOptions,
    mut downtime_applied: Option<u64>,
    started: Instant,
    mut done: tokio::sync::watch::Receiver<bool>,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> (Option<String>, MigrationProgress) {
    let per_gib = if opts.completion_timeout_per_gib == 0 {
        DEFAULT_TIMEOUT_PER_GIB
    } else {
        opts.completion_timeout_per_gib
    };
    let progress_timeout = Duration::from_secs(if opts.progress_timeout == 0 {
        DEFAULT_PROGRESS_TIMEOUT
    } else {
        opts.progress_timeout
    });
    let n = name.clone();
    let mem_kib = core
        .blocking(move |hv| hv.stats(&n, &[]))
        .await
        .map(|s| s.max_memory_kib)
        .unwrap_or(1 << 20);
    let gib = (mem_kib as f64 / (1 << 20) as f64).max(1.0 / 1024.0);
    let completion = Duration::from_secs_f64(per_gib as f64 * gib);
    let mut progress = MigrationProgress::new(MigrationPhase::Running);
    let mut best_remaining = u64::MAX;
    let mut last_progress = Instant::now();
    let mut verdict: Option<String> = None;
    let mut aborted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            _ = done.wait_for(|d| *d) => return (verdict, progress),
        }
        let n = name.clone();
        let Ok(stats) = core.blocking(move |hv| hv.job_stats(&n, false)).await else {
            continue;
        };
        if stats.job_type == 0 {
            continue; // not started yet, or just finished
        }
        fill(&mut progress, &stats);
        let limit = downtime_limit(&opts, progress.iteration);
        if downtime_applied != Some(limit) && progress.mode != MigrationMode::PostCopy {
            let n = name.clone();
            if core
                .blocking(move |hv| hv.set_max_downtime(&n, limit))
                .await
                .is_ok()
            {
                tracing::debug!(
                    limit_ms = limit,
                    pass = progress.iteration,
                    "downtime limit"
                );
                downtime_applied = Some(limit);
            }
        }
        progress.elapsed_ms = started.elapsed().as_millis() as u64;
        let p = progress.clone();
        core.update(move |s| s.migration = Some(p));
        core.publish_migration(progress.clone(), "progress");
        if aborted {
            continue;
        }
        let abort = |why: String| {
            let core = core.clone();
            let name = name.clone();
            async move {
                tracing::warn!(reason = %why, "aborting the migration");
                if let Err(e) = core.blocking(move |hv| hv.abort_job(&name)).await {
                    tracing::error!(error = %e, "abort failed");
                }
                why
            }
        };
        if *cancel.borrow() {
            verdict = Some(abort("cancelled on request".into()).await);
            aborted = true;
            continue;
        }
        if progress.mode == MigrationMode::PostCopy {
            continue; // post-copy cannot be aborted safely; it finishes on its own
        }
        if progress.data_remaining < best_remaining {
            best_remaining = progress.data_remaining;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > progress_timeout {
            verdict = Some(abort(format!("no progress for {}s", progress_timeout.as_secs())).await);
            aborted = true;
            continue;
        }
        if started.elapsed() > completion {
            if opts.allow_post_copy {
                let n = name.clone();
                match core.blocking(move |hv| hv.start_post_copy(&n)).await {
                    Ok(()) => {
                        progress.mode = MigrationMode::PostCopy;
                        let p = progress.clone();
                        core.update(move |s| {
                            s.migration = Some(p);
                            if let Some(m) = s.kubevirt.migration.as_mut() {
                                m.mode = "PostCopy".into();
                            }
                        });
                        core.publish_migration(progress.clone(), "switched to post-copy");
                        tracing::info!("completion deadline passed: switched to post-copy");
                    }
                    Err(e) => tracing::warn!(error = %e, "switch to post-copy failed"),
                }
            } else {
                verdict = Some(
                    abort(format!(
                        "did not complete within {}s ({per_gib}s per GiB)",
                        completion.as_secs()
                    ))
                    .await,
                );
                aborted = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn the_default_downtime_limit_starts_low_and_doubles_per_pass_to_qemus_default() {
        let default = MigrateOptions::default();
        let limits: Vec<u64> = (0..=6).map(|p| downtime_limit(&default, p)).collect();
        assert_eq!(limits, [50, 50, 100, 200, 300, 300, 300]);
        assert_eq!(downtime_limit(&default, u64::MAX), DEFAULT_MAX_DOWNTIME_MS);
        let asked = MigrateOptions {
            max_downtime_ms: 20,
            ..Default::default()
        };
        assert!((0..8).all(|p| downtime_limit(&asked, p) == 20));
    }

    #[test]
    fn the_kubevirt_metadata_ends_once_with_the_abort_result() {
        use crate::vm::state::{MigrationMetadata, Status};
        use std::time::{Duration, SystemTime};
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let started = |abort: &str| {
            let mut s = Status::default();
            s.kubevirt.migration = Some(MigrationMetadata {
                uid: "m".into(),
                start_timestamp: Some(t0),
                abort_status: abort.into(),
                mode: "PreCopy".into(),
                ..Default::default()
            });
            s
        };
        let t1 = t0 + Duration::from_secs(5);
        let end = |mut s: Status, failed: bool| {
            end_kubevirt_migration(&mut s, failed, "broken".into(), t1);
            s.kubevirt.migration.unwrap()
        };
        let m = end(started(""), false);
        assert_eq!((m.end_timestamp, m.failed), (Some(t1), false));
        let m = end(started(""), true);
        assert_eq!((m.failed, m.failure_reason.as_str()), (true, "broken"));
        let m = end(started("Aborting"), true);
        assert_eq!(m.abort_status, "Succeeded");
        assert_eq!(m.failure_reason, ABORTED);
        let m = end(started("Aborting"), false);
        assert_eq!((m.abort_status.as_str(), m.failed), ("Failed", false));
        // Ended already: kept as it was.
        let mut s = started("");
        end_kubevirt_migration(&mut s, false, String::new(), t0);
        end_kubevirt_migration(&mut s, true, "late".into(), t1);
        let m = s.kubevirt.migration.unwrap();
        assert_eq!((m.end_timestamp, m.failed), (Some(t0), false));
        // No KubeVirt migration (launcher.v1's): nothing written.
        let mut s = Status::default();
        end_kubevirt_migration(&mut s, true, "x".into(), t1);
        assert!(s.kubevirt.migration.is_none());
    }

    #[test]
    pub(crate) fn pod_local_paths_move_and_nothing_else() {
        let xml = "<x><source path='/a/private/virt-serial0'/><log file=\"/a/private/log\"/>\
                   <source file='/vols/data/disk.img'/><kernel>/a/private/k</kernel><b path='/a/privateX/y'/></x>";
        let out = rewrite_paths(xml, &[("/a/private".into(), "/b/private".into())]);
        assert_eq!(
            out,
            "<x><source path='/b/private/virt-serial0'/><log file=\"/b/private/log\"/>\
             <source file='/vols/data/disk.img'/><kernel>/b/private/k</kernel><b path='/a/privateX/y'/></x>"
        );
    }
}
