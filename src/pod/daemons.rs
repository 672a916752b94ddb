//! The libvirt daemon, owned by the launcher.
//!
//! One daemon: libvirt's (libvirtd 11, with only the QEMU driver installed: what KubeVirt's
//! `virtqemud` is, which Debian does not build). No virtlogd: QEMU writes its own logs
//! (`stdio_handler = "file"`, see [`super::QEMU_CONF`]) and nothing else in libvirt asks for
//! it; it cost 16.7 MiB of every pod's memory and a start-up step.
//!
//! The daemon runs in the foreground as our child, in its own process group (a Ctrl-C on the
//! launcher's terminal must reach the launcher only, which then shuts the guest down in order).
//! Its stderr is relayed line by line into our JSON log with a `subcomponent` field. When a
//! daemon dies it is restarted at once (well within a second), and a [`DaemonEvent`] tells the
//! supervisor, which reconnects to libvirt; QEMU keeps running meanwhile.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::PodLayout;
use crate::pod::process::{Child, Command, Exit, ProcessError, Reaper, Stdio};

/// How long a daemon may take to open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a starting daemon's socket, and a stopping daemon's exit, are checked. libvirtd
/// opens its socket and exits within a few milliseconds of being asked: with a 20 ms poll the
/// launcher noticed its exit ~10 ms late on average (SIGTERM → exit was 36 ms after `domain
/// stopped` against 7 ms for raw libvirt). A check is a connect or one /proc read.
const POLL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Daemon {
    Libvirtd,
}

impl Daemon {
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Libvirtd => "libvirtd",
        }
    }

    fn command(self, layout: &PodLayout) -> Command {
        let conf = layout.conf_dir();
        let pid = layout.pid_dir().join(format!("{}.pid", self.name()));
        let mut cmd = Command::new(layout.daemon_program(self.name()));
        match self {
            Daemon::Libvirtd => cmd.arg("-f").arg(conf.join("libvirtd.conf")),
        };
        cmd.arg("-p").arg(pid);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // One malloc arena: glibc gives each of libvirtd's ~19 threads that allocates an arena
        // of its own, and a pod's daemon serves one VM. Measured with a running guest: RSS
        // 31–39 MiB → 30–32 MiB, of which ~23 MiB are its shared libraries (shared between
        // pods through the page cache); its private memory 8.1 → 6.7 MiB.
        cmd.env("MALLOC_ARENA_MAX", "1");
        cmd
    }

    /// The socket whose presence means the daemon serves.
    fn socket(self, layout: &PodLayout) -> PathBuf {
        match self {
            Daemon::Libvirtd => layout.libvirt_socket(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {daemon}: {source} (is libvirt installed? run scripts/setup-host.sh)")]
    Spawn {
        daemon: &'static str,
        source: ProcessError,
    },
    #[error("{daemon} exited during start-up ({exit}); its log lines above say why")]
    EarlyExit { daemon: &'static str, exit: Exit },
    #[error("{daemon} did not open {socket} within {timeout:?}")]
    NotReady {
        daemon: &'static str,
        socket: PathBuf,
        timeout: Duration,
    },
}

/// What happened to a daemon after start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonEvent {
    Died { daemon: Daemon, exit: Exit },
    Restarted { daemon: Daemon, pid: i32 },
    RestartFailed { daemon: Daemon, error: String },
}

/// The running daemons and their watchers.
pub struct Daemons {
    stopping: watch::Sender<bool>,
    pids: Vec<(Daemon, Arc<Mutex<i32>>)>,
    watchers: Vec<JoinHandle<()>>,
}

impl Daemons {
    /// Starts the daemons, each ready (socket open) before the next. The reaper
    /// must run: it collects what the daemons leave behind (an orphaned QEMU).
    pub async fn start(
        _reaper: &Reaper,
        layout: &PodLayout,
        events: mpsc::UnboundedSender<DaemonEvent>,
    ) -> Result<Daemons, DaemonError> {
        let (stopping, _) = watch::channel(false);
        let mut daemons = Daemons {
            stopping,
            pids: Vec::new(),
            watchers: Vec::new(),
        };
        for daemon in [Daemon::Libvirtd] {
            let first = match start_one(layout, daemon).await {
                Ok(s) => s,
                Err(e) => {
                    daemons.stop().await;
                    return Err(e);
                }
            };
            let pid = Arc::new(Mutex::new(first.pid));
            daemons.pids.push((daemon, pid.clone()));
            let watcher = watch_daemon(
                layout.clone(),
                daemon,
                first.child,
                pid,
                daemons.stopping.subscribe(),
                events.clone(),
            );
            daemons.watchers.push(tokio::spawn(watcher));
        }
        Ok(daemons)
    }

    /// The current pid of `daemon`.
    pub fn pid(&self, daemon: Daemon) -> Option<i32> {
        self.pids
            .iter()
            .find(|(d, _)| *d == daemon)
            .map(|(_, p)| *p.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the daemons (libvirtd first), SIGKILL after a grace of a few seconds.
    pub async fn stop(&mut self) {
        let _ = self.stopping.send(true);
        for (daemon, pid) in self.pids.iter().rev() {
            let pid = *pid.lock().unwrap_or_else(|e| e.into_inner());
            terminate(*daemon, pid).await;
        }
        for w in self.watchers.drain(..) {
            let _ = w.await;
        }
    }
}

struct Started {
    pid: i32,
    child: Child,
}

async fn start_one(layout: &PodLayout, daemon: Daemon) -> Result<Started, DaemonError> {
    let socket = daemon.socket(layout);
    // A stale socket from a crashed predecessor would look ready.
    let _ = std::fs::remove_file(&socket);
    // With a capabilities cache to reuse, the daemon runs on one CPU. libvirt reads the host's
    // CPUID at start-up and compares it with the CPUID its cached QEMU capabilities recorded
    // (read by whichever thread probed), and CPUID carries the x2APIC id of the CPU it runs on
    // (leaf 0x1f): a daemon on another CPU than the probe's throws a valid cache away and
    // probes QEMU again (~1 s; on half the starts here). The daemon's own work is light;
    // QEMU does not inherit the pinning: libvirt gives it every online CPU when no
    // `emulatorpin` says otherwise (qemuProcessInitCpuAffinity).
    let pinned = layout.has_capabilities_seed().then(StartCpu::pin).flatten();
    let spawned = daemon.command(layout).spawn();
    StartCpu::restore_caller(pinned);
    let mut child = spawned.map_err(|source| DaemonError::Spawn {
        daemon: daemon.name(),
        source,
    })?;
    if let Some(stderr) = child.stderr.take() {
        relay(daemon, stderr);
    }
    let pid = child.pid();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(exit)) = child.try_exit() {
            return Err(DaemonError::EarlyExit {
                daemon: daemon.name(),
                exit,
            });
        }
        if UnixStream::connect(&socket).is_ok() {
            tracing::info!(subcomponent = daemon.name(), pid, "daemon ready");
            return Ok(Started { pid, child });
        }
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(DaemonError::NotReady {
                daemon: daemon.name(),
                socket,
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for the daemon to die and restarts it, until the launcher stops.
async fn watch_daemon(
    layout: PodLayout,
    daemon: Daemon,
    first: Child,
    pid: Arc<Mutex<i32>>,
    mut stopping: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<DaemonEvent>,
) {
    // None: the last restart failed; try again in a second.
    let mut current = Some(first);
    loop {
        let status = tokio::select! {
            s = next_exit(current.as_ref()) => s,
            _ = stopping.wait_for(|s| *s) => return,
        };
        if *stopping.borrow() {
            return;
        }
        tracing::warn!(subcomponent = daemon.name(), %status, "daemon died; restarting");
        let _ = events.send(DaemonEvent::Died {
            daemon,
            exit: status,
        });
        match start_one(&layout, daemon).await {
            Ok(started) => {
                *pid.lock().unwrap_or_else(|e| e.into_inner()) = started.pid;
                current = Some(started.child);
                let _ = events.send(DaemonEvent::Restarted {
                    daemon,
                    pid: started.pid,
                });
            }
            Err(e) => {
                tracing::error!(subcomponent = daemon.name(), error = %e, "daemon restart failed; retrying in 1 s");
                let _ = events.send(DaemonEvent::RestartFailed {
                    daemon,
                    error: e.to_string(),
                });
                current = None;
            }
        }
    }
}

/// The daemon's exit status; without a daemon (a failed restart), a fake "exit" after a
/// second, to try again.
async fn next_exit(child: Option<&Child>) -> Exit {
    match child {
        Some(c) => c.exited().await.unwrap_or(Exit::Signal(0)),
        None => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Exit::Signal(0)
        }
    }
}

async fn terminate(daemon: Daemon, pid: i32) {
    let pid = Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    tracing::warn!(
        subcomponent = daemon.name(),
        "daemon ignored SIGTERM; killing it"
    );
    let _ = kill(pid, Signal::SIGKILL);
}

/// The calling thread's CPU set while a daemon is spawned on the first CPU of it.
struct StartCpu {
    all: CpuSet,
}

impl StartCpu {
    /// Narrows the calling thread (and so the child it spawns next) to its first allowed CPU.
    /// None when it has one CPU anyway or the kernel refuses.
    fn pin() -> Option<StartCpu> {
        let me = Pid::from_raw(0);
        let all = sched_getaffinity(me).ok()?;
        let first = (0..CpuSet::count()).find(|&c| all.is_set(c).unwrap_or(false))?;
        let allowed = (0..CpuSet::count())
            .filter(|&c| all.is_set(c).unwrap_or(false))
            .count();
        if allowed < 2 {
            return None;
        }
        let mut one = CpuSet::new();
        one.set(first).ok()?;
        sched_setaffinity(me, &one).ok()?;
        Some(StartCpu { all })
    }

    /// Gives the calling thread its CPUs back (right after the spawn).
    fn restore_caller(pinned: Option<StartCpu>) {
        if let Some(p) = pinned {
            if let Err(e) = sched_setaffinity(Pid::from_raw(0), &p.all) {
                tracing::warn!(error = %e, "could not restore the launcher thread's CPUs");
            }
        }
    }
}

/// Alive and not a zombie (a zombie awaits the reaper and is gone for our purposes).
pub fn is_alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Relays a daemon's stderr into our log, one JSON line per line, on a plain thread (it blocks).
fn relay(daemon: Daemon, stderr: crate::pod::process::ChildStderr) {
    let _ = std::thread::Builder::new()
        .name(format!("relay-{}", daemon.name()))
        .spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_line(daemon.name(), &line);
            }
        });
}

/// Errors libvirtd reports at every start in a pod, which concern drivers a launcher does not
/// use (virtual networks, host D-Bus): logged at debug level so real errors stand out.
const EXPECTED_NOISE: [&str; 10] = [
    "End of file while reading data", // a client (our readiness probe) hung up
    // The guest agent's channel closed: at every guest shutdown (the agentConnected event
    // already says so).
    "End of file from agent socket",
    "Unable to find 'dnsmasq' binary",
    "Unable to get system bus connection",
    "DBus not available",
    "udevGetDMIData",
    "dmidecode",
    "virCgroupDetectControllers", // cgroup_controllers = [] in a pod
    "getaddrinfo failed for",     // the pod hostname need not resolve
    "is tainted: high-privileges",
];

/// Logs one line of a daemon's or QEMU's output at the level it states.
pub fn log_line(subcomponent: &str, line: &str) {
    let line = line.trim_end();
    if line.is_empty() {
        return;
    }
    if EXPECTED_NOISE.iter().any(|n| line.contains(n)) {
        tracing::debug!(subcomponent, "{line}");
    } else if line.contains(": error : ") {
        tracing::error!(subcomponent, "{line}");
    } else if line.contains(": warning : ") {
        tracing::warn!(subcomponent, "{line}");
    } else {
        tracing::info!(subcomponent, "{line}");
    }
}

/// How large the console log and the QEMU log may grow before the launcher rotates them.
///
/// QEMU writes both itself (`stdio_handler = "file"`, see [`super::QEMU_CONF`]), so nothing
/// else bounds them (virtlogd, which the pod no longer runs, used to: 2 MiB × 4 files). At the cap the file is copied to
/// `<file>.1` (replacing the previous one) and truncated: QEMU opened it with `O_APPEND`, so
/// its next write lands at the new end. At most twice the cap per log stays on disk.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 << 20;

/// Follows a log file that QEMU appends to (the QEMU log, the serial console log) and relays
/// lines added from now on, until `stop` turns true; rotates it when it passes `max_bytes`.
pub fn follow_file(
    subcomponent: &'static str,
    path: PathBuf,
    max_bytes: u64,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut partial = String::new();
        let mut failing = false;
        let mut relay = |chunk: &str| {
            partial.push_str(chunk);
            while let Some(i) = partial.find('\n') {
                let line: String = partial.drain(..=i).collect();
                log_line(subcomponent, &line);
            }
        };
        loop {
            if let Ok(chunk) = read_from(&path, &mut offset) {
                relay(&chunk);
            }
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len > max_bytes {
                match rotate(&path, &mut offset) {
                    Ok(rest) => {
                        relay(&rest);
                        failing = false;
                        tracing::info!(subcomponent, path = %path.display(), max_bytes, "log rotated");
                    }
                    // Said once, not every 200 ms while it lasts.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(subcomponent, path = %path.display(), error = %e, "log rotation failed")
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// Copies `path` to `<path>.1` (best effort: the filesystem may be full) and truncates it to
/// zero. Returns what was added since `offset` (read from the copy, so the relay misses only
/// what is written between the copy and the truncation); `offset` is reset to 0.
fn rotate(path: &Path, offset: &mut u64) -> std::io::Result<String> {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    let old = PathBuf::from(old);
    let _ = std::fs::remove_file(&old);
    let rest = match std::fs::copy(path, &old) {
        Ok(_) => read_from(&old, offset).unwrap_or_default(),
        Err(e) => {
            let _ = std::fs::remove_file(&old);
            tracing::warn!(path = %old.display(), error = %e, "could not keep the previous log");
            String::new()
        }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    *offset = 0;
    Ok(rest)
}

fn read_from(path: &Path, offset: &mut u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0; // truncated or rotated
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = Vec::new();
    f.take(1 << 20).read_to_end(&mut buf)?;
    *offset += buf.len() as u64;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
