//! Hardening: hostile names and paths through the real binary, a connection/request flood on
//! the control socket, and faults while a guest runs. Each fault test states what the user
//! sees and proves the guest's disk data is intact. Figures go to RELIABILITY.md.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::LAUNCHER;
use serde_json::{json, Value};

// ------------------------------------------------------------------ paths

/// A scratch pod layout for `render`/`run` (no guest): volumes, hotplug, block, kernel dirs
/// and an `outside` directory that nothing may touch.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn new(name: &str) -> Layout {
        let root = std::env::temp_dir().join(format!("vl-hard-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["pvcs", "hotplug", "dev", "kernel", "outside"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("kernel/vmlinuz"), b"kernel").unwrap();
        fs::write(root.join("kernel/initrd"), b"initrd").unwrap();
        fs::write(root.join("outside/secret.img"), b"not yours").unwrap();
        Layout { root }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    fn pvc(&self, volume: &str, size: u64) {
        fs::create_dir_all(self.p(&format!("pvcs/{volume}"))).unwrap();
        let f = fs::File::create(self.p(&format!("pvcs/{volume}/disk.img"))).unwrap();
        f.set_len(size).unwrap();
    }
    /// Every file under `outside/`, to prove nothing was created there.
    fn outside_listing(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.p("outside"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
    /// `render` (probes the real files) or `run` (fails in preflight, before any process is
    /// started) on `vmi`; returns (success, stderr).
    fn launch(&self, cmd: &str, vmi: &Value) -> (bool, String) {
        let file = self.p("vmi.json");
        fs::write(&file, serde_json::to_vec(vmi).unwrap()).unwrap();
        let mut c = Command::new(LAUNCHER);
        c.arg(cmd).arg("--vmi").arg(&file);
        for (flag, dir) in [
            ("--volumes-dir", "pvcs"),
            ("--hotplug-dir", "hotplug"),
            ("--block-dir", "dev"),
            ("--kernel-boot-dir", "kernel"),
        ] {
            c.arg(flag).arg(self.p(dir));
        }
        if cmd == "run" {
            c.args(["--domain-type", "qemu", "--runtime-dir"])
                .arg(self.p("runtime"));
        }
        let out = c.output().expect("run virt-launcher");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn vmi(volumes: Value, firmware: Option<Value>, status: Option<Value>) -> Value {
    let disks: Vec<Value> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| json!({"name": v["name"], "disk": {"bus": "virtio"}}))
        .collect();
    let mut v = json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "hostile", "namespace": "default"},
        "spec": {"domain": {"resources": {"requests": {"memory": "64Mi"}},
                            "devices": {"disks": disks}},
                 "volumes": volumes}
    });
    if let Some(f) = firmware {
        v["spec"]["domain"]["firmware"] = f;
    }
    if let Some(s) = status {
        v["status"] = s;
    }
    v
}

fn pvc(name: &str) -> Value {
    json!({"name": name, "persistentVolumeClaim": {"claimName": "c"}})
}

fn kernel(kernel_path: &str) -> Value {
    json!({"kernelBoot": {"container": {"image": "k", "kernelPath": kernel_path, "initrdPath": "/initrd"}}})
}

/// Runs `vmi` through `render` and `run`; both must fail with `want` in the message, create
/// nothing outside, and `run` must leave no process behind.
fn refused(l: &Layout, vmi: &Value, want: &[&str]) {
    let before = l.outside_listing();
    for cmd in ["render", "run"] {
        let (ok, stderr) = l.launch(cmd, vmi);
        assert!(!ok, "{cmd} accepted a hostile spec: {vmi}\n{stderr}");
        for w in want {
            assert!(stderr.contains(w), "{cmd}: expected {w:?} in: {stderr}");
        }
        assert!(stderr.lines().count() <= 2, "one clear line: {stderr}");
    }
    assert_eq!(l.outside_listing(), before, "something was created outside");
    let runtime = l.p("runtime").display().to_string();
    let left: Vec<String> = testkit::procs::mentioning(&[runtime])
        .into_iter()
        .map(|(_, cmdline)| cmdline)
        .filter(|c| !c.contains("hardening-"))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn hostile_volume_names_are_refused() {
    let l = Layout::new("names");
    let long = "a".repeat(300);
    for name in [
        "..",
        "a/../../outside",
        "/etc",
        "a\u{0}b",
        long.as_str(),
        "UPPER",
        "",
    ] {
        refused(&l, &vmi(json!([pvc(name)]), None, None), &[]);
    }
}

#[test]
fn pvc_symlinks_may_not_leave_the_claim() {
    let l = Layout::new("pvc");
    // <volume> directory that is a symlink to /etc.
    symlink("/etc", l.p("pvcs/etcvol")).unwrap();
    refused(
        &l,
        &vmi(json!([pvc("etcvol")]), None, None),
        &["volume etcvol"],
    );

    // <volume> directory that is a symlink to a directory holding a disk.img.
    fs::write(l.p("outside/disk.img"), b"").unwrap();
    symlink(l.p("outside"), l.p("pvcs/outdir")).unwrap();
    refused(
        &l,
        &vmi(json!([pvc("outdir")]), None, None),
        &["volume outdir", "outside"],
    );
    fs::remove_file(l.p("outside/disk.img")).unwrap();

    // The same, with a capacity in the status: no disk.img may be created out there.
    let status = json!({"volumeStatus": [{"name": "outdir", "persistentVolumeClaimInfo":
        {"capacity": {"storage": "64Mi"}}}]});
    refused(
        &l,
        &vmi(json!([pvc("outdir")]), None, Some(status)),
        &["volume outdir"],
    );
    assert!(
        !l.p("outside/disk.img").exists(),
        "disk.img created outside"
    );

    // disk.img that is a symlink to a file outside.
    fs::create_dir_all(l.p("pvcs/linkimg")).unwrap();
    symlink(l.p("outside/secret.img"), l.p("pvcs/linkimg/disk.img")).unwrap();
    refused(
        &l,
        &vmi(json!([pvc("linkimg")]), None, None),
        &["volume linkimg", "outside"],
    );

    // disk.img that is a FIFO: refused at once (opening it would block forever).
    fs::create_dir_all(l.p("pvcs/fifo")).unwrap();
    nix::unistd::mkfifo(&l.p("pvcs/fifo/disk.img"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let t = Instant::now();
    refused(&l, &vmi(json!([pvc("fifo")]), None, None), &["FIFO"]);
    assert!(t.elapsed() < Duration::from_secs(20));

    // Allowed: disk.img symlinked to another file in the same claim directory.
    l.pvc("inside", 1 << 20);
    fs::rename(l.p("pvcs/inside/disk.img"), l.p("pvcs/inside/real.img")).unwrap();
    symlink("real.img", l.p("pvcs/inside/disk.img")).unwrap();
    let (ok, stderr) = l.launch("render", &vmi(json!([pvc("inside")]), None, None));
    assert!(ok, "a symlink inside the claim is fine: {stderr}");
}

#[test]
fn hotplug_symlink_out_of_the_hotplug_dir_is_refused_at_start() {
    let l = Layout::new("hp");
    l.pvc("root", 1 << 20);
    symlink(l.p("outside/secret.img"), l.p("hotplug/hp.img")).unwrap();
    let vols = json!([pvc("root"),
        {"name": "hp", "persistentVolumeClaim": {"claimName": "hp", "hotpluggable": true}}]);
    let status = json!({"volumeStatus": [{"name": "hp", "phase": "MountedToPod",
        "hotplugVolume": {"attachPodName": "hp-pod"}}]});
    refused(
        &l,
        &vmi(vols, None, Some(status)),
        &["volume hp", "outside"],
    );
}

#[test]
fn kernel_boot_paths_stay_in_the_kernel_boot_dir() {
    let l = Layout::new("kernel");
    l.pvc("root", 1 << 20);
    let field = "kernelBoot.container.kernelPath";
    refused(
        &l,
        &vmi(
            json!([pvc("root")]),
            Some(kernel("../outside/secret.img")),
            None,
        ),
        &[field, ".."],
    );
    // Absolute paths are taken inside the kernel boot dir: /etc/passwd is not there.
    refused(
        &l,
        &vmi(json!([pvc("root")]), Some(kernel("/etc/passwd")), None),
        &[field],
    );
    symlink("/etc/passwd", l.p("kernel/evil")).unwrap();
    refused(
        &l,
        &vmi(json!([pvc("root")]), Some(kernel("/evil")), None),
        &[field, "outside"],
    );
    let (ok, stderr) = l.launch(
        "render",
        &vmi(json!([pvc("root")]), Some(kernel("/vmlinuz")), None),
    );
    assert!(ok, "{stderr}");
}

#[test]
fn host_disks_are_never_created_through_a_symlink() {
    let l = Layout::new("hostdisk");
    let hd = |path: &Path, ty: &str| json!([{"name": "hd", "hostDisk": {"path": path, "type": ty, "capacity": "16Mi"}}]);
    // A dangling symlink where DiskOrCreate would create the file.
    let target = l.p("outside/created-by-launcher.img");
    symlink(&target, l.p("hotplug/hd.img")).unwrap();
    refused(
        &l,
        &vmi(hd(&l.p("hotplug/hd.img"), "DiskOrCreate"), None, None),
        &["hostDisk.path", "symlink"],
    );
    assert!(!target.exists());
    // `..` in the path.
    refused(
        &l,
        &vmi(hd(Path::new("/tmp/../etc/x.img"), "Disk"), None, None),
        &["hostDisk.path", ".."],
    );
    // A directory or a FIFO is not a disk.
    refused(
        &l,
        &vmi(hd(&l.p("outside"), "Disk"), None, None),
        &["hostDisk.path", "directory"],
    );
    nix::unistd::mkfifo(&l.p("pvcs/hd.fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    refused(
        &l,
        &vmi(hd(&l.p("pvcs/hd.fifo"), "Disk"), None, None),
        &["FIFO"],
    );
}

#[test]
fn cloud_init_and_config_sources_may_not_leave_their_directories() {
    use virt_launcher::convert::facts::PodFacts;
    let l = Layout::new("cfg");
    let spec = |vols: Value| {
        virt_launcher::spec::from_str(&vmi(vols, None, None).to_string(), "t").unwrap()
    };
    // configMap source directory symlinked to /etc: its ISO would hand /etc to the guest.
    let v = spec(json!([{"name": "cm", "configMap": {"name": "cm"}}]));
    let mut facts = PodFacts::defaults(&v);
    facts.paths.config_dir = l.p("config");
    facts.paths.private_dir = l.p("private");
    fs::create_dir_all(l.p("config/config-map")).unwrap();
    symlink("/etc", l.p("config/config-map/cm")).unwrap();
    let e = virt_launcher::pod::prepare::prepare(&v, &facts)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("volume cm: ") && e.contains("outside"), "{e}");
    assert!(!l.p("config/config-map-disks/cm.iso").exists());

    // cloud-init secretRef whose userdata is a symlink to a file outside the secret.
    let v = spec(json!([{"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "s"}}}]));
    fs::create_dir_all(l.p("config/secret/ci")).unwrap();
    symlink(l.p("outside/secret.img"), l.p("config/secret/ci/userdata")).unwrap();
    let e = virt_launcher::pod::prepare::prepare(&v, &facts)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("volume ci: ") && e.contains("outside"), "{e}");
    // Kubernetes' own layout (userdata -> ..data/userdata) is fine.
    fs::remove_file(l.p("config/secret/ci/userdata")).unwrap();
    fs::create_dir_all(l.p("config/secret/ci/..data")).unwrap();
    fs::write(l.p("config/secret/ci/..data/userdata"), b"#cloud-config\n").unwrap();
    symlink("..data/userdata", l.p("config/secret/ci/userdata")).unwrap();
    if Command::new("xorrisofs").arg("--version").output().is_ok() {
        virt_launcher::pod::prepare::prepare(&v, &facts).expect("k8s secret layout");
        let ud = fs::read(l.p("private/cloud-init-nocloud/user-data")).unwrap();
        assert_eq!(ud, b"#cloud-config\n");
    }
}

#[test]
fn a_sysprep_iso_needs_an_answer_file_and_stays_in_its_directory() {
    use virt_launcher::convert::facts::PodFacts;
    let l = Layout::new("sysprep");
    let v = virt_launcher::spec::from_str(
        &vmi(
            json!([{"name": "sp", "sysprep": {"configMap": {"name": "unattend"}}}]),
            None,
            None,
        )
        .to_string(),
        "t",
    )
    .unwrap();
    let mut facts = PodFacts::defaults(&v);
    facts.paths.config_dir = l.p("config");
    facts.paths.private_dir = l.p("private");
    let prepare = || virt_launcher::pod::prepare::prepare(&v, &facts).map_err(|e| e.to_string());
    // No source: the error names the volume and the directory.
    let e = prepare().unwrap_err();
    assert!(
        e.starts_with("volume sp: ") && e.contains("config/sysprep/sp"),
        "{e}"
    );
    // A source without an answer file (KubeVirt's validateUnattendPresence).
    fs::create_dir_all(l.p("config/sysprep/sp")).unwrap();
    fs::write(l.p("config/sysprep/sp/notes.txt"), b"x").unwrap();
    let e = prepare().unwrap_err();
    assert!(
        e.contains("autounattend.xml") && e.contains("unattend.xml"),
        "{e}"
    );
    assert!(!l.p("config/sysprep-disks/sp.iso").exists());
    // The answer file (any case): an ISO labelled unattendCD that holds it.
    fs::write(
        l.p("config/sysprep/sp/Autounattend.xml"),
        b"<unattend>lv-sysprep-answer</unattend>",
    )
    .unwrap();
    prepare().expect("sysprep ISO");
    let iso = fs::read(l.p("config/sysprep-disks/sp.iso")).unwrap();
    // ISO 9660 primary volume descriptor at 32 KiB; its volume id at byte 40.
    assert_eq!(&iso[32768 + 1..32768 + 6], b"CD001");
    assert_eq!(&iso[32768 + 40..32768 + 50], b"unattendCD");
    assert!(
        iso.windows(17).any(|w| w == b"lv-sysprep-answer"),
        "the answer file is not in the ISO"
    );
    // A source symlinked out of its directory is refused.
    fs::remove_dir_all(l.p("config/sysprep/sp")).unwrap();
    symlink("/etc", l.p("config/sysprep/sp")).unwrap();
    let e = prepare().unwrap_err();
    assert!(e.starts_with("volume sp: ") && e.contains("outside"), "{e}");
}

#[test]
fn hotplug_path_check_for_attach() {
    // What the core calls right before attaching (see podfacts::confined_hotplug_path).
    let l = Layout::new("hpcheck");
    let v = virt_launcher::spec::from_str(&vmi(json!([]), None, None).to_string(), "t").unwrap();
    let mut paths = virt_launcher::convert::facts::PodPaths::kubevirt_defaults(&v);
    paths.hotplug_disks_dir = l.p("hotplug");
    let check = |vol: &str, block: bool| {
        virt_launcher::pod::facts::confined_hotplug_path(&paths, vol, block)
            .map_err(|e| e.to_string())
    };
    fs::write(l.p("hotplug/ok.img"), b"").unwrap();
    assert!(check("ok", false).is_ok());
    symlink(l.p("outside/secret.img"), l.p("hotplug/out.img")).unwrap();
    assert!(check("out", false).unwrap_err().contains("outside"));
    assert!(check("gone", false).unwrap_err().contains("No such file"));
    assert!(check("../outside/secret", false)
        .unwrap_err()
        .contains("DNS-1123"));
    nix::unistd::mkfifo(&l.p("hotplug/fifo.img"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert!(check("fifo", false).unwrap_err().contains("FIFO"));
    assert!(check("ok", true).unwrap_err().contains("No such file"));
}

// ------------------------------------------------------------------ live guest helpers

use common::Pod;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use virt_launcher::api::{client, pb};

/// Text the guest writes to its second disk at boot (`lv.write=vdb:`); compared byte for byte
/// after the launcher stopped.
const MARK: &str = "hardening-data-0123456789";

/// A pod whose guest counts on `data` (vda) and wrote MARK to `mark` (vdb).
fn guest_pod(name: &str) -> Pod {
    Pod::new(name)
        .with_disk("data", "virtio", 16)
        .with_disk("mark", "virtio", 16)
        .kernel_args(&format!("lv.counter=vda lv.write=vdb:{MARK}"))
}

/// After the launcher stopped: the counter on disk is the last one the guest reported (or
/// the one it was writing), and the MARK disk holds exactly MARK.
/// `console_complete`: the console log recorded the guest to the end (lines written while the
/// runtime filesystem was full are lost; then only "nothing went backwards" can be checked).
fn assert_data_intact(pod: &Pod, seen_before_stop: u64, console_complete: bool) {
    let printed = pod.last_console_count();
    let on_disk = pod.disk_counter("data");
    assert!(printed > 0, "the guest never counted\n{}", pod.dump());
    assert!(
        on_disk >= printed.max(seen_before_stop),
        "counter on disk {on_disk}, guest reported {printed}, seen {seen_before_stop}: data lost\n{}",
        pod.dump()
    );
    if console_complete {
        assert!(
            on_disk <= printed + 1,
            "counter on disk {on_disk} ahead of the guest's last report {printed}\n{}",
            pod.dump()
        );
    }
    let mark = fs::read(pod.disk_image("mark")).unwrap();
    let want = format!("{MARK}\n");
    assert_eq!(&mark[..want.len()], want.as_bytes(), "MARK disk changed");
    assert!(
        mark[want.len()..].iter().all(|b| *b == 0),
        "MARK disk has other data"
    );
}

fn stop_and_check(mut pod: Pod) -> Pod {
    let seen = pod.disk_counter("data");
    pod.signal(Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit {status}\n{}", pod.dump());
    assert_data_intact(&pod, seen, true);
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    pod
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(want), hard).expect("setrlimit");
}

/// A legitimate client calling GetDomain and Ping every 20 ms until told to stop.
fn legit_caller(
    socket: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Duration>, Vec<String>)> {
    tokio::spawn(async move {
        let mut c = client::connect(&socket).await.expect("legit connect");
        let (mut lat, mut errs) = (Vec::new(), Vec::new());
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            let mut r = tonic::Request::new(pb::Empty {});
            r.set_timeout(Duration::from_secs(5));
            let a = c.get_domain(r).await;
            let mut r = tonic::Request::new(pb::Empty {});
            r.set_timeout(Duration::from_secs(5));
            let b = c.ping(r).await;
            lat.push(t.elapsed());
            for e in [a.err(), b.err()].into_iter().flatten() {
                errs.push(e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (lat, errs)
    })
}

// ------------------------------------------------------------------ the socket under a flood

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_connections_and_requests_is_bounded() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut pod = guest_pod("flood");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_caller(pod.socket(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count_before = pod.disk_counter("data");

    // 1. 10 000 connection attempts, each held open, some sending garbage.
    let socket = pod.socket();
    let launcher_pid = pod.child.as_ref().unwrap().id();
    let (held_open, closed, failed, peak_fds) = tokio::task::spawn_blocking(move || {
        let fds = || {
            fs::read_dir(format!("/proc/{launcher_pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let mut peak_fds = fds();
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        raise_fd_limit(16384);
        let mut conns = Vec::new();
        let mut failed = 0;
        for i in 0..10_000 {
            match UnixStream::connect(&socket) {
                Ok(mut s) => {
                    if i % 10 == 0 {
                        let _ = s.write_all(b"GARBAGE\r\n\r\n\x00\xff not http/2");
                    }
                    conns.push(s);
                }
                Err(_) => failed += 1,
            }
            if i % 500 == 0 {
                peak_fds = peak_fds.max(fds());
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        peak_fds = peak_fds.max(fds());
        let (mut open, mut closed) = (0, 0);
        for s in &mut conns {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                Ok(_) => open += 1, // the server's HTTP/2 preface: served
                Err(_) => closed += 1,
            }
        }
        (open, closed, failed, peak_fds)
    })
    .await
    .unwrap();
    println!("connections: 10000 attempted, {held_open} still open (accepted, or queued in the kernel backlog), {closed} closed by the launcher, {failed} failed to connect; launcher fds at peak: {peak_fds}");
    // What bounds the launcher: its own descriptors (a few dozen besides the connections).
    assert!(
        peak_fds <= virt_launcher::api::server::MAX_CONNECTIONS + 100,
        "launcher had {peak_fds} fds open"
    );
    assert!(closed + failed >= 10_000 - virt_launcher::api::server::MAX_CONNECTIONS - 100);

    // 2. 10 000 requests from 100 concurrent callers on 10 connections.
    let ok = Arc::new(AtomicU64::new(0));
    let err = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(pod.client().await);
    }
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = clients[i % 10].clone();
        let (ok, err) = (ok.clone(), err.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..100 {
                let r = match (i + j) % 4 {
                    0 => c.get_domain(pb::Empty {}).await.map(|_| ()),
                    1 => c.ping(pb::Empty {}).await.map(|_| ()),
                    2 => c.info(pb::Empty {}).await.map(|_| ()),
                    _ => c.get_stats(pb::Empty {}).await.map(|_| ()),
                };
                if r.is_ok() { &ok } else { &err }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A few oversized requests (5 MiB): refused, nothing else affected.
    let mut c = pod.client().await;
    for _ in 0..5 {
        let e = c
            .sync(pb::SyncRequest {
                vmi: vec![b'{'; 5 << 20],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::InvalidArgument
            ),
            "{e}"
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t.elapsed();
    let (ok, err) = (ok.load(Ordering::Relaxed), err.load(Ordering::Relaxed));
    println!("requests: {ok} answered, {err} failed, in {elapsed:?}");
    assert_eq!(ok + err, 10_000);
    assert_eq!(err, 0, "requests of an allowed peer failed");

    stop.store(true, Ordering::SeqCst);
    let (mut lat, errs) = legit.await.unwrap();
    let (p50, p99, max) = (
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        percentile(&mut lat, 1.0),
    );
    println!(
        "legit client: {} calls, p50 {p50:?}, p99 {p99:?}, max {max:?}, {} errors",
        lat.len() * 2,
        errs.len()
    );
    // Every legitimate call was answered within its 5 s deadline (latency figures are printed,
    // not asserted: timing belongs in benchmarks).
    assert!(errs.is_empty(), "legit calls failed: {errs:?}");
    // The guest kept running through all of it.
    let count_after = pod.disk_counter("data");
    println!("guest counter: {count_before} -> {count_after}");
    assert!(
        count_after > count_before + 5,
        "guest stalled\n{}",
        pod.dump()
    );
    tokio::task::block_in_place(|| {
        stop_and_check(pod);
    });
}

// ------------------------------------------------------------------ daemon faults

/// User sees: GetDomain keeps answering throughout; GetStats may fail (UNAVAILABLE) for the
/// second libvirtd is down and recovers; the guest never notices; a final SIGTERM still shuts
/// it down cleanly (events arrive over the last connection). Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_killed_five_times_while_the_api_is_busy() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut pod = guest_pod("daemonfaults");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_caller(pod.socket(), stop.clone());
    let stats = {
        let socket = pod.socket();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = client::connect(&socket).await.unwrap();
            let (mut ok, mut failed) = (0, 0);
            let mut last_ok = false;
            while !stop.load(Ordering::SeqCst) {
                let mut r = tonic::Request::new(pb::Empty {});
                r.set_timeout(Duration::from_secs(5));
                last_ok = c.get_stats(r).await.is_ok();
                if last_ok {
                    ok += 1
                } else {
                    failed += 1
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed, last_ok)
        })
    };
    let p = &pod;
    tokio::task::block_in_place(|| {
        for i in 0..5 {
            let before = p.disk_counter("data");
            p.kill_daemon_and_wait_restart("libvirtd", Duration::from_secs(15));
            p.wait_counter_above("data", before + 2, Duration::from_secs(30));
            println!(
                "libvirtd kill {}: guest at {}",
                i + 1,
                p.disk_counter("data")
            );
        }
        // Let the stats caller see a healthy daemon again.
        std::thread::sleep(Duration::from_secs(3));
    });
    stop.store(true, Ordering::SeqCst);
    let (lat, errs) = legit.await.unwrap();
    let (ok, failed, last_ok) = stats.await.unwrap();
    println!(
        "GetDomain/Ping: {} calls, {} errors; GetStats: {ok} ok, {failed} failed",
        lat.len() * 2,
        errs.len()
    );
    assert!(errs.is_empty(), "GetDomain/Ping failed: {errs:?}");
    assert!(
        last_ok,
        "GetStats did not recover after the restarts\n{}",
        pod.dump()
    );
    let console_before = pod.last_console_count();
    tokio::task::block_in_place(|| {
        // QEMU writes the console log itself: it goes on through the libvirtd restarts.
        let line = format!("LV-COUNT {}", console_before + 3);
        pod.wait_console(&line, Duration::from_secs(30));
        stop_and_check(pod);
    });
}

/// libvirtd hangs (SIGSTOP: it keeps its socket and accepts connections, but answers nothing).
/// User sees: within ~8 s keepalive gives up on the connection, the reconnect's handshake times
/// out, the launcher kills the hung daemon (an event says so), the pod's supervisor starts a
/// fresh one and the launcher reconnects; the guest never stops counting and the API answers
/// GetStats again. Before keepalive, every libvirt call (and the liveness check) would have
/// waited on the hung daemon for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_libvirtd_is_replaced_and_the_guest_runs_on() {
    let mut pod = guest_pod("hunglibvirtd");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let old = pod.daemon_pid("libvirtd").expect("libvirtd pid");
    kill(Pid::from_raw(old), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let replaced = tokio::task::block_in_place(|| {
        pod.wait_daemon_replaced("libvirtd", old, Duration::from_secs(40));
        stopped.elapsed()
    });
    // The old daemon is gone for good (killed, not merely continued).
    assert!(
        !Path::new(&format!("/proc/{old}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{old}/status"))
                .unwrap_or_default()
                .contains("State:\tZ"),
        "the hung libvirtd {old} is still there"
    );
    let log = pod.log();
    assert!(log.contains("not even keepalive"), "{}", pod.dump());
    assert!(log.contains("libvirtd is hung"), "{}", pod.dump());
    let mut c = pod.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = tonic::Request::new(pb::Empty {});
        r.set_timeout(Duration::from_secs(5));
        if c.get_stats(r).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GetStats never recovered\n{}",
            pod.dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "libvirtd stopped: replaced after {} ms",
        replaced.as_millis()
    );
    tokio::task::block_in_place(|| {
        let before = pod.disk_counter("data");
        pod.wait_counter_above("data", before + 2, Duration::from_secs(30));
        stop_and_check(pod);
    });
}

// ------------------------------------------------------------------ hot-plug file vanishes

/// User sees: the volume goes Failed with a message naming the volume and the missing path;
/// the VM keeps running; once the file is back, the next Sync attaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_file_deleted_before_attach() {
    let mut pod = guest_pod("hpgone");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let mut c = pod.client().await;
    let mut vmi: Value =
        serde_json::from_slice(&c.get_vmi(pb::Empty {}).await.unwrap().into_inner().vmi).unwrap();
    client::add_hotplug_volume(&mut vmi, "hp", "hp", "virtio", false).unwrap();
    let img = pod.hotplug_dir().join("hp.img");
    fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    fs::remove_file(&img).unwrap(); // mounted, then gone right before the attach
    let r = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&vmi).unwrap(),
        })
        .await;
    let d = match r {
        Ok(d) => d.into_inner().domain.unwrap(),
        Err(e) => {
            assert!(e.message().contains("hp"), "{e}");
            assert_said_once(e.message());
            c.get_domain(pb::Empty {}).await.unwrap().into_inner()
        }
    };
    let hp = d
        .disks
        .iter()
        .find(|k| k.volume == "hp")
        .expect("hp listed");
    assert_eq!(hp.phase(), pb::VolumePhase::Failed, "{hp:?}");
    assert!(
        hp.message.contains("hp.img"),
        "message names the path: {hp:?}"
    );
    assert_said_once(&hp.message);
    // The log says it once too (each line: the volume, the cause).
    for line in pod.log().lines().filter(|l| l.contains("hp.img")) {
        assert_said_once(line);
    }
    assert_eq!(d.state(), pb::DomainState::Running);
    // Back again: attached.
    fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let d = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&vmi).unwrap(),
        })
        .await
        .expect("second Sync")
        .into_inner()
        .domain
        .unwrap();
    let hp = d.disks.iter().find(|k| k.volume == "hp").unwrap();
    assert_eq!(hp.phase(), pb::VolumePhase::Ready, "{hp:?}");
    tokio::task::block_in_place(|| {
        pod.wait_console("vdc:16384", Duration::from_secs(20));
        stop_and_check(pod);
    });
}

/// Each cause once: no `volume hp: volume hp: …`, the OS error not repeated.
fn assert_said_once(message: &str) {
    for part in ["volume hp:", "No such file or directory"] {
        assert!(
            message.matches(part).count() <= 1,
            "{part:?} more than once: {message}"
        );
    }
}

/// The core checks `podfacts::confined_hotplug_path` before it attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_symlink_out_of_the_hotplug_dir_is_refused_at_attach() {
    let mut pod = guest_pod("hpsym");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let outside = pod.dir.join("outside.img");
    fs::File::create(&outside)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    symlink(&outside, pod.hotplug_dir().join("hp.img")).unwrap();
    let mut c = pod.client().await;
    let mut vmi: Value =
        serde_json::from_slice(&c.get_vmi(pb::Empty {}).await.unwrap().into_inner().vmi).unwrap();
    client::add_hotplug_volume(&mut vmi, "hp", "hp", "virtio", false).unwrap();
    let e = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&vmi).unwrap(),
        })
        .await
        .expect_err("a hot-plug path leaving the hot-plug directory must be refused");
    assert!(
        e.message().contains("hp") && e.message().contains("outside"),
        "{}",
        e.message()
    );
    // Nothing was attached: the domain has only its own disks, and the guest never saw a third.
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert!(
        d.disks
            .iter()
            .all(|k| k.volume != "hp" || k.phase() == pb::VolumePhase::Failed),
        "{d:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !pod.console().contains("vdc:"),
        "the guest saw a third disk\n{}",
        pod.dump()
    );
    tokio::task::block_in_place(|| {
        stop_and_check(pod);
    });
}

// ------------------------------------------------------------------ runtime disk full

struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
    /// Fills the filesystem; returns the filler's path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = fs::File::create(&p).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        p
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Appends to the console log up to the end of its last page (best effort: the guest may
/// write at the same time). With the filesystem full, the guest's next console byte then needs
/// a page the filesystem does not have; without this, a log with room left in its last page
/// would go on growing into it for a minute and the test would not be testing a full log.
fn pad_console_to_page(pod: &Pod) {
    use std::io::Write;
    let log = pod.console_log();
    let len = fs::metadata(&log).unwrap().len();
    let pad = (4096 - len % 4096) % 4096;
    if pad > 0 {
        let mut line = vec![b'#'; pad as usize];
        line[pad as usize - 1] = b'\n';
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        let _ = f.write_all(&line); // a short write ends at the page boundary too
    }
}

/// User sees, when the pod's runtime filesystem fills up (another writer filled the
/// emptyDir): the guest keeps running and counting on its PVC; the console lines it writes
/// while the filesystem is full are lost (QEMU writes the log itself and skips a write that
/// fails), and the console log resumes by itself once there is space again; the API
/// answers; SIGTERM stops the guest cleanly (exit 0); the data is intact.
///
/// libvirtd restarted while the filesystem is full: libvirtd cannot write the domain's status
/// file and kills QEMU itself ("shutting down, reason=daemon": libvirt's choice, not ours);
/// the launcher notices, exits non-zero and leaves nothing behind; the data on the PVC is
/// intact. A launcher starting on a full filesystem fails with a message saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_disk_full() {
    let mut pod = guest_pod("diskfull");
    let fs_ = Tmpfs::mount(&pod.runtime_dir(), "64m");
    pod.start();
    tokio::task::block_in_place(|| pod.wait_console("LV-COUNT 3", Duration::from_secs(90)));
    let filler = fs_.fill();
    pad_console_to_page(&pod);
    let printed_when_full = pod.last_console_count();
    let mut c = pod.client().await;
    let before = pod.disk_counter("data");
    let counted = tokio::task::block_in_place(|| {
        pod.wait_counter_above("data", before + 10, Duration::from_secs(30))
    });
    let d = c
        .get_domain(pb::Empty {})
        .await
        .expect("GetDomain while full")
        .into_inner();
    assert_eq!(d.state(), pb::DomainState::Running, "{d:?}");
    c.ping(pb::Empty {}).await.expect("Ping while full");
    let stats = c.get_stats(pb::Empty {}).await;
    println!("GetStats while full: ok={}", stats.is_ok());
    let printed = pod.last_console_count();
    println!(
        "while full: guest counted {before} -> {counted}; console showed {printed_when_full} -> {printed}"
    );
    assert!(
        printed + 5 < counted,
        "the console log grew on a full filesystem ({printed} vs {counted}): not testing a full log\n{}",
        pod.dump()
    );

    // Space again: the console log resumes without anyone's help.
    fs::remove_file(&filler).unwrap();
    tokio::task::block_in_place(|| {
        let now = pod.disk_counter("data");
        pod.wait_console(&format!("LV-COUNT {}", now + 3), Duration::from_secs(30));
        pod.wait_log(
            &format!("\"message\":\"LV-COUNT {}\"", now + 3),
            Duration::from_secs(10),
        );
    });
    drop(c);
    let pod = tokio::task::block_in_place(|| stop_and_check(pod));
    drop(fs_);

    // libvirtd restarted while the filesystem is full.
    let mut pod1 = guest_pod("diskfull1");
    let fs1 = Tmpfs::mount(&pod1.runtime_dir(), "64m");
    pod1.start();
    tokio::task::block_in_place(|| {
        pod1.wait_console("LV-COUNT 3", Duration::from_secs(90));
        fs1.fill();
        pod1.kill_daemon_and_wait_restart("libvirtd", Duration::from_secs(15));
        let seen = pod1.disk_counter("data");
        let status = pod1.wait_exit(Duration::from_secs(60));
        let log = pod1.log();
        println!(
            "libvirtd restarted while full: launcher exit {status}; libvirt killed QEMU: {}",
            log.contains("reason=daemon")
        );
        assert!(
            !status.success(),
            "libvirtd kills the guest when it cannot save its status (if this now passes, \
             libvirt changed: update the test and RELIABILITY.md)\n{}",
            pod1.dump()
        );
        assert!(log.contains("domain stopped"), "{}", pod1.dump());
        assert_data_intact(&pod1, seen, false);
        let left = pod1.leftover_processes();
        assert!(left.is_empty(), "processes left behind: {left:#?}");
    });
    drop(fs1);

    // A launcher starting on a full runtime filesystem.
    let mut pod2 = guest_pod("diskfull2");
    let fs2 = Tmpfs::mount(&pod2.runtime_dir(), "1m");
    fs2.fill();
    pod2.start();
    let status = tokio::task::block_in_place(|| pod2.wait_exit(Duration::from_secs(60)));
    assert!(!status.success());
    let log = pod2.log();
    assert!(
        log.contains("No space left on device") || log.contains("space"),
        "{}",
        pod2.dump()
    );
    assert!(pod2.leftover_processes().is_empty());
    drop(pod);
}
