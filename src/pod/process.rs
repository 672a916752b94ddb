//! The one owner of `waitpid`.
//!
//! The launcher is PID 1 in its pod (or a child subreaper outside one), so orphaned processes —
//! QEMU after a libvirtd crash, helpers of helpers — become its children and must be reaped.
//! A blanket `waitpid(-1)` would steal the exit status of processes someone else waits for, so
//! every process the launcher starts is spawned through [`Reaper::spawn`] or
//! [`Reaper::output`], which register the pid and receive its status from the single reaping
//! task. Statuses of unknown pids (orphans) are logged and dropped.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
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

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Statuses reaped before their spawner registered (the child was quicker than us).
    early: HashMap<i32, Exit>,
}

/// A handle on the reaping task; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

/// A process started through the reaper.
pub struct Spawned {
    pub child: Child,
    pub exit: oneshot::Receiver<Exit>,
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Reaper {
    /// Becomes a child subreaper (unless PID 1 already) and starts reaping on SIGCHLD.
    /// Must be called inside a tokio runtime.
    pub fn start() -> std::io::Result<Reaper> {
        if std::process::id() != 1 {
            nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            table: Arc::default(),
        };
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps every exited child and hands each status to whoever waits for it.
    fn reap_all(&self) {
        loop {
            let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let mut t = self.lock();
            match t.waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    t.early.insert(pid, exit);
                    tracing::debug!(pid, %exit, "reaped a process nobody waits for");
                }
            }
            // Orphans never claim their status; keep the table bounded.
            if t.early.len() > 1024 {
                t.early.clear();
            }
        }
    }

    /// Spawns `cmd` and registers it; its exit status arrives on `Spawned::exit`.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Spawned> {
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        match t.early.remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None => {
                t.waiters.insert(pid, tx);
            }
        }
        drop(t);
        Ok(Spawned { child, exit: rx })
    }

    /// Runs `cmd` to completion and returns its status and combined stdout+stderr.
    pub async fn output(&self, cmd: &mut Command) -> std::io::Result<(Exit, String)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut spawned = self.spawn(cmd)?;
        let mut out = spawned.child.stdout.take();
        let mut err = spawned.child.stderr.take();
        let text = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let errt = std::thread::spawn(move || {
                let mut e = String::new();
                if let Some(err) = err.as_mut() {
                    let _ = err.read_to_string(&mut e);
                }
                e
            });
            if let Some(out) = out.as_mut() {
                let _ = out.read_to_string(&mut s);
            }
            s.push_str(&errt.join().unwrap_or_default());
            s
        })
        .await
        .unwrap_or_default();
        let exit = spawned
            .exit
            .await
            .map_err(|_| std::io::Error::other("reaper stopped"))?;
        Ok((exit, text))
    }
}
