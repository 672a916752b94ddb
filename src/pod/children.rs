//! The launcher's own children, as /proc shows them: what is left to kill when the launcher
//! ends, and a QEMU that a dying libvirtd lost track of.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// SIGKILLs any QEMU of domain `name` still running under this launcher (one libvirtd spawned
/// and lost track of when it died), and waits for it to be gone: it would hold the disks.
/// Under this launcher: its child, or, when it is no child subreaper, its parent's.
pub async fn kill_orphan_qemu(name: &str) {
    let me = std::process::id() as i32;
    // Not a subreaper (KubeVirt's pod): orphans went to our parent, the monitor.
    let subreaper = me == 1 || nix::sys::prctl::get_child_subreaper().unwrap_or(true);
    let parent = (!subreaper).then(|| nix::unistd::getppid().as_raw());
    let needle = format!("guest={name},");
    let orphans = || -> Vec<i32> {
        children_of(me)
            .into_iter()
            .chain(parent.map(children_of).unwrap_or_default())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    };
    let found = orphans();
    for pid in &found {
        tracing::warn!(pid, domain = name, "killing a QEMU libvirtd lost track of");
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while !found.is_empty() && !orphans().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills every process still parented to us (an orphaned QEMU after a daemon crash), and
/// waits for the reaper to collect them.
pub async fn kill_leftovers() {
    let me = std::process::id() as i32;
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for pid in &children {
            tracing::warn!(pid, ?sig, "terminating leftover process");
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && !children_of(me).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Live (non-zombie) children of `parent`, from /proc.
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
            ppid == Some(parent) && state != Some("Z")
        })
        .collect()
}
