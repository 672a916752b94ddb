//! Disk features of the libvirt 11 / QEMU 10 stack on a real TCG guest:
//! - per-queue iothread mapping: a VMI with `ioThreadsPolicy: supplementalPool` runs its virtio
//!   disk with the queues mapped over the pool (`iothread-vq-mapping`, QEMU ≥ 9 via libvirt ≥ 10)
//!   and the guest writes through it;
//! - changed-block tracking: with `status.changedBlockTracking.state: Enabled` the PVC sits
//!   behind a qcow2 overlay whose raw data file (`<dataStore>`) is the PVC image itself, and
//!   the guest's writes land in the PVC image.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Pod;
use nix::sys::signal::Signal;

#[test]
fn supplemental_pool_maps_the_virtio_disk_queues_and_the_guest_writes_through_them() {
    let mut pod = Pod::new("iopool")
        .with_disk("data", "virtio", 64)
        .kernel_args("lv.write=vda:written-through-the-pool");
    pod.prepare();
    // Two vCPUs and blockMultiQueue: two queues spread over a pool of two iothreads.
    let yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    let yaml = yaml
        .replacen(
            "  domain:\n",
            "  domain:\n    ioThreadsPolicy: supplementalPool\n    ioThreads:\n      \
             supplementalPoolThreadCount: 2\n    cpu:\n      cores: 2\n",
            1,
        )
        .replacen(
            "    devices:\n",
            "    devices:\n      blockMultiQueue: true\n",
            1,
        );
    assert!(yaml.contains("supplementalPool") && yaml.contains("blockMultiQueue"));
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();

    let console = pod.wait_console(
        "LV-WROTE vda written-through-the-pool",
        Duration::from_secs(120),
    );
    assert!(
        console.contains("LV-BLOCK vda:131072"),
        "guest did not list vda at 64 MiB:\n{console}"
    );

    let qemu = qemu_command_line(&pod);
    assert!(
        qemu.contains("iothread-vq-mapping"),
        "QEMU's virtio-blk has no iothread-vq-mapping:\n{qemu}"
    );
    for id in ["iothread1", "iothread2"] {
        assert!(qemu.contains(id), "no {id} in QEMU's command line:\n{qemu}");
    }

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    let image = std::fs::read(pod.disk_image("data")).unwrap();
    assert!(
        image.starts_with(b"written-through-the-pool\n"),
        "disk.img does not hold the guest's data"
    );
}

/// The overlay as KubeVirt's launcher makes it before the domain starts (virtwrap/storage/
/// cbt.go: qcow2, data file = the volume, `data-file-raw`, 256 KiB clusters, the volume's
/// size). `qemu-img create` would recreate the data file and lose the volume's contents, so the
/// overlay is created on a scratch data file and then pointed at the volume (`amend`).
fn cbt_overlay(overlay: &Path, volume: &Path) {
    let size = std::fs::metadata(volume).unwrap().len();
    let scratch = overlay.with_extension("scratch");
    let run = |args: &[&str]| {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let opts = format!(
        "data_file={},data_file_raw=on,cluster_size=256k",
        scratch.display()
    );
    let (o, s) = (overlay.to_str().unwrap(), size.to_string());
    run(&["create", "-q", "-f", "qcow2", "-o", &opts, o, &s]);
    let amend = format!("data_file={}", volume.display());
    run(&["amend", "-f", "qcow2", "-o", &amend, o]);
    std::fs::remove_file(scratch).unwrap();
}

#[test]
fn cbt_overlay_keeps_the_guest_data_in_the_volume() {
    let mut pod = Pod::new("cbt")
        .with_disk("data", "virtio", 64)
        .kernel_args("lv.write=vda:written-through-the-overlay");
    pod.prepare();
    let mut yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    assert!(!yaml.contains("\nstatus:"), "{yaml}");
    yaml.push_str("status:\n  changedBlockTracking:\n    state: Enabled\n");
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    // The pod's /var/lib/libvirt is <runtime>/state/lib in standalone mode.
    let cbt_dir = pod.runtime_dir().join("state/lib/qemu/cbt");
    std::fs::create_dir_all(&cbt_dir).unwrap();
    cbt_overlay(&cbt_dir.join("data.qcow2"), &pod.disk_image("data"));
    pod.spawn();

    let console = pod.wait_console(
        "LV-WROTE vda written-through-the-overlay",
        Duration::from_secs(120),
    );
    assert!(
        console.contains("LV-BLOCK vda:131072"),
        "guest did not list vda at 64 MiB:\n{console}"
    );
    let qemu = qemu_command_line(&pod);
    assert!(
        qemu.contains("data-file") && qemu.contains("cbt/data.qcow2"),
        "QEMU does not open the overlay with a data file:\n{qemu}"
    );

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    let image = std::fs::read(pod.disk_image("data")).unwrap();
    assert!(
        image.starts_with(b"written-through-the-overlay\n"),
        "the PVC image does not hold the guest's data"
    );
}

/// The command line of `pod`'s QEMU.
fn qemu_command_line(pod: &Pod) -> String {
    let needle = format!("guest=default_{},", pod.name);
    testkit::procs::pids()
        .into_iter()
        .filter_map(testkit::procs::cmdline)
        .find(|c| c.contains(&needle))
        .unwrap_or_else(|| panic!("no QEMU for {}\n{}", pod.name, pod.dump()))
}
