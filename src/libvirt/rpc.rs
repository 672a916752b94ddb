//! A client of libvirt's remote RPC protocol over the daemon's unix socket.
//!
//! The wire format is libvirt's `virnetprotocol.x`: every packet is a 4-byte length (counting
//! itself), a 24-byte header {program, version, procedure, type, serial, status} and an XDR
//! body. Calls carry a serial; the daemon answers each with a reply of the same serial, in any
//! order, so several calls can be in flight on one connection (a migration blocks for its whole
//! duration while job statistics and lookups go on beside it). Events arrive as unsolicited
//! MESSAGE packets.
//!
//! One reader thread per connection reads every packet: replies go to the caller waiting on
//! that serial, domain events become [`RawEvent`]s on the event channel. End of file or a read
//! error closes the connection: every pending call fails with [`RpcError::Closed`] and, unless
//! we closed it ourselves, a [`RawEvent::ConnectionClosed`] is sent (what libvirt's close
//! callback reported before). A dead daemon shows as end of file on the socket; a hung one is
//! caught by keepalive ([`Client::start_keepalive`], as `virConnectSetKeepAlive(2, 3)` did): a
//! PING after each quiet interval, and the connection closed when nothing at all came back for
//! `count + 1` intervals, so no caller and no supervisor step waits on a hung daemon for ever.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::events::RawEvent;
use super::xdr::{decode_typed_params, numeric_params, Decoder, Encoder, RemoteDomain, XdrError};

/// `REMOTE_PROGRAM` and `REMOTE_PROTOCOL_VERSION` of `remote_protocol.x`.
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
pub const REMOTE_PROTOCOL_VERSION: u32 = 1;
/// `QEMU_PROGRAM` and `QEMU_PROTOCOL_VERSION` of `qemu_protocol.x`: the QEMU driver's own
/// calls (the guest agent's pass-through).
pub const QEMU_PROGRAM: u32 = 0x2000_8087;
pub const QEMU_PROTOCOL_VERSION: u32 = 1;
/// The keepalive program (`virkeepaliveprotocol.x`): "keep" in ASCII.
const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
const KEEPALIVE_VERSION: u32 = 1;
const KEEPALIVE_PING: i32 = 1;
const KEEPALIVE_PONG: i32 = 2;

/// The largest packet accepted or sent, length word included (`VIR_NET_MESSAGE_MAX` of
/// current libvirt, 32 MiB; older daemons send at most 16 MiB).
pub const MESSAGE_MAX: usize = 32 * 1024 * 1024;
/// `VIR_NET_MESSAGE_HEADER_MAX`: the serialised header.
pub const HEADER_LEN: usize = 24;
const LEN_WORD: usize = 4;

/// `REMOTE_DOMAIN_JOB_STATS_MAX`.
pub const JOB_STATS_MAX: usize = 64;

/// `virNetMessageType`.
pub mod kind {
    pub const CALL: u32 = 0;
    pub const REPLY: u32 = 1;
    pub const MESSAGE: u32 = 2;
    pub const STREAM: u32 = 3;
}

/// `virNetMessageStatus`.
pub mod status {
    pub const OK: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const CONTINUE: u32 = 2;
}

/// The procedures used, numbered as in `remote_protocol.x` (all exist in libvirt 9.0).
pub mod procs {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_SUPPORTS_FEATURE: i32 = 60;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_GET_VERSION: i32 = 4;
    pub const DOMAIN_DEFINE_XML: i32 = 11;
    pub const DOMAIN_DESTROY: i32 = 12;
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    pub const DOMAIN_GET_INFO: i32 = 16;
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    pub const DOMAIN_REBOOT: i32 = 27;
    pub const DOMAIN_RESUME: i32 = 28;
    pub const DOMAIN_SUSPEND: i32 = 34;
    pub const DOMAIN_UNDEFINE: i32 = 35;
    pub const DOMAIN_BLOCK_STATS: i32 = 64;
    pub const AUTH_LIST: i32 = 66;
    pub const CONNECT_GET_LIB_VERSION: i32 = 157;
    pub const DOMAIN_MEMORY_STATS: i32 = 159;
    pub const DOMAIN_ATTACH_DEVICE_FLAGS: i32 = 160;
    pub const DOMAIN_DETACH_DEVICE_FLAGS: i32 = 161;
    pub const DOMAIN_ABORT_JOB: i32 = 164;
    pub const DOMAIN_MIGRATE_SET_MAX_DOWNTIME: i32 = 166;
    pub const DOMAIN_GET_BLOCK_INFO: i32 = 194;
    pub const DOMAIN_CREATE_WITH_FLAGS: i32 = 196;
    pub const DOMAIN_SET_VCPUS_FLAGS: i32 = 199;
    pub const DOMAIN_GET_VCPUS_FLAGS: i32 = 200;
    pub const DOMAIN_GET_STATE: i32 = 212;
    pub const DOMAIN_RESET: i32 = 245;
    pub const DOMAIN_BLOCK_RESIZE: i32 = 251;
    pub const DOMAIN_SHUTDOWN_FLAGS: i32 = 258;
    pub const DOMAIN_GET_JOB_STATS: i32 = 298;
    pub const DOMAIN_MIGRATE_PERFORM3_PARAMS: i32 = 305;
    pub const CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: i32 = 316;
    pub const DOMAIN_EVENT_CALLBACK_LIFECYCLE: i32 = 318;
    pub const DOMAIN_EVENT_CALLBACK_REBOOT: i32 = 319;
    pub const DOMAIN_EVENT_CALLBACK_WATCHDOG: i32 = 321;
    pub const DOMAIN_EVENT_CALLBACK_IO_ERROR_REASON: i32 = 324;
    pub const DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED: i32 = 333;
    pub const DOMAIN_FSFREEZE: i32 = 335;
    pub const DOMAIN_FSTHAW: i32 = 336;
    pub const CONNECT_GET_DOMAIN_CAPABILITIES: i32 = 342;
    pub const DOMAIN_EVENT_CALLBACK_AGENT_LIFECYCLE: i32 = 348;
    pub const DOMAIN_EVENT_CALLBACK_JOB_COMPLETED: i32 = 363;
    pub const DOMAIN_MIGRATE_START_POST_COPY: i32 = 364;
    pub const DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED: i32 = 367;
    pub const DOMAIN_BACKUP_BEGIN: i32 = 421;
    pub const DOMAIN_BACKUP_GET_XML_DESC: i32 = 422;
}

/// The procedures of `qemu_protocol.x` used.
pub mod qemu_procs {
    /// `qemu_domain_agent_command_args {dom, cmd, timeout, flags}` →
    /// `qemu_domain_agent_command_ret {remote_string result}`.
    pub const DOMAIN_AGENT_COMMAND: i32 = 3;
}

/// `virConnectCloseReason`, as the close event reports it.
pub const CLOSE_REASON_ERROR: i32 = 0;
pub const CLOSE_REASON_EOF: i32 = 1;

/// An error the daemon returned for a call (`remote_error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// `virErrorNumber`.
    pub code: i32,
    /// `virErrorDomain`.
    pub domain: i32,
    pub message: String,
    pub level: i32,
}

impl RemoteError {
    /// Decodes `remote_error` (the optional domain and network are read and dropped).
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let code = d.i32()?;
        let domain = d.i32()?;
        let message = d.opt_string()?.unwrap_or_default();
        let level = d.i32()?;
        if d.presence("error domain")? {
            RemoteDomain::decode(d)?;
        }
        for _ in 0..3 {
            d.opt_string()?;
        }
        d.i32()?;
        d.i32()?;
        if d.presence("error network")? {
            d.string()?;
            d.fixed_opaque(super::xdr::UUID_LEN, "uuid")?;
        }
        Ok(RemoteError {
            code,
            domain,
            message,
            level,
        })
    }
}

/// A failure of the RPC layer.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("libvirt socket: {0}")]
    Io(#[from] io::Error),
    #[error("libvirt protocol error: {0}")]
    Protocol(String),
    #[error("libvirt protocol error: {0}")]
    Decode(#[from] XdrError),
    #[error("the connection to libvirtd is closed")]
    Closed,
    #[error("libvirtd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{}", .0.message)]
    Remote(RemoteError),
}

/// `virNetMessageHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub prog: u32,
    pub vers: u32,
    pub proc_: i32,
    pub kind: u32,
    pub serial: u32,
    pub status: u32,
}

impl Header {
    #[cfg(test)]
    fn call(proc_: i32, serial: u32) -> Self {
        Self::program_call(REMOTE_PROGRAM, proc_, serial)
    }

    fn program_call(prog: u32, proc_: i32, serial: u32) -> Self {
        Header {
            prog,
            vers: if prog == QEMU_PROGRAM {
                QEMU_PROTOCOL_VERSION
            } else {
                REMOTE_PROTOCOL_VERSION
            },
            proc_,
            kind: kind::CALL,
            serial,
            status: status::OK,
        }
    }
}

/// A whole packet: length word, header, body.
pub fn encode_packet(h: &Header, body: &[u8]) -> Vec<u8> {
    let len = LEN_WORD + HEADER_LEN + body.len();
    let mut e = Encoder::new();
    e.u32(len as u32)
        .u32(h.prog)
        .u32(h.vers)
        .i32(h.proc_)
        .u32(h.kind)
        .u32(h.serial)
        .u32(h.status);
    let mut out = e.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Splits a packet (without its length word) into header and body.
pub fn decode_header(packet: &[u8]) -> Result<(Header, &[u8]), RpcError> {
    if packet.len() < HEADER_LEN {
        return Err(RpcError::Protocol(format!(
            "packet of {} bytes is shorter than a header",
            packet.len()
        )));
    }
    let mut d = Decoder::new(&packet[..HEADER_LEN]);
    let h = Header {
        prog: d.u32()?,
        vers: d.u32()?,
        proc_: d.i32()?,
        kind: d.u32()?,
        serial: d.u32()?,
        status: d.u32()?,
    };
    Ok((h, &packet[HEADER_LEN..]))
}

/// Reads one packet (without its length word); `None` at a clean end of file.
pub fn read_packet(r: &mut impl Read) -> Result<Option<Vec<u8>>, RpcError> {
    let mut len = [0u8; LEN_WORD];
    let mut got = 0;
    while got < LEN_WORD {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(LEN_WORD + HEADER_LEN..=MESSAGE_MAX).contains(&len) {
        return Err(RpcError::Protocol(format!(
            "packet length {len} out of range"
        )));
    }
    let mut packet = vec![0u8; len - LEN_WORD];
    r.read_exact(&mut packet)?;
    Ok(Some(packet))
}

/// Turns a domain event message into a [`RawEvent`]; `None` for events we do not follow.
pub fn decode_event(proc_: i32, body: &[u8]) -> Result<Option<RawEvent>, XdrError> {
    use procs::*;
    let mut d = Decoder::new(body);
    let d = &mut d;
    // Every remote_domain_event_callback_*_msg starts with the callbackID, then the domain.
    let head = |d: &mut Decoder<'_>| -> Result<String, XdrError> {
        d.i32()?;
        Ok(RemoteDomain::decode(d)?.name)
    };
    let ev = match proc_ {
        DOMAIN_EVENT_CALLBACK_LIFECYCLE => RawEvent::Lifecycle {
            domain: head(d)?,
            event: d.i32()?,
            detail: d.i32()?,
        },
        DOMAIN_EVENT_CALLBACK_REBOOT => RawEvent::Reboot { domain: head(d)? },
        DOMAIN_EVENT_CALLBACK_WATCHDOG => RawEvent::Watchdog {
            domain: head(d)?,
            action: d.i32()?,
        },
        DOMAIN_EVENT_CALLBACK_IO_ERROR_REASON => RawEvent::IoError {
            domain: head(d)?,
            src_path: d.string()?,
            alias: d.string()?,
            action: d.i32()?,
            reason: d.string()?,
        },
        DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED => RawEvent::DeviceRemoved {
            domain: head(d)?,
            alias: d.string()?,
        },
        DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED => RawEvent::DeviceRemovalFailed {
            domain: head(d)?,
            alias: d.string()?,
        },
        DOMAIN_EVENT_CALLBACK_JOB_COMPLETED => {
            let domain = head(d)?;
            let params = decode_typed_params(d, JOB_STATS_MAX)?;
            RawEvent::JobCompleted {
                domain,
                stats: numeric_params(&params),
            }
        }
        DOMAIN_EVENT_CALLBACK_AGENT_LIFECYCLE => RawEvent::AgentLifecycle {
            domain: head(d)?,
            state: d.i32()?,
            reason: d.i32()?,
        },
        _ => return Ok(None),
    };
    d.finish()?;
    Ok(Some(ev))
}

type Reply = Result<Vec<u8>, RpcError>;

/// Who waits for a reply.
enum Waiter {
    /// A thread blocked in [`Client::call`].
    Thread(SyncSender<Reply>),
    /// A task awaiting [`Client::call_async`]: the reader thread wakes it directly.
    Task(oneshot::Sender<Reply>),
}

impl Waiter {
    fn send(self, reply: Reply) {
        // A waiter that gave up (timed out, dropped) does not care.
        match self {
            Waiter::Thread(tx) => drop(tx.send(reply)),
            Waiter::Task(tx) => drop(tx.send(reply)),
        }
    }
}

/// What the callers and the reader thread share.
struct Shared {
    /// Writes of whole packets are serialised here.
    writer: Mutex<UnixStream>,
    /// Callers waiting for a reply, by serial; `None` once the connection is closed.
    pending: Mutex<Option<HashMap<u32, Waiter>>>,
    /// Set when we close the connection ourselves: no close event then.
    closing: AtomicBool,
    /// A handle of the socket for shutting it down without the writer's lock (a writer may be
    /// blocked on a daemon that stopped reading).
    control: UnixStream,
    /// When the last packet arrived from the daemon (keepalive).
    last_rx: Mutex<Instant>,
}

impl Shared {
    fn new(stream: UnixStream) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Shared {
            control: stream.try_clone()?,
            writer: Mutex::new(stream),
            pending: Mutex::new(Some(HashMap::new())),
            closing: AtomicBool::new(false),
            last_rx: Mutex::new(Instant::now()),
        }))
    }

    fn last_rx(&self) -> MutexGuard<'_, Instant> {
        self.last_rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Option<HashMap<u32, Waiter>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, UnixStream> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every pending call (their senders are dropped) and refuses new ones.
    fn mark_closed(&self) {
        self.pending().take();
    }

    fn shutdown(&self) {
        let _ = self.control.shutdown(Shutdown::Both);
    }
}

/// One connection to libvirtd. Cheap to share behind an `Arc`; [`Client::call`] blocks its
/// caller, [`Client::call_async`] is awaited.
pub struct Client {
    shared: Arc<Shared>,
    serial: AtomicU32,
}

impl Client {
    /// Connects to the daemon's socket and starts the reader thread, which sends the domain
    /// events it receives into `events`. No libvirt handshake yet: see [`Client::open`].
    pub fn connect(socket: &Path, events: UnboundedSender<RawEvent>) -> Result<Self, RpcError> {
        let stream = UnixStream::connect(socket)?;
        let reader = stream.try_clone()?;
        let shared = Shared::new(stream)?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("libvirt-rpc".into())
            .spawn(move || read_loop(reader, s, events))?;
        Ok(Client {
            shared,
            serial: AtomicU32::new(1),
        })
    }

    /// The remote driver's handshake: the authentication list (which must allow "none"), then
    /// `REMOTE_PROC_CONNECT_OPEN` of `name` (e.g. `qemu:///system`).
    pub fn open(&self, name: &str) -> Result<(), RpcError> {
        let body = self.call_timeout(procs::AUTH_LIST, &[], Some(HANDSHAKE_TIMEOUT))?;
        let mut d = Decoder::new(&body);
        // remote_auth_type types<REMOTE_AUTH_TYPE_LIST_MAX>
        let n = d.array_len(20, "auth types")?;
        let types = (0..n).map(|_| d.u32()).collect::<Result<Vec<_>, _>>()?;
        d.finish()?;
        // REMOTE_AUTH_NONE = 0; an empty list also means no authentication.
        if !types.is_empty() && !types.contains(&0) {
            return Err(RpcError::Protocol(format!(
                "libvirtd requires authentication (types {types:?}), which this client does not do"
            )));
        }
        let mut e = Encoder::new();
        e.opt_string(Some(name)).u32(0);
        self.call_timeout(
            procs::CONNECT_OPEN,
            &e.into_bytes(),
            Some(HANDSHAKE_TIMEOUT),
        )?;
        Ok(())
    }

    /// Starts keepalive if the daemon supports it (`VIR_DRV_FEATURE_PROGRAM_KEEPALIVE`): a
    /// PING whenever nothing came from the daemon for `interval`, and the connection closed
    /// (a [`RawEvent::ConnectionClosed`] follows) after `interval * (count + 1)` of silence.
    /// Returns whether it runs.
    pub fn start_keepalive(&self, interval: Duration, count: u32) -> Result<bool, RpcError> {
        let mut e = Encoder::new();
        e.i32(FEATURE_PROGRAM_KEEPALIVE);
        let body = self.call_timeout(
            procs::CONNECT_SUPPORTS_FEATURE,
            &e.into_bytes(),
            Some(HANDSHAKE_TIMEOUT),
        )?;
        let mut d = Decoder::new(&body);
        let supported = d.i32()? != 0;
        d.finish()?;
        if supported {
            let weak = Arc::downgrade(&self.shared);
            std::thread::Builder::new()
                .name("libvirt-keepalive".into())
                .spawn(move || keepalive_loop(weak, interval, count))?;
        }
        Ok(supported)
    }

    /// Whether the connection is still usable.
    pub fn is_open(&self) -> bool {
        self.shared.pending().is_some()
    }

    /// Calls `proc_` with the encoded `args` and waits for the reply body.
    pub fn call(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>, RpcError> {
        self.call_timeout(proc_, args, None)
    }

    /// Calls `proc_` of the QEMU driver's program ([`QEMU_PROGRAM`]) and waits for the reply
    /// body. Same connection, same serials: the daemon answers it like any other call.
    pub fn call_qemu(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>, RpcError> {
        let (tx, rx) = sync_channel(1);
        self.send_to(QEMU_PROGRAM, proc_, args, Waiter::Thread(tx))?;
        rx.recv().map_err(|_| RpcError::Closed)?
    }

    /// [`Client::call`] for a task on the async runtime: the request is written at once (from
    /// the calling thread; a unix socket write that does not block unless the daemon stopped
    /// reading, and keepalive shuts such a connection down) and the returned future resolves
    /// when the reader thread hands over the reply. No blocking thread sits between the task
    /// and the daemon: under load every hand-off between threads cost ~0.5 ms.
    pub fn call_async(
        &self,
        proc_: i32,
        args: &[u8],
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(proc_, args, Waiter::Task(tx));
        async move {
            sent?;
            rx.await.map_err(|_| RpcError::Closed)?
        }
    }

    /// Registers `waiter` under a new serial and writes the call; returns the serial.
    fn send(&self, proc_: i32, args: &[u8], waiter: Waiter) -> Result<u32, RpcError> {
        self.send_to(REMOTE_PROGRAM, proc_, args, waiter)
    }

    fn send_to(&self, prog: u32, proc_: i32, args: &[u8], waiter: Waiter) -> Result<u32, RpcError> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let packet = encode_packet(&Header::program_call(prog, proc_, serial), args);
        if packet.len() > MESSAGE_MAX {
            return Err(RpcError::Protocol(format!(
                "call of {} bytes exceeds the protocol's maximum",
                packet.len()
            )));
        }
        match self.shared.pending().as_mut() {
            Some(map) => map.insert(serial, waiter),
            None => return Err(RpcError::Closed),
        };
        let written = self.shared.writer().write_all(&packet);
        if let Err(e) = written {
            self.forget(serial);
            // A failed write leaves the stream in an unknown state: close it, and let the
            // reader thread report the close.
            self.shared.shutdown();
            return Err(e.into());
        }
        Ok(serial)
    }

    fn call_timeout(
        &self,
        proc_: i32,
        args: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RpcError> {
        let (tx, rx) = sync_channel(1);
        let serial = self.send(proc_, args, Waiter::Thread(tx))?;
        match timeout {
            None => rx.recv().map_err(|_| RpcError::Closed)?,
            Some(t) => match rx.recv_timeout(t) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    self.forget(serial);
                    Err(RpcError::Timeout(t))
                }
                Err(RecvTimeoutError::Disconnected) => Err(RpcError::Closed),
            },
        }
    }

    fn forget(&self, serial: u32) {
        if let Some(map) = self.shared.pending().as_mut() {
            map.remove(&serial);
        }
    }
}

impl Drop for Client {
    /// Says goodbye (`REMOTE_PROC_CONNECT_CLOSE`, so the daemon does not log an unexpected
    /// end of file) and closes the socket; no close event is sent for it.
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if self.is_open() {
            let _ = self.call_timeout(procs::CONNECT_CLOSE, &[], Some(Duration::from_secs(1)));
        }
        self.shared.shutdown();
    }
}

fn read_loop(mut stream: UnixStream, shared: Arc<Shared>, events: UnboundedSender<RawEvent>) {
    let reason = loop {
        match read_packet(&mut stream) {
            Ok(Some(packet)) => {
                *shared.last_rx() = Instant::now();
                if let Err(e) = dispatch(&packet, &shared, &events) {
                    tracing::warn!(error = %e, "closing the libvirt connection");
                    break CLOSE_REASON_ERROR;
                }
            }
            Ok(None) => break CLOSE_REASON_EOF,
            Err(e) => {
                if !shared.closing.load(Ordering::SeqCst) {
                    tracing::warn!(error = %e, "reading from libvirtd failed");
                }
                break CLOSE_REASON_ERROR;
            }
        }
    };
    shared.mark_closed();
    shared.shutdown();
    if !shared.closing.load(Ordering::SeqCst) {
        // A closed receiver means the launcher is shutting down; nothing to do then.
        let _ = events.send(RawEvent::ConnectionClosed { reason });
    }
}

/// How long each handshake call may take: a daemon that accepts connections but answers
/// nothing (hung, or stopped) must not block a reconnect for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// `VIR_DRV_FEATURE_PROGRAM_KEEPALIVE`.
const FEATURE_PROGRAM_KEEPALIVE: i32 = 10;

fn keepalive_packet(proc_: i32) -> Vec<u8> {
    let h = Header {
        prog: KEEPALIVE_PROGRAM,
        vers: KEEPALIVE_VERSION,
        proc_,
        kind: kind::MESSAGE,
        serial: 0,
        status: status::OK,
    };
    encode_packet(&h, &[])
}

/// Runs until the connection is gone: PINGs the daemon after each quiet `interval` and shuts
/// the socket down after `interval * (count + 1)` without a single packet from it.
fn keepalive_loop(shared: Weak<Shared>, interval: Duration, count: u32) {
    loop {
        std::thread::sleep(interval);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.closing.load(Ordering::SeqCst) || shared.pending().is_none() {
            return;
        }
        let quiet = shared.last_rx().elapsed();
        if quiet >= interval * (count + 1) {
            tracing::warn!(
                quiet_ms = quiet.as_millis() as u64,
                "libvirtd answers nothing, not even keepalive: closing the connection"
            );
            shared.shutdown();
            return;
        }
        if quiet >= interval {
            // Never wait for the writer: a caller may hold it, blocked on a hung daemon.
            if let Ok(mut w) = shared.writer.try_lock() {
                let _ = w.write_all(&keepalive_packet(KEEPALIVE_PING));
            }
        }
    }
}

/// One packet from the daemon, decoded: what [`dispatch`] acts on.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// The reply to call `serial`: its body, or the error the daemon (or a malformed reply)
    /// gives instead.
    Reply {
        serial: u32,
        result: Result<&'a [u8], RpcError>,
    },
    /// A domain event: `Ok(None)` for one we do not follow, `Err` for a malformed one.
    Event {
        proc_: i32,
        event: Result<Option<RawEvent>, XdrError>,
    },
    /// The daemon's keepalive PING: answer with a PONG.
    Ping,
    /// A keepalive PONG: its arrival already counted as a sign of life.
    Pong,
    /// Any other program or message type: ignored.
    Other(Header),
}

/// Decodes one packet (without its length word, as [`read_packet`] returns it). An error here
/// means the peer cannot be trusted any more; a malformed reply or event body is not one (it
/// is reported to its caller, or logged).
pub fn decode_packet(packet: &[u8]) -> Result<Incoming<'_>, RpcError> {
    let (h, body) = decode_header(packet)?;
    Ok(match (h.prog, h.kind) {
        (REMOTE_PROGRAM | QEMU_PROGRAM, kind::REPLY) => Incoming::Reply {
            serial: h.serial,
            // Both programs are at version 1.
            result: if h.vers != REMOTE_PROTOCOL_VERSION {
                Err(RpcError::Protocol(format!("reply of version {}", h.vers)))
            } else {
                match h.status {
                    status::OK => Ok(body),
                    status::ERROR => match RemoteError::decode(&mut Decoder::new(body)) {
                        Ok(e) => Err(RpcError::Remote(e)),
                        Err(e) => Err(e.into()),
                    },
                    s => Err(RpcError::Protocol(format!("reply with status {s}"))),
                }
            },
        },
        (REMOTE_PROGRAM, kind::MESSAGE) => Incoming::Event {
            proc_: h.proc_,
            event: decode_event(h.proc_, body),
        },
        (KEEPALIVE_PROGRAM, kind::MESSAGE) if h.proc_ == KEEPALIVE_PING => Incoming::Ping,
        (KEEPALIVE_PROGRAM, kind::MESSAGE) => Incoming::Pong,
        _ => Incoming::Other(h),
    })
}

/// Handles one packet. An error here means the peer cannot be trusted any more.
fn dispatch(
    packet: &[u8],
    shared: &Shared,
    events: &UnboundedSender<RawEvent>,
) -> Result<(), RpcError> {
    match decode_packet(packet)? {
        Incoming::Reply { serial, result } => {
            let Some(tx) = shared.pending().as_mut().and_then(|m| m.remove(&serial)) else {
                tracing::debug!(serial, "reply to no pending call");
                return Ok(());
            };
            tx.send(result.map(<[u8]>::to_vec));
        }
        Incoming::Event { proc_, event } => match event {
            Ok(Some(ev)) => {
                let _ = events.send(ev);
            }
            Ok(None) => tracing::debug!(procedure = proc_, "ignoring libvirt event"),
            Err(e) => tracing::warn!(procedure = proc_, error = %e, "malformed libvirt event"),
        },
        Incoming::Ping => {
            // The daemon's own keepalive. Never wait for the writer here: a caller may be
            // blocked writing while we must read.
            if let Ok(mut w) = shared.writer.try_lock() {
                let _ = w.write_all(&keepalive_packet(KEEPALIVE_PONG));
            }
        }
        Incoming::Pong => {}
        Incoming::Other(h) => tracing::debug!(
            program = h.prog,
            kind = h.kind,
            procedure = h.proc_,
            "ignoring libvirt packet"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xdr::{encode_typed_params, TypedParam, TypedValue};

    fn dom(e: &mut Encoder, name: &str) {
        RemoteDomain {
            name: name.into(),
            uuid: [1; 16],
            id: 1,
        }
        .encode(e);
    }

    #[test]
    fn header_framing_round_trips() {
        let h = Header::call(procs::DOMAIN_GET_STATE, 7);
        let packet = encode_packet(&h, &[1, 2, 3, 4]);
        assert_eq!(packet.len(), 4 + 24 + 4);
        assert_eq!(&packet[..4], &32u32.to_be_bytes());
        assert_eq!(&packet[4..8], &[0x20, 0x00, 0x80, 0x86]);
        let read = read_packet(&mut &packet[..]).unwrap().unwrap();
        let (back, body) = decode_header(&read).unwrap();
        assert_eq!(back, h);
        assert_eq!(body, &[1, 2, 3, 4]);
        // A clean end of file between packets.
        assert!(read_packet(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn bad_frames_are_errors() {
        // Truncated length word, a length too small, too large, and a short body.
        assert!(read_packet(&mut &[0u8, 0][..]).is_err());
        assert!(read_packet(&mut &8u32.to_be_bytes()[..]).is_err());
        assert!(read_packet(&mut &u32::MAX.to_be_bytes()[..]).is_err());
        let mut p = encode_packet(&Header::call(1, 1), &[0; 8]);
        p.truncate(p.len() - 1);
        assert!(read_packet(&mut &p[..]).is_err());
        assert!(decode_header(&[0; 23]).is_err());
        assert!(decode_packet(&[0; 23]).is_err());
    }

    #[test]
    fn packets_decode_into_what_the_reader_acts_on() {
        let packet = |h: Header, body: &[u8]| encode_packet(&h, body)[LEN_WORD..].to_vec();
        let reply = |vers, status| Header {
            vers,
            kind: kind::REPLY,
            status,
            ..Header::call(procs::DOMAIN_GET_STATE, 9)
        };
        let p = packet(reply(REMOTE_PROTOCOL_VERSION, status::OK), &[0, 0, 0, 1]);
        assert!(matches!(
            decode_packet(&p).unwrap(),
            Incoming::Reply {
                serial: 9,
                result: Ok([0, 0, 0, 1])
            }
        ));
        let p = packet(reply(2, status::OK), &[]);
        assert!(matches!(
            decode_packet(&p).unwrap(),
            Incoming::Reply {
                result: Err(RpcError::Protocol(_)),
                ..
            }
        ));
        // The QEMU driver's program (guest-agent commands): a call carries its program
        // number, and its reply goes to the caller like any other.
        let q = Header::program_call(QEMU_PROGRAM, qemu_procs::DOMAIN_AGENT_COMMAND, 11);
        assert_eq!(
            &encode_packet(&q, &[])[LEN_WORD..LEN_WORD + 12],
            &[0x20, 0x00, 0x80, 0x87, 0, 0, 0, 1, 0, 0, 0, 3]
        );
        let p = packet(
            Header {
                kind: kind::REPLY,
                ..q
            },
            &[0, 0, 0, 0],
        );
        assert!(matches!(
            decode_packet(&p).unwrap(),
            Incoming::Reply {
                serial: 11,
                result: Ok([0, 0, 0, 0])
            }
        ));
        // An error reply whose remote_error is cut short: the caller gets a decode error.
        let p = packet(reply(REMOTE_PROTOCOL_VERSION, status::ERROR), &[0, 0, 0, 1]);
        assert!(matches!(
            decode_packet(&p).unwrap(),
            Incoming::Reply {
                result: Err(RpcError::Decode(_)),
                ..
            }
        ));
        let event = Header {
            kind: kind::MESSAGE,
            ..Header::call(procs::DOMAIN_EVENT_CALLBACK_REBOOT, 0)
        };
        assert!(matches!(
            decode_packet(&packet(event, &[])).unwrap(),
            Incoming::Event {
                proc_: procs::DOMAIN_EVENT_CALLBACK_REBOOT,
                event: Err(_)
            }
        ));
        assert!(matches!(
            decode_packet(&keepalive_packet(KEEPALIVE_PING)[LEN_WORD..]).unwrap(),
            Incoming::Ping
        ));
        assert!(matches!(
            decode_packet(&keepalive_packet(KEEPALIVE_PONG)[LEN_WORD..]).unwrap(),
            Incoming::Pong
        ));
        let other = Header {
            prog: 1,
            ..Header::call(1, 1)
        };
        assert!(matches!(
            decode_packet(&packet(other, &[])).unwrap(),
            Incoming::Other(h) if h == other
        ));
    }

    #[test]
    fn remote_errors_decode() {
        let mut e = Encoder::new();
        e.i32(42)
            .i32(10)
            .opt_string(Some("Domain not found: no domain with matching name 'x'"))
            .i32(2);
        e.bool(true);
        dom(&mut e, "x");
        e.opt_string(Some("x")).opt_string(None).opt_string(None);
        e.i32(0).i32(0).bool(false);
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        let err = RemoteError::decode(&mut d).unwrap();
        d.finish().unwrap();
        assert_eq!(err.code, 42);
        assert!(err.message.starts_with("Domain not found"));
        for cut in 0..b.len() {
            assert!(RemoteError::decode(&mut Decoder::new(&b[..cut])).is_err());
        }
    }

    #[test]
    fn events_decode_into_raw_events() {
        let mut e = Encoder::new();
        e.i32(3);
        dom(&mut e, "default_vm");
        e.i32(5).i32(3);
        assert_eq!(
            decode_event(procs::DOMAIN_EVENT_CALLBACK_LIFECYCLE, &e.into_bytes()).unwrap(),
            Some(RawEvent::Lifecycle {
                domain: "default_vm".into(),
                event: 5,
                detail: 3
            })
        );

        let mut e = Encoder::new();
        e.i32(1);
        dom(&mut e, "vm");
        e.string("/disk.img")
            .string("ua-data")
            .i32(0)
            .string("enospc");
        assert_eq!(
            decode_event(
                procs::DOMAIN_EVENT_CALLBACK_IO_ERROR_REASON,
                &e.into_bytes()
            )
            .unwrap(),
            Some(RawEvent::IoError {
                domain: "vm".into(),
                src_path: "/disk.img".into(),
                alias: "ua-data".into(),
                action: 0,
                reason: "enospc".into()
            })
        );

        let mut e = Encoder::new();
        e.i32(1);
        dom(&mut e, "vm");
        encode_typed_params(
            &mut e,
            &[
                TypedParam::new("downtime", TypedValue::ULLong(42)),
                TypedParam::new("note", TypedValue::String("x".into())),
            ],
        );
        assert_eq!(
            decode_event(procs::DOMAIN_EVENT_CALLBACK_JOB_COMPLETED, &e.into_bytes()).unwrap(),
            Some(RawEvent::JobCompleted {
                domain: "vm".into(),
                stats: vec![("downtime".into(), 42.0)]
            })
        );

        // Events we do not follow are skipped; truncated or padded bodies are errors.
        assert_eq!(decode_event(320, &[]).unwrap(), None);
        let mut e = Encoder::new();
        e.i32(1);
        dom(&mut e, "vm");
        e.string("ua-x");
        let b = e.into_bytes();
        for cut in 0..b.len() {
            assert!(decode_event(procs::DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED, &b[..cut]).is_err());
        }
        let mut long = b.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(decode_event(procs::DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED, &long).is_err());
    }

    #[test]
    fn garbage_packets_do_not_panic() {
        // A deterministic pseudo-random sweep through the decoders.
        let mut rng = fastrand::Rng::with_seed(0x1234_5678);
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = decode_header(&bytes);
            let _ = decode_packet(&bytes);
            let _ = RemoteError::decode(&mut Decoder::new(&bytes));
            for p in [318, 319, 321, 324, 333, 348, 363, 367] {
                let _ = decode_event(p, &bytes);
            }
            let _ = read_packet(&mut &bytes[..]);
        }
    }

    /// A client whose daemon is the returned end of a socket pair, and its event stream.
    fn with_fake_daemon() -> (
        Arc<Client>,
        UnixStream,
        tokio::sync::mpsc::UnboundedReceiver<RawEvent>,
    ) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = ours.try_clone().unwrap();
        let shared = Shared::new(ours).unwrap();
        let s = shared.clone();
        std::thread::spawn(move || read_loop(reader, s, tx));
        let client = Arc::new(Client {
            shared,
            serial: AtomicU32::new(1),
        });
        (client, theirs, rx)
    }

    /// The daemon's reply to call `h`.
    fn reply(h: Header, status: u32, body: &[u8]) -> Vec<u8> {
        encode_packet(
            &Header {
                kind: kind::REPLY,
                status,
                ..h
            },
            body,
        )
    }

    /// A fake daemon on a socket pair: replies out of order, sends an event, then hangs up.
    #[test]
    fn concurrent_calls_events_and_close() {
        let (client, mut theirs, mut rx) = with_fake_daemon();

        let c1 = client.clone();
        let slow = std::thread::spawn(move || c1.call(procs::DOMAIN_GET_STATE, &[]));
        let first = read_packet(&mut theirs).unwrap().unwrap();
        let c2 = client.clone();
        let fast = std::thread::spawn(move || c2.call(procs::DOMAIN_LOOKUP_BY_NAME, &[]));
        let second = read_packet(&mut theirs).unwrap().unwrap();
        let (h1, _) = decode_header(&first).unwrap();
        let (h2, _) = decode_header(&second).unwrap();
        assert_ne!(h1.serial, h2.serial);

        // Answer the second call first, with an error.
        let mut err = Encoder::new();
        err.i32(42).i32(10).opt_string(Some("no domain")).i32(2);
        err.bool(false)
            .opt_string(None)
            .opt_string(None)
            .opt_string(None);
        err.i32(0).i32(0).bool(false);
        theirs
            .write_all(&reply(h2, status::ERROR, &err.into_bytes()))
            .unwrap();
        match fast.join().unwrap() {
            Err(RpcError::Remote(e)) => assert_eq!((e.code, e.message.as_str()), (42, "no domain")),
            other => panic!("unexpected {other:?}"),
        }

        // An event while the first call still waits.
        let mut ev = Encoder::new();
        ev.i32(0);
        dom(&mut ev, "vm");
        let event = Header {
            prog: REMOTE_PROGRAM,
            vers: 1,
            proc_: procs::DOMAIN_EVENT_CALLBACK_REBOOT,
            kind: kind::MESSAGE,
            serial: 0,
            status: status::OK,
        };
        theirs
            .write_all(&encode_packet(&event, &ev.into_bytes()))
            .unwrap();
        assert_eq!(
            rx.blocking_recv(),
            Some(RawEvent::Reboot {
                domain: "vm".into()
            })
        );

        theirs
            .write_all(&reply(h1, status::OK, &[0, 0, 0, 1, 0, 0, 0, 2]))
            .unwrap();
        assert_eq!(slow.join().unwrap().unwrap(), vec![0, 0, 0, 1, 0, 0, 0, 2]);

        // A third call is pending when the daemon hangs up: it fails, the close is reported.
        let c3 = client.clone();
        let pending = std::thread::spawn(move || c3.call(procs::DOMAIN_GET_INFO, &[]));
        read_packet(&mut theirs).unwrap().unwrap();
        drop(theirs);
        assert!(matches!(pending.join().unwrap(), Err(RpcError::Closed)));
        assert_eq!(
            rx.blocking_recv(),
            Some(RawEvent::ConnectionClosed {
                reason: CLOSE_REASON_EOF
            })
        );
        assert!(!client.is_open());
        assert!(matches!(client.call(1, &[]), Err(RpcError::Closed)));
    }

    /// An awaited call and a blocking one at once: each gets its own reply, whatever the
    /// order; an awaited call pending when the daemon hangs up fails as closed.
    #[test]
    fn awaited_calls_get_their_replies_and_fail_on_close() {
        let (client, mut theirs, _events) = with_fake_daemon();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();

        let awaited = client.call_async(procs::DOMAIN_GET_STATE, &[]);
        let (h1, _) = decode_header(&read_packet(&mut theirs).unwrap().unwrap()).unwrap();
        let c = client.clone();
        let blocking = std::thread::spawn(move || c.call(procs::DOMAIN_GET_INFO, &[]));
        let (h2, _) = decode_header(&read_packet(&mut theirs).unwrap().unwrap()).unwrap();
        assert_eq!(
            (h1.proc_, h2.proc_),
            (procs::DOMAIN_GET_STATE, procs::DOMAIN_GET_INFO)
        );
        theirs
            .write_all(&reply(h2, status::OK, &[0, 0, 0, 2]))
            .unwrap();
        theirs
            .write_all(&reply(h1, status::OK, &[0, 0, 0, 1]))
            .unwrap();
        assert_eq!(blocking.join().unwrap().unwrap(), vec![0, 0, 0, 2]);
        assert_eq!(rt.block_on(awaited).unwrap(), vec![0, 0, 0, 1]);

        let pending = client.call_async(procs::DOMAIN_GET_INFO, &[]);
        read_packet(&mut theirs).unwrap().unwrap();
        drop(theirs);
        assert!(matches!(rt.block_on(pending), Err(RpcError::Closed)));
        assert!(matches!(
            rt.block_on(client.call_async(1, &[])),
            Err(RpcError::Closed)
        ));
    }

    /// A daemon that stops answering: PINGs after each quiet interval, then the socket is shut
    /// down (the reader's end of file becomes the close event).
    #[test]
    fn keepalive_pings_a_silent_daemon_then_closes() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let shared = Shared::new(ours).unwrap();
        let interval = Duration::from_millis(20);
        let weak = Arc::downgrade(&shared);
        let t = std::thread::spawn(move || keepalive_loop(weak, interval, 2));
        let mut pings = 0;
        while let Some(p) = read_packet(&mut theirs).unwrap() {
            let (h, body) = decode_header(&p).unwrap();
            assert_eq!(
                (h.prog, h.proc_, h.kind),
                (KEEPALIVE_PROGRAM, KEEPALIVE_PING, kind::MESSAGE)
            );
            assert!(body.is_empty());
            pings += 1;
        }
        t.join().unwrap();
        assert!((1..=3).contains(&pings), "{pings} pings before the close");
        assert!(shared.last_rx().elapsed() >= interval * 3);
    }

    /// A daemon that keeps sending (events, PONGs) is never cut off.
    #[test]
    fn keepalive_leaves_a_live_daemon_alone() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let shared = Shared::new(ours).unwrap();
        let interval = Duration::from_millis(20);
        let weak = Arc::downgrade(&shared);
        let t = std::thread::spawn(move || keepalive_loop(weak, interval, 2));
        for _ in 0..15 {
            *shared.last_rx() = Instant::now();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!t.is_finished(), "keepalive gave up on a daemon that talks");
        shared.closing.store(true, Ordering::SeqCst);
        t.join().unwrap();
        drop(theirs);
    }
}
