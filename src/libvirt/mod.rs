//! Blocking libvirt access, behind one type.
//!
//! [`Hypervisor`] owns the connection to the pod's private libvirtd, reconnects after a daemon
//! restart and re-registers the event callbacks. Every method blocks (libvirt is synchronous
//! FFI): async callers go through `tokio::task::spawn_blocking`. Domain handles are looked up
//! per call and never cached, so a reconnect cannot leave a stale handle behind.

pub mod events;
pub mod ffi;

use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

pub use events::{DomainEvent, LifecycleKind};
pub use ffi::RawEvent;

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
}

impl LibvirtError {
    fn call(op: &'static str, e: virt::error::Error) -> Self {
        LibvirtError::Call {
            op,
            code: e.code().to_raw() as i32,
            message: e.message().to_string(),
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
        self.state == sys::VIR_DOMAIN_RUNNING
    }
    pub fn is_shut_off(&self) -> bool {
        self.state == sys::VIR_DOMAIN_SHUTOFF
    }

    /// Why a shut-off domain stopped, from the state's reason (`virDomainShutoffReason`).
    pub fn stop_reason(&self) -> events::StopReason {
        use events::StopReason as R;
        match self.reason as u32 {
            sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => R::Shutdown,
            sys::VIR_DOMAIN_SHUTOFF_DESTROYED => R::Destroyed,
            sys::VIR_DOMAIN_SHUTOFF_CRASHED => R::Crashed,
            sys::VIR_DOMAIN_SHUTOFF_MIGRATED => R::Migrated,
            sys::VIR_DOMAIN_SHUTOFF_SAVED => R::Saved,
            sys::VIR_DOMAIN_SHUTOFF_FAILED => R::Failed,
            sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT => R::FromSnapshot,
            _ => R::Unknown,
        }
    }
    pub fn name(&self) -> &'static str {
        events::state_name(self.state)
    }
}

static EVENT_LOOP: Once = Once::new();

/// Starts libvirt's default event loop on a dedicated OS thread, once per process. It must run
/// before the first connection is opened, or no event callback ever fires.
pub fn start_event_loop() -> Result<(), LibvirtError> {
    let mut result = Ok(());
    EVENT_LOOP.call_once(|| {
        // libvirt prints every error to stderr unless told not to; we report errors ourselves.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            result = Err(LibvirtError::call("event_register_default_impl", e));
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!(error = %e, "libvirt event loop iteration failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| {
                result = Err(LibvirtError::Call {
                    op: "spawn event thread",
                    code: -1,
                    message: e.to_string(),
                })
            });
    });
    result
}

/// The connection to the pod's libvirtd.
pub struct Hypervisor {
    uri: String,
    conn: Mutex<Option<Connect>>,
    events: UnboundedSender<RawEvent>,
}

impl Hypervisor {
    /// Connects to `uri` and registers the event callbacks, which send into `events`.
    pub fn connect(uri: &str, events: UnboundedSender<RawEvent>) -> Result<Self, LibvirtError> {
        start_event_loop()?;
        let hv = Hypervisor {
            uri: uri.to_string(),
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
        let conn = Connect::open(Some(&self.uri)).map_err(|e| LibvirtError::call("connect", e))?;
        ffi::register_domain_events(&conn, &self.events)
            .map_err(|e| LibvirtError::call("register events", e))?;
        // Keepalive lets libvirt notice a dead daemon within a few seconds even when idle.
        let _ = conn.set_keep_alive(2, 3);
        let old = self.lock().replace(conn);
        drop_quietly(old);
        Ok(())
    }

    /// Forgets the current connection (it is known to be broken).
    pub fn disconnect(&self) {
        let old = self.lock().take();
        drop_quietly(old);
    }

    pub fn is_connected(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|c| c.is_alive().unwrap_or(false))
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connect>> {
        // A panic while holding the lock cannot leave the Option inconsistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection without holding the lock during the call: the connection
    /// is referenced (virConnectRef) and released after, so a long call (a migration) never
    /// blocks other calls or a reconnect.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let conn = self
            .lock()
            .as_ref()
            .ok_or(LibvirtError::Disconnected)?
            .clone();
        let result = f(&conn);
        ffi::close_connection(conn);
        result
    }

    fn with_domain<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Domain) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        self.with_conn(|c| {
            let dom = c.lookup_domain_by_name(name).map_err(|e| {
                if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN {
                    LibvirtError::NoDomain(name.to_string())
                } else {
                    LibvirtError::call("lookup domain", e)
                }
            })?;
            f(&dom)
        })
    }

    /// Defines the domain persistently and starts it (KubeVirt's define+create).
    pub fn define_and_start(&self, xml: &str) -> Result<(), LibvirtError> {
        self.with_conn(|c| {
            let dom = c
                .define_domain_xml(xml)
                .map_err(|e| LibvirtError::call("define domain", e))?;
            if let Err(e) = dom.create() {
                let err = LibvirtError::call("start domain", e);
                // Leave nothing defined behind a failed start.
                let _ = dom.undefine();
                return Err(err);
            }
            Ok(())
        })
    }

    pub fn state(&self, name: &str) -> Result<DomainState, LibvirtError> {
        self.with_domain(name, |d| {
            let (state, reason) =
                ffi::domain_state(d).map_err(|e| LibvirtError::call("domain state", e))?;
            Ok(DomainState { state, reason })
        })
    }

    /// Presses the ACPI power button. Never the guest agent: an agent shutdown can block for a
    /// minute in guests without an agent, longer than the pod's grace period.
    pub fn shutdown_acpi(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .map_err(|e| LibvirtError::call("shutdown (ACPI)", e))
        })
    }

    /// Hard power-off.
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.destroy().map_err(|e| LibvirtError::call("destroy", e))
        })
    }

    /// Removes the persistent definition (the domain may be running or not).
    pub fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.undefine().map_err(|e| LibvirtError::call("undefine", e))
        })
    }

    pub fn pause(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.suspend().map_err(|e| LibvirtError::call("pause", e))
        })
    }

    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.resume().map_err(|e| LibvirtError::call("resume", e))
        })
    }

    pub fn reboot(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
                .map_err(|e| LibvirtError::call("reboot", e))
        })
    }

    /// The live domain XML.
    pub fn xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.with_domain(name, |d| {
            d.xml_desc(0).map_err(|e| LibvirtError::call("dumpxml", e))
        })
    }

    /// The live domain XML in the form a migration destination accepts.
    pub fn migratable_xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.with_domain(name, |d| {
            d.xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE)
                .map_err(|e| LibvirtError::call("dumpxml (migratable)", e))
        })
    }

    /// Peer-to-peer live migration to `dest_uri`; blocks until it ends.
    pub fn migrate(
        &self,
        name: &str,
        dest_uri: &str,
        params: virt::domain::MigrateParameters,
        flags: u32,
    ) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.migrate_to_uri3(Some(dest_uri), params, flags)
                .map_err(|e| LibvirtError::call("migrate", e))
        })
    }

    /// Statistics of the running job (or, with `completed`, of the last completed one).
    pub fn job_stats(&self, name: &str, completed: bool) -> Result<ffi::JobStats, LibvirtError> {
        self.with_domain(name, |d| {
            ffi::job_stats(d, completed).map_err(|e| LibvirtError::call("job stats", e))
        })
    }

    pub fn abort_job(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            ffi::abort_job(d).map_err(|e| LibvirtError::call("abort job", e))
        })
    }

    pub fn start_post_copy(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            ffi::start_post_copy(d).map_err(|e| LibvirtError::call("switch to post-copy", e))
        })
    }

    pub fn set_max_downtime(&self, name: &str, ms: u64) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.migrate_set_max_downtime(ms, 0)
                .map_err(|e| LibvirtError::call("set max downtime", e))
        })
    }

    /// Whether the domain is defined.
    pub fn exists(&self, name: &str) -> Result<bool, LibvirtError> {
        match self.with_domain(name, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(LibvirtError::NoDomain(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Attaches a device to the running domain and its persistent definition.
    pub fn attach_device(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        let flags = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;
        self.with_domain(name, |d| {
            d.attach_device_flags(xml, flags)
                .map_err(|e| LibvirtError::call("attach device", e))
        })
    }

    /// Asks for a device's removal from the running domain and its definition. Returns when
    /// QEMU accepted the request; the removal itself completes when the guest acknowledges it
    /// (a DEVICE_REMOVED event).
    pub fn detach_device(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        let flags = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;
        self.with_domain(name, |d| {
            d.detach_device_flags(xml, flags)
                .map_err(|e| LibvirtError::call("detach device", e))
        })
    }

    /// Resizes a disk of the running domain to `bytes`.
    pub fn block_resize(&self, name: &str, target: &str, bytes: u64) -> Result<(), LibvirtError> {
        self.with_domain(name, |d| {
            d.block_resize(target, bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                .map_err(|e| LibvirtError::call("block resize", e))
        })
    }

    /// The capacity of a disk as the running domain sees it, in bytes.
    pub fn block_capacity(&self, name: &str, target: &str) -> Result<u64, LibvirtError> {
        self.with_domain(name, |d| {
            d.block_info(target, 0)
                .map(|i| i.capacity)
                .map_err(|e| LibvirtError::call("block info", e))
        })
    }

    pub fn fs_freeze(&self, name: &str) -> Result<i32, LibvirtError> {
        self.with_domain(name, |d| {
            ffi::fs_freeze(d).map_err(|e| LibvirtError::call("freeze filesystems", e))
        })
    }

    pub fn fs_thaw(&self, name: &str) -> Result<i32, LibvirtError> {
        self.with_domain(name, |d| {
            ffi::fs_thaw(d).map_err(|e| LibvirtError::call("thaw filesystems", e))
        })
    }

    /// CPU time, memory and balloon figures, and per-disk I/O for `targets`.
    pub fn stats(&self, name: &str, targets: &[String]) -> Result<DomainStats, LibvirtError> {
        self.with_domain(name, |d| {
            let info = d.info().map_err(|e| LibvirtError::call("domain info", e))?;
            let mut s = DomainStats {
                cpu_time_ns: info.cpu_time,
                memory_kib: info.memory,
                max_memory_kib: info.max_mem,
                ..DomainStats::default()
            };
            if let Ok(mem) = d.memory_stats(0) {
                for m in mem {
                    match m.tag {
                        sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => s.balloon_actual_kib = m.val,
                        sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => s.balloon_unused_kib = m.val,
                        sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => s.balloon_available_kib = m.val,
                        sys::VIR_DOMAIN_MEMORY_STAT_RSS => s.rss_kib = m.val,
                        _ => {}
                    }
                }
            }
            for t in targets {
                if let Ok(b) = d.block_stats(t) {
                    s.disks.push(BlockIo {
                        target: t.clone(),
                        read_bytes: b.rd_bytes,
                        write_bytes: b.wr_bytes,
                        read_requests: b.rd_req,
                        write_requests: b.wr_req,
                        errors: b.errs,
                    });
                }
            }
            Ok(s)
        })
    }

    /// libvirt's and QEMU's versions, as "major.minor.micro".
    pub fn versions(&self) -> Result<(String, String), LibvirtError> {
        self.with_conn(|c| {
            let lib = c
                .lib_version()
                .map_err(|e| LibvirtError::call("libvirt version", e))?;
            let hyp = c
                .hyp_version()
                .map_err(|e| LibvirtError::call("hypervisor version", e))?;
            Ok((version_string(lib), version_string(hyp)))
        })
    }
}

fn version_string(v: u32) -> String {
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

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// `virt`'s `Drop` for `Connect` panics when closing fails (a dead daemon); closing a broken
/// connection is not worth a panic, so close explicitly and ignore the outcome.
fn drop_quietly(conn: Option<Connect>) {
    if let Some(c) = conn {
        ffi::close_connection(c);
    }
}
