//! The one way the launcher starts a process, and the one owner of `waitpid`.
//!
//! The launcher is PID 1 in its pod (or a child subreaper outside one), so orphaned processes —
//! QEMU after a libvirtd crash, helpers of helpers — become its children and must be reaped.
//! Once [`Reaper::start`] has run, a thread reaps every child with `waitpid(-1)`; a process that
//! waited for its own child by pid at the same time would now and then find it already gone
//! ("No child processes"). So every process the launcher starts — daemons, `qemu-img`,
//! `xorrisofs`, `losetup`, decompressors — is started with this module's [`Command`], as in
//! Kata's agent:
//!
//! - one process-wide table of children, behind one lock;
//! - [`Command::spawn`] holds that lock across the fork/exec and the registration of the new
//!   pid, and the reaper reaps only while holding it: a child can never be reaped before its
//!   spawner is registered (nor while `std` collects a child whose `exec` failed);
//! - the status of a registered child goes to its [`Child`] (blocking [`Child::wait`] or async
//!   [`Child::exited`]); the statuses of orphans are logged and dropped.
//!
//! Before the reaper starts (`virt-launcher render`, the standalone import before `run`, unit
//! tests) nothing reaps in the background: a [`Child`] collects its own status by pid, under the
//! same lock. A child started then and waited for after the reaper started is fine either way.
//! Starting the reaper is once per process and cannot be undone.
//!
//! [`Command::run`] (blocking) and [`Command::run_async`] are the one way to run an external
//! tool to completion: stdout and stderr captured, and an error ([`ProcessError`]) that names
//! the tool and says whether it is missing, could not start, or failed (its arguments in short,
//! the exit status and the tail of its stderr). [`Command::output`] is the same without the
//! verdict, for tools whose exit code means more than success (`qemu-img check`).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

pub use std::process::{ChildStderr, ChildStdin, ChildStdout, Stdio};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by this signal (0: a real-time signal, which `nix` cannot name).
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    /// The exit code, if the process exited (rather than being killed).
    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            Exit::Signal(_) => None,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{tool} is missing (not found{})", if .tool.contains('/') { "" } else { " in PATH" })]
    Missing { tool: String },
    #[error("cannot start {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool}{} failed ({exit}){}", prefixed(" ", .args), prefixed(": ", .stderr))]
    Failed {
        tool: String,
        /// The arguments, shortened.
        args: String,
        exit: Exit,
        /// The last lines of its stderr, joined with "; ".
        stderr: String,
    },
    #[error("{tool}: reading its output: {source}")]
    Io {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("lost track of {tool} (pid {pid}): {reason}")]
    Lost {
        tool: String,
        pid: i32,
        reason: String,
    },
}

fn prefixed(prefix: &str, s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("{prefix}{s}")
    }
}

// ------------------------------------------------------------------------------ the table

/// A child's exit status, once known.
struct Slot {
    exit: Mutex<Option<Exit>>,
    done: Condvar,
    /// The same, for async waiters.
    watch: watch::Sender<Option<Exit>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            exit: Mutex::new(None),
            done: Condvar::new(),
            watch: watch::Sender::new(None),
        }
    }

    fn get(&self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fill(&self, exit: Exit) {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(exit);
        self.done.notify_all();
        self.watch.send_replace(Some(exit));
    }

    /// Blocks until the reaper filled the slot, or `timeout` passed.
    fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        let (exit, _) = self
            .done
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        *exit
    }
}

struct Table {
    /// The reaper thread runs (for good).
    reaping: bool,
    /// Bumped by every spawn: the idle reaper's wake-up condition.
    spawns: u64,
    /// Children started here and not yet reaped, by pid.
    children: BTreeMap<i32, Arc<Slot>>,
}

/// The lock every fork and every reap holds.
static TABLE: Mutex<Table> = Mutex::new(Table {
    reaping: false,
    spawns: 0,
    children: BTreeMap::new(),
});
/// Signalled after a spawn, for a reaper that found no child to wait for.
static SPAWNED: Condvar = Condvar::new();

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn exit_of(status: WaitStatus) -> Option<(i32, Exit)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), Exit::Code(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), Exit::Signal(sig as i32))),
        _ => None,
    }
}

/// Whether `pid` is no longer a child of ours to wait for (reaped, or never ours).
fn vanished(pid: i32) -> bool {
    waitid(
        Id::Pid(Pid::from_raw(pid)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) == Err(Errno::ECHILD)
}

impl Table {
    fn deliver(&mut self, pid: i32, exit: Exit) {
        match self.children.remove(&pid) {
            Some(slot) => slot.fill(exit),
            None => tracing::debug!(pid, %exit, "reaped a process nobody waits for"),
        }
    }

    /// Reaps every exited child (the lock held by the caller).
    fn reap_all(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if let Some((pid, exit)) = exit_of(status) {
                        self.deliver(pid, exit);
                    }
                }
                Err(Errno::EINTR) => {}
                // A child was reaped but `nix` cannot decode its status (killed by a
                // real-time signal): find which of ours is gone.
                Err(_) => {
                    let gone: Vec<i32> = self
                        .children
                        .keys()
                        .copied()
                        .filter(|pid| vanished(*pid))
                        .collect();
                    for pid in gone {
                        self.deliver(pid, Exit::Signal(0));
                    }
                }
            }
        }
    }
}

/// The reaper thread: waits (without reaping, without the lock) until some child has exited,
/// then reaps under the lock.
fn reap_loop() {
    loop {
        let seen = table().spawns;
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::ECHILD) => {
                // No child at all (so no orphan can arrive either): sleep until a spawn.
                let t = table();
                if t.spawns == seen {
                    let _ = SPAWNED.wait_timeout(t, Duration::from_secs(1));
                }
                continue;
            }
            Err(Errno::EINTR) => continue,
            _ => {}
        }
        table().reap_all();
    }
}

/// The process-wide reaper (see the module docs); the handle only proves it runs.
#[derive(Clone, Debug)]
pub struct Reaper {
    _started: (),
}

impl Reaper {
    /// Becomes a child subreaper (unless PID 1 already) and starts reaping every child of the
    /// process, for good. Calling it again returns the running reaper.
    pub fn start() -> io::Result<Reaper> {
        Reaper::start_as(true)
    }

    /// [`Reaper::start`], as a child subreaper or not. Not one (KubeVirt's pod, under
    /// `virt-launcher-monitor`): orphans — the QEMU libvirtd daemonizes — go to the monitor,
    /// where virt-handler looks for QEMU (among the children of the socket owner's parent);
    /// this process still reaps its own children.
    pub fn start_as(subreaper: bool) -> io::Result<Reaper> {
        let mut t = table();
        if !t.reaping {
            if subreaper && std::process::id() != 1 {
                nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
            }
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(reap_loop)?;
            t.reaping = true;
        }
        Ok(Reaper { _started: () })
    }

    /// Whether the reaper runs in this process.
    pub fn is_running() -> bool {
        table().reaping
    }
}

// ------------------------------------------------------------------------------ commands

/// A process to start: `std::process::Command` with the reaper's discipline.
///
/// Unless set, stdin is `/dev/null`, stdout is `/dev/null` for [`Command::spawn`] and captured
/// for [`Command::output`]/[`Command::run`], and stderr is captured (its tail is kept for the
/// error). A stderr set to [`Stdio::piped`] is the caller's, in [`Child::stderr`].
pub struct Command {
    inner: std::process::Command,
    tool: String,
    args: Vec<OsString>,
    stdin_set: bool,
    stdout_set: bool,
    stderr_set: bool,
}

impl Command {
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        Command {
            inner: std::process::Command::new(program),
            tool: program.to_string_lossy().into_owned(),
            args: Vec::new(),
            stdin_set: false,
            stdout_set: false,
            stderr_set: false,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args.push(arg.as_ref().to_owned());
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// Sets an environment variable of the process.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.inner.env(key, value);
        self
    }

    pub fn stdin(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.stdin_set = true;
        self.inner.stdin(cfg);
        self
    }

    pub fn stdout(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.stdout_set = true;
        self.inner.stdout(cfg);
        self
    }

    pub fn stderr(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.stderr_set = true;
        self.inner.stderr(cfg);
        self
    }

    /// Runs the process in process group `pgid` (0: a new group led by the process).
    pub fn process_group(&mut self, pgid: i32) -> &mut Command {
        self.inner.process_group(pgid);
        self
    }

    /// The tool's name as given.
    pub fn tool(&self) -> &str {
        &self.tool
    }

    /// The arguments, shortened for messages.
    pub fn args_summary(&self) -> String {
        summarize(&self.args)
    }

    /// Starts the process and registers it (see the module docs).
    pub fn spawn(&mut self) -> Result<Child, ProcessError> {
        if !self.stdin_set {
            self.inner.stdin(Stdio::null());
        }
        if !self.stdout_set {
            self.inner.stdout(Stdio::null());
        }
        self.spawn_registered()
    }

    fn spawn_registered(&mut self) -> Result<Child, ProcessError> {
        let capture = !self.stderr_set;
        if capture {
            self.inner.stderr(Stdio::piped());
        }
        let (mut child, pid, slot) = {
            let mut t = table();
            let child = self.inner.spawn().map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    ProcessError::Missing {
                        tool: self.tool.clone(),
                    }
                } else {
                    ProcessError::Spawn {
                        tool: self.tool.clone(),
                        source,
                    }
                }
            })?;
            let pid = child.id() as i32;
            let slot = Arc::new(Slot::new());
            t.children.insert(pid, slot.clone());
            t.spawns += 1;
            (child, pid, slot)
        };
        SPAWNED.notify_all();
        let captured = if capture {
            child.stderr.take().map(capture_tail)
        } else {
            None
        };
        // `child` itself is never waited for: only its pipes are kept.
        Ok(Child {
            pid,
            tool: self.tool.clone(),
            args: self.args_summary(),
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            captured,
            slot,
        })
    }

    /// Runs the process to completion (blocking), whatever its exit status.
    pub fn output(&mut self) -> Result<Output, ProcessError> {
        self.spawn_for_output()?.wait_with_output()
    }

    /// Runs the process to completion (blocking); an exit status other than 0 is an error.
    pub fn run(&mut self) -> Result<Output, ProcessError> {
        self.output()?.check()
    }

    /// [`Command::output`] for async callers (the wait runs on a blocking thread).
    pub async fn output_async(&mut self) -> Result<Output, ProcessError> {
        let child = self.spawn_for_output()?;
        let (tool, pid) = (child.tool.clone(), child.pid);
        tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .map_err(|e| ProcessError::Lost {
                tool,
                pid,
                reason: e.to_string(),
            })?
    }

    /// [`Command::run`] for async callers.
    pub async fn run_async(&mut self) -> Result<Output, ProcessError> {
        self.output_async().await?.check()
    }

    fn spawn_for_output(&mut self) -> Result<Child, ProcessError> {
        if !self.stdin_set {
            self.inner.stdin(Stdio::null());
        }
        if !self.stdout_set {
            self.inner.stdout(Stdio::piped());
        }
        self.spawn_registered()
    }
}

/// At most this much of a tool's stderr is kept (its end).
const STDERR_KEEP: usize = 64 << 10;

/// Drains `r` on a thread of its own, keeping the last [`STDERR_KEEP`] bytes.
fn capture_tail(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * STDERR_KEEP {
                        kept.drain(..kept.len() - STDERR_KEEP);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if kept.len() > STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
        kept
    })
}

/// Arguments for a message: each at most 48 characters (long paths keep their end), all of
/// them at most 200.
fn summarize(args: &[OsString]) -> String {
    const ARG: usize = 48;
    const ALL: usize = 200;
    let mut out = String::new();
    for a in args {
        let a = a.to_string_lossy();
        let chars: Vec<char> = a.chars().collect();
        let short: String = if chars.len() > ARG {
            std::iter::once('…')
                .chain(chars[chars.len() - (ARG - 1)..].iter().copied())
                .collect()
        } else {
            a.into_owned()
        };
        if out.chars().count() + short.chars().count() + 1 > ALL {
            out.push_str(" …");
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&short);
    }
    out
}

/// The last few non-empty lines of a tool's stderr, joined with "; " (at most ~1 KiB).
pub fn stderr_tail(stderr: &[u8]) -> String {
    const LINES: usize = 8;
    const MAX: usize = 1024;
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = lines[lines.len().saturating_sub(LINES)..].join("; ");
    if out.len() > MAX {
        let mut cut = out.len() - MAX;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = format!("…{}", &out[cut..]);
    }
    out
}

/// A finished process.
#[derive(Debug, Clone)]
pub struct Output {
    pub tool: String,
    /// The arguments, shortened.
    pub args: String,
    pub exit: Exit,
    /// Empty unless captured.
    pub stdout: Vec<u8>,
    /// The end of stderr, when captured.
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit.success()
    }

    /// `self` if the process exited 0, else [`ProcessError::Failed`].
    pub fn check(self) -> Result<Output, ProcessError> {
        if self.success() {
            Ok(self)
        } else {
            Err(self.failure())
        }
    }

    /// The error this output makes, whatever its status.
    pub fn failure(&self) -> ProcessError {
        ProcessError::Failed {
            tool: self.tool.clone(),
            args: self.args.clone(),
            exit: self.exit,
            stderr: stderr_tail(&self.stderr),
        }
    }
}

/// A process started by [`Command::spawn`]. Dropping it neither kills nor waits for it (the
/// reaper, once running, still collects it).
pub struct Child {
    pid: i32,
    tool: String,
    args: String,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    /// Only when the caller asked for `Stdio::piped()`; otherwise stderr is captured.
    pub stderr: Option<ChildStderr>,
    captured: Option<JoinHandle<Vec<u8>>>,
    slot: Arc<Slot>,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn tool(&self) -> &str {
        &self.tool
    }

    fn lost(&self, reason: impl Into<String>) -> ProcessError {
        ProcessError::Lost {
            tool: self.tool.clone(),
            pid: self.pid,
            reason: reason.into(),
        }
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_exit(&self) -> Result<Option<Exit>, ProcessError> {
        let mut t = table();
        if let Some(e) = self.slot.get() {
            return Ok(Some(e));
        }
        if t.reaping {
            return Ok(None);
        }
        reap_own(&mut t, self.pid, &self.tool)
    }

    /// Waits (blocking) until it exits; closes its stdin first, if still open.
    pub fn wait(&mut self) -> Result<Exit, ProcessError> {
        drop(self.stdin.take());
        wait_blocking(self.pid, &self.tool, &self.slot)
    }

    /// Waits until it exits, without blocking the runtime. Cancel-safe: a later call still
    /// gets the status.
    pub async fn exited(&self) -> Result<Exit, ProcessError> {
        if let Some(e) = self.slot.get() {
            return Ok(e);
        }
        if Reaper::is_running() {
            let mut rx = self.slot.watch.subscribe();
            loop {
                let wait = rx.wait_for(Option::is_some);
                if let Ok(exit) = tokio::time::timeout(LOST_CHECK, wait).await {
                    let exit = exit.map_err(|e| self.lost(e.to_string()))?;
                    return (*exit).ok_or_else(|| self.lost("no status"));
                }
                if let Some(e) = check_lost(self.pid, &self.tool, &self.slot)? {
                    return Ok(e);
                }
            }
        }
        let (pid, tool, slot) = (self.pid, self.tool.clone(), self.slot.clone());
        tokio::task::spawn_blocking(move || wait_blocking(pid, &tool, &slot))
            .await
            .map_err(|e| self.lost(e.to_string()))?
    }

    /// Closes stdin, reads stdout (if piped and not taken), waits, and collects the end of
    /// the captured stderr. Blocking.
    pub fn wait_with_output(mut self) -> Result<Output, ProcessError> {
        drop(self.stdin.take());
        // A stderr piped to the caller but left here is drained meanwhile, as std does.
        let err = self.stderr.take().map(capture_tail);
        let mut stdout = Vec::new();
        if let Some(mut out) = self.stdout.take() {
            out.read_to_end(&mut stdout)
                .map_err(|source| ProcessError::Io {
                    tool: self.tool.clone(),
                    source,
                })?;
        }
        let exit = self.wait()?;
        let stderr = match err.or_else(|| self.captured.take()) {
            Some(t) => t.join().unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(Output {
            tool: std::mem::take(&mut self.tool),
            args: std::mem::take(&mut self.args),
            exit,
            stdout,
            stderr,
        })
    }
}

/// Without the reaper: collects the status of child `pid` if it has exited (the lock held).
fn reap_own(t: &mut Table, pid: i32, tool: &str) -> Result<Option<Exit>, ProcessError> {
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(status) => {
                if let Some((pid, exit)) = exit_of(status) {
                    t.deliver(pid, exit);
                    return Ok(Some(exit));
                }
                return Ok(None);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                t.children.remove(&pid);
                return Err(ProcessError::Lost {
                    tool: tool.to_string(),
                    pid,
                    reason: "reaped by someone else".into(),
                });
            }
            // Reaped, with a status `nix` cannot decode (a real-time signal).
            Err(_) => {
                t.deliver(pid, Exit::Signal(0));
                return Ok(Some(Exit::Signal(0)));
            }
        }
    }
}

/// How often a waiter checks that its child's status was not lost (see [`check_lost`]).
const LOST_CHECK: Duration = Duration::from_secs(1);

/// With the reaper: the reaper fills a child's slot under the lock it reaps under, so a slot
/// still empty (under that lock) for a child that is gone means its status went elsewhere —
/// a `waitpid` outside this module. An error then, rather than a wait forever.
fn check_lost(pid: i32, tool: &str, slot: &Slot) -> Result<Option<Exit>, ProcessError> {
    let mut t = table();
    if let Some(e) = slot.get() {
        return Ok(Some(e));
    }
    if vanished(pid) {
        t.children.remove(&pid);
        return Err(ProcessError::Lost {
            tool: tool.to_string(),
            pid,
            reason: "reaped by someone else".into(),
        });
    }
    Ok(None)
}

/// Blocks until child `pid` has exited: its status from the reaper once that runs, else
/// collected here.
fn wait_blocking(pid: i32, tool: &str, slot: &Slot) -> Result<Exit, ProcessError> {
    loop {
        {
            let mut t = table();
            if let Some(e) = slot.get() {
                return Ok(e);
            }
            if t.reaping {
                drop(t);
                loop {
                    if let Some(e) = slot.wait_timeout(LOST_CHECK) {
                        return Ok(e);
                    }
                    if let Some(e) = check_lost(pid, tool, slot)? {
                        return Ok(e);
                    }
                }
            }
            if let Some(e) = reap_own(&mut t, pid, tool)? {
                return Ok(e);
            }
        }
        // Until it has exited, without reaping it (that happens under the lock, above); if
        // the reaper starts meanwhile and reaps it, this returns too.
        let _ = waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        );
    }
}

#[cfg(test)]
mod tests {
    //! Without the reaper (this test binary never starts it): children collect their own
    //! status.

    use super::*;

    #[test]
    fn statuses_without_the_reaper() {
        assert!(!Reaper::is_running());
        let out = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output()
            .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let mut sleeper = Command::new("sleep").arg("0.1").spawn().unwrap();
        assert_eq!(sleeper.try_exit().unwrap(), None);
        assert_eq!(sleeper.wait().unwrap(), Exit::Code(0));
        // Asked again, the status is still known.
        assert_eq!(sleeper.try_exit().unwrap(), Some(Exit::Code(0)));
        let killed = Command::new("sh").args(["-c", "kill -9 $$"]).output();
        assert_eq!(killed.unwrap().exit, Exit::Signal(9));
    }

    #[test]
    fn async_wait_without_the_reaper() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let child = Command::new("sh").args(["-c", "exit 5"]).spawn().unwrap();
            assert_eq!(child.exited().await.unwrap(), Exit::Code(5));
            let out = Command::new("sh")
                .args(["-c", "echo hi"])
                .run_async()
                .await
                .unwrap();
            assert_eq!(out.stdout, b"hi\n");
        });
    }

    #[test]
    fn errors_name_the_tool_its_arguments_status_and_stderr() {
        let e = Command::new("vl-no-such-tool").arg("x").run().unwrap_err();
        assert!(matches!(e, ProcessError::Missing { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "vl-no-such-tool is missing (not found in PATH)"
        );

        let e = Command::new("sh")
            .args(["-c", "echo one >&2; echo two >&2; exit 2"])
            .run()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "sh -c echo one >&2; echo two >&2; exit 2 failed (exit code 2): one; two"
        );
        let e = Command::new("false").run().unwrap_err();
        assert_eq!(e.to_string(), "false failed (exit code 1)");
    }

    #[test]
    fn long_arguments_are_shortened_and_stderr_keeps_its_end() {
        let long = format!("/{}/disk.qcow2", "d".repeat(100));
        let s = summarize(&[OsString::from("create"), OsString::from(&long)]);
        assert!(s.starts_with("create …"), "{s}");
        assert!(
            s.ends_with("/disk.qcow2") && s.chars().count() <= 7 + 48,
            "{s}"
        );
        let many: Vec<OsString> = (0..100)
            .map(|i| OsString::from(format!("arg{i}")))
            .collect();
        let s = summarize(&many);
        assert!(s.ends_with(" …") && s.chars().count() <= 202, "{s}");

        let lines: String = (0..20).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            stderr_tail(lines.as_bytes()),
            "line 12; line 13; line 14; line 15; line 16; line 17; line 18; line 19"
        );
        let huge = "x".repeat(5000);
        let t = stderr_tail(huge.as_bytes());
        assert!(
            t.starts_with('…') && t.len() <= 1024 + '…'.len_utf8(),
            "{}",
            t.len()
        );
    }

    #[test]
    fn pipes_stdin_through_a_tool() {
        use std::io::Write;
        let mut child = Command::new("tr")
            .args(["a-z", "A-Z"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"hello").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, b"HELLO");
    }
}
