//! Raw libvirt: a private libvirtd, as the launcher runs it (no virtlogd: QEMU writes its own
//! logs with the launcher's qemu.conf, so neither side runs one).

use crate::*;

#[derive(Clone, Copy)]
pub(crate) enum RawDaemon {
    Libvirtd,
}

pub struct RawLibvirt {
    pub(crate) root: PathBuf,
    pub(crate) libvirtd: Option<Child>,
    pub(crate) conn: Option<Connect>,
    pub(crate) mnt_ns: String,
}

/// Binds private state directories over libvirt's (as the launcher's `pod::isolate` does),
/// installs qemu.conf, sets the hostname and becomes libvirtd. `$1` root, `$2` hostname.
pub(crate) const NAMESPACE_SCRIPT: &str = r#"set -e
R=$1
for pair in run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt etc:/etc/libvirt; do
    mkdir -p "${pair#*:}"
    mount --bind "$R/state/${pair%%:*}" "${pair#*:}"
done
cp "$R/conf/qemu.conf" /etc/libvirt/qemu.conf
hostname "$2"
exec libvirtd -f "$R/conf/libvirtd.conf" -p "$R/pids/libvirtd.pid"
"#;

/// The private daemon's QEMU capabilities cache, under its root.
pub(crate) const CAPABILITIES_DIR: &str = "state/cache/qemu/capabilities";

impl RawLibvirt {
    /// Writes the configuration (the launcher's, from `src/pod/mod.rs`), starts libvirtd in a
    /// new mount + UTS namespace; returns once its socket accepts, with the time that took.
    pub fn start(root: &Path, hostname: &str) -> Result<(RawLibvirt, Duration)> {
        let t0 = Instant::now();
        for d in [
            "sock",
            "conf",
            "pids",
            "state/run",
            "state/lib",
            "state/log",
            "state/cache",
            "state/etc",
        ] {
            let d = root.join(d);
            fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        // The capabilities the launcher's daemon starts with too (its `--capabilities-cache`).
        if let Some(seed) = CAPABILITIES.get() {
            virt_launcher::pod::capcache::seed(seed, &root.join(CAPABILITIES_DIR));
        }
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")?;
        let sock_dir = root.join("sock");
        // The launcher's own configuration, byte for byte.
        write(
            &root.join("conf/libvirtd.conf"),
            &virt_launcher::pod::libvirtd_conf(&sock_dir, uuid.trim()),
        )?;
        write(&root.join("conf/qemu.conf"), virt_launcher::pod::QEMU_CONF)?;

        let log = |name: &str| -> Result<fs::File> {
            let p = root.join(format!("{name}.log"));
            fs::File::create(&p).with_context(|| format!("create {}", p.display()))
        };
        // Pinned to the first allowed CPU, as the launcher pins its daemon: libvirt compares the
        // CPUID of the CPU it starts on (its x2APIC id included) with the one the cached
        // capabilities recorded, and re-probes QEMU (~1 s) on a mismatch. Unpinned, the raw
        // daemons missed the cache on about half their starts and looked slower than they are.
        // QEMU is not pinned by it (libvirt gives QEMU every online CPU).
        let libvirtd = spawn_known(
            Command::new("taskset")
                .args(["-c", &first_cpu()?.to_string(), "unshare"])
                .args([
                    "--mount",
                    "--uts",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                ])
                .arg(NAMESPACE_SCRIPT)
                .arg("sh")
                .arg(root)
                .arg(hostname)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log("libvirtd")?)
                .process_group(0),
        )
        .context("spawn unshare … libvirtd")?;
        let mut raw = RawLibvirt {
            root: root.to_path_buf(),
            libvirtd: Some(libvirtd),
            conn: None,
            mnt_ns: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        raw.wait_socket(&sock_dir.join("libvirt-sock"), deadline)?;
        raw.mnt_ns = mount_ns(raw.pid(RawDaemon::Libvirtd)?)?;
        if raw.mnt_ns == mount_ns(std::process::id() as i32)? {
            bail!("libvirtd is not in a private mount namespace");
        }
        Ok((raw, t0.elapsed()))
    }

    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.root.join("sock/libvirt-sock").display()
        )
    }

    pub(crate) fn connect(&mut self) -> Result<()> {
        let conn = Connect::open(Some(&self.uri()))
            .with_context(|| format!("connect to {}", self.uri()))?;
        self.conn = Some(conn);
        Ok(())
    }

    /// createXML; returns the running domain and how long the call took.
    pub(crate) fn create(&self, xml: &str) -> Result<(Domain, Duration)> {
        let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
        let t = Instant::now();
        let dom = conn
            .create_domain_xml(xml, 0)
            .map_err(|e| anyhow!("createXML: {e}\n{}", self.log_tail()))?;
        Ok((dom, t.elapsed()))
    }

    /// defineXML + create (a persistent domain, as the launcher's): hot-plug with
    /// AFFECT_CONFIG and completed-job statistics after a migration need one.
    pub(crate) fn define_start(&self, xml: &str) -> Result<Domain> {
        let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
        let dom = conn
            .define_domain_xml(xml)
            .map_err(|e| anyhow!("defineXML: {e}\n{}", self.log_tail()))?;
        dom.create()
            .map_err(|e| anyhow!("create: {e}\n{}", self.log_tail()))?;
        Ok(dom)
    }

    pub(crate) fn pid(&self, which: RawDaemon) -> Result<i32> {
        let child = match which {
            RawDaemon::Libvirtd => &self.libvirtd,
        };
        child
            .as_ref()
            .map(|c| c.id() as i32)
            .ok_or_else(|| anyhow!("daemon not running"))
    }

    pub(crate) fn wait_socket(&mut self, socket: &Path, deadline: Instant) -> Result<()> {
        poll(deadline, Duration::from_millis(2), || {
            if UnixStream::connect(socket).is_ok() {
                return Ok(Some(()));
            }
            self.check_alive().map(|()| None)
        })?
        .ok_or_else(|| anyhow!("{} did not appear\n{}", socket.display(), self.log_tail()))
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        let mut died = None;
        for (name, child) in [("libvirtd", &mut self.libvirtd)] {
            if let Some(status) = child.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
                *child = None;
                died = Some((name, status));
            }
        }
        match died {
            Some((name, status)) => bail!("raw {name} exited ({status})\n{}", self.log_tail()),
            None => Ok(()),
        }
    }

    pub(crate) fn log_tail(&self) -> String {
        let mut out = String::new();
        for name in ["libvirtd"] {
            let text =
                fs::read_to_string(self.root.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- raw {name} log:");
            for l in &lines[lines.len().saturating_sub(15)..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    /// Destroys any domain still running, stops libvirtd (SIGTERM, SIGKILL after
    /// 10 s), and kills anything left in the namespace. Returns how long it took.
    pub fn stop(&mut self) -> Result<Duration> {
        let t = Instant::now();
        if let Some(conn) = self.conn.take() {
            if let Ok(doms) = conn.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE) {
                for d in doms {
                    let _ = d.destroy();
                }
            }
            drop(conn);
        }
        let mut result = Ok(());
        if let Some(child) = self.libvirtd.take() {
            let (mut child, grace) = (child, Duration::from_secs(10));
            if !testkit::procs::terminate(&mut child, grace) {
                result = Err(anyhow!(
                    "pid {} ignored SIGTERM for {grace:?}; killed",
                    child.id()
                ));
            }
        }
        if !self.mnt_ns.is_empty() {
            kill_namespace(&self.mnt_ns);
        }
        result.map(|()| t.elapsed())
    }
}

impl Drop for RawLibvirt {
    fn drop(&mut self) {
        let _ = self.stop();
        // With the separator: `…/mr4/` must not match another pair's `…/mr41/`.
        kill_matching(&[format!("{}/", self.root.display())]);
    }
}

/// The first CPU this process may run on (the launcher pins its daemon to the first of its own).
fn first_cpu() -> Result<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let all = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    (0..CpuSet::count())
        .find(|&c| all.is_set(c).unwrap_or(false))
        .ok_or_else(|| anyhow!("no CPU allowed"))
}
