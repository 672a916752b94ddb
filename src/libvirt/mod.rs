//! Blocking libvirt access, behind one type.
//!
//! [`Hypervisor`] owns the connection to the pod's private libvirtd, reconnects after a daemon
//! restart and re-registers the event callbacks. It speaks libvirt's remote RPC protocol itself
//! ([`rpc`], [`xdr`]) over the daemon's unix socket, so the launcher does not link libvirt's C
//! client library (nor its fifty-odd shared dependencies). Every method blocks its caller
//! (async callers go through `tokio::task::spawn_blocking`) except the few `async` ones on a
//! hot-plug Sync's path, which await the reply on the runtime. Domain handles are kept per
//! connection, so a reconnect cannot leave a stale handle behind.

pub mod consts;
pub mod events;
pub mod rpc;
pub mod xdr;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

pub use consts::*;
pub use events::{DomainEvent, LifecycleKind, RawEvent};
use rpc::{procs, Client, RpcError};
use xdr::{Decoder, Encoder, RemoteDomain, TypedParam, TypedValue, XdrError};

/// A libvirt failure, with what we were doing and libvirt's own code and message.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt {op}: {message} (code {code})")]
    Call {
        op: &'static str,
        code: i32,
        message: String,
    },
    #[error("not connected to libvirtd (reconnecting)")]
    Disconnected,
    #[error("domain {0} does not exist")]
    NoDomain(String),
    /// libvirtd accepts connections but answers nothing (hung, or stopped).
    #[error("libvirtd {op}: {source}")]
    Hung { op: &'static str, source: RpcError },
}

impl LibvirtError {
    fn call(op: &'static str, e: RpcError) -> Self {
        match e {
            RpcError::Remote(r) => LibvirtError::Call {
                op,
                code: r.code,
                message: r.message,
            },
            // The connection broke under the call: the supervisor reconnects.
            RpcError::Closed | RpcError::Io(_) => LibvirtError::Disconnected,
            e @ RpcError::Timeout(_) => LibvirtError::Hung { op, source: e },
            e @ (RpcError::Protocol(_) | RpcError::Decode(_)) => LibvirtError::Call {
                op,
                code: VIR_ERR_RPC,
                message: e.to_string(),
            },
        }
    }

    /// libvirt's error number, when the error came from libvirt.
    pub fn code(&self) -> Option<i32> {
        match self {
            LibvirtError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The domain's state as libvirt reports it (`virDomainState`), with its reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    pub state: u32,
    pub reason: i32,
}

impl DomainState {
    pub fn is_running(&self) -> bool {
        self.state == VIR_DOMAIN_RUNNING
    }
    pub fn is_shut_off(&self) -> bool {
        self.state == VIR_DOMAIN_SHUTOFF
    }

    /// Why a shut-off domain stopped, from the state's reason (`virDomainShutoffReason`).
    pub fn stop_reason(&self) -> events::StopReason {
        use events::StopReason as R;
        match self.reason as u32 {
            VIR_DOMAIN_SHUTOFF_SHUTDOWN => R::Shutdown,
            VIR_DOMAIN_SHUTOFF_DESTROYED => R::Destroyed,
            VIR_DOMAIN_SHUTOFF_CRASHED => R::Crashed,
            VIR_DOMAIN_SHUTOFF_MIGRATED => R::Migrated,
            VIR_DOMAIN_SHUTOFF_SAVED => R::Saved,
            VIR_DOMAIN_SHUTOFF_FAILED => R::Failed,
            VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT => R::FromSnapshot,
            _ => R::Unknown,
        }
    }
    pub fn name(&self) -> &'static str {
        events::state_name(self.state)
    }
}

/// A job's statistics: libvirt's typed parameters by name (numbers as f64).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobStats {
    /// `virDomainJobType`: 0 none, 1 bounded, 2 unbounded, 3 completed, 4 failed, 5 cancelled.
    pub job_type: i32,
    pub fields: Vec<(String, f64)>,
}

impl JobStats {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// The parameters of a migration (`VIR_MIGRATE_PARAM_*`); `None` leaves libvirt's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrateParams {
    /// Where QEMU sends the memory (`migrate_uri`).
    pub uri: Option<String>,
    /// The domain XML the destination defines (`destination_xml`).
    pub dest_xml: Option<String>,
    /// MiB/s (`bandwidth`).
    pub bandwidth: Option<u64>,
    /// `parallel.connections`, with `VIR_MIGRATE_PARALLEL`.
    pub parallel_connections: Option<i32>,
    /// Where the disks' data goes in a block migration (`disks_uri`).
    pub disks_uri: Option<String>,
    /// The disks (targets) to copy in a block migration (`migrate_disks`, repeated).
    pub migrate_disks: Vec<String>,
}

impl MigrateParams {
    fn typed(&self) -> Vec<TypedParam> {
        let mut p = Vec::new();
        let s = |v: &str| TypedValue::String(v.to_string());
        if let Some(v) = &self.uri {
            p.push(TypedParam::new(VIR_MIGRATE_PARAM_URI, s(v)));
        }
        if let Some(v) = &self.dest_xml {
            p.push(TypedParam::new(VIR_MIGRATE_PARAM_DEST_XML, s(v)));
        }
        if let Some(v) = self.bandwidth {
            p.push(TypedParam::new(
                VIR_MIGRATE_PARAM_BANDWIDTH,
                TypedValue::ULLong(v),
            ));
        }
        if let Some(v) = self.parallel_connections {
            p.push(TypedParam::new(
                VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS,
                TypedValue::Int(v),
            ));
        }
        if let Some(v) = &self.disks_uri {
            p.push(TypedParam::new(VIR_MIGRATE_PARAM_DISKS_URI, s(v)));
        }
        for d in &self.migrate_disks {
            p.push(TypedParam::new(VIR_MIGRATE_PARAM_MIGRATE_DISKS, s(d)));
        }
        p
    }
}

/// Where a libvirt URI points: the daemon's socket, and the name to open there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    socket: PathBuf,
    name: String,
}

/// Parses `driver[+unix]:///path[?socket=<path>]`, the only form the launcher uses (its own
/// daemon's unix socket). The name opened on the daemon is the URI without the transport and
/// the client-side parameters, as libvirt's remote driver sends it (`qemu:///system`).
fn parse_uri(uri: &str) -> Result<Target, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| format!("{uri:?} is not a libvirt URI"))?;
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if !matches!(transport, None | Some("unix")) {
        return Err(format!("{uri:?}: only the unix transport is supported"));
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(format!(
            "{uri:?}: a host is not supported with the unix transport"
        ));
    }
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "socket" {
            socket = Some(PathBuf::from(percent_decode(v)));
        }
    }
    let socket = socket.unwrap_or_else(|| PathBuf::from("/var/run/libvirt/libvirt-sock"));
    Ok(Target {
        socket,
        name: format!("{driver}://{path}"),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| (c as char).to_digit(16);
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a call's arguments, makes the call and decodes its reply (which must be consumed
/// exactly).
fn rpc<T>(
    c: &Client,
    op: &'static str,
    proc_: i32,
    args: impl FnOnce(&mut Encoder),
    ret: impl FnOnce(&mut Decoder<'_>) -> Result<T, XdrError>,
) -> Result<T, LibvirtError> {
    let mut e = Encoder::new();
    args(&mut e);
    decode_reply(op, c.call(proc_, &e.into_bytes()), ret)
}

/// A reply's body decoded by `ret`, all of it.
fn decode_reply<T>(
    op: &'static str,
    reply: Result<Vec<u8>, RpcError>,
    ret: impl FnOnce(&mut Decoder<'_>) -> Result<T, XdrError>,
) -> Result<T, LibvirtError> {
    let body = reply.map_err(|err| LibvirtError::call(op, err))?;
    let mut d = Decoder::new(&body);
    ret(&mut d)
        .and_then(|v| d.finish().map(|()| v))
        .map_err(|err| LibvirtError::call(op, err.into()))
}

/// A reply with no body.
fn void(_: &mut Decoder<'_>) -> Result<(), XdrError> {
    Ok(())
}

/// A call on a domain with no reply body: `{dom}` or `{dom, flags}` and more.
fn dom_call(
    c: &Client,
    dom: &RemoteDomain,
    op: &'static str,
    proc_: i32,
    rest: impl FnOnce(&mut Encoder),
) -> Result<(), LibvirtError> {
    rpc(
        c,
        op,
        proc_,
        |e| {
            dom.encode(e);
            rest(e);
        },
        void,
    )
}

/// Keepalive of the connection to libvirtd: a PING after 2 s of silence, the connection given
/// up after 8 s without any packet (what `virConnectSetKeepAlive(2, 3)` did before).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_COUNT: u32 = 3;

/// One open connection and the domain handles looked up on it.
struct Connection {
    client: Client,
    domains: Mutex<HashMap<String, RemoteDomain>>,
}

impl Connection {
    fn domains(&self) -> MutexGuard<'_, HashMap<String, RemoteDomain>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// libvirt's NO_DOMAIN as our own error.
fn no_domain(e: LibvirtError, name: &str) -> LibvirtError {
    match e {
        LibvirtError::Call { code, .. } if code == VIR_ERR_NO_DOMAIN => {
            LibvirtError::NoDomain(name.to_string())
        }
        e => e,
    }
}

/// The connection to the pod's libvirtd.
pub struct Hypervisor {
    uri: String,
    target: Result<Target, String>,
    conn: Mutex<Option<Arc<Connection>>>,
    events: UnboundedSender<RawEvent>,
}

impl Hypervisor {
    /// Connects to `uri` and registers the event callbacks, which send into `events`.
    pub fn connect(uri: &str, events: UnboundedSender<RawEvent>) -> Result<Self, LibvirtError> {
        let hv = Hypervisor {
            uri: uri.to_string(),
            target: parse_uri(uri),
            conn: Mutex::new(None),
            events,
        };
        hv.reconnect()?;
        Ok(hv)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Opens a fresh connection (after a daemon restart) and re-registers the callbacks.
    pub fn reconnect(&self) -> Result<(), LibvirtError> {
        let target = self.target.as_ref().map_err(|e| LibvirtError::Call {
            op: "connect",
            code: VIR_ERR_INTERNAL_ERROR,
            message: e.clone(),
        })?;
        let failed = |e: RpcError| match e {
            RpcError::Io(e) => LibvirtError::Call {
                op: "connect",
                code: VIR_ERR_SYSTEM_ERROR,
                message: format!(
                    "Failed to connect socket to '{}': {e}",
                    target.socket.display()
                ),
            },
            e => LibvirtError::call("connect", e),
        };
        let client = Client::connect(&target.socket, self.events.clone()).map_err(failed)?;
        client.open(&target.name).map_err(failed)?;
        // Keepalive: a hung daemon (not only a dead one) ends the connection within seconds.
        match client.start_keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
            Ok(true) => {}
            Ok(false) => tracing::warn!("libvirtd does not support keepalive"),
            Err(e @ RpcError::Timeout(_)) => return Err(LibvirtError::call("keepalive", e)),
            Err(e) => tracing::warn!(error = %e, "could not start keepalive"),
        }
        register_domain_events(&client)?;
        let old = self.lock().replace(Arc::new(Connection {
            client,
            domains: Mutex::new(HashMap::new()),
        }));
        // Dropping the old connection closes it once no call uses it any more.
        drop(old);
        Ok(())
    }

    /// Forgets the current connection (it is known to be broken).
    pub fn disconnect(&self) {
        let old = self.lock().take();
        drop(old);
    }

    pub fn is_connected(&self) -> bool {
        self.lock().as_ref().is_some_and(|c| c.client.is_open())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<Connection>>> {
        // A panic while holding the lock cannot leave the Option inconsistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection without holding the lock during the call, so a long call (a
    /// migration) never blocks other calls or a reconnect.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let conn = self.connection()?;
        f(&conn.client)
    }

    fn connection(&self) -> Result<Arc<Connection>, LibvirtError> {
        self.lock()
            .as_ref()
            .cloned()
            .ok_or(LibvirtError::Disconnected)
    }

    /// Runs `f` with the domain's handle. The handle (name, UUID, id) is looked up once per
    /// connection and kept (one round trip less per call): the daemon finds a domain by its
    /// UUID, so a kept handle stays good while the domain exists. When a call with a kept
    /// handle says NO_DOMAIN, the handle is dropped and the call made once more with a fresh
    /// lookup, so a domain defined again (a new UUID) is never reported missing.
    fn with_domain<T>(
        &self,
        name: &str,
        f: impl Fn(&Client, &RemoteDomain) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let conn = self.connection()?;
        let c = &conn.client;
        let kept = conn.domains().get(name).cloned();
        if let Some(d) = kept {
            match f(c, &d).map_err(|e| no_domain(e, name)) {
                Err(LibvirtError::NoDomain(_)) => {
                    conn.domains().remove(name);
                }
                r => return r,
            }
        }
        let d = rpc(
            c,
            "lookup domain",
            procs::DOMAIN_LOOKUP_BY_NAME,
            |e| {
                e.string(name);
            },
            RemoteDomain::decode,
        )
        .map_err(|e| no_domain(e, name))?;
        conn.domains().insert(name.to_string(), d.clone());
        f(c, &d).map_err(|e| {
            let e = no_domain(e, name);
            if matches!(e, LibvirtError::NoDomain(_)) {
                conn.domains().remove(name);
            }
            e
        })
    }

    /// [`Hypervisor::with_domain`] and [`dom_call`] for a task on the async runtime: the call
    /// is awaited ([`Client::call_async`]) with no blocking thread in between. For the calls on
    /// a hot-plug Sync's path, where the hand-offs to a blocking thread and back cost, under
    /// load, about as much as all of the launcher's own work.
    async fn dom_call_async(
        &self,
        name: &str,
        op: &'static str,
        proc_: i32,
        rest: impl Fn(&mut Encoder),
    ) -> Result<(), LibvirtError> {
        let conn = self.connection()?;
        let call = |d: &RemoteDomain| {
            let mut e = Encoder::new();
            d.encode(&mut e);
            rest(&mut e);
            conn.client.call_async(proc_, &e.into_bytes())
        };
        let kept = conn.domains().get(name).cloned();
        if let Some(d) = kept {
            match decode_reply(op, call(&d).await, void).map_err(|e| no_domain(e, name)) {
                Err(LibvirtError::NoDomain(_)) => {
                    conn.domains().remove(name);
                }
                r => return r,
            }
        }
        let mut e = Encoder::new();
        e.string(name);
        let lookup = conn
            .client
            .call_async(procs::DOMAIN_LOOKUP_BY_NAME, &e.into_bytes())
            .await;
        let d = decode_reply("lookup domain", lookup, RemoteDomain::decode)
            .map_err(|e| no_domain(e, name))?;
        conn.domains().insert(name.to_string(), d.clone());
        decode_reply(op, call(&d).await, void).map_err(|e| {
            let e = no_domain(e, name);
            if matches!(e, LibvirtError::NoDomain(_)) {
                conn.domains().remove(name);
            }
            e
        })
    }

    /// Defines the domain persistently and starts it (KubeVirt's define+create).
    pub fn define_and_start(&self, xml: &str) -> Result<(), LibvirtError> {
        self.with_conn(|c| {
            let dom = rpc(
                c,
                "define domain",
                procs::DOMAIN_DEFINE_XML,
                |e| {
                    e.string(xml);
                },
                RemoteDomain::decode,
            )?;
            // virDomainCreate, as libvirt's remote driver sends it (with flags 0).
            let started = rpc(
                c,
                "start domain",
                procs::DOMAIN_CREATE_WITH_FLAGS,
                |e| {
                    dom.encode(e);
                    e.u32(0);
                },
                RemoteDomain::decode,
            );
            if let Err(err) = started {
                // Leave nothing defined behind a failed start.
                let _ = dom_call(c, &dom, "undefine", procs::DOMAIN_UNDEFINE, |_| {});
                return Err(err);
            }
            Ok(())
        })
    }

    pub fn state(&self, name: &str) -> Result<DomainState, LibvirtError> {
        self.with_domain(name, |c, d| {
            rpc(
                c,
                "domain state",
                procs::DOMAIN_GET_STATE,
                |e| {
                    d.encode(e);
                    e.u32(0);
                },
                |r| {
                    Ok(DomainState {
                        state: r.i32()? as u32,
                        reason: r.i32()?,
                    })
                },
            )
        })
    }

    /// Presses the ACPI power button. Never the guest agent: an agent shutdown can block for a
    /// minute in guests without an agent, longer than the pod's grace period.
    pub fn shutdown_acpi(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "shutdown (ACPI)", procs::DOMAIN_SHUTDOWN_FLAGS, |e| {
                e.u32(VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN);
            })
        })
    }

    /// Hard power-off.
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "destroy", procs::DOMAIN_DESTROY, |_| {})
        })
    }

    /// Removes the persistent definition (the domain may be running or not).
    pub fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "undefine", procs::DOMAIN_UNDEFINE, |_| {})
        })
    }

    pub fn pause(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "pause", procs::DOMAIN_SUSPEND, |_| {})
        })
    }

    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "resume", procs::DOMAIN_RESUME, |_| {})
        })
    }

    pub fn reboot(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "reboot", procs::DOMAIN_REBOOT, |e| {
                e.u32(VIR_DOMAIN_REBOOT_ACPI_POWER_BTN);
            })
        })
    }

    /// Hard reset (the reset button): the guest restarts without shutting down.
    pub fn reset(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "reset", procs::DOMAIN_RESET, |e| {
                e.u32(0);
            })
        })
    }

    fn xml_desc(&self, name: &str, op: &'static str, flags: u32) -> Result<String, LibvirtError> {
        self.with_domain(name, |c, d| {
            rpc(
                c,
                op,
                procs::DOMAIN_GET_XML_DESC,
                |e| {
                    d.encode(e);
                    e.u32(flags);
                },
                |r| r.string(),
            )
        })
    }

    /// The live domain XML.
    pub fn xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.xml_desc(name, "dumpxml", 0)
    }

    /// The live domain XML in the form a migration destination accepts.
    pub fn migratable_xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.xml_desc(
            name,
            "dumpxml (migratable)",
            VIR_DOMAIN_XML_MIGRATABLE | VIR_DOMAIN_XML_SECURE,
        )
    }

    /// Peer-to-peer live migration to `dest_uri`; blocks until it ends.
    ///
    /// What `virDomainMigrateToURI3` does for `VIR_MIGRATE_PEER2PEER` against a daemon that
    /// supports extensible parameters: one `MIGRATE_PERFORM3_PARAMS` call to the source
    /// daemon, which then drives the destination itself.
    pub fn migrate(
        &self,
        name: &str,
        dest_uri: &str,
        params: MigrateParams,
        flags: u32,
    ) -> Result<(), LibvirtError> {
        let params = params.typed();
        self.with_domain(name, |c, d| {
            rpc(
                c,
                "migrate",
                procs::DOMAIN_MIGRATE_PERFORM3_PARAMS,
                |e| {
                    d.encode(e);
                    e.opt_string(Some(dest_uri));
                    xdr::encode_typed_params(e, &params);
                    e.opaque(&[]).u32(flags);
                },
                // remote_domain_migrate_perform3_params_ret: the cookie, unused in p2p mode.
                |r| r.opaque(xdr::STRING_MAX, "cookie").map(|_| ()),
            )
        })
    }

    /// Statistics of the running job (or, with `completed`, of the last completed one).
    pub fn job_stats(&self, name: &str, completed: bool) -> Result<JobStats, LibvirtError> {
        let flags = if completed {
            VIR_DOMAIN_JOB_STATS_COMPLETED | VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        } else {
            0
        };
        self.with_domain(name, |c, d| {
            rpc(
                c,
                "job stats",
                procs::DOMAIN_GET_JOB_STATS,
                |e| {
                    d.encode(e);
                    e.u32(flags);
                },
                |r| {
                    let job_type = r.i32()?;
                    let params = xdr::decode_typed_params(r, rpc::JOB_STATS_MAX)?;
                    Ok(JobStats {
                        job_type,
                        fields: xdr::numeric_params(&params),
                    })
                },
            )
        })
    }

    pub fn abort_job(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "abort job", procs::DOMAIN_ABORT_JOB, |_| {})
        })
    }

    pub fn start_post_copy(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(
                c,
                d,
                "switch to post-copy",
                procs::DOMAIN_MIGRATE_START_POST_COPY,
                |e| {
                    e.u32(0);
                },
            )
        })
    }

    pub fn set_max_downtime(&self, name: &str, ms: u64) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(
                c,
                d,
                "set max downtime",
                procs::DOMAIN_MIGRATE_SET_MAX_DOWNTIME,
                |e| {
                    e.u64(ms).u32(0);
                },
            )
        })
    }

    /// The running domain's vCPUs: (online, maximum) (`virDomainGetVcpusFlags` with
    /// `VIR_DOMAIN_AFFECT_LIVE`, and with `VIR_DOMAIN_VCPU_MAXIMUM`).
    pub fn vcpus(&self, name: &str) -> Result<(u32, u32), LibvirtError> {
        self.with_domain(name, |c, d| {
            let get = |op: &'static str, flags: u32| {
                rpc(
                    c,
                    op,
                    procs::DOMAIN_GET_VCPUS_FLAGS,
                    |e| {
                        d.encode(e);
                        e.u32(flags);
                    },
                    |r| r.i32(),
                )
            };
            let current = get("vcpu count", VIR_DOMAIN_AFFECT_LIVE)?;
            let max = get(
                "vcpu count (maximum)",
                VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_VCPU_MAXIMUM,
            )?;
            Ok((current.max(0) as u32, max.max(0) as u32))
        })
    }

    /// Plugs or unplugs vCPUs so that `count` are online, in the running domain and its
    /// definition (`virDomainSetVcpusFlags`, as KubeVirt's `UpdateVCPUs`). An unplug completes
    /// when the guest releases the vCPUs.
    pub fn set_vcpus(&self, name: &str, count: u32) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "set vcpus", procs::DOMAIN_SET_VCPUS_FLAGS, |e| {
                e.u32(count)
                    .u32(VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG);
            })
        })
    }

    /// Whether the domain is defined.
    pub fn exists(&self, name: &str) -> Result<bool, LibvirtError> {
        match self.with_domain(name, |_, _| Ok(())) {
            Ok(()) => Ok(true),
            Err(LibvirtError::NoDomain(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Attaches a device to the running domain and its persistent definition (awaited on the
    /// async runtime: see [`Hypervisor::dom_call_async`]).
    pub async fn attach_device(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        self.dom_call_async(
            name,
            "attach device",
            procs::DOMAIN_ATTACH_DEVICE_FLAGS,
            |e| {
                e.string(xml)
                    .u32(VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG);
            },
        )
        .await
    }

    /// Asks for a device's removal from the running domain and its definition. Returns when
    /// QEMU accepted the request; the removal itself completes when the guest acknowledges it
    /// (a DEVICE_REMOVED event).
    pub fn detach_device(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(
                c,
                d,
                "detach device",
                procs::DOMAIN_DETACH_DEVICE_FLAGS,
                |e| {
                    e.string(xml)
                        .u32(VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG);
                },
            )
        })
    }

    /// Resizes a disk of the running domain to `bytes`.
    pub fn block_resize(&self, name: &str, target: &str, bytes: u64) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "block resize", procs::DOMAIN_BLOCK_RESIZE, |e| {
                e.string(target)
                    .u64(bytes)
                    .u32(VIR_DOMAIN_BLOCK_RESIZE_BYTES);
            })
        })
    }

    /// The capacity of a disk as the running domain sees it, in bytes.
    pub fn block_capacity(&self, name: &str, target: &str) -> Result<u64, LibvirtError> {
        self.with_domain(name, |c, d| {
            rpc(
                c,
                "block info",
                procs::DOMAIN_GET_BLOCK_INFO,
                |e| {
                    d.encode(e);
                    e.string(target).u32(0);
                },
                // remote_domain_get_block_info_ret {allocation, capacity, physical}
                |r| {
                    r.u64()?;
                    let capacity = r.u64()?;
                    r.u64()?;
                    Ok(capacity)
                },
            )
        })
    }

    fn fs_call(&self, name: &str, op: &'static str, proc_: i32) -> Result<i32, LibvirtError> {
        self.with_domain(name, |c, d| {
            rpc(
                c,
                op,
                proc_,
                |e| {
                    d.encode(e);
                    // No mountpoints: all filesystems.
                    e.u32(0).u32(0);
                },
                |r| r.i32(),
            )
        })
    }

    /// Sends one guest-agent command (QMP JSON, `{"execute": ...}`) through libvirt
    /// (`virDomainQemuAgentCommand`) and returns the agent's whole answer (`{"return": ...}`).
    /// `timeout`: seconds to wait for the agent, or one of `VIR_DOMAIN_QEMU_AGENT_COMMAND_*`.
    /// Without a connected agent libvirt fails at once with `VIR_ERR_AGENT_UNRESPONSIVE`.
    pub fn agent_command(
        &self,
        name: &str,
        command: &str,
        timeout: i32,
    ) -> Result<String, LibvirtError> {
        self.with_domain(name, |c, d| {
            let mut e = Encoder::new();
            d.encode(&mut e);
            e.string(command).i32(timeout).u32(0);
            decode_reply(
                "guest agent command",
                c.call_qemu(rpc::qemu_procs::DOMAIN_AGENT_COMMAND, &e.into_bytes()),
                // qemu_domain_agent_command_ret {remote_string result}
                |r| Ok(r.opt_string()?.unwrap_or_default()),
            )
        })
    }

    /// Freezes all guest filesystems through the guest agent; returns how many were frozen.
    pub fn fs_freeze(&self, name: &str) -> Result<i32, LibvirtError> {
        self.fs_call(name, "freeze filesystems", procs::DOMAIN_FSFREEZE)
    }

    /// Starts a backup job (`virDomainBackupBegin`, libvirt 7.2+): in push mode QEMU copies
    /// the point in time of this call of each disk the `<domainbackup>` XML names into its
    /// target while the guest runs on. Returns once the point in time is fixed; the copy is a
    /// job ([`Hypervisor::job_stats`]), which ends with libvirt's job-completed event.
    pub fn backup_begin(&self, name: &str, xml: &str, flags: u32) -> Result<(), LibvirtError> {
        self.with_domain(name, |c, d| {
            dom_call(c, d, "backup begin", procs::DOMAIN_BACKUP_BEGIN, |e| {
                e.string(xml).opt_string(None).u32(flags);
            })
        })
    }

    /// The XML of the backup job running (`virDomainBackupGetXMLDesc`).
    pub fn backup_xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.with_domain(name, |c, d| {
            rpc(
                c,
                "backup dumpxml",
                procs::DOMAIN_BACKUP_GET_XML_DESC,
                |e| {
                    d.encode(e);
                    e.u32(0);
                },
                |r| r.string(),
            )
        })
    }

    /// Thaws all guest filesystems; returns how many were thawed.
    pub fn fs_thaw(&self, name: &str) -> Result<i32, LibvirtError> {
        self.fs_call(name, "thaw filesystems", procs::DOMAIN_FSTHAW)
    }

    /// CPU time, memory and balloon figures, and per-disk I/O for `targets`.
    pub fn stats(&self, name: &str, targets: &[String]) -> Result<DomainStats, LibvirtError> {
        self.with_domain(name, |c, d| {
            // remote_domain_get_info_ret {state, maxMem, memory, nrVirtCpu, cpuTime}
            let mut s = rpc(
                c,
                "domain info",
                procs::DOMAIN_GET_INFO,
                |e| d.encode(e),
                |r| {
                    r.u32()?;
                    let max_memory_kib = r.u64()?;
                    let memory_kib = r.u64()?;
                    r.u32()?;
                    let cpu_time_ns = r.u64()?;
                    Ok(DomainStats {
                        cpu_time_ns,
                        memory_kib,
                        max_memory_kib,
                        ..DomainStats::default()
                    })
                },
            )?;
            // remote_domain_memory_stats_ret {stats<REMOTE_DOMAIN_MEMORY_STATS_MAX>}
            let mem = rpc(
                c,
                "memory stats",
                procs::DOMAIN_MEMORY_STATS,
                |e| {
                    d.encode(e);
                    e.u32(VIR_DOMAIN_MEMORY_STAT_NR).u32(0);
                },
                |r| {
                    let n = r.array_len(1024, "memory stats")?;
                    (0..n)
                        .map(|_| Ok((r.i32()?, r.u64()?)))
                        .collect::<Result<Vec<_>, XdrError>>()
                },
            );
            for (tag, val) in mem.unwrap_or_default() {
                match tag {
                    VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => s.balloon_actual_kib = val,
                    VIR_DOMAIN_MEMORY_STAT_UNUSED => s.balloon_unused_kib = val,
                    VIR_DOMAIN_MEMORY_STAT_AVAILABLE => s.balloon_available_kib = val,
                    VIR_DOMAIN_MEMORY_STAT_RSS => s.rss_kib = val,
                    _ => {}
                }
            }
            for t in targets {
                // remote_domain_block_stats_ret {rd_req, rd_bytes, wr_req, wr_bytes, errs}
                let b = rpc(
                    c,
                    "block stats",
                    procs::DOMAIN_BLOCK_STATS,
                    |e| {
                        d.encode(e);
                        e.string(t);
                    },
                    |r| {
                        let read_requests = r.i64()?;
                        let read_bytes = r.i64()?;
                        let write_requests = r.i64()?;
                        let write_bytes = r.i64()?;
                        Ok(BlockIo {
                            target: t.clone(),
                            read_bytes,
                            write_bytes,
                            read_requests,
                            write_requests,
                            errors: r.i64()?,
                        })
                    },
                );
                if let Ok(b) = b {
                    s.disks.push(b);
                }
            }
            Ok(s)
        })
    }

    /// The domain capabilities of the default emulator for `arch`, `machine` and `virttype`
    /// (`virConnectGetDomainCapabilities`), as XML. On a fresh daemon the first call loads the
    /// emulator's QEMU capabilities (from libvirt's cache, or by probing QEMU): the work a
    /// domain's first define would otherwise wait for.
    pub async fn domain_capabilities(
        &self,
        arch: &str,
        machine: Option<&str>,
        virttype: &str,
    ) -> Result<String, LibvirtError> {
        let conn = self.connection()?;
        let mut e = Encoder::new();
        e.opt_string(None)
            .opt_string(Some(arch))
            .opt_string(machine)
            .opt_string(Some(virttype))
            .u32(0);
        let reply = conn
            .client
            .call_async(procs::CONNECT_GET_DOMAIN_CAPABILITIES, &e.into_bytes())
            .await;
        decode_reply("domain capabilities", reply, |d| d.string())
    }

    /// libvirt's and QEMU's versions, as "major.minor.micro".
    pub fn versions(&self) -> Result<(String, String), LibvirtError> {
        self.with_conn(|c| {
            let lib = rpc(
                c,
                "libvirt version",
                procs::CONNECT_GET_LIB_VERSION,
                |_| {},
                |r| r.u64(),
            )?;
            let hyp = rpc(
                c,
                "hypervisor version",
                procs::CONNECT_GET_VERSION,
                |_| {},
                |r| r.u64(),
            )?;
            Ok((version_string(lib), version_string(hyp)))
        })
    }
}

/// Registers every domain event the launcher follows, for all domains on the connection
/// (`REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY`, no domain). The events arrive
/// on the connection's reader thread, which sends them as [`RawEvent`]s.
fn register_domain_events(c: &Client) -> Result<Vec<i32>, LibvirtError> {
    [
        VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        VIR_DOMAIN_EVENT_ID_REBOOT,
        VIR_DOMAIN_EVENT_ID_WATCHDOG,
        VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
        VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
        VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
        VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
    ]
    .into_iter()
    .map(|id| {
        rpc(
            c,
            "register events",
            procs::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
            |e| {
                e.i32(id).bool(false);
            },
            |r| r.i32(),
        )
    })
    .collect()
}

fn version_string(v: u64) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Figures from `Hypervisor::stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainStats {
    pub cpu_time_ns: u64,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub balloon_actual_kib: u64,
    pub balloon_unused_kib: u64,
    pub balloon_available_kib: u64,
    pub rss_kib: u64,
    pub disks: Vec<BlockIo>,
}

/// One disk's I/O counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockIo {
    pub target: String,
    pub read_bytes: i64,
    pub write_bytes: i64,
    pub read_requests: i64,
    pub write_requests: i64,
    pub errors: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_the_socket_and_the_driver() {
        assert_eq!(
            parse_uri("qemu+unix:///system?socket=/run/pod/sock/libvirt-sock").unwrap(),
            Target {
                socket: "/run/pod/sock/libvirt-sock".into(),
                name: "qemu:///system".into()
            }
        );
        assert_eq!(
            parse_uri("qemu:///system").unwrap(),
            Target {
                socket: "/var/run/libvirt/libvirt-sock".into(),
                name: "qemu:///system".into()
            }
        );
        assert_eq!(
            parse_uri("qemu+unix:///system?mode=legacy&socket=/a%20b/s")
                .unwrap()
                .socket,
            PathBuf::from("/a b/s")
        );
        assert!(parse_uri("qemu+ssh://host/system").is_err());
        assert!(parse_uri("qemu+unix://host/system").is_err());
        assert!(parse_uri("not a uri").is_err());
    }

    #[test]
    fn migrate_params_become_typed_params() {
        let p = MigrateParams {
            uri: Some("unix:///m.sock".into()),
            dest_xml: Some("<domain/>".into()),
            bandwidth: Some(64),
            parallel_connections: Some(4),
            disks_uri: Some("unix:///d.sock".into()),
            migrate_disks: vec!["vda".into(), "vdb".into()],
        };
        let t = p.typed();
        let names: Vec<&str> = t.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            names,
            [
                "migrate_uri",
                "destination_xml",
                "bandwidth",
                "parallel.connections",
                "disks_uri",
                "migrate_disks",
                "migrate_disks"
            ]
        );
        assert_eq!(t[2].value, TypedValue::ULLong(64));
        assert_eq!(t[3].value, TypedValue::Int(4));
        assert!(MigrateParams::default().typed().is_empty());
    }

    #[test]
    fn versions_print_like_libvirt() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(7_002_011), "7.2.11");
    }
}
