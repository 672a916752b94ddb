//! Storage while the VM runs: hot-plug of Filesystem and Block PVCs on virtio, detach,
//! re-attach with the data intact, online expansion, and failures that leave the VM running;
//! and CPU hot-plug (more sockets, up to maxSockets).
//! Every step is checked from inside the guest (its console markers).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Pod;
use serde_json::{json, Value};
use testkit::guest::{self, first_line};
use tonic::Code;
use virt_launcher::api::client;
use virt_launcher::api::pb::{self, DomainState, VolumePhase};

use common::Client;

/// A loop device over a file, exposed as a Block-mode PVC device node in the hotplug dir.
struct LoopDev {
    dev: String,
    node: PathBuf,
}

impl LoopDev {
    fn new(backing: &Path, size_mib: u64, node: PathBuf) -> LoopDev {
        std::fs::File::create(backing)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        // kubelet exposes a Block PVC as a device node; make one the same way.
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&dev).unwrap().rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        let st = Command::new("mknod")
            .arg(&node)
            .args(["b", &major.to_string(), &minor.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        LoopDev { dev, node }
    }

    /// Grows the backing file and tells the loop driver (the storage grew).
    fn grow(&self, backing: &Path, size_mib: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(backing)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        assert!(Command::new("losetup")
            .args(["-c", &self.dev])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.node);
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

async fn vmi(c: &mut Client) -> Value {
    serde_json::from_slice(&c.get_vmi(pb::Empty {}).await.unwrap().into_inner().vmi).unwrap()
}

async fn sync(c: &mut Client, vmi: &Value) -> Result<pb::Domain, tonic::Status> {
    c.sync(pb::SyncRequest {
        vmi: serde_json::to_vec(vmi).unwrap(),
    })
    .await
    .map(|r| r.into_inner().domain.unwrap())
}

fn disk<'a>(d: &'a pb::Domain, volume: &str) -> Option<&'a pb::Disk> {
    d.disks.iter().find(|k| k.volume == volume)
}

/// Waits until the guest's latest LV-BLOCK line is one `want` accepts.
fn wait_block_line(pod: &mut Pod, want: impl Fn(&str) -> bool, what: &str) {
    let shown = common::wait(Duration::from_secs(30), Duration::from_millis(100), || {
        let console = pod.console();
        let latest = console.lines().rev().find(|l| l.starts_with("LV-BLOCK"));
        latest.is_some_and(&want).then_some(())
    });
    assert!(shown.is_some(), "guest never showed {what}\n{}", pod.dump());
}

/// The guest's name for the disk of `sectors` sectors in its latest LV-BLOCK line.
fn wait_guest_dev(pod: &mut Pod, sectors: u64) -> String {
    let dev = common::wait(Duration::from_secs(30), Duration::from_millis(100), || {
        guest::device_of(&pod.console(), sectors)
    });
    dev.unwrap_or_else(|| panic!("guest shows no disk of {sectors} sectors\n{}", pod.dump()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_and_block_pvcs_attach_detach_and_come_back_with_their_data() {
    let mut pod = Pod::new("hotplug")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.hotplug=rw");
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let fs_image = pod.hotplug_dir().join("fsvol.img");
    std::fs::File::create(&fs_image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let backing = pod.dir.join("blkvol.backing");
    let blk = LoopDev::new(&backing, 24, pod.hotplug_dir().join("blkvol"));

    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;
    client::add_hotplug_volume(&mut v, "fsvol", "fsvol", "virtio", false).unwrap();
    client::add_hotplug_volume(&mut v, "blkvol", "blkvol", "virtio", false).unwrap();
    // Both at once, in one Sync.
    let d = sync(&mut c, &v).await.expect("attach both");
    assert_eq!(disk(&d, "fsvol").unwrap().phase(), VolumePhase::Ready);
    assert_eq!(disk(&d, "blkvol").unwrap().phase(), VolumePhase::Ready);
    assert!(disk(&d, "fsvol").unwrap().hotplugged);

    // The guest sees both and writes to each. Guest names follow PCI probe order, not
    // libvirt's target names, so the disks are told apart by size (32 MiB, 24 MiB).
    let fs_g = wait_guest_dev(&mut pod, 65536);
    let blk_g = wait_guest_dev(&mut pod, 49152);
    pod.wait_console(
        &format!("LV-HOTWROTE {fs_g} lv-hot-{fs_g}"),
        Duration::from_secs(30),
    );
    pod.wait_console(
        &format!("LV-HOTWROTE {blk_g} lv-hot-{blk_g}"),
        Duration::from_secs(30),
    );

    // Detach both: the guest lets go, the launcher reports them gone only then.
    client::remove_volume(&mut v, "fsvol").unwrap();
    client::remove_volume(&mut v, "blkvol").unwrap();
    let d = sync(&mut c, &v).await.expect("detach both");
    assert!(
        disk(&d, "fsvol").is_none() && disk(&d, "blkvol").is_none(),
        "{d:?}"
    );
    wait_block_line(&mut pod, |l| l == "LV-BLOCK vda:32768", "both disks gone");
    // The guest's writes are in the PVCs.
    assert_eq!(first_line(&fs_image), format!("lv-hot-{fs_g}"));
    assert_eq!(first_line(&backing), format!("lv-hot-{blk_g}"));

    // Re-attach: the guest reads its data back.
    let before = pod.console_count("LV-HOTREAD");
    client::add_hotplug_volume(&mut v, "fsvol", "fsvol", "virtio", false).unwrap();
    client::add_hotplug_volume(&mut v, "blkvol", "blkvol", "virtio", false).unwrap();
    sync(&mut c, &v).await.expect("re-attach");
    let deadline = Instant::now() + Duration::from_secs(30);
    while pod.console_count("LV-HOTREAD") < before + 2 {
        assert!(
            Instant::now() < deadline,
            "guest did not read the re-attached disks\n{}",
            pod.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fs_g2 = wait_guest_dev(&mut pod, 65536);
    let blk_g2 = wait_guest_dev(&mut pod, 49152);
    let console = pod.console();
    assert!(
        console.contains(&format!("LV-HOTREAD {fs_g2} lv-hot-{fs_g}")),
        "fsvol data lost\n{}",
        pod.dump()
    );
    assert!(
        console.contains(&format!("LV-HOTREAD {blk_g2} lv-hot-{blk_g}")),
        "blkvol data lost\n{}",
        pod.dump()
    );

    // Block device grows (the storage was expanded): a Sync resizes it live.
    blk.grow(&backing, 40);
    let d = sync(&mut c, &v).await.expect("expand block");
    assert_eq!(disk(&d, "blkvol").unwrap().size_bytes, 40 << 20);
    pod.wait_console(&format!("{blk_g2}:81920"), Duration::from_secs(20));

    common::stop_cleanly(pod, Duration::from_secs(40)).await;
    drop(blk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_pvc_expands_online_and_a_shrink_is_refused() {
    let mut pod = Pod::new("expand")
        .with_disk("data", "virtio", 64)
        .kernel_args("lv.write=vda:keep-me");
    pod.start();
    pod.wait_console("LV-WROTE vda keep-me", Duration::from_secs(90));
    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;

    // The controller reports the claim grew to 256 MiB (no filesystem overhead on this claim).
    let status = json!({"name": "data", "phase": "Ready",
        "persistentVolumeClaimInfo": {"claimName": "data", "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "256Mi"}, "filesystemOverhead": "0"}});
    v["status"] = json!({"volumeStatus": [status]});
    let d = sync(&mut c, &v).await.expect("expand");
    assert_eq!(disk(&d, "data").unwrap().size_bytes, 256 << 20);
    assert_eq!(
        std::fs::metadata(pod.disk_image("data")).unwrap().len(),
        256 << 20
    );
    pod.wait_console("vda:524288", Duration::from_secs(20));
    assert_eq!(
        first_line(&pod.disk_image("data")),
        "keep-me",
        "data lost in the expansion"
    );

    // With the default 5.5% overhead the usable size would be smaller than the image: refused.
    v["status"]["volumeStatus"][0]["persistentVolumeClaimInfo"]["filesystemOverhead"] =
        json!("0.5");
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("data") && e.message().contains("shrink"),
        "{}",
        e.message()
    );
    assert_eq!(
        std::fs::metadata(pod.disk_image("data")).unwrap().len(),
        256 << 20,
        "image was touched"
    );
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(d.state(), DomainState::Running);

    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attaches_say_why_and_leave_the_vm_running() {
    let mut pod = Pod::new("hpfail")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    // No spare PCIe ports: a virtio hot-plug has nowhere to go.
    pod.annotations
        .push("virt-launcher.kubevirt.io/spare-pcie-root-ports: \"0\"".into());
    pod.start();
    pod.wait_console("LV-COUNT 2", Duration::from_secs(90));
    let mut c = pod.client().await;
    let base = vmi(&mut c).await;

    // 1. The backing file is missing.
    let mut v = base.clone();
    client::add_hotplug_volume(&mut v, "ghost", "ghost", "virtio", false).unwrap();
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("ghost") && e.message().contains("ghost.img"),
        "{}",
        e.message()
    );
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(disk(&d, "ghost").unwrap().phase(), VolumePhase::Failed);
    assert!(
        disk(&d, "ghost").unwrap().message.contains("No such file"),
        "{d:?}"
    );

    // 2. No free PCIe port: libvirt keeps one port free on its own, so the first virtio
    // hot-plug may still fit; attaching more must fail cleanly, with nothing half-attached.
    let mut v = base.clone();
    let mut attached = Vec::new();
    let mut refused = None;
    for i in 0..3 {
        let name = format!("noport{i}");
        std::fs::File::create(pod.hotplug_dir().join(format!("{name}.img")))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        client::add_hotplug_volume(&mut v, &name, &name, "virtio", false).unwrap();
        match sync(&mut c, &v).await {
            Ok(d) => attached.push(disk(&d, &name).unwrap().target.clone()),
            Err(e) => {
                refused = Some((name, e));
                break;
            }
        }
    }
    let (name, e) = refused.expect("a VM without spare PCIe ports took three virtio hot-plugs");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains(&name) && e.message().contains("attach failed"),
        "{}",
        e.message()
    );
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(disk(&d, &name).unwrap().phase(), VolumePhase::Failed);

    // 3. A bus that cannot hot-plug: the spec is wrong.
    let mut v = base.clone();
    client::add_hotplug_volume(&mut v, "satavol", "satavol", "sata", false).unwrap();
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The VM kept running all along, with only its own disk, and its counter advanced.
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(d.state(), DomainState::Running);
    let n = pod.console_count("LV-COUNT");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        pod.console_count("LV-COUNT") > n,
        "guest stopped counting\n{}",
        pod.dump()
    );
    let mut expected = "LV-BLOCK vda:32768".to_string();
    for t in &attached {
        expected += &format!(" {t}:16384");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last_block = pod
            .console()
            .lines()
            .rev()
            .find(|l| l.starts_with("LV-BLOCK"))
            .unwrap()
            .to_string();
        if last_block == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest sees {last_block:?}, expected {expected:?} (half-attached disk?)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A scsi hot-plug needs no PCIe port: it works on the same VM.
    std::fs::File::create(pod.hotplug_dir().join("scsivol.img"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut v = base.clone();
    client::add_hotplug_volume(&mut v, "scsivol", "scsivol", "scsi", false).unwrap();
    let d = sync(&mut c, &v).await.expect("scsi attach");
    assert_eq!(disk(&d, "scsivol").unwrap().phase(), VolumePhase::Ready);
    pod.wait_console("sda:16384", Duration::from_secs(20));

    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_the_guest_does_not_acknowledge_times_out_and_says_so() {
    let mut pod = Pod::new("hptimeout").with_disk("data", "virtio", 16);
    pod.extra_args = vec!["--detach-timeout".into(), "2".into()];
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    std::fs::File::create(pod.hotplug_dir().join("slow.img"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;
    client::add_hotplug_volume(&mut v, "slow", "slow", "virtio", false).unwrap();
    sync(&mut c, &v).await.expect("attach");
    pod.wait_console("vdb:16384", Duration::from_secs(20));

    // A paused guest cannot acknowledge the unplug: the launcher must not claim success.
    c.pause(pb::Empty {}).await.unwrap();
    client::remove_volume(&mut v, "slow").unwrap();
    let t = Instant::now();
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("slow") && e.message().contains("did not release"),
        "{}",
        e.message()
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "gave up before the deadline"
    );
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        disk(&d, "slow").unwrap().phase(),
        VolumePhase::Failed,
        "{d:?}"
    );

    // Once the guest runs again it releases the disk; the launcher notices and says so.
    c.unpause(pb::Empty {}).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
        if disk(&d, "slow").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "late release never noticed: {d:?}\n{}",
            pod.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_block_line(
        &mut pod,
        |l| l == "LV-BLOCK vda:32768",
        "the disk gone in the guest",
    );
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

/// Changed-block tracking on a hot-plugged PVC (KubeVirt's launcher: the overlay is made when
/// the volume is mounted, before the attach, and deleted with the unplug). The claim holds data
/// before the attach: the guest reads it through the overlay and its write lands in the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_plugged_pvc_under_cbt_gets_its_overlay_and_loses_it_with_the_unplug() {
    let mut pod = Pod::new("cbthp")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.hotplug=rw");
    pod.prepare();
    let mut yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    assert!(!yaml.contains("\nstatus:"), "{yaml}");
    yaml.push_str("status:\n  changedBlockTracking:\n    state: Initializing\n");
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let image = pod.hotplug_dir().join("cbtvol.img");
    let marker = b"kept-at-8-MiB";
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&image).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all(b"held-before-the-plug\n").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(marker).unwrap();
    }
    let overlay = pod.runtime_dir().join("state/lib/qemu/cbt/cbtvol.qcow2");
    assert!(!overlay.exists());

    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;
    assert_eq!(
        v["status"]["changedBlockTracking"]["state"], "Initializing",
        "{v}"
    );
    client::add_hotplug_volume(&mut v, "cbtvol", "cbtvol", "virtio", false).unwrap();
    let d = sync(&mut c, &v).await.expect("attach under CBT");
    assert_eq!(
        disk(&d, "cbtvol").unwrap().phase(),
        VolumePhase::Ready,
        "{d:?}"
    );
    assert!(overlay.exists(), "no overlay {}", overlay.display());
    let live = pod.virsh(&["dumpxml", &format!("default_{}", pod.name)]);
    let hp = live
        .split("</disk>")
        .find(|d| d.contains("ua-cbtvol"))
        .unwrap_or_else(|| panic!("no ua-cbtvol disk in the live domain\n{live}"));
    assert!(
        // The launcher's /var/lib/libvirt is <runtime>/state/lib standalone.
        hp.contains("<source file='/var/lib/libvirt/qemu/cbt/cbtvol.qcow2'")
            && hp.contains(&format!("<source file='{}'", image.display()))
            && hp.contains("<dataStore type='file'>"),
        "{hp}"
    );
    let g = wait_guest_dev(&mut pod, 65536);
    pod.wait_console(
        &format!("LV-HOTREAD {g} held-before-the-plug"),
        Duration::from_secs(30),
    );
    pod.wait_console(
        &format!("LV-HOTWROTE {g} lv-hot-{g}"),
        Duration::from_secs(30),
    );

    client::remove_volume(&mut v, "cbtvol").unwrap();
    let d = sync(&mut c, &v).await.expect("detach under CBT");
    assert!(disk(&d, "cbtvol").is_none(), "{d:?}");
    assert!(!overlay.exists(), "the overlay stays after the unplug");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(first_line(&image), format!("lv-hot-{g}"));
    assert_eq!(&bytes[8 << 20..(8 << 20) + marker.len()], marker);
    assert_eq!(bytes.len(), 32 << 20);
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

/// Seven cold scsi disks take sda–sdg; the eighth, hot-plugged, is sdh. KubeVirt's explicit
/// drive address (virtio-scsi controller 0, unit 7) lets it attach to the running guest, where
/// libvirt's own choice (7 units per controller) would put it on a second, auto-added lsilogic
/// controller, which needs a PCI slot: here there is none (no spare root ports), as on a VM
/// whose spare ports are used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eighth_scsi_disk_hot_plugs_onto_the_virtio_scsi_controller() {
    let mut pod = Pod::new("hpscsi8").with_disk("data", "virtio", 16);
    for i in 1..=7 {
        pod = pod.with_disk(&format!("c{i}"), "scsi", 1);
    }
    pod.annotations
        .push("virt-launcher.kubevirt.io/spare-pcie-root-ports: \"0\"".into());
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    // The guest sees the seven 1 MiB scsi disks.
    wait_block_line(
        &mut pod,
        |l| l.matches(":2048").count() == 7,
        "seven cold scsi disks",
    );
    std::fs::File::create(pod.hotplug_dir().join("eighth.img"))
        .unwrap()
        .set_len(12 << 20)
        .unwrap();
    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;
    client::add_hotplug_volume(&mut v, "eighth", "eighth", "scsi", false).unwrap();
    let d = sync(&mut c, &v).await.expect("attach the eighth scsi disk");
    let hp = disk(&d, "eighth").unwrap();
    assert_eq!(hp.phase(), VolumePhase::Ready, "{d:?}");
    assert_eq!(hp.target, "sdh", "{d:?}");
    // In the live domain it sits on the virtio-scsi controller, the only scsi controller.
    let live = pod.virsh(&["dumpxml", &format!("default_{}", pod.name)]);
    let eighth = live
        .split("</disk>")
        .find(|d| d.contains("ua-eighth"))
        .unwrap_or_else(|| panic!("no ua-eighth disk in the live domain\n{live}"));
    assert!(
        eighth.contains("<address type='drive' controller='0' bus='0' target='0' unit='7'/>"),
        "{eighth}"
    );
    assert_eq!(live.matches("<controller type='scsi'").count(), 1, "{live}");
    // The guest sees a new 12 MiB disk next to the seven.
    let g = wait_guest_dev(&mut pod, 24576);
    assert!(g.starts_with("sd"), "guest named it {g}");
    wait_block_line(
        &mut pod,
        |l| l.matches(":2048").count() == 7 && l.contains(":24576"),
        "the eighth disk next to the seven",
    );
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

/// CPU hot-plug (issue #20): a VM started with 1 of `maxSockets` 2 sockets gets the second
/// socket's vCPU through a Sync with 2 sockets, and the guest sees a new online CPU. More
/// sockets than `maxSockets`, or another `cores`, are refused naming the field, and the VM
/// runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_more_sockets_hot_plugs_a_vcpu_the_guest_brings_online() {
    let mut pod = Pod::new("cpuhp").with_disk("data", "virtio", 1);
    pod.prepare();
    let yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    let yaml = yaml.replacen(
        "    resources:\n",
        "    cpu:\n      sockets: 1\n      cores: 1\n      threads: 1\n      maxSockets: 2\n    resources:\n",
        1,
    );
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    pod.wait_online_cpus("0");
    let domain = format!("default_{}", pod.name);
    let mut c = pod.client().await;
    let mut v = vmi(&mut c).await;

    // Above maxSockets: refused, naming the field.
    v["spec"]["domain"]["cpu"]["sockets"] = json!(3);
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.domain.cpu.sockets"), "{e:?}");
    assert!(e.message().contains("maxSockets"), "{e:?}");
    // Another core count: refused (only sockets change while the VM runs).
    v["spec"]["domain"]["cpu"]["sockets"] = json!(1);
    v["spec"]["domain"]["cpu"]["cores"] = json!(2);
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.domain.cpu.cores"), "{e:?}");
    v["spec"]["domain"]["cpu"]["cores"] = json!(1);
    // Another memory size: refused (no memory hot-plug), naming the field the VMI uses.
    let memory = v["spec"]["domain"]["resources"]["requests"]["memory"].clone();
    v["spec"]["domain"]["resources"]["requests"]["memory"] = json!("256Mi");
    let e = sync(&mut c, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("spec.domain.resources.requests.memory"),
        "{e:?}"
    );
    v["spec"]["domain"]["resources"]["requests"]["memory"] = memory;

    // Two sockets: the second vCPU is plugged, live and in the definition.
    v["spec"]["domain"]["cpu"]["sockets"] = json!(2);
    sync(&mut c, &v).await.expect("hot-plug the second socket");
    let live = pod.virsh(&["vcpucount", &domain, "--live", "--active"]);
    assert_eq!(live.trim(), "2", "{live}");
    let config = pod.virsh(&["vcpucount", &domain, "--config", "--active"]);
    assert_eq!(config.trim(), "2", "{config}");
    // The guest sees CPU 1 and brings it online.
    pod.wait_online_cpus("0-1");
    // The same Sync again: nothing to do.
    sync(&mut c, &v).await.expect("the same Sync again");
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}
