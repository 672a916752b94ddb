//! Filling a claim's scratch directory with a raw disk image: from HTTP, from another claim,
//! or blank. Everything here writes inside the scratch directory only; the caller renames the
//! result into the claim.
//!
//! Formats are told by magic bytes, never by the URL's name: gzip and xz layers are
//! unpacked (`gzip`/`xz`, up to three layers), then the image is qcow2 (checked with
//! `qemu-img check`, converted with `qemu-img convert`) or raw (used as is). qcow2 images with
//! a backing file or an external data file are refused (they would read host files), as CDI
//! does; VMDK/VDI/VHD(X), bzip2 and zstd are refused with their name.
//!
//! HTTP(S) is [`super::http`] (ureq 3 with rustls): a transfer that breaks is resumed with a
//! Range request. This runs in `virt-launcher-import`, never in the long-running launcher.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::http::{self, FetchError, RequestSource, CHUNK};
use super::progress::{Progress, ProgressStyle};
use super::DataVolumeError;
use crate::pod::image::{self, Magic};
use crate::pod::process::{Command, Output, ProcessError, Stdio};

/// Where and for whom an import runs.
pub(crate) struct Job<'a> {
    pub dv: &'a str,
    pub style: ProgressStyle,
    /// The claim's scratch directory (empty when the job starts).
    pub staging: &'a Path,
    /// Where the claim's usable size comes from (for "too large" errors).
    pub size_hint: &'a str,
    /// The DataVolume's `spec.source` as written, when a download it makes may be resumed by
    /// a later run (http and s3 sources).
    pub source: Option<&'a serde_json::Value>,
}

/// The downloaded file in the staging directory, and its resume record
/// ([`http::Partial`]): the two things an interrupted import leaves for the next run.
pub(crate) const DOWNLOAD: &str = "download";
pub(crate) const RESUME_RECORD: &str = "download.json";

impl Job<'_> {
    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> DataVolumeError {
        let dv = self.dv.to_string();
        let path = path.to_path_buf();
        move |e| DataVolumeError::Io {
            dv,
            path,
            reason: io_reason(&e),
        }
    }

    fn image(&self, reason: impl Into<String>) -> DataVolumeError {
        DataVolumeError::Image {
            dv: self.dv.to_string(),
            reason: reason.into(),
        }
    }

    fn tool(&self, source: ProcessError) -> DataVolumeError {
        DataVolumeError::Tool {
            dv: self.dv.to_string(),
            source,
        }
    }
}

/// `io::Error` text without the " (os error N)" tail.
pub(crate) fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Tool output as one line.
pub(crate) fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let more = lines.len().saturating_sub(3);
    lines.truncate(3);
    let mut s = lines.join("; ");
    if more > 0 {
        s += &format!(" (and {more} more lines)");
    }
    s
}

// ------------------------------------------------------------------------------ formats

fn sniff_file(job: &Job, path: &Path) -> Result<Magic, DataVolumeError> {
    image::sniff(path).map_err(job.io(path))
}

// ------------------------------------------------------------------------------ http

/// GET into `dest` through `agent` (resuming a broken transfer, see [`http::fetch`]), with
/// progress. Returns the length.
fn download(
    job: &Job,
    shown_url: &str,
    agent: &ureq::Agent,
    source: &dyn RequestSource,
    dest: &Path,
) -> Result<u64, DataVolumeError> {
    let fail = |reason: String| DataVolumeError::Download {
        dv: job.dv.to_string(),
        url: shown_url.to_string(),
        reason,
    };
    let record_path = job.staging.join(RESUME_RECORD);
    let mut progress: Option<Progress> = None;
    let record = job.source.map(|source| http::ResumeRecord {
        path: &record_path,
        source,
    });
    let written = http::fetch(agent, source, dest, record.as_ref(), |done, total| {
        let p = progress
            .get_or_insert_with(|| Progress::resumed(job.dv, "download", total, done, job.style));
        p.set_total(total);
        p.set(done)
    })
    .map_err(|e| match e {
        FetchError::Remote(reason) => fail(reason),
        FetchError::Local(e) => job.io(dest)(e),
    })?;
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    if written == 0 {
        return Err(fail("the server sent an empty file".into()));
    }
    Ok(written)
}

// ------------------------------------------------------------------------------ tools

/// Run `tool args…` with `input` on stdin (progress by bytes fed) and stdout to `out`.
fn pipe_through(
    job: &Job,
    tool: &'static str,
    args: &[&str],
    input: &Path,
    out: &Path,
    phase: &'static str,
) -> Result<(), DataVolumeError> {
    let mut src = File::open(input).map_err(job.io(input))?;
    let len = src.metadata().map_err(job.io(input))?.len();
    let dst = File::create(out).map_err(job.io(out))?;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(dst)
        .spawn()
        .map_err(|e| job.tool(e))?;
    let mut progress = Progress::new(job.dv, phase, Some(len), job.style);
    let mut feed_error = None;
    if let Some(mut stdin) = child.stdin.take() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    feed_error = Some(job.io(input)(e));
                    break;
                }
            };
            // A tool that stops reading (bad data) closes the pipe: its exit status says why.
            if stdin.write_all(&buf[..n]).is_err() {
                break;
            }
            progress.add(n as u64);
        }
    }
    let out = child.wait_with_output().map_err(|e| job.tool(e))?;
    if !out.success() {
        return Err(job.image(format!(
            "{tool} cannot unpack it: {}",
            if out.stderr.is_empty() {
                out.exit.to_string()
            } else {
                one_line(&out.stderr)
            }
        )));
    }
    if let Some(e) = feed_error {
        return Err(e);
    }
    progress.finish();
    Ok(())
}

fn qemu_img(job: &Job, args: &[&std::ffi::OsStr]) -> Result<Output, DataVolumeError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| job.tool(e))
}

/// Validate a qcow2 image and return its virtual size.
fn check_qcow2(job: &Job, path: &Path) -> Result<u64, DataVolumeError> {
    let out = qemu_img(
        job,
        &[
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ],
    )?;
    if !out.success() {
        return Err(job.image(format!(
            "not a valid qcow2 image: {}",
            strip_qemu_prefix(&one_line(&out.stderr))
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| job.image(format!("qemu-img info printed no JSON: {e}")))?;
    if let Some(b) = info.get("backing-filename").and_then(|v| v.as_str()) {
        return Err(job.image(format!(
            "the qcow2 image has a backing file ({b:?}); only self-contained images are imported"
        )));
    }
    if let Some(d) = info
        .pointer("/format-specific/data/data-file")
        .and_then(|v| v.as_str())
    {
        return Err(job.image(format!(
            "the qcow2 image has an external data file ({d:?}); only self-contained images are imported"
        )));
    }
    let size = info
        .get("virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| job.image("qemu-img info reports no virtual size"))?;

    let out = qemu_img(
        job,
        &[
            "check".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ],
    )?;
    // 0: clean, 3: leaked clusters only (harmless), 2: corruptions, 1: check failed.
    match out.exit.code() {
        Some(0) | Some(3) => Ok(size),
        Some(2) => {
            let n = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get("corruptions").and_then(|c| c.as_u64()))
                .unwrap_or(0);
            Err(job.image(format!(
                "the qcow2 image is corrupt or truncated (qemu-img check found {n} corruptions)"
            )))
        }
        _ => Err(job.image(format!(
            "the qcow2 image cannot be checked ({}): {}",
            out.exit,
            strip_qemu_prefix(&one_line(&out.stderr))
        ))),
    }
}

/// `qemu-img: Could not open '/long/path': reason` → `reason`.
fn strip_qemu_prefix(s: &str) -> String {
    let s = s.strip_prefix("qemu-img: ").unwrap_or(s);
    match (s.starts_with("Could not open '"), s.find("': ")) {
        (true, Some(i)) => s[i + 3..].to_string(),
        _ => s.to_string(),
    }
}

/// `qemu-img convert -p`, its percentage relayed as progress.
fn convert_qcow2(
    job: &Job,
    src: &Path,
    dst: &Path,
    virtual_size: u64,
) -> Result<(), DataVolumeError> {
    let mut child = Command::new("qemu-img")
        .args(["convert", "-p", "-f", "qcow2", "-O", "raw"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| job.tool(e))?;
    let mut progress = Progress::new(job.dv, "convert", Some(virtual_size), job.style);
    if let Some(mut out) = child.stdout.take() {
        // Lines like "    (42.05/100%)\r".
        let mut buf = [0u8; 256];
        let mut pending = String::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(i) = pending.find(['\r', '\n']) {
                let line: String = pending.drain(..=i).collect();
                if let Some(pct) = line
                    .trim()
                    .strip_prefix('(')
                    .and_then(|s| s.split('/').next())
                    .and_then(|s| s.parse::<f64>().ok())
                {
                    progress.set((virtual_size as f64 * pct / 100.0) as u64);
                }
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| job.tool(e))?;
    if !out.success() {
        return Err(job.image(format!(
            "qemu-img cannot convert it: {}",
            strip_qemu_prefix(&one_line(&out.stderr))
        )));
    }
    progress.set(virtual_size);
    progress.finish();
    Ok(())
}

// ------------------------------------------------------------------------------ sources

fn too_large(job: &Job, virtual_size: u64, usable: u64) -> DataVolumeError {
    DataVolumeError::TooLarge {
        dv: job.dv.to_string(),
        virtual_size,
        usable,
        hint: job.size_hint.to_string(),
    }
}

/// Download, unpack and convert an image (`shown_url` in messages) into `<staging>/disk.img`
/// (raw, length `target`).
pub(crate) fn from_remote(
    job: &Job,
    shown_url: &str,
    agent: &ureq::Agent,
    source: &dyn RequestSource,
    target: u64,
) -> Result<PathBuf, DataVolumeError> {
    let current = job.staging.join(DOWNLOAD);
    let size = download(job, shown_url, agent, source, &current)?;
    tracing::info!(
        dataVolume = job.dv,
        url = shown_url,
        bytes = size,
        "downloaded"
    );
    from_file(job, current, target)
}

/// Unpack and convert the downloaded `current` (in the staging directory) into
/// `<staging>/disk.img` (raw, at most `target` bytes of virtual size).
pub(crate) fn from_file(
    job: &Job,
    mut current: PathBuf,
    target: u64,
) -> Result<PathBuf, DataVolumeError> {
    let mut layer = 0;
    let (virtual_size, format) = loop {
        match sniff_file(job, &current)? {
            magic @ (Magic::Gzip | Magic::Xz) => {
                layer += 1;
                if layer > 3 {
                    return Err(job.image("more than three compression layers"));
                }
                let (tool, name) = if magic == Magic::Gzip {
                    ("gzip", "gzip")
                } else {
                    ("xz", "xz")
                };
                let next = job.staging.join(format!("unpacked-{layer}"));
                tracing::info!(dataVolume = job.dv, format = name, "unpacking");
                pipe_through(job, tool, &["-dc"], &current, &next, "unpack")?;
                fs::remove_file(&current).map_err(job.io(&current))?;
                current = next;
            }
            Magic::Qcow2 => break (check_qcow2(job, &current)?, "qcow2"),
            Magic::Raw => {
                let len = fs::metadata(&current).map_err(job.io(&current))?.len();
                if len == 0 {
                    return Err(job.image("it unpacks to an empty file"));
                }
                break (len, "raw");
            }
            Magic::Unsupported(name) => {
                return Err(job.image(format!(
                    "{name} is not supported (standalone import takes raw or qcow2, optionally gzip- or xz-compressed)"
                )))
            }
        }
    };
    if virtual_size > target {
        return Err(too_large(job, virtual_size, target));
    }
    let disk = job.staging.join("disk.img");
    if format == "qcow2" {
        tracing::info!(dataVolume = job.dv, virtual_size, "converting qcow2 to raw");
        convert_qcow2(job, &current, &disk, virtual_size)?;
        fs::remove_file(&current).map_err(job.io(&current))?;
    } else {
        fs::rename(&current, &disk).map_err(job.io(&disk))?;
    }
    Ok(disk)
}

/// Pull the disk of the registry image `url` (`docker://…`) and unpack and convert it into
/// `<staging>/disk.img` (raw, at most `target` bytes of virtual size).
pub(crate) fn from_registry(
    job: &Job,
    agent: &ureq::Agent,
    url: &str,
    credentials: Option<super::registry::Credentials>,
    target: u64,
) -> Result<PathBuf, DataVolumeError> {
    use super::registry::{Client, ImageRef, RegistryError};
    let fail = |e: RegistryError| match e {
        RegistryError::TooLarge { size, limit } => too_large(job, size, limit),
        other => DataVolumeError::Download {
            dv: job.dv.to_string(),
            url: url.to_string(),
            reason: other.to_string(),
        },
    };
    let image = ImageRef::parse(url).map_err(fail)?;
    let mut client = Client::new(agent, image.clone(), credentials);
    let manifest = client.manifest().map_err(fail)?;
    tracing::info!(dataVolume = job.dv, image = %image, digest = %manifest.digest,
        layers = manifest.layers.len(), "pulling the image's disk");
    let dest = job.staging.join("download");
    let mut progress = Progress::new(job.dv, "download", None, job.style);
    let disk = client
        .extract_disk(&manifest, &dest, Some(target), &mut |done, total| {
            progress.set_total(total);
            progress.set(done);
        })
        .map_err(fail)?;
    progress.finish();
    tracing::info!(dataVolume = job.dv, file = %disk.name, bytes = disk.bytes, "pulled");
    from_file(job, dest, target)
}

/// Copy the image of another claim into `<staging>/disk.img`; `None` target = the source's size.
pub(crate) fn from_claim(
    job: &Job,
    source: &Path,
    target: Option<u64>,
) -> Result<(PathBuf, u64), DataVolumeError> {
    let mut src = File::open(source).map_err(job.io(source))?;
    let len = src.metadata().map_err(job.io(source))?.len();
    let target = target.unwrap_or(len);
    if len > target {
        return Err(too_large(job, len, target));
    }
    let disk = job.staging.join("disk.img");
    let mut dst = File::create(&disk).map_err(job.io(&disk))?;
    let mut progress = Progress::new(job.dv, "clone", Some(len), job.style);
    // Copy only the data extents of a sparse source (SEEK_DATA/SEEK_HOLE).
    let mut pos = 0u64;
    while pos < len {
        let data = match seek_data(&src, pos) {
            Some(d) if d < len => d,
            Some(_) => break,
            None => pos,
        };
        let end = seek_hole(&src, data).unwrap_or(len).min(len);
        src.seek(SeekFrom::Start(data)).map_err(job.io(source))?;
        dst.seek(SeekFrom::Start(data)).map_err(job.io(&disk))?;
        let mut range = (&mut src).take(end - data);
        http::sparse_copy(&mut range, &mut dst, |_| {}).map_err(|e| match e {
            http::CopyError::Read(e) => job.io(source)(e),
            http::CopyError::Write(e) => job.io(&disk)(e),
        })?;
        progress.set(end);
        pos = end.max(data + 1);
    }
    progress.set(len);
    progress.finish();
    Ok((disk, target))
}

fn seek_data(f: &File, pos: u64) -> Option<u64> {
    use nix::unistd::{lseek, Whence};
    match lseek(f.as_fd(), i64::try_from(pos).ok()?, Whence::SeekData) {
        Ok(off) => u64::try_from(off).ok(),
        // ENXIO: no data after pos.
        Err(nix::errno::Errno::ENXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

fn seek_hole(f: &File, pos: u64) -> Option<u64> {
    use nix::unistd::{lseek, Whence};
    lseek(f.as_fd(), i64::try_from(pos).ok()?, Whence::SeekHole)
        .ok()
        .and_then(|o| u64::try_from(o).ok())
}

/// An empty `<staging>/disk.img`.
pub(crate) fn blank(job: &Job) -> Result<PathBuf, DataVolumeError> {
    let disk = job.staging.join("disk.img");
    File::create(&disk).map_err(job.io(&disk))?;
    Ok(disk)
}

/// Give the image its final length (sparse growth), allocate it if asked, and fsync it.
pub(crate) fn finish(
    job: &Job,
    disk: &Path,
    target: u64,
    preallocate: bool,
) -> Result<(), DataVolumeError> {
    let f = OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(job.io(disk))?;
    f.set_len(target).map_err(job.io(disk))?;
    if preallocate {
        let len = i64::try_from(target).map_err(|_| job.image("size out of range"))?;
        nix::fcntl::posix_fallocate(f.as_fd(), 0, len)
            .map_err(|e| job.io(disk)(io::Error::from(e)))?;
    }
    f.sync_all().map_err(job.io(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_prefix_is_trimmed() {
        assert_eq!(
            strip_qemu_prefix("qemu-img: Could not open '/x/y': Image is not in qcow2 format"),
            "Image is not in qcow2 format"
        );
        assert_eq!(strip_qemu_prefix("other"), "other");
    }
}
