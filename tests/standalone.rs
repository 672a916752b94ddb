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
