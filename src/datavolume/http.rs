//! HTTP(S) for imports: one agent constructor ([`http_agent`]) that every source fetching over
//! the network uses (http, s3, registry), and a resumable GET into a file ([`fetch`]).
//!
//! TLS is rustls (with *ring*) through ureq's `rustls` feature. The trusted roots are the
//! system's (`/etc/ssl/certs`, read by `rustls-native-certs`, as curl and CDI's Go importer use
//! them: an administrator's added CA counts) plus, when a DataVolume names a `certConfigMap`,
//! the certificates of its `ca.pem` — added to the system roots, as CDI does.
//!
//! This module is linked only into `virt-launcher-import`, the process that imports: the
//! long-running launcher never maps or touches TLS code (see `src/bin/virt-launcher-import.rs`).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// What a connection trusts.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM certificates (a `certConfigMap`'s `ca.pem`) trusted besides the system roots.
    pub extra_ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the CA bundle holds no PEM certificate")]
    NoCertificate,
    #[error("the CA bundle is not valid PEM: {0}")]
    BadPem(String),
}

/// The HTTP agent of imports: HTTP/1.1, TLS with the system roots plus `tls`'s, redirects,
/// `HTTP(S)_PROXY`/`NO_PROXY`, statuses returned (not errors), generous timeouts per step and
/// none overall (an image may take long).
pub fn http_agent(tls: &TlsOptions) -> Result<ureq::Agent, TlsError> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    if let Some(pem) = &tls.extra_ca_pem {
        for item in ureq::tls::parse_pem(pem) {
            if let PemItem::Certificate(c) = item.map_err(|e| TlsError::BadPem(e.to_string()))? {
                roots.push(c);
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificate);
        }
    }
    // A system without a CA store (or with unreadable entries) still trusts what it has and
    // the DataVolume's CA: the handshake then names the unknown issuer.
    let system = rustls_native_certs::load_native_certs();
    for e in &system.errors {
        tracing::debug!(error = %e, "a system CA certificate could not be read");
    }
    roots.extend(
        system
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
    );
    let tls_config = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls_config)
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .max_redirects(10)
        .user_agent(concat!("virt-launcher/", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}

/// `ureq::Error` as a short reason (TLS failures say what was wrong with the certificate).
pub fn reason(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io_text(io),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::TooManyRedirects => "too many redirects".into(),
        ureq::Error::Rustls(r) => tls_text(r),
        other => other.to_string(),
    }
}

fn tls_text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(_) => format!(
            "TLS: {e} (trusted are the system's CA certificates and the certConfigMap's ca.pem)"
        ),
        _ => format!("TLS: {e}"),
    }
}

fn io_text(e: &io::Error) -> String {
    // A TLS alert or certificate error surfaces as an io::Error wrapping rustls's.
    if let Some(inner) = e.get_ref() {
        if let Some(r) = inner.downcast_ref::<ureq::Error>() {
            return reason(r);
        }
        if let Some(r) = inner.downcast_ref::<rustls::Error>() {
            return tls_text(r);
        }
    }
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A GET to make: the URL and headers of each attempt (an S3 request is signed afresh for
/// each); [`fetch`] adds `Range` and `If-Range` when it resumes.
pub trait RequestSource {
    fn request(&self) -> Result<(String, Vec<(String, String)>), String>;
}

/// A GET of a fixed URL with fixed headers.
pub struct Plain {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl RequestSource for Plain {
    fn request(&self) -> Result<(String, Vec<(String, String)>), String> {
        Ok((self.url.clone(), self.headers.clone()))
    }
}

/// Why [`fetch`] failed.
#[derive(Debug)]
pub enum FetchError {
    /// The server or the transfer (the reason, one line).
    Remote(String),
    /// Writing the file.
    Local(io::Error),
}

/// How many times a broken transfer is resumed (or restarted, when the server ignores Range).
pub const ATTEMPTS: u32 = 5;

/// How often the resume record is rewritten while bytes arrive.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// How often the download is flushed to disk (`fdatasync`) so that the record's `synced`
/// offset survives a crash of the machine. The kernel writes dirty pages back after 30 s
/// anyway; a short import (a loopback server) never pays for it.
const SYNC_EVERY: Duration = Duration::from_secs(15);

/// Where an interrupted download stands: `<download>.json` beside the partial file, so that
/// a later run (the import was killed: SIGKILL, SIGTERM to the launcher, a crash) resumes it
/// with a Range request instead of starting over. Only ever renamed into place whole.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Partial {
    /// What is being downloaded (the DataVolume's `spec.source`, as written): another source
    /// is not resumed.
    pub source: serde_json::Value,
    /// The first response's `ETag` (or `Last-Modified`), sent as `If-Range`: a file that
    /// changed on the server since comes back whole (200) and the download starts over.
    pub validator: String,
    /// The announced length.
    pub total: Option<u64>,
    /// Bytes written (at least into the page cache) during the boot `boot_id`.
    pub bytes: u64,
    pub boot_id: String,
    /// Bytes known to be on disk (fdatasync'd): what a run after a reboot resumes from.
    pub synced: u64,
}

/// The download's resume record: its path and what it must be about.
pub struct ResumeRecord<'a> {
    pub path: &'a Path,
    pub source: &'a serde_json::Value,
}

impl ResumeRecord<'_> {
    /// The offset a partial `dest` can be resumed from (its record, the same source, a
    /// validator; the page cache's bytes when the machine has not rebooted since, else the
    /// synced ones), or why it cannot.
    fn resumable(&self, dest: &Path) -> Result<Partial, String> {
        let text = std::fs::read(self.path).map_err(|_| {
            "no record of where it stopped (an import made before records were kept)"
        })?;
        let p: Partial = serde_json::from_slice(&text).map_err(|_| "its record is unreadable")?;
        if &p.source != self.source {
            return Err("the DataVolume's source changed".into());
        }
        if !dest.is_file() {
            return Err("the partial file is gone".into());
        }
        let mut p = p;
        if p.boot_id != boot_id() {
            tracing::info!(
                bytes = p.bytes,
                synced = p.synced,
                "the machine restarted since the download was interrupted; resuming from what was flushed to disk"
            );
            p.bytes = p.synced;
        }
        if p.total.is_some_and(|t| p.bytes > t) {
            return Err("its record is inconsistent".into());
        }
        Ok(p)
    }

    fn write(&self, p: &Partial) -> io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(p).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, self.path)
    }
}

/// This boot of the machine (`/proc/sys/kernel/random/boot_id`): the page cache of a killed
/// process's writes is good within it.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// GET into `dest`, sparsely: all-zero 4 KiB blocks become holes. A transfer that breaks is
/// resumed with `Range: bytes=N-` (and `If-Range` with the first response's `ETag` or
/// `Last-Modified`), up to [`ATTEMPTS`] times; a server that answers the range with a whole
/// `200` restarts the file. With a `record`, where the download stands is kept beside it
/// ([`Partial`]), and a partial `dest` left by an earlier run that was killed is resumed the
/// same way (else `dest` is started afresh). `on_progress(done, total)` sees absolute byte
/// counts. Returns the length.
pub fn fetch(
    agent: &ureq::Agent,
    source: &dyn RequestSource,
    dest: &Path,
    record: Option<&ResumeRecord>,
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> Result<u64, FetchError> {
    let earlier = match record {
        Some(r) if dest.exists() => match r.resumable(dest) {
            Ok(p) => Some(p),
            Err(why) => {
                tracing::info!(
                    reason = %why,
                    "an interrupted download cannot be resumed; starting over"
                );
                None
            }
        },
        _ => None,
    };
    let mut out = match &earlier {
        Some(_) => std::fs::OpenOptions::new().write(true).open(dest),
        None => File::create(dest),
    }
    .map_err(FetchError::Local)?;
    let mut done = 0u64;
    let mut total: Option<u64> = None;
    let mut validator: Option<String> = None;
    let mut synced = 0u64;
    if let Some(p) = earlier {
        out.set_len(p.bytes).map_err(FetchError::Local)?;
        (done, total, validator, synced) =
            (p.bytes, p.total, Some(p.validator), p.synced.min(p.bytes));
        tracing::info!(
            offset = done,
            total,
            "resuming the download an earlier run left"
        );
    }
    let boot = boot_id();
    let save = |done: u64, total: Option<u64>, validator: &Option<String>, synced: u64| {
        let (Some(r), Some(v)) = (record, validator) else {
            return;
        };
        let p = Partial {
            source: r.source.clone(),
            validator: v.clone(),
            total,
            bytes: done,
            boot_id: boot.clone(),
            synced,
        };
        if let Err(e) = r.write(&p) {
            tracing::debug!(error = %e, "the resume record could not be written");
        }
    };
    // An earlier run that had the whole file (killed while converting) needs no request.
    if let (Some(t), true) = (total, validator.is_some()) {
        if done == t && t > 0 {
            on_progress(done, total);
            return Ok(done);
        }
    }
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        let (url, headers) = source.request().map_err(FetchError::Remote)?;
        let mut req = agent.get(&url);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resuming = done > 0;
        if resuming {
            req = req.header("Range", format!("bytes={done}-"));
            if let Some(v) = &validator {
                req = req.header("If-Range", v.as_str());
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The first connection's failure is the answer (refused, TLS, DNS); a later one may
            // be a server restarting: try again.
            Err(e) if attempt == 0 => return Err(FetchError::Remote(reason(&e))),
            Err(e) => {
                last_error = reason(&e);
                std::thread::sleep(backoff(attempt));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match (status, resuming) {
            (200, _) => {
                if resuming {
                    tracing::info!(
                        offset = done,
                        "the server sent the whole file instead of the rest (it ignores ranges, or the file changed); starting the file over"
                    );
                    done = 0;
                    synced = 0;
                    out.set_len(0).map_err(FetchError::Local)?;
                }
                total = resp.body().content_length();
                validator = header("etag").or_else(|| header("last-modified"));
                save(done, total, &validator, synced);
            }
            (416, true) => {
                // The file shrank on a server that ignores If-Range: start over.
                tracing::info!(
                    offset = done,
                    "the server cannot resume at this offset; starting the file over"
                );
                (done, synced, validator) = (0, 0, None);
                out.set_len(0).map_err(FetchError::Local)?;
                continue;
            }
            (206, true) => {
                let range = header("content-range").unwrap_or_default();
                if !range.starts_with(&format!("bytes {done}-")) {
                    return Err(FetchError::Remote(format!(
                        "the server resumed at the wrong offset ({range:?}, wanted byte {done})"
                    )));
                }
                tracing::info!(offset = done, attempt, "resuming the download");
            }
            _ => {
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(16 << 10)
                    .read_to_string()
                    .unwrap_or_default();
                return Err(FetchError::Remote(
                    status_text(status) + &error_detail(&body),
                ));
            }
        }
        out.seek(SeekFrom::Start(done)).map_err(FetchError::Local)?;
        on_progress(done, total);
        let mut body = resp.into_body().into_reader();
        // A second handle on the file, to flush it while the copy holds the first.
        let flusher = out.try_clone().map_err(FetchError::Local)?;
        let (mut recorded, mut flushed) = (std::time::Instant::now(), std::time::Instant::now());
        let copied = sparse_copy(&mut body, &mut out, |n| {
            done += n;
            on_progress(done, total);
            if record.is_some() && recorded.elapsed() >= RECORD_EVERY {
                if flushed.elapsed() >= SYNC_EVERY && flusher.sync_data().is_ok() {
                    synced = done;
                    flushed = std::time::Instant::now();
                }
                save(done, total, &validator, synced);
                recorded = std::time::Instant::now();
            }
        });
        match copied {
            Ok(()) => {}
            Err(CopyError::Write(e)) => return Err(FetchError::Local(e)),
            Err(CopyError::Read(e)) => {
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                last_error = format!(
                    "transfer interrupted after {done}{of} bytes: {}",
                    io_text(&e)
                );
                tracing::warn!(bytes = done, total, error = %last_error, "the transfer broke");
                save(done, total, &validator, synced);
                std::thread::sleep(backoff(attempt));
                continue;
            }
        }
        match total {
            Some(t) if done < t => {
                last_error = format!("transfer ended after {done} of {t} bytes");
                tracing::warn!(bytes = done, total = t, "the transfer ended early");
                save(done, total, &validator, synced);
                std::thread::sleep(backoff(attempt));
                continue;
            }
            Some(t) if done > t => {
                return Err(FetchError::Remote(format!(
                    "the server sent {done} bytes, more than the {t} it announced"
                )))
            }
            _ => {}
        }
        out.set_len(done).map_err(FetchError::Local)?;
        // Complete: a run killed while converting starts from the whole file.
        save(done, Some(done), &validator, synced);
        return Ok(done);
    }
    Err(FetchError::Remote(format!(
        "{last_error} (gave up after {ATTEMPTS} attempts)"
    )))
}

/// `: Code: Message` of an S3-style XML error body, if it is one.
fn error_detail(body: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) if !m.is_empty() => format!(": {c}: {m}"),
        (Some(c), _) => format!(": {c}"),
        _ => String::new(),
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

/// `HTTP 404 Not Found`.
pub fn status_text(status: u16) -> String {
    let reason = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("HTTP {status} {reason}").trim_end().to_string()
}

pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

const BLOCK: usize = 4096;
pub(crate) const CHUNK: usize = 1 << 20;

/// Copy `src` to `dst` (at its current position), seeking over all-zero 4 KiB blocks instead
/// of writing them; `on_progress` gets each chunk's length once it is written. The caller sets
/// the final length (a trailing hole is not written).
pub(crate) fn sparse_copy(
    src: &mut impl Read,
    dst: &mut File,
    mut on_progress: impl FnMut(u64),
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Fill the buffer as far as the source allows, so blocks stay aligned.
        let mut filled = 0;
        let mut read_error = None;
        while filled < CHUNK {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        // What arrived before a broken read is kept: a resume starts after it.
        write_sparse(dst, &buf[..filled]).map_err(CopyError::Write)?;
        if filled > 0 {
            on_progress(filled as u64);
        }
        if let Some(e) = read_error {
            return Err(CopyError::Read(e));
        }
        if filled < CHUNK {
            return Ok(());
        }
    }
}

/// Write `data` at `dst`'s position, seeking over its all-zero 4 KiB blocks: one `write`
/// per run of data blocks and one seek per run of zero blocks (a write per block cost 49 000
/// syscalls for a 200 MiB image).
fn write_sparse(dst: &mut File, data: &[u8]) -> io::Result<()> {
    let mut start = 0;
    while start < data.len() {
        let zero = is_zero(&data[start..(start + BLOCK).min(data.len())]);
        let mut end = start;
        while end < data.len() {
            let block = &data[end..(end + BLOCK).min(data.len())];
            if is_zero(block) != zero {
                break;
            }
            end += block.len();
        }
        if zero {
            dst.seek(SeekFrom::Current((end - start) as i64))?;
        } else {
            dst.write_all(&data[start..end])?;
        }
        start = end;
    }
    Ok(())
}

/// All zero bytes? (Compared 16 bytes at a time.)
fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_skips_zeros() {
        let dir = std::env::temp_dir().join(format!("vl-dv-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut data = vec![0u8; 3 * CHUNK + 100];
        data[..5].copy_from_slice(b"hello");
        data[2 * CHUNK + 7] = 1;
        let last = data.len() - 1;
        data[last] = 9;
        let path = dir.join("out");
        let mut out = File::create(&path).expect("create");
        let mut seen = 0;
        sparse_copy(&mut &data[..], &mut out, |k| seen += k)
            .unwrap_or_else(|_| panic!("copy failed"));
        assert_eq!(seen, data.len() as u64);
        out.set_len(seen).expect("len");
        assert_eq!(std::fs::read(&path).expect("read"), data);
        // The zero runs are holes: a few 4 KiB blocks of data are allocated, not 3 MiB.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(allocated < CHUNK as u64, "{allocated} bytes allocated");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zero_blocks_are_told_from_data_at_every_offset() {
        assert!(is_zero(&[0u8; BLOCK]));
        assert!(is_zero(&[0u8; 7]));
        for i in [0, 15, 16, 17, BLOCK - 1] {
            let mut b = [0u8; BLOCK];
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
        }
        let mut short = [0u8; 21];
        short[20] = 1;
        assert!(!is_zero(&short));
    }

    /// A read that fails midway keeps (and counts) what came before it.
    #[test]
    fn sparse_copy_keeps_what_arrived_before_a_broken_read() {
        struct Breaks(Vec<u8>, usize);
        impl Read for Breaks {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 >= self.0.len() {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
                }
                let n = buf.len().min(self.0.len() - self.1).min(1000);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let dir = std::env::temp_dir().join(format!("vl-dv-broken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("out");
        let mut out = File::create(&path).expect("create");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut seen = 0;
        let r = sparse_copy(&mut Breaks(data.clone(), 0), &mut out, |k| seen += k);
        assert!(matches!(r, Err(CopyError::Read(_))));
        assert_eq!(seen, 5000);
        assert_eq!(std::fs::read(&path).expect("read"), data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What a later run resumes from: the recorded bytes in the same boot, the flushed ones
    /// after a reboot; nothing for another source, an inconsistent record or a lost file.
    #[test]
    fn a_partial_download_resumes_from_its_record() {
        let dir = std::env::temp_dir().join(format!("vl-dv-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (dest, path) = (dir.join("download"), dir.join("download.json"));
        let source = serde_json::json!({"http": {"url": "https://example.org/disk.img"}});
        let record = ResumeRecord {
            path: &path,
            source: &source,
        };
        let partial = Partial {
            source: source.clone(),
            validator: "\"v1\"".into(),
            total: Some(1000),
            bytes: 700,
            boot_id: boot_id(),
            synced: 300,
        };
        std::fs::write(&dest, [1u8; 500]).expect("write");
        assert!(record.resumable(&dest).is_err(), "no record yet");
        record.write(&partial).expect("record");
        assert_eq!(record.resumable(&dest).map(|p| p.bytes), Ok(700));
        record
            .write(&Partial {
                boot_id: "another-boot".into(),
                ..partial.clone()
            })
            .expect("record");
        assert_eq!(record.resumable(&dest).map(|p| p.bytes), Ok(300));
        record
            .write(&Partial {
                bytes: 1001,
                ..partial.clone()
            })
            .expect("record");
        assert!(record.resumable(&dest).is_err());
        let other = serde_json::json!({"http": {"url": "https://example.org/other.img"}});
        record.write(&partial).expect("record");
        let moved = ResumeRecord {
            path: &path,
            source: &other,
        };
        assert!(moved.resumable(&dest).is_err());
        std::fs::remove_file(&dest).expect("rm");
        assert!(record.resumable(&dest).is_err(), "the partial file is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused() {
        let tls = TlsOptions {
            extra_ca_pem: Some(b"not a certificate\n".to_vec()),
        };
        assert!(matches!(http_agent(&tls), Err(TlsError::NoCertificate)));
    }
}
