//! The notify client: tells KubeVirt's virt-handler about the domain, as KubeVirt's own
//! launcher does (`pkg/virt-launcher/notify-client/client.go`).
//!
//! The handler creates `<kubevirt-share-dir>/domain-notify-pipe.sock` in the pod on its first
//! contact (and again after it restarted), so the socket may be absent: the client dials
//! lazily, asks `NotifyInfo/Info` (version 1 must be listed), then sends
//! `HandleDomainEvent{eventType, domainJSON}` with the [`super::domain`] JSON:
//! `ADDED` once a domain exists, `MODIFIED` whenever what the handler reads of it changes
//! (state, disks, agent, freeze, grace stamps, migration metadata), and a last `MODIFIED`
//! with `ObjectMeta.deletionTimestamp` once the domain is gone for good. I/O errors and a
//! guest panic, and a failed guest-agent ping probe also go out as `HandleK8sEvent` (a core/v1
//! Event on the VMI).
//!
//! Delivery follows KubeVirt's client: each event is tried every second for 20 s, at most
//! 5 s per attempt; a transient failure (unavailable, deadline, aborted, transport) drops
//! the connection and dials again; an event not delivered in time, or refused for another
//! reason, is logged and dropped; `success: false` is logged. Until the socket has appeared
//! once (the handler has not contacted the pod yet), the clock does not run: the event waits,
//! and is dropped when the launcher ends without any handler having come.
//!
//! Two tasks, so that the core is never held up: a follower that watches the core's status
//! and event log and queues what to send, and a sender that delivers the queue. The queue is
//! bounded and coalesces: a queued `MODIFIED` is replaced by a newer one (only the latest
//! domain matters), while `ADDED`, the final event and Kubernetes events keep their place.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::domain;
use crate::vm::state::{Event, EventKind, State};
use crate::vm::Handle;

/// The generated protobuf types, clients and servers of the notify protocol.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod v1 {
        tonic::include_proto!("kubevirt.notify.v1");
    }
    pub mod info {
        tonic::include_proto!("kubevirt.notify.info");
    }
}

use pb::info::notify_info_client::NotifyInfoClient;
use pb::v1::notify_client::NotifyClient;

/// The socket's name in the KubeVirt share dir.
pub const SOCKET: &str = "domain-notify-pipe.sock";
/// The notify protocol version spoken.
pub const VERSION: u32 = 1;

/// How events are delivered (KubeVirt's values by default).
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub socket: PathBuf,
    /// How long one event is tried before it is dropped.
    pub event_timeout: Duration,
    /// The pause between attempts.
    pub interval: Duration,
    /// The longest one dial, version check or call may take.
    pub attempt_timeout: Duration,
    /// The most events queued; beyond, the oldest `MODIFIED` or Kubernetes event goes.
    pub queue_capacity: usize,
}

impl NotifyConfig {
    pub fn new(share_dir: &Path) -> NotifyConfig {
        NotifyConfig {
            socket: share_dir.join(SOCKET),
            event_timeout: Duration::from_secs(20),
            interval: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(5),
            queue_capacity: 64,
        }
    }
}

/// Starts the notify client for the core behind `handle`, on
/// `<share_dir>/domain-notify-pipe.sock`. The returned task ends once the final event was
/// delivered (or dropped), or when the core is gone.
pub fn spawn(handle: Handle, share_dir: PathBuf) -> JoinHandle<()> {
    spawn_with(handle, NotifyConfig::new(&share_dir))
}

/// [`spawn`] with explicit delivery settings.
pub fn spawn_with(handle: Handle, config: NotifyConfig) -> JoinHandle<()> {
    let queue = Arc::new(Queue::new(config.queue_capacity));
    tokio::spawn(follow(handle, queue.clone()));
    tokio::spawn(deliver(queue, config))
}

/// What an item in the queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Added,
    Modified,
    /// The last domain event: the domain is gone.
    Final,
    /// A core/v1 Event (`HandleK8sEvent`).
    K8s,
}

impl Kind {
    fn event_type(self) -> &'static str {
        match self {
            Kind::Added => "ADDED",
            Kind::Modified | Kind::Final => "MODIFIED",
            Kind::K8s => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    kind: Kind,
    json: Vec<u8>,
}

/// The bounded, coalescing queue between the follower and the sender.
pub(crate) struct Queue {
    inner: Mutex<QueueInner>,
    ready: tokio::sync::Notify,
    capacity: usize,
}

struct QueueInner {
    items: VecDeque<Item>,
    closed: bool,
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: tokio::sync::Notify::new(),
            capacity: capacity.max(2),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; a `MODIFIED` replaces a `MODIFIED` queued last. Never waits.
    pub(crate) fn push(&self, item: Item) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        if item.kind == Kind::Modified {
            if let Some(last) = q.items.back_mut().filter(|l| l.kind == Kind::Modified) {
                *last = item;
                drop(q);
                self.ready.notify_one();
                return;
            }
        }
        while q.items.len() >= self.capacity {
            let Some(at) = q
                .items
                .iter()
                .position(|i| matches!(i.kind, Kind::Modified | Kind::K8s))
            else {
                break;
            };
            let dropped = q.items.remove(at);
            tracing::warn!(kind = ?dropped.map(|d| d.kind), "notify queue full: dropping the oldest event");
        }
        q.items.push_back(item);
        drop(q);
        self.ready.notify_one();
    }

    /// No more items will come: the sender ends once the queue is empty.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Whether [`Queue::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The next item; None once closed and empty.
    pub(crate) async fn pop(&self) -> Option<Item> {
        loop {
            {
                let mut q = self.lock();
                if let Some(item) = q.items.pop_front() {
                    return Some(item);
                }
                if q.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    #[cfg(test)]
    fn kinds(&self) -> Vec<Kind> {
        self.lock().items.iter().map(|i| i.kind).collect()
    }
}

/// What the follower has sent so far.
#[derive(Default)]
pub(crate) struct Follower {
    added: bool,
    last: Vec<u8>,
    /// The I/O error last told (repeats are not told again until the domain changes: with
    /// error policy `report` every failed request is an event).
    last_io_error: Option<String>,
}

impl Follower {
    /// Queues the domain as it is now, if the handler has not seen it so.
    pub(crate) fn domain(&mut self, handle: &Handle, queue: &Queue) {
        let status = handle.status();
        let Some(vmi) = handle.vmi.borrow().clone() else {
            return;
        };
        let Some(d) = domain::render(&status, &vmi) else {
            return;
        };
        let json = domain::to_json(&d);
        if self.added && json == self.last {
            return;
        }
        let kind = if self.added {
            Kind::Modified
        } else {
            Kind::Added
        };
        self.added = true;
        self.last = json.clone();
        self.last_io_error = None;
        queue.push(Item { kind, json });
    }

    /// Queues what an event of the core's log means for the handler beyond the domain.
    /// Returns true for the last event.
    pub(crate) fn event(&mut self, handle: &Handle, queue: &Queue, e: &Event) -> bool {
        let vmi = handle.vmi.borrow().clone();
        match e.kind {
            EventKind::Final => {
                if let (true, Some(vmi)) = (self.added, vmi) {
                    let d = domain::gone(&handle.status(), &vmi, SystemTime::now());
                    queue.push(Item {
                        kind: Kind::Final,
                        json: domain::to_json(&d),
                    });
                }
                return true;
            }
            EventKind::IoError => {
                let message = format!("{} (volume {})", e.message, e.volume);
                if let Some(vmi) = vmi.filter(|_| self.last_io_error.as_ref() != Some(&message)) {
                    self.last_io_error = Some(message.clone());
                    queue.push(Item {
                        kind: Kind::K8s,
                        json: k8s_event(&vmi, "Warning", "IOerror", &message),
                    });
                }
            }
            // KubeVirt's launcher tells the handler of each failed guest-agent ping probe.
            EventKind::Agent if e.message.starts_with(crate::vm::agent::PING_FAILED) => {
                if let Some(vmi) = vmi {
                    let message = format!(
                        "GuestAgentPing probe failed for VMI {}/{}",
                        vmi.namespace(),
                        vmi.metadata.name
                    );
                    queue.push(Item {
                        kind: Kind::K8s,
                        json: k8s_event(&vmi, "Warning", "GuestAgentPingFailed", &message),
                    });
                }
            }
            EventKind::Domain if e.state == State::Crashed && e.reason == "panicked" => {
                if let Some(vmi) = vmi {
                    queue.push(Item {
                        kind: Kind::K8s,
                        json: k8s_event(&vmi, "Warning", "GuestPanicked", "the guest panicked"),
                    });
                }
            }
            _ => {}
        }
        false
    }
}

/// A core/v1 Event about `vmi` (the handler records it on the VMI when namespace, name and
/// uid match).
pub fn k8s_event(
    vmi: &crate::spec::VirtualMachineInstance,
    kind: &str,
    reason: &str,
    message: &str,
) -> Vec<u8> {
    let event = serde_json::json!({
        "metadata": {},
        "involvedObject": {
            "kind": "VirtualMachineInstance",
            "apiVersion": "kubevirt.io/v1",
            "namespace": vmi.namespace(),
            "name": vmi.metadata.name,
            "uid": vmi.metadata.uid.clone().unwrap_or_default(),
        },
        "type": kind,
        "reason": reason,
        "message": message,
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

/// Follows the core: its status (every change of what the domain JSON shows) and its event
/// log (I/O errors, a panic, the end).
async fn follow(handle: Handle, queue: Arc<Queue>) {
    let mut status = handle.status.clone();
    let mut vmi = handle.vmi.clone();
    let mut events = match handle.subscribe(handle.events.last_seq()) {
        Ok((_, live)) => live,
        Err(e) => {
            tracing::error!(error = %e, "notify: cannot follow the event log");
            queue.close();
            return;
        }
    };
    let mut f = Follower::default();
    f.domain(&handle, &queue);
    loop {
        tokio::select! {
            // The log first: the domain as it is is queued before what an event adds.
            biased;
            ev = events.recv() => match ev {
                Ok(e) => {
                    f.domain(&handle, &queue);
                    if f.event(&handle, &queue, &e) {
                        break;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "notify: fell behind the event log");
                    f.domain(&handle, &queue);
                }
                Err(RecvError::Closed) => break,
            },
            r = status.changed() => match r {
                Ok(()) => f.domain(&handle, &queue),
                Err(_) => break,
            },
            r = vmi.changed() => match r {
                Ok(()) => f.domain(&handle, &queue),
                Err(_) => break,
            },
        }
    }
    queue.close();
}

/// Why an attempt failed.
enum Failure {
    /// Try again (on a new connection).
    Transient(String),
    /// Give up on this event.
    Fatal(String),
}

/// A connection that passed the version check.
struct Connection {
    client: NotifyClient<Channel>,
}

/// Delivers the queue, one event at a time.
async fn deliver(queue: Arc<Queue>, config: NotifyConfig) {
    let mut conn: Option<Connection> = None;
    // Whether the socket ever appeared (the handler contacted the pod).
    let mut contacted = false;
    while let Some(item) = queue.pop().await {
        let mut deadline = Instant::now() + config.event_timeout;
        loop {
            if !contacted {
                if config.socket.exists() {
                    contacted = true;
                    deadline = Instant::now() + config.event_timeout;
                } else if queue.is_closed() {
                    // The launcher is done and no handler ever contacted the pod: there is
                    // nobody to tell.
                    tracing::info!("notify: no handler ever contacted the pod; events dropped");
                    return;
                } else {
                    tokio::time::sleep(config.interval).await;
                    continue;
                }
            }
            match attempt(&mut conn, &config, &item).await {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => {
                    tracing::error!(kind = ?item.kind, error = %e, "notify: event refused; dropped");
                    break;
                }
                Err(Failure::Transient(e)) => {
                    conn = None;
                    if Instant::now() + config.interval > deadline {
                        tracing::error!(kind = ?item.kind, error = %e, timeout_s = config.event_timeout.as_secs(), "notify: event not delivered in time; dropped");
                        break;
                    }
                    tracing::debug!(kind = ?item.kind, error = %e, "notify: retrying");
                }
            }
            tokio::time::sleep(config.interval).await;
        }
    }
    tracing::debug!("notify: done");
}

/// One try: dial if needed, then send.
async fn attempt(
    conn: &mut Option<Connection>,
    config: &NotifyConfig,
    item: &Item,
) -> Result<(), Failure> {
    if conn.is_none() {
        *conn = Some(dial(config).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(Failure::Transient("not connected".into()));
    };
    let call = async {
        match item.kind {
            Kind::K8s => {
                c.client
                    .handle_k8s_event(pb::v1::K8sEventRequest {
                        event_json: item.json.clone(),
                    })
                    .await
            }
            kind => {
                c.client
                    .handle_domain_event(pb::v1::DomainEventRequest {
                        domain_json: item.json.clone(),
                        status_json: Vec::new(),
                        event_type: kind.event_type().into(),
                    })
                    .await
            }
        }
    };
    let reply = tokio::time::timeout(config.attempt_timeout, call)
        .await
        .map_err(|_| Failure::Transient("no answer in time".into()))?;
    match reply {
        Ok(r) => {
            let r = r.into_inner();
            if !r.success {
                tracing::warn!(kind = ?item.kind, message = %r.message, "notify: the handler did not take the event");
            }
            Ok(())
        }
        Err(s) => match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted => {
                Err(Failure::Transient(s.to_string()))
            }
            // A transport error (reset, broken pipe) comes as Unknown with no message of the
            // server's: transient too, as KubeVirt treats non-gRPC errors.
            tonic::Code::Unknown if s.metadata().is_empty() => {
                Err(Failure::Transient(s.to_string()))
            }
            _ => Err(Failure::Fatal(s.to_string())),
        },
    }
}

/// Dials the socket and checks the handler speaks version 1.
async fn dial(config: &NotifyConfig) -> Result<Connection, Failure> {
    let uri = format!("unix://{}", config.socket.display());
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Failure::Fatal(e.to_string()))?
        .connect_timeout(config.attempt_timeout)
        .timeout(config.attempt_timeout);
    let channel = tokio::time::timeout(config.attempt_timeout, endpoint.connect())
        .await
        .map_err(|_| Failure::Transient("dial timed out".into()))?
        .map_err(|e| Failure::Transient(format!("dial {}: {e}", config.socket.display())))?;
    let versions = tokio::time::timeout(
        config.attempt_timeout,
        NotifyInfoClient::new(channel.clone()).info(pb::info::NotifyInfoRequest {}),
    )
    .await
    .map_err(|_| Failure::Transient("version check timed out".into()))?
    .map_err(|e| Failure::Transient(format!("version check: {e}")))?
    .into_inner()
    .supported_notify_versions;
    if !versions.contains(&VERSION) {
        return Err(Failure::Transient(format!(
            "the handler speaks notify versions {versions:?}, not {VERSION}"
        )));
    }
    tracing::info!(socket = %config.socket.display(), "connected to the domain notify socket");
    Ok(Connection {
        client: NotifyClient::new(channel),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: Kind, n: u8) -> Item {
        Item {
            kind,
            json: vec![n],
        }
    }

    #[test]
    fn a_modified_replaces_the_modified_queued_last_and_nothing_else() {
        let q = Queue::new(64);
        q.push(item(Kind::Added, 0));
        q.push(item(Kind::Modified, 1));
        q.push(item(Kind::Modified, 2));
        q.push(item(Kind::K8s, 3));
        q.push(item(Kind::Modified, 4));
        q.push(item(Kind::Modified, 5));
        q.push(item(Kind::Final, 6));
        q.push(item(Kind::Modified, 7));
        assert_eq!(
            q.kinds(),
            [
                Kind::Added,
                Kind::Modified,
                Kind::K8s,
                Kind::Modified,
                Kind::Final,
                Kind::Modified
            ]
        );
        let json: Vec<u8> = q.lock().items.iter().map(|i| i.json[0]).collect();
        assert_eq!(json, [0, 2, 3, 5, 6, 7], "the latest domain wins");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_modified_or_k8s_event_never_added_or_final() {
        let q = Queue::new(3);
        q.push(item(Kind::Added, 0));
        q.push(item(Kind::K8s, 1));
        q.push(item(Kind::Modified, 2));
        q.push(item(Kind::K8s, 3));
        assert_eq!(q.kinds(), [Kind::Added, Kind::Modified, Kind::K8s]);
        q.push(item(Kind::Final, 4));
        q.push(item(Kind::K8s, 5));
        assert_eq!(q.kinds(), [Kind::Added, Kind::Final, Kind::K8s]);
        // Only ADDED and final left: nothing more can go, the queue grows past its bound.
        let q = Queue::new(2);
        q.push(item(Kind::Added, 0));
        q.push(item(Kind::Final, 1));
        q.push(item(Kind::Final, 2));
        assert_eq!(q.kinds(), [Kind::Added, Kind::Final, Kind::Final]);
    }

    #[tokio::test]
    async fn pop_waits_for_an_item_and_ends_once_closed_and_empty() {
        let q = Arc::new(Queue::new(8));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.pop().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.push(item(Kind::Added, 9));
        assert_eq!(waiter.await.unwrap(), Some(item(Kind::Added, 9)));
        q.push(item(Kind::Modified, 1));
        q.close();
        q.push(item(Kind::Modified, 2));
        assert_eq!(q.pop().await, Some(item(Kind::Modified, 1)));
        assert_eq!(q.pop().await, None);
    }

    /// A handle on bare channels: the status and VMI senders stand in for the core's ledger.
    fn handle() -> (
        Handle,
        tokio::sync::watch::Sender<crate::vm::state::Status>,
        tokio::sync::watch::Sender<Option<Arc<crate::spec::VirtualMachineInstance>>>,
    ) {
        let (status_tx, status) = tokio::sync::watch::channel(Default::default());
        let (vmi_tx, vmi) = tokio::sync::watch::channel(None);
        let h = Handle {
            requests: tokio::sync::mpsc::unbounded_channel().0,
            urgent: tokio::sync::mpsc::unbounded_channel().0,
            status,
            vmi,
            console_log: tokio::sync::watch::channel(None).1,
            events: Arc::new(crate::vm::state::EventLog::new(64)),
            domain_type: "qemu".into(),
            migration_proxy_dir: None,
        };
        (h, status_tx, vmi_tx)
    }

    fn test_vmi() -> crate::spec::VirtualMachineInstance {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm", "namespace": "ns", "uid": "u-1"},
            "spec": {"domain": {"devices": {}}}
        }))
        .unwrap()
    }

    fn state_event(state: State, reason: &str) -> Event {
        let mut e = Event::new(EventKind::Domain);
        e.state = state;
        e.reason = reason.into();
        e
    }

    #[test]
    fn the_follower_sends_added_then_changes_only_then_the_end_after_the_last_state() {
        let (h, status, vmi) = handle();
        let q = Queue::new(64);
        let mut f = Follower::default();
        // Nothing before there is a VMI and a domain.
        f.domain(&h, &q);
        vmi.send_replace(Some(Arc::new(test_vmi())));
        f.domain(&h, &q);
        assert!(q.kinds().is_empty());
        let set = |state, reason: &str| {
            status.send_modify(|s| {
                s.state = state;
                s.reason = reason.into();
            })
        };
        set(State::Starting, "sync");
        f.domain(&h, &q);
        f.domain(&h, &q);
        assert_eq!(
            q.kinds(),
            [Kind::Added],
            "an unchanged domain is not sent again"
        );
        set(State::Running, "started");
        f.domain(&h, &q);
        status.send_modify(|s| s.kubevirt.marked_for_graceful_shutdown = true);
        f.domain(&h, &q);
        assert_eq!(q.kinds(), [Kind::Added, Kind::Modified]);
        let last: serde_json::Value =
            serde_json::from_slice(&q.lock().items.back().unwrap().json).unwrap();
        assert_eq!(
            last["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["MarkedForGracefulShutdown"],
            serde_json::json!(true)
        );
        // An I/O error and a panic become Kubernetes events; other events nothing.
        let mut io = Event::new(EventKind::IoError);
        io.volume = "data".into();
        assert!(!f.event(&h, &q, &io));
        assert!(!f.event(&h, &q, &io), "a repeat is not told again");
        assert!(!f.event(&h, &q, &state_event(State::Crashed, "panicked")));
        assert!(!f.event(&h, &q, &Event::new(EventKind::Agent)));
        set(State::Shutoff, "shutdown");
        f.domain(&h, &q);
        assert!(f.event(&h, &q, &Event::new(EventKind::Final)), "the end");
        assert_eq!(
            q.kinds(),
            [
                Kind::Added,
                Kind::Modified,
                Kind::K8s,
                Kind::K8s,
                Kind::Modified,
                Kind::Final
            ]
        );
        let items: Vec<serde_json::Value> = q
            .lock()
            .items
            .iter()
            .map(|i| serde_json::from_slice(&i.json).unwrap())
            .collect();
        assert_eq!(items[2]["reason"], "IOerror");
        assert_eq!(items[3]["reason"], "GuestPanicked");
        assert_eq!(items[4]["Status"]["Status"], "Shutoff");
        assert_eq!(items[5]["Status"]["Reason"], "NonExistent");
        assert!(items[5]["ObjectMeta"]["deletionTimestamp"].is_string());
    }

    #[test]
    fn no_final_event_without_a_domain() {
        let (h, _status, vmi) = handle();
        vmi.send_replace(Some(Arc::new(test_vmi())));
        let q = Queue::new(8);
        let mut f = Follower::default();
        assert!(f.event(&h, &q, &Event::new(EventKind::Final)));
        assert!(q.kinds().is_empty());
    }

    #[test]
    fn the_k8s_event_names_the_vmi() {
        let vmi: crate::spec::VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm", "namespace": "ns", "uid": "u-1"},
            "spec": {"domain": {"devices": {}}}
        }))
        .unwrap();
        let e: serde_json::Value =
            serde_json::from_slice(&k8s_event(&vmi, "Warning", "IOerror", "disk full")).unwrap();
        assert_eq!(
            e["involvedObject"],
            serde_json::json!({"kind": "VirtualMachineInstance", "apiVersion": "kubevirt.io/v1",
                               "namespace": "ns", "name": "vm", "uid": "u-1"})
        );
        assert_eq!(
            (&e["type"], &e["reason"], &e["message"]),
            (
                &serde_json::json!("Warning"),
                &serde_json::json!("IOerror"),
                &serde_json::json!("disk full")
            )
        );
    }
}
