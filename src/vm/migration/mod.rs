//! Live migration between two launcher pods.
//!
//! Target: [`Launcher::prepare_migration_target`] plans the VMI against this pod (its claims at
//! its own volumes directory: one RWX claim mounted by two nodes, or for block migration its own
//! local claim, whose missing `disk.img` it creates at the source's size; its own private files)
//! and reports where its libvirtd and the migration data sockets are. The VM arrives through
//! libvirt; the core adopts it on its first lifecycle event.
//!
//! Source: [`Launcher::migrate`] checks the target was prepared for the same VMI, applies the
//! storage rules (only shared or read-only disks migrate directly; local writable disks need
//! block migration into same-sized images on the target, which QEMU mirrors into over the
//! disks socket), rewrites the pod-local paths of the live XML to the target pod's, and runs
//! a peer-to-peer migration over unix sockets while a monitor reports progress every 400 ms and
//! enforces the progress and completion deadlines. Any failure leaves the VM running here and
//! tells the target launcher to exit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

pub mod source;
pub mod target;

use super::core::{ControlError, Launcher};
use super::state::{MigrationPhase, MigrationProgress, TargetInfo};

/// How often progress is read and published.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(400);
/// The switch-over downtime allowed during the first pass over memory when the caller sets no
/// `max_downtime_ms`. QEMU's own default (300 ms) lets it switch over at the end of the first
/// pass with whatever the guest dirtied meanwhile (measured here: 90–330 ms of downtime for an
/// idle 128 MiB guest); at 50 ms it makes one more, short pass first (40–70 ms, total time
/// unchanged).
pub const INITIAL_DOWNTIME_MS: u64 = 50;
/// Where the default limit stops doubling: QEMU's (and KubeVirt's) default, so a busy VM that
/// does not converge at a low limit gets, after a few passes, the limit it would have had.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
pub(crate) const DEFAULT_TIMEOUT_PER_GIB: u64 = 150;
pub(crate) const DEFAULT_PROGRESS_TIMEOUT: u64 = 150;

/// What the caller asks of a migration.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    pub bandwidth_mib: u64,
    pub max_downtime_ms: u64,
    pub completion_timeout_per_gib: u64,
    pub progress_timeout: u64,
    pub allow_post_copy: bool,
    pub allow_auto_converge: bool,
    pub parallel_connections: u32,
    pub block_migration: bool,
}

/// This pod's sockets, for a target.
#[derive(Debug, Clone)]
pub struct PodSockets {
    pub libvirt_uri: String,
    pub runtime_dir: std::path::PathBuf,
}

/// How a migration ended.
#[derive(Debug, Clone)]
pub struct MigrationOutcome {
    pub success: bool,
    pub progress: MigrationProgress,
    pub message: String,
}

/// A future a [`MigrationPeer`] returns.
pub type PeerFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One disk of a prepared target, as its launcher reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDisk {
    pub volume: String,
    pub source: String,
    pub size_bytes: u64,
}

/// What a target launcher says it was prepared for.
#[derive(Debug, Clone, Default)]
pub struct PreparedTarget {
    /// None: it was not prepared as a migration target.
    pub target: Option<TargetInfo>,
    pub disks: Vec<PeerDisk>,
    /// The peer cannot tell the target's disks (virt-handler's proxies): the sizes of block
    /// migration's destinations are left to QEMU to check.
    pub disks_unknown: bool,
}

/// What the source of a migration needs of the target's launcher. The core knows no transport:
/// a front-end implements this (the gRPC client does, over the target pod's socket).
pub trait MigrationPeer: Send + Sync {
    /// Where the peer is, for messages (`target launcher at <where>: ...`).
    fn location(&self) -> String;
    /// What the target was prepared for, and its disks. An error says why the peer could not
    /// be asked.
    fn prepared(&self) -> PeerFuture<'_, Result<PreparedTarget, String>>;
    /// Tells the target's launcher to give up and exit (best effort: it may be gone).
    fn give_up(&self) -> PeerFuture<'_, ()>;
}

pub use source::{downtime_limit, rewrite_paths};

impl Launcher {
    /// Whether a migration is under way from here.
    pub fn migration_running(&self) -> bool {
        self.status()
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == MigrationPhase::Running)
    }

    /// Whether there is a migration to cancel.
    pub(crate) fn check_cancel(&self) -> Result<(), ControlError> {
        if self.status().migration.as_ref().map(|m| m.phase) != Some(MigrationPhase::Running) {
            return Err(ControlError::Precondition("no migration is running".into()));
        }
        Ok(())
    }
}

/// A completed job's statistics, as its JOB_COMPLETED event carries them.
pub(crate) type JobFields = Vec<(String, f64)>;

/// The owner's end of the link to the migration running (or last run): how it passes on a
/// cancellation, and the completed job's statistics from the JOB_COMPLETED event (the
/// migration's measured downtime; the source domain may be gone by the time it asks).
#[derive(Default)]
pub(crate) struct MigrationLink {
    cancel: Option<watch::Sender<bool>>,
    job_completed: Option<oneshot::Sender<JobFields>>,
}

/// The migration's end of the link.
pub(crate) struct MigrationInbox {
    pub(crate) cancel: watch::Receiver<bool>,
    pub(crate) job_completed: oneshot::Receiver<JobFields>,
}

impl MigrationLink {
    /// A fresh link for the migration about to start (the previous one's ends are dropped).
    pub(crate) fn open(&mut self) -> MigrationInbox {
        let (cancel, cancel_rx) = watch::channel(false);
        let (job, job_rx) = oneshot::channel();
        self.cancel = Some(cancel);
        self.job_completed = Some(job);
        MigrationInbox {
            cancel: cancel_rx,
            job_completed: job_rx,
        }
    }

    /// Asks the migration to stop (it aborts the job; the VM stays here).
    pub(crate) fn cancel(&self) {
        if let Some(c) = &self.cancel {
            let _ = c.send(true);
        }
    }

    /// Passes on a JOB_COMPLETED event's statistics (the first one after the start).
    pub(crate) fn job_completed(&mut self, stats: &JobFields) {
        if let Some(tx) = self.job_completed.take() {
            let _ = tx.send(stats.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_link_passes_a_cancel_and_the_first_completed_job_to_the_migration_open_now() {
        let mut link = MigrationLink::default();
        link.cancel(); // no migration yet: nothing to tell
        let old = link.open();
        let new = link.open();
        link.cancel();
        link.job_completed(&vec![("downtime".into(), 42.0)]);
        link.job_completed(&vec![("downtime".into(), 7.0)]);
        assert!(*new.cancel.borrow());
        assert_eq!(
            new.job_completed.await.unwrap(),
            vec![("downtime".to_string(), 42.0)]
        );
        // The earlier migration's link was closed when the new one opened.
        assert!(!*old.cancel.borrow());
        assert!(old.job_completed.await.is_err());
    }
}
