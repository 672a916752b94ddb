//! The benchmark as the reaper of its orphans (raw libvirtd's QEMU processes).

use crate::*;

/// Pids of the children this benchmark spawned itself (their `Child` waits for them).
pub(crate) static KNOWN_CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());
pub(crate) static REAPING: AtomicBool = AtomicBool::new(false);

/// Spawns a child that the orphan reaper must leave alone.
pub(crate) fn spawn_known(cmd: &mut Command) -> std::io::Result<Child> {
    let mut known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    known.push(child.id() as i32);
    Ok(child)
}

/// Runs a command to completion as a known child: the orphan reaper keeps reaping other
/// processes meanwhile (a paused reaper would slow down libvirt's QEMU shutdowns).
pub(crate) fn run_known(cmd: &mut Command) -> Result<std::process::Output> {
    let child = spawn_known(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as i32;
    let out = child.wait_with_output();
    KNOWN_CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
    out.with_context(|| format!("wait for {cmd:?}"))
}

/// Runs `f` with the reaper paused (for code that spawns and waits for its own commands).
pub(crate) fn without_reaping<T>(f: impl FnOnce() -> T) -> T {
    let _known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Makes this process the reaper of its orphaned descendants and reaps them at once, for the
/// duration of the run.
///
/// QEMU daemonizes, so raw libvirtd's QEMU processes are orphans. On a normal host init reaps
/// them at once (and in a pod the launcher does); this sandbox's PID 1 reaps only every second
/// or two, and until then libvirt sees a dying QEMU as alive: capability probes, shutdowns and
/// destroys of raw libvirt would look slower than they are. The launcher is a subreaper itself
/// and needs none of this.
pub(crate) struct OrphanReaper(Option<std::thread::JoinHandle<()>>);

impl OrphanReaper {
    pub(crate) fn start() -> Result<OrphanReaper> {
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        REAPING.store(true, Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name("orphan-reaper".into())
            .spawn(|| {
                while REAPING.load(Ordering::SeqCst) {
                    if !reap_orphans() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
            .context("spawn the orphan reaper")?;
        Ok(OrphanReaper(Some(handle)))
    }
}

impl Drop for OrphanReaper {
    fn drop(&mut self) {
        REAPING.store(false, Ordering::SeqCst);
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
        let _ = nix::sys::prctl::set_child_subreaper(false);
    }
}

/// Reaps the exited children that are not [`KNOWN_CHILDREN`]; true if it reaped any.
pub(crate) fn reap_orphans() -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let Some(first) = waitid(Id::All, peek).ok().and_then(|s| s.pid()) else {
        return false;
    };
    // The first zombie may be one of ours, hiding others: then look at all of them.
    let zombies = if known.contains(&first.as_raw()) {
        zombie_children()
    } else {
        vec![first.as_raw()]
    };
    let mut reaped = false;
    for pid in zombies.into_iter().filter(|p| !known.contains(p)) {
        let reap = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        reaped |= waitid(Id::Pid(Pid::from_raw(pid)), reap).is_ok();
    }
    reaped
}

/// Our children that are zombies, from /proc.
pub(crate) fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|p| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next().and_then(|x| x.parse().ok()) == Some(me)
        })
        .collect()
}
