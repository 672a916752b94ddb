//! Serving the API on the pod's unix socket: launcher.v1 and KubeVirt's cmd protocol
//! (`kubevirt.cmd.info.CmdInfo`, `kubevirt.cmd.v1.Cmd`) side by side.
//!
//! Readiness follows KubeVirt: the socket is bound under a temporary name
//! (`launcher-init-sock` beside the final path) and atomically renamed to its final name once the
//! server accepts calls, so a controller watching the directory sees it appear ready. The socket
//! is mode 0600 (or 0660 with a configured group), and every call's peer uid, from the socket
//! credentials, must be allowed: others get PERMISSION_DENIED.
//!
//! Bounds (a local client, even an allowed one, cannot exhaust the launcher):
//! - at most [`MAX_CONNECTIONS`] connections of allowed peers at once; beyond that a new
//!   connection is accepted and closed at once (the client sees the connection reset and may
//!   retry; waiting instead would fill the kernel's backlog and hang every new client, and
//!   running out of file descriptors would stop the server);
//! - at most [`MAX_STRANGER_CONNECTIONS`] connections of other uids at once, counted apart,
//!   so strangers still get a clear PERMISSION_DENIED but never take an allowed peer's slot;
//! - at most [`MAX_IN_FLIGHT`] calls handled at once over all connections (more wait, first
//!   come first served), [`MAX_CALLS_PER_CONNECTION`] per connection, and requests of at most
//!   [`MAX_MESSAGE_BYTES`];
//! - accept errors (e.g. out of file descriptors) are logged and retried after a pause; they
//!   never stop the server.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::{Request, Status};

use super::kubevirt::auth::AuthService;
use super::kubevirt::cmd::CmdService;
use super::kubevirt::info::InfoService;
use super::kubevirt::pb::cmd::auth::cmd_auth_server::CmdAuthServer;
use super::kubevirt::pb::cmd::info::cmd_info_server::CmdInfoServer;
use super::kubevirt::pb::cmd::v1::cmd_server::CmdServer;
use super::pb::launcher_server::LauncherServer;
use super::{Service, MAX_MESSAGE_BYTES};
use crate::vm::Handle;

/// Most connections of allowed peers served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections of other uids kept at once (each call on them is refused).
pub const MAX_STRANGER_CONNECTIONS: usize = 8;
/// Most calls handled at once, over all connections; more wait their turn.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most calls handled at once on one connection.
pub const MAX_CALLS_PER_CONNECTION: usize = 32;
/// Most HTTP/2 streams open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

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
    /// The pod's projected token `kubevirt.cmd.auth.CmdAuth` hands virt-handler (read at each
    /// call; absent: UNIMPLEMENTED).
    pub cmd_auth_token: PathBuf,
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
pub async fn serve(core: Handle, config: &ServerConfig) -> Result<ApiServer, ServerError> {
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
    let incoming = limited_incoming(listener, allowed.clone());
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
    // KubeVirt's cmd protocol beside launcher.v1, on the same socket and over the same core.
    let cmd = CmdServer::new(CmdService::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cmd = tonic::service::interceptor::InterceptedService::new(cmd, auth.clone());
    let cmd_info = tonic::service::interceptor::InterceptedService::new(
        CmdInfoServer::new(InfoService),
        auth.clone(),
    );
    let cmd_auth = tonic::service::interceptor::InterceptedService::new(
        CmdAuthServer::new(AuthService::new(config.cmd_auth_token.clone())),
        auth.clone(),
    );
    let svc = LauncherServer::new(Service::new(core))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                MAX_IN_FLIGHT,
            ))
            .add_service(svc)
            .add_service(cmd)
            .add_service(cmd_info)
            .add_service(cmd_auth)
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

/// A connection holding its slot until it closes.
pub struct LimitedStream {
    inner: UnixStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = UdsConnectInfo;
    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Logs the 1st, 10th, 100th, ... occurrence of something that may happen in floods.
fn log_sparsely(counter: &AtomicU64, what: &str) {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    let mut p = 1;
    while p < n {
        p *= 10;
    }
    if p == n {
        tracing::warn!(count = n, "control API: {what}");
    }
}

/// Accepts connections and applies the connection bounds (module docs); the stream ends when
/// the server drops it.
fn limited_incoming(
    listener: UnixListener,
    allowed: Vec<u32>,
) -> ReceiverStream<std::io::Result<LimitedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stranger_slots = Arc::new(Semaphore::new(MAX_STRANGER_CONNECTIONS));
    tokio::spawn(async move {
        let (over, errors) = (AtomicU64::new(0), AtomicU64::new(0));
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log_sparsely(&errors, &format!("accept failed ({e}); retrying"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let known = stream.peer_cred().is_ok_and(|c| allowed.contains(&c.uid()));
            let pool = if known { &slots } else { &stranger_slots };
            match pool.clone().try_acquire_owned() {
                Ok(slot) => {
                    let conn = LimitedStream {
                        inner: stream,
                        _slot: slot,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        break;
                    }
                }
                Err(_) => {
                    log_sparsely(&over, "connection limit reached; closing new connections");
                    drop(stream);
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
