//! virt-handler's notify server, built from the launcher's own copies of KubeVirt's protocol
//! definitions: it records every event the launcher sends (as virt-handler's `notify-server`
//! receives them on the pod's `domain-notify-pipe.sock`), and can refuse, hang, stop and come
//! back as a restarted handler does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use virt_launcher::api::kubevirt::notify::pb::info::notify_info_server::{
    NotifyInfo, NotifyInfoServer,
};
use virt_launcher::api::kubevirt::notify::pb::info::{NotifyInfoRequest, NotifyInfoResponse};
use virt_launcher::api::kubevirt::notify::pb::v1::notify_server::{Notify, NotifyServer as Svc};
use virt_launcher::api::kubevirt::notify::pb::v1::{
    DomainEventRequest, K8sEventRequest, Response as NotifyResponse,
};

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `success: true`.
    Accept,
    /// `success: false` with a message (the event is still recorded).
    Refuse,
    /// Never answers (the event is still recorded).
    Hang,
}

/// One event the server received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `ADDED`/`MODIFIED` for a domain event, `K8S` for `HandleK8sEvent`.
    pub event_type: String,
    /// The parsed `domainJSON` (or `eventJSON`).
    pub json: serde_json::Value,
    /// How it was answered.
    pub mode: Mode,
    /// When it arrived (the benchmark's notify latency).
    pub at: Instant,
}

impl Received {
    /// `Status.Status` of a domain event.
    pub fn status(&self) -> &str {
        self.json["Status"]["Status"].as_str().unwrap_or("")
    }

    /// `Status.Reason` of a domain event.
    pub fn reason(&self) -> &str {
        self.json["Status"]["Reason"].as_str().unwrap_or("")
    }

    /// Whether this is the last event (the domain is gone).
    pub fn is_gone(&self) -> bool {
        !self.json["ObjectMeta"]["deletionTimestamp"].is_null()
    }
}

struct Shared {
    received: Mutex<Vec<Received>>,
    mode: Mutex<Mode>,
    versions: Mutex<Vec<u32>>,
    /// Becomes true when the server stops: hanging calls end, nothing more is recorded.
    stopped: watch::Receiver<bool>,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    async fn answer(
        &self,
        event_type: String,
        bytes: &[u8],
    ) -> Result<Response<NotifyResponse>, Status> {
        let gone = || Status::unavailable("the notify server stopped");
        if *self.stopped.borrow() {
            return Err(gone());
        }
        let at = Instant::now();
        let mode = self.mode();
        let json = serde_json::from_slice(bytes)
            .map_err(|e| Status::invalid_argument(format!("not JSON: {e}")))?;
        self.received.lock().unwrap().push(Received {
            event_type,
            json,
            mode,
            at,
        });
        match mode {
            Mode::Accept => Ok(Response::new(NotifyResponse {
                success: true,
                message: String::new(),
            })),
            Mode::Refuse => Ok(Response::new(NotifyResponse {
                success: false,
                message: "refused by the test".into(),
            })),
            Mode::Hang => {
                let mut stopped = self.stopped.clone();
                let _ = stopped.wait_for(|s| *s).await;
                Err(gone())
            }
        }
    }
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl Notify for Service {
    async fn handle_domain_event(
        &self,
        req: Request<DomainEventRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let r = req.into_inner();
        self.0.answer(r.event_type, &r.domain_json).await
    }

    async fn handle_k8s_event(
        &self,
        req: Request<K8sEventRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        self.0
            .answer("K8S".into(), &req.into_inner().event_json)
            .await
    }
}

#[tonic::async_trait]
impl NotifyInfo for Service {
    async fn info(
        &self,
        _: Request<NotifyInfoRequest>,
    ) -> Result<Response<NotifyInfoResponse>, Status> {
        Ok(Response::new(NotifyInfoResponse {
            supported_notify_versions: self.0.versions.lock().unwrap().clone(),
        }))
    }
}

/// A notify server on a unix socket, recording every event. Stopping it (a handler restart)
/// closes its connections and removes the socket.
pub struct NotifyServer {
    path: PathBuf,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NotifyServer {
    /// Listens on `path` (a stale socket there is replaced). Needs a tokio runtime.
    pub fn start(path: &Path) -> Result<NotifyServer> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Accept),
            versions: Mutex::new(vec![1]),
            stopped: stopped.clone(),
        });
        let (a, b) = (Service(shared.clone()), Service(shared.clone()));
        let mut signal = stopped;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(Svc::new(a))
                .add_service(NotifyInfoServer::new(b))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = signal.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(NotifyServer {
            path: path.to_path_buf(),
            shared,
            stop,
            task,
        })
    }

    /// How the following events are answered.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The notify versions `Info` lists (default `[1]`).
    pub fn set_versions(&self, versions: Vec<u32>) {
        *self.shared.versions.lock().unwrap() = versions;
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was received; what was received then, or None
    /// after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Option<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if done(&got) {
                return Some(got);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops serving (hanging calls end with UNAVAILABLE, connections are closed) and
    /// removes the socket, as a handler that went away.
    pub async fn stop(mut self) -> Vec<Received> {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.path);
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        self.received()
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}
