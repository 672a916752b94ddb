//! Registry sources and standalone containerDisk end to end, against a real registry: Debian's
//! `docker-registry` on 127.0.0.1 (started by each test, with htpasswd auth where the test
//! needs it), holding images the test builds with `umoci` (one layer with `/disk/disk.qcow2`)
//! and pushes with `skopeo`. The real TCG test guest then reads the disk (`lv.read=vda` →
//! `LV-READ vda <first line>`), or writes it (`lv.write=vda:<text>`).
//!
//! No external network: every image is made here.

mod common;

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{guest_dir, Pod};

const MIB: u64 = 1 << 20;
const BOOT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------ the registry

/// `docker-registry serve` on a free loopback port; killed (by pid) on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// `user:password` when the registry wants them.
    creds: Option<String>,
    /// The token service of a registry with token (Bearer) authentication.
    tokens: Option<TokenServer>,
}

/// How a test registry authenticates.
enum Auth<'a> {
    None,
    /// htpasswd (bcrypt): `WWW-Authenticate: Basic`.
    Basic(&'a str, &'a str),
    /// `WWW-Authenticate: Bearer` with a token service ([`TokenServer`]) that checks these.
    Token(&'a str, &'a str),
}

impl Registry {
    /// A registry storing under `dir`, authenticating as `auth` says.
    fn start(dir: &Path, auth: Auth) -> Registry {
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: vl-test\n",
            dir.join("data").display()
        );
        let mut tokens = None;
        let mut creds = None;
        if let Auth::Token(user, password) = auth {
            let t = TokenServer::start(dir, user, password);
            config += &format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: vl-registry\n    issuer: vl-token-issuer\n    rootcertbundle: {}\n",
                t.port,
                t.cert.display()
            );
            creds = Some(format!("{user}:{password}"));
            tokens = Some(t);
        }
        if let Auth::Basic(user, password) = auth {
            creds = Some(format!("{user}:{password}"));
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils; ./devtool setup installs it)");
            assert!(out.status.success(), "htpasswd: {out:?}");
            fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: vl-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        fs::write(dir.join("config.yml"), config).unwrap();
        let log = fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (./devtool setup installs it)");
        let mut r = Registry {
            child,
            port,
            dir: dir.to_path_buf(),
            creds,
            tokens,
        };
        common::wait_for("the registry to listen", Duration::from_secs(60), || {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "docker-registry exited {status}: {}",
                    fs::read_to_string(r.dir.join("registry.log")).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        r
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Builds an image of one layer holding `files` (path in the image, content) with umoci
    /// and pushes it as `<host>/<name>` with skopeo.
    fn push(&self, name: &str, files: &[(&str, &[u8])]) {
        self.push_layers(name, &[files]);
    }

    /// [`Registry::push`] with one layer per entry of `layers`, the first at the bottom.
    fn push_layers(&self, name: &str, layers: &[&[(&str, &[u8])]]) {
        let work = self
            .dir
            .join(format!("build-{}", name.replace(['/', ':'], "-")));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let layout = work.join("oci");
        let image = format!("{}:img", layout.display());
        let bundle = work.join("bundle");
        run("umoci", &["init", "--layout", layout.to_str().unwrap()]);
        run("umoci", &["new", "--image", &image]);
        run(
            "umoci",
            &["unpack", "--image", &image, bundle.to_str().unwrap()],
        );
        for files in layers {
            for (path, data) in *files {
                let target = bundle.join("rootfs").join(path);
                fs::create_dir_all(target.parent().unwrap()).unwrap();
                fs::write(&target, data).unwrap();
            }
            run(
                "umoci",
                &[
                    "repack",
                    "--refresh-bundle",
                    "--image",
                    &image,
                    bundle.to_str().unwrap(),
                ],
            );
        }
        let dest = format!("docker://{}/{name}", self.host());
        let mut args = vec![
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--insecure-policy",
        ];
        if let Some(c) = &self.creds {
            args.extend(["--dest-creds", c]);
        }
        let src = format!("oci:{image}");
        args.extend([src.as_str(), dest.as_str()]);
        run("skopeo", &args);
        let _ = fs::remove_dir_all(&work);
    }
}

impl Registry {
    /// One HTTP/1.1 request to the registry (with its Basic credentials, if any): status,
    /// the `Docker-Content-Digest` header, body.
    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, String, String) {
        use std::io::Read;
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let auth = self
            .creds
            .as_ref()
            .map(|c| format!("Authorization: Basic {}\r\n", b64(c)))
            .unwrap_or_default();
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Accept: application/vnd.oci.image.manifest.v1+json\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.host(),
            body.len()
        )
        .unwrap();
        conn.write_all(body).unwrap();
        let mut resp = String::new();
        conn.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        let digest = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("docker-content-digest:")
                    .then(|| l.split_once(':').unwrap().1.trim().to_string())
            })
            .unwrap_or_default();
        (status, digest, body.to_string())
    }

    /// Pushes an OCI index `<repo>:<tag>` listing the manifests of `<repo>:<entry tag>` for
    /// each (os/architecture, entry tag).
    fn push_index(&self, repo: &str, tag: &str, entries: &[(&str, &str)]) {
        let mut manifests = Vec::new();
        for (platform, entry) in entries {
            let (status, digest, body) = self.request(
                "GET",
                &format!("/v2/{repo}/manifests/{entry}"),
                "text/plain",
                b"",
            );
            assert_eq!(status, 200, "{repo}:{entry}: {body}");
            let (os, arch) = platform.split_once('/').unwrap();
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest, "size": body.len(),
                "platform": {"os": os, "architecture": arch}
            }));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests
        });
        let (status, _, body) = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            "application/vnd.oci.image.index.v1+json",
            index.to_string().as_bytes(),
        );
        assert_eq!(status, 201, "PUT index {repo}:{tag}: {body}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token service as Docker's distribution expects one: `GET /token?service=…&scope=…` with
/// Basic credentials → a JWT (RS256, the signing certificate in `x5c`, made here with
/// `openssl`) granting pull and push on the scope's repository. Wrong credentials get 401.
/// Each request's scope is recorded.
struct TokenServer {
    port: u16,
    cert: PathBuf,
    scopes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let (key, cert) = (dir.join("token-key.pem"), dir.join("token-cert.pem"));
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=vl-token-issuer",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        let pem = fs::read_to_string(&cert).unwrap();
        let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let scopes: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let (seen, want) = (
            scopes.clone(),
            format!("Basic {}", b64(&format!("{user}:{password}"))),
        );
        let scratch = dir.to_path_buf();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer_token(conn, &want, &der_b64, &key, &scratch, &seen);
            }
        });
        TokenServer { port, cert, scopes }
    }
}

fn answer_token(
    mut conn: TcpStream,
    want_auth: &str,
    x5c: &str,
    key: &Path,
    scratch: &Path,
    seen: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            }
        }
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(percent_decode)
            .unwrap_or_default()
    };
    let scope = param("scope");
    seen.lock()
        .unwrap()
        .push(format!("{scope} auth={}", !auth.is_empty()));
    if auth != want_auth {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        return write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    // scope=repository:<name>:<actions>
    let repo = scope
        .strip_prefix("repository:")
        .and_then(|r| r.rsplit_once(':'))
        .map(|(name, _)| name.to_string())
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{x5c}"]}}"#);
    let claims = format!(
        r#"{{"iss":"vl-token-issuer","sub":"tester","aud":"{}","exp":{},"nbf":{},"iat":{},"jti":"{}-{now}","access":[{{"type":"repository","name":"{repo}","actions":["pull","push"]}}]}}"#,
        param("service"),
        now + 600,
        now - 60,
        now - 60,
        std::process::id()
    );
    let signing_input = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(claims.as_bytes())
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let input = scratch.join(format!("jwt-{n}.in"));
    fs::write(&input, &signing_input)?;
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(&input)
        .output()?;
    let _ = fs::remove_file(&input);
    assert!(out.status.success(), "openssl dgst -sign: {out:?}");
    let token = format!("{signing_input}.{}", b64url(&out.stdout));
    let body = format!(r#"{{"token":"{token}","expires_in":600}}"#);
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nothing listens on (right now).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
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

/// `raw` as qcow2 (`qemu-img convert`).
fn qcow2(scratch: &Path, raw: &[u8]) -> Vec<u8> {
    fs::create_dir_all(scratch).unwrap();
    let (src, dst) = (scratch.join("src.raw"), scratch.join("out.qcow2"));
    fs::write(&src, raw).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    let q = fs::read(&dst).unwrap();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    q
}

/// An empty qcow2 of `size` bytes of virtual size (a few hundred KiB on disk).
fn empty_qcow2(scratch: &Path, size: u64) -> Vec<u8> {
    fs::create_dir_all(scratch).unwrap();
    let dst = scratch.join("empty.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            dst.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let q = fs::read(&dst).unwrap();
    let _ = fs::remove_file(&dst);
    q
}

/// `gzip -c` of `data`.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    feeder.join().unwrap().unwrap();
    out
}

/// FNV-1a: a checksum to compare an imported disk with its source.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

// ------------------------------------------------------------------------------ the VM

/// The test guest (kernelBoot, 128Mi) with one virtio disk `vda` from `volume` (YAML of one
/// `spec.volumes` entry's source, indented for it); `kind` VirtualMachineInstance, or a
/// VirtualMachine with `templates` as its dataVolumeTemplates.
fn guest_yaml(
    kind: &str,
    name: &str,
    kernel_args: &str,
    templates: &str,
    volumes: &[(&str, &str)],
) -> String {
    let disks: String = volumes
        .iter()
        .map(|(n, _)| format!("    - name: {n}\n      disk:\n        bus: virtio\n"))
        .collect();
    let volumes: String = volumes
        .iter()
        .map(|(n, v)| format!("- name: {n}\n{v}"))
        .collect();
    let (pre, ind) = if kind == "VirtualMachine" {
        (
            format!("  dataVolumeTemplates:\n{templates}  template:\n    spec:\n"),
            "    ",
        )
    } else {
        (String::new(), "")
    };
    let body = format!(
        "terminationGracePeriodSeconds: 20
domain:
  resources:
    requests:
      memory: 128Mi
  firmware:
    kernelBoot:
      kernelArgs: \"console=ttyS0 quiet {kernel_args}\"
      container:
        image: test-guest
        kernelPath: /vmlinuz
        initrdPath: /initramfs.gz
  devices:
    disks:
{disks}volumes:
{volumes}"
    );
    let indent = if kind == "VirtualMachine" {
        format!("{ind}  ")
    } else {
        "  ".to_string()
    };
    let body: String = body.lines().map(|l| format!("{indent}{l}\n")).collect();
    format!(
        "apiVersion: kubevirt.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{pre}{body}"
    )
}

/// A `registry` DataVolume template named `disk` (spec.pvc, Filesystem, `size`).
fn registry_dv(url: &str, secret: Option<&str>, size: &str) -> String {
    named_registry_dv("disk", url, secret, size)
}

/// A `registry` DataVolume template (spec.pvc, Filesystem, `size`).
fn named_registry_dv(name: &str, url: &str, secret: Option<&str>, size: &str) -> String {
    format!(
        "    - metadata:
        name: {name}
      spec:
        source:
          registry:
            url: \"{url}\"
{}        pvc:
          accessModes:
            - ReadWriteOnce
          resources:
            requests:
              storage: {size}
",
        secret
            .map(|s| format!("            secretRef: {s}\n"))
            .unwrap_or_default()
    )
}

/// A Secret document with CDI's registry keys.
fn secret_doc(name: &str, user: &str, password: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ntype: Opaque\ndata:\n  accessKeyId: {}\n  secretKey: {}\n",
        b64(user),
        b64(password)
    )
}

/// A launcher run of one test: its directory, storage, cache and arguments.
struct Run {
    pod: Pod,
    /// `--vm` (a VirtualMachine) or `--vmi`.
    flag: &'static str,
    /// `--container-disk-dir` instead of the cache.
    container_disk_dir: Option<PathBuf>,
}

impl Run {
    fn new(name: &str, flag: &'static str) -> Run {
        Run {
            pod: Pod::new(name),
            flag,
            container_disk_dir: None,
        }
    }

    fn file(&self) -> PathBuf {
        self.pod.dir.join("guest.yaml")
    }

    fn write(&self, yaml: &str) {
        fs::write(self.file(), yaml).unwrap();
    }

    fn storage(&self) -> PathBuf {
        self.pod.dir.join("storage")
    }

    fn cache(&self) -> PathBuf {
        self.pod.dir.join("cd-cache")
    }

    fn claim(&self) -> PathBuf {
        self.storage().join("claims/default/disk")
    }

    fn args(&self) -> Vec<String> {
        let (cd_flag, cd_dir) = match &self.container_disk_dir {
            Some(d) => ("--container-disk-dir", d.clone()),
            None => ("--container-disk-cache", self.cache()),
        };
        [
            "run",
            self.flag,
            self.file().to_str().unwrap(),
            "--storage-dir",
            self.storage().to_str().unwrap(),
            cd_flag,
            cd_dir.to_str().unwrap(),
            "--domain-type",
            "qemu",
            "--json-logs",
            "--runtime-dir",
            self.pod.runtime_dir().to_str().unwrap(),
            "--kernel-boot-dir",
            guest_dir().to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    fn start(&mut self) {
        let args = self.args();
        self.pod.start_launcher(&args);
    }

    fn stop(&mut self) {
        self.pod.stop_cleanly();
    }

    /// Runs the launcher expecting it to fail before any VM starts; the one error line.
    fn fails(&self) -> String {
        self.pod.fails_before_any_vm(&self.args())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(child) = self.pod.child.as_mut() {
            testkit::procs::terminate(child, Duration::from_secs(40));
        }
    }
}

/// Names in `dir`, sorted.
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

/// A qcow2 disk in `/disk/` of an image in a registry with token authentication (as Docker
/// Hub, quay.io and ghcr.io do it): the Secret in the same file (as `kubectl apply -f` takes
/// it) gives CDI's `accessKeyId`/`secretKey`, which buy a pull token; the claim holds the
/// image's data (checksum) and the guest reads it.
#[test]
fn registry_import_with_a_token_boots() {
    let mut run = Run::new("reg-import", "--vm");
    let registry = Registry::start(
        &run.pod.dir.join("registry"),
        Auth::Token("tester", "s3cret"),
    );
    let raw = raw_image("registry-content", 8 * MIB);
    let image = qcow2(&run.pod.dir.join("scratch"), &raw);
    registry.push("disks/guest:v1", &[("disk/disk.qcow2", &image)]);
    // Two layers, the disk (raw, gzip-compressed, as CDI takes it) in the upper one.
    let raw2 = raw_image("registry-gzip-content", 5 * MIB);
    let gz = gzip(&raw2);
    registry.push_layers(
        "disks/layered:v2",
        &[
            &[("etc/os-release", b"ID=test\n")],
            &[("disk/disk.img.gz", &gz)],
        ],
    );
    let url = format!("docker://{}/disks/guest:v1", registry.host());
    let url2 = format!("docker://{}/disks/layered:v2", registry.host());
    run.write(&format!(
        "{}{}",
        guest_yaml(
            "VirtualMachine",
            &run.pod.name,
            "lv.read=vda lv.read=vdb",
            &format!(
                "{}{}",
                registry_dv(&url, Some("reg-creds"), "64Mi"),
                named_registry_dv("second", &url2, Some("reg-creds"), "16Mi")
            ),
            &[
                ("disk", "  dataVolume:\n    name: disk\n"),
                ("second", "  dataVolume:\n    name: second\n"),
            ],
        ),
        secret_doc("reg-creds", "tester", "s3cret")
    ));

    run.start();
    run.pod.wait_console("LV-READ vda registry-content", BOOT);
    run.pod
        .wait_console("LV-READ vdb registry-gzip-content", BOOT);
    let second = fs::read(run.storage().join("claims/default/second/disk.img")).unwrap();
    assert_eq!(checksum(&second[..raw2.len()]), checksum(&raw2));
    drop(second);
    // spec.pvc 64Mi less CDI's 5.5 % filesystem overhead = 60 MiB.
    let disk = run.claim().join("disk.img");
    let got = fs::read(&disk).unwrap();
    assert_eq!(got.len() as u64, 60 * MIB, "claim size");
    assert_eq!(
        checksum(&got[..raw.len()]),
        checksum(&raw),
        "the claim's data differs from the image's"
    );
    assert!(got[raw.len()..].iter().all(|b| *b == 0));
    drop(got);
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(run.claim().join("claim.json")).unwrap()).unwrap();
    assert_eq!(meta["source"]["registry"]["url"], url.as_str());
    assert_eq!(meta["source"]["registry"]["secretRef"], "reg-creds");
    assert_eq!(entries(&run.claim()), ["claim.json", "disk.img"]);
    let log = run.pod.log();
    assert!(
        log.contains("pulling the image's disk") && log.contains("\"file\":\"disk/disk.qcow2\""),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "the password reached the log");
    let scopes = registry
        .tokens
        .as_ref()
        .unwrap()
        .scopes
        .lock()
        .unwrap()
        .clone();
    assert!(
        scopes.contains(&"repository:disks/guest:pull auth=true".to_string()),
        "no pull token asked with credentials: {scopes:?}"
    );
    run.stop();
}

/// Bad registry input: one line naming the DataVolume and the reason; no claim left behind.
#[test]
fn registry_bad_input_names_the_datavolume_and_leaves_nothing() {
    let run = Run::new("reg-bad", "--vm");
    let registry = Registry::start(
        &run.pod.dir.join("registry"),
        Auth::Basic("tester", "s3cret"),
    );
    let scratch = run.pod.dir.join("scratch");
    let small = qcow2(&scratch, &raw_image("small", 4 * MIB));
    registry.push("disks/guest:v1", &[("disk/disk.qcow2", &small)]);
    registry.push("disks/nodisk:v1", &[("etc/motd", b"no disk here\n")]);
    registry.push(
        "disks/two:v1",
        &[("disk/a.qcow2", &small), ("disk/b.qcow2", &small)],
    );
    registry.push(
        "disks/big:v1",
        &[("disk/disk.qcow2", &empty_qcow2(&scratch, 1 << 30))],
    );
    // Multi-platform indexes: the amd64 entry is the one without a disk (so picking it shows),
    // and an index without amd64.
    registry.push("disks/multi:amd64", &[("etc/motd", b"amd64 variant\n")]);
    registry.push("disks/multi:arm64", &[("disk/disk.qcow2", &small)]);
    registry.push_index(
        "disks/multi",
        "v1",
        &[("linux/arm64", "arm64"), ("linux/amd64", "amd64")],
    );
    registry.push_index("disks/multi", "armonly", &[("linux/arm64", "arm64")]);
    let host = registry.host();
    let good_secret = secret_doc("reg-creds", "tester", "s3cret");
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "image without /disk/",
            format!("docker://{host}/disks/nodisk:v1"),
            good_secret.clone(),
            "has no disk: no file under /disk/",
        ),
        (
            "two files in /disk/",
            format!("docker://{host}/disks/two:v1"),
            good_secret.clone(),
            "/disk/ in the image holds more than one file",
        ),
        (
            "index: the linux/amd64 variant is taken",
            format!("docker://{host}/disks/multi:v1"),
            good_secret.clone(),
            "the image has no disk: no file under /disk/",
        ),
        (
            "index without linux/amd64",
            format!("docker://{host}/disks/multi:armonly"),
            good_secret.clone(),
            "the image has no linux/amd64 variant (it has linux/arm64)",
        ),
        (
            "unknown tag",
            format!("docker://{host}/disks/guest:v9"),
            good_secret.clone(),
            "disks/guest:v9 not found in registry",
        ),
        (
            "wrong credentials",
            format!("docker://{host}/disks/guest:v1"),
            secret_doc("reg-creds", "tester", "wrong"),
            "refused the credentials of user \"tester\"",
        ),
        (
            "missing Secret",
            format!("docker://{host}/disks/guest:v1"),
            String::new(),
            "secretRef: Secret \"reg-creds\" is not in",
        ),
        (
            "larger than the claim",
            format!("docker://{host}/disks/big:v1"),
            good_secret.clone(),
            "image virtual size 1073741824 bytes exceeds the claim's usable size 31457280 bytes",
        ),
        (
            "registry down",
            format!("docker://127.0.0.1:{}/disks/guest:v1", free_port()),
            good_secret.clone(),
            "unreachable",
        ),
    ];
    for (what, url, secret, want) in &cases {
        run.write(&format!(
            "{}{secret}",
            guest_yaml(
                "VirtualMachine",
                &run.pod.name,
                "",
                &registry_dv(url, Some("reg-creds"), "32Mi"),
                &[("disk", "  dataVolume:\n    name: disk\n")],
            )
        ));
        let line = run.fails();
        eprintln!("{what}: {line}");
        assert!(
            line.starts_with("virt-launcher: DataVolume default/disk: "),
            "{what}: {line}"
        );
        assert!(line.contains(want), "{what}: want {want:?} in\n{line}");
        assert!(!line.contains("s3cret"), "{what}: password in {line}");
        assert!(
            !run.claim().exists(),
            "{what}: claim directory left: {:?}",
            entries(&run.claim())
        );
    }
    // certConfigMap: the ConfigMap must be in the file and hold a PEM certificate (a
    // loopback registry is reached over plain http, where it is not used).
    for (doc, want) in [
        (
            String::new(),
            "certConfigMap: ConfigMap \"reg-ca\" is not in",
        ),
        (
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: reg-ca\ndata:\n  ca.crt: nonsense\n".to_string(),
            "certConfigMap: ConfigMap \"reg-ca\" has no key \"ca.pem\"",
        ),
        (
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: reg-ca\ndata:\n  ca.pem: nonsense\n".to_string(),
            "certConfigMap: ca.pem of ConfigMap \"reg-ca\" holds no PEM certificate",
        ),
    ] {
        let dv = registry_dv(&format!("docker://{host}/disks/guest:v1"), Some("reg-creds"), "32Mi")
            .replace("secretRef: reg-creds\n", "secretRef: reg-creds\n            certConfigMap: reg-ca\n");
        run.write(&format!(
            "{}{good_secret}{doc}",
            guest_yaml(
                "VirtualMachine",
                &run.pod.name,
                "",
                &dv,
                &[("disk", "  dataVolume:\n    name: disk\n")],
            )
        ));
        let line = run.fails();
        assert!(
            line.starts_with("virt-launcher: DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source.registry.")
                && line.contains(want),
            "want {want:?} in\n{line}"
        );
        assert!(!run.claim().exists());
    }

    // Token authentication: wrong credentials are refused by the token service.
    let tokens = Registry::start(
        &run.pod.dir.join("token-registry"),
        Auth::Token("tester", "s3cret"),
    );
    tokens.push("disks/guest:v1", &[("disk/disk.qcow2", &small)]);
    run.write(&format!(
        "{}{}",
        guest_yaml(
            "VirtualMachine",
            &run.pod.name,
            "",
            &registry_dv(
                &format!("docker://{}/disks/guest:v1", tokens.host()),
                Some("reg-creds"),
                "32Mi"
            ),
            &[("disk", "  dataVolume:\n    name: disk\n")],
        ),
        secret_doc("reg-creds", "tester", "wrong")
    ));
    let line = run.fails();
    assert!(
        line.starts_with("virt-launcher: DataVolume default/disk: ")
            && line.contains("refused the credentials of user \"tester\""),
        "{line}"
    );
    assert!(!run.claim().exists());

    // Without secretRef against a registry that wants credentials.
    run.write(&guest_yaml(
        "VirtualMachine",
        &run.pod.name,
        "",
        &registry_dv(&format!("docker://{host}/disks/guest:v1"), None, "32Mi"),
        &[("disk", "  dataVolume:\n    name: disk\n")],
    ));
    let line = run.fails();
    assert!(
        line.contains("DataVolume default/disk: ")
            && line.contains("requires credentials for disks/guest (give secretRef)"),
        "{line}"
    );
    assert!(!run.claim().exists());
    assert!(run.pod.leftover_processes().is_empty());
}

/// A standalone containerDisk is pulled into the cache by digest and runs under an overlay
/// that is new at every start and removed at stop: the first run's writes are gone in the
/// second (a planted stale overlay is not reused either). `:latest` is resolved at every start
/// (kubelet's `Always`): a new image pushed under it is a new cache entry, the old one is left
/// as it was. Bad references name the volume; nothing is started or cached.
#[test]
fn container_disk_is_pulled_cached_and_ephemeral() {
    let mut run = Run::new("reg-cd", "--vmi");
    let registry = Registry::start(&run.pod.dir.join("registry"), Auth::None);
    let scratch = run.pod.dir.join("scratch");
    let first = qcow2(&scratch, &raw_image("container-disk-content", 8 * MIB));
    registry.push("disks/cd:latest", &[("disk/disk.qcow2", &first)]);
    let host = registry.host();
    let name = run.pod.name.clone();
    let vmi = |args: &str, image: &str, policy: &str| {
        guest_yaml(
            "VirtualMachineInstance",
            &name,
            args,
            "",
            &[(
                "disk",
                &format!("  containerDisk:\n    image: {image}\n{policy}"),
            )],
        )
    };

    // Bad references first: nothing is started, nothing cached.
    for (image, policy, want) in [
        (
            format!("{host}/disks/cd:v9"),
            "",
            "disks/cd:v9 not found in registry",
        ),
        (
            format!("127.0.0.1:{}/disks/cd:v1", free_port()),
            "",
            "unreachable",
        ),
        (
            format!("{host}/disks/cd"),
            "    imagePullPolicy: Never\n",
            "not in the cache",
        ),
        (
            // Not loopback: https (`.invalid` never resolves).
            "registry.invalid/disks/cd:v1".to_string(),
            "",
            "registry https://registry.invalid unreachable",
        ),
    ] {
        run.write(&vmi("", &image, policy));
        let line = run.fails();
        assert!(
            line.starts_with(&format!(
                "virt-launcher: volume disk: containerDisk image {image:?}: "
            )) && line.contains(want),
            "{line}"
        );
    }
    assert_eq!(entries(&run.cache()), [".lock", "refs"]);
    assert!(entries(&run.cache().join("refs")).is_empty());

    let image = format!("{host}/disks/cd");
    run.write(&vmi("lv.write=vda:written-by-run-1", &image, ""));
    run.start();
    run.pod.wait_console("LV-WROTE vda written-by-run-1", BOOT);
    let overlay_dir = run.pod.runtime_dir().join("ephemeral/disk-data/disk");
    assert!(
        overlay_dir.join("disk.qcow2").exists(),
        "{}",
        run.pod.dump()
    );
    run.stop();
    assert!(!overlay_dir.exists(), "the overlay outlived the run");
    assert!(!run.pod.runtime_dir().join("container-disks").exists());
    // The cache holds the image's disk as pushed, read-only, under its manifest digest.
    let cached = |run: &Run| -> Vec<PathBuf> {
        entries(&run.cache())
            .into_iter()
            .filter(|e| e.starts_with("sha256-"))
            .map(|e| run.cache().join(e).join("disk.img"))
            .collect()
    };
    let disks = cached(&run);
    assert_eq!(disks.len(), 1, "{:?}", entries(&run.cache()));
    assert_eq!(checksum(&fs::read(&disks[0]).unwrap()), checksum(&first));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&disks[0]).unwrap().permissions().mode() & 0o222,
        0
    );

    // A stale overlay from a killed run would be reused if it were kept: plant one.
    fs::create_dir_all(&overlay_dir).unwrap();
    fs::File::create(overlay_dir.join("disk.qcow2"))
        .unwrap()
        .write_all(b"stale overlay")
        .unwrap();
    run.write(&vmi("lv.read=vda", &image, ""));
    run.start();
    run.pod
        .wait_console("LV-READ vda container-disk-content", BOOT);
    assert!(
        run.pod
            .log()
            .contains("containerDisk image already in the cache"),
        "{}",
        run.pod.dump()
    );
    run.stop();
    assert!(!overlay_dir.exists());

    // A new image under the same tag: a new cache entry; the old one is untouched.
    let second = qcow2(&scratch, &raw_image("container-disk-content-2", 8 * MIB));
    registry.push("disks/cd:latest", &[("disk/disk.qcow2", &second)]);
    run.start();
    run.pod
        .wait_console("LV-READ vda container-disk-content-2", BOOT);
    run.stop();
    let now = cached(&run);
    assert_eq!(now.len(), 2, "{:?}", entries(&run.cache()));
    assert!(now.contains(&disks[0]));
    assert_eq!(checksum(&fs::read(&disks[0]).unwrap()), checksum(&first));
    let new = now.iter().find(|d| **d != disks[0]).unwrap();
    assert_eq!(checksum(&fs::read(new).unwrap()), checksum(&second));

    // Offline: --container-disk-dir holds the image as KubeVirt's pod would (disk_<index>.img,
    // raw here); nothing is pulled, the overlay still goes at stop and the file is unchanged.
    let offline = run.pod.dir.join("offline");
    fs::create_dir_all(&offline).unwrap();
    let raw = raw_image("offline-content", 4 * MIB);
    fs::write(offline.join("disk_0.img"), &raw).unwrap();
    run.container_disk_dir = Some(offline.clone());
    run.write(&vmi(
        "lv.write=vda:offline-write",
        "any.example/never/pulled:1",
        "",
    ));
    run.start();
    run.pod.wait_console("LV-WROTE vda offline-write", BOOT);
    assert!(!run.pod.log().contains("pulling containerDisk image"));
    run.stop();
    assert!(!overlay_dir.exists());
    assert_eq!(
        checksum(&fs::read(offline.join("disk_0.img")).unwrap()),
        checksum(&raw)
    );
}
