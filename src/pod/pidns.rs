//! Standalone mode's PID namespace: the launcher is PID 1 of its own, as in a pod.
//!
//! `virt-launcher run` on a plain machine starts itself again (the same arguments) as the first
//! process of a new PID namespace and stays in front of it as a small waiter: it forwards
//! SIGTERM, SIGINT and SIGHUP (as SIGTERM) to the launcher and exits with its exit code.
//! Whatever becomes of either, nothing the launcher started outlives it:
//!
//! - the launcher is the namespace's PID 1, so when it dies (SIGKILL included) the kernel kills
//!   every process in the namespace: libvirtd, QEMU, helpers;
//! - it asks for SIGKILL when its parent, the waiter, dies (`PR_SET_PDEATHSIG`), and checks
//!   once that the waiter has not died before it asked: its stdin is the read end of a pipe
//!   only the waiter holds open (the lifeline).
//!
//! No `unsafe`: `unshare(CLONE_NEWPID)` in the waiter puts its next child into the new
//! namespace, and that child is started with [`process::Command`] like every other.

use std::ffi::OsString;
use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

use super::process::{self, Exit};

/// Set in the launcher's environment by the waiter (to the waiter's pid): it is the
/// namespace's PID 1.
pub const CHILD_ENV: &str = "VIRT_LAUNCHER_PID_NAMESPACE";

#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("cannot create a PID namespace ({step}): {source}; standalone mode needs root (CAP_SYS_ADMIN)")]
    Setup {
        step: &'static str,
        source: nix::Error,
    },
    #[error("{0}")]
    Process(#[from] process::ProcessError),
    #[error("the launcher's parent ended before it started")]
    Orphaned,
}

fn setup(step: &'static str) -> impl FnOnce(nix::Error) -> PidNsError {
    move |source| PidNsError::Setup { step, source }
}

/// Whether this process should start the launcher in a new PID namespace: not when it already
/// is PID 1 (in a pod, under `unshare --pid`, or the waiter's child).
pub fn wanted() -> bool {
    std::process::id() != 1 && std::env::var_os(CHILD_ENV).is_none()
}

/// The waiter: runs this program again with `args` as PID 1 of a new PID namespace, forwards
/// the stop signals to it, and returns its exit code (128 + the signal if it was killed).
pub fn run_as_pid1(args: impl IntoIterator<Item = OsString>) -> Result<i32, PidNsError> {
    let exe = std::env::current_exe().map_err(|e| PidNsError::Setup {
        step: "find /proc/self/exe",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    // Signals wait for `sigwait` below (the child starts with none blocked: std resets it).
    let signals = forwarded();
    signals.thread_block().map_err(setup("block signals"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(setup("unshare"))?;
    let (lifeline, keep) = nix::unistd::pipe().map_err(setup("pipe"))?;
    let child = process::Command::new(&exe)
        .args(args)
        .env(CHILD_ENV, std::process::id().to_string())
        .stdin(std::process::Stdio::from(lifeline))
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let pid = Pid::from_raw(child.pid());
    let exit = loop {
        match signals.wait().map_err(setup("sigwait"))? {
            Signal::SIGCHLD => {
                if let Some(exit) = child.try_exit()? {
                    break exit;
                }
            }
            Signal::SIGHUP => {
                let _ = kill(pid, Signal::SIGTERM);
            }
            s => {
                let _ = kill(pid, s);
            }
        }
    };
    drop(keep);
    Ok(match exit {
        Exit::Code(c) => c,
        Exit::Signal(s) => 128 + s,
    })
}

/// The signals the waiter takes for itself (blocked, then `sigwait`ed).
fn forwarded() -> SigSet {
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        signals.add(s);
    }
    signals
}

/// In the launcher started by [`run_as_pid1`]: dies with the waiter from now on, and fails if
/// the waiter is already gone.
pub fn bind_to_parent() -> Result<(), PidNsError> {
    forwarded()
        .thread_unblock()
        .map_err(setup("unblock signals"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(setup("PR_SET_PDEATHSIG"))?;
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    let ready = poll(&mut fds, PollTimeout::ZERO).map_err(setup("poll the lifeline"))?;
    let hung_up = ready > 0
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
    if hung_up {
        return Err(PidNsError::Orphaned);
    }
    Ok(())
}

/// The pid of the waiter in front of this launcher, as the machine sees it (this launcher's
/// own is 1 in its namespace): what names this launcher on the machine.
pub fn waiter_pid() -> Option<u32> {
    std::env::var(CHILD_ENV).ok()?.parse().ok()
}

/// Whether this process is the launcher [`run_as_pid1`] started.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}
