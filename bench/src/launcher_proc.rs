//! The launcher as a child process of the benchmark: its log lines as they arrive, with their
//! arrival times.

use crate::*;

pub(crate) struct LauncherProc {
    pub(crate) child: Child,
    pub(crate) runtime: PathBuf,
    pub(crate) t0: Instant,
    /// stderr lines (JSON parsed when possible) with their arrival time.
    pub(crate) lines: Arc<Mutex<Vec<(Instant, Value)>>>,
    /// Its private mount namespace, once known (for clean-up).
    pub(crate) mnt_ns: Option<String>,
}

impl LauncherProc {
    pub(crate) fn spawn(opts: &Options, files: &PodFiles, runtime: &Path) -> Result<LauncherProc> {
        LauncherProc::spawn_with(opts, Some(&files.vmi), &files.pvcs, None, runtime)
    }

    /// `virt-launcher run` with the VMI file (none: it serves its socket and waits for Sync or
    /// PrepareMigrationTarget), the PVC directory, and a hot-plug directory if given.
    pub(crate) fn spawn_with(
        opts: &Options,
        vmi: Option<&Path>,
        pvcs: &Path,
        hotplug: Option<&Path>,
        runtime: &Path,
    ) -> Result<LauncherProc> {
        // The capabilities cache the raw daemons start with too.
        let caps = match CAPABILITIES.get() {
            Some(dir) => vec![
                "--capabilities-cache".to_string(),
                dir.display().to_string(),
            ],
            None => vec!["--no-capabilities-cache".to_string()],
        };
        let mut cmd = testkit::launcher::Run {
            launcher: &opts.launcher,
            wrapper: &[],
            vmi,
            runtime_dir: runtime,
            volumes_dir: pvcs,
            kernel_boot_dir: &opts.guest_dir,
            hotplug_dir: hotplug,
            extra_args: &caps,
        }
        .command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Our own process group: a Ctrl-C on the bench reaches the bench only, which then
            // stops this launcher in order.
            .process_group(0);
        let t0 = Instant::now();
        let mut child =
            spawn_known(&mut cmd).with_context(|| format!("spawn {}", opts.launcher.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let mut kept = None;
        if opts.keep_logs {
            let dir = opts.out_dir.join("logs");
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            // Named after the pod's directory (hl3, ml5, …: unique within a run).
            let pod = runtime
                .parent()
                .and_then(Path::file_name)
                .unwrap_or_default();
            let path = dir.join(format!("{}.log", pod.to_string_lossy()));
            kept = Some(std::io::BufWriter::new(
                fs::File::create(&path).with_context(|| format!("create {}", path.display()))?,
            ));
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Some(f) = kept.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap_or_else(|e| e.into_inner()).push((at, v));
            }
        });
        Ok(LauncherProc {
            child,
            runtime: runtime.to_path_buf(),
            t0,
            lines,
            mnt_ns: None,
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The launcher itself: PID 1 of the PID namespace behind the waiter `pid()` starts.
    pub(crate) fn launcher_pid(&self) -> i32 {
        testkit::procs::launcher_pid(self.pid())
    }

    /// The control socket (published by renaming once the launcher serves).
    pub(crate) fn socket(&self) -> PathBuf {
        testkit::launcher::socket(&self.runtime)
    }

    /// Waits until the control socket is published.
    pub(crate) fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let socket = self.socket();
        poll(Instant::now() + timeout, Duration::from_millis(2), || {
            if socket.exists() {
                return Ok(Some(()));
            }
            self.check_alive().map(|()| None)
        })?
        .ok_or_else(|| {
            anyhow!(
                "the launcher did not publish {} within {timeout:?}\n{}",
                socket.display(),
                self.log_tail()
            )
        })
    }

    pub(crate) fn note_namespace(&mut self) {
        self.mnt_ns = mount_ns(self.launcher_pid()).ok();
    }

    pub(crate) fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), sig).with_context(|| format!("send {sig} to the launcher"))
    }

    /// The first log line matching `pred`, and when it arrived.
    pub(crate) fn wait_line(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<(Instant, Value)> {
        poll(Instant::now() + timeout, Duration::from_millis(2), || {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(_, v)| pred(v))
                .map(|(at, v)| (*at, v.clone()));
            match found {
                Some(line) => Ok(Some(line)),
                None => self.check_alive().map(|()| None),
            }
        })?
        .ok_or_else(|| {
            anyhow!(
                "the launcher did not log the expected line within {timeout:?}\n{}",
                self.log_tail()
            )
        })
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            std::thread::sleep(Duration::from_millis(50)); // let the reader drain stderr
            bail!("the launcher exited early ({status})\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Waits for the launcher to exit successfully; returns when it did.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<Instant> {
        let exited = poll(Instant::now() + timeout, Duration::from_millis(2), || {
            Ok(self
                .child
                .try_wait()?
                .map(|status| (Instant::now(), status)))
        })?;
        match exited {
            Some((at, status)) if status.success() => Ok(at),
            Some((_, status)) => {
                std::thread::sleep(Duration::from_millis(50));
                bail!("the launcher exited with {status}\n{}", self.log_tail())
            }
            None => bail!(
                "the launcher did not exit within {timeout:?}\n{}",
                self.log_tail()
            ),
        }
    }

    pub(crate) fn log_tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(30);
        let mut out = format!("--- launcher log (last {} lines):\n", lines.len() - start);
        for (_, v) in &lines[start..] {
            let _ = writeln!(out, "{v}");
        }
        out
    }
}

impl Drop for LauncherProc {
    /// An aborted run: stop the launcher like kubelet would (SIGTERM, then SIGKILL), then kill
    /// whatever is left in its namespace.
    fn drop(&mut self) {
        testkit::launcher::clean_up(
            &mut self.child,
            &self.runtime,
            self.mnt_ns.as_deref(),
            Duration::from_secs(40),
        );
    }
}
