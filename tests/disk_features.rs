//! Disk features of the libvirt 11 / QEMU 10 stack on a real TCG guest:
//! - per-queue iothread mapping: a VMI with `ioThreadsPolicy: supplementalPool` runs its virtio
//!   disk with the queues mapped over the pool (`iothread-vq-mapping`, QEMU ≥ 9 via libvirt ≥ 10)
//!   and the guest writes through it;
//! - changed-block tracking: with `status.changedBlockTracking.state: Initializing` the
//!   launcher puts the PVC behind a qcow2 overlay whose raw data file (`<dataStore>`) is the PVC
//!   image itself: its data is kept and read through, and the guest's writes land in it;
//! - sysprep: the ISO made of the answer file is mounted and read by the guest;
//! - `blockSize.matchVolume`: the guest sees the claim filesystem's block size;
//! - devices placed on the root complex (KubeVirt's annotation) boot and work.

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

/// Changed-block tracking as KubeVirt starts it (`Initializing`, what virt-controller sets on a
/// new VMI): the launcher makes the qcow2 overlay in the pod's `/var/lib/libvirt/qemu/cbt`
/// (`<runtime>/state/lib` standalone) with the PVC as its raw data file. The PVC holds data
/// before the start: the guest reads it through the overlay, nothing of it is lost (a
/// `qemu-img create -o data_file=<pvc>` would have emptied it), and the guest's write lands in
/// the PVC image.
#[test]
fn cbt_overlay_made_by_the_launcher_keeps_the_pvc_data_and_takes_the_writes() {
    let mut pod = Pod::new("cbt")
        .with_disk("data", "virtio", 64)
        .kernel_args("lv.read=vda lv.write=vda:written-through-the-overlay");
    pod.prepare();
    // What the claim holds before the start: a first line and a marker at 8 MiB.
    let image = pod.disk_image("data");
    let marker = b"kept-at-8-MiB-by-the-overlay";
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all(b"held-before-the-start\n").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(marker).unwrap();
    }
    let mut yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    assert!(!yaml.contains("\nstatus:"), "{yaml}");
    yaml.push_str("status:\n  changedBlockTracking:\n    state: Initializing\n");
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    let overlay = pod.runtime_dir().join("state/lib/qemu/cbt/data.qcow2");
    assert!(!overlay.exists());
    pod.spawn();

    let console = pod.wait_console(
        "LV-WROTE vda written-through-the-overlay",
        Duration::from_secs(120),
    );
    assert!(
        console.contains("LV-READ vda held-before-the-start"),
        "the guest did not read the PVC's data through the overlay:\n{console}"
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
    // The overlay is KubeVirt's: qcow2, 256 KiB clusters, the PVC as its raw data file.
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info {}: {e}", overlay.display()));
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["cluster-size"], 256 << 10, "{info}");
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");
    let data = &info["format-specific"]["data"];
    assert_eq!(data["data-file"], image.to_str().unwrap(), "{info}");
    assert_eq!(data["data-file-raw"], true, "{info}");

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes.starts_with(b"written-through-the-overlay\n"),
        "the PVC image does not hold the guest's data"
    );
    assert_eq!(
        &bytes[8 << 20..(8 << 20) + marker.len()],
        marker,
        "the PVC lost what it held at 8 MiB"
    );
    assert_eq!(bytes.len(), 64 << 20, "the PVC image changed size");
}

/// `blockSize.matchVolume` (KubeVirt: the volume's block sizes; for a file, its filesystem's
/// block size): the launcher probes the claim image's filesystem and the guest's kernel sees
/// those sizes on the disk.
#[test]
fn match_volume_gives_the_guest_the_claim_filesystem_block_size() {
    let mut pod = Pod::new("bsize")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.bsize=vda");
    pod.prepare();
    let yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    let disk = "        - name: data\n          disk:\n            bus: virtio\n";
    assert!(yaml.contains(disk), "{yaml}");
    let yaml = yaml.replacen(
        disk,
        &format!("{disk}          blockSize:\n            matchVolume: {{}}\n"),
        1,
    );
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    // statfs's f_bsize of the claim image, as coreutils reads it.
    let out = Command::new("stat")
        .args(["-f", "-c", "%s"])
        .arg(pod.disk_image("data"))
        .output()
        .unwrap();
    let size = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(size.parse::<u64>().is_ok(), "stat -f: {size:?}");
    pod.spawn();

    let console = pod.wait_console("LV-BSIZE vda ", Duration::from_secs(120));
    assert!(
        console.contains(&format!("LV-BSIZE vda {size} {size}")),
        "the guest does not see {size}-byte blocks:\n{console}"
    );
    let xml = pod.virsh(&["dumpxml", &format!("default_{}", pod.name)]);
    let want = format!(
        "<blockio logical_block_size='{size}' physical_block_size='{size}' discard_granularity='{size}'/>"
    );
    assert!(xml.contains(&want), "domain XML lacks {want}:\n{xml}");

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
}

/// KubeVirt's `kubevirt.io/placePCIDevicesOnRootComplex` annotation: every PCI device on the
/// root complex (bus 0x00), no spare root ports; the guest runs and uses its virtio disk.
#[test]
fn devices_placed_on_the_root_complex_boot_and_work() {
    let mut pod = Pod::new("rootcplx")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.write=vda:on-the-root-complex");
    pod.annotations
        .push("kubevirt.io/placePCIDevicesOnRootComplex: \"true\"".into());
    pod.start();
    pod.wait_console("LV-WROTE vda on-the-root-complex", Duration::from_secs(120));
    let xml = pod.virsh(&["dumpxml", &format!("default_{}", pod.name)]);
    let data = xml
        .split("</disk>")
        .find(|d| d.contains("ua-data"))
        .unwrap_or_else(|| panic!("no ua-data disk\n{xml}"));
    assert!(
        data.contains(
            "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
        ),
        "{data}"
    );
    let balloon = xml.split("<memballoon").nth(1).unwrap_or_default();
    assert!(balloon.contains("bus='0x00'"), "{xml}");
    assert!(!xml.contains("pcie-root-port"), "{xml}");

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
}

/// A sysprep volume (KubeVirt: a ConfigMap or Secret mounted at
/// `/var/run/kubevirt-private/sysprep/<volume>/`) becomes an ISO labelled `unattendCD` on a
/// cdrom; the guest mounts it and reads the answer file.
#[test]
fn sysprep_iso_answer_file_is_read_by_the_guest() {
    // Standalone reads the sources where KubeVirt's pod mounts them, on the host: a volume
    // name of this run's own.
    let volume = format!("lvsp{}", std::process::id());
    let source = Path::new("/var/run/kubevirt-private/sysprep").join(&volume);
    let iso = Path::new("/var/run/kubevirt-private/sysprep-disks").join(format!("{volume}.iso"));
    std::fs::create_dir_all(&source).unwrap();
    let answer = format!("<unattend>lv-sysprep-{volume}</unattend>");
    std::fs::write(source.join("autounattend.xml"), format!("{answer}\n")).unwrap();

    let mut pod = Pod::new("sysprep")
        .with_disk("data", "virtio", 1)
        .kernel_args("lv.file=sr0:autounattend.xml");
    pod.prepare();
    let yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    let yaml = yaml
        .replacen(
            "      disks:\n",
            &format!("      disks:\n        - name: {volume}\n          cdrom:\n            bus: scsi\n"),
            1,
        )
        .replacen(
            "  volumes:\n",
            &format!("  volumes:\n    - name: {volume}\n      sysprep:\n        configMap:\n          name: unattend\n"),
            1,
        );
    assert!(
        yaml.contains("sysprep:") && yaml.contains("cdrom:"),
        "{yaml}"
    );
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();

    let console = pod.wait_console("LV-FILE sr0 ", Duration::from_secs(120));
    let line = console
        .lines()
        .find(|l| l.contains("LV-FILE sr0 "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        line,
        format!("LV-FILE sr0 autounattend.xml {answer}"),
        "{console}"
    );
    let xml = pod.virsh(&["dumpxml", &format!("default_{}", pod.name)]);
    assert!(
        xml.contains(&format!("<source file='{}'", iso.display())),
        "the cdrom is not the sysprep ISO:\n{xml}"
    );

    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    let _ = std::fs::remove_dir_all(&source);
    let _ = std::fs::remove_file(&iso);
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
