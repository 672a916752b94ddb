//! Processes as `/proc` shows them: who is running, in which mount namespace, with how much
//! memory; and the clean-up of a pod's processes.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every process but this one.
pub fn pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != me)
                .collect()
        })
        .unwrap_or_default()
}

/// A process's command line, its arguments separated by spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let mut raw = Vec::new();
    fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_end(&mut raw))
        .ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// The processes whose command line contains one of `needles`: `(pid, command line)`.
pub fn mentioning(needles: &[String]) -> Vec<(i32, String)> {
    pids()
        .into_iter()
        .filter_map(|p| Some((p, cmdline(p)?)))
        .filter(|(_, c)| needles.iter().any(|n| c.contains(n.as_str())))
        .collect()
}

/// SIGKILLs every process whose command line contains one of `needles`; returns them as
/// `pid: command line`.
pub fn kill_matching(needles: &[String]) -> Vec<String> {
    mentioning(needles)
        .into_iter()
        .map(|(p, c)| {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            format!("{p}: {}", c.trim())
        })
        .collect()
}

/// The mount namespace of `pid` (`mnt:[…]`).
pub fn mount_ns(pid: i32) -> Result<String> {
    Ok(fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .with_context(|| format!("read /proc/{pid}/ns/mnt"))?
        .display()
        .to_string())
}

/// SIGKILLs every process in mount namespace `ns` (never our own namespace).
pub fn kill_namespace(ns: &str) {
    if mount_ns(std::process::id() as i32).is_ok_and(|me| me == ns) {
        return;
    }
    for p in pids() {
        if mount_ns(p).is_ok_and(|n| n == ns) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// The QEMU process of domain `default_<name>` in mount namespace `ns`.
pub fn find_qemu(name: &str, ns: &str) -> Result<i32> {
    let needle = format!("guest=default_{name},");
    pids()
        .into_iter()
        .find(|&p| {
            cmdline(p).is_some_and(|c| c.contains(&needle)) && mount_ns(p).is_ok_and(|n| n == ns)
        })
        .ok_or_else(|| anyhow!("no QEMU process for default_{name} in {ns}"))
}

/// A pid from a pid file.
pub fn read_pid(path: &Path) -> Result<i32> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a pid: {text:?}", path.display()))
}

/// The machine's pid of the process that has pid `ns_pid` in its own PID namespace (a pid
/// file written inside a launcher's namespace) and whose command line mentions `needle`.
pub fn host_pid(ns_pid: i32, needle: &str) -> Result<i32> {
    pids()
        .into_iter()
        .find(|&p| {
            let innermost = fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|v| v.split_whitespace().last().map(str::to_string))
                });
            innermost == Some(ns_pid.to_string()) && cmdline(p).is_some_and(|c| c.contains(needle))
        })
        .ok_or_else(|| anyhow!("no process with pid {ns_pid} in its namespace mentions {needle}"))
}

/// The launcher behind `pid`: the PID 1 of the PID namespace that the waiter `pid` started
/// (standalone `run`), else `pid` itself.
pub fn launcher_pid(pid: i32) -> i32 {
    pids()
        .into_iter()
        .find(|&p| {
            fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.contains(&format!("\nPPid:\t{pid}\n"))
                    && s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|v| v.split_whitespace().last())
                        == Some("1")
            })
        })
        .unwrap_or(pid)
}

/// VmRSS of `pid`, in MiB.
pub fn rss_mib(pid: i32) -> Result<f64> {
    status_mib(pid, "VmRSS")
}

/// A memory field of `/proc/<pid>/status` (VmRSS, RssAnon, RssFile, …), in MiB.
pub fn status_mib(pid: i32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    kib_field(&status, field)
        .map(|kib| kib / 1024.0)
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {field}"))
}

/// Pss of `pid` from `/proc/<pid>/smaps_rollup`, in MiB.
pub fn pss_mib(pid: i32) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("read /proc/{pid}/smaps_rollup"))?;
    kib_field(&text, "Pss")
        .map(|kib| kib / 1024.0)
        .ok_or_else(|| anyhow!("/proc/{pid}/smaps_rollup has no Pss"))
}

/// The value of a `Field:   1234 kB` line.
fn kib_field(text: &str, field: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Stops a child as kubelet would: SIGTERM, up to `grace` to exit, then SIGKILL. True if it
/// exited on SIGTERM (or had already exited).
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    if !matches!(child.try_wait(), Ok(None)) {
        return true;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_and_namespace() {
        let me = std::process::id() as i32;
        assert!(rss_mib(me).unwrap() > 0.0);
        assert!(pss_mib(me).unwrap() > 0.0);
        assert!(mount_ns(me).unwrap().starts_with("mnt:"));
        assert!(status_mib(me, "NoSuchField").is_err());
    }

    #[test]
    fn terminate_stops_a_child_and_finds_it_by_its_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("1234.5")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until the child has exec'ed, /proc shows this test's command line.
        let found = crate::poll(
            Instant::now() + Duration::from_secs(10),
            Duration::from_millis(5),
            || {
                let found = mentioning(&["sleep 1234.5".to_string()]);
                Ok::<_, ()>(found.iter().any(|(p, _)| *p == pid).then_some(found))
            },
        );
        let stopped = terminate(&mut child, Duration::from_secs(5));
        assert!(
            matches!(found, Ok(Some(_))),
            "not found by its command line"
        );
        assert!(stopped);
        assert!(child.try_wait().unwrap().is_some());
    }
}
