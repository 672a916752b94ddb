//! The launcher harness that the integration tests (`tests/common`) and the benchmark
//! (`bench/`) share: the test guest's VMIs and PVC images, the `virt-launcher run` command
//! line, the guest's console lines, the control API client, and what is found in `/proc`
//! (processes, memory, namespaces) to measure a pod and to clean up after it.
//!
//! Tests wrap it in panicking helpers (`tests/common`); the benchmark in `Result`s that stop a
//! run cleanly. Nothing here knows which of the two calls it.

pub mod guest;
pub mod kubevirt;
pub mod launcher;
pub mod procs;
pub mod vmi;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workspace root (the launcher's repository).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ is a folder of the repository")
}

/// A fresh, empty directory at `path` (whatever was there is removed).
pub fn fresh_dir(path: PathBuf) -> std::io::Result<PathBuf> {
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match std::fs::remove_dir_all(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(named(e)),
        _ => {}
    }
    std::fs::create_dir_all(&path).map_err(named)?;
    Ok(path)
}

/// Calls `step` every `every` until it gives a value (`Ok(Some)`) or an error, or `deadline`
/// passes (`Ok(None)`: the caller says what did not happen). `step` runs at least once.
pub fn poll<T, E>(
    deadline: Instant,
    every: Duration,
    mut step: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    loop {
        if let Some(v) = step()? {
            return Ok(Some(v));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_gives_the_value_the_error_or_none_after_the_deadline() {
        let mut n = 0;
        let got = poll(
            Instant::now() + Duration::from_secs(5),
            Duration::ZERO,
            || {
                n += 1;
                Ok::<_, ()>((n == 3).then_some(n))
            },
        );
        assert_eq!(got, Ok(Some(3)));
        let failed = poll(Instant::now(), Duration::ZERO, || {
            Err::<Option<()>, _>("dead")
        });
        assert_eq!(failed, Err("dead"));
        let mut calls = 0;
        let none = poll(Instant::now(), Duration::ZERO, || {
            calls += 1;
            Ok::<Option<()>, ()>(None)
        });
        assert_eq!((none, calls), (Ok(None), 1));
    }
}
