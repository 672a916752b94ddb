//! A launcher pod from the outside: the `virt-launcher run` command line, its files, the
//! control API client, and the clean-up after it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};
use virt_launcher::api::{client, pb};

/// A client of the launcher's control API (launcher.v1).
pub type Client = pb::launcher_client::LauncherClient<tonic::transport::Channel>;

/// What one `virt-launcher run` is given.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The launcher binary.
    pub launcher: &'a Path,
    /// Wrapped in this command (e.g. `unshare --pid --fork` to be PID 1), if not empty.
    pub wrapper: &'a [String],
    /// The VMI file; without one the launcher serves its socket and waits for Sync or
    /// PrepareMigrationTarget.
    pub vmi: Option<&'a Path>,
    pub runtime_dir: &'a Path,
    /// The PVC directory (`--volumes-dir`).
    pub volumes_dir: &'a Path,
    /// Where the guest's kernel and initramfs are (`--kernel-boot-dir`).
    pub kernel_boot_dir: &'a Path,
    pub hotplug_dir: Option<&'a Path>,
    /// More launcher arguments.
    pub extra_args: &'a [String],
}

impl Run<'_> {
    /// The command line: a TCG guest (`--domain-type qemu`), JSON logs on stderr.
    pub fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(self.launcher);
                c
            }
            None => Command::new(self.launcher),
        };
        cmd.arg("run");
        if let Some(vmi) = self.vmi {
            cmd.arg("--vmi").arg(vmi);
        }
        cmd.args(["--domain-type", "qemu", "--json-logs", "--runtime-dir"])
            .arg(self.runtime_dir)
            .arg("--volumes-dir")
            .arg(self.volumes_dir)
            .arg("--kernel-boot-dir")
            .arg(self.kernel_boot_dir);
        if let Some(dir) = self.hotplug_dir {
            cmd.arg("--hotplug-dir").arg(dir);
        }
        cmd.args(self.extra_args);
        cmd
    }
}

/// The control socket in a runtime directory (published by a rename once the launcher serves).
pub fn socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("launcher-sock")
}

/// The pid file of a daemon the launcher runs (`libvirtd`, `virtlogd`).
pub fn daemon_pid_file(runtime_dir: &Path, daemon: &str) -> PathBuf {
    runtime_dir.join("pids").join(format!("{daemon}.pid"))
}

/// The machine's pid of a daemon the launcher runs (its pid file has the pid in the launcher's
/// PID namespace).
pub fn daemon_pid(runtime_dir: &Path, daemon: &str) -> Result<i32> {
    let pid = crate::procs::read_pid(&daemon_pid_file(runtime_dir, daemon))?;
    crate::procs::host_pid(pid, &runtime_dir.display().to_string())
}

/// A client on the launcher's control socket.
pub async fn connect(socket: &Path) -> Result<Client> {
    client::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))
}

/// After a launcher, as a pod's end would: a launcher still running gets SIGTERM and `grace`
/// to stop its guest, then SIGKILL; then whatever is left of the pod is killed: every process
/// in its mount namespace `mnt_ns` (if known), and every process whose command line names its
/// runtime directory (the daemons' config files, QEMU's console and VNC sockets do; another pod
/// sharing its claims or running its VM does not). Returns those leftovers.
pub fn clean_up(
    child: &mut Child,
    runtime_dir: &Path,
    mnt_ns: Option<&str>,
    grace: Duration,
) -> Vec<String> {
    crate::procs::terminate(child, grace);
    if let Some(ns) = mnt_ns {
        crate::procs::kill_namespace(ns);
    }
    leftovers(runtime_dir, true)
}

/// The processes of the pod with this runtime directory (see [`clean_up`]), as
/// `pid: command line`; SIGKILLed if `kill`.
pub fn leftovers(runtime_dir: &Path, kill: bool) -> Vec<String> {
    let needles = [runtime_dir.display().to_string()];
    if kill {
        crate::procs::kill_matching(&needles)
    } else {
        crate::procs::mentioning(&needles)
            .into_iter()
            .map(|(p, c)| format!("{p}: {c}"))
            .collect()
    }
}
