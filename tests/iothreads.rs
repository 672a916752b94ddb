//! Per-queue iothread mapping on the real stack: a VMI with `ioThreadsPolicy:
//! supplementalPool` boots the TCG test guest, QEMU runs the virtio disk with its queues
//! mapped over the pool (`iothread-vq-mapping`, QEMU ≥ 9 via libvirt ≥ 10), and the guest
//! writes through it.

mod common;

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

    let needle = format!("guest=default_{},", pod.name);
    let qemu = testkit::procs::pids()
        .into_iter()
        .filter_map(testkit::procs::cmdline)
        .find(|c| c.contains(&needle))
        .unwrap_or_else(|| panic!("no QEMU for {}\n{}", pod.name, pod.dump()));
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
