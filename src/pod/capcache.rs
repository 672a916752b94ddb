//! A host-wide seed for libvirt's QEMU capabilities cache, so that a standalone launcher's
//! fresh private daemon does not probe QEMU before its first domain.
//!
//! libvirt probes a QEMU binary's capabilities (a `qemu -M none` run answering many QMP
//! queries) the first time a domain needs them and caches the result as
//! `/var/cache/libvirt/qemu/capabilities/<sha256 of the binary's path>.xml`. A standalone
//! launcher's `/var/cache/libvirt` is private and new at every start ([`super::isolate`]), so
//! every start paid for the probe: about 0.7–1.2 s of a 1.3–2 s start here.
//!
//! Before the daemon starts, [`seed`] copies the files kept in the seed directory into the
//! private cache; when the launcher ends, [`save`] copies back whatever the daemon wrote
//! there. Staleness is libvirt's to judge, and it judges well: each file records the QEMU
//! binary's ctime, libvirtd's own version and ctime, the kernel, the CPU microcode and KVM's
//! availability, and libvirt probes again (and rewrites the file) when any of them changed or
//! the file does not parse. So an upgraded QEMU or libvirt, another host behind the same
//! directory, or a damaged file cost a probe, never a wrong answer.
//!
//! The cache is an optimisation: every failure here is logged and otherwise ignored.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where standalone launchers keep the seed by default.
pub const DEFAULT_DIR: &str = "/var/cache/virt-launcher/qemu-capabilities";

/// libvirt's file name for a binary's capabilities: 64 hex digits and `.xml`. Nothing else in
/// either directory is ours to copy.
fn is_caps_file(name: &str) -> bool {
    name.strip_suffix(".xml")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The capabilities files directly in `dir` (regular files, not links), by name.
fn caps_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_caps_file(&name) && entry.file_type()?.is_file() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Copies `from` to `dir/name` through a temporary file and a rename, so that a reader (or a
/// launcher saving at the same moment) never sees half a file. Keeps `from`'s mtime: a file
/// libvirt did not rewrite keeps the time it was first probed. `durable`: synced before the
/// rename (the seed, which outlives the launcher); a daemon's private cache is not, as it is
/// removed when the launcher ends and a start should not wait for a disk flush.
fn copy_atomic(from: &Path, dir: &Path, name: &str, durable: bool) -> io::Result<()> {
    let data = fs::read(from)?;
    let modified = fs::metadata(from)?.modified()?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut f, &data)?;
        f.set_modified(modified)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn mkdir_private(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Fills the daemon's capabilities cache `daemon_dir` from `seed_dir` (before the daemon
/// starts). Returns how many files were copied.
pub fn seed(seed_dir: &Path, daemon_dir: &Path) -> usize {
    let files = match caps_files(seed_dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(dir = %seed_dir.display(), error = %e, "QEMU capabilities cache not read");
            return 0;
        }
    };
    if files.is_empty() {
        return 0;
    }
    if let Err(e) = mkdir_private(daemon_dir) {
        tracing::warn!(dir = %daemon_dir.display(), error = %e, "QEMU capabilities cache not seeded");
        return 0;
    }
    let mut n = 0;
    for (name, path) in files {
        match copy_atomic(&path, daemon_dir, &name, false) {
            Ok(()) => n += 1,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "QEMU capabilities not seeded")
            }
        }
    }
    n
}

/// Whether `a` and `b` have the same size and modification time: a file the daemon was seeded
/// with and did not rewrite ([`copy_atomic`] keeps the mtime), found without reading either.
fn same_metadata(a: &Path, b: &Path) -> bool {
    let stamp = |p: &Path| fs::metadata(p).and_then(|m| Ok((m.len(), m.modified()?)));
    matches!((stamp(a), stamp(b)), (Ok(x), Ok(y)) if x == y)
}

/// Keeps in `seed_dir` what the daemon cached in `daemon_dir` that the seed lacks or holds
/// differently (a new binary, or a stale file libvirt replaced). Returns how many files were
/// written. Runs as the launcher ends, on its stop path: a file the daemon was seeded with and
/// left alone (every start but the first on a host) is recognised by its size and mtime and
/// not read; reading and comparing ~550 KB of files took up to 0.5 s of a stop under load.
pub fn save(daemon_dir: &Path, seed_dir: &Path) -> usize {
    let files = match caps_files(daemon_dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(dir = %daemon_dir.display(), error = %e, "QEMU capabilities not saved");
            return 0;
        }
    };
    let mut n = 0;
    for (name, path) in files {
        if same_metadata(&path, &seed_dir.join(&name)) {
            continue;
        }
        let Ok(new) = fs::read(&path) else { continue };
        if fs::read(seed_dir.join(&name)).is_ok_and(|old| old == new) {
            continue;
        }
        match mkdir_private(seed_dir).and_then(|()| copy_atomic(&path, seed_dir, &name, true)) {
            Ok(()) => n += 1,
            Err(e) => {
                tracing::warn!(dir = %seed_dir.display(), error = %e, "QEMU capabilities not saved")
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    const NAME: &str = "926803a9278e445ec919c2b6cbd8c1c449c75b26dcb1686b774314180376c725.xml";

    #[test]
    fn only_libvirts_file_names() {
        assert!(is_caps_file(NAME));
        assert!(!is_caps_file("926803a9.xml"));
        assert!(!is_caps_file(&NAME.replace(".xml", ".txt")));
        assert!(!is_caps_file(&NAME.replace('9', "g")));
    }

    #[test]
    fn seed_then_save_round_trip_keeps_mtime_and_skips_the_rest() {
        let tmp = std::env::temp_dir().join(format!("vl-capcache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let (seed_dir, daemon_dir) = (tmp.join("seed"), tmp.join("d/qemu/caps"));
        // Nothing to seed from a missing directory.
        assert_eq!(seed(&seed_dir, &daemon_dir), 0);
        assert!(!daemon_dir.exists());

        fs::create_dir_all(&seed_dir).unwrap();
        fs::write(seed_dir.join(NAME), "<qemuCaps/>").unwrap();
        fs::write(seed_dir.join("notes.xml"), "x").unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        fs::File::options()
            .write(true)
            .open(seed_dir.join(NAME))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(seed(&seed_dir, &daemon_dir), 1);
        let copied = daemon_dir.join(NAME);
        assert_eq!(fs::read_to_string(&copied).unwrap(), "<qemuCaps/>");
        assert_eq!(fs::metadata(&copied).unwrap().modified().unwrap(), old);
        assert!(!daemon_dir.join("notes.xml").exists());

        // Unchanged: nothing to save. Rewritten by the daemon: saved, whether its size changed
        // or only its mtime (the same length, other bytes).
        assert_eq!(save(&daemon_dir, &seed_dir), 0);
        fs::write(&copied, "<qemuCapz/>").unwrap();
        assert_eq!(save(&daemon_dir, &seed_dir), 1);
        assert_eq!(
            fs::read_to_string(seed_dir.join(NAME)).unwrap(),
            "<qemuCapz/>"
        );
        assert_eq!(save(&daemon_dir, &seed_dir), 0);
        fs::write(&copied, "<qemuCaps>new</qemuCaps>").unwrap();
        assert_eq!(save(&daemon_dir, &seed_dir), 1);
        assert_eq!(
            fs::read_to_string(seed_dir.join(NAME)).unwrap(),
            "<qemuCaps>new</qemuCaps>"
        );
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(&seed_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
