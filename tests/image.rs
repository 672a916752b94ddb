//! The launcher image (`./devtool image`, `scripts/build-image.sh`) run by a real OCI runtime:
//! `umoci` unpacks the OCI layout into a runtime bundle, the bundle's `config.json` gets what
//! KubeVirt's launcher pod has (`container/pod.yaml`: the `private`, `public`, `sockets`,
//! `ephemeral-disks`, `container-disks` and `hotplug-disks` emptyDirs, `/var/run/libvirt`, a
//! Filesystem PVC at `vmi-disks/rootdisk`, a Block PVC as the device `/dev/datadisk`,
//! `/dev/kvm` when there is one; root with the pod's capabilities; virt-controller's command
//! line), and `runc` runs it. Everything is driven from outside as virt-handler does it:
//! KubeVirt's cmd protocol through the mounted `launcher-sock`, domain events to a notify
//! server in the mounted share dir. The guest (TCG) starts with its disk on the Filesystem PVC
//! and counts on it, sees the Block PVC and a hot-plugged disk, SIGTERM (kubelet's) ends the
//! container inside the pod's grace period with status 0, and nothing of it is left running.
//!
//! Needs the image: skipped (with a message) when `target/image/current` was not built,
//! except under CI (`CI` set), where `./devtool test` builds it first and a missing image fails.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::guest;
use testkit::kubevirt::{
    self as kv, handler_vmi, set_hotplug_volume, set_phase, vmi_request, with_timeout, CmdClient,
    CmdResponse, NotifyServer, LONG_TIMEOUT,
};
use testkit::vmi::Disk;

/// The VMI's `terminationGracePeriodSeconds` (`--grace-period-seconds`).
const GRACE: u64 = 5;
/// The pod's `terminationGracePeriodSeconds`: KubeVirt gives the launcher the VMI's grace
/// period + 15 s before kubelet's SIGKILL.
const POD_GRACE: u64 = GRACE + 15;

/// The image `./devtool image` built last: its OCI layout and tag.
fn built_image() -> Option<(PathBuf, String)> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::root().join("target"));
    let current = target.join("image/current");
    let tag = fs::read_to_string(current.join("tag")).ok()?;
    let oci = current.join("oci");
    oci.join("index.json")
        .exists()
        .then(|| (oci, tag.trim().to_string()))
}

/// The built image; `None` (the test is skipped, saying so) outside CI when there is none.
fn image_or_skip() -> Option<(PathBuf, String)> {
    let image = built_image();
    if image.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no launcher image under target/image/current: ./devtool test builds it first"
        );
        eprintln!("SKIPPED: no launcher image built (target/image/current): run ./devtool image");
    }
    image
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over a file: the Block PVC (kubelet hands the pod a device node).
struct LoopDev(String);

impl LoopDev {
    fn new(backing: &Path, size_mib: u64) -> LoopDev {
        testkit::vmi::sparse_file(backing, size_mib << 20).unwrap();
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing));
        LoopDev(dev.trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The container: `runc run` in the foreground (it exits with the container's PID 1), its
/// state under a root of its own. Dropped while running (a failed test): killed and deleted.
struct Container {
    id: String,
    state_root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Container {
    /// `runc run` of `bundle` as container `id`, its state and its log (`container.log`)
    /// under `top`.
    fn run(id: String, bundle: &Path, top: &Path) -> Container {
        let log = top.join("container.log");
        let mut container = Container {
            id,
            state_root: top.join("runc"),
            child: None,
            log: log.clone(),
        };
        let out = fs::File::create(&log).unwrap();
        let child = container
            .runc()
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&container.id)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("runc run");
        container.child = Some(child);
        container
    }

    fn runc(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.state_root);
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's PID 1 as the host sees it (`runc state`).
    fn pid(&self) -> Option<i32> {
        let out = self
            .runc()
            .args(["state", &self.id])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let state: Value = serde_json::from_slice(&out.stdout).ok()?;
        (state["status"] == "running")
            .then(|| state["pid"].as_i64())
            .flatten()
            .map(|p| p as i32)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = self.runc().args(["kill", &self.id, "KILL"]).status();
                let _ = child.wait();
            }
        }
        let _ = self
            .runc()
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// The processes in mount namespace `ns` (the container's), as `pid: command`.
fn in_namespace(ns: &str) -> Vec<String> {
    testkit::procs::pids()
        .into_iter()
        .filter(|p| testkit::procs::mount_ns(*p).is_ok_and(|n| n == ns))
        .map(|p| format!("{p}: {}", testkit::procs::cmdline(p).unwrap_or_default()))
        .collect()
}

/// Whether `pid` sees `rootfs` as its root: the same file at `path` in both.
fn runs_in(pid: i32, rootfs: &Path, path: &str) -> bool {
    let id = |p: PathBuf| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let inside = id(PathBuf::from(format!("/proc/{pid}/root/{path}")));
    inside.is_some() && inside == id(rootfs.join(path))
}

/// The capabilities of the compute container: the runtime's defaults (containerd's set)
/// plus what virt-controller adds for a root VMI (NET_BIND_SERVICE, SYS_NICE).
fn capabilities() -> Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
        "CAP_SYS_NICE",
    ];
    json!({"bounding": caps, "effective": caps, "permitted": caps})
}

fn bind(source: &Path, destination: &str, extra: &[&str]) -> Value {
    let mut options = vec!["rbind", "rw"];
    options.extend_from_slice(extra);
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

fn device(path: &str, kind: &str, node: &Path) -> (Value, Value) {
    let rdev = fs::metadata(node).unwrap().rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    (
        json!({"path": path, "type": kind, "major": major, "minor": minor,
               "fileMode": 0o660, "uid": 0, "gid": 0}),
        json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": "rwm"}),
    )
}

async fn sync(h: &mut CmdClient, vmi: &Value) -> CmdResponse {
    h.sync_virtual_machine(with_timeout(vmi_request(vmi), LONG_TIMEOUT))
        .await
        .expect("Sync answers in-band")
        .into_inner()
}

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_a_vm_under_runc_as_kubevirts_pod() {
    let Some((oci, tag)) = image_or_skip() else {
        return;
    };
    let guest_dir = common::guest_dir();
    let top =
        testkit::fresh_dir(std::env::temp_dir().join(format!("vl-image-{}", std::process::id())))
            .unwrap();

    // The image as a runtime bundle, unpacked by umoci (a second OCI implementation reads
    // what scripts/build-image.sh wrote).
    let bundle = top.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", oci.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    // The image's layout, as KubeVirt's launcher image has it.
    for bin in [
        "virt-launcher",
        "virt-launcher-monitor",
        "launcherctl",
        "virt-launcher-import",
        "virt-freezer",
        "virt-tail",
        "virt-probe",
        "node-labeller.sh",
        "libvirtd",
        "qemu-system-x86_64",
        "qemu-img",
        "passt",
        "xorriso",
    ] {
        let found = ["usr/bin", "usr/sbin"]
            .iter()
            .any(|d| rootfs.join(d).join(bin).exists());
        assert!(found, "{bin} not in the image");
    }
    assert_eq!(
        fs::read_link(rootfs.join("var/run")).unwrap(),
        Path::new("../run")
    );
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("qemu:x:107:107:")),
        "{passwd}"
    );
    let sbom = fs::read_to_string(rootfs.join("usr/share/virt-launcher/packages.tsv")).unwrap();
    for (pkg, major) in [("libvirt-daemon", "11."), ("qemu-system-x86", "1:10.")] {
        assert!(
            sbom.lines()
                .any(|l| l.starts_with(&format!("{pkg}\t{major}"))),
            "{pkg} {major}x not in the SBOM:\n{sbom}"
        );
    }
    assert!(!rootfs.join("usr/bin/apt-get").exists(), "apt in the image");

    // The pod's volumes, on the host.
    let vol = |name: &str| {
        let d = top.join("volumes").join(name);
        fs::create_dir_all(&d).unwrap();
        d
    };
    let (private, public, sockets, ephemeral, container_disks, hotplug, libvirt, rootdisk) = (
        vol("private"),
        vol("public"),
        vol("sockets"),
        vol("ephemeral-disks"),
        vol("container-disks"),
        vol("hotplug-disks"),
        vol("libvirt-runtime"),
        vol("rootdisk"),
    );
    // The kernelBoot container's files, where virt-handler mounts them.
    let kernel_boot = container_disks.join("kernel-boot");
    fs::create_dir_all(&kernel_boot).unwrap();
    for f in ["vmlinuz", "initramfs.gz"] {
        fs::copy(guest_dir.join(f), kernel_boot.join(f)).unwrap();
    }
    // The Filesystem PVC's disk image (the claim's mount holds disk.img).
    testkit::vmi::sparse_file(&rootdisk.join("disk.img"), 16 << 20).unwrap();
    let data_backing = top.join("datadisk.backing");
    let datadisk = LoopDev::new(&data_backing, 24);

    // The bundle's config: umoci's, with the pod's command line, mounts and devices.
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    let uid = format!("00000000-0000-4000-8000-{:012x}", std::process::id());
    let name = "vl-image";
    let mut args = vec!["/usr/bin/virt-launcher-monitor".to_string()];
    args.extend(testkit::compute::monitor_args(
        &testkit::compute::MonitorArgs {
            qemu_timeout: "271s",
            name,
            uid: &uid,
            share_dir: "/var/run/kubevirt",
            ephemeral_dir: "/var/run/kubevirt-ephemeral-disks",
            container_disk_dir: "/var/run/kubevirt/container-disks",
            grace_seconds: GRACE,
        },
    ));
    let mut env: Vec<Value> = config["process"]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    env.extend(
        [
            "XDG_CACHE_HOME=/var/run/kubevirt-private",
            "XDG_CONFIG_HOME=/var/run/kubevirt-private",
            "XDG_RUNTIME_DIR=/var/run",
            "POD_NAME=virt-launcher-vl-image",
        ]
        .map(Value::from),
    );
    config["process"]["args"] = json!(args);
    config["process"]["env"] = json!(env);
    config["process"]["terminal"] = json!(false);
    config["process"]["cwd"] = json!("/");
    // runAsUser: 0 (the Root feature gate's pods; the image's own user is KubeVirt's 107).
    config["process"]["user"] = json!({"uid": 0, "gid": 0, "additionalGids": [107]});
    config["process"]["capabilities"] = capabilities();
    config["process"]["noNewPrivileges"] = json!(false);
    config["hostname"] = json!(name);
    config["root"] = json!({"path": "rootfs", "readonly": false});
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.extend([
        bind(&private, "/var/run/kubevirt-private", &[]),
        bind(&public, "/var/run/kubevirt", &[]),
        bind(&sockets, "/var/run/kubevirt/sockets", &[]),
        bind(&ephemeral, "/var/run/kubevirt-ephemeral-disks", &[]),
        bind(
            &container_disks,
            "/var/run/kubevirt/container-disks",
            &["rslave"],
        ),
        bind(&hotplug, "/var/run/kubevirt/hotplug-disks", &["rslave"]),
        bind(&libvirt, "/var/run/libvirt", &[]),
        bind(
            &rootdisk,
            "/var/run/kubevirt-private/vmi-disks/rootdisk",
            &[],
        ),
    ]);
    let mut devices = vec![device("/dev/datadisk", "b", Path::new(&datadisk.0))];
    let kvm = Path::new("/dev/kvm");
    if fs::metadata(kvm).is_ok_and(|m| m.file_type().is_char_device()) {
        devices.push(device("/dev/kvm", "c", kvm));
    }
    let linux = &mut config["linux"];
    linux["devices"] = json!(devices.iter().map(|d| &d.0).collect::<Vec<_>>());
    let allowed = linux["resources"]["devices"]
        .as_array_mut()
        .expect("linux.resources.devices");
    allowed.extend(devices.iter().map(|d| d.1.clone()));
    if let Some(o) = linux.as_object_mut() {
        // umoci's rootless leftovers, if any: the container runs as real root.
        o.remove("uidMappings");
        o.remove("gidMappings");
    }
    config["linux"]["cgroupsPath"] = json!(format!("/vl-image-{}", std::process::id()));
    fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    // Run it. runc's state lives under a root of our own, the container's cgroup is
    // /vl-image-<pid> (runc removes it when the container is deleted).
    let mut container = Container::run(format!("vl-image-{}", std::process::id()), &bundle, &top);

    // The handler's notify server in the share dir; the pod is ready once launcher-sock is.
    let notify = NotifyServer::start(&public.join("domain-notify-pipe.sock")).unwrap();
    let sock = sockets.join("launcher-sock");
    common::wait_for("launcher-sock", Duration::from_secs(120), || {
        if let Some(st) = container.exited() {
            panic!("the container exited early ({st})\n{}", container.log());
        }
        is_socket(&sock).then_some(())
    });
    let pid1 = container.pid().expect("runc state: running");
    assert!(
        fs::read_link(format!("/proc/{pid1}/exe"))
            .unwrap()
            .ends_with("virt-launcher-monitor"),
        "the container's PID 1 is not the monitor"
    );
    assert!(
        runs_in(pid1, &rootfs, "usr/bin/virt-launcher-monitor"),
        "PID 1 does not run in the image's root filesystem"
    );
    let ns = testkit::procs::mount_ns(pid1).unwrap();
    assert_ne!(
        ns,
        testkit::procs::mount_ns(std::process::id() as i32).unwrap()
    );

    // virt-handler's calls through the mounted socket.
    assert_eq!(kv::cmd_versions(&sock).await.unwrap(), vec![1]);
    let mut h = kv::connect_cmd(&sock).await.unwrap();
    let yaml = testkit::vmi::GuestVmi {
        name,
        uid: Some(&uid),
        grace_seconds: GRACE,
        kernel_args: &format!(
            "{} lv.counter=vda lv.hotplug=rw lv.acpi=ignore",
            testkit::vmi::KERNEL_ARGS
        ),
        // The Filesystem PVC first (the guest's vda, where it counts), then the Block PVC.
        disks: &[
            Disk::new("rootdisk", "virtio", 16),
            Disk::new("datadisk", "virtio", 24),
        ],
        annotations: &[],
        rwx: false,
    }
    .yaml();
    let mut vmi = handler_vmi(&yaml, "Scheduled").unwrap();
    let r = sync(&mut h, &vmi).await;
    assert!(r.success, "{r:?}\n{}", container.log());

    let console_log = guest::console_in(&private.join(&uid));
    let console = || guest::read_console(&console_log);
    let dump = |c: &Container| format!("{}\n--- console:\n{}", c.log(), console());
    common::wait_for("the guest booted", Duration::from_secs(180), || {
        console().contains("LV-READY").then_some(())
    });
    // Its disks: vda the Filesystem PVC (16 MiB), the Block PVC (24 MiB); it counts on vda,
    // and the count lands in the PVC's disk.img on the host.
    let shown = common::wait(Duration::from_secs(30), Duration::from_millis(100), || {
        let c = console();
        (guest::device_of(&c, 32768).as_deref() == Some("vda")
            && guest::device_of(&c, 49152).is_some())
        .then_some(())
    });
    assert!(shown.is_some(), "the guest's disks\n{}", dump(&container));
    let image = rootdisk.join("disk.img");
    let counted = common::wait(Duration::from_secs(60), Duration::from_millis(200), || {
        (guest::disk_counter(&image) > 0).then_some(())
    });
    assert!(
        counted.is_some(),
        "no count in the PVC's disk.img\n{}",
        dump(&container)
    );
    let running = notify
        .wait_for(Duration::from_secs(30), |got| {
            got.iter().any(|e| e.status() == "Running")
        })
        .await;
    assert!(
        running.is_some(),
        "virt-handler was never told Running: {:?}",
        notify
            .received()
            .iter()
            .map(|e| e.status().to_string())
            .collect::<Vec<_>>()
    );

    // Hot-plug: virt-handler mounts the volume into the pod's hotplug dir, then Syncs with
    // phase MountedToPod; the guest sees the disk (32 MiB) and writes to it.
    testkit::vmi::sparse_file(&hotplug.join("fsvol.img"), 32 << 20).unwrap();
    set_phase(&mut vmi, "Running");
    set_hotplug_volume(&mut vmi, "fsvol", "virtio", "MountedToPod");
    let r = sync(&mut h, &vmi).await;
    assert!(r.success, "{r:?}\n{}", dump(&container));
    let dev = common::wait(Duration::from_secs(60), Duration::from_millis(100), || {
        guest::device_of(&console(), 65536)
    })
    .unwrap_or_else(|| {
        panic!(
            "the guest never saw the hot-plugged disk\n{}",
            dump(&container)
        )
    });
    let wrote = format!("LV-HOTWROTE {dev} lv-hot-{dev}");
    common::wait_for(
        "the guest wrote the hot-plugged disk",
        Duration::from_secs(60),
        || console().contains(&wrote).then_some(()),
    );
    assert_eq!(
        guest::first_line(&hotplug.join("fsvol.img")),
        format!("lv-hot-{dev}")
    );
    // KubeVirt's virt-freezer, exec'ed in the container as a backup tool's freeze hook does:
    // the guest agent freezes and thaws the guest's filesystems; bad flags are refused.
    let exec = |args: &[&str]| {
        container
            .runc()
            .args(["exec", &container.id, "/usr/bin/virt-freezer"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = exec(&["--freeze", "--name", name, "--namespace", "default"]);
    assert!(
        out.status.success(),
        "virt-freezer --freeze: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_for("the guest froze", Duration::from_secs(30), || {
        console().contains("LV-FROZEN").then_some(())
    });
    let out = exec(&["--unfreeze", "--name", name, "--namespace", "default"]);
    assert!(out.status.success(), "virt-freezer --unfreeze: {out:?}");
    common::wait_for("the guest thawed", Duration::from_secs(30), || {
        console().contains("LV-THAWED").then_some(())
    });
    let out = exec(&["--freeze", "--name", name]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("both --name and --namespace must be provided"),
        "{out:?}"
    );

    // KubeVirt's exec and guest-agent-ping probes, as virt-controller wraps them
    // (`virt-probe --domainName NS_NAME --timeoutSeconds N …`, found on PATH).
    let probe = |domain: &str, args: &[&str]| {
        container
            .runc()
            .args(["exec", &container.id, "virt-probe", "--domainName", domain])
            .args(["--timeoutSeconds", "20"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let domain = format!("default_{name}");
    let out = probe(&domain, &["--guestAgentPing"]);
    assert!(out.status.success(), "virt-probe --guestAgentPing: {out:?}");
    let out = probe(
        &domain,
        &["--command", "sh", "--", "-c", "echo probe $((6*7)); exit 3"],
    );
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (Some(3), "probe 42\n\n"),
        "virt-probe --command: the guest command's exit code and output (and Println's newline): {out:?}"
    );
    let out = probe("default_other", &["--command", "true"]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no domain named \"default_other\""),
        "{out:?}"
    );

    // KubeVirt's guest-console-log sidecar: virt-tail streams the serial console log from its
    // start and ends cleanly on SIGTERM.
    let mut tail = container
        .runc()
        .args([
            "exec",
            &container.id,
            "/usr/bin/virt-tail",
            "-v",
            "3",
            "--logfile",
        ])
        .arg(format!("/var/run/kubevirt-private/{uid}/virt-serial0-log"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(top.join("virt-tail.err")).unwrap())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streamed = Vec::new();
    while !streamed.iter().any(|l: &String| l.contains(&wrote)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => streamed.push(line),
            Err(e) => panic!(
                "virt-tail: {e} after {streamed:?}: {}",
                fs::read_to_string(top.join("virt-tail.err")).unwrap_or_default()
            ),
        }
    }
    assert!(
        streamed.iter().any(|l| l.contains("LV-READY")),
        "{streamed:?}"
    );
    // The runtime signals the process itself (as for a sidecar's PID 1 when the pod ends).
    let in_container = testkit::procs::pids()
        .into_iter()
        .find(|p| {
            testkit::procs::mount_ns(*p).is_ok_and(|n| n == ns)
                && testkit::procs::cmdline(*p).is_some_and(|c| c.contains("/usr/bin/virt-tail"))
        })
        .expect("virt-tail in the container");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(in_container),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = common::wait_for("virt-tail to end", Duration::from_secs(30), || {
        tail.try_wait().unwrap()
    });
    assert!(st.success(), "virt-tail on SIGTERM: {st:?}");

    let qemu = testkit::procs::pids()
        .into_iter()
        .find(|p| {
            testkit::procs::mount_ns(*p).is_ok_and(|n| n == ns)
                && testkit::procs::cmdline(*p).is_some_and(|c| c.contains("qemu-system"))
        })
        .expect("QEMU in the container");

    // kubelet deletes the pod: SIGTERM to PID 1. The launcher marks the domain, destroys it
    // --grace-period-seconds later and everything exits 0, before kubelet's SIGKILL (the
    // pod's terminationGracePeriodSeconds).
    run(container.runc().args(["kill", &container.id, "TERM"]));
    let deadline = Instant::now() + Duration::from_secs(POD_GRACE);
    let status = loop {
        if let Some(st) = container.exited() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running {POD_GRACE} s after SIGTERM (kubelet would SIGKILL now)\n{}",
            dump(&container)
        )
    });
    assert!(status.success(), "{status:?}\n{}", dump(&container));
    assert!(
        container
            .log()
            .contains("--grace-period-seconds after SIGTERM over"),
        "{}",
        container.log()
    );
    assert!(
        !console().contains("LV-ACPI-IGNORED"),
        "the launcher pressed the power button itself"
    );
    // Nothing left: no process in the image's root, QEMU gone, no container in runc's state.
    assert!(testkit::procs::cmdline(qemu).is_none(), "QEMU still runs");
    let left = in_namespace(&ns);
    assert!(left.is_empty(), "left running: {left:?}");
    let list = run(container.runc().args(["list", "-q"]));
    assert!(
        !list.lines().any(|l| l.trim() == container.id),
        "runc still lists {}",
        container.id
    );
    let events = notify.stop().await;
    assert!(
        events.iter().any(|e| e.is_gone()),
        "virt-handler was never told the domain is gone"
    );
    drop(container);
    drop(datadisk);
    // Passed: the bundle and volumes go (a failure keeps them to look at).
    fs::remove_dir_all(&top).unwrap();
}

/// `scripts/build-image.sh` on bad input: not root, missing binaries, a package archive that
/// cannot be reached. Each is one line on stderr and a non-zero exit, and nothing is left
/// where the next build would take it (no cached base, no image, no `current`).
#[test]
fn the_image_build_refuses_bad_input_in_one_line() {
    let script = testkit::root().join("scripts/build-image.sh");
    let top = testkit::fresh_dir(
        std::env::temp_dir().join(format!("vl-image-bad-{}", std::process::id())),
    )
    .unwrap();
    let (cache, target) = (top.join("cache"), top.join("target"));
    let bins = top.join("bin");
    fs::create_dir_all(&bins).unwrap();
    for b in [
        "virt-launcher",
        "virt-launcher-monitor",
        "launcherctl",
        "virt-launcher-import",
    ] {
        fs::copy(common::LAUNCHER, bins.join(b)).unwrap();
    }
    let build = |cmd: &mut Command, bin_dir: &Path| {
        let out = cmd
            .arg(&script)
            .arg(bin_dir)
            .env("VL_IMAGE_CACHE", &cache)
            .env("CARGO_TARGET_DIR", &target)
            // Nothing listens on port 9 here: every download fails at once.
            .env("VIRT_LAUNCHER_BACKPORTS_URI", "http://127.0.0.1:9/debian")
            .env(
                "VIRT_LAUNCHER_SECURITY_URI",
                "http://127.0.0.1:9/debian-security",
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        err
    };
    let err = build(
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups"]),
        &bins,
    );
    assert!(err.contains("ERROR: run as root"), "{err}");
    let err = build(&mut Command::new("bash"), &top.join("none"));
    assert!(
        err.contains("none/virt-launcher missing (cargo build --release"),
        "{err}"
    );
    let err = build(&mut Command::new("bash"), &bins);
    assert!(
        err.contains("ERROR: mmdebstrap failed: ") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    let left = |d: &Path| {
        fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert!(left(&cache).is_empty(), "cache: {:?}", left(&cache));
    // Only the failed run's log stays, beside (not in) any image.
    assert_eq!(left(&target.join("image")), vec!["mmdebstrap.log"]);
    fs::remove_dir_all(&top).unwrap();
}

/// virt-handler's DaemonSet runs the launcher image as its `virt-launcher` init container,
/// `/bin/sh -c node-labeller.sh` with the node's `/var/lib/kubevirt-node-labeller` mounted:
/// the three files virt-handler's node labeller reads appear there, from a libvirtd in the
/// image, and the container exits 0.
#[test]
fn virt_handlers_init_container_writes_the_node_labeller_files() {
    let Some((oci, tag)) = image_or_skip() else {
        return;
    };
    let top = testkit::fresh_dir(
        std::env::temp_dir().join(format!("vl-image-labeller-{}", std::process::id())),
    )
    .unwrap();
    let bundle = top.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", oci.display()))
        .arg(&bundle));
    let labels = top.join("node-labeller");
    fs::create_dir_all(&labels).unwrap();
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    let mut env: Vec<Value> = config["process"]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    env.extend(["PREFERRED_VIRTTYPE=kvm", "HYPERVISOR_DEVICE=kvm"].map(Value::from));
    config["process"]["args"] = json!(["/bin/sh", "-c", "node-labeller.sh"]);
    config["process"]["env"] = json!(env);
    config["process"]["terminal"] = json!(false);
    config["process"]["user"] = json!({"uid": 0, "gid": 0});
    config["process"]["capabilities"] = capabilities();
    config["root"] = json!({"path": "rootfs", "readonly": false});
    config["mounts"].as_array_mut().unwrap().push(bind(
        &labels,
        "/var/lib/kubevirt-node-labeller",
        &[],
    ));
    let kvm = Path::new("/dev/kvm");
    let with_kvm = fs::metadata(kvm).is_ok_and(|m| m.file_type().is_char_device());
    if with_kvm {
        let (node, allow) = device("/dev/kvm", "c", kvm);
        config["linux"]["devices"] = json!([node]);
        config["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(allow);
    }
    if let Some(o) = config["linux"].as_object_mut() {
        o.remove("uidMappings");
        o.remove("gidMappings");
    }
    config["linux"]["cgroupsPath"] = json!(format!("/vl-image-labeller-{}", std::process::id()));
    fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let mut container = Container::run(
        format!("vl-image-labeller-{}", std::process::id()),
        &bundle,
        &top,
    );
    let status = common::wait_for("the init container", Duration::from_secs(120), || {
        container.exited()
    });
    assert!(status.success(), "{status:?}\n{}", container.log());
    let read = |f: &str| {
        fs::read_to_string(labels.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}\n{}", container.log()))
    };
    let domcaps = read("virsh_domcapabilities.xml");
    let virttype = if with_kvm { "kvm" } else { "qemu" };
    assert!(
        domcaps.contains("<domainCapabilities>")
            && domcaps.contains(&format!("<domain>{virttype}</domain>"))
            && domcaps.contains("<machine>pc-q35"),
        "{domcaps}"
    );
    let features = read("supported_features.xml");
    assert!(
        features.contains("<cpu") && features.contains("<feature "),
        "{features}"
    );
    let caps = read("capabilities.xml");
    assert!(
        caps.contains("<capabilities>") && caps.contains("<host>"),
        "{caps}"
    );
    let list = run(container.runc().args(["list", "-q"]));
    assert!(!list.lines().any(|l| l.trim() == container.id), "{list}");
    drop(container);
    fs::remove_dir_all(&top).unwrap();
}

/// A containerDisk container as virt-controller renders it: the user's disk image (here one
/// with no libc, no shell: only `/disk/`) runs the launcher image's `container-disk`, copied in
/// by the `container-disk-binary` init container. It serves the socket virt-handler finds the
/// container by, and as the container's PID 1 ends with exit 0 on SIGTERM.
#[test]
fn the_images_container_disk_runs_in_a_disk_image_without_libc() {
    let Some((oci, tag)) = image_or_skip() else {
        return;
    };
    let id = format!("vl-image-cdisk-{}", std::process::id());
    let top = testkit::fresh_dir(std::env::temp_dir().join(&id)).unwrap();
    let launcher = top.join("launcher");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", oci.display()))
        .arg(&launcher));
    let binary = launcher.join("rootfs/usr/bin/container-disk");

    // The disk image's bundle: /disk/disk.img and the copied binary, nothing else.
    let bundle = top.join("disk");
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("disk")).unwrap();
    fs::create_dir_all(rootfs.join("container-disk-binary/usr/bin")).unwrap();
    fs::write(rootfs.join("disk/disk.img"), vec![0u8; 4096]).unwrap();
    fs::copy(
        &binary,
        rootfs.join("container-disk-binary/usr/bin/container-disk"),
    )
    .unwrap();
    run(Command::new("runc")
        .arg("spec")
        .arg("--bundle")
        .arg(&bundle));
    let shared = top.join("container-disk-data");
    fs::create_dir_all(&shared).unwrap();
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    config["process"]["args"] = json!([
        "/container-disk-binary/usr/bin/container-disk",
        "--copy-path",
        "/var/run/kubevirt-ephemeral-disks/container-disk-data/disk_0"
    ]);
    config["process"]["terminal"] = json!(false);
    config["root"] = json!({"path": "rootfs", "readonly": false});
    config["mounts"].as_array_mut().unwrap().push(bind(
        &shared,
        "/var/run/kubevirt-ephemeral-disks/container-disk-data",
        &[],
    ));
    config["linux"]["cgroupsPath"] = json!(format!("/{id}"));
    fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let mut container = Container::run(id, &bundle, &top);
    let sock = shared.join("disk_0.sock");
    common::wait_for("the container's socket", Duration::from_secs(60), || {
        if let Some(st) = container.exited() {
            panic!("container-disk exited: {st:?}\n{}", container.log());
        }
        is_socket(&sock).then_some(())
    });
    // virt-handler's check: a connection is accepted (and closed).
    std::os::unix::net::UnixStream::connect(&sock).expect("connect to the container's socket");

    run(container.runc().args(["kill", &container.id, "TERM"]));
    let status = common::wait_for("container-disk to end", Duration::from_secs(30), || {
        container.exited()
    });
    assert!(status.success(), "{status:?}\n{}", container.log());
    assert!(!sock.exists(), "the socket is removed at SIGTERM");
    drop(container);
    fs::remove_dir_all(&top).unwrap();
}

/// The image's passt is the one scripts/build-passt.sh builds from Debian 13's pinned source,
/// not Debian 12's package: it knows `--vhost-user` (libvirt 11 starts it so for passtBinding,
/// KubeVirt 1.8 and later); the SBOM lists it with
/// the pinned version and no Debian passt package, and sources.tsv names its tarball, the
/// tarball's sha256 and the installed binary's sha256.
#[test]
fn the_images_passt_is_the_pinned_source_build_and_knows_vhost_user() {
    let Some((oci, tag)) = image_or_skip() else {
        return;
    };
    let top = testkit::fresh_dir(
        std::env::temp_dir().join(format!("vl-image-passt-{}", std::process::id())),
    )
    .unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", oci.display()))
        .arg(top.join("bundle")));
    let rootfs = top.join("bundle/rootfs");
    // Run from the unpacked image on the host (passt finds passt.avx2 beside it through
    // /proc/self/exe, which a bare chroot lacks); it needs only libc.
    let help = Command::new(rootfs.join("usr/bin/passt"))
        .arg("--help")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    assert!(text.contains("--vhost-user"), "the image's passt:\n{text}");

    let script = testkit::root().join("scripts/build-passt.sh");
    let pinned = |arg: &str| run(Command::new(&script).arg(arg)).trim().to_string();
    let version = pinned("--version");
    let sbom = fs::read_to_string(rootfs.join("usr/share/virt-launcher/packages.tsv")).unwrap();
    let rows: Vec<&str> = sbom.lines().filter(|l| l.starts_with("passt\t")).collect();
    assert_eq!(
        rows,
        [format!("passt\t{version}\tamd64\tpasst\t{version}")],
        "passt in the SBOM"
    );
    let sources = fs::read_to_string(rootfs.join("usr/share/virt-launcher/sources.tsv")).unwrap();
    let digest = run(Command::new("sha256sum").arg(rootfs.join("usr/bin/passt")))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        sources.lines().any(|l| l
            == format!(
                "/usr/bin/passt\t{version}\t{}\t{digest}",
                pinned("--source")
            )),
        "sources.tsv:\n{sources}"
    );
    let _ = fs::remove_dir_all(&top);
}
