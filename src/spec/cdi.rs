//! CDI's sizing rules for a Filesystem-mode claim: how much of it a `disk.img` may use.
//!
//! One rule for both users: the standalone DataVolume import (which sizes a new `disk.img`) and
//! the core (which grows `disk.img` when its claim grew). CDI's `GetUsableSpace` keeps a share
//! of the claim for the filesystem itself (`filesystemOverhead`, 5.5 % by default), rounds the
//! rest **up** to a byte and then **down** to its 1 MiB image alignment (so that qemu-img,
//! which rounds up, never uses more than the claim holds). The arithmetic here is exact
//! (the overhead is a decimal fraction, as CDI's `Percent` type writes it), so no float
//! rounding decides a boundary: a 1 109 604-byte claim holds exactly 1 MiB
//! (0.945 × 1 109 604 = 1 048 575.78, up to 1 048 576).

/// CDI aligns image sizes to 1 MiB (`DefaultAlignBlockSize`).
pub const ALIGN: u64 = 1 << 20;

/// The share of a Filesystem-mode claim CDI keeps for the filesystem: an exact decimal
/// fraction in `[0, 1)` (`num / den`, `den` a power of ten).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilesystemOverhead {
    num: u64,
    den: u64,
}

impl FilesystemOverhead {
    /// CDI's default (`CDIConfig.spec.filesystemOverhead.global`): 5.5 %.
    pub const DEFAULT: FilesystemOverhead = FilesystemOverhead { num: 55, den: 1000 };

    /// A decimal fraction as CDI writes it (`"0.055"`, `"0"`, `"0.5"`): digits, an optional
    /// `.` and up to 18 decimals; `None` unless it lies in `[0, 1)` (an overhead of 1 or more
    /// would leave no space at all).
    pub fn parse(text: &str) -> Option<FilesystemOverhead> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() && frac.is_empty() || !digits(int) || !digits(frac) || frac.len() > 18 {
            return None;
        }
        if int.bytes().any(|b| b != b'0') {
            return None; // 1 or more
        }
        let den = 10u64.pow(frac.len() as u32);
        let num = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        Some(FilesystemOverhead { num, den })
    }

    /// [`FilesystemOverhead::parse`], or [`FilesystemOverhead::DEFAULT`] when the text is
    /// absent or not a fraction in `[0, 1)`.
    pub fn or_default(text: Option<&str>) -> FilesystemOverhead {
        text.and_then(FilesystemOverhead::parse)
            .unwrap_or(FilesystemOverhead::DEFAULT)
    }

    /// The overhead in percent (for messages).
    pub fn percent(self) -> f64 {
        self.num as f64 * 100.0 / self.den as f64
    }
}

/// CDI's `GetUsableSpace`: the size of a `disk.img` on a Filesystem-mode claim of `size`
/// bytes: `size` less the overhead, rounded up to a byte, then down to 1 MiB.
pub fn usable_space(size: u64, overhead: FilesystemOverhead) -> u64 {
    let keep = u128::from(overhead.den - overhead.num);
    let usable = (u128::from(size) * keep).div_ceil(u128::from(overhead.den));
    let usable = u64::try_from(usable).unwrap_or(u64::MAX);
    usable / ALIGN * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn usable_space_rounds_up_to_a_byte_then_down_to_a_mib() {
        let d = FilesystemOverhead::DEFAULT;
        // The boundary: 0.945 × 1 109 604 = 1 048 575.78 → 1 048 576 = 1 MiB (truncating
        // first would give 0).
        assert_eq!(usable_space(1_109_604, d), MIB);
        assert_eq!(usable_space(1_109_603, d), 0); // 1 048 574.8 → 1 048 575
        assert_eq!(usable_space(1 << 30, d), 967 * MIB); // 967.68 MiB
        assert_eq!(usable_space(MIB, d), 0);
        assert_eq!(usable_space(64 * MIB, d), 60 * MIB); // 60.48 MiB
        assert_eq!(usable_space(20 << 30, d), 19353 * MIB); // 20Gi claim: 19353.6 MiB
        let huge = usable_space(u64::MAX, d);
        assert!(
            huge % MIB == 0 && huge < u64::MAX / 1000 * 945 + MIB,
            "{huge}"
        );
    }

    #[test]
    fn overheads_as_cdi_writes_them() {
        let gib = 1u64 << 30;
        let p = |s| FilesystemOverhead::parse(s);
        assert_eq!(p("0.055"), Some(FilesystemOverhead::DEFAULT));
        assert_eq!(usable_space(gib, p("0").unwrap()), gib);
        assert_eq!(usable_space(gib, p("0.5").unwrap()), gib / 2);
        assert_eq!(usable_space(gib, p(".25").unwrap()), gib / 4 * 3);
        assert_eq!(usable_space(gib, p("0.").unwrap()), gib);
        for bad in [
            "1", "2", "1.5", "x", "", ".", "-0.1", "0.5.5", "0,5", " 0.1",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        assert_eq!(
            FilesystemOverhead::or_default(Some("2")),
            FilesystemOverhead::DEFAULT
        );
        assert_eq!(
            FilesystemOverhead::or_default(None),
            FilesystemOverhead::DEFAULT
        );
        assert_eq!(FilesystemOverhead::DEFAULT.percent(), 5.5);
    }
}
