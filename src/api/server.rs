//! Serving the API on the pod's unix socket.
//!
//! Readiness follows KubeVirt: the socket is bound under a temporary name
//! (`launcher-init-sock` beside the final path) and atomically renamed to its final name once the
//! server accepts calls, so a controller watching the directory sees it appear ready. The socket
//! is mode 0600 (or 0660 with a configured group), and every call's peer uid, from the socket
//! credentials, must be allowed: others get PERMISSION_DENIED.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use super::pb::launcher_server::LauncherServer;
use super::{Service, MAX_MESSAGE_BYTES};
use crate::supervisor::core::Launcher;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who may call, and where.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Peer uids allowed to call (the launcher's own uid is always allowed).
    pub allowed_uids: Vec<u32>,
    /// A group given read/write access to the socket (mode 0660), if any.
    pub group: Option<u32>,
}

/// The running server; dropping it does not stop it, `shutdown` does.
pub struct ApiServer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    socket: PathBuf,
}

impl ApiServer {
    /// Stops accepting calls, lets running ones finish briefly, and removes the socket.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The temporary name the socket is bound under before it is ready.
pub fn init_socket_path(socket: &Path) -> PathBuf {
    socket.with_file_name("launcher-init-sock")
}

/// Binds, starts serving and then publishes the socket under its final name.
pub async fn serve(core: Arc<Launcher>, config: &ServerConfig) -> Result<ApiServer, ServerError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Socket { path, source }
    };
    let socket = config.socket.clone();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
    }
    let init = init_socket_path(&socket);
    let _ = std::fs::remove_file(&init);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&init).map_err(err(&init))?;
    let mode = if config.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(mode)).map_err(err(&init))?;
    if let Some(gid) = config.group {
        std::os::unix::fs::chown(&init, None, Some(gid)).map_err(err(&init))?;
    }

    let mut allowed = config.allowed_uids.clone();
    allowed.push(nix::unistd::geteuid().as_raw());
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if allowed.contains(&uid) => Ok(req),
            Some(uid) => Err(Status::permission_denied(format!(
                "uid {uid} may not use this launcher"
            ))),
            None => Err(Status::permission_denied("peer credentials unavailable")),
        }
    };
    let svc = LauncherServer::new(Service::new(core))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = UnixListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(64)
            .max_concurrent_streams(128)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "control API server failed");
        }
    });
    // The listener already queues connections: the rename is the readiness signal.
    std::fs::rename(&init, &socket).map_err(err(&socket))?;
    tracing::info!(socket = %socket.display(), "control API ready");
    Ok(ApiServer {
        stop: Some(stop),
        task,
        socket,
    })
}
