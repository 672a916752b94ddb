//! KubeVirt's `compute` container around `virt-launcher-monitor`, played on this machine: a
//! mount, UTS and pid namespace of its own (the monitor is its PID 1) with a `/run` of its own,
//! in which temporary directories are bound over KubeVirt's absolute in-pod paths (`/var/run/kubevirt-private`,
//! `/var/run/libvirt`) and over libvirt's state directories (`/var/lib/libvirt`,
//! `/var/log/libvirt`, `/var/cache/libvirt`, `/etc/libvirt`), as the pod's emptyDirs and the
//! image provide them. The share, ephemeral and container-disk directories are given by flag,
//! as virt-controller does. Seen from outside, everything is under [`Compute::top`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// One container's directories and command line.
#[derive(Debug, Clone)]
pub struct Compute {
    /// Where the container's directories live, seen from outside.
    pub top: PathBuf,
    /// `--name` (the VMI's name); `--namespace` is `default`.
    pub name: String,
    /// `--uid` (the VMI's uid).
    pub uid: String,
    /// `--grace-period-seconds`.
    pub grace_seconds: u64,
    /// `--qemu-timeout`, as KubeVirt writes it (`271s`).
    pub qemu_timeout: String,
    /// More arguments after KubeVirt's (e.g. `--domain-type qemu` is always added).
    pub extra_args: Vec<String>,
}

impl Compute {
    /// `--kubevirt-share-dir` (`/var/run/kubevirt` in the pod).
    pub fn share(&self) -> PathBuf {
        self.top.join("share")
    }
    /// `--container-disk-dir`; the kernelBoot container's files are in `kernel-boot/`.
    pub fn container_disks(&self) -> PathBuf {
        self.share().join("container-disks")
    }
    /// `--ephemeral-disk-dir`.
    pub fn ephemeral(&self) -> PathBuf {
        self.top.join("ephemeral")
    }
    /// `/var/run/kubevirt-private` in the container.
    pub fn private(&self) -> PathBuf {
        self.top.join("private")
    }
    /// `/var/run/kubevirt-private/vmi-disks`: Filesystem PVCs, `<volume>/disk.img`.
    pub fn vmi_disks(&self) -> PathBuf {
        self.private().join("vmi-disks")
    }
    /// `/var/run/kubevirt-private/<uid>`: the console socket `virt-serial0` and its log.
    pub fn vm_private(&self) -> PathBuf {
        self.private().join(&self.uid)
    }
    /// `/var/run/libvirt` in the container (`virtqemud-sock`).
    pub fn libvirt_run(&self) -> PathBuf {
        self.top.join("libvirt-run")
    }
    /// The command socket, once served.
    pub fn socket(&self) -> PathBuf {
        self.share().join("sockets/launcher-sock")
    }

    /// Creates the directories and puts the guest's kernel and initramfs (from `guest_dir`)
    /// where KubeVirt mounts the kernelBoot container.
    pub fn prepare(&self, guest_dir: &Path) -> Result<()> {
        for d in [
            self.share().join("sockets"),
            self.container_disks().join("kernel-boot"),
            self.ephemeral(),
            self.private(),
            self.libvirt_run(),
        ] {
            fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
        }
        for f in ["vmlinuz", "initramfs.gz"] {
            let to = self.container_disks().join("kernel-boot").join(f);
            fs::copy(guest_dir.join(f), &to).with_context(|| to.display().to_string())?;
        }
        Ok(())
    }

    /// KubeVirt's arguments for the monitor (virt-controller's `template.go`), then
    /// `--domain-type qemu` (TCG here) and [`Compute::extra_args`].
    pub fn args(&self) -> Vec<String> {
        let path = |p: PathBuf| p.display().to_string();
        let mut args = monitor_args(&MonitorArgs {
            qemu_timeout: &self.qemu_timeout,
            name: &self.name,
            uid: &self.uid,
            share_dir: &path(self.share()),
            ephemeral_dir: &path(self.ephemeral()),
            container_disk_dir: &path(self.container_disks()),
            grace_seconds: self.grace_seconds,
        });
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// `unshare … sh -c <binds> monitor <args>`: the container with `monitor` as its PID 1
    /// (`unshare` waits for it and exits with its status).
    pub fn command(&self, monitor: &Path) -> Result<Command> {
        let mut binds = vec![
            (self.private(), PathBuf::from("/run/kubevirt-private")),
            (self.libvirt_run(), PathBuf::from("/run/libvirt")),
        ];
        for (name, target) in [
            ("lib", "/var/lib/libvirt"),
            ("log", "/var/log/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("etc", "/etc/libvirt"),
        ] {
            let src = self.top.join("state").join(name);
            fs::create_dir_all(&src).with_context(|| src.display().to_string())?;
            binds.push((src, PathBuf::from(target)));
        }
        // The container's own /run (nothing of the host's), in which the binds' mount points
        // are made.
        let mut script = String::from("set -e\nmount -t tmpfs -o mode=0755 tmpfs /run\n");
        for (src, target) in &binds {
            script += &format!(
                "mkdir -p '{t}'\nmount --bind '{s}' '{t}'\n",
                s = src.display(),
                t = target.display()
            );
        }
        script += "exec \"$@\"\n";
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--uts",
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(monitor)
        .args(self.args());
        Ok(cmd)
    }
}

/// The monitor started by [`Compute::command`] (run as pid `unshare`), as this machine's pid
/// namespace numbers it, once it runs.
pub fn monitor_pid(unshare: i32, monitor: &Path, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = crate::procs::pids().into_iter().find(|p| {
            parent(*p) == Some(unshare)
                && fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == monitor)
        });
        if let Some(p) = found {
            return Ok(p);
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "no {} under unshare (pid {unshare}) within {timeout:?}",
                monitor.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The parent of `pid`, from /proc.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid` as its innermost pid namespace numbers it (`NSpid`'s last field).
pub fn pid_in_namespace(pid: i32) -> Option<i32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Kills what is left in a container's mount namespace when a test ends (or panics), while
/// the container's PID 1 (`monitor`) is still in it: a namespace's number is reused once it
/// is gone, and another test's container (or a benchmark's daemon) may have it by then.
pub struct Guard {
    pub monitor: i32,
    pub ns: String,
}

impl Guard {
    /// The guard of the container whose PID 1 is `monitor` (seen from outside).
    pub fn of(monitor: i32) -> Result<Guard> {
        Ok(Guard {
            monitor,
            ns: crate::procs::mount_ns(monitor)?,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if crate::procs::mount_ns(self.monitor).is_ok_and(|ns| ns == self.ns) {
            crate::procs::kill_namespace(&self.ns);
        }
    }
}

/// What virt-controller's compute container command line says of one VMI.
#[derive(Debug, Clone, Copy)]
pub struct MonitorArgs<'a> {
    pub qemu_timeout: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `--kubevirt-share-dir`, `--ephemeral-disk-dir`, `--container-disk-dir`.
    pub share_dir: &'a str,
    pub ephemeral_dir: &'a str,
    pub container_disk_dir: &'a str,
    pub grace_seconds: u64,
}

/// The monitor's arguments as virt-controller renders them (`template.go`, namespace
/// `default`), then `--allow-emulation --domain-type qemu` (TCG on these machines).
pub fn monitor_args(a: &MonitorArgs) -> Vec<String> {
    [
        "--qemu-timeout",
        a.qemu_timeout,
        "--name",
        a.name,
        "--uid",
        a.uid,
        "--namespace",
        "default",
        "--kubevirt-share-dir",
        a.share_dir,
        "--ephemeral-disk-dir",
        a.ephemeral_dir,
        "--container-disk-dir",
        a.container_disk_dir,
        "--grace-period-seconds",
        &a.grace_seconds.to_string(),
        "--hook-sidecars",
        "0",
        "--ovmf-path",
        "/usr/share/OVMF",
        "--disk-memory-limit",
        "2097152000",
        "--hypervisor",
        "kvm",
        "--allow-emulation",
        "--domain-type",
        "qemu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
