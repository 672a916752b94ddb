//! Standalone DataVolumes end to end: `virt-launcher run --vm` imports each DataVolume of a
//! VirtualMachine into a claim under `--storage-dir` (from an HTTP server on 127.0.0.1 that the
//! test runs, from another claim, or blank) and boots the real TCG test guest on them; the guest
//! prints the first line of each disk (`lv.read=<dev>` → `LV-READ <dev> <line>`).
//!
//! No external network: every image is made here (`qemu-img`, `gzip`, `xz`) and served by
//! [`Server`].

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{guest_dir, guest_vm_yaml as vm_yaml, Pod};
use nix::sys::signal::Signal;
use virt_launcher::datavolume::claim_is_shared;

const MIB: u64 = 1 << 20;
const BOOT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------ HTTP server

/// How the server answers a path. `File` and `Flaky` honour `Range: bytes=N-` (206).
#[derive(Clone)]
enum Route {
    /// 200 with the whole body.
    File(Arc<Vec<u8>>),
    /// 200 announcing the whole length, `chunk` bytes every `pause` (an import to interrupt).
    Slow {
        data: Arc<Vec<u8>>,
        chunk: usize,
        pause: Duration,
    },
    /// 200 announcing the whole length, then the connection closes after `send` bytes
    /// (every time: Range is ignored).
    CutOff { data: Arc<Vec<u8>>, send: usize },
    /// A GET without Range is cut off after `send` bytes; one with Range gets its 206.
    Flaky { data: Arc<Vec<u8>>, send: usize },
    /// `File` behind basic auth (`Authorization: Basic <token>`), else 401.
    Auth { data: Arc<Vec<u8>>, token: String },
}

/// A tiny HTTP/1.1 server on 127.0.0.1, plain or TLS: GET only, one thread per connection,
/// no keep-alive. Unknown paths get 404. Every request head is recorded. A path given an
/// `ETag` ([`Server::etag`]) sends it, and answers a Range request whose `If-Range` names
/// another tag with the whole file (200), as a server whose file changed does.
struct Server {
    port: u16,
    tls: bool,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    requests: Arc<Mutex<Vec<String>>>,
    etags: Arc<Mutex<HashMap<String, String>>>,
}

impl Server {
    fn start() -> Server {
        Server::start_with(None)
    }

    /// An https server presenting `cert` (PEM chain) with `key` (PEM).
    fn start_tls(cert: &[u8], key: &[u8]) -> Server {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .expect("server certificate");
        let key = PrivateKeyDer::from_pem_slice(key).expect("server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        Server::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let etags: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let (r, q, e) = (routes.clone(), requests.clone(), etags.clone());
        let is_tls = tls.is_some();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, q, e, tls) = (r.clone(), q.clone(), e.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = match tls {
                        None => serve(conn, &r, &q, &e),
                        Some(config) => match rustls::ServerConnection::new(config) {
                            Ok(c) => serve(rustls::StreamOwned::new(c, conn), &r, &q, &e),
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        Server {
            port,
            tls: is_tls,
            routes,
            requests,
            etags,
        }
    }

    /// `path` sends `ETag: "<tag>"` from now on.
    fn etag(&self, path: &str, tag: &str) {
        self.etags
            .lock()
            .unwrap()
            .insert(path.to_string(), format!("\"{tag}\""));
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    fn file(&self, path: &str, data: Vec<u8>) -> String {
        self.route(path, Route::File(Arc::new(data)));
        self.url(path)
    }

    /// How many GETs `path` has had.
    fn hits(&self, path: &str) -> usize {
        let want = format!("GET {path} ");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&want))
            .count()
    }

    /// The heads (request line and headers, lower-case names) of the GETs of `path`.
    fn heads(&self, path: &str) -> Vec<String> {
        let want = format!("GET {path} ");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&want))
            .cloned()
            .collect()
    }
}

fn serve(
    conn: impl Read + Write,
    routes: &Mutex<HashMap<String, Route>>,
    requests: &Mutex<Vec<String>>,
    etags: &Mutex<HashMap<String, String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head = request_line.trim().to_string();
    let mut range_from: Option<usize> = None;
    let mut authorization = String::new();
    let mut if_range: Option<String> = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.trim().split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            head += &format!("\n{name}: {value}");
            if name == "range" {
                range_from = value
                    .strip_prefix("bytes=")
                    .and_then(|v| v.strip_suffix('-'))
                    .and_then(|v| v.parse().ok());
            }
            if name == "authorization" {
                authorization = value.to_string();
            }
            if name == "if-range" {
                if_range = Some(value.to_string());
            }
        }
    }
    requests.lock().unwrap().push(head);
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let route = routes.lock().unwrap().get(&path).cloned();
    let etag = etags.lock().unwrap().get(&path).cloned();
    let etag_line = etag
        .as_ref()
        .map(|t| format!("ETag: {t}\r\n"))
        .unwrap_or_default();
    // If-Range naming another version: the whole (changed) file.
    if if_range.is_some() && if_range != etag {
        range_from = None;
    }
    // A GET has no body: what the reader buffered beyond the head is nothing.
    let mut out = reader.into_inner();
    let head = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\n{etag_line}Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
    };
    let whole_or_range = |out: &mut dyn Write, data: &[u8]| -> std::io::Result<()> {
        match range_from {
            Some(from) if from < data.len() => {
                write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                    data.len() - from,
                    data.len() - 1,
                    data.len()
                )?;
                out.write_all(&data[from..])
            }
            _ => {
                out.write_all(head(data.len()).as_bytes())?;
                out.write_all(data)
            }
        }
    };
    match route {
        None => {
            let body = b"not found\n";
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(body)?;
        }
        Some(Route::File(data)) => whole_or_range(&mut out, &data)?,
        Some(Route::Auth { data, token }) => {
            if authorization == format!("Basic {token}") {
                whole_or_range(&mut out, &data)?;
            } else {
                write!(
                    out,
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
            }
        }
        Some(Route::Slow { data, chunk, pause }) => {
            out.write_all(head(data.len()).as_bytes())?;
            for c in data.chunks(chunk) {
                out.write_all(c)?;
                out.flush()?;
                std::thread::sleep(pause);
            }
        }
        Some(Route::CutOff { data, send }) => {
            out.write_all(head(data.len()).as_bytes())?;
            out.write_all(&data[..send])?;
        }
        Some(Route::Flaky { data, send }) => {
            if range_from.is_some() {
                whole_or_range(&mut out, &data)?;
            } else {
                out.write_all(head(data.len()).as_bytes())?;
                out.write_all(&data[..send])?;
            }
        }
    }
    out.flush()
}

// ------------------------------------------------------------------------------ images

/// A raw disk image of `size` bytes: `text\n` at offset 0, a marker at 1 MiB, zeros elsewhere.
fn raw_image(text: &str, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let line = format!("{text}\n");
    v[..line.len()].copy_from_slice(line.as_bytes());
    let mark = format!("data-region-of-{text}");
    v[MIB as usize..MIB as usize + mark.len()].copy_from_slice(mark.as_bytes());
    v
}

/// The image converted with `qemu-img convert -O <format>`.
fn qemu_img_convert(scratch: &Path, raw: &[u8], format: &str) -> Vec<u8> {
    let src = scratch.join("src.raw");
    let dst = scratch.join(format!("out.{format}"));
    fs::create_dir_all(scratch).unwrap();
    fs::write(&src, raw).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", format])
        .arg(&src)
        .arg(&dst)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    let bytes = fs::read(&dst).unwrap();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    bytes
}

fn qcow2(scratch: &Path, raw: &[u8]) -> Vec<u8> {
    let q = qemu_img_convert(scratch, raw, "qcow2");
    assert_eq!(&q[..4], b"QFI\xfb");
    q
}

/// `gzip -c` / `xz -c` of `data`.
fn compress(tool: &str, data: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} failed");
    out.stdout
}

/// FNV-1a over `data`: a checksum to compare the imported data region with the source.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The imported disk holds `source` at its start and zeros after it.
fn assert_disk_holds(disk: &Path, source: &[u8], size: u64) {
    let got = fs::read(disk).unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    assert_eq!(
        got.len() as u64,
        size,
        "{} has the wrong size",
        disk.display()
    );
    assert_eq!(
        checksum(&got[..source.len()]),
        checksum(source),
        "{}: data region differs from the source",
        disk.display()
    );
    assert!(
        got[source.len()..].iter().all(|b| *b == 0),
        "{}: non-zero bytes after the data region",
        disk.display()
    );
}

// ------------------------------------------------------------------------------ the VM

/// An `http` DataVolume template.
fn http_dv(name: &str, url: &str, storage: &str) -> String {
    format!(
        "    - metadata:
        name: {name}
      spec:
        source:
          http:
            url: \"{url}\"
{storage}"
    )
}

/// `pvc:` with a size (Filesystem, ReadWriteOnce).
fn pvc(size: &str) -> String {
    format!(
        "        pvc:
          accessModes:
            - ReadWriteOnce
          resources:
            requests:
              storage: {size}
"
    )
}

struct Vm {
    pod: Pod,
    storage: PathBuf,
    /// More launcher flags.
    extra: Vec<String>,
}

impl Vm {
    fn new(name: &str) -> Vm {
        let pod = Pod::new(name);
        let storage = pod.dir.join("storage");
        Vm {
            pod,
            storage,
            extra: Vec::new(),
        }
    }

    fn vm_path(&self) -> PathBuf {
        self.pod.dir.join("vm.yaml")
    }

    fn write(&self, yaml: &str) {
        fs::write(self.vm_path(), yaml).unwrap();
    }

    fn claim(&self, name: &str) -> PathBuf {
        self.storage.join("claims/default").join(name)
    }

    fn args(&self) -> Vec<String> {
        [
            "run",
            "--vm",
            self.vm_path().to_str().unwrap(),
            "--storage-dir",
            self.storage.to_str().unwrap(),
            "--domain-type",
            "qemu",
            "--json-logs",
            "--runtime-dir",
            self.pod.runtime_dir().to_str().unwrap(),
            "--kernel-boot-dir",
            guest_dir().to_str().unwrap(),
        ]
        .map(String::from)
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// Starts the launcher (a fresh launcher log and console).
    fn start(&mut self) {
        let args = self.args();
        self.pod.start_launcher(&args);
    }

    /// SIGTERM and a clean exit.
    fn stop(&mut self) {
        self.pod.stop_cleanly();
    }

    /// Runs the launcher to completion, expecting it to fail before any VM starts; returns the
    /// error line.
    fn fails(&self) -> String {
        self.pod.fails_before_any_vm(&self.args())
    }

    /// `LV-BLOCK` sizes (sectors) of the guest's disks.
    fn guest_block_sizes(&self) -> HashMap<String, u64> {
        let console = self.pod.console();
        let first = testkit::guest::block_lines(&console).next();
        first
            .unwrap_or_default()
            .into_iter()
            .map(|(d, s)| (d.to_string(), s))
            .collect()
    }
}

impl Drop for Vm {
    /// A failed test still stops its VM the graceful way, with the time an import's clean-up
    /// may take (the pod's own clean-up gives the launcher 15 s).
    fn drop(&mut self) {
        if let Some(child) = self.pod.child.as_mut() {
            testkit::procs::terminate(child, Duration::from_secs(40));
        }
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A claim directory's entries (names), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ------------------------------------------------------------------------------ tests

/// qcow2 over HTTP into a `spec.pvc` Filesystem claim; the guest reads it; a restart reuses the
/// claim without downloading again and the guest's own writes survive.
#[test]
fn http_qcow2_import_boots_and_is_reused_on_restart() {
    let mut vm = Vm::new("dv-qcow2");
    let server = Server::start();
    let raw = raw_image("dv-qcow2-content", 8 * MIB);
    let url = server.file(
        "/images/disk.qcow2",
        qcow2(&vm.pod.dir.join("scratch"), &raw),
    );
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda",
        &http_dv("rootdisk", &url, &pvc("64Mi")),
        &["rootdisk"],
    ));

    vm.start();
    vm.pod.wait_console("LV-READ vda dv-qcow2-content", BOOT);
    // spec.pvc: 64 MiB minus CDI's 5.5 % filesystem overhead, rounded down to 1 MiB = 60 MiB.
    let disk = vm.claim("rootdisk").join("disk.img");
    assert_eq!(
        vm.guest_block_sizes().get("vda"),
        Some(&(60 * MIB / 512)),
        "{}",
        vm.pod.console()
    );
    assert_disk_holds(&disk, &raw, 60 * MIB);
    let meta = read_json(&vm.claim("rootdisk").join("claim.json"));
    assert_eq!(meta["name"], "rootdisk");
    assert_eq!(meta["namespace"], "default");
    assert_eq!(meta["volumeMode"], "Filesystem");
    assert_eq!(meta["accessModes"], serde_json::json!(["ReadWriteOnce"]));
    assert_eq!(meta["shared"], false);
    assert_eq!(meta["size"], 60 * MIB);
    assert_eq!(meta["source"]["http"]["url"], url.as_str());
    assert!(meta["completedAt"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(!claim_is_shared(&vm.storage, "default", "rootdisk"));
    assert_eq!(
        entries(&vm.claim("rootdisk")),
        ["claim.json", "disk.img"],
        "scratch files left in the claim"
    );
    let log = vm.pod.log();
    assert!(
        log.contains("\"message\":\"import progress\"") && log.contains("\"phase\":\"convert\""),
        "no progress lines\n{log}"
    );
    vm.stop();
    assert_eq!(server.hits("/images/disk.qcow2"), 1);

    // The VM's own data lives in the claim; a restart must not import over it.
    let inode = fs::metadata(&disk).unwrap().ino();
    let mut data = fs::read(&disk).unwrap();
    data[..14].copy_from_slice(b"written-by-vm\n");
    fs::write(&disk, &data).unwrap();
    drop(data);
    vm.start();
    vm.pod.wait_console("LV-READ vda written-by-vm", BOOT);
    assert!(
        vm.pod.log().contains("claim complete, reusing it"),
        "{}",
        vm.pod.dump()
    );
    vm.stop();
    assert_eq!(
        server.hits("/images/disk.qcow2"),
        1,
        "the image was downloaded again"
    );
    assert_eq!(fs::metadata(&disk).unwrap().ino(), inode);
}

/// gzip- and xz-compressed qcow2 and raw images, and plain raw, told apart by their bytes (the
/// URLs' names lie on purpose); all four in one VM.
#[test]
fn compressed_and_raw_images_are_detected_by_content() {
    let mut vm = Vm::new("dv-formats");
    let server = Server::start();
    let scratch = vm.pod.dir.join("scratch");
    let images = [
        ("qcow2gz", raw_image("from-qcow2-gz", 6 * MIB), "gzip", true),
        ("rawxz", raw_image("from-raw-xz", 5 * MIB), "xz", false),
        ("qcow2xz", raw_image("from-qcow2-xz", 4 * MIB), "xz", true),
        ("plainraw", raw_image("from-plain-raw", 3 * MIB), "", false),
    ];
    let mut templates = String::new();
    for (name, raw, tool, is_qcow2) in &images {
        let mut bytes = if *is_qcow2 {
            qcow2(&scratch, raw)
        } else {
            raw.clone()
        };
        if !tool.is_empty() {
            bytes = compress(tool, &bytes);
        }
        // Misleading names: detection must go by magic bytes.
        let url = server.file(&format!("/{name}.iso"), bytes);
        templates += &http_dv(
            name,
            &url,
            "        storage:\n          resources:\n            requests:\n              storage: 16Mi\n",
        );
    }
    let disks: Vec<&str> = images.iter().map(|i| i.0).collect();
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda lv.read=vdb lv.read=vdc lv.read=vdd",
        &templates,
        &disks,
    ));
    vm.start();
    let console = vm.pod.wait_console("LV-READ vdd ", BOOT);
    for (dev, text) in [
        ("vda", "from-qcow2-gz"),
        ("vdb", "from-raw-xz"),
        ("vdc", "from-qcow2-xz"),
        ("vdd", "from-plain-raw"),
    ] {
        assert!(
            console.contains(&format!("LV-READ {dev} {text}")),
            "{dev} does not show {text}\n{console}"
        );
        // spec.storage: the whole request is usable.
        assert_eq!(vm.guest_block_sizes().get(dev), Some(&(16 * MIB / 512)));
    }
    for (name, raw, _, _) in &images {
        assert_disk_holds(&vm.claim(name).join("disk.img"), raw, 16 * MIB);
    }
    vm.stop();
}

/// `pvc` clones — of a claim made by hand and of another template of the same VM listed after
/// the clone — and a preallocated `blank` disk.
#[test]
fn pvc_clone_and_blank_sources() {
    let mut vm = Vm::new("dv-clone");
    let server = Server::start();
    // A claim made by hand (no claim.json): `claims/default/golden/disk.img`.
    let golden = raw_image("golden-image", 12 * MIB);
    fs::create_dir_all(vm.claim("golden")).unwrap();
    fs::write(vm.claim("golden").join("disk.img"), &golden).unwrap();
    let base_raw = raw_image("base-from-http", 2 * MIB);
    let url = server.file("/base.img", base_raw.clone());

    let templates = format!(
        "    - metadata:
        name: copy-of-golden
      spec:
        source:
          pvc:
            name: golden
        storage: {{}}
    - metadata:
        name: empty
      spec:
        preallocation: true
        source:
          blank: {{}}
        storage:
          resources:
            requests:
              storage: 8Mi
    - metadata:
        name: copy-of-base
      spec:
        source:
          pvc:
            namespace: default
            name: base
        pvc:
          resources:
            requests:
              storage: 32Mi
{}",
        http_dv("base", &url, &pvc("16Mi"))
    );
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda lv.read=vdb lv.read=vdc",
        &templates,
        &["copy-of-golden", "empty", "copy-of-base"],
    ));
    vm.start();
    let console = vm.pod.wait_console("LV-READ vdc ", BOOT);
    assert!(console.contains("LV-READ vda golden-image"), "{console}");
    assert!(
        console.lines().any(|l| l.trim_end() == "LV-READ vdb"),
        "the blank disk is not empty\n{console}"
    );
    assert!(console.contains("LV-READ vdc base-from-http"), "{console}");
    let sizes = vm.guest_block_sizes();
    // storage form without a size: the clone takes the source's size.
    assert_eq!(sizes.get("vda"), Some(&(12 * MIB / 512)));
    assert_eq!(sizes.get("vdb"), Some(&(8 * MIB / 512)));
    // spec.pvc 32Mi: 30.24 MiB usable → 30 MiB.
    assert_eq!(sizes.get("vdc"), Some(&(30 * MIB / 512)));
    vm.stop();

    assert_disk_holds(
        &vm.claim("copy-of-golden").join("disk.img"),
        &golden,
        12 * MIB,
    );
    assert_disk_holds(
        &vm.claim("copy-of-base").join("disk.img"),
        &base_raw,
        30 * MIB,
    );
    let empty = fs::metadata(vm.claim("empty").join("disk.img")).unwrap();
    assert_eq!(empty.len(), 8 * MIB);
    assert!(
        empty.blocks() * 512 >= 8 * MIB,
        "preallocation: true left the blank disk sparse ({} blocks)",
        empty.blocks()
    );
    // The hand-made source is untouched (still no claim.json of its own).
    assert_eq!(entries(&vm.claim("golden")), ["disk.img"]);
    assert_eq!(
        read_json(&vm.claim("copy-of-golden").join("claim.json"))["source"]["pvc"]["name"],
        "golden"
    );
}

/// `volumeMode: Block`: the claim is a loop device over a file in the claim directory, the
/// guest sees the full request, a ReadWriteMany claim is marked shared, and the loop device
/// goes away with the launcher.
#[test]
fn block_mode_claim_is_a_loop_device() {
    let mut vm = Vm::new("dv-block");
    let server = Server::start();
    let raw = raw_image("block-mode-data", 3 * MIB);
    let url = server.file("/blk", compress("xz", &raw));
    let storage = "        storage:
          volumeMode: Block
          accessModes:
            - ReadWriteMany
          resources:
            requests:
              storage: 24Mi
";
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda",
        &http_dv("blk", &url, storage),
        &["blk"],
    ));
    vm.start();
    vm.pod.wait_console("LV-READ vda block-mode-data", BOOT);
    assert_eq!(vm.guest_block_sizes().get("vda"), Some(&(24 * MIB / 512)));

    let node = vm
        .storage
        .join(format!("vms/default/{}/block/blk", vm.pod.name));
    let dev = fs::read_link(&node).unwrap_or_else(|e| panic!("{}: {e}", node.display()));
    assert!(
        fs::metadata(&node).unwrap().file_type().is_block_device(),
        "{} is not a block device",
        node.display()
    );
    let backing = vm.claim("blk").join("block.img");
    let losetup = |file: &Path| {
        let out = Command::new("losetup")
            .arg("--associated")
            .arg(file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        losetup(&backing).contains(dev.to_str().unwrap()),
        "{} is not backed by {}",
        dev.display(),
        backing.display()
    );
    let meta = read_json(&vm.claim("blk").join("claim.json"));
    assert_eq!(meta["volumeMode"], "Block");
    assert_eq!(meta["shared"], true);
    assert!(claim_is_shared(&vm.storage, "default", "blk"));
    // The launcher reads the claim's access modes: the disk is shared (a migration may leave
    // it where it is), as a ReadWriteMany claim is in a cluster.
    let domain = tokio::runtime::Runtime::new().unwrap().block_on(async {
        vm.pod
            .client()
            .await
            .get_domain(virt_launcher::api::pb::Empty {})
            .await
            .unwrap()
            .into_inner()
    });
    let disk = domain.disks.iter().find(|d| d.volume == "blk").unwrap();
    assert!(disk.shared, "{disk:?}");
    assert!(!vm.claim("blk").join("disk.img").exists());
    vm.stop();

    assert_disk_holds(&backing, &raw, 24 * MIB);
    assert!(
        losetup(&backing).trim().is_empty(),
        "loop device still attached after the launcher exited: {}",
        losetup(&backing)
    );
}

/// The storage document's VirtualMachine, as written; only the URL points at the test server.
#[test]
fn seed_vm_runs_as_written_with_a_local_url() {
    let mut vm = Vm::new("dv-seed");
    let server = Server::start();
    let raw = raw_image("hello-from-the-seed-image", 16 * MIB);
    let url = server.file(
        "/my-vm-image.qcow2",
        qcow2(&vm.pod.dir.join("scratch"), &raw),
    );
    // Copied from shared/seed/kubevirt-csi-storage.txt ("User defines a VirtualMachine with a
    // DataVolume"). Changed: only the URL (a local server instead of example.com). Added where the document says "# ... other VM specs": memory (the document has none and
    // KubeVirt requires it) and kernelBoot with the test guest (the document's image has no
    // OS), with `lv.read=vda` so that the guest prints the disk's first line.
    let manifest = format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: my-vm
spec:
  dataVolumeTemplates:
    - metadata:
        name: my-vm-disk
      spec:
        storageClassName: my-fast-storage # References the StorageClass
        source:
          http:
            url: "{url}"
        pvc:
          accessModes:
            - ReadWriteOnce # Or ReadWriteMany for live migration
          resources:
            requests:
              storage: 20Gi
  template:
    spec:
      domain:
        devices:
          disks:
            - name: my-vm-disk
              disk:
                bus: virtio
        # ... other VM specs
        resources:
          requests:
            memory: 128Mi
        firmware:
          kernelBoot:
            kernelArgs: "console=ttyS0 quiet lv.read=vda"
            container:
              image: test-guest
              kernelPath: /vmlinuz
              initrdPath: /initramfs.gz
      volumes:
        - name: my-vm-disk
          dataVolume:
            name: my-vm-disk
"#
    );
    // Each launcher has its own libvirt daemons: the domain name default_my-vm is private to it.
    vm.pod.name = "my-vm".to_string();
    vm.write(&manifest);
    // CDI has no `storageClassName` in a DataVolume's spec (it belongs in pvc): kubectl's
    // strict field validation refuses the document, and so does the launcher, saying where
    // the field goes; nothing is imported.
    let line = vm.fails();
    assert!(
        line.ends_with(
            "field spec.dataVolumeTemplates[0].spec.storageClassName: unknown field (KubeVirt \
             has no such field): did you mean \"pvc.storageClassName\"?; \
             --allow-unknown-fields runs it anyway (a warning per unknown field)"
        ),
        "{line}"
    );
    assert!(!vm.storage.exists(), "something was imported");
    // As written, with the opt-out.
    vm.extra.push("--allow-unknown-fields".into());
    vm.start();
    vm.pod
        .wait_console("LV-READ vda hello-from-the-seed-image", BOOT);
    // 20Gi through spec.pvc: 19353 MiB usable after CDI's 5.5 % overhead.
    let size = 19353 * MIB;
    assert_eq!(vm.guest_block_sizes().get("vda"), Some(&(size / 512)));
    let disk = vm.claim("my-vm-disk").join("disk.img");
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 < 64 * MIB,
        "the 20Gi disk is not sparse: {} blocks",
        meta.blocks()
    );
    let mut head = vec![0u8; raw.len()];
    fs::File::open(&disk)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(
        checksum(&head),
        checksum(&raw),
        "data region differs from the source"
    );
    vm.stop();
}

/// The whole VM is checked before any import: a VM without memory and a 1 GiB blank
/// DataVolume fails at once, naming the field as written in the VM, and no claim is made.
#[test]
fn a_bad_vm_fails_before_any_import_naming_its_template_path() {
    let vm = Vm::new("dv-nomem");
    let blank = |name: &str, storage: &str| {
        format!(
            "    - metadata:\n        name: {name}\n      spec:\n        source:\n          \
             blank: {{}}\n{storage}"
        )
    };
    let yaml = vm_yaml(
        "dv-nomem",
        "",
        &blank("dv-nomem-disk", &pvc("1Gi")),
        &["dv-nomem-disk"],
    )
    .replace(
        "          requests:\n            memory: 128Mi\n",
        "          requests: {}\n",
    );
    vm.write(&yaml);
    let line = vm.fails();
    assert!(
        line.ends_with(
            "spec.template.spec.domain.resources.requests.memory: required (or \
             spec.template.spec.domain.memory.guest)"
        ),
        "{line}\n{yaml}"
    );
    assert!(!vm.storage.exists(), "the storage dir was touched");
    assert!(vm.pod.leftover_processes().is_empty());

    // A bad second template is named before the first one is imported.
    let templates = blank("dv-nomem-disk", &pvc("1Gi")) + &blank("dv-nomem-other", "");
    vm.write(&vm_yaml("dv-nomem", "", &templates, &["dv-nomem-disk"]));
    let line = vm.fails();
    assert!(
        line.contains("spec.dataVolumeTemplates[1].spec") && line.contains("pvc or storage"),
        "{line}"
    );
    assert!(!vm.storage.exists(), "the storage dir was touched");
}

/// An import killed mid-download leaves no disk the VM could boot from; the next run starts
/// over and completes (this server sends no ETag or Last-Modified: nothing to check a resumed
/// file against; see `killed_download_resumes_with_range_on_the_next_run`). Progress goes to the log as JSON lines with bytes, total, rate and ETA.
#[test]
fn interrupted_import_starts_over_and_reports_progress() {
    let mut vm = Vm::new("dv-interrupt");
    let server = Server::start();
    let raw = raw_image("survived-an-interruption", 8 * MIB);
    // ~0.7 MiB/s of random-looking data: the import takes >10 s.
    let mut data = raw.clone();
    for (i, b) in data[2 * MIB as usize..].iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1;
    }
    let data = Arc::new(data);
    server.route(
        "/slow.img",
        Route::Slow {
            data: data.clone(),
            chunk: 64 << 10,
            pause: Duration::from_millis(90),
        },
    );
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda",
        &http_dv("slow", &server.url("/slow.img"), &pvc("32Mi")),
        &["slow"],
    ));
    vm.start();
    // Wait for a progress line that shows bytes moving, then kill the launcher.
    let deadline = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let line = vm.pod.log().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "import progress" && v["bytes"].as_u64()? > 0).then_some(v)
        });
        if let Some(v) = line {
            break v;
        }
        assert!(Instant::now() < deadline, "no progress\n{}", vm.pod.dump());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(progress["dataVolume"], "default/slow");
    assert_eq!(progress["phase"], "download");
    assert_eq!(progress["total"], data.len() as u64);
    assert!(
        progress["rateBytesPerSecond"].as_u64().is_some(),
        "{progress}"
    );
    assert!(progress["etaSeconds"].as_u64().is_some(), "{progress}");
    vm.pod.signal(Signal::SIGKILL);
    vm.pod.wait_exit(Duration::from_secs(10));

    let claim = vm.claim("slow");
    assert!(!claim.join("disk.img").exists(), "half-written disk.img");
    assert!(!claim.join("claim.json").exists(), "claim marked complete");
    assert!(
        claim.join(".import/download").exists(),
        "the test did not interrupt a download: {:?}",
        entries(&claim.join(".import"))
    );

    // The same data, fast now.
    server.route("/slow.img", Route::File(data.clone()));
    vm.start();
    vm.pod
        .wait_console("LV-READ vda survived-an-interruption", BOOT);
    assert!(vm.pod.log().contains("starting over"), "{}", vm.pod.dump());
    vm.stop();
    assert_disk_holds(&claim.join("disk.img"), &data, 30 * MIB);
    assert_eq!(entries(&claim), ["claim.json", "disk.img"]);
}

/// Random-looking data (not sparse) after the first 2 MiB of `raw_image(text, 8 MiB)`.
fn busy_image(text: &str, seed: usize) -> Vec<u8> {
    let mut data = raw_image(text, 8 * MIB);
    for (i, b) in data[2 * MIB as usize..].iter_mut().enumerate() {
        *b = ((i + seed).wrapping_mul(2_654_435_761) >> 13) as u8 | 1;
    }
    data
}

/// The resume record of claim `claim`'s interrupted download, once it shows at least
/// `bytes` downloaded.
fn wait_for_record(vm: &Vm, claim: &str, bytes: u64) -> serde_json::Value {
    let path = vm.claim(claim).join(".import/download.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .filter(|v| v["bytes"].as_u64().is_some_and(|b| b >= bytes))
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no resume record of {claim} with {bytes} bytes\n{}",
            vm.pod.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the launcher (and so its import) at once; no claim may look complete after.
fn kill_mid_import(vm: &mut Vm, claims: &[&str]) {
    vm.pod.signal(Signal::SIGKILL);
    vm.pod.wait_exit(Duration::from_secs(10));
    for c in claims {
        let claim = vm.claim(c);
        assert!(
            !claim.join("disk.img").exists(),
            "{c}: half-written disk.img"
        );
        assert!(
            !claim.join("claim.json").exists(),
            "{c}: claim marked complete"
        );
    }
}

/// The `Range` start and `If-Range` of a request head.
fn range_of(head: &str) -> (Option<u64>, Option<String>) {
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::to_string)
    };
    (
        header("range: bytes=").and_then(|r| r.strip_suffix('-').and_then(|r| r.parse().ok())),
        header("if-range: "),
    )
}

/// An https download killed midway (the launcher SIGKILLed, as by a crash or `kill -9`) is
/// resumed by the next `run --vm` with a Range request from where its record says it stopped,
/// `If-Range` naming the server's ETag; one whose file changed on the server in between (another
/// ETag) comes back whole and is started over. Neither kill leaves a claim a VM would boot
/// from; each claim ends holding exactly its (latest) source, and the guest reads both.
#[test]
fn killed_download_resumes_with_range_on_the_next_run() {
    let mut vm = Vm::new("dv-resume");
    let scratch = vm.pod.dir.join("scratch");
    let pki = make_pki(&scratch, "resume");
    let server = Server::start_tls(&pki.cert, &pki.key);
    let first = Arc::new(busy_image("resumed-on-the-next-run", 1));
    let second_old = Arc::new(busy_image("the-old-version", 2));
    let second_new = Arc::new(busy_image("changed-on-the-server", 3));
    // ~0.7 MiB/s: an 8 MiB import takes >10 s.
    let slow = |data: &Arc<Vec<u8>>| Route::Slow {
        data: data.clone(),
        chunk: 64 << 10,
        pause: Duration::from_millis(90),
    };
    server.route("/first.img", slow(&first));
    server.etag("/first.img", "first-v1");
    server.route("/second.img", slow(&second_old));
    server.etag("/second.img", "second-v1");
    let templates = remote_dv(
        "first",
        "http",
        &server.url("/first.img"),
        None,
        Some("ca"),
        &pvc("32Mi"),
    ) + &remote_dv(
        "second",
        "http",
        &server.url("/second.img"),
        None,
        Some("ca"),
        &pvc("32Mi"),
    );
    vm.write(
        &(ca_config_map("ca", &pki.ca)
            + "---\n"
            + &vm_yaml(
                &vm.pod.name,
                "lv.read=vda lv.read=vdb",
                &templates,
                &["first", "second"],
            )),
    );

    // Run 1: killed while `first` downloads.
    vm.start();
    wait_for_record(&vm, "first", MIB);
    kill_mid_import(&mut vm, &["first", "second"]);
    let record = read_json(&vm.claim("first").join(".import/download.json"));
    let stopped_at = record["bytes"].as_u64().unwrap();
    assert_eq!(record["validator"], "\"first-v1\"", "{record}");
    assert_eq!(record["total"], first.len() as u64, "{record}");
    assert!(stopped_at < first.len() as u64, "{record}");
    assert_eq!(server.hits("/first.img"), 1);

    // Run 2: `first` resumes (fast now) and completes; killed while `second` downloads.
    server.route("/first.img", Route::File(first.clone()));
    vm.start();
    wait_for_record(&vm, "second", MIB);
    kill_mid_import(&mut vm, &["second"]);
    assert!(
        vm.claim("first").join("claim.json").exists(),
        "{}",
        vm.pod.dump()
    );
    let heads = server.heads("/first.img");
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert_eq!(
        range_of(&heads[1]),
        (Some(stopped_at), Some("\"first-v1\"".to_string())),
        "{}",
        heads[1]
    );
    let log = vm.pod.log();
    assert!(log.contains("resuming its download"), "{log}");
    assert!(
        log.contains("resuming the download an earlier run left"),
        "{log}"
    );

    // Run 3: `second` changed on the server meanwhile: the If-Range fails, the whole new file
    // comes back and replaces the partial old one.
    server.route("/second.img", Route::File(second_new.clone()));
    server.etag("/second.img", "second-v2");
    vm.start();
    vm.pod
        .wait_console("LV-READ vda resumed-on-the-next-run", BOOT);
    vm.pod
        .wait_console("LV-READ vdb changed-on-the-server", BOOT);
    let log = vm.pod.log();
    assert!(log.contains("starting the file over"), "{log}");
    vm.stop();
    let heads = server.heads("/second.img");
    assert_eq!(heads.len(), 2, "{heads:#?}");
    let (from, validator) = range_of(&heads[1]);
    assert!(from.is_some_and(|f| f > 0), "{}", heads[1]);
    assert_eq!(validator.as_deref(), Some("\"second-v1\""), "{}", heads[1]);
    assert_disk_holds(&vm.claim("first").join("disk.img"), &first, 30 * MIB);
    assert_disk_holds(&vm.claim("second").join("disk.img"), &second_new, 30 * MIB);
    for c in ["first", "second"] {
        assert_eq!(entries(&vm.claim(c)), ["claim.json", "disk.img"], "{c}");
    }
}

/// Bad sources and images: one error line naming the DataVolume and the problem, a failed exit,
/// no VM, and the claim directory as it was (absent, or with only what was there before).
#[test]
fn bad_input_names_the_datavolume_and_leaves_the_claim_alone() {
    let vm = Vm::new("dv-bad");
    let server = Server::start();
    let scratch = vm.pod.dir.join("scratch");
    let raw = raw_image("bad", 4 * MIB);
    let good_qcow2 = qcow2(&scratch, &raw);

    let mut corrupt = good_qcow2.clone();
    corrupt[4..8].copy_from_slice(&[0, 0, 0, 99]); // qcow2 version 99
    server.file("/corrupt.qcow2", corrupt);
    // A qcow2 with data clusters past its end: qemu-img would read zeros there.
    let big = raw_image("truncated", 8 * MIB);
    let mut noisy = big.clone();
    for (i, b) in noisy[MIB as usize..].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let q = qcow2(&scratch, &noisy);
    server.file("/truncated.qcow2", q[..q.len() / 2].to_vec());
    server.file("/empty.img", Vec::new());
    let gz = compress("gzip", &raw);
    server.file("/truncated.img.gz", gz[..gz.len() / 2].to_vec());
    server.file(
        "/64m.qcow2",
        qcow2(&scratch, &raw_image("too-big", 64 * MIB)),
    );
    server.file("/vmdk", qemu_img_convert(&scratch, &raw, "vmdk"));
    server.route(
        "/cutoff.img",
        Route::CutOff {
            data: Arc::new(raw.clone()),
            send: 1 << 20,
        },
    );
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    let http = |url: String| http_dv("bad", &url, &pvc("32Mi"));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unreachable",
            http(format!("http://127.0.0.1:{closed_port}/x.qcow2")),
            "Connection refused",
        ),
        ("404", http(server.url("/missing.qcow2")), "HTTP 404 Not Found"),
        (
            "https to a plain http server",
            http(format!("https://127.0.0.1:{}/x.qcow2", server.port)),
            "cannot import https://127.0.0.1:",
        ),
        (
            "empty file",
            http(server.url("/empty.img")),
            "the server sent an empty file",
        ),
        (
            "corrupt",
            http(server.url("/corrupt.qcow2")),
            "bad image: not a valid qcow2 image",
        ),
        (
            "truncated qcow2",
            http(server.url("/truncated.qcow2")),
            "bad image: the qcow2 image is corrupt or truncated",
        ),
        (
            "truncated gzip",
            http(server.url("/truncated.img.gz")),
            "bad image: gzip cannot unpack it",
        ),
        (
            "cut-off transfer",
            http(server.url("/cutoff.img")),
            "cannot import",
        ),
        (
            "too large",
            http(server.url("/64m.qcow2")),
            "image virtual size 67108864 bytes exceeds the claim's usable size 31457280 bytes (spec.pvc requests 32Mi, less CDI's 5.5% filesystem overhead)",
        ),
        ("vmdk", http(server.url("/vmdk")), "VMDK is not supported"),
        (
            "unknown source",
            "    - metadata:\n        name: bad\n      spec:\n        source:\n          nfs:\n            path: /x\n"
                .to_string()
                + &pvc("32Mi"),
            // KubeVirt's schema has no such source: refused as a field nobody knows.
            "field spec.dataVolumeTemplates[0].spec.source.nfs: unknown field",
        ),
        (
            "registry imageStream",
            "    - metadata:\n        name: bad\n      spec:\n        source:\n          registry:\n            imageStream: fedora\n"
                .to_string()
                + &pvc("32Mi"),
            "spec.source.registry.imageStream is not supported in standalone mode",
        ),
        (
            "missing clone source",
            "    - metadata:\n        name: bad\n      spec:\n        source:\n          pvc:\n            name: nowhere\n"
                .to_string()
                + &pvc("32Mi"),
            "clone source claim default/nowhere",
        ),
    ];
    let claim = vm.claim("bad");
    for (what, template, want) in &cases {
        vm.write(&vm_yaml(&vm.pod.name, "", template, &["bad"]));
        let line = vm.fails();
        eprintln!("{what}: {line}");
        assert!(
            line.starts_with("virt-launcher: DataVolume default/bad: ")
                || *what == "unknown source",
            "{what}: {line}"
        );
        assert!(line.contains(want), "{what}: want {want:?} in\n{line}");
        assert!(
            !claim.exists(),
            "{what}: claim directory left: {:?}",
            entries(&claim)
        );
    }

    // A claim directory that exists (say, made by hand) keeps exactly what it had.
    fs::create_dir_all(&claim).unwrap();
    fs::write(claim.join("notes.txt"), "mine").unwrap();
    vm.write(&vm_yaml(
        &vm.pod.name,
        "",
        &http(server.url("/64m.qcow2")),
        &["bad"],
    ));
    let line = vm.fails();
    assert!(line.contains("exceeds the claim's usable size"), "{line}");
    assert_eq!(entries(&claim), ["notes.txt"]);
    assert!(vm.pod.leftover_processes().is_empty());
}

/// A VM with a good and a bad DataVolume: the good claim completes once and is not touched by
/// later failing runs.
#[test]
fn complete_claim_is_untouched_by_a_failing_run() {
    let vm = Vm::new("dv-keep");
    let server = Server::start();
    let raw = raw_image("keep-me", 2 * MIB);
    let url = server.file("/keep.img", raw.clone());
    let templates = http_dv("keep", &url, &pvc("16Mi"))
        + &http_dv("broken", &server.url("/nope"), &pvc("16Mi"));
    vm.write(&vm_yaml(&vm.pod.name, "", &templates, &["keep", "broken"]));

    let line = vm.fails();
    assert!(line.contains("DataVolume default/broken: "), "{line}");
    assert!(line.contains("HTTP 404"), "{line}");
    let keep = vm.claim("keep");
    let meta_before = fs::read(keep.join("claim.json")).expect("keep imported");
    let disk_before = fs::metadata(keep.join("disk.img")).unwrap();
    assert!(!vm.claim("broken").exists());

    let line = vm.fails();
    assert!(line.contains("DataVolume default/broken: "), "{line}");
    assert_eq!(
        server.hits("/keep.img"),
        1,
        "the complete claim was imported again"
    );
    assert_eq!(fs::read(keep.join("claim.json")).unwrap(), meta_before);
    let disk_after = fs::metadata(keep.join("disk.img")).unwrap();
    assert_eq!(disk_after.ino(), disk_before.ino());
    assert_eq!(disk_after.mtime_nsec(), disk_before.mtime_nsec());
    assert_disk_holds(&keep.join("disk.img"), &raw, 15 * MIB);
}

/// `--vm` wants a VirtualMachine; a volume naming a DataVolume that is neither a template nor
/// a claim in the storage directory is named.
#[test]
fn vm_flag_errors_are_clear() {
    let vm = Vm::new("dv-flags");
    fs::write(
        vm.vm_path(),
        "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: x\n",
    )
    .unwrap();
    let line = vm.fails();
    assert!(
        line.contains("--vm wants a kubevirt.io/v1 VirtualMachine, found VirtualMachineInstance"),
        "{line}"
    );

    let yaml = vm_yaml(&vm.pod.name, "", "    []\n", &["elsewhere"])
        .replace("  dataVolumeTemplates:\n    []\n", "");
    vm.write(&yaml);
    let line = vm.fails();
    assert!(
        line.contains("volume elsewhere: DataVolume default/elsewhere is not in spec.dataVolumeTemplates and has no claim in"),
        "{line}"
    );

    let (status, stderr) = common::run_launcher(&[
        "run",
        "--vm",
        vm.vm_path().to_str().unwrap(),
        "--volumes-dir",
        "/tmp",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// SIGTERM during an import stops the launcher at once with exit 0 (stopped before any VM
/// ran, as the README says), starts no VM, leaves nothing running and no claim that looks
/// complete.
#[test]
fn sigterm_during_an_import_exits_0_and_leaves_nothing() {
    let mut vm = Vm::new("dv-term");
    let server = Server::start();
    let raw = raw_image("never-finished", 8 * MIB);
    server.route(
        "/slow.img",
        Route::Slow {
            data: Arc::new(raw),
            chunk: 64 << 10,
            pause: Duration::from_millis(200),
        },
    );
    vm.write(&vm_yaml(
        &vm.pod.name,
        "lv.read=vda",
        &http_dv("slow", &server.url("/slow.img"), &pvc("32Mi")),
        &["slow"],
    ));
    vm.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.pod.log().contains("\"message\":\"import progress\"") {
        assert!(Instant::now() < deadline, "no progress\n{}", vm.pod.dump());
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.pod.signal(Signal::SIGTERM);
    let status = vm.pod.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", vm.pod.dump());
    let log = vm.pod.log();
    assert!(log.contains("stopped during the import"), "{log}");
    assert!(!log.contains("starting domain"), "{log}");
    let claim = vm.claim("slow");
    assert!(!claim.join("disk.img").exists(), "half-written disk.img");
    assert!(!claim.join("claim.json").exists(), "claim marked complete");
    assert!(
        vm.pod.leftover_processes().is_empty(),
        "{:?}",
        vm.pod.leftover_processes()
    );
}

// ------------------------------------------------------------------------------ https and S3

/// A CA made here (`openssl`), and a server certificate it signed for 127.0.0.1.
struct Pki {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// `name`'s CA and a certificate for `127.0.0.1` it signed (`self_signed`: the server
/// certificate is its own issuer, no CA).
fn make_pki(dir: &Path, name: &str) -> Pki {
    let dir = dir.join(format!("pki-{name}"));
    fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509", "-days", "2", "-subj"];
    let subj = format!("/CN={name} test CA");
    ca_args.push(&subj);
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&dir, &ca_args);
    let mut csr_args = vec!["req", "-new", "-subj", "/CN=127.0.0.1"];
    csr_args.extend(ec);
    csr_args.extend(["-keyout", "srv.key", "-out", "srv.csr"]);
    openssl(&dir, &csr_args);
    fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "srv.pem",
        ],
    );
    Pki {
        ca: fs::read(dir.join("ca.pem")).unwrap(),
        cert: fs::read(dir.join("srv.pem")).unwrap(),
        key: fs::read(dir.join("srv.key")).unwrap(),
    }
}

/// A certificate for 127.0.0.1 (the key of [`make_pki`]'s `srv.key`) signed by `name`'s CA,
/// valid only on 1 January 2020 (`openssl ca` with explicit dates). Call after `make_pki`.
fn expired_cert(dir: &Path, name: &str) -> Vec<u8> {
    let dir = dir.join(format!("pki-{name}"));
    fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
    )
    .unwrap();
    fs::write(dir.join("index.txt"), "").unwrap();
    fs::write(dir.join("serial"), "1000\n").unwrap();
    openssl(
        &dir,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-in",
            "srv.csr",
            "-out",
            "expired.pem",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extfile",
            "ext.cnf",
            "-notext",
        ],
    );
    fs::read(dir.join("expired.pem")).unwrap()
}

/// A self-signed server certificate for 127.0.0.1 (no CA anywhere).
fn self_signed(dir: &Path) -> Pki {
    let dir = dir.join("pki-self");
    fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.pem",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
    );
    let cert = fs::read(dir.join("srv.pem")).unwrap();
    Pki {
        ca: cert.clone(),
        cert,
        key: fs::read(dir.join("srv.key")).unwrap(),
    }
}

/// `moto` in server mode on 127.0.0.1 (an S3-compatible store with IAM), killed on drop. The
/// set-up (an IAM user with a key and a policy, a bucket, objects) runs before authentication
/// is switched on; from then on every request must be signed by that user.
struct Moto {
    child: std::process::Child,
    port: u16,
    key_id: String,
    secret: String,
}

impl Moto {
    /// Starts it with `objects` (bucket, key, bytes).
    fn start(dir: &Path, objects: &[(&str, &str, &[u8])]) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("python3 -m moto.server (./devtool setup installs moto)");
        let mut moto = Moto {
            child,
            port,
            key_id: String::new(),
            secret: String::new(),
        };
        common::wait_for("moto listening", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let files = dir.join("s3-objects");
        fs::create_dir_all(&files).unwrap();
        let mut puts = String::new();
        for (i, (bucket, key, data)) in objects.iter().enumerate() {
            let f = files.join(i.to_string());
            fs::write(&f, data).unwrap();
            puts += &format!(
                "s3.create_bucket(Bucket={bucket:?}) if {bucket:?} not in [b['Name'] for b in s3.list_buckets()['Buckets']] else None\n\
                 s3.put_object(Bucket={bucket:?}, Key={key:?}, Body=open({:?}, 'rb').read())\n",
                f.to_str().unwrap()
            );
        }
        let script = format!(
            "import boto3, json, urllib.request
ep = 'http://127.0.0.1:{port}'
kw = dict(endpoint_url=ep, region_name='us-east-1', aws_access_key_id='setup', aws_secret_access_key='setup')
iam = boto3.client('iam', **kw)
iam.create_user(UserName='importer')
iam.put_user_policy(UserName='importer', PolicyName='all', PolicyDocument=json.dumps(
    {{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}}]}}))
k = iam.create_access_key(UserName='importer')['AccessKey']
s3 = boto3.client('s3', **kw)
{puts}urllib.request.urlopen(urllib.request.Request(ep + '/moto-api/reset-auth', data=b'0', method='POST', headers={{'Content-Type': 'text/plain'}})).read()
print(k['AccessKeyId'], k['SecretAccessKey'])
"
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3");
        assert!(out.status.success(), "moto set-up: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut words = text.split_whitespace();
        moto.key_id = words.next().unwrap().to_string();
        moto.secret = words.next().unwrap().to_string();
        moto
    }

    fn url(&self, bucket: &str, key: &str) -> String {
        format!("http://127.0.0.1:{}/{bucket}/{key}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Secret document with CDI's keys (base64 `data`).
fn secret_doc(name: &str, id: &str, secret: &str) -> String {
    use base64::Engine;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ntype: Opaque\ndata:\n  accessKeyId: {}\n  secretKey: {}\n",
        b(id),
        b(secret)
    )
}

/// A ConfigMap document holding `ca.pem`.
fn ca_config_map(name: &str, pem: &[u8]) -> String {
    let pem = String::from_utf8_lossy(pem);
    let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  ca.pem: |\n{indented}")
}

/// A DataVolume template of source `kind` (http or s3) with optional `secretRef` and
/// `certConfigMap`.
fn remote_dv(
    name: &str,
    kind: &str,
    url: &str,
    secret: Option<&str>,
    cert: Option<&str>,
    storage: &str,
) -> String {
    let mut t = format!(
        "    - metadata:\n        name: {name}\n      spec:\n        source:\n          {kind}:\n            url: \"{url}\"\n"
    );
    if let Some(s) = secret {
        t += &format!("            secretRef: {s}\n");
    }
    if let Some(c) = cert {
        t += &format!("            certConfigMap: {c}\n");
    }
    t + storage
}

/// A TCP proxy on 127.0.0.1 in front of a local server (moto): each request head is recorded
/// (lower-case) and passed on; the response comes back 64 KiB every 90 ms while `slow` is set.
struct SlowProxy {
    port: u16,
    slow: Arc<AtomicBool>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl SlowProxy {
    fn start(upstream: u16) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let slow = Arc::new(AtomicBool::new(true));
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, h) = (slow.clone(), heads.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, h) = (s.clone(), h.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, upstream, &s, &h);
                });
            }
        });
        SlowProxy { port, slow, heads }
    }

    fn gets(&self) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .filter(|h| h.starts_with("get "))
            .cloned()
            .collect()
    }
}

/// One request (a GET: a head, no body) to `upstream`, its response back to `client`.
fn relay(
    client: TcpStream,
    upstream: u16,
    slow: &AtomicBool,
    heads: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        head += &line;
        if line == "\r\n" {
            break;
        }
    }
    heads.lock().unwrap().push(head.to_ascii_lowercase());
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(head.as_bytes())?;
    let mut client = client;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = server.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        client.write_all(&buf[..n])?;
        if slow.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(90));
        }
    }
}

/// The same for an `s3` source (moto, SigV4, behind [`SlowProxy`]): killed mid-download, the
/// next run asks moto for the rest only (a signed GET with `Range` from the recorded byte) and
/// the claim holds exactly the object.
#[test]
fn killed_s3_download_resumes_on_the_next_run() {
    let mut vm = Vm::new("dv-s3resume");
    let data = busy_image("s3-resumed-on-the-next-run", 4);
    let moto = Moto::start(&vm.pod.dir, &[("images", "disk.img", data.as_slice())]);
    let proxy = SlowProxy::start(moto.port);
    let url = format!("http://127.0.0.1:{}/images/disk.img", proxy.port);
    vm.write(
        &(vm_yaml(
            &vm.pod.name,
            "lv.read=vda",
            &remote_dv("bucket", "s3", &url, Some("s3-creds"), None, &pvc("32Mi")),
            &["bucket"],
        ) + &secret_doc("s3-creds", &moto.key_id, &moto.secret)),
    );
    vm.start();
    wait_for_record(&vm, "bucket", MIB);
    kill_mid_import(&mut vm, &["bucket"]);
    let record = read_json(&vm.claim("bucket").join(".import/download.json"));
    let stopped_at = record["bytes"].as_u64().unwrap();
    assert!(stopped_at < data.len() as u64, "{record}");
    let validator = record["validator"].as_str().unwrap().to_ascii_lowercase();

    proxy.slow.store(false, Ordering::SeqCst);
    vm.start();
    vm.pod
        .wait_console("LV-READ vda s3-resumed-on-the-next-run", BOOT);
    vm.stop();
    let gets = proxy.gets();
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert_eq!(
        range_of(&gets[1]),
        (Some(stopped_at), Some(validator)),
        "{}",
        gets[1]
    );
    assert!(
        gets[1].contains("authorization: aws4-hmac-sha256"),
        "{}",
        gets[1]
    );
    assert_disk_holds(&vm.claim("bucket").join("disk.img"), &data, 30 * MIB);
    assert_eq!(entries(&vm.claim("bucket")), ["claim.json", "disk.img"]);
}

/// https with a CA from the manifest's ConfigMap and basic auth from its Secret, an S3 object
/// (moto, SigV4 by the Secret's keys), and an https download that breaks midway and is
/// resumed with a Range request: each claim holds exactly its source and the guest reads all
/// three. The launcher links no TLS code (the import is `virt-launcher-import`).
#[test]
fn https_s3_and_resumed_imports_boot() {
    let mut vm = Vm::new("dv-https");
    let scratch = vm.pod.dir.join("scratch");
    let pki = make_pki(&scratch, "good");
    let server = Server::start_tls(&pki.cert, &pki.key);

    let raw_https = raw_image("https-with-a-private-ca", 6 * MIB);
    let token = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    };
    server.route(
        "/private/disk.qcow2",
        Route::Auth {
            data: Arc::new(qcow2(&scratch, &raw_https)),
            token,
        },
    );
    // Random-looking data (not sparse), cut off after 3 MiB on the first GET.
    let mut flaky = raw_image("resumed-after-a-drop", 8 * MIB);
    for (i, b) in flaky[2 * MIB as usize..].iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1;
    }
    server.route(
        "/flaky.img",
        Route::Flaky {
            data: Arc::new(flaky.clone()),
            send: 3 * MIB as usize + 12345,
        },
    );
    let raw_s3 = raw_image("from-an-s3-bucket", 4 * MIB);
    let moto = Moto::start(
        &vm.pod.dir,
        &[("images", "fedora/disk.img.gz", &compress("gzip", &raw_s3))],
    );

    let templates = remote_dv(
        "web",
        "http",
        &server.url("/private/disk.qcow2"),
        Some("web-auth"),
        Some("web-ca"),
        &pvc("32Mi"),
    ) + &remote_dv(
        "bucket",
        "s3",
        &moto.url("images", "fedora/disk.img.gz"),
        Some("s3-creds"),
        None,
        &pvc("32Mi"),
    ) + &remote_dv(
        "flaky",
        "http",
        &server.url("/flaky.img"),
        None,
        Some("web-ca"),
        &pvc("32Mi"),
    );
    let yaml = ca_config_map("web-ca", &pki.ca)
        + &secret_doc("web-auth", "alice", "s3cret")
        + "---\n"
        + &vm_yaml(
            &vm.pod.name,
            "lv.read=vda lv.read=vdb lv.read=vdc",
            &templates,
            &["web", "bucket", "flaky"],
        )
        + &secret_doc("s3-creds", &moto.key_id, &moto.secret);
    vm.write(&yaml);
    vm.start();
    for line in [
        "LV-READ vda https-with-a-private-ca",
        "LV-READ vdb from-an-s3-bucket",
        "LV-READ vdc resumed-after-a-drop",
    ] {
        vm.pod.wait_console(line, BOOT);
    }
    vm.stop();

    assert_disk_holds(&vm.claim("web").join("disk.img"), &raw_https, 30 * MIB);
    assert_disk_holds(&vm.claim("bucket").join("disk.img"), &raw_s3, 30 * MIB);
    assert_disk_holds(&vm.claim("flaky").join("disk.img"), &flaky, 30 * MIB);
    // The Secret's contents are not recorded; its name is.
    let meta = read_json(&vm.claim("web").join("claim.json"));
    assert_eq!(meta["source"]["http"]["secretRef"], "web-auth");
    assert!(!fs::read_to_string(vm.claim("web").join("claim.json"))
        .unwrap()
        .contains("s3cret"));
    // The second GET of the flaky image asked for the rest only.
    let heads = server.heads("/flaky.img");
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert!(!heads[0].contains("\nrange:"), "{}", heads[0]);
    let from = heads[1]
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no Range in the second GET: {}", heads[1]));
    assert!(from > 0 && from <= 3 * MIB + 12345, "resumed at {from}");
    assert!(
        vm.pod.log().contains("resuming the download"),
        "{}",
        vm.pod.dump()
    );
}

/// Bad certificates, credentials and names: one error line naming the DataVolume and the
/// reason, no VM, no claim directory left.
#[test]
fn bad_https_and_s3_input_is_named_and_leaves_no_claim() {
    let vm = Vm::new("dv-badtls");
    let scratch = vm.pod.dir.join("scratch");
    let good = make_pki(&scratch, "good");
    let other = make_pki(&scratch, "other");
    let selfsigned = self_signed(&scratch);
    let expired = expired_cert(&scratch, "good");
    let server = Server::start_tls(&good.cert, &good.key);
    let self_server = Server::start_tls(&selfsigned.cert, &selfsigned.key);
    let expired_server = Server::start_tls(&expired, &good.key);
    let raw = raw_image("bad", 4 * MIB);
    let url = server.file("/disk.img", raw.clone());
    let self_url = self_server.file("/disk.img", raw.clone());
    let expired_url = expired_server.file("/disk.img", raw.clone());
    server.route(
        "/auth.img",
        Route::Auth {
            data: Arc::new(raw.clone()),
            token: "YWxpY2U6czNjcmV0".into(),
        },
    );
    server.route(
        "/cutoff.img",
        Route::CutOff {
            data: Arc::new(raw.clone()),
            send: 1 << 20,
        },
    );
    let big = raw_image("too-big", 64 * MIB);
    let moto = Moto::start(
        &vm.pod.dir,
        &[
            ("images", "disk.img", raw.as_slice()),
            ("images", "big.img", big.as_slice()),
        ],
    );
    let good_ca = ca_config_map("ca", &good.ca);
    let s3_creds = secret_doc("creds", &moto.key_id, &moto.secret);
    let http = |u: &str, secret: Option<&str>, cert: Option<&str>| {
        remote_dv("bad", "http", u, secret, cert, &pvc("32Mi"))
    };
    let s3 = |u: &str, secret: Option<&str>| remote_dv("bad", "s3", u, secret, None, &pvc("32Mi"));
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "expired certificate (its CA trusted)",
            good_ca.clone(),
            http(&expired_url, None, Some("ca")),
            "TLS: invalid peer certificate: certificate expired",
        ),
        (
            "wrong CA",
            ca_config_map("ca", &other.ca),
            http(&url, None, Some("ca")),
            "TLS: invalid peer certificate: UnknownIssuer",
        ),
        (
            "no CA for a private server",
            String::new(),
            http(&url, None, None),
            "TLS: invalid peer certificate: UnknownIssuer",
        ),
        (
            "self-signed without a CA",
            String::new(),
            http(&self_url, None, None),
            "TLS: invalid peer certificate",
        ),
        (
            "ConfigMap missing",
            String::new(),
            http(&url, None, Some("nowhere")),
            "spec.dataVolumeTemplates[0].spec.source.http.certConfigMap: ConfigMap \"nowhere\" is not in",
        ),
        (
            "ConfigMap without ca.pem",
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ca\ndata:\n  other.pem: x\n".into(),
            http(&url, None, Some("ca")),
            "ConfigMap \"ca\" has no key \"ca.pem\"",
        ),
        (
            "wrong password",
            good_ca.clone() + &secret_doc("auth", "alice", "wrong"),
            http(&server.url("/auth.img"), Some("auth"), Some("ca")),
            "HTTP 401 Unauthorized",
        ),
        (
            "Secret without secretKey",
            good_ca.clone()
                + "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: auth\nstringData:\n  accessKeyId: alice\n",
            http(&server.url("/auth.img"), Some("auth"), Some("ca")),
            "spec.source.http.secretRef: Secret \"auth\" has no key \"secretKey\"",
        ),
        (
            "truncated download (no Range support)",
            good_ca.clone(),
            http(&server.url("/cutoff.img"), None, Some("ca")),
            "transfer interrupted after 1048576 of 4194304 bytes: Peer disconnected (gave up after 5 attempts)",
        ),
        (
            "wrong S3 credentials",
            secret_doc("creds", &moto.key_id, "not-the-secret"),
            s3(&moto.url("images", "disk.img"), Some("creds")),
            "HTTP 403 Forbidden: SignatureDoesNotMatch",
        ),
        (
            "unknown S3 access key",
            secret_doc("creds", "AKIANOBODY", "x"),
            s3(&moto.url("images", "disk.img"), Some("creds")),
            "HTTP 403 Forbidden: InvalidAccessKeyId",
        ),
        (
            "missing bucket",
            s3_creds.clone(),
            s3(&moto.url("nobucket", "disk.img"), Some("creds")),
            "HTTP 404 Not Found: NoSuchBucket",
        ),
        (
            "missing key",
            s3_creds.clone(),
            s3(&moto.url("images", "nokey.img"), Some("creds")),
            "HTTP 404 Not Found: NoSuchKey",
        ),
        (
            "image larger than the claim",
            s3_creds.clone(),
            s3(&moto.url("images", "big.img"), Some("creds")),
            "image virtual size 67108864 bytes exceeds the claim's usable size 31457280 bytes",
        ),
    ];
    let claim = vm.claim("bad");
    for (what, docs, template, want) in &cases {
        vm.write(&(vm_yaml(&vm.pod.name, "", template, &["bad"]) + docs));
        let line = vm.fails();
        eprintln!("{what}: {line}");
        assert!(
            line.starts_with("virt-launcher: DataVolume default/bad: "),
            "{what}: {line}"
        );
        assert!(line.contains(want), "{what}: want {want:?} in\n{line}");
        assert!(
            !claim.exists(),
            "{what}: claim directory left: {:?}",
            entries(&claim)
        );
    }
    assert!(vm.pod.leftover_processes().is_empty());
}
