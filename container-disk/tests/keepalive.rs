//! The real binary: the socket virt-handler finds the container by, connections accepted and
//! closed, and the two ways it ends (SIGTERM; the socket removed), each with exit 0.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vl-cdisk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn start(copy_path: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_container-disk"))
        .arg("--copy-path")
        .arg(copy_path)
        .spawn()
        .unwrap()
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exited(child: &mut Child) -> ExitStatus {
    wait_until("exit", || child.try_wait().unwrap())
}

#[test]
fn serves_its_socket_until_sigterm_then_removes_it() {
    let dir = scratch("term");
    // The directory does not exist yet: it is made, as KubeVirt's does.
    let copy_path = dir.join("hp");
    let sock = dir.join("hp.sock");
    let mut child = start(&copy_path);
    wait_until("the socket", || sock.exists().then_some(()));
    // Many connections, more than the listen backlog: each is accepted and closed.
    for _ in 0..200 {
        let _ = UnixStream::connect(&sock).unwrap();
    }
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let st = exited(&mut child);
    assert!(st.success(), "SIGTERM: {st:?}");
    assert!(!sock.exists(), "the socket is removed on SIGTERM");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ends_when_its_socket_is_removed() {
    let dir = scratch("rm");
    std::fs::create_dir_all(&dir).unwrap();
    let copy_path = dir.join("disk_0");
    let sock = dir.join("disk_0.sock");
    let mut child = start(&copy_path);
    wait_until("the socket", || sock.exists().then_some(()));
    std::fs::remove_file(&sock).unwrap();
    let st = exited(&mut child);
    assert!(st.success(), "socket removed: {st:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_op_exits_at_once_and_bad_input_fails_with_a_reason() {
    let bin = env!("CARGO_BIN_EXE_container-disk");
    assert!(Command::new(bin).arg("--no-op").status().unwrap().success());
    let out = Command::new(bin).arg("--copy-path").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "container-disk: --copy-path needs a value\n"
    );
    // A socket that cannot be made (its directory is a file): a reason, exit 1.
    let dir = scratch("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("file"), "").unwrap();
    let out = Command::new(bin)
        .arg("--copy-path")
        .arg(dir.join("file/disk"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed to bind socket"),
        "{out:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
