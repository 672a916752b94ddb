//! KubeVirt's pod contract, black-box: `virt-launcher-monitor` started with the command line
//! virt-controller gives the `compute` container (plus `--domain-type qemu`: TCG here), as PID 1
//! of a container played by mount, UTS and pid namespaces (`testkit::compute`).
//!
//! Checked as virt-handler relies on it: `launcher-sock` appears as a real socket; its owner's
//! parent (SO_PEERCRED) is the monitor; unknown flags are accepted; libvirt answers at
//! `virtqemud-sock`; after a Sync, QEMU's parent is the monitor and the serial console socket
//! is `<private>/<uid>/virt-serial0`; SIGTERM to the monitor marks the domain for graceful
//! shutdown without pressing the power button, and `--grace-period-seconds` later the launcher
//! destroys the domain (the guest ignores ACPI anyway) and everything exits, the
//! container-disk `*.sock` removed.

mod common;

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use testkit::compute::{self, Compute};

use common::{monitor_binary, wait_for, Pod};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use virt_launcher::api::pb::{self, DomainState};

/// The processes in mount namespace `ns`, as `pid: command line`.
fn in_namespace(ns: &str) -> Vec<String> {
    testkit::procs::pids()
        .into_iter()
        .filter(|p| testkit::procs::mount_ns(*p).is_ok_and(|n| n == ns))
        .map(|p| format!("{p}: {}", testkit::procs::cmdline(p).unwrap_or_default()))
        .collect()
}

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Starts `virt-launcher-monitor` for `pod` in its container (`testkit::compute`), with
/// `grace` as `--grace-period-seconds`, `qemu_timeout` as `--qemu-timeout`, and flags of later
/// KubeVirt versions (and some of ours do not know) among KubeVirt's; a containerDisk
/// container's socket (`disk_0.sock`) waits in the container-disk dir. Returns the container,
/// the monitor's pid and that socket's listener.
fn start_container(pod: &mut Pod, grace: u64, qemu_timeout: &str) -> (Compute, i32, UnixListener) {
    let c = Compute {
        top: pod.dir.join("container"),
        name: pod.name.clone(),
        uid: pod.uid(),
        grace_seconds: grace,
        qemu_timeout: qemu_timeout.into(),
        extra_args: [
            "--image-volume",
            "--libvirt-log-filters",
            "3:remote 4:event",
            "--vl-test-unknown-flag",
            "some-value",
            "--vl-test-unknown-switch",
        ]
        .map(String::from)
        .to_vec(),
    };
    c.prepare(&common::guest_dir()).unwrap();
    // Filesystem PVCs are mounted at /var/run/kubevirt-private/vmi-disks/<volume>/.
    for d in &pod.disks {
        d.create(&c.vmi_disks()).unwrap();
    }
    let cd_listener = UnixListener::bind(c.container_disks().join("disk_0.sock")).unwrap();
    let binary = monitor_binary();
    let mut cmd = c.command(&binary).unwrap();
    cmd.stdin(Stdio::null());
    pod.spawn_command(cmd);
    let unshare = pod.child.as_ref().unwrap().id() as i32;
    let monitor = compute::monitor_pid(unshare, &binary, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pod.log()));
    assert_eq!(
        compute::pid_in_namespace(monitor),
        Some(1),
        "the monitor is the container's PID 1"
    );
    (c, monitor, cd_listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubevirts_pod_runs_our_launcher() {
    // The VMI (and its uid) as the harness builds it; the guest ignores the power button.
    let mut pod = Pod::new("kvpod")
        .kernel_args("lv.acpi=ignore")
        .with_disk("data", "virtio", 8);
    pod.wait_for_sync = true;
    let uid = pod.uid();
    let (dirs, monitor, _cd_listener) = start_container(&mut pod, 4, "271s");
    let cd_sock = dirs.container_disks().join("disk_0.sock");

    // Readiness: launcher-sock, a real socket (virt-handler opens it without following links).
    let sock = dirs.socket();
    wait_for("launcher-sock", Duration::from_secs(60), || {
        if let Some(Ok(Some(st))) = pod.child.as_mut().map(|c| c.try_wait()) {
            panic!("monitor exited early ({st})\n{}", pod.log());
        }
        is_socket(&sock).then_some(())
    });
    assert!(!sock.with_file_name("launcher-init-sock").exists());
    let ns = testkit::procs::mount_ns(monitor).unwrap();
    assert_ne!(
        ns,
        testkit::procs::mount_ns(std::process::id() as i32).unwrap()
    );
    let _container = compute::Guard::of(monitor).unwrap();

    // SO_PEERCRED: the socket's owner is virt-launcher, a child of the monitor.
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let owner = stream.peer_cred().unwrap().pid().unwrap();
    drop(stream);
    assert_eq!(
        compute::parent(owner),
        Some(monitor),
        "socket owner's parent\n{}",
        pod.log()
    );
    let exe = fs::read_link(format!("/proc/{owner}/exe")).unwrap();
    assert!(exe.ends_with("virt-launcher"), "{}", exe.display());

    // The libvirt daemon is the socket owner's child called virtqemud (virt-handler raises
    // its memlock limit before VFIO/SEV VMs start): libvirtd run under that name.
    let daemon = testkit::procs::pids()
        .into_iter()
        .find(|p| {
            compute::parent(*p) == Some(owner)
                && fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains("(virtqemud)"))
        })
        .unwrap_or_else(|| panic!("no virtqemud child of the launcher\n{}", pod.log()));
    let exe = fs::read_link(format!("/proc/{daemon}/exe")).unwrap();
    assert!(exe.ends_with("libvirtd"), "{}", exe.display());

    // Unknown flags: named in a warning, not fatal.
    let log = pod.log();
    assert!(
        log.contains("ignoring unknown flags")
            && log.contains("--vl-test-unknown-flag")
            && log.contains("--vl-test-unknown-switch"),
        "{log}"
    );

    // libvirt answers at virtqemud-sock.
    let virtqemud = dirs.libvirt_run().join("virtqemud-sock");
    let out = Command::new("virsh")
        .arg("-c")
        .arg(format!(
            "qemu+unix:///system?socket={}",
            virtqemud.display()
        ))
        .arg("version")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("QEMU"),
        "virsh at virtqemud-sock: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Start the VM through launcher.v1.
    let mut c = testkit::launcher::connect(&sock).await.unwrap();
    let vmi: serde_json::Value = serde_norway::from_str(&pod.vmi_yaml()).unwrap();
    let synced = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&vmi).unwrap(),
        })
        .await;
    assert!(synced.is_ok(), "{synced:?}\n{}", pod.log());
    let qemu = wait_for("QEMU", Duration::from_secs(30), || {
        testkit::procs::find_qemu(&pod.name, &ns).ok()
    });
    // Re-parented to the monitor once libvirtd's daemonizing fork exits.
    wait_for(
        "QEMU re-parented to the monitor",
        Duration::from_secs(10),
        || (compute::parent(qemu) == Some(monitor)).then_some(()),
    );

    // The serial console socket, a real socket in the VM's private directory.
    let vm_private = dirs.private().join(&uid);
    assert!(
        is_socket(&vm_private.join("virt-serial0")),
        "no console socket in {}: {:?}",
        vm_private.display(),
        fs::read_dir(&vm_private).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let console_log = vm_private.join("virt-serial0-log");
    wait_for("the guest booted", Duration::from_secs(120), || {
        testkit::guest::read_console(&console_log)
            .contains("LV-READY")
            .then_some(())
    });
    let mem = |pid: i32| {
        let f = |field| testkit::procs::status_mib(pid, field).unwrap();
        format!(
            "RSS {:.1} MiB (anon {:.1}, file {:.1})",
            f("VmRSS"),
            f("RssAnon"),
            f("RssFile")
        )
    };
    eprintln!(
        "with a guest running: monitor {}, launcher {}",
        mem(monitor),
        mem(owner)
    );

    // SIGTERM to the monitor (kubelet deleting the pod): the launcher marks the domain for
    // graceful shutdown, and does not press the button itself (virt-handler's Shutdown does).
    let mut watch = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let _current = watch.message().await.unwrap().unwrap();
    let signalled = Instant::now();
    kill(Pid::from_raw(monitor), Signal::SIGTERM).unwrap();
    let marked = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = watch.message().await.unwrap() {
            if ev.message == "marked for graceful shutdown" {
                return ev;
            }
        }
        panic!("event stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no graceful-shutdown mark\n{}", pod.log()));
    assert_eq!(marked.state(), DomainState::Running);
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        d.state(),
        DomainState::Running,
        "stopped before the grace period"
    );

    // --grace-period-seconds (4) later: destroyed; everything exits.
    let status = pod.wait_exit(Duration::from_secs(60));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "exited {took:?} after SIGTERM, before the grace period\n{}",
        pod.log()
    );
    let console = testkit::guest::read_console(&console_log);
    assert!(
        !console.contains("LV-ACPI-IGNORED"),
        "the launcher pressed the power button"
    );
    let log = pod.log();
    assert!(
        log.contains("--grace-period-seconds after SIGTERM over"),
        "{log}"
    );
    assert!(testkit::procs::cmdline(qemu).is_none(), "QEMU still runs");
    assert!(
        testkit::procs::cmdline(owner).is_none(),
        "virt-launcher still runs"
    );
    assert!(!cd_sock.exists(), "container-disk socket not removed");
    // The launcher's status, passed on: a stop asked for is a clean end.
    assert!(status.success(), "{status:?}\n{}", pod.log());
    let left = in_namespace(&ns);
    assert!(left.is_empty(), "left behind: {left:?}");
    // Passed: the copies of the guest and the disk go (a failure keeps them to look at).
    fs::remove_dir_all(dirs.top).unwrap();
}

/// `--qemu-timeout`: without a domain in time (no Sync came), the launcher fails and the pod
/// ends, the container-disk sockets removed.
#[test]
fn no_domain_within_the_qemu_timeout_fails_the_pod() {
    let mut pod = Pod::new("kvtimeout");
    let (dirs, monitor, _cd_listener) = start_container(&mut pod, 30, "3s");
    let _container = wait_for("the container", Duration::from_secs(30), || {
        let ns = testkit::procs::mount_ns(monitor).ok()?;
        (ns != testkit::procs::mount_ns(std::process::id() as i32).ok()?)
            .then(|| compute::Guard { monitor, ns })
    });
    let sock = dirs.socket();
    wait_for("launcher-sock", Duration::from_secs(30), || {
        is_socket(&sock).then_some(())
    });
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{status:?}\n{}", pod.log());
    let log = pod.log();
    assert!(
        log.contains("no domain was started within --qemu-timeout"),
        "{log}"
    );
    assert!(!dirs.container_disks().join("disk_0.sock").exists());
    fs::remove_dir_all(dirs.top).unwrap();
}

const LAUNCHER: &str = env!("CARGO_BIN_EXE_virt-launcher");

/// KubeVirt's command line is told from ours: a bad value names KubeVirt's flag, a non-root
/// launcher (KubeVirt's non-root VMIs) says what to do, and `virt-launcher run` keeps its own
/// flags (an unknown one is still an error there). Nothing is started.
#[test]
fn command_lines_are_told_apart() {
    let run = |cmd: &mut Command| {
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, err) = run(Command::new(LAUNCHER).args(["--uid", "u", "--qemu-timeout", "soon"]));
    assert!(!st.success());
    assert!(
        err.contains("--qemu-timeout: not a duration like 271s (got \"soon\")"),
        "{err}"
    );
    let (st, err) = run(Command::new("setpriv").args([
        "--reuid=107",
        "--regid=107",
        "--clear-groups",
        LAUNCHER,
        "--uid",
        "u",
        "--run-as-nonroot",
    ]));
    assert!(!st.success());
    assert!(
        err.contains("running as uid 107 (--run-as-nonroot): non-root VMIs are not supported yet"),
        "{err}"
    );
    let (st, err) = run(Command::new(LAUNCHER).args(["--uid", "u", "--domain-type", "xen"]));
    assert!(!st.success());
    assert!(
        err.contains("--domain-type: unknown domain type \"xen\""),
        "{err}"
    );
    let (st, err) = run(Command::new(LAUNCHER).args(["run", "--qemu-timeout", "soon"]));
    assert!(!st.success());
    assert!(err.contains("invalid value 'soon'"), "{err}");
    let (st, err) = run(Command::new(LAUNCHER).args(["run", "--uid", "u"]));
    assert!(!st.success());
    assert!(err.contains("unexpected argument '--uid'"), "{err}");
}

/// The monitor passes a failed launcher's status on and removes the container-disk sockets;
/// with `--keep-after-failure` it stays (for debugging) instead of exiting. `--simulate-crash`
/// (KubeVirt's functional tests' flag) makes the launcher fail before it touches anything.
#[test]
fn monitor_passes_a_failure_on_or_keeps_the_container() {
    let dir =
        testkit::fresh_dir(std::env::temp_dir().join(format!("vl-kvcrash-{}", std::process::id())))
            .unwrap();
    let monitor = |keep: bool| {
        let mut cmd = Command::new(monitor_binary());
        cmd.args(["--uid", "u", "--simulate-crash", "--container-disk-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if keep {
            cmd.arg("--keep-after-failure");
        }
        cmd.spawn().unwrap()
    };
    let sock = dir.join("disk_0.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let out = monitor(false).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--simulate-crash: crashing as asked"), "{err}");
    assert!(!sock.exists(), "container-disk socket not removed");

    let mut kept = monitor(true);
    std::thread::sleep(Duration::from_secs(2));
    assert!(kept.try_wait().unwrap().is_none(), "the monitor exited");
    kept.kill().unwrap();
    let out = kept.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keep-after-failure"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}
