//! The pod's private runtime: its directories, its isolation from the host, and the libvirt
//! daemons it owns.
//!
//! Inside a Kubernetes pod the container already is private, and libvirt's standard paths
//! (`/run/libvirt`, `/var/lib/libvirt`, …) belong to this launcher alone. On a plain machine
//! (standalone mode) [`isolate`] gives the launcher the same privacy: a new mount and UTS
//! namespace in which each of libvirt's state directories is a private directory under the
//! runtime root, so several launchers can run side by side and none touches the host's libvirt.

pub mod capcache;
pub mod children;
pub mod cmdline;
pub mod daemons;
pub mod facts;
pub mod image;
pub mod net;
pub mod pidns;
pub mod prepare;
pub mod process;
pub mod tail;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Errors while preparing the pod runtime.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("runtime directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runtime directory {0} is in use by another launcher (lock held)")]
    Busy(PathBuf),
    #[error("VM {vm} already has a launcher (runtime directory {holder}): one launcher per VM on a machine")]
    VmBusy { vm: String, holder: String },
    #[error("cannot isolate the launcher ({step}): {source}; standalone mode needs root (CAP_SYS_ADMIN)")]
    Isolate { step: String, source: nix::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PodError + '_ {
    move |source| PodError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// libvirt's state directories, each replaced by a private one in standalone mode.
/// (`/run/libvirt` is bound first so `/run` below it stays the host's.)
const LIBVIRT_DIRS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("etc", "/etc/libvirt"),
];

/// The on-disk layout of one launcher's runtime root.
#[derive(Debug, Clone)]
pub struct PodLayout {
    root: PathBuf,
    isolated: bool,
    /// KubeVirt's pod ([`PodLayout::kubevirt`]): its directories.
    kubevirt: Option<KubevirtDirs>,
    /// Where QEMU capabilities are kept across launchers ([`capcache`]); isolated layouts only.
    capabilities_seed: Option<PathBuf>,
}

/// The directories of KubeVirt's `compute` container the launcher serves in.
#[derive(Debug, Clone)]
pub struct KubevirtDirs {
    /// `/var/run/libvirt`: libvirtd's sockets, `virtqemud-sock` among them.
    pub libvirt_run_dir: PathBuf,
    /// `--container-disk-dir`: its `*.sock` files are removed when the pod ends.
    pub container_disk_dir: PathBuf,
}

impl PodLayout {
    pub fn new(root: impl Into<PathBuf>, isolated: bool) -> Self {
        PodLayout {
            root: root.into(),
            isolated,
            kubevirt: None,
            capabilities_seed: None,
        }
    }

    /// Seeds the private daemon's QEMU capabilities cache from `dir` and saves what the daemon
    /// probed back there when the launcher ends ([`capcache`]). Only an isolated layout has a
    /// private cache: elsewhere libvirt's own `/var/cache/libvirt` persists by itself.
    pub fn with_capabilities_seed(mut self, dir: Option<PathBuf>) -> Self {
        self.capabilities_seed = dir.filter(|_| self.isolated);
        self
    }

    /// Whether the daemon starts from a capabilities seed ([`capcache`]).
    pub fn has_capabilities_seed(&self) -> bool {
        self.capabilities_seed.is_some()
    }

    /// The private daemon's QEMU capabilities cache (its `/var/cache/libvirt/qemu/capabilities`).
    fn daemon_capabilities_dir(&self) -> PathBuf {
        self.root.join("state/cache/qemu/capabilities")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_isolated(&self) -> bool {
        self.isolated
    }

    /// Where libvirtd's unix sockets live; visible from outside the namespace, so other
    /// processes (a migration source, `virsh` for debugging) can reach this pod's daemon.
    pub fn sock_dir(&self) -> PathBuf {
        match &self.kubevirt {
            Some(k) => k.libvirt_run_dir.clone(),
            None => self.root.join("sock"),
        }
    }

    pub fn libvirt_socket(&self) -> PathBuf {
        self.sock_dir().join("libvirt-sock")
    }

    /// The libvirt URI for this pod's daemon.
    pub fn libvirt_uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.libvirt_socket().display()
        )
    }

    /// Our own configuration files (libvirtd.conf, qemu.conf).
    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("conf")
    }

    /// Pid files of the daemons.
    pub fn pid_dir(&self) -> PathBuf {
        self.root.join("pids")
    }

    /// The VM's private files (console socket and log, generated ISOs) in standalone mode.
    pub fn private_dir(&self) -> PathBuf {
        self.root.join("private")
    }

    /// Where libvirt writes the QEMU log of `domain`, as seen inside the pod.
    pub fn qemu_log(&self, domain: &str) -> PathBuf {
        Path::new("/var/log/libvirt/qemu").join(format!("{domain}.log"))
    }

    /// Creates the directories, mode 0700 (the root holds the VM's console and sockets).
    pub fn create(&self) -> Result<(), PodError> {
        let mut dirs = vec![
            self.root.clone(),
            self.sock_dir(),
            self.conf_dir(),
            self.pid_dir(),
            self.private_dir(),
        ];
        if self.isolated {
            dirs.extend(
                LIBVIRT_DIRS
                    .iter()
                    .map(|(name, _)| self.root.join("state").join(name)),
            );
        }
        for d in &dirs {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))?;
        Ok(())
    }

    /// Fills the private daemon's capabilities cache from the seed, if there is one (once,
    /// before the daemon starts).
    pub fn seed_capabilities(&self) {
        if let Some(seed) = &self.capabilities_seed {
            let n = capcache::seed(seed, &self.daemon_capabilities_dir());
            tracing::debug!(files = n, seed = %seed.display(), "QEMU capabilities cache seeded");
        }
    }

    /// Takes the runtime root's lock for the life of the process: a second launcher on the same
    /// root fails fast instead of fighting over the daemons.
    pub fn lock(&self) -> Result<Flock<File>, PodError> {
        let path = self.root.join("launcher.lock");
        let file = File::create(&path).map_err(io_err(&path))?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| PodError::Busy(self.root.clone()))
    }

    /// Removes what a launcher that died without cleaning up left in this runtime root: the
    /// daemons' pid files, sockets and configuration, libvirt's runtime state (its record of
    /// running domains, in `/run/libvirt`) and its domain definitions (`/etc/libvirt`). Kept:
    /// `/var/lib/libvirt` (the VM's NVRAM, changed-block-tracking overlays) and the
    /// capabilities cache. Only under the root's lock.
    pub fn clear_stale(&self, _lock: &Flock<File>) {
        let stale: Vec<PathBuf> = [
            self.sock_dir(),
            self.conf_dir(),
            self.pid_dir(),
            self.root.join("state/run"),
            self.root.join("state/etc"),
            self.root.join("bin"),
        ]
        .into_iter()
        .filter(|d| self.kubevirt.is_none() || *d != self.sock_dir())
        .filter(|d| holds_files(d))
        .collect();
        if stale.is_empty() {
            return;
        }
        tracing::info!(runtime_dir = %self.root.display(), "removing what a previous launcher left here");
        for d in stale {
            if let Err(e) = fs::remove_dir_all(&d) {
                tracing::warn!(path = %d.display(), error = %e, "could not remove a stale runtime directory");
            }
        }
    }

    /// Writes libvirtd.conf and qemu.conf, and installs qemu.conf where
    /// libvirtd reads it (`/etc/libvirt`, private to this pod). `may_receive_migration`: this
    /// launcher can become a migration target (it starts without a VM, or as a target), so an
    /// isolated pod gets the migration hook.
    pub fn write_configs(
        &self,
        host_uuid: &str,
        may_receive_migration: bool,
    ) -> Result<(), PodError> {
        let sock_dir = self.sock_dir();
        let libvirtd = libvirtd_conf(&sock_dir, host_uuid);
        let conf = self.conf_dir();
        write_file(&conf.join("libvirtd.conf"), &libvirtd)?;
        write_file(&conf.join("qemu.conf"), QEMU_CONF)?;
        let etc = Path::new("/etc/libvirt");
        fs::create_dir_all(etc).map_err(io_err(etc))?;
        write_file(&etc.join("qemu.conf"), QEMU_CONF)?;
        let _ = fs::remove_file(incoming_migration_file(&self.root));
        if self.isolated && may_receive_migration {
            // Standalone: `/etc/libvirt` is our private one. libvirtd looks for its hooks when
            // it starts, so the hook is in place before the daemon; it acts only on `migrate`.
            // Only a launcher that may await a migration has one: libvirtd runs the hook (a
            // fork of the daemon, a shell) for every operation, three times on a domain's
            // start and twice on its stop, and a launcher started with its VM never becomes a
            // target (`prepare_migration_target` refuses once a VM has started).
            let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
            let hooks = etc.join("hooks");
            fs::create_dir_all(&hooks).map_err(io_err(&hooks))?;
            let hook = hooks.join("qemu");
            write_file(
                &hook,
                &migration_hook_script(&exe, &incoming_migration_file(&self.root)),
            )?;
            fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).map_err(io_err(&hook))?;
        }
        Ok(())
    }

    /// Removes the daemons' state, sockets and configuration once they and QEMU are gone. The
    /// VM's private directory (its console log) stays for whoever wants to read what happened.
    pub fn remove_daemon_state(&self) {
        if let Some(seed) = &self.capabilities_seed {
            let n = capcache::save(&self.daemon_capabilities_dir(), seed);
            if n > 0 {
                tracing::info!(files = n, seed = %seed.display(), "QEMU capabilities saved for the next start");
            }
        }
        let mut dirs = vec![
            self.sock_dir(),
            self.conf_dir(),
            self.pid_dir(),
            self.root.join("state"),
            self.root.join("bin"),
        ];
        // KubeVirt's /var/run/libvirt is the pod's (an emptyDir), not ours to remove.
        dirs.retain(|d| d.exists() && (self.kubevirt.is_none() || *d != self.sock_dir()));
        for d in dirs {
            if let Err(e) = fs::remove_dir_all(&d) {
                tracing::warn!(path = %d.display(), error = %e, "could not remove runtime directory");
            }
        }
        let _ = fs::remove_file(self.root.join("launcher.lock"));
    }
}

/// Whether there is anything but directories under `dir`.
fn holds_files(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| match e.file_type() {
            Ok(t) if t.is_dir() => holds_files(&e.path()),
            _ => true,
        })
    })
}

/// Where standalone launchers lock the VM they run, machine-wide.
pub const VM_LOCK_DIR: &str = "/run/virt-launcher/locks";

/// Takes the machine-wide lock of the VM `domain` (`<namespace>_<name>`) for the life of the
/// process, wherever its runtime root is: a second launcher for the same VM is refused before it
/// imports or starts anything (two would run one VM twice, or fight over its disks). The lock
/// file names the runtime root of the launcher holding it.
pub fn lock_vm(
    lock_dir: &Path,
    domain: &str,
    runtime_root: &Path,
) -> Result<Flock<File>, PodError> {
    take_vm_lock(lock_dir, domain, runtime_root, false)
}

/// [`lock_vm`], waiting for the holder to let go: a migration target whose VM has arrived
/// takes the VM's lock over from the source launcher as that one exits.
pub fn lock_vm_when_free(
    lock_dir: &Path,
    domain: &str,
    runtime_root: &Path,
) -> Result<Flock<File>, PodError> {
    take_vm_lock(lock_dir, domain, runtime_root, true)
}

fn take_vm_lock(
    lock_dir: &Path,
    domain: &str,
    runtime_root: &Path,
    wait: bool,
) -> Result<Flock<File>, PodError> {
    fs::create_dir_all(lock_dir).map_err(io_err(lock_dir))?;
    let path = vm_lock_file(lock_dir, domain);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let how = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, how) {
        Ok(mut lock) => {
            lock.set_len(0).map_err(io_err(&path))?;
            lock.write_all(runtime_root.display().to_string().as_bytes())
                .map_err(io_err(&path))?;
            Ok(lock)
        }
        Err(_) => Err(PodError::VmBusy {
            vm: domain.replacen('_', "/", 1),
            holder: fs::read_to_string(&path).unwrap_or_else(|_| "unknown".into()),
        }),
    }
}

/// The lock file of VM `domain` (`<namespace>_<name>`) in `lock_dir`.
fn vm_lock_file(lock_dir: &Path, domain: &str) -> PathBuf {
    // The name was validated as a Kubernetes name; still, never a path.
    let file_name = domain.replace(['/', '\0'], "_");
    lock_dir.join(format!("{file_name}.lock"))
}

/// The runtime root that the launcher which last locked VM `domain` wrote into its lock file
/// ([`lock_vm`]), if one ever did.
pub fn vm_lock_holder(lock_dir: &Path, domain: &str) -> Option<PathBuf> {
    let text = fs::read_to_string(vm_lock_file(lock_dir, domain)).ok()?;
    Some(PathBuf::from(text.trim()))
}

/// Where a prepared migration target keeps the identity of the VM it awaits, for the migration
/// hook (`vm::migration::target::VmIdentity`).
pub fn incoming_migration_file(root: &Path) -> PathBuf {
    root.join("conf").join("incoming-migration")
}

/// libvirt's QEMU hook (`/etc/libvirt/hooks/qemu <domain> <op> <sub-op> -`, the domain XML on
/// stdin). libvirtd runs it for every operation; all but an incoming migration's `migrate`
/// pass at once (a shell's start-up), that one asks `virt-launcher migration-hook`, whose
/// refusal (exit 1, its stderr) libvirt returns to the source before QEMU starts here.
fn migration_hook_script(exe: &Path, awaited: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         # written by virt-launcher: an incoming migration must be the VM this launcher awaits\n\
         [ \"$2\" = migrate ] || exit 0\n\
         exec {} migration-hook {}\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&awaited.display().to_string())
    )
}

/// `s` in single quotes, for a shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// libvirtd's configuration for a pod: sockets in `sock_dir` (reachable from outside the
/// namespace), no authentication beyond the socket's mode, a distinct `host_uuid` (libvirt
/// refuses to migrate between two daemons that share one), logs on stderr for our relay.
pub fn libvirtd_conf(sock_dir: &Path, host_uuid: &str) -> String {
    format!(
        "# written by virt-launcher\n\
         unix_sock_dir = \"{}\"\n\
         unix_sock_rw_perms = \"0700\"\n\
         unix_sock_ro_perms = \"0700\"\n\
         unix_sock_admin_perms = \"0700\"\n\
         auth_unix_rw = \"none\"\n\
         auth_unix_ro = \"none\"\n\
         host_uuid = \"{host_uuid}\"\n\
         log_outputs = \"3:stderr\"\n\
         keepalive_interval = 5\n\
         keepalive_count = 5\n",
        sock_dir.display()
    )
}

/// qemu.conf. namespaces/cgroups: the pod is the sandbox; libvirt's own would need privileges a
/// pod (and this machine) does not grant. Ownership is left alone: disks belong to the pod.
///
/// `stdio_handler = "file"`: QEMU writes the serial console log and its own stderr log to files
/// libvirt opens for it (`O_APPEND`), not through pipes to virtlogd. With virtlogd, one failed
/// write (a full runtime filesystem) made virtlogd drop the file and close the pipe for the rest
/// of the VM's life, and a virtlogd restart cut both pipes the same way: the console log stopped
/// for good. QEMU skips a console log write that fails and tries the next, so the log resumes
/// once there is space, and virtlogd's fate no longer matters to it. Nothing caps the files
/// now: the launcher rotates them ([`daemons::follow_file`]). With QEMU writing its own logs
/// nothing in libvirt asks for virtlogd (checked on libvirt 11.3: starts, consoles, hot-plug,
/// migrations and daemon restarts without it), so the pod does not run one.
pub const QEMU_CONF: &str = "# written by virt-launcher\n\
                             user = \"root\"\n\
                             group = \"root\"\n\
                             dynamic_ownership = 0\n\
                             remember_owner = 0\n\
                             namespaces = []\n\
                             cgroup_controllers = []\n\
                             stdio_handler = \"file\"\n\
                             log_timestamp = 1\n";

fn write_file(path: &Path, content: &str) -> Result<(), PodError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(content.as_bytes()).map_err(io_err(path))
}

/// Puts the calling process into a new mount and UTS namespace with private libvirt state
/// directories and its own hostname. Must run before any thread is started.
pub fn isolate(layout: &PodLayout, hostname: &str) -> Result<(), PodError> {
    let step = |step: &str| {
        let step = step.to_string();
        move |source| PodError::Isolate { step, source }
    };
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS).map_err(step("unshare"))?;
    // Nothing we mount may leak back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make / private"))?;
    if std::process::id() == 1 {
        // PID 1 of our own PID namespace ([`pidns`]): a /proc that shows its pids, for libvirt
        // (which reads /proc/<pid> of the QEMU it starts) and for us.
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(step("mount /proc"))?;
    }
    for (name, target) in LIBVIRT_DIRS {
        let src = layout.root.join("state").join(name);
        fs::create_dir_all(target).map_err(io_err(Path::new(target)))?;
        bind(&src, Path::new(target))?;
    }
    nix::unistd::sethostname(hostname).map_err(step("sethostname"))?;
    resolvable_hostname(layout, hostname, Path::new(HOSTS))
}

/// The machine's hosts file.
const HOSTS: &str = "/etc/hosts";

/// Makes the pod's hostname resolve, as the kubelet does in a Kubernetes pod (it writes the
/// pod's name into the pod's own /etc/hosts): the machine's hosts file plus a line for
/// `hostname`, bound over `hosts` in the pod's mount namespace. libvirtd canonicalises its
/// hostname (`getaddrinfo`) when it starts and at every domain start, and a name that no
/// hosts file knows goes to DNS: a query per start (7 ms here for the first), and on a
/// machine whose resolver does not answer, seconds of timeouts before every VM start. Nothing
/// is done when the machine has no hosts file (there is nothing to bind over).
fn resolvable_hostname(layout: &PodLayout, hostname: &str, hosts: &Path) -> Result<(), PodError> {
    let machine = match fs::read_to_string(hosts) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(hosts)(e)),
    };
    let ours = layout.conf_dir().join("hosts");
    write_file(&ours, &pod_hosts(&machine, hostname))?;
    bind(&ours, hosts)
}

/// Binds `src` over `target` (in the pod's mount namespace, see [`isolate`]).
fn bind(src: &Path, target: &Path) -> Result<(), PodError> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| PodError::Isolate {
        step: format!("bind {} over {}", src.display(), target.display()),
        source,
    })
}

/// `machine` (a hosts file) with a line that names `hostname` (Debian's address for the
/// machine's own name, 127.0.1.1).
fn pod_hosts(machine: &str, hostname: &str) -> String {
    let mut out = machine.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "# the pod's hostname (virt-launcher)\n127.0.1.1\t{hostname}\n"
    ));
    out
}

/// A fresh random UUID (v4, from the OS's random source) for libvirtd's `host_uuid`: two pods
/// on one machine must differ or libvirt refuses to migrate between them.
pub fn random_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ------------------------------------------------------------------------- KubeVirt's pod

/// The name virt-handler reaches the pod's libvirt daemon by (`/var/run/libvirt/virtqemud-sock`,
/// its migration-target proxy). Our daemon is libvirtd with only the QEMU driver, which is what
/// virtqemud is; its socket is `libvirt-sock`, and this name is a relative symlink to it (it
/// resolves inside `/proc/<pid>/root` too, and survives a libvirtd restart).
pub const VIRTQEMUD_SOCK: &str = "virtqemud-sock";

impl PodLayout {
    /// The layout in KubeVirt's `compute` container: no private namespace (the container is
    /// one, and hot-plug and containerDisk mounts arrive by propagation), the runtime root
    /// (configuration, pid files, lock) at `<private_root>/launcher`, libvirtd's sockets in
    /// `libvirt_run_dir` (`/var/run/libvirt`). `private_root` is `/var/run/kubevirt-private`,
    /// where the VM's own directory `<uid>` (console socket `virt-serial0`) also lives.
    pub fn kubevirt(
        private_root: &Path,
        libvirt_run_dir: impl Into<PathBuf>,
        container_disk_dir: impl Into<PathBuf>,
    ) -> Self {
        PodLayout {
            root: private_root.join("launcher"),
            isolated: false,
            kubevirt: Some(KubevirtDirs {
                libvirt_run_dir: libvirt_run_dir.into(),
                container_disk_dir: container_disk_dir.into(),
            }),
            capabilities_seed: None,
        }
    }

    /// KubeVirt's directories, in KubeVirt mode.
    pub fn kubevirt_dirs(&self) -> Option<&KubevirtDirs> {
        self.kubevirt.as_ref()
    }

    /// In KubeVirt mode: links `virtqemud-sock` to libvirtd's socket (see [`VIRTQEMUD_SOCK`]).
    pub fn link_virtqemud_sock(&self) -> Result<(), PodError> {
        if self.kubevirt.is_none() {
            return Ok(());
        }
        let link = self.sock_dir().join(VIRTQEMUD_SOCK);
        let _ = fs::remove_file(&link);
        let target = self
            .libvirt_socket()
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        std::os::unix::fs::symlink(&target, &link).map_err(io_err(&link))
    }
}

impl PodLayout {
    /// The program to start for daemon `name`: `name` (from PATH), except libvirtd in
    /// KubeVirt's pod once [`PodLayout::link_virtqemud_program`] ran: it then runs through a
    /// link named `virtqemud`, so that its process is called that (`/proc/<pid>/stat`), as
    /// virt-handler expects of the launcher's child that starts QEMU: it raises that process's
    /// memlock limit before a VFIO/SEV/realtime VM starts
    /// (`pkg/hypervisor/common/qemu.go` FindVirtqemudProcess, `pkg/hypervisor/kvm/runtime.go`).
    pub fn daemon_program(&self, name: &str) -> PathBuf {
        let link = self.virtqemud_program();
        if self.kubevirt.is_some() && name == "libvirtd" && link.exists() {
            return link;
        }
        PathBuf::from(name)
    }

    fn virtqemud_program(&self) -> PathBuf {
        self.root.join("bin").join("virtqemud")
    }

    /// In KubeVirt mode: links `<root>/bin/virtqemud` to libvirtd found in `PATH` (see
    /// [`PodLayout::daemon_program`]). Nothing when libvirtd is not found: starting it fails
    /// then, with the usual error.
    pub fn link_virtqemud_program(&self) -> Result<(), PodError> {
        if self.kubevirt.is_none() {
            return Ok(());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let Some(libvirtd) = std::env::split_paths(&path)
            .map(|d| d.join("libvirtd"))
            .find(|p| p.is_file())
        else {
            return Ok(());
        };
        let link = self.virtqemud_program();
        let dir = self.root.join("bin");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libvirtd, &link).map_err(io_err(&link))
    }
}

/// Removes the `*.sock` files in KubeVirt's container-disk directory: each containerDisk
/// container waits on its socket there and stops once it is gone (KubeVirt's monitor does this
/// when the launcher ends). Returns what was removed.
pub fn remove_container_disk_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "sock") {
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            if gone.is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// KubeVirt's migration socket directory, `<share dir>/migrationproxy`: on a source the
/// handler puts its relays there (`<uid>-source.sock`, `<uid>-49152-source.sock`, …), on a
/// target the incoming QEMU listens there on the same names
/// (`pkg/virt-launcher/virtwrap/live-migration-target.go:237-240`).
pub fn migration_proxy_dir(share_dir: &Path) -> PathBuf {
    share_dir.join("migrationproxy")
}

/// Creates the migration socket directory (a target's QEMU creates its listening sockets in
/// it).
pub fn create_migration_proxy_dir(dir: &Path) -> Result<(), PodError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod kubevirt_tests {
    use super::*;

    #[test]
    fn kubevirt_layout_and_virtqemud_link() {
        let tmp = std::env::temp_dir().join(format!("vl-kv-layout-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let run = tmp.join("run-libvirt");
        fs::create_dir_all(&run).unwrap();
        let l = PodLayout::kubevirt(&tmp.join("private"), &run, tmp.join("cd"));
        assert!(!l.is_isolated());
        assert_eq!(l.root(), tmp.join("private/launcher"));
        assert_eq!(l.libvirt_socket(), run.join("libvirt-sock"));
        l.link_virtqemud_sock().unwrap();
        l.link_virtqemud_sock().unwrap();
        assert_eq!(
            fs::read_link(run.join(VIRTQEMUD_SOCK)).unwrap(),
            PathBuf::from("libvirt-sock")
        );

        let cd = tmp.join("cd");
        fs::create_dir_all(cd.join("dir.sock")).unwrap();
        fs::write(cd.join("disk_0.sock"), "").unwrap();
        fs::write(cd.join("disk_0.img"), "").unwrap();
        let mut removed = remove_container_disk_sockets(&cd);
        removed.sort();
        assert_eq!(removed, [cd.join("dir.sock"), cd.join("disk_0.sock")]);
        assert!(cd.join("disk_0.img").exists());
        fs::remove_dir_all(&tmp).unwrap();
    }
}

#[cfg(test)]
mod hosts_tests {
    use super::*;

    #[test]
    fn the_pod_hosts_file_keeps_the_machines_lines_and_names_the_pod() {
        let machine = "127.0.0.1 localhost\n::1 localhost ip6-localhost";
        let pod = pod_hosts(machine, "virt-launcher-vm1-42");
        assert!(pod.starts_with("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"));
        assert!(pod.ends_with("127.0.1.1\tvirt-launcher-vm1-42\n"), "{pod}");
        assert_eq!(
            pod_hosts("", "h").lines().last(),
            Some("127.0.1.1\th"),
            "an empty hosts file gets the one line"
        );
    }

    #[test]
    fn a_machine_without_a_hosts_file_is_left_alone() {
        let tmp = std::env::temp_dir().join(format!("vl-hosts-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let layout = PodLayout::new(&tmp, true);
        fs::create_dir_all(layout.conf_dir()).unwrap();
        resolvable_hostname(&layout, "h", &tmp.join("no-hosts")).unwrap();
        assert!(!layout.conf_dir().join("hosts").exists());
        fs::remove_dir_all(&tmp).unwrap();
    }
}
