//! README.md's walkthroughs, run as written: the shell blocks marked
//! `<!-- tested: tests/walkthrough.rs <test> -->` are read from the README and their commands
//! run in order (a trailing `&` in the background), so that the README and what works cannot
//! drift apart. The test adds only what its machine needs: `--kernel-boot-dir` (the test guest),
//! `--json-logs` and TCG (`VIRT_LAUNCHER_DOMAIN_TYPE=qemu`); between commands it waits as the
//! README tells a reader to (the source's VM running, the target ready). It proves the rest from
//! inside the guest: the guest's counter (`lv.counter=vda`, written to the claim and printed)
//! goes on on the target without a gap, and the claim the target ends with holds it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::guest::{counts, disk_counter};

const LAUNCHERCTL: &str = env!("CARGO_BIN_EXE_launcherctl");
/// The runtime directories the README's commands give (the source's is the default one).
const SOURCE_RUNTIME: &str = "/run/virt-launcher/default_my-vm";
const TARGET_RUNTIME: &str = "/run/virt-launcher/my-vm-target";

/// Both walkthroughs run VM `my-vm` in the same runtime directories: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One command of a README block.
#[derive(Debug)]
struct Step {
    args: Vec<String>,
    background: bool,
}

/// The commands of the README block marked for `test`: comments dropped, `\` continuations
/// joined, a trailing `&` read as "in the background".
fn readme_block(test: &str) -> Vec<Step> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let marker = format!("<!-- tested: tests/walkthrough.rs {test} -->");
    let start = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no block marked {marker}"));
    let rest = &readme[start + marker.len()..];
    let body = rest
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("{marker} is not followed by a ```sh block"));
    let body = &body[..body.find("```").expect("unterminated block")];
    let mut steps = Vec::new();
    let mut line = String::new();
    for l in body.lines() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.strip_suffix('\\') {
            Some(part) => {
                line += part;
                line.push(' ');
                continue;
            }
            None => line += l,
        }
        let text = std::mem::take(&mut line);
        let (text, background) = match text.trim().strip_suffix('&') {
            Some(t) => (t.trim().to_string(), true),
            None => (text.trim().to_string(), false),
        };
        assert!(
            !text.contains(['"', '\'', '$', '|', ';']),
            "the walkthrough runs plain commands only: {text}"
        );
        steps.push(Step {
            args: text.split_whitespace().map(String::from).collect(),
            background,
        });
    }
    assert!(!steps.is_empty(), "{marker}: no commands");
    steps
}

/// The VM the README's `vm.yaml` stands for: the test guest counting on its disk (`vda`, the
/// DataVolume `data`), whose claim has `access_mode`.
fn vm_yaml(access_mode: &str) -> String {
    let template = format!(
        "    - metadata:
        name: data
      spec:
        source:
          blank: {{}}
        storage:
          accessModes:
            - {access_mode}
          resources:
            requests:
              storage: 16Mi
"
    );
    common::guest_vm_yaml("my-vm", "lv.counter=vda", &template, &["data"])
}

/// A walkthrough under way: its directory (the commands' working directory) and the
/// launchers it started in the background.
struct Walk {
    dir: PathBuf,
    launchers: Vec<(Child, PathBuf, String)>,
    /// Held until the walk's launchers are gone (dropped after them).
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Walk {
    fn new(test: &str, access_mode: &str) -> Walk {
        let dir = testkit::fresh_dir(
            std::env::temp_dir().join(format!("vl-walk-{test}-{}", std::process::id())),
        )
        .unwrap();
        fs::write(dir.join("vm.yaml"), vm_yaml(access_mode)).unwrap();
        for runtime in [SOURCE_RUNTIME, TARGET_RUNTIME] {
            let _ = fs::remove_file(testkit::guest::console_log(Path::new(runtime)));
        }
        Walk {
            dir,
            launchers: Vec::new(),
            _turn: None,
        }
    }

    /// The command of `step` as this machine runs it.
    fn command(&self, step: &Step) -> Command {
        let (program, rest) = step.args.split_first().expect("empty command");
        let mut cmd = match program.as_str() {
            "virt-launcher" => {
                let mut c = Command::new(common::LAUNCHER);
                c.args(rest);
                if rest.first().map(String::as_str) == Some("run") {
                    c.args(["--json-logs", "--kernel-boot-dir"])
                        .arg(common::guest_dir());
                }
                c
            }
            "launcherctl" => {
                let mut c = Command::new(LAUNCHERCTL);
                c.args(rest);
                c
            }
            other => panic!("the walkthrough runs {other}, which the test does not know"),
        };
        cmd.current_dir(&self.dir)
            .env("VIRT_LAUNCHER_DOMAIN_TYPE", "qemu")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a background launcher; its output goes to `<n>.log`.
    fn spawn(&mut self, step: &Step) -> usize {
        let n = self.launchers.len();
        let log = self.dir.join(format!("launcher-{n}.log"));
        let out = fs::File::create(&log).unwrap();
        let mut cmd = self.command(step);
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        let child = cmd.spawn().expect("start virt-launcher");
        self.launchers.push((child, log, step.args.join(" ")));
        n
    }

    /// Runs a foreground command to its end: (success, stdout + stderr).
    fn run(&self, step: &Step) -> (bool, String) {
        let out = self.command(step).output().expect("run the command");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn log(&self, n: usize) -> String {
        fs::read_to_string(&self.launchers[n].1).unwrap_or_default()
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for (n, (_, log, cmd)) in self.launchers.iter().enumerate() {
            let text = self.log(n);
            let lines: Vec<&str> = text.lines().collect();
            s += &format!(
                "--- {cmd}\n{}\n",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
            let _ = log;
        }
        for r in [SOURCE_RUNTIME, TARGET_RUNTIME] {
            let c = testkit::guest::read_console(&testkit::guest::console_log(Path::new(r)));
            let lines: Vec<&str> = c.lines().collect();
            s += &format!(
                "--- console {r}\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    }

    /// Waits for launcher `n` to exit; its success.
    fn wait_exit(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.launchers[n].0.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "launcher {n} still runs after {timeout:?}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn claim(&self, storage: &str) -> PathBuf {
        self.dir.join(storage).join("claims/default/data")
    }
}

impl Drop for Walk {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.launchers {
            testkit::procs::terminate(child, Duration::from_secs(30));
        }
        for r in [SOURCE_RUNTIME, TARGET_RUNTIME] {
            testkit::launcher::leftovers(Path::new(r), true);
        }
    }
}

fn console(runtime: &str) -> String {
    testkit::guest::read_console(&testkit::guest::console_log(Path::new(runtime)))
}

/// Runs the README block of `test` (a VM whose claim has `access_mode`); `before_target` runs
/// once the source's VM counts, before the target starts. Returns the walk, the target's
/// launcher index, the source's last count and the target's first.
fn walk(test: &str, access_mode: &str, before_target: impl FnOnce(&Walk)) -> (Walk, usize, u64) {
    let steps = readme_block(test);
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = Walk::new(test, access_mode);
    w._turn = Some(guard);
    let mut before_target = Some(before_target);
    let (mut source, mut target) = (None, None);
    for step in &steps {
        let is_target = step.args.iter().any(|a| a == "--migration-target");
        if step.background {
            if is_target {
                if let Some(f) = before_target.take() {
                    f(&w);
                }
            }
            let n = w.spawn(step);
            if is_target {
                // "It logs ready to receive a migration."
                common::wait_for("the target ready", Duration::from_secs(120), || {
                    w.log(n)
                        .contains("ready to receive a migration")
                        .then_some(())
                });
                target = Some(n);
            } else {
                // "Once it runs": the guest counts on its disk.
                let deadline = Instant::now() + Duration::from_secs(180);
                while counts(&console(SOURCE_RUNTIME)).len() < 3 {
                    assert!(
                        Instant::now() < deadline,
                        "the source's guest does not count\n{}",
                        w.dump()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                source = Some(n);
            }
            continue;
        }
        let (ok, out) = w.run(step);
        assert!(ok, "`{}` failed:\n{out}\n{}", step.args.join(" "), w.dump());
        if step.args.iter().any(|a| a == "migrate") {
            assert!(out.contains("migrated"), "{out}");
            let s = source.expect("the block starts the source first");
            assert!(
                w.wait_exit(s, Duration::from_secs(60)),
                "the source did not exit 0\n{}",
                w.dump()
            );
            assert!(w.log(s).contains("\"reason\":\"Migrated\""), "{}", w.dump());
        }
        if step.args.iter().any(|a| a == "status") {
            // Answered by the target: the VM runs there.
            assert!(out.contains("Running"), "{out}\n{}", w.dump());
        }
    }
    let target = target.expect("the block starts a target");
    // The counter goes on on the target without a gap.
    let last_src = *counts(&console(SOURCE_RUNTIME))
        .last()
        .expect("the source counted");
    let on_target = common::wait_for("counting on the target", Duration::from_secs(60), || {
        let c = counts(&console(TARGET_RUNTIME));
        (c.len() >= 3).then_some(c)
    });
    assert!(
        on_target[0] >= last_src && on_target[0] <= last_src + 1,
        "gap: the source stopped at {last_src}, the target went on at {}",
        on_target[0]
    );
    assert!(
        on_target.windows(2).all(|p| p[1] == p[0] + 1),
        "{on_target:?}"
    );
    (w, target, on_target[0])
}

/// SIGTERM to the target: exit 0, the guest shut down, nothing left running.
fn stop_target(w: &mut Walk, target: usize) {
    let pid = nix::unistd::Pid::from_raw(w.launchers[target].0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(
        w.wait_exit(target, Duration::from_secs(60)),
        "the target did not exit 0\n{}",
        w.dump()
    );
    for r in [SOURCE_RUNTIME, TARGET_RUNTIME] {
        let left = testkit::launcher::leftovers(Path::new(r), false);
        assert!(left.is_empty(), "left running: {left:#?}");
    }
}

/// A target started as `args` (absolute paths) refuses with one line containing every `want`.
fn target_refuses(w: &Walk, storage: &str, want: &[&str]) {
    let vm = w.dir.join("vm.yaml");
    let storage = w.dir.join(storage);
    let (status, stderr) = common::run_launcher(&[
        "run",
        "--vm",
        vm.to_str().unwrap(),
        "--storage-dir",
        storage.to_str().unwrap(),
        "--migration-target",
        "--domain-type",
        "qemu",
        "--runtime-dir",
        "/run/virt-launcher/my-vm-refused",
    ]);
    assert!(!status.success(), "a bad target was accepted:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("virt-launcher: "))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line:\n{stderr}");
    for s in want {
        assert!(errors[0].contains(s), "{s:?} not in: {}", errors[0]);
    }
}

/// A target for the ReadWriteOnce claim in `storage` makes an empty claim of the source's size
/// (not yet complete), and removes it when stopped before the VM came; exit 0.
fn target_gives_up(w: &Walk, storage: &str) {
    let runtime = "/run/virt-launcher/my-vm-abandoned";
    let log = w.dir.join("abandoned.log");
    let out = fs::File::create(&log).unwrap();
    let mut child = Command::new(common::LAUNCHER)
        .args(["run", "--vm", "vm.yaml", "--storage-dir", storage])
        .args([
            "--migration-target",
            "--json-logs",
            "--runtime-dir",
            runtime,
        ])
        .args(["--domain-type", "qemu", "--kernel-boot-dir"])
        .arg(common::guest_dir())
        .current_dir(&w.dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let claim = w.claim(storage);
    common::wait_for(
        "the abandoned target ready",
        Duration::from_secs(120),
        || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            assert!(
                child.try_wait().unwrap().is_none(),
                "the target exited:\n{text}"
            );
            text.contains("ready to receive a migration").then_some(())
        },
    );
    assert!(claim.join(".incoming-migration").exists());
    assert!(!claim.join("claim.json").exists());
    assert_eq!(
        fs::metadata(claim.join("disk.img")).unwrap().len(),
        fs::metadata(w.claim("storage").join("disk.img"))
            .unwrap()
            .len()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit {status}:\n{text}");
    assert!(!claim.exists(), "the empty claim is left:\n{text}");
    let left = testkit::launcher::leftovers(Path::new(runtime), false);
    assert!(left.is_empty(), "left running: {left:#?}");
}

#[test]
fn readme_migration_with_a_shared_claim() {
    let (mut w, target, first) = walk(
        "readme_migration_with_a_shared_claim",
        "ReadWriteMany",
        |w| {
            // A target whose storage lacks the shared claim is refused, and makes none.
            target_refuses(
                w,
                "elsewhere",
                &["DataVolume default/data", "ReadWriteMany", "--storage-dir"],
            );
            assert!(!w.claim("elsewhere").exists());
        },
    );
    stop_target(&mut w, target);
    // One claim, shared: it holds what the guest wrote on the target.
    let image = w.claim("storage").join("disk.img");
    assert!(
        disk_counter(&image) > first,
        "the shared claim holds {} (the target counted from {first})",
        disk_counter(&image)
    );
}

#[test]
fn readme_block_migration_of_a_readwriteonce_claim() {
    let (mut w, target, first) = walk(
        "readme_block_migration_of_a_readwriteonce_claim",
        "ReadWriteOnce",
        |w| {
            // The source's own storage for a ReadWriteOnce claim: refused, the claim untouched.
            target_refuses(
                w,
                "storage",
                &["DataVolume default/data", "ReadWriteOnce", "--storage-dir"],
            );
            assert!(w.claim("storage").join("claim.json").exists());
            // A target that ends without the VM removes the empty claim it made.
            target_gives_up(w, "storage-x");
        },
    );
    // Before the target stops: its claim is complete already (the VM arrived).
    let claim = w.claim("storage-b");
    assert!(claim.join("claim.json").exists(), "{}", w.dump());
    assert!(!claim.join(".incoming-migration").exists());
    stop_target(&mut w, target);
    let copied = disk_counter(&claim.join("disk.img"));
    assert!(
        copied > first,
        "the target's claim holds {copied} (the target counted from {first})"
    );
    assert_eq!(
        fs::metadata(claim.join("disk.img")).unwrap().len(),
        fs::metadata(w.claim("storage").join("disk.img"))
            .unwrap()
            .len(),
        "the target's claim is not the source's size"
    );
    // The source's claim stays as it was at the switch-over: behind the target's.
    assert!(disk_counter(&w.claim("storage").join("disk.img")) < copied);
}
