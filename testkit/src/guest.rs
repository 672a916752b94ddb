//! The test guest (scripts/build-guest.sh, scripts/guest-init.sh): where it is, and what it
//! says on its console and writes to its disks.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The console line the guest prints once it is up.
pub const READY: &str = "LV-READY";

/// Where the test guest's kernel and initramfs are: `$GUEST_DIR`, or `.cache/guest` in the
/// repository.
pub fn dir() -> PathBuf {
    std::env::var_os("GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join(".cache/guest"))
}

/// Whether `dir` holds the guest (`vmlinuz` and `initramfs.gz`).
pub fn is_complete(dir: &Path) -> bool {
    ["vmlinuz", "initramfs.gz"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// The guest's serial console log in a launcher's runtime directory.
pub fn console_log(runtime_dir: &Path) -> PathBuf {
    console_in(&runtime_dir.join("private"))
}

/// The guest's serial console log in the VM's private directory (the domain XML's).
pub fn console_in(private_dir: &Path) -> PathBuf {
    private_dir.join("virt-serial0-log")
}

/// The text of a console log ("" until it exists).
pub fn read_console(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// What the guest wrote at the start of a disk image: its first line (of the first 4 KiB),
/// trimmed; "" if the image cannot be read.
pub fn first_line(image: &Path) -> String {
    let mut data = Vec::new();
    let _ = fs::File::open(image).and_then(|f| f.take(4096).read_to_end(&mut data));
    let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line).trim().to_string()
}

/// The counter the guest keeps at offset 0 of a disk (`lv.counter=vda`), 0 if none.
pub fn disk_counter(image: &Path) -> u64 {
    first_line(image).parse().unwrap_or(0)
}

/// The `LV-COUNT n` values on a console, in order (n was on disk, fsync'ed, when printed).
pub fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("LV-COUNT ")?.trim().parse().ok())
        .collect()
}

/// The guest's online CPUs as its latest `LV-CPUS` line lists them (`0-1`: the kernel's
/// `/sys/devices/system/cpu/online`; the guest brings hot-plugged CPUs online first).
pub fn online_cpus(console: &str) -> Option<&str> {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("LV-CPUS "))
        .map(str::trim)
}

/// The guest's `LV-BLOCK` lines in order (it prints one whenever its disks change, looking
/// every 50 ms), each as its disks: `(name, sectors)`.
pub fn block_lines(console: &str) -> impl Iterator<Item = Vec<(&str, u64)>> {
    console
        .lines()
        .filter(|l| l.starts_with("LV-BLOCK"))
        .map(block_entries)
}

/// The disks of the guest's latest `LV-BLOCK` line.
pub fn latest_block_line(console: &str) -> Option<Vec<(&str, u64)>> {
    block_lines(console).last()
}

/// Whether any `LV-BLOCK` line lists a disk of `sectors` sectors.
pub fn ever_listed(console: &str, sectors: u64) -> bool {
    block_lines(console).any(|disks| disks.iter().any(|(_, s)| *s == sectors))
}

/// The guest's name for the disk of `sectors` sectors in its latest `LV-BLOCK` line.
pub fn device_of(console: &str, sectors: u64) -> Option<String> {
    latest_block_line(console)?
        .into_iter()
        .find(|(_, s)| *s == sectors)
        .map(|(name, _)| name.to_string())
}

fn block_entries(line: &str) -> Vec<(&str, u64)> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|e| {
            let (name, size) = e.split_once(':')?;
            Some((name, size.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lines_and_counts() {
        let console =
            "boot\nLV-BLOCK vda:2048\nLV-COUNT 3\nLV-BLOCK vda:2048 vdb:4096\nLV-COUNT 4\n";
        assert_eq!(
            latest_block_line(console),
            Some(vec![("vda", 2048), ("vdb", 4096)])
        );
        assert!(ever_listed(console, 4096));
        assert!(!ever_listed(console, 8192));
        assert_eq!(device_of(console, 4096).as_deref(), Some("vdb"));
        assert_eq!(counts(console), [3, 4]);
        assert_eq!(latest_block_line("nothing"), None);
        assert_eq!(block_lines(console).next(), Some(vec![("vda", 2048)]));
    }
}
