//! The migration peer over gRPC: how a source launcher's core reaches the target's launcher
//! (its socket in the target pod), without the core knowing any protobuf.

use std::path::PathBuf;
use std::time::Duration;

use crate::vm::migration::{MigrationPeer, PeerDisk, PeerFuture, PreparedTarget};
use crate::vm::state::TargetInfo;

use super::pb;

/// How long one call to the target launcher may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The target launcher behind a unix socket.
pub struct GrpcPeer {
    socket: PathBuf,
}

impl GrpcPeer {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        GrpcPeer {
            socket: socket.into(),
        }
    }
}

fn request() -> tonic::Request<pb::Empty> {
    let mut req = tonic::Request::new(pb::Empty {});
    req.set_timeout(CALL_TIMEOUT);
    req
}

impl MigrationPeer for GrpcPeer {
    fn location(&self) -> String {
        self.socket.display().to_string()
    }

    fn prepared(&self) -> PeerFuture<'_, Result<PreparedTarget, String>> {
        Box::pin(async move {
            let mut c = super::client::connect(&self.socket)
                .await
                .map_err(|e| e.to_string())?;
            let d = c
                .get_domain(request())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let disks = d
                .disks
                .into_iter()
                .map(|d| PeerDisk {
                    volume: d.volume,
                    source: d.source,
                    size_bytes: d.size_bytes,
                })
                .collect();
            Ok(PreparedTarget {
                target: d.migration_target.map(TargetInfo::from),
                disks,
                disks_unknown: false,
            })
        })
    }

    fn give_up(&self) -> PeerFuture<'_, ()> {
        Box::pin(async move {
            if let Ok(mut c) = super::client::connect(&self.socket).await {
                if let Err(e) = c.kill(request()).await {
                    tracing::debug!(error = %e, "target cleanup request");
                }
            }
        })
    }
}
