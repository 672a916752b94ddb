//! The only `unsafe` in the crate: libvirt calls the `virt` crate does not wrap.
//!
//! - domain event callbacks (`virConnectDomainEventRegisterAny`) and the connection close
//!   callback, which deliver [`RawEvent`]s into a channel;
//! - job abort and post-copy switch, which `virt` 0.5 does not expose.
//!
//! Every callback only copies its arguments into owned Rust values and sends them; no libvirt
//! call is made from inside a callback (libvirt forbids re-entrant calls there).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// An event exactly as libvirt reported it, with strings copied out of libvirt's memory.
#[derive(Debug, Clone, PartialEq)]
pub enum RawEvent {
    Lifecycle {
        domain: String,
        event: i32,
        detail: i32,
    },
    Reboot {
        domain: String,
    },
    Watchdog {
        domain: String,
        action: i32,
    },
    IoError {
        domain: String,
        src_path: String,
        alias: String,
        action: i32,
        reason: String,
    },
    DeviceRemoved {
        domain: String,
        alias: String,
    },
    DeviceRemovalFailed {
        domain: String,
        alias: String,
    },
    JobCompleted {
        domain: String,
        /// The finished job's statistics (a migration's downtime, total time, data).
        stats: Vec<(String, f64)>,
    },
    AgentLifecycle {
        domain: String,
        state: i32,
        reason: i32,
    },
    ConnectionClosed {
        reason: i32,
    },
}

type Sender = UnboundedSender<RawEvent>;

/// Copy a C string owned by libvirt into a `String`; NULL becomes empty.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the duration of the call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-NULL and NUL-terminated per this function's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call (libvirt guarantees this
/// for the domain argument of an event callback).
unsafe fn dom_name(dom: sys::virDomainPtr) -> String {
    // SAFETY: `dom` is valid; virDomainGetName returns a string owned by `dom` (not to be freed).
    unsafe { owned(sys::virDomainGetName(dom)) }
}

/// # Safety
/// `opaque` must be the `Box<Sender>` pointer registered by [`register_domain_events`],
/// which stays alive until libvirt calls [`free_sender`].
unsafe fn send(opaque: *mut c_void, ev: RawEvent) {
    // SAFETY: per contract `opaque` points to a live `Sender`; we only take a shared reference.
    let tx = unsafe { &*(opaque as *const Sender) };
    // A closed receiver means the launcher is shutting down; dropping the event is correct.
    let _ = tx.send(ev);
}

unsafe extern "C" fn on_lifecycle(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes a valid domain and our registered opaque pointer.
    unsafe {
        let domain = dom_name(dom);
        send(
            opaque,
            RawEvent::Lifecycle {
                domain,
                event,
                detail,
            },
        )
    }
}

unsafe extern "C" fn on_reboot(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    unsafe {
        let domain = dom_name(dom);
        send(opaque, RawEvent::Reboot { domain })
    }
}

unsafe extern "C" fn on_watchdog(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    action: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    unsafe {
        let domain = dom_name(dom);
        send(opaque, RawEvent::Watchdog { domain, action })
    }
}

unsafe extern "C" fn on_io_error(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    src_path: *const c_char,
    alias: *const c_char,
    action: c_int,
    reason: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`; the strings are valid for the callback's duration.
    unsafe {
        let ev = RawEvent::IoError {
            domain: dom_name(dom),
            src_path: owned(src_path),
            alias: owned(alias),
            action,
            reason: owned(reason),
        };
        send(opaque, ev)
    }
}

unsafe extern "C" fn on_device_removed(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_io_error`.
    unsafe {
        let ev = RawEvent::DeviceRemoved {
            domain: dom_name(dom),
            alias: owned(alias),
        };
        send(opaque, ev)
    }
}

unsafe extern "C" fn on_device_removal_failed(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_io_error`.
    unsafe {
        let ev = RawEvent::DeviceRemovalFailed {
            domain: dom_name(dom),
            alias: owned(alias),
        };
        send(opaque, ev)
    }
}

unsafe extern "C" fn on_job_completed(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    params: sys::virTypedParameterPtr,
    nparams: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`; libvirt passes `nparams` valid parameters, which we copy
    // (they are libvirt's to free).
    unsafe {
        let domain = dom_name(dom);
        let stats = numeric_params(params, nparams);
        send(opaque, RawEvent::JobCompleted { domain, stats })
    }
}

unsafe extern "C" fn on_agent_lifecycle(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    unsafe {
        let domain = dom_name(dom);
        send(
            opaque,
            RawEvent::AgentLifecycle {
                domain,
                state,
                reason,
            },
        )
    }
}

unsafe extern "C" fn on_close(_c: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is our registered sender.
    unsafe { send(opaque, RawEvent::ConnectionClosed { reason }) }
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw` in `boxed_sender`; libvirt calls this exactly
    // once per registration, after the last callback for it.
    drop(unsafe { Box::from_raw(opaque as *mut Sender) });
}

fn boxed_sender(tx: &Sender) -> *mut c_void {
    Box::into_raw(Box::new(tx.clone())) as *mut c_void
}

/// Registers every domain event the launcher follows, for all domains on `conn`, plus the
/// connection close callback. Returns the callback ids (for deregistration).
pub fn register_domain_events(
    conn: &Connect,
    tx: &Sender,
) -> Result<Vec<c_int>, virt::error::Error> {
    // Each callback type is transmuted to the generic callback type, as libvirt's
    // VIR_DOMAIN_EVENT_CALLBACK macro does in C.
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    // SAFETY (all transmutes below): libvirt calls each callback with the exact signature that
    // its event id documents, which is the signature of the function we pass for that id.
    let table: [(c_uint, Generic); 8] = unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                std::mem::transmute::<*const (), Generic>(on_lifecycle as *const ()),
            ),
            (sys::VIR_DOMAIN_EVENT_ID_REBOOT, on_reboot as Generic),
            (
                sys::VIR_DOMAIN_EVENT_ID_WATCHDOG,
                std::mem::transmute::<*const (), Generic>(on_watchdog as *const ()),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
                std::mem::transmute::<*const (), Generic>(on_io_error as *const ()),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                std::mem::transmute::<*const (), Generic>(on_device_removed as *const ()),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                std::mem::transmute::<*const (), Generic>(on_device_removal_failed as *const ()),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                std::mem::transmute::<*const (), Generic>(on_job_completed as *const ()),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                std::mem::transmute::<*const (), Generic>(on_agent_lifecycle as *const ()),
            ),
        ]
    };
    let mut ids = Vec::with_capacity(table.len());
    for (id, cb) in table {
        let opaque = boxed_sender(tx);
        // SAFETY: `conn` is a live connection; a NULL domain means "all domains"; `opaque` is a
        // fresh Box that libvirt owns from here and frees through `free_sender`.
        let rc = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id as c_int,
                Some(cb),
                opaque,
                Some(free_sender),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not take ownership of `opaque`.
            drop(unsafe { Box::from_raw(opaque as *mut Sender) });
            return Err(virt::error::Error::last_error());
        }
        ids.push(rc);
    }
    let opaque = boxed_sender(tx);
    // SAFETY: as above, for the close callback.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(
            conn.as_ptr(),
            Some(on_close),
            opaque,
            Some(free_sender),
        )
    };
    if rc < 0 {
        // SAFETY: not registered, so still ours to free.
        drop(unsafe { Box::from_raw(opaque as *mut Sender) });
        return Err(virt::error::Error::last_error());
    }
    Ok(ids)
}

/// Aborts the domain's current job (a migration), `virDomainAbortJob`.
pub fn abort_job(dom: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `dom` is a live domain handle for the duration of the call.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Switches a running migration to post-copy, `virDomainMigrateStartPostCopy`.
pub fn start_post_copy(dom: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `dom` is a live domain handle for the duration of the call.
    if unsafe { sys::virDomainMigrateStartPostCopy(dom.as_ptr(), 0) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Closes a connection without `virt`'s panicking `Drop` (which panics if the close fails, as it
/// can for a connection whose daemon died).
pub fn close_connection(conn: Connect) {
    // SAFETY: we take the pointer and forget the wrapper, so the reference is released exactly
    // once, here; the return value (remaining references or -1) needs no action.
    unsafe {
        let ptr = conn.as_ptr();
        std::mem::forget(conn);
        sys::virConnectClose(ptr);
    }
}

/// The domain's state and reason (`virDomainGetState`); `virt`'s wrapper ignores failures.
pub fn domain_state(dom: &Domain) -> Result<(u32, i32), virt::error::Error> {
    let (mut state, mut reason): (c_int, c_int) = (-1, -1);
    // SAFETY: `dom` is live; both out-pointers point to initialised locals.
    if unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok((state as u32, reason))
}

/// Freezes all guest filesystems through the guest agent (`virDomainFSFreeze`); returns how
/// many were frozen.
pub fn fs_freeze(dom: &Domain) -> Result<i32, virt::error::Error> {
    // SAFETY: `dom` is live; a NULL mountpoint list with count 0 means "all filesystems".
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(n)
}

/// Thaws all guest filesystems (`virDomainFSThaw`); returns how many were thawed.
pub fn fs_thaw(dom: &Domain) -> Result<i32, virt::error::Error> {
    // SAFETY: as in `fs_freeze`.
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(n)
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

/// Reads numeric typed parameters into owned pairs.
///
/// # Safety
/// `params` must point to `n` initialised typed parameters (or be NULL with `n` 0).
unsafe fn numeric_params(params: sys::virTypedParameterPtr, n: c_int) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: `i < n` and the caller guarantees `n` valid entries.
        let p = unsafe { &*params.add(i) };
        // SAFETY: `field` is a NUL-terminated array libvirt filled.
        let name = unsafe { CStr::from_ptr(p.field.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the union member read matches the type tag.
        let v = unsafe {
            match p.type_ as u32 {
                sys::VIR_TYPED_PARAM_INT => p.value.i as f64,
                sys::VIR_TYPED_PARAM_UINT => p.value.ui as f64,
                sys::VIR_TYPED_PARAM_LLONG => p.value.l as f64,
                sys::VIR_TYPED_PARAM_ULLONG => p.value.ul as f64,
                sys::VIR_TYPED_PARAM_DOUBLE => p.value.d,
                _ => continue,
            }
        };
        out.push((name, v));
    }
    out
}

/// `virDomainGetJobStats`, freeing libvirt's array (the `virt` wrapper aborts the process
/// when no job is active).
pub fn job_stats(dom: &Domain, completed: bool) -> Result<JobStats, virt::error::Error> {
    let mut job_type: c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: c_int = 0;
    let flags = if completed {
        sys::VIR_DOMAIN_JOB_STATS_COMPLETED | sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    } else {
        0
    };
    // SAFETY: `dom` is live; the out-pointers point to initialised locals.
    let rc = unsafe {
        sys::virDomainGetJobStats(dom.as_ptr(), &mut job_type, &mut params, &mut n, flags)
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: libvirt returned `n` parameters at `params` (NULL when 0).
    let fields = unsafe { numeric_params(params, n) };
    // SAFETY: `params`/`n` came from libvirt and are freed exactly once.
    unsafe { sys::virTypedParamsFree(params, n) };
    Ok(JobStats { job_type, fields })
}
