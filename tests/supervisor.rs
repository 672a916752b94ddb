//! The supervisor keeps the guest alive through daemon crashes, reports how the VM ended, and
//! leaves no process behind.

mod common;

use std::time::{Duration, Instant};

use common::Pod;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Kills `daemon` with SIGKILL and waits for the launcher to have restarted it.
fn kill_daemon_and_wait_restart(pod: &mut Pod, daemon: &str) {
    let old = pod.daemon_pid(daemon).expect("daemon pid file");
    let restarted = format!("\"daemon\":\"{daemon}\",\"event\":\"restarted\"");
    let seen_before = pod.log().matches(&restarted).count();
    kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
    let done = common::wait(Duration::from_secs(10), Duration::from_millis(20), || {
        let replaced = pod.daemon_pid(daemon).is_some_and(|p| p != old);
        (replaced && pod.log().matches(&restarted).count() > seen_before).then_some(())
    });
    assert!(done.is_some(), "{daemon} was not restarted\n{}", pod.dump());
}

#[test]
fn guest_survives_daemon_crashes_and_later_events_still_arrive() {
    let mut pod = Pod::new("daemons")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.start();
    pod.wait_console("LV-COUNT 3", Duration::from_secs(90));

    // libvirtd dies: restarted, we reconnect, the guest keeps counting.
    let before = pod.disk_counter("data");
    kill_daemon_and_wait_restart(&mut pod, "libvirtd");
    pod.wait_log("reconnected to libvirtd", Duration::from_secs(15));
    pod.wait_counter_above("data", before + 5, Duration::from_secs(30));

    // The console keeps reaching the console log and the launcher's log: QEMU writes the log
    // itself, and the pod runs no virtlogd that could cut it.
    let after = pod.disk_counter("data");
    let n = pod.wait_counter_above("data", after + 5, Duration::from_secs(30));
    let line = format!("LV-COUNT {n}");
    pod.wait_console(&line, Duration::from_secs(10));
    pod.wait_log(&format!("\"message\":\"{line}\""), Duration::from_secs(10));
    let procs = pod.leftover_processes();
    assert!(
        procs.iter().any(|p| p.contains("libvirtd"))
            && !procs.iter().any(|p| p.contains("virtlogd")),
        "the pod runs libvirtd and no virtlogd: {procs:?}"
    );

    // Events still arrive over the new connection: SIGTERM → ACPI → the guest powers off and
    // the launcher sees the Stopped event and exits 0.
    pod.sigterm_and_expect_shutdown();
}

#[test]
fn qemu_killed_is_reported_as_a_crash_with_non_zero_exit() {
    let mut pod = Pod::new("qemukill").with_disk("data", "virtio", 16);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let qemu = pod
        .leftover_processes()
        .into_iter()
        .find(|p| p.contains("qemu-system"))
        .unwrap_or_else(|| panic!("no QEMU process found\n{}", pod.dump()));
    let pid: i32 = qemu.split(':').next().unwrap().parse().unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let status = pod.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a killed QEMU must not look like a clean stop\n{}",
        pod.dump()
    );
    assert!(
        pod.log().contains("domain stopped"),
        "no final event\n{}",
        pod.dump()
    );
    // One line says so, with the end of QEMU's log.
    let said: Vec<String> = pod
        .log()
        .lines()
        .filter(|l| l.starts_with("virt-launcher:"))
        .map(str::to_string)
        .collect();
    assert_eq!(said.len(), 1, "{}", pod.dump());
    assert!(
        said[0].contains("stopped unexpectedly (")
            && said[0].contains("QEMU's last log lines:")
            && said[0].contains("shutting down, reason=crashed"),
        "{}",
        said[0]
    );
    assert!(
        pod.log()
            .lines()
            .any(|l| l.contains("\"level\":\"ERROR\"") && l.contains("stopped unexpectedly")),
        "{}",
        pod.dump()
    );
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

#[test]
fn second_launcher_on_the_same_runtime_dir_is_refused() {
    let mut pod = Pod::new("twice").with_disk("data", "virtio", 16);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    // The same VM anywhere is refused by its machine-wide lock (tests/standalone.rs); a
    // launcher with no VM yet on the same runtime directory, by the directory's.
    let out = pod.command().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already has a launcher"), "{stderr}");
    pod.wait_for_sync = true;
    let out = pod.command().output().unwrap();
    pod.wait_for_sync = false;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another launcher"), "{stderr}");
    // The first one is unaffected.
    pod.signal(Signal::SIGTERM);
    assert!(
        pod.wait_exit(Duration::from_secs(40)).success(),
        "{}",
        pod.dump()
    );
}

/// The host pid of the process that is PID 1 in the pid namespace `unshare` created.
fn pid_one_below(unshare_pid: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .map(|v| v.trim().to_string());
            let nspid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().last().unwrap_or("").to_string());
            if ppid.as_deref() == Some(&unshare_pid.to_string()) && nspid.as_deref() == Some("1") {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no PID 1 below unshare {unshare_pid}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn launcher_as_pid_1_reaps_and_stops_cleanly() {
    let mut pod = Pod::new("pid1")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.write=vda:as-pid-1");
    pod.wrapper = ["unshare", "--pid", "--fork", "--mount-proc"]
        .map(String::from)
        .to_vec();
    pod.start();
    pod.wait_console("LV-WROTE vda as-pid-1", Duration::from_secs(90));
    let launcher = pid_one_below(pod.child.as_ref().unwrap().id() as i32);
    // No zombie lingers under PID 1 (everything it starts, and every orphan, is reaped).
    let zombies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|s| s.contains(&format!("PPid:\t{launcher}\n")) && s.contains("State:\tZ"))
        .collect();
    assert!(zombies.is_empty(), "zombies under PID 1: {zombies:?}");
    // PID 1 ignores signals it has no handler for; ours handles SIGTERM.
    kill(Pid::from_raw(launcher), Signal::SIGTERM).unwrap();
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{}", pod.dump());
    assert!(
        pod.log().contains("\"reason\":\"Shutdown\""),
        "{}",
        pod.dump()
    );
    assert!(std::fs::read(pod.disk_image("data"))
        .unwrap()
        .starts_with(b"as-pid-1\n"));
    assert!(
        pod.leftover_processes().is_empty(),
        "{:?}",
        pod.leftover_processes()
    );
}

/// The console log is bounded (`--log-max-bytes`): past the cap the launcher copies it to
/// `<log>.1` and truncates it; QEMU goes on appending at the new end (it opened the log with
/// O_APPEND: no hole, no lost line), and the launcher's own log relays every line across the
/// rotation.
#[test]
fn console_log_is_rotated_at_the_cap_and_relayed_without_a_gap() {
    const CAP: u64 = 1024;
    let mut pod = Pod::new("logcap")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.extra_args = vec!["--log-max-bytes".into(), CAP.to_string()];
    pod.start();
    pod.wait_console("LV-COUNT 3", Duration::from_secs(90));
    let log = pod.console_log();
    let mut old = log.clone().into_os_string();
    old.push(".1");
    let old = std::path::PathBuf::from(old);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut largest = 0;
    while !old.exists() {
        largest = largest.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
        assert!(
            Instant::now() < deadline,
            "no rotation within 60 s (largest {largest} bytes)\n{}",
            pod.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A few more lines after the rotation.
    let n = pod.wait_counter_above(
        "data",
        pod.disk_counter("data") + 5,
        Duration::from_secs(30),
    );
    pod.wait_console(&format!("LV-COUNT {n}"), Duration::from_secs(10));
    let live = std::fs::read(&log).unwrap();
    let kept = std::fs::read(&old).unwrap();
    println!(
        "cap {CAP}: largest live log seen {largest} bytes, .1 {} bytes, live now {} bytes",
        kept.len(),
        live.len()
    );
    // The launcher checks every 200 ms; the guest writes a 12-byte line every 200 ms.
    assert!(largest <= CAP + 256 && kept.len() as u64 <= CAP + 256);
    assert!(
        live.starts_with(b"LV-") && !live.contains(&0),
        "the live log does not start with the guest's next line (a hole: not O_APPEND?): {:?}",
        String::from_utf8_lossy(&live[..live.len().min(64)])
    );
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "exit {status}\n{}", pod.dump());
    let relayed = pod.log();
    assert!(relayed.contains("log rotated"), "{}", pod.dump());
    for i in 1..=n {
        assert!(
            relayed.contains(&format!("\"message\":\"LV-COUNT {i}\"")),
            "LV-COUNT {i} missing from the launcher's log (rotation lost it)\n{}",
            pod.dump()
        );
    }
}

/// When, during a start, libvirtd is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// As the launcher logs "starting domain": libvirtd is defining the domain, probing QEMU's
    /// capabilities or spawning it.
    Define,
    /// This long after QEMU appeared: libvirtd is setting it up over QMP, the guest has not
    /// started (0 ms), or is about to (later).
    Qemu(u64),
}

/// Starts a counting guest whose disk already holds 1000, SIGKILLs the pod's libvirtd at
/// `when`, and waits for the guest to count on. Returns the time from the kill to the guest
/// counting. The launcher must recover: libvirtd comes back within a second, and the start
/// either finished (the domain is adopted) or is done again.
fn start_and_kill_libvirtd(name: &str, when: KillAt) -> (Pod, Duration) {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.prepare();
    std::fs::write(pod.disk_image("data"), b"1000\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(pod.disk_image("data"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    pod.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hit = match when {
            KillAt::Define => pod.log().contains("\"message\":\"starting domain\""),
            KillAt::Qemu(_) => pod
                .leftover_processes()
                .iter()
                .any(|p| p.contains("qemu-system")),
        };
        if hit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the start never got to {when:?}\n{}",
            pod.dump()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    if let KillAt::Qemu(ms) = when {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let libvirtd = pod.daemon_pid("libvirtd").expect("libvirtd pid");
    kill(Pid::from_raw(libvirtd), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(90);
    while !pod.console().contains("LV-COUNT 1003") {
        if let Some(status) = pod.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "libvirtd killed at {when:?}: the launcher exited ({status}) instead of recovering\n{}",
                pod.dump()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not run within 90 s after libvirtd was killed at {when:?}\n{}",
            pod.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (pod, killed.elapsed())
}

/// The disk holds a count, never less than what it held or what the guest printed.
fn assert_counter_intact(pod: &Pod) {
    let first = std::fs::read(pod.disk_image("data")).unwrap();
    let line = first.split(|b| *b == b'\n').next().unwrap();
    let n: u64 = String::from_utf8_lossy(line)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("disk no longer holds a count: {:?}", &first[..16]));
    assert!(n >= 1000, "the disk lost its data: {n}");
    assert!(
        n >= pod.last_console_count(),
        "disk holds {n} but the guest printed {}",
        pod.last_console_count()
    );
}

#[test]
fn libvirtd_killed_during_a_start_is_recovered_from() {
    let timings = [KillAt::Define, KillAt::Qemu(0), KillAt::Qemu(150)];
    for (i, when) in timings.into_iter().enumerate() {
        let (mut pod, took) = start_and_kill_libvirtd(&format!("startkill{i}"), when);
        // One guest, which counted on from the disk's value (it booted once, on intact data).
        let qemus = pod
            .leftover_processes()
            .iter()
            .filter(|p| p.contains("qemu-system"))
            .count();
        assert_eq!(qemus, 1, "{:#?}", pod.leftover_processes());
        let counts: Vec<u64> = pod
            .console()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("LV-COUNT ")?.trim().parse().ok())
            .collect();
        assert_eq!(counts[..3], [1001, 1002, 1003], "{}", pod.dump());
        assert_eq!(pod.console_count("LV-READY"), 1, "{}", pod.dump());
        eprintln!(
            "libvirtd killed at {when:?}: guest counting {} ms later",
            took.as_millis()
        );
        // And the launcher still works: SIGTERM stops the guest cleanly.
        pod.sigterm_and_expect_shutdown();
        assert_counter_intact(&pod);
    }
}
