//! `launcherctl`'s views and actions on a running standalone launcher, through the binary as a
//! user runs it: `xml` (the live domain XML), `logs` (`--tail`, `-f`), `expand` (a claim grows;
//! the guest sees the new size), and the interactive `console` (piped stdin with the Ctrl-]
//! detach byte, `--json` lines, and a pseudo-terminal whose mode is restored on exit). The
//! guest proves the console input reached it: `lv.echo` prints each line typed on its serial
//! console as `LV-ECHO <line>`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Pod;

const LAUNCHERCTL: &str = env!("CARGO_BIN_EXE_launcherctl");

fn ctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(LAUNCHERCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Lines a reader thread takes from `r`, until one satisfies `want` (or panics after `timeout`).
fn lines_until(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = want(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("not within {timeout:?}; saw: {seen:#?}"),
        }
    }
}

fn reader(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child killed when dropped (a failing test leaves no follower behind).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` to exit within `timeout`; its success.
fn exits(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("launcherctl did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn launcherctl_xml_logs_expand_and_an_interactive_console() {
    let mut pod = Pod::new("ctlio")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.echo");
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(120));
    let vm = pod.name.clone();

    // xml: the live domain, as libvirt has it.
    let (ok, xml, err) = ctl(&["--vm", &vm, "xml"]);
    assert!(ok, "{err}");
    assert!(
        xml.starts_with("<domain") && xml.contains(&format!("<name>default_{vm}</name>")),
        "{xml}"
    );
    assert!(
        xml.contains("id='"),
        "not the live XML (no domain id): {xml}"
    );
    let (ok, j, _) = ctl(&["--vm", &vm, "--json", "xml"]);
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    let jx = j["xml"].as_str().unwrap_or_default();
    assert!(
        ok && jx.starts_with("<domain") && jx.contains(&format!("<name>default_{vm}</name>")),
        "{j}"
    );

    // logs: the launcher's own log; --tail; -f follows what it adds.
    let (ok, log, err) = ctl(&["--vm", &vm, "logs"]);
    assert!(ok && log.contains("launcher starting"), "{log}{err}");
    let (ok, last, _) = ctl(&["--vm", &vm, "logs", "--tail", "2"]);
    assert!(ok && last.lines().count() == 2, "{last}");
    assert!(
        log.ends_with(&last),
        "--tail 2 is not the log's end:\n{last}"
    );
    let mut follow = Killed(
        Command::new(LAUNCHERCTL)
            .args(["--vm", &vm, "logs", "-f", "--tail", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let followed = reader(follow.0.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, err) = ctl(&["--vm", &vm, "pause"]);
    assert!(ok, "{err}");
    // The domain event of the pause, as the launcher logs it.
    lines_until(&followed, Duration::from_secs(20), |l| {
        l.contains("domain event") && l.contains("paused")
    });
    drop(follow);
    assert!(ctl(&["--vm", &vm, "resume"]).0);

    // expand: the claim grows to 64Mi; the disk to 64Mi less CDI's 5.5 % overhead (rounded
    // down to 1 MiB: 60 MiB), and the guest sees it.
    let (ok, out, err) = ctl(&["--vm", &vm, "--json", "expand", "data", "--size", "64Mi"]);
    assert!(ok, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["sizeBytesBefore"], 16u64 << 20, "{r}");
    assert_eq!(r["sizeBytes"], 60u64 << 20, "{r}");
    assert_eq!(
        std::fs::metadata(pod.disk_image("data")).unwrap().len(),
        60 << 20
    );
    pod.wait_console(
        &format!("vda:{}", (60u64 << 20) / 512),
        Duration::from_secs(30),
    );
    // Bad input: a shrink, a volume the VM does not have, a size that is none.
    let (ok, _, err) = ctl(&["--vm", &vm, "expand", "data", "--size", "8Mi"]);
    assert!(
        !ok && err.contains("data") && err.contains("shrink"),
        "{err}"
    );
    let (ok, _, err) = ctl(&["--vm", &vm, "expand", "nope", "--size", "1Gi"]);
    assert!(!ok && err.contains("volume nope"), "{err}");
    let (ok, _, err) = ctl(&["--vm", &vm, "expand", "data", "--size", "lots"]);
    assert!(!ok && err.contains("--size \"lots\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        std::fs::metadata(pod.disk_image("data")).unwrap().len(),
        60 << 20,
        "a refused expansion touched the disk"
    );

    // console, stdin piped: a line typed reaches the guest, Ctrl-] detaches (exit 0).
    let mut console = Command::new(LAUNCHERCTL)
        .args(["--vm", &vm, "console"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let shown = reader(console.stdout.take().unwrap());
    let mut stdin = console.stdin.take().unwrap();
    stdin.write_all(b"hello-console\n").unwrap();
    lines_until(&shown, Duration::from_secs(30), |l| {
        l.contains("LV-ECHO hello-console")
    });
    stdin.write_all(&[0x1d]).unwrap();
    assert!(exits(&mut console, Duration::from_secs(10)));
    let mut banner = String::new();
    console
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut banner)
        .unwrap();
    assert!(banner.contains("The escape sequence is ^]"), "{banner}");
    // The guest runs on (detaching does not stop it).
    pod.wait_console("LV-ECHO hello-console", Duration::from_secs(5));

    // console --json: the guest's output as {"line": ...} objects.
    let mut console = Command::new(LAUNCHERCTL)
        .args(["--vm", &vm, "--json", "console"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let shown = reader(console.stdout.take().unwrap());
    let mut stdin = console.stdin.take().unwrap();
    stdin.write_all(b"as-json\n").unwrap();
    let seen = lines_until(&shown, Duration::from_secs(30), |l| {
        l.contains("LV-ECHO as-json")
    });
    for l in &seen {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["line"].is_string(), "{l}");
    }
    // The end of stdin detaches too.
    drop(stdin);
    assert!(exits(&mut console, Duration::from_secs(10)));

    // console on a terminal: raw while attached, the terminal's mode restored after Ctrl-].
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut console = Command::new(LAUNCHERCTL)
        .args(["--vm", &vm, "console"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let shown = reader(master.try_clone().unwrap());
    lines_until(&shown, Duration::from_secs(10), |l| {
        l.contains("Successfully connected")
    });
    let raw = nix::sys::termios::tcgetattr(&slave).unwrap();
    assert!(
        !raw.local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON),
        "the terminal is not in raw mode while attached"
    );
    // Raw: Enter is a carriage return, which the guest's terminal reads as the line's end.
    master.write_all(b"on-a-tty\r").unwrap();
    lines_until(&shown, Duration::from_secs(30), |l| {
        l.contains("LV-ECHO on-a-tty")
    });
    master.write_all(&[0x1d]).unwrap();
    assert!(exits(&mut console, Duration::from_secs(10)));
    let after = nix::sys::termios::tcgetattr(&slave).unwrap();
    assert_eq!(
        after.local_flags, before.local_flags,
        "terminal not restored"
    );
    assert_eq!(
        after.input_flags, before.input_flags,
        "terminal not restored"
    );
    assert_eq!(
        after.output_flags, before.output_flags,
        "terminal not restored"
    );

    pod.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        pod.wait_exit(Duration::from_secs(40)).success(),
        "{}",
        pod.dump()
    );
}
