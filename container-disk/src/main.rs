//! `container-disk`: KubeVirt's small keep-alive process, with its command line.
//!
//! virt-controller runs it in three places, with the launcher image's binary: as the command
//! of each containerDisk container (copied into the pod by the `container-disk-binary` init
//! container, so it runs inside the user's disk image: hence a static binary), in hot-plug
//! attachment pods (`/usr/bin/container-disk --copy-path /path/hp`), and as `--no-op` in
//! image-volume init containers.
//!
//! `--copy-path P` creates `P.sock` (the directory too, if missing) and listens on it:
//! virt-handler finds the container by that socket. It accepts and closes connections
//! (so the queue never fills), and ends with exit 0 on SIGTERM (removing the socket) or when
//! the socket file is removed (the launcher's monitor removes the sockets at its exit, in
//! case a runtime does not deliver the signal). `--no-op` exits 0 at once.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// `sun_path` holds 108 bytes: the path, `.sock` and the NUL.
const MAX_COPY_PATH: usize = 102;
/// How often the socket file's existence is checked.
const CHECK_MS: u16 = 1000;

enum Mode {
    NoOp,
    Serve(PathBuf),
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let mut copy_path = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--no-op" => return Ok(Mode::NoOp),
            "--copy-path" | "-c" => {
                copy_path = Some(it.next().ok_or("--copy-path needs a value")?.clone());
            }
            a => match a.strip_prefix("--copy-path=") {
                Some(v) => copy_path = Some(v.to_string()),
                None => return Err(format!("unknown argument {a:?}")),
            },
        }
    }
    let path = copy_path.ok_or("--copy-path or --no-op must be given")?;
    if path.is_empty() {
        return Err("--copy-path is empty".into());
    }
    if path.len() > MAX_COPY_PATH {
        return Err(format!(
            "copy path can not be longer than {MAX_COPY_PATH} characters"
        ));
    }
    Ok(Mode::Serve(PathBuf::from(path)))
}

fn socket_path(copy_path: &Path) -> PathBuf {
    let mut s = copy_path.as_os_str().to_owned();
    s.push(".sock");
    PathBuf::from(s)
}

fn serve(copy_path: &Path) -> Result<(), String> {
    // SIGTERM is read from a signalfd; blocked first, so one that comes during set-up waits.
    // (Blocked signals reach PID 1 too, which a container's entrypoint is.)
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.thread_block()
        .map_err(|e| format!("cannot block SIGTERM: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("cannot read signals: {e}"))?;

    if let Some(dir) = copy_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::create_dir_all(dir)
                .map_err(|e| format!("failed to create disk directory {}: {e}", dir.display()))?;
        }
    }
    let sock = socket_path(copy_path);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("failed to bind socket {}: {e}", sock.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("socket {}: {e}", sock.display()))?;

    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(CHECK_MS)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let readable = |f: &PollFd| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let (conn_ready, sig_ready) = (readable(&fds[0]), readable(&fds[1]));
        if sig_ready && matches!(signals.read_signal(), Ok(Some(_))) {
            let _ = fs::remove_file(&sock);
            return Ok(());
        }
        if !sock.exists() {
            eprintln!(
                "container-disk: socket {} does not exist anymore",
                sock.display()
            );
            return Ok(());
        }
        if conn_ready {
            // Nothing to say: the connection only proves the container is there.
            loop {
                match listener.accept() {
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("failed to accept connections: {e}")),
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse(&args).and_then(|mode| match mode {
        Mode::NoOp => Ok(()),
        Mode::Serve(p) => serve(&p),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("container-disk: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kubevirts_command_lines() {
        assert!(matches!(parse(&args(&["--no-op"])), Ok(Mode::NoOp)));
        assert!(
            matches!(parse(&args(&["--copy-path", "/path/hp"])), Ok(Mode::Serve(p)) if p == Path::new("/path/hp"))
        );
        assert!(
            matches!(parse(&args(&["--copy-path=/a/disk_0"])), Ok(Mode::Serve(p)) if p == Path::new("/a/disk_0"))
        );
        assert_eq!(
            socket_path(Path::new("/path/hp")),
            PathBuf::from("/path/hp.sock")
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        let err = |a: &[&str]| match parse(&args(a)) {
            Err(e) => e,
            Ok(_) => panic!("{a:?} accepted"),
        };
        assert_eq!(err(&[]), "--copy-path or --no-op must be given");
        assert_eq!(err(&["--copy-path"]), "--copy-path needs a value");
        assert_eq!(err(&["--bogus"]), "unknown argument \"--bogus\"");
        let long = format!("/{}", "x".repeat(MAX_COPY_PATH));
        assert!(err(&["--copy-path", &long]).contains("longer than 102"));
    }
}
