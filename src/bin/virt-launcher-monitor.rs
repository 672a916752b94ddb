//! `virt-launcher-monitor`: PID 1 of KubeVirt's `compute` container (virt-controller's pod
//! runs `/usr/bin/virt-launcher-monitor` with the launcher's flags).
//!
//! It starts `virt-launcher` (the binary beside it) with the same arguments minus
//! `--keep-after-failure`, and then only: reaps every orphan (the QEMU libvirtd daemonizes is
//! re-parented here, where virt-handler looks for it: among the children of the socket owner's
//! parent), forwards SIGTERM/SIGINT/SIGQUIT/SIGHUP to the launcher as SIGTERM, and when the
//! launcher has exited: gives a QEMU that survived it SIGTERM and 10 s (then SIGKILL), removes
//! the `*.sock` files in `--container-disk-dir` (the containerDisk containers stop on that),
//! and exits with the launcher's status (128 + the signal if it was killed; with
//! `--keep-after-failure`, a failed launcher leaves the monitor, and so the container, running
//! until the pod is deleted, for debugging). It stays small: it is resident per VM.
//! One thread for signals and the wait (a current-thread runtime), and the reaper thread of
//! `pod::process`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use virt_launcher::pod::children::children_of;
use virt_launcher::pod::cmdline::KubevirtArgs;
use virt_launcher::pod::process::{Command, Exit, Reaper, Stdio};

/// How long a QEMU that outlived the launcher has after SIGTERM (KubeVirt's monitor: 10 s).
const QEMU_GRACE: Duration = Duration::from_secs(10);

fn log(level: &str, msg: &str) {
    eprintln!(
        "{}",
        serde_json::json!({
            "level": level,
            "component": "virt-launcher-monitor",
            "pid": std::process::id(),
            "msg": msg,
        })
    );
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Only what the monitor itself needs; the launcher judges the rest (and says what it
    // ignores).
    let parsed = KubevirtArgs::parse(argv.clone()).unwrap_or_else(|e| {
        log("warning", &format!("{e}; virt-launcher will say more"));
        KubevirtArgs::default()
    });
    let (container_disk_dir, keep_after_failure) =
        (parsed.container_disk_dir, parsed.keep_after_failure);
    if let Err(e) = Reaper::start() {
        log("error", &format!("cannot reap orphans: {e}"));
        return ExitCode::FAILURE;
    }
    // One thread for signals and the wait (handlers, not a blocked mask: a spawned process
    // inherits the mask, and the launcher must get its SIGTERM).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log("error", &format!("cannot set up signal handling: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let exit = match runtime.block_on(run_launcher(&argv)) {
        Ok(e) => e,
        Err(e) => {
            log("error", &e);
            return ExitCode::FAILURE;
        }
    };
    drop(runtime);
    let code = match exit {
        Exit::Code(c) => c,
        Exit::Signal(s) => 128 + s,
    };
    if code != 0 {
        log("error", &format!("dirty virt-launcher shutdown: {exit}"));
    }
    stop_leftovers();
    for sock in virt_launcher::pod::remove_container_disk_sockets(&container_disk_dir) {
        log("info", &format!("removed {}", sock.display()));
    }
    if keep_after_failure && code != 0 {
        log(
            "info",
            "keeping the container alive since --keep-after-failure is set",
        );
        loop {
            std::thread::park();
        }
    }
    log("info", &format!("exiting with {code}"));
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Starts the launcher with `argv` (minus `--keep-after-failure`), forwards the pod's stop
/// signals to it as SIGTERM, and returns how it ended.
async fn run_launcher(argv: &[String]) -> Result<Exit, String> {
    let handle = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
    let mut term = handle(SignalKind::terminate())?;
    let mut int = handle(SignalKind::interrupt())?;
    let mut quit = handle(SignalKind::quit())?;
    let mut hup = handle(SignalKind::hangup())?;
    let launcher = launcher_path();
    let args = argv
        .iter()
        .filter(|a| !a.starts_with("--keep-after-failure"));
    let child = Command::new(&launcher)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("failed to run virt-launcher: {e}"))?;
    let pid = Pid::from_raw(child.pid());
    log(
        "info",
        &format!("started {} (pid {pid})", launcher.display()),
    );
    loop {
        let sig = tokio::select! {
            exit = child.exited() => {
                return exit.map_err(|e| format!("lost track of virt-launcher: {e}"));
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
            _ = hup.recv() => "SIGHUP",
        };
        log(
            "info",
            &format!("got {sig}: signalling virt-launcher to shut down"),
        );
        let _ = kill(pid, Signal::SIGTERM);
    }
}

/// `virt-launcher` beside this binary (`/usr/bin` in KubeVirt's image, `target/…` here).
fn launcher_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("virt-launcher")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/virt-launcher"))
}

/// What outlived the launcher (a QEMU it did not stop): SIGTERM, [`QEMU_GRACE`], SIGKILL.
fn stop_leftovers() {
    let me = std::process::id() as i32;
    for (sig, grace) in [
        (Signal::SIGTERM, QEMU_GRACE),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for pid in &children {
            log(
                "warning",
                &format!("process {pid} outlived virt-launcher: {sig}"),
            );
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until && !children_of(me).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
