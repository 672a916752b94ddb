//! The integration tests' launcher pod: a standalone launcher with its own runtime directory,
//! PVC directory and VMI, booting the tiny test guest under TCG. Built on the harness the
//! benchmark shares (`testkit`); here every failure panics with the pod's logs.
//!
//! Needs root, libvirt and QEMU, and the test guest (`scripts/build-guest.sh`); `./devtool
//! test` provides all three. A missing prerequisite fails the test with the command to run:
//! tests that need a guest never pass without booting one.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use testkit::launcher::Client;
pub use testkit::vmi::Disk;
use testkit::{guest, launcher};

pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_virt-launcher");

/// Where the test guest's kernel and initramfs are.
pub fn guest_dir() -> PathBuf {
    let dir = guest::dir();
    assert!(
        guest::is_complete(&dir),
        "test guest missing in {}: run ./devtool test (or scripts/build-guest.sh)",
        dir.display()
    );
    dir
}

/// A launcher pod under construction / running.
pub struct Pod {
    pub name: String,
    pub dir: PathBuf,
    pub kernel_args: String,
    pub grace_seconds: u64,
    pub disks: Vec<Disk>,
    /// Extra `metadata.annotations` lines (`key: value`).
    pub annotations: Vec<String>,
    /// Start without `--vmi`: the launcher serves its socket and waits for Sync.
    pub wait_for_sync: bool,
    /// Extra launcher arguments.
    pub extra_args: Vec<String>,
    /// Use another pod's PVC directory (two pods mounting one RWX claim).
    pub shared_pvcs: Option<PathBuf>,
    /// Report every claim as ReadWriteMany in the VMI status.
    pub rwx: bool,
    /// A command the launcher runs under (e.g. `unshare --pid --fork` to be PID 1).
    pub wrapper: Vec<String>,
    pub child: Option<Child>,
}

impl Pod {
    /// A pod whose VMI is named `vl-<name>`; its directory is fresh.
    pub fn new(name: &str) -> Pod {
        let name = format!("vl-{name}");
        let dir =
            testkit::fresh_dir(std::env::temp_dir().join(format!("{name}-{}", std::process::id())))
                .unwrap();
        Pod {
            name,
            dir,
            kernel_args: testkit::vmi::KERNEL_ARGS.into(),
            grace_seconds: 30,
            disks: Vec::new(),
            annotations: Vec::new(),
            wait_for_sync: false,
            extra_args: Vec::new(),
            shared_pvcs: None,
            rwx: false,
            wrapper: Vec::new(),
            child: None,
        }
    }

    pub fn with_disk(mut self, name: &str, bus: &'static str, size_mib: u64) -> Pod {
        self.disks.push(Disk::new(name, bus, size_mib));
        self
    }

    pub fn kernel_args(mut self, extra: &str) -> Pod {
        self.kernel_args = format!("{} {extra}", testkit::vmi::KERNEL_ARGS);
        self
    }

    pub fn grace(mut self, seconds: u64) -> Pod {
        self.grace_seconds = seconds;
        self
    }

    pub fn uid(&self) -> String {
        format!("00000000-0000-4000-8000-{:012x}", std::process::id())
    }

    pub fn socket(&self) -> PathBuf {
        launcher::socket(&self.runtime_dir())
    }

    /// A client on the control socket.
    pub async fn client(&self) -> Client {
        launcher::connect(&self.socket())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn hotplug_dir(&self) -> PathBuf {
        self.dir.join("hotplug")
    }

    pub fn pvcs_dir(&self) -> PathBuf {
        self.shared_pvcs
            .clone()
            .unwrap_or_else(|| self.dir.join("pvcs"))
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("runtime")
    }

    pub fn vmi_path(&self) -> PathBuf {
        self.dir.join("vmi.yaml")
    }

    pub fn console_log(&self) -> PathBuf {
        guest::console_log(&self.runtime_dir())
    }

    pub fn launcher_log(&self) -> PathBuf {
        self.dir.join("launcher.log")
    }

    pub fn disk_image(&self, disk: &str) -> PathBuf {
        Disk::new(disk, "virtio", 0).image(&self.pvcs_dir())
    }

    /// The VMI as YAML, as `kubectl get vmi -o yaml` would show the relevant parts.
    pub fn vmi_yaml(&self) -> String {
        testkit::vmi::GuestVmi {
            name: &self.name,
            uid: Some(&self.uid()),
            grace_seconds: self.grace_seconds,
            kernel_args: &self.kernel_args,
            disks: &self.disks,
            annotations: &self.annotations,
            rwx: self.rwx,
        }
        .yaml()
    }

    /// Creates the PVC images (sparse) and the VMI file.
    pub fn prepare(&self) {
        fs::create_dir_all(self.hotplug_dir()).unwrap();
        if self.shared_pvcs.is_none() {
            for d in &self.disks {
                d.create(&self.pvcs_dir()).unwrap();
            }
        }
        fs::write(self.vmi_path(), self.vmi_yaml()).unwrap();
    }

    /// The launcher command line for this pod.
    pub fn command(&self) -> Command {
        let (runtime, pvcs, guest, hotplug) = (
            self.runtime_dir(),
            self.pvcs_dir(),
            guest_dir(),
            self.hotplug_dir(),
        );
        let vmi = self.vmi_path();
        launcher::Run {
            launcher: Path::new(LAUNCHER),
            wrapper: &self.wrapper,
            vmi: (!self.wait_for_sync).then_some(vmi.as_path()),
            runtime_dir: &runtime,
            volumes_dir: &pvcs,
            kernel_boot_dir: &guest,
            hotplug_dir: Some(&hotplug),
            extra_args: &self.extra_args,
        }
        .command()
    }

    /// Prepares and starts the launcher, logging to `launcher.log`.
    pub fn start(&mut self) {
        self.prepare();
        self.spawn();
    }

    /// Starts the launcher on what [`Pod::prepare`] made (a test may change the files in
    /// between), logging to `launcher.log`.
    pub fn spawn(&mut self) {
        let cmd = self.command();
        self.spawn_command(cmd);
    }

    /// Starts `cmd` as this pod's launcher, logging to `launcher.log`.
    pub fn spawn_command(&mut self, mut cmd: Command) {
        let log = fs::File::create(self.launcher_log()).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn virt-launcher");
        self.child = Some(child);
    }

    /// Waits for the control socket to be published (the readiness signal).
    pub fn wait_socket(&mut self, timeout: Duration) {
        let served = wait(timeout, Duration::from_millis(20), || {
            if self.socket().exists() {
                return Some(());
            }
            self.panic_if_exited("before serving");
            None
        });
        assert!(
            served.is_some(),
            "socket not ready within {timeout:?}\n{}",
            self.dump()
        );
    }

    /// Count of `marker` in the console log.
    pub fn console_count(&self, marker: &str) -> usize {
        self.console().matches(marker).count()
    }

    pub fn console(&self) -> String {
        guest::read_console(&self.console_log())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.launcher_log()).unwrap_or_default()
    }

    /// Waits until the guest console shows `marker`; panics with both logs after `timeout`.
    pub fn wait_console(&mut self, marker: &str, timeout: Duration) -> String {
        let shown = wait(timeout, Duration::from_millis(100), || {
            let console = self.console();
            if console.contains(marker) {
                return Some(console);
            }
            self.panic_if_exited(&format!("before the console showed {marker:?}"));
            None
        });
        shown.unwrap_or_else(|| {
            panic!(
                "console did not show {marker:?} within {timeout:?}\n{}",
                self.dump()
            )
        })
    }

    /// Waits until the guest's online CPUs (its latest `LV-CPUS` line) are `want`.
    pub fn wait_online_cpus(&mut self, want: &str) {
        let shown = wait(Duration::from_secs(60), Duration::from_millis(100), || {
            if guest::online_cpus(&self.console()) == Some(want) {
                return Some(());
            }
            self.panic_if_exited(&format!("before the guest's online CPUs were {want}"));
            None
        });
        shown.unwrap_or_else(|| {
            panic!(
                "the guest's online CPUs did not become {want}\n{}",
                self.dump()
            )
        })
    }

    /// Waits until the guest console shows `marker` at least `n` times.
    pub fn wait_console_count(&mut self, marker: &str, n: usize, timeout: Duration) {
        let shown = wait(timeout, Duration::from_millis(100), || {
            if self.console_count(marker) >= n {
                return Some(());
            }
            self.panic_if_exited(&format!("before the console showed {marker:?} {n} times"));
            None
        });
        assert!(
            shown.is_some(),
            "console did not show {marker:?} {n} times within {timeout:?}\n{}",
            self.dump()
        );
    }

    /// Panics with the logs if the launcher has exited.
    fn panic_if_exited(&mut self, when: &str) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("launcher exited ({status}) {when}\n{}", self.dump());
        }
    }

    /// Waits until the launcher's own log contains `text`.
    pub fn wait_log(&mut self, text: &str, timeout: Duration) {
        let shown = wait(timeout, Duration::from_millis(100), || {
            self.log().contains(text).then_some(())
        });
        assert!(
            shown.is_some(),
            "launcher log did not show {text:?} within {timeout:?}\n{}",
            self.dump()
        );
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("started").id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Waits for the launcher to exit; panics after `timeout` (and kills it).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("started");
        if let Some(status) = wait(timeout, Duration::from_millis(50), || {
            child.try_wait().unwrap()
        }) {
            return status;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("launcher did not exit within {timeout:?}\n{}", self.dump())
    }

    pub fn dump(&self) -> String {
        format!(
            "--- launcher log ({}):\n{}\n--- console ({}):\n{}",
            self.launcher_log().display(),
            tail(&self.log(), 60),
            self.console_log().display(),
            tail(&self.console(), 30)
        )
    }

    /// Processes on the machine whose command line mentions this pod (daemons, QEMU), as
    /// `pid: command line`.
    pub fn leftover_processes(&self) -> Vec<String> {
        launcher::leftovers(&self.runtime_dir(), false)
    }
}

impl Drop for Pod {
    /// A test that panics must not leave QEMU or the daemons behind: SIGTERM (the launcher
    /// stops its guest), up to 15 s, then SIGKILL, then any leftover process of this pod.
    fn drop(&mut self) {
        let runtime = self.runtime_dir();
        if let Some(child) = self.child.as_mut() {
            launcher::clean_up(child, &runtime, None, Duration::from_secs(15));
        }
    }
}

impl Pod {
    /// The counter the guest keeps at offset 0 of `disk` (`lv.counter=vda`), 0 if none.
    pub fn disk_counter(&self, disk: &str) -> u64 {
        guest::disk_counter(&self.disk_image(disk))
    }

    /// The highest `LV-COUNT n` the guest printed (n was on disk, fsync'ed, when printed).
    pub fn last_console_count(&self) -> u64 {
        guest::counts(&self.console())
            .into_iter()
            .max()
            .unwrap_or(0)
    }

    /// Waits until the on-disk counter of `disk` passes `above`.
    pub fn wait_counter_above(&self, disk: &str, above: u64, timeout: Duration) -> u64 {
        let mut n = 0;
        let passed = wait(timeout, Duration::from_millis(100), || {
            n = self.disk_counter(disk);
            (n > above).then_some(n)
        });
        passed.unwrap_or_else(|| {
            panic!(
                "guest counter stuck at {n} (wanted > {above})\n{}",
                self.dump()
            )
        })
    }

    /// pid of a daemon the launcher runs (`libvirtd`, `virtlogd`), from its pid file.
    pub fn daemon_pid(&self, daemon: &str) -> Option<i32> {
        launcher::daemon_pid(&self.runtime_dir(), daemon).ok()
    }

    /// Runs `virsh` against the pod's own libvirtd, inside its mount namespace; its output.
    pub fn virsh(&self, args: &[&str]) -> String {
        let pid = self.daemon_pid("libvirtd").expect("libvirtd pid file");
        let uri = format!(
            "qemu+unix:///system?socket={}/sock/libvirt-sock",
            self.runtime_dir().display()
        );
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "virsh", "-c", &uri])
            .args(args)
            .output()
            .expect("run virsh");
        assert!(
            out.status.success(),
            "virsh {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.dump()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SIGKILLs `daemon` and waits until the launcher runs a new one.
    pub fn kill_daemon_and_wait_restart(&self, daemon: &str, timeout: Duration) {
        let old = self.daemon_pid(daemon).expect("daemon pid file");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.wait_daemon_replaced(daemon, old, timeout);
    }

    /// Waits until the launcher runs a new `daemon` in place of pid `old`.
    pub fn wait_daemon_replaced(&self, daemon: &str, old: i32, timeout: Duration) {
        let replaced = wait(timeout, Duration::from_millis(20), || {
            let new = self.daemon_pid(daemon).filter(|p| *p != old)?;
            Path::new(&format!("/proc/{new}")).exists().then_some(())
        });
        assert!(
            replaced.is_some(),
            "{daemon} not restarted within {timeout:?}\n{}",
            self.dump()
        );
    }
}

/// Calls `f` every `every` until it gives a value; `None` once `timeout` has passed.
pub fn wait<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let Ok(found) =
        testkit::poll::<T, std::convert::Infallible>(Instant::now() + timeout, every, || Ok(f()));
    found
}

/// Like [`wait`], every 50 ms, panicking with `what` once `timeout` has passed.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait(timeout, Duration::from_millis(50), f)
        .unwrap_or_else(|| panic!("{what}: not within {timeout:?}"))
}

/// The `virt-launcher-monitor` KubeVirt's pod runs: this build's, or `VL_TEST_MONITOR` (e.g.
/// `target/release/…`, for the release build's figures some tests print; it runs the
/// `virt-launcher` beside it).
pub fn monitor_binary() -> PathBuf {
    std::env::var_os("VL_TEST_MONITOR")
        .map(|p| std::path::absolute(p).unwrap())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_virt-launcher-monitor").into())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Pod {
    /// Starts `virt-launcher` with `args` (its console log removed first).
    pub fn start_launcher(&mut self, args: &[String]) {
        let _ = std::fs::remove_file(self.console_log());
        let mut cmd = Command::new(LAUNCHER);
        cmd.args(args);
        self.spawn_command(cmd);
    }

    /// SIGTERM, a clean exit (within 60 s), and no process of the pod left behind.
    pub fn stop_cleanly(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "launcher exit {status}\n{}", self.dump());
        let left = self.leftover_processes();
        assert!(left.is_empty(), "processes left behind: {left:#?}");
    }

    /// Runs `virt-launcher` with `args` to completion, expecting it to fail before any VM
    /// starts; its one error line.
    pub fn fails_before_any_vm(&self, args: &[String]) -> String {
        let (status, stderr) = run_launcher(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!status.success(), "launcher succeeded:\n{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("virt-launcher: "))
            .collect();
        assert_eq!(errors.len(), 1, "want one error line:\n{stderr}");
        assert!(!self.console_log().exists(), "a VM was started:\n{stderr}");
        errors[0].to_string()
    }
}

impl Pod {
    /// SIGTERM, then: exit 0 within 40 s, the guest stopped by its own ACPI shutdown (reason
    /// Shutdown in the launcher's log), and no process of the pod left behind.
    pub fn sigterm_and_expect_shutdown(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(40));
        assert!(status.success(), "exit {status}\n{}", self.dump());
        assert!(
            self.log().contains("\"reason\":\"Shutdown\""),
            "{}",
            self.dump()
        );
        let left = self.leftover_processes();
        assert!(left.is_empty(), "processes left behind: {left:#?}");
    }
}

/// Sends SIGTERM and waits (off the async runtime) for a clean exit; panics with the logs
/// otherwise. Returns the pod for further checks.
pub async fn stop_cleanly(pod: Pod, timeout: Duration) -> Pod {
    pod.signal(nix::sys::signal::Signal::SIGTERM);
    exit_cleanly(pod, timeout).await
}

/// Waits (off the async runtime) for the launcher to exit 0.
pub async fn exit_cleanly(pod: Pod, timeout: Duration) -> Pod {
    let (status, pod) = exit_status(pod, timeout).await;
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    pod
}

/// Waits (off the async runtime) for the launcher to exit; its status. Panics after `timeout`.
pub async fn exit_status(mut pod: Pod, timeout: Duration) -> (ExitStatus, Pod) {
    tokio::task::spawn_blocking(move || (pod.wait_exit(timeout), pod))
        .await
        .unwrap()
}

/// Runs the launcher to completion with the given arguments; returns (status, stderr).
/// Runs the launcher to its exit. Every caller expects an exit well within two minutes (a
/// refusal, a short run): one that keeps running (a check that let a VM start) is killed and
/// fails the test with what it printed, instead of hanging the suite.
pub fn run_launcher(args: &[&str]) -> (ExitStatus, String) {
    run_launcher_env(args, &[])
}

/// [`run_launcher`] with extra environment variables (e.g. a `PATH` without some program).
pub fn run_launcher_env(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    use std::io::Read;
    let mut child = Command::new(LAUNCHER)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run virt-launcher");
    let mut pipe = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for virt-launcher") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
            let stderr = reader.join().unwrap_or_default();
            panic!("virt-launcher {args:?} still ran after 120 s (SIGTERM sent):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("stderr reader"))
}

/// A VirtualMachine with the test guest (kernelBoot, 128Mi), one virtio disk per entry of
/// `disks` backed by the DataVolume of the same name, and `templates` (YAML list items,
/// indented for `spec.dataVolumeTemplates`).
pub fn guest_vm_yaml(name: &str, kernel_args: &str, templates: &str, disks: &[&str]) -> String {
    let mut devices = String::new();
    let mut volumes = String::new();
    for d in disks {
        devices +=
            &format!("            - name: {d}\n              disk:\n                bus: virtio\n");
        volumes += &format!("        - name: {d}\n          dataVolume:\n            name: {d}\n");
    }
    format!(
        "apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  dataVolumeTemplates:
{templates}  template:
    spec:
      terminationGracePeriodSeconds: 20
      domain:
        resources:
          requests:
            memory: 128Mi
        firmware:
          kernelBoot:
            kernelArgs: \"console=ttyS0 quiet {kernel_args}\"
            container:
              image: test-guest
              kernelPath: /vmlinuz
              initrdPath: /initramfs.gz
        devices:
          disks:
{devices}      volumes:
{volumes}"
    )
}
