//! What a disk image file is, told by its first bytes (never by its name). One pure
//! classifier ([`classify`]) and one reader ([`sniff`]) for every user: the pod facts (the
//! format of a containerDisk's base image), the files prepared before a start (the backing
//! format of its overlay) and the standalone DataVolume import (what to unpack, convert or
//! refuse).

use crate::convert::facts::ImageFormat;
use std::io::Read;
use std::path::Path;

/// How many leading bytes [`classify`] looks at (VDI's signature sits at 0x40).
pub const HEAD_LEN: usize = 512;

/// What the first bytes of a file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    Gzip,
    Xz,
    Qcow2,
    /// A format we recognise and refuse (its name).
    Unsupported(&'static str),
    /// Anything else, an empty file included.
    Raw,
}

impl Magic {
    /// The format a disk image of this kind is given to QEMU as: qcow2, or else raw (a
    /// containerDisk is used as it is: only its qcow2 header changes how it is read).
    pub fn disk_format(self) -> ImageFormat {
        match self {
            Magic::Qcow2 => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        }
    }
}

/// Classify a file by its first bytes (up to [`HEAD_LEN`]; fewer for a short file).
pub fn classify(head: &[u8]) -> Magic {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, &[0x1f, 0x8b]) {
        Magic::Gzip
    } else if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Magic::Xz
    } else if at(0, b"QFI\xfb") {
        Magic::Qcow2
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Magic::Unsupported("VMDK")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Magic::Unsupported("VDI")
    } else if at(0, b"vhdxfile") {
        Magic::Unsupported("VHDX")
    } else if at(0, b"conectix") {
        Magic::Unsupported("VHD")
    } else if at(0, b"BZh") && head.get(3).is_some_and(|b| (b'1'..=b'9').contains(b)) {
        Magic::Unsupported("bzip2")
    } else if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        Magic::Unsupported("zstd")
    } else {
        Magic::Raw
    }
}

/// Read the first [`HEAD_LEN`] bytes of `path` and [`classify`] them.
pub fn sniff(path: &Path) -> std::io::Result<Magic> {
    let mut head = Vec::with_capacity(HEAD_LEN);
    std::fs::File::open(path)?
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(classify(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_decide_the_format() {
        assert_eq!(classify(&[0x1f, 0x8b, 8, 0]), Magic::Gzip);
        assert_eq!(classify(b"\xfd7zXZ\x00\x00"), Magic::Xz);
        assert_eq!(classify(b"QFI\xfb\x00\x00\x00\x03"), Magic::Qcow2);
        assert_eq!(classify(b"QFI\xfb"), Magic::Qcow2);
        assert_eq!(classify(b"QFI"), Magic::Raw);
        assert_eq!(classify(b"KDMV\x01"), Magic::Unsupported("VMDK"));
        assert_eq!(
            classify(b"# Disk DescriptorFile\n"),
            Magic::Unsupported("VMDK")
        );
        assert_eq!(classify(b"vhdxfile"), Magic::Unsupported("VHDX"));
        assert_eq!(classify(b"conectix"), Magic::Unsupported("VHD"));
        assert_eq!(classify(b"BZh91AY"), Magic::Unsupported("bzip2"));
        assert_eq!(
            classify(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Magic::Unsupported("zstd")
        );
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(classify(&vdi), Magic::Unsupported("VDI"));
        assert_eq!(classify(b"hello\n"), Magic::Raw);
        assert_eq!(classify(b""), Magic::Raw);
        assert_eq!(classify(b"BZh"), Magic::Raw);
    }

    #[test]
    fn only_qcow2_changes_a_disk_format() {
        assert_eq!(Magic::Qcow2.disk_format(), ImageFormat::Qcow2);
        for m in [
            Magic::Raw,
            Magic::Gzip,
            Magic::Xz,
            Magic::Unsupported("VMDK"),
        ] {
            assert_eq!(m.disk_format(), ImageFormat::Raw);
        }
    }

    #[test]
    fn sniff_reads_the_head_of_a_file() {
        let dir = std::env::temp_dir().join(format!("vl-sniff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (q, vdi, short) = (dir.join("q"), dir.join("vdi"), dir.join("short"));
        let mut big = b"QFI\xfb".to_vec();
        big.resize(1 << 20, 7);
        std::fs::write(&q, &big).unwrap();
        let mut v = vec![0u8; 0x48];
        v[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        std::fs::write(&vdi, &v).unwrap();
        std::fs::write(&short, b"Q").unwrap();
        let got = [sniff(&q).ok(), sniff(&vdi).ok(), sniff(&short).ok()];
        let missing = sniff(&dir.join("none")).unwrap_err().kind();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            got,
            [
                Some(Magic::Qcow2),
                Some(Magic::Unsupported("VDI")),
                Some(Magic::Raw)
            ]
        );
        assert_eq!(missing, std::io::ErrorKind::NotFound);
    }
}
