//! Standalone mode end to end: a VMI file in, a real TCG guest with a PVC disk out, and a
//! clean stop on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::Pod;
use nix::sys::signal::Signal;

#[test]
fn guest_sees_pvc_disk_writes_to_it_and_stops_cleanly_on_sigterm() {
    let mut pod = Pod::new("boot")
        .with_disk("data", "virtio", 64)
        .kernel_args("lv.write=vda:written-by-guest");
    pod.start();

    // The guest sees the PVC as /dev/vda (64 MiB = 131072 sectors) and writes to it.
    let console = pod.wait_console("LV-WROTE vda written-by-guest", Duration::from_secs(90));
    assert!(
        console.contains("LV-BLOCK vda:131072"),
        "guest did not list vda at 64 MiB:\n{console}"
    );

    // Its console is relayed into the launcher's JSON log too.
    pod.wait_log("\"subcomponent\":\"console\"", Duration::from_secs(5));

    // The pod's hostname resolves inside the pod, as in a Kubernetes pod (libvirtd looks it up
    // at every domain start; unknown, it would go to DNS).
    let pid = pod.daemon_pid("libvirtd").expect("libvirtd pid file");
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "-u", "sh", "-c"])
        .arg("getent hosts \"$(hostname)\"")
        .output()
        .expect("run nsenter");
    let hosts = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && hosts.starts_with("127.0.1.1 "),
        "the pod's hostname does not resolve in the pod: {hosts:?} {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A launcher started with its VM never becomes a migration target: its libvirtd has no
    // hook to fork for every operation.
    let etc = pod.runtime_dir().join("state/etc");
    assert!(
        etc.join("qemu.conf").exists(),
        "{} has no qemu.conf",
        etc.display()
    );
    assert!(
        !etc.join("hooks/qemu").exists(),
        "{} has a hook",
        etc.display()
    );
    // The capabilities were loaded while the VM's files were prepared.
    assert!(
        pod.log()
            .contains("QEMU capabilities loaded ahead of the VM"),
        "{}",
        pod.dump()
    );

    let t = Instant::now();
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    // The test guest powers off on ACPI, so this is far inside the 30 s grace period.
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "stop took {:?}\n{}",
        t.elapsed(),
        pod.dump()
    );
    assert!(
        pod.console().contains("LV-POWEROFF"),
        "guest was not shut down via ACPI\n{}",
        pod.dump()
    );

    let image = std::fs::read(pod.disk_image("data")).unwrap();
    assert!(
        image.starts_with(b"written-by-guest\n"),
        "disk.img does not hold the guest's data"
    );
    let log = pod.log();
    assert!(
        log.contains("\"reason\":\"Shutdown\""),
        "no shutdown event in the log\n{log}"
    );
    // A clean stop logs no error (libvirtd's "End of file from agent socket" included).
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "errors on a clean stop: {errors:#?}");
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

#[test]
fn guest_ignoring_acpi_is_destroyed_when_the_grace_period_ends() {
    let mut pod = Pod::new("grace")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.acpi=ignore")
        .grace(3);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));

    let t = Instant::now();
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(30));
    let took = t.elapsed();
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    assert!(
        pod.console().contains("LV-ACPI-IGNORED"),
        "the guest never saw the power button\n{}",
        pod.dump()
    );
    assert!(
        took >= Duration::from_secs(3),
        "destroyed before the grace period ended ({took:?})"
    );
    // Grace (3 s) + destroy + daemon stop: well before kubelet's SIGKILL would come.
    assert!(
        took < Duration::from_secs(15),
        "stop overran the grace period: {took:?}\n{}",
        pod.dump()
    );
    assert!(pod.log().contains("grace period over"), "{}", pod.dump());
    assert!(
        pod.log().contains("\"reason\":\"Destroyed\""),
        "{}",
        pod.dump()
    );
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

/// Waits until no process of `pod` is left (its daemons and QEMU), or panics listing them.
fn wait_nothing_left(pod: &Pod, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pod.leftover_processes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: still running: {:#?}",
            pod.leftover_processes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Standalone runs as a pod does: the launcher is PID 1 of its own PID namespace, so SIGKILL
/// (of the process the user started, or of the launcher itself) takes libvirtd and QEMU with
/// it; the next start clears what the dead one left; and a second launcher for the same VM is
/// refused up front, with one line, wherever its runtime directory is.
#[test]
fn sigkill_leaves_nothing_a_restart_starts_clean_and_one_launcher_per_vm() {
    let mut pod = Pod::new("pidns")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.start();
    pod.wait_console("LV-COUNT 3", Duration::from_secs(90));

    // A second launcher for the same VM, in another runtime directory.
    let other = pod.dir.join("other-runtime");
    let (status, stderr) = common::run_launcher(&[
        "run",
        "--vmi",
        pod.vmi_path().to_str().unwrap(),
        "--domain-type",
        "qemu",
        "--runtime-dir",
        other.to_str().unwrap(),
        "--volumes-dir",
        pod.pvcs_dir().to_str().unwrap(),
        "--kernel-boot-dir",
        common::guest_dir().to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("virt-launcher:"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("default/vl-pidns already has a launcher")
            && lines[0].contains(&pod.runtime_dir().display().to_string()),
        "{stderr}"
    );
    assert!(
        !other.exists(),
        "the refused launcher made {}",
        other.display()
    );

    // SIGKILL of the process the user started (the waiter in front of the namespace).
    let seen = pod.disk_counter("data");
    pod.signal(Signal::SIGKILL);
    pod.wait_exit(Duration::from_secs(30));
    wait_nothing_left(&pod, "after SIGKILL of the waiter");

    // A restart on what it left: pid files, sockets, libvirt's state.
    pod.spawn();
    // The launcher's log is new at each start; the console log is kept.
    pod.wait_log("\"message\":\"LV-READY\"", Duration::from_secs(90));
    assert!(
        pod.log()
            .contains("removing what a previous launcher left here"),
        "{}",
        pod.dump()
    );
    // The guest counts on from what it wrote before it was killed.
    pod.wait_counter_above("data", seen, Duration::from_secs(60));

    // SIGKILL of the launcher itself (PID 1 in its namespace).
    let pid1 = testkit::procs::launcher_pid(pod.child.as_ref().unwrap().id() as i32);
    assert_ne!(pid1, pod.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid1), Signal::SIGKILL).unwrap();
    let status = pod.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 9), "{}", pod.dump());
    wait_nothing_left(&pod, "after SIGKILL of the launcher");

    // And once more: a clean start and a clean stop.
    pod.spawn();
    pod.wait_log("\"message\":\"LV-READY\"", Duration::from_secs(90));
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{}", pod.dump());
    assert!(
        pod.log().contains("\"reason\":\"Shutdown\""),
        "{}",
        pod.dump()
    );
    wait_nothing_left(&pod, "after SIGTERM");
}

/// A VM with nothing to boot from starts (as in KubeVirt) but says so at once, instead of
/// looking like a guest that is booting; it stops cleanly.
#[test]
fn a_vm_with_nothing_to_boot_is_warned_about() {
    let mut pod = Pod::new("noboot");
    pod.extra_args = vec!["--console-silence-warning".into(), "5".into()];
    pod.prepare();
    std::fs::write(
        pod.vmi_path(),
        "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: vl-noboot\n\
         spec:\n  terminationGracePeriodSeconds: 1\n  domain:\n    resources:\n      requests:\n        \
         memory: 64Mi\n    devices: {}\n",
    )
    .unwrap();
    pod.spawn();
    pod.wait_log("\"message\":\"domain running\"", Duration::from_secs(90));
    let warning = pod
        .log()
        .lines()
        .find(|l| l.contains("nothing to boot from"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no warning\n{}", pod.dump()));
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        warning.contains("spec.domain.devices.disks") && warning.contains("kernelBoot"),
        "{warning}"
    );
    // Nothing on the serial console for the set time (the firmware finds nothing to boot
    // and says nothing there): one warning saying so.
    pod.wait_log(
        "the guest has written nothing to its serial console for 5 s",
        Duration::from_secs(60),
    );
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{}", pod.dump());
    wait_nothing_left(&pod, "after SIGTERM");
}
