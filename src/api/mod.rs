//! The gRPC control API (`proto/launcher/v1`), a thin layer over the core's [`Handle`]: each
//! handler decodes, sends one [`Command`] (or reads the watched status), and maps the result. Errors become status codes with
//! structured details (see `errors`).

pub mod client;
mod errors;
pub mod kubevirt;
pub mod peer;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::spec;
use crate::vm::migration::MigrateOptions;
use crate::vm::{state, Command, ControlError, Handle, Reply, FREEZE_TIMEOUT};

pub use errors::to_status;

/// The generated protobuf types and service traits.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("launcher.v1");
}

use pb::launcher_server::Launcher as LauncherApi;

/// The API version served.
pub const API_VERSION: &str = "launcher.v1";

/// Largest request accepted (a VMI is a few KiB; 4 MiB is generous).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The service: one per launcher.
pub struct Service {
    core: Handle,
}

impl Service {
    pub fn new(core: Handle) -> Self {
        Service { core }
    }

    /// Sends `cmd` to the core; a core error becomes a status.
    async fn send(&self, cmd: Command) -> Result<Reply, Status> {
        self.core.send(cmd).await.map_err(|e| to_status(&e))
    }
}

/// A reply of another kind than the command gives: a bug in the core.
fn unexpected(r: Reply) -> Status {
    to_status(&ControlError::Internal(format!("unexpected reply {r:?}")))
}

/// Runs `fut` within the client's deadline (the `grpc-timeout` header), if it set one.
async fn within_deadline<T, R>(
    req: &Request<R>,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline(req) {
        Some(d) => tokio::time::timeout(d, fut).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "deadline of {d:?} passed"
            )))
        }),
        None => fut.await,
    }
}

/// A VMI carried in a request (JSON or YAML text); errors name `field`. Public for the
/// `grpc_requests` fuzz target, which feeds it what a handler would.
pub fn decode_vmi(
    bytes: &[u8],
    field: &str,
) -> Result<crate::spec::VirtualMachineInstance, Status> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        Status::invalid_argument(format!("{field}: not UTF-8 text (JSON or YAML expected)"))
    })?;
    spec::from_str(text, field).map_err(|e| to_status(&e.into()))
}

/// Parses `grpc-timeout` (e.g. `500m`, `20S`).
pub(crate) fn deadline<R>(req: &Request<R>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    // The gRPC spec allows at most 8 digits; more is a malformed header, not a deadline.
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn state_pb(s: state::State) -> pb::DomainState {
    use pb::DomainState as P;
    use state::State as S;
    match s {
        S::None => P::None,
        S::Starting => P::Starting,
        S::Running => P::Running,
        S::Paused => P::Paused,
        S::ShuttingDown => P::ShuttingDown,
        S::Shutoff => P::Shutoff,
        S::Crashed => P::Crashed,
    }
}

fn phase_pb(p: Option<state::Phase>) -> pb::VolumePhase {
    use pb::VolumePhase as P;
    use state::Phase as S;
    match p {
        None => P::Unspecified,
        Some(S::Attaching) => P::Attaching,
        Some(S::Ready) => P::Ready,
        Some(S::Detaching) => P::Detaching,
        Some(S::Detached) => P::Detached,
        Some(S::Failed) => P::Failed,
    }
}

pub fn domain_pb(s: &state::Status) -> pb::Domain {
    pb::Domain {
        name: s.name.clone(),
        uid: s.uid.clone(),
        state: state_pb(s.state) as i32,
        reason: s.reason.clone(),
        disks: s
            .disks
            .iter()
            .map(|d| pb::Disk {
                volume: d.volume.clone(),
                target: d.target.clone(),
                bus: d.bus.clone(),
                source: d.source.clone(),
                phase: phase_pb(Some(d.phase)) as i32,
                message: d.message.clone(),
                hotplugged: d.hotplugged,
                shared: d.shared,
                size_bytes: d.size_bytes,
            })
            .collect(),
        last_seq: s.last_seq,
        migration_target: s.migration_target.clone().map(pb::MigrationTarget::from),
        migration: s.migration.as_ref().map(migration_pb),
        interfaces: s
            .domain
            .interfaces
            .iter()
            .map(|i| pb::Interface {
                name: i.name.clone(),
                mac: i.mac.clone(),
                r#type: i.kind.clone(),
                tap: i.tap.clone(),
                ip_addresses: s.domain.interface_ips(i),
            })
            .collect(),
    }
}

impl From<state::TargetInfo> for pb::MigrationTarget {
    fn from(t: state::TargetInfo) -> Self {
        pb::MigrationTarget {
            uid: t.uid,
            namespace: t.namespace,
            name: t.name,
            domain_uuid: t.domain_uuid,
            libvirt_uri: t.libvirt_uri,
            migration_uri: t.migration_uri,
            disks_uri: t.disks_uri,
            private_dir: t.private_dir,
            ephemeral_dir: t.ephemeral_dir,
            volumes_dir: t.volumes_dir,
            hotplug_dir: t.hotplug_dir,
        }
    }
}

impl From<pb::MigrationTarget> for state::TargetInfo {
    fn from(t: pb::MigrationTarget) -> Self {
        state::TargetInfo {
            uid: t.uid,
            namespace: t.namespace,
            name: t.name,
            domain_uuid: t.domain_uuid,
            libvirt_uri: t.libvirt_uri,
            migration_uri: t.migration_uri,
            disks_uri: t.disks_uri,
            private_dir: t.private_dir,
            ephemeral_dir: t.ephemeral_dir,
            volumes_dir: t.volumes_dir,
            hotplug_dir: t.hotplug_dir,
        }
    }
}

pub fn migration_pb(m: &state::MigrationProgress) -> pb::MigrationProgress {
    use state::MigrationPhase as S;
    pb::MigrationProgress {
        phase: match m.phase {
            S::Prepared => pb::MigrationPhase::Prepared,
            S::Running => pb::MigrationPhase::Running,
            S::Succeeded => pb::MigrationPhase::Succeeded,
            S::Failed => pb::MigrationPhase::Failed,
            S::Cancelled => pb::MigrationPhase::Cancelled,
        } as i32,
        mode: match m.mode {
            state::MigrationMode::PreCopy => pb::MigrationMode::PreCopy,
            state::MigrationMode::PostCopy => pb::MigrationMode::PostCopy,
        } as i32,
        data_total: m.data_total,
        data_processed: m.data_processed,
        data_remaining: m.data_remaining,
        iteration: m.iteration,
        dirty_rate: m.dirty_rate,
        downtime_ms: m.downtime_ms,
        elapsed_ms: m.elapsed_ms,
    }
}

pub fn event_pb(e: &state::Event) -> pb::Event {
    use pb::EventKind as P;
    use state::EventKind as S;
    pb::Event {
        seq: e.seq,
        time_unix_ms: e.time_unix_ms,
        kind: match e.kind {
            S::Domain => P::Domain,
            S::Volume => P::Volume,
            S::Daemon => P::Daemon,
            S::IoError => P::IoError,
            S::Final => P::Final,
            S::Agent => P::Agent,
            S::Migration => P::Migration,
        } as i32,
        state: state_pb(e.state) as i32,
        reason: e.reason.clone(),
        volume: e.volume.clone(),
        phase: phase_pb(e.phase) as i32,
        message: e.message.clone(),
        migration: e.migration.as_ref().map(migration_pb),
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl LauncherApi for Service {
    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        within_deadline(&req, async {
            let t0 = std::time::Instant::now();
            let vmi = decode_vmi(&req.get_ref().vmi, "SyncRequest.vmi")?;
            let decoded = t0.elapsed();
            let status = match self.send(Command::Sync(vmi)).await? {
                Reply::Status(s) => s,
                r => return Err(unexpected(r)),
            };
            let domain = domain_pb(&status);
            tracing::debug!(
                decode_us = decoded.as_micros() as u64,
                total_us = t0.elapsed().as_micros() as u64,
                "Sync handled"
            );
            Ok(Response::new(pb::SyncResponse {
                domain: Some(domain),
            }))
        })
        .await
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let grace = match req.get_ref().grace_seconds {
            0 => None,
            s => Some(Duration::from_secs(s.into())),
        };
        self.send(Command::Shutdown { grace }).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn kill(&self, _req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        self.send(Command::Kill).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn pause(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        within_deadline(&req, self.send(Command::Pause)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn unpause(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        within_deadline(&req, self.send(Command::Unpause)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn reboot(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        within_deadline(&req, self.send(Command::Reboot)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn freeze(
        &self,
        req: Request<pb::FreezeRequest>,
    ) -> Result<Response<pb::FreezeResponse>, Status> {
        let timeout = match req.get_ref().timeout_seconds {
            0 => FREEZE_TIMEOUT,
            s => Duration::from_secs(s.into()),
        };
        match within_deadline(&req, self.send(Command::Freeze { timeout })).await? {
            Reply::Filesystems(n) => Ok(Response::new(pb::FreezeResponse { filesystems: n })),
            r => Err(unexpected(r)),
        }
    }

    async fn unfreeze(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::FreezeResponse>, Status> {
        match within_deadline(&req, self.send(Command::Unfreeze)).await? {
            Reply::Filesystems(n) => Ok(Response::new(pb::FreezeResponse { filesystems: n })),
            r => Err(unexpected(r)),
        }
    }

    async fn get_domain(&self, _req: Request<pb::Empty>) -> Result<Response<pb::Domain>, Status> {
        Ok(Response::new(domain_pb(&self.core.status())))
    }

    async fn get_stats(&self, req: Request<pb::Empty>) -> Result<Response<pb::Stats>, Status> {
        let (s, disks) = match within_deadline(&req, self.send(Command::Stats)).await? {
            Reply::Stats { stats, disks } => (stats, disks),
            r => return Err(unexpected(r)),
        };
        Ok(Response::new(pb::Stats {
            cpu_time_ns: s.cpu_time_ns,
            memory_kib: s.memory_kib,
            max_memory_kib: s.max_memory_kib,
            balloon_actual_kib: s.balloon_actual_kib,
            balloon_unused_kib: s.balloon_unused_kib,
            balloon_available_kib: s.balloon_available_kib,
            rss_kib: s.rss_kib,
            disks: s
                .disks
                .iter()
                .map(|b| pb::DiskStats {
                    volume: disks
                        .iter()
                        .find(|(_, t)| *t == b.target)
                        .map(|(v, _)| v.clone())
                        .unwrap_or_default(),
                    target: b.target.clone(),
                    read_bytes: b.read_bytes,
                    write_bytes: b.write_bytes,
                    read_requests: b.read_requests,
                    write_requests: b.write_requests,
                    errors: b.errors,
                })
                .collect(),
        }))
    }

    async fn get_vmi(&self, _req: Request<pb::Empty>) -> Result<Response<pb::VmiResponse>, Status> {
        let vmi = self.core.vmi_json().map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::VmiResponse { vmi }))
    }

    async fn ping(&self, _req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        Ok(Response::new(pb::Empty {}))
    }

    async fn info(&self, req: Request<pb::Empty>) -> Result<Response<pb::InfoResponse>, Status> {
        let versions = match within_deadline(&req, self.send(Command::Versions)).await? {
            Reply::Versions { libvirt, qemu } => (libvirt, qemu),
            r => return Err(unexpected(r)),
        };
        Ok(Response::new(pb::InfoResponse {
            launcher_version: env!("CARGO_PKG_VERSION").to_string(),
            libvirt_version: versions.0,
            qemu_version: versions.1,
            api_version: API_VERSION.to_string(),
            domain_type: self.core.domain_type().to_string(),
            capabilities: [
                "sync",
                "hotplug-virtio",
                "hotplug-scsi",
                "freeze",
                "watch-resume",
                "stats",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            console_log: self
                .core
                .console_log()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            launcher_log: crate::logging::file()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            // The serial socket beside its log (`virt-serial0` and `virt-serial0-log`).
            console_socket: self
                .core
                .console_log()
                .and_then(|p| {
                    let name = p.file_name()?.to_str()?.strip_suffix("-log")?.to_string();
                    Some(p.with_file_name(name).display().to_string())
                })
                .unwrap_or_default(),
        }))
    }

    async fn get_domain_xml(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::DomainXml>, Status> {
        match within_deadline(&req, self.send(Command::DomainXml)).await? {
            Reply::Xml(xml) => Ok(Response::new(pb::DomainXml { xml })),
            r => Err(unexpected(r)),
        }
    }

    async fn prepare_migration_target(
        &self,
        req: Request<pb::PrepareMigrationTargetRequest>,
    ) -> Result<Response<pb::MigrationTarget>, Status> {
        within_deadline(&req, async {
            let vmi = decode_vmi(&req.get_ref().vmi, "PrepareMigrationTargetRequest.vmi")?;
            let sizes = req.get_ref().disk_sizes.clone();
            let cmd = Command::PrepareMigrationTarget {
                vmi,
                disk_sizes: sizes,
            };
            match self.send(cmd).await? {
                Reply::Target(t) => Ok(Response::new(pb::MigrationTarget::from(t))),
                r => Err(unexpected(r)),
            }
        })
        .await
    }

    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::MigrationResult>, Status> {
        within_deadline(&req, async {
            let r = req.get_ref();
            if r.target_socket.is_empty() {
                return Err(Status::invalid_argument("target_socket: required"));
            }
            let o = r.options.unwrap_or_default();
            let options = MigrateOptions {
                bandwidth_mib: o.bandwidth_mib,
                max_downtime_ms: o.max_downtime_ms,
                completion_timeout_per_gib: o.completion_timeout_per_gib,
                progress_timeout: o.progress_timeout,
                allow_post_copy: o.allow_post_copy,
                allow_auto_converge: o.allow_auto_converge,
                parallel_connections: o.parallel_connections,
                block_migration: o.block_migration,
            };
            let peer = Box::new(peer::GrpcPeer::new(&r.target_socket));
            let out = match self.send(Command::Migrate { peer, options }).await? {
                Reply::Migrated(out) => out,
                r => return Err(unexpected(r)),
            };
            Ok(Response::new(pb::MigrationResult {
                success: out.success,
                progress: Some(migration_pb(&out.progress)),
                message: out.message,
            }))
        })
        .await
    }

    async fn cancel_migration(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.send(Command::CancelMigration).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let name = req.get_ref().name.clone();
        match within_deadline(&req, self.send(Command::Snapshot { name })).await? {
            Reply::Snapshot(o) => Ok(Response::new(snapshot_pb(&o))),
            r => Err(unexpected(r)),
        }
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let after = req.get_ref().after_seq;
        let (tx, rx) = mpsc::channel::<Result<pb::Event, Status>>(256);
        let (backlog, mut live) = if after == 0 {
            // From now on, starting with the current state.
            let status = self.core.status();
            let (_, live) = self
                .core
                .subscribe(status.last_seq)
                .map_err(|g| Status::out_of_range(g.to_string()))?;
            let mut first = state::Event::new(state::EventKind::Domain);
            first.seq = status.last_seq;
            first.state = status.state;
            first.reason = status.reason.clone();
            first.message = "current state".into();
            (vec![first], live)
        } else {
            self.core
                .subscribe(after)
                .map_err(|g| Status::out_of_range(g.to_string()))?
        };
        tokio::spawn(async move {
            let mut last = after;
            for e in backlog {
                last = last.max(e.seq);
                if tx.send(Ok(event_pb(&e))).await.is_err() {
                    return; // the client went away
                }
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.seq <= last => continue,
                    Ok(e) => {
                        last = e.seq;
                        if tx.send(Ok(event_pb(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let msg = format!("stream fell {n} events behind after seq {last}; resume with after_seq={last}");
                        let _ = tx.send(Err(Status::out_of_range(msg))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A snapshot as the API returns it.
fn snapshot_pb(o: &crate::vm::snapshot::SnapshotOutcome) -> pb::SnapshotResponse {
    let m = &o.manifest;
    pb::SnapshotResponse {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        vm: m.vm.clone(),
        creation_time: m.creation_time.clone(),
        indications: m.indications.clone(),
        frozen_ms: m.frozen_ms,
        bytes: o.bytes,
        copy_ms: o.copy_ms,
        volumes: m
            .volumes
            .iter()
            .map(|v| pb::SnapshotVolume {
                volume: v.volume.clone(),
                claim: format!("{}/{}", v.claim.namespace, v.claim.name),
                size_bytes: v.claim.size,
            })
            .collect(),
        directory: o.directory.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_parsed() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(deadline(&req), Some(Duration::from_millis(250)));
        req.metadata_mut()
            .insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(deadline(&req), Some(Duration::from_secs(3)));
        req.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(deadline(&req), None);
    }
}
