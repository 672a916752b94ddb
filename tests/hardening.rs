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
    let left: Vec<String> = procs_mentioning(&runtime);
    assert!(left.is_empty(), "processes left: {left:?}");
}

fn procs_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(raw) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&raw).replace('\0', " ");
            if c.contains(needle) && !c.contains("hardening-") {
                found.push(c);
            }
        }
    }
    found
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
    use virt_launcher::podfacts::PodFacts;
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
    let e = virt_launcher::prepare::prepare(&v, &facts)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("volume cm: ") && e.contains("outside"), "{e}");
    assert!(!l.p("config/config-map-disks/cm.iso").exists());

    // cloud-init secretRef whose userdata is a symlink to a file outside the secret.
    let v = spec(json!([{"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "s"}}}]));
    fs::create_dir_all(l.p("config/secret/ci")).unwrap();
    symlink(l.p("outside/secret.img"), l.p("config/secret/ci/userdata")).unwrap();
    let e = virt_launcher::prepare::prepare(&v, &facts)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("volume ci: ") && e.contains("outside"), "{e}");
    // Kubernetes' own layout (userdata -> ..data/userdata) is fine.
    fs::remove_file(l.p("config/secret/ci/userdata")).unwrap();
    fs::create_dir_all(l.p("config/secret/ci/..data")).unwrap();
    fs::write(l.p("config/secret/ci/..data/userdata"), b"#cloud-config\n").unwrap();
    symlink("..data/userdata", l.p("config/secret/ci/userdata")).unwrap();
    if Command::new("xorrisofs").arg("--version").output().is_ok() {
        virt_launcher::prepare::prepare(&v, &facts).expect("k8s secret layout");
        let ud = fs::read(l.p("private/cloud-init-nocloud/user-data")).unwrap();
        assert_eq!(ud, b"#cloud-config\n");
    }
}

#[test]
fn hotplug_path_check_for_attach() {
    // What the core calls right before attaching (see podfacts::confined_hotplug_path).
    let l = Layout::new("hpcheck");
    let v = virt_launcher::spec::from_str(&vmi(json!([]), None, None).to_string(), "t").unwrap();
    let mut paths = virt_launcher::podfacts::PodPaths::kubevirt_defaults(&v);
    paths.hotplug_disks_dir = l.p("hotplug");
    let check = |vol: &str, block: bool| {
        virt_launcher::podfacts::confined_hotplug_path(&paths, vol, block)
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
