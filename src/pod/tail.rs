//! `virt-tail`: the guest-console-log sidecar's follower (KubeVirt's `virt-tail --logfile F`).
//!
//! Streams a log file from its start to stdout, complete lines only, and keeps following it:
//! a file that does not exist yet is waited for, a file re-created under the same name (a new
//! inode) or truncated is read again from its start after the old one is drained. It ends
//! only on SIGTERM/SIGINT, with exit 0 (the pod ending), as KubeVirt's does.
//!
//! It polls (every [`POLL`]) instead of using inotify: a console log grows by a few lines a
//! second, and a poll has no missed-event or watch-limit cases. The signal is awaited by tokio
//! together with the poll timer, so a SIGTERM is never lost between two reads (the shell
//! script this replaces could miss one that came while it was between `trap` and `wait`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_millis(200);

/// A partial line longer than this is written out as it is (a console without newlines must
/// not grow the follower's memory without bound).
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing to stdout: {0}")]
    Write(#[source] io::Error),
    #[error("cannot wait for signals: {0}")]
    Signals(#[source] io::Error),
}

/// The file being followed: which inode, how far it was read, and the partial line held back.
pub struct Follower {
    path: PathBuf,
    open: Option<Open>,
    partial: Vec<u8>,
}

struct Open {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
}

impl Follower {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Follower {
            path: path.into(),
            open: None,
            partial: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every complete line that appeared since the last call to `out`.
    pub fn poll(&mut self, out: &mut impl Write) -> Result<(), TailError> {
        // At most twice: the file as it was, then once more if it was replaced meanwhile (the
        // new file may already hold lines); a later replacement is seen at the next poll.
        for _ in 0..2 {
            if self.open.is_none() && !self.open_file()? {
                return Ok(());
            }
            self.drain(out)?;
            // Re-created or truncated: what the old descriptor held is written; start over.
            let replaced = match std::fs::metadata(&self.path) {
                Ok(meta) => self.open.as_ref().is_some_and(|o| {
                    meta.dev() != o.dev || meta.ino() != o.ino || meta.len() < o.offset
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => return Err(self.read_error(e)),
            };
            if !replaced {
                return Ok(());
            }
            self.open = None;
            self.flush_partial(out)?;
        }
        Ok(())
    }

    /// Opens the file from its start; `false` when it does not exist (yet).
    fn open_file(&mut self) -> Result<bool, TailError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.read_error(e)),
        };
        let meta = file.metadata().map_err(|e| self.read_error(e))?;
        self.open = Some(Open {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset: 0,
        });
        Ok(true)
    }

    fn drain(&mut self, out: &mut impl Write) -> Result<(), TailError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match open.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TailError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            open.offset += n as u64;
            let mut chunk = &buf[..n];
            while let Some(nl) = chunk.iter().position(|b| *b == b'\n') {
                self.partial.extend_from_slice(&chunk[..=nl]);
                out.write_all(&self.partial).map_err(TailError::Write)?;
                self.partial.clear();
                chunk = &chunk[nl + 1..];
            }
            self.partial.extend_from_slice(chunk);
            if self.partial.len() >= MAX_LINE {
                out.write_all(&self.partial).map_err(TailError::Write)?;
                self.partial.clear();
            }
        }
        out.flush().map_err(TailError::Write)
    }

    /// The old file's last line had no newline: it is complete now that the file is gone.
    fn flush_partial(&mut self, out: &mut impl Write) -> Result<(), TailError> {
        if !self.partial.is_empty() {
            self.partial.push(b'\n');
            out.write_all(&self.partial).map_err(TailError::Write)?;
            self.partial.clear();
        }
        Ok(())
    }

    fn read_error(&self, source: io::Error) -> TailError {
        TailError::Read {
            path: self.path.clone(),
            source,
        }
    }
}

/// Follows `path` onto stdout until SIGTERM or SIGINT (then `Ok`).
pub async fn run(path: &Path) -> Result<(), TailError> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers first: a signal that comes before the first read still ends us cleanly.
    let mut term = signal(SignalKind::terminate()).map_err(TailError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(TailError::Signals)?;
    let mut follower = Follower::new(path);
    let mut stdout = io::stdout().lock();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => follower.poll(&mut stdout)?,
        }
    }
}

/// KubeVirt's command line: `--logfile F` or `--logfile=F`; anything else (its `-v N` and
/// other klog flags) is ignored, as KubeVirt's virt-tail ignores unknown flags.
pub fn logfile_arg(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    let mut found = None;
    while let Some(a) = it.next() {
        if a == "--logfile" || a == "-logfile" {
            found = it.next().cloned();
        } else if let Some(v) = a
            .strip_prefix("--logfile=")
            .or_else(|| a.strip_prefix("-logfile="))
        {
            found = Some(v.to_string());
        }
    }
    found.filter(|f| !f.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vl-tail-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn append(p: &Path, s: &str) {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    fn polled(f: &mut Follower) -> String {
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn waits_for_the_file_then_streams_complete_lines_from_the_start() {
        let d = dir();
        let log = d.join("virt-serial0-log");
        let mut f = Follower::new(&log);
        assert_eq!(polled(&mut f), "");
        append(&log, "one\ntw");
        assert_eq!(polled(&mut f), "one\n");
        append(&log, "o\nthree\n");
        assert_eq!(polled(&mut f), "two\nthree\n");
        assert_eq!(polled(&mut f), "");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_recreated_or_truncated_file_is_read_again_from_its_start() {
        let d = dir();
        let log = d.join("log");
        append(&log, "old 1\nold partial");
        let mut f = Follower::new(&log);
        assert_eq!(polled(&mut f), "old 1\n");
        // Rotated away and re-created: the old file's last line is written, then the new file.
        std::fs::rename(&log, d.join("log.1")).unwrap();
        append(&log, "new 1\n");
        assert_eq!(polled(&mut f), "old partial\nnew 1\n");
        // Truncated in place (same inode, shorter than what was read).
        std::fs::write(&log, "").unwrap();
        assert_eq!(polled(&mut f), "");
        append(&log, "after truncate\n");
        assert_eq!(polled(&mut f), "after truncate\n");
        // Removed: nothing, then the file that comes back.
        std::fs::remove_file(&log).unwrap();
        assert_eq!(polled(&mut f), "");
        append(&log, "back\n");
        assert_eq!(polled(&mut f), "back\n");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_line_without_end_is_written_once_it_is_too_long_to_hold() {
        let d = dir();
        let log = d.join("log");
        let long = "x".repeat(MAX_LINE + 10);
        append(&log, &long);
        let mut f = Follower::new(&log);
        // Written in reads of 16 KiB: what exceeded the limit goes out, the rest waits.
        assert_eq!(polled(&mut f), "x".repeat(MAX_LINE));
        append(&log, "\n");
        assert_eq!(polled(&mut f), format!("{}\n", "x".repeat(10)));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn kubevirts_command_line_is_read_and_its_other_flags_ignored() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            logfile_arg(&args(&["-v", "3", "--logfile", "/x/log"])),
            Some(PathBuf::from("/x/log"))
        );
        assert_eq!(
            logfile_arg(&args(&["--logfile=/y", "--other"])),
            Some(PathBuf::from("/y"))
        );
        assert_eq!(logfile_arg(&args(&["--logfile"])), None);
        assert_eq!(logfile_arg(&args(&["--logfile="])), None);
        assert_eq!(logfile_arg(&args(&[])), None);
    }
}
