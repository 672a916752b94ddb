//! A small OCI distribution client: what CDI's registry importer and a containerDisk need from
//! a container registry — the disk file under `/disk/` of an image — and nothing more.
//!
//! - References as `docker`/`podman` write them (`host[:port]/repo[:tag|@sha256:…]`; no host
//!   means Docker Hub, one path component means `library/`); a DataVolume's URL has CDI's
//!   `docker://` prefix in front.
//! - Scheme: `http` for a registry on a loopback address (as Docker treats `127.0.0.0/8`
//!   as insecure), `https` otherwise (TLS comes from the agent the caller passes).
//! - Authentication: anonymous first; on `401` the `WWW-Authenticate` challenge decides:
//!   `Basic` (the credentials on each request) or `Bearer` (a token from the realm, asked
//!   with the credentials when there are some, for `repository:<repo>:pull`).
//! - Manifests: an OCI index or Docker manifest list picks `linux/amd64`; then an OCI image
//!   manifest or Docker schema 2 manifest (schema 1 is refused). At most 4 MiB each.
//! - Layers are streamed: the blob through a SHA-256 check, gzip (flate2) when compressed, tar;
//!   the top-most layer holding a regular file under `disk/` gives the disk, written sparsely.
//!   Nothing is held in memory beyond a 1 MiB buffer. A layer's digest is checked when it has
//!   been read to its end (every layer that is read is read to its end).
//!
//! The caller passes the `ureq::Agent` (plain HTTP in this build; a TLS one with a custom CA
//! where TLS is wired in).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::pod::image::{self as magic, Magic};

/// Largest manifest or token response read.
const MAX_DOCUMENT: u64 = 4 << 20;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why a pull failed, as one line (the caller names the DataVolume or volume and the image).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Reference(String),
    /// The registry could not be reached or the transfer broke.
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Image(String),
    #[error("{}: {reason}", path.display())]
    Io {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The disk is larger than allowed (bytes of the disk, or its qcow2 virtual size).
    #[error("the image's disk is {size} bytes, more than {limit}")]
    TooLarge { size: u64, limit: u64 },
}

/// `host[:port]/repository[:tag|@digest]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    pub repository: String,
    /// A tag, or a digest `sha256:<hex>`.
    pub reference: String,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.is_digest() { '@' } else { ':' };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

impl ImageRef {
    /// Parse an image reference (`docker://` prefix allowed).
    pub fn parse(text: &str) -> Result<ImageRef, RegistryError> {
        let bad = |why: &str| RegistryError::Reference(format!("{text:?} {why}"));
        let s = text.strip_prefix("docker://").unwrap_or(text);
        if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c == '\\') {
            return Err(bad("is not an image reference"));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(bad(&format!(
                "has scheme {scheme}://; a registry image is docker://host[:port]/repository[:tag]"
            )));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let (name, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let path = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !valid_host(&registry) {
            return Err(bad(&format!("names no valid registry host ({registry:?})")));
        }
        if !path.split('/').all(valid_path_component) {
            return Err(bad(&format!(
                "has an invalid repository {path:?} (lowercase letters, digits and . _ - between /)"
            )));
        }
        let reference = match (tag, digest) {
            (_, Some(d)) => {
                if !valid_digest(d) {
                    return Err(bad("has an invalid digest (want sha256:<64 hex digits>)"));
                }
                d.to_string()
            }
            (Some(t), None) => {
                if !valid_tag(t) {
                    return Err(bad(&format!("has an invalid tag {t:?}")));
                }
                t.to_string()
            }
            (None, None) => "latest".to_string(),
        };
        Ok(ImageRef {
            registry,
            repository: path,
            reference,
        })
    }

    pub fn is_digest(&self) -> bool {
        self.reference.starts_with("sha256:")
    }

    /// Whether the reference names the moving `latest` tag (explicitly or by default).
    pub fn is_latest(&self) -> bool {
        self.reference == "latest"
    }

    /// Whether the registry is reached over https (anything but a loopback address).
    pub fn is_https(&self) -> bool {
        self.base_url().starts_with("https://")
    }

    /// `http://host:port` for a loopback registry, `https://host` otherwise.
    fn base_url(&self) -> String {
        let host = if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        };
        let bare = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let loopback = bare == "localhost"
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme = if loopback { "http" } else { "https" };
        format!("{scheme}://{host}")
    }
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, tail.strip_prefix(':'))
            }
            None => return false,
        },
        None => match h.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(h), None),
        },
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

fn valid_path_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !t.starts_with(['.', '-'])
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// User name and password for the registry (CDI's Secret keys `accessKeyId` / `secretKey`).
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.username)
    }
}

/// A layer of the chosen manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    pub media_type: String,
    pub size: Option<u64>,
}

/// The image manifest for linux/amd64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// `sha256:<hex>` of the manifest's bytes: names the image's content.
    pub digest: String,
    pub layers: Vec<Layer>,
}

/// The disk file taken out of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFile {
    /// Its path in the image (`disk/<name>`).
    pub name: String,
    pub bytes: u64,
}

/// One registry and repository, with the authorization found so far.
pub struct Client<'a> {
    agent: &'a ureq::Agent,
    image: ImageRef,
    base: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
}

impl<'a> Client<'a> {
    pub fn new(agent: &'a ureq::Agent, image: ImageRef, credentials: Option<Credentials>) -> Self {
        let base = image.base_url();
        Client {
            agent,
            image,
            base,
            credentials,
            authorization: None,
        }
    }

    /// `GET <base><path>`; on `401` once authenticates as the challenge asks and retries.
    fn get(
        &mut self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, RegistryError> {
        let url = format!("{}{}", self.base, path);
        let mut retried = false;
        loop {
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(auth) = &self.authorization {
                req = req.header("Authorization", auth);
            }
            let resp = req.call().map_err(|e| {
                RegistryError::Transport(format!(
                    "registry {} unreachable: {}",
                    self.image.base_url(),
                    super::http::reason(&e)
                ))
            })?;
            if resp.status().as_u16() != 401 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if retried {
                return Err(self.refused());
            }
            retried = true;
            self.authenticate(&challenge)?;
        }
    }

    fn refused(&self) -> RegistryError {
        RegistryError::Auth(match &self.credentials {
            Some(c) => format!(
                "registry {} refused the credentials of user {:?} for {}",
                self.image.registry, c.username, self.image.repository
            ),
            None => format!(
                "registry {} requires credentials for {} (give secretRef)",
                self.image.registry, self.image.repository
            ),
        })
    }

    fn authenticate(&mut self, challenge: &str) -> Result<(), RegistryError> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let Some(c) = &self.credentials else {
                    return Err(self.refused());
                };
                self.authorization = Some(basic(c));
                Ok(())
            }
            "bearer" => {
                let realm = params.iter().find(|(k, _)| k == "realm").map(|(_, v)| v);
                let Some(realm) = realm else {
                    return Err(RegistryError::Auth(format!(
                        "registry {} asked for a bearer token without a realm",
                        self.image.registry
                    )));
                };
                if !realm.starts_with("http://") && !realm.starts_with("https://") {
                    return Err(RegistryError::Auth(format!(
                        "registry {} names a token realm that is not an http(s) URL: {realm:?}",
                        self.image.registry
                    )));
                }
                let mut url = realm.clone();
                let mut sep = if url.contains('?') { '&' } else { '?' };
                if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
                    url += &format!("{sep}service={}", percent_encode(service));
                    sep = '&';
                }
                let scope = format!("repository:{}:pull", self.image.repository);
                url += &format!("{sep}scope={}", percent_encode(&scope));
                let mut req = self.agent.get(&url);
                if let Some(c) = &self.credentials {
                    req = req.header("Authorization", basic(c));
                }
                let mut resp = req.call().map_err(|e| {
                    RegistryError::Transport(format!(
                        "token service {realm} unreachable: {}",
                        super::http::reason(&e)
                    ))
                })?;
                let status = resp.status().as_u16();
                if status == 401 || status == 403 {
                    return Err(self.refused());
                }
                if status != 200 {
                    return Err(RegistryError::Auth(format!(
                        "token service {realm} answered HTTP {status}"
                    )));
                }
                let body = read_document(&mut resp, "token response")?;
                let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                    RegistryError::Auth(format!("token service {realm} sent no JSON: {e}"))
                })?;
                let token = ["token", "access_token"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(|t| t.as_str()))
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        RegistryError::Auth(format!("token service {realm} sent no token"))
                    })?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(RegistryError::Auth(format!(
                "registry {} asks for an unsupported authentication ({})",
                self.image.registry,
                if challenge.is_empty() {
                    "no WWW-Authenticate header"
                } else {
                    challenge
                }
            ))),
        }
    }

    /// The image manifest for linux/amd64 (through an index or list when there is one).
    pub fn manifest(&mut self) -> Result<Manifest, RegistryError> {
        let reference = self.image.reference.clone();
        let (bytes, digest) = self.fetch_manifest(&reference)?;
        let doc = parse_manifest(&bytes)?;
        if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
            let pick = list.iter().find(|m| {
                m.pointer("/platform/os").and_then(|v| v.as_str()) == Some("linux")
                    && m.pointer("/platform/architecture").and_then(|v| v.as_str()) == Some("amd64")
            });
            let Some(pick) = pick else {
                let platforms: Vec<String> = list
                    .iter()
                    .map(|m| {
                        format!(
                            "{}/{}",
                            m.pointer("/platform/os")
                                .and_then(|v| v.as_str())
                                .unwrap_or("?"),
                            m.pointer("/platform/architecture")
                                .and_then(|v| v.as_str())
                                .unwrap_or("?")
                        )
                    })
                    .collect();
                return Err(RegistryError::Image(format!(
                    "the image has no linux/amd64 variant (it has {})",
                    if platforms.is_empty() {
                        "none".to_string()
                    } else {
                        platforms.join(", ")
                    }
                )));
            };
            let d = pick
                .get("digest")
                .and_then(|d| d.as_str())
                .filter(|d| valid_digest(d))
                .ok_or_else(|| {
                    RegistryError::Image(
                        "the index's linux/amd64 entry has no sha256 digest".to_string(),
                    )
                })?
                .to_string();
            let (bytes, digest) = self.fetch_manifest(&d)?;
            let doc = parse_manifest(&bytes)?;
            if doc.get("manifests").is_some() {
                return Err(RegistryError::Image(
                    "an index inside an index is not supported".to_string(),
                ));
            }
            return self.image_manifest(&doc, digest);
        }
        self.image_manifest(&doc, digest)
    }

    fn image_manifest(
        &self,
        doc: &serde_json::Value,
        digest: String,
    ) -> Result<Manifest, RegistryError> {
        let bad = |why: &str| RegistryError::Image(why.to_string());
        match doc.get("schemaVersion").and_then(|v| v.as_u64()) {
            Some(2) => {}
            Some(1) => return Err(bad("Docker schema 1 manifests are not supported")),
            _ => return Err(bad("the manifest has no schemaVersion 2")),
        }
        let layers = doc
            .get("layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| bad("the manifest lists no layers"))?;
        let mut out = Vec::new();
        for l in layers {
            let digest = l
                .get("digest")
                .and_then(|d| d.as_str())
                .filter(|d| valid_digest(d))
                .ok_or_else(|| bad("a layer has no sha256 digest"))?;
            out.push(Layer {
                digest: digest.to_string(),
                media_type: l
                    .get("mediaType")
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .to_string(),
                size: l.get("size").and_then(|s| s.as_u64()),
            });
        }
        if out.is_empty() {
            return Err(bad("the image has no layers (no /disk/ directory)"));
        }
        Ok(Manifest {
            digest,
            layers: out,
        })
    }

    /// The manifest's bytes and their digest; a manifest asked for by digest must match it.
    fn fetch_manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", self.image.repository);
        let mut resp = self.get(&path, Some(MANIFEST_TYPES))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let detail = registry_error_text(&mut resp);
            return Err(match status {
                404 => RegistryError::NotFound(format!(
                    "{} not found in registry {}{}",
                    if reference.starts_with("sha256:") {
                        format!("{}@{reference}", self.image.repository)
                    } else {
                        format!("{}:{reference}", self.image.repository)
                    },
                    self.image.registry,
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                )),
                403 => self.refused(),
                _ => RegistryError::Transport(format!(
                    "registry {} answered HTTP {status} for the manifest{}",
                    self.image.registry,
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                )),
            });
        }
        let bytes = read_document(&mut resp, "manifest")?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && digest != reference {
            return Err(RegistryError::Image(format!(
                "the registry sent a manifest whose digest is {digest}, not {reference}"
            )));
        }
        Ok((bytes, digest))
    }

    /// Stream the layers, top-most first, until one holds a file under `disk/`; write that
    /// file (sparsely) to `dest`. `limit`: refuse a disk larger than this (checked from the
    /// file's header before its data is read: a raw file's length, a qcow2 virtual size).
    /// `progress(bytes_so_far, total)` follows the disk file's bytes.
    pub fn extract_disk(
        &mut self,
        manifest: &Manifest,
        dest: &Path,
        limit: Option<u64>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<DiskFile, RegistryError> {
        for layer in manifest.layers.iter().rev() {
            if let Some(found) = self.layer_disk(layer, None, dest, limit, progress)? {
                return Ok(found);
            }
        }
        Err(RegistryError::Image(format!(
            "the image has no disk: no file under /disk/ in any of its {} layers (CDI and \
             containerDisk take the image's one file in /disk/)",
            manifest.layers.len()
        )))
    }

    /// [`Client::extract_disk`] for the file at `path` in the image (a containerDisk's
    /// `path`) instead of the one under `disk/`.
    pub fn extract_file(
        &mut self,
        manifest: &Manifest,
        path: &str,
        dest: &Path,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<DiskFile, RegistryError> {
        let want = path.trim_start_matches('/');
        for layer in manifest.layers.iter().rev() {
            if let Some(found) = self.layer_disk(layer, Some(want), dest, None, progress)? {
                return Ok(found);
            }
        }
        Err(RegistryError::Image(format!(
            "the image has no file /{want} in any of its {} layers",
            manifest.layers.len()
        )))
    }

    fn layer_disk(
        &mut self,
        layer: &Layer,
        want: Option<&str>,
        dest: &Path,
        limit: Option<u64>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Option<DiskFile>, RegistryError> {
        let gzip = layer.media_type.ends_with("gzip")
            || layer.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip";
        let plain_tar = layer.media_type.ends_with(".tar")
            || layer.media_type == "application/vnd.docker.image.rootfs.diff.tar";
        if !gzip && !plain_tar {
            return Err(RegistryError::Image(format!(
                "layer {} has media type {:?}; only tar and tar+gzip layers are supported",
                layer.digest, layer.media_type
            )));
        }
        let path = format!("/v2/{}/blobs/{}", self.image.repository, layer.digest);
        let mut resp = self.get(&path, None)?;
        let status = resp.status().as_u16();
        if status != 200 {
            let detail = registry_error_text(&mut resp);
            return Err(RegistryError::Transport(format!(
                "registry {} answered HTTP {status} for layer {}{}",
                self.image.registry,
                layer.digest,
                detail.map(|d| format!(" ({d})")).unwrap_or_default()
            )));
        }
        let body = resp.into_body().into_reader();
        let mut raw = Verified::new(body, &layer.digest, layer.size);
        let transport = |what: &str, e: io::Error| {
            RegistryError::Transport(format!(
                "layer {} {what}: {}",
                layer.digest,
                super::import::io_reason(&e)
            ))
        };
        let mut found: Option<DiskFile> = None;
        {
            let stream: Box<dyn Read + '_> = if gzip {
                Box::new(flate2::read::MultiGzDecoder::new(&mut raw))
            } else {
                Box::new(&mut raw)
            };
            let mut archive = tar::Archive::new(stream);
            let entries = archive
                .entries()
                .map_err(|e| transport("is not a tar archive", e))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| transport("cannot be read", e))?;
                let name = entry
                    .path()
                    .map_err(|e| transport("has a bad entry name", e))?
                    .to_string_lossy()
                    .into_owned();
                let file = match want {
                    None => match disk_entry_name(&name) {
                        Some(f) => format!("disk/{f}"),
                        None => continue,
                    },
                    Some(w) if name.trim_start_matches("./").trim_start_matches('/') == w => {
                        w.to_string()
                    }
                    Some(_) => continue,
                };
                let kind = entry.header().entry_type();
                if !kind.is_file() {
                    if kind.is_dir() {
                        continue;
                    }
                    return Err(RegistryError::Image(format!(
                        "/{file} in the image is not a regular file (a link or device)"
                    )));
                }
                if let Some(first) = &found {
                    return Err(RegistryError::Image(format!(
                        "/disk/ in the image holds more than one file (/{} and /{file}); it must hold one",
                        first.name
                    )));
                }
                let size = entry.size();
                let bytes =
                    write_disk(&mut entry, size, dest, limit, progress).map_err(|e| match e {
                        WriteError::Read(e) => transport("broke off", e),
                        WriteError::Write(e) => RegistryError::Io {
                            path: dest.to_path_buf(),
                            reason: super::import::io_reason(&e),
                        },
                        WriteError::TooLarge(size, limit) => {
                            RegistryError::TooLarge { size, limit }
                        }
                    })?;
                found = Some(DiskFile { name: file, bytes });
            }
            // The rest of the compressed stream (its trailer), so that the digest covers it.
            let mut rest = archive.into_inner();
            io::copy(&mut rest, &mut io::sink()).map_err(|e| transport("broke off", e))?;
        }
        io::copy(&mut raw, &mut io::sink()).map_err(|e| transport("broke off", e))?;
        raw.verify().map_err(|e| transport("is corrupt", e))?;
        Ok(found)
    }
}

/// `disk/<file>` (also `./disk/<file>`, `/disk/<file>`) → `<file>`; whiteouts and anything
/// deeper or elsewhere → None.
fn disk_entry_name(path: &str) -> Option<&str> {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    let file = p.strip_prefix("disk/")?.trim_end_matches('/');
    if file.is_empty() || file.contains('/') || file.starts_with(".wh.") {
        return None;
    }
    Some(file)
}

enum WriteError {
    Read(io::Error),
    Write(io::Error),
    TooLarge(u64, u64),
}

/// Write the tar entry (`size` bytes) to `dest` sparsely, after checking its header against
/// `limit`.
fn write_disk(
    entry: &mut impl Read,
    size: u64,
    dest: &Path,
    limit: Option<u64>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<u64, WriteError> {
    let mut head = Vec::with_capacity(512);
    entry
        .take(512)
        .read_to_end(&mut head)
        .map_err(WriteError::Read)?;
    if let Some(limit) = limit {
        let disk_size = match magic::classify(&head) {
            Magic::Qcow2 if head.len() >= 32 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[24..32]);
                Some(u64::from_be_bytes(b))
            }
            Magic::Raw => Some(size),
            // Compressed: the unpacked size is known only after unpacking.
            _ => None,
        };
        if let Some(s) = disk_size.filter(|s| *s > limit) {
            return Err(WriteError::TooLarge(s, limit));
        }
    }
    let mut out = File::create(dest).map_err(WriteError::Write)?;
    let mut done = 0u64;
    let mut whole = io::Cursor::new(head).chain(entry);
    super::http::sparse_copy(&mut whole, &mut out, |n| {
        done += n;
        progress(done, Some(size));
    })
    .map_err(|e| match e {
        super::http::CopyError::Read(e) => WriteError::Read(e),
        super::http::CopyError::Write(e) => WriteError::Write(e),
    })?;
    let written = done;
    out.set_len(written).map_err(WriteError::Write)?;
    if written != size {
        return Err(WriteError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the disk file ended after {written} of {size} bytes"),
        )));
    }
    Ok(written)
}

/// A reader that hashes what passes and checks digest and length at the end.
struct Verified<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    want: String,
    want_len: Option<u64>,
    ended: bool,
}

impl<R: Read> Verified<R> {
    fn new(inner: R, digest: &str, len: Option<u64>) -> Self {
        Verified {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            want: digest.to_string(),
            want_len: len,
            ended: false,
        }
    }

    fn verify(self) -> io::Result<()> {
        if !self.ended {
            return Err(io::Error::other("not read to its end"));
        }
        if let Some(l) = self.want_len.filter(|l| *l != self.bytes) {
            return Err(io::Error::other(format!(
                "{} bytes received, the manifest says {l}",
                self.bytes
            )));
        }
        let got = format!("sha256:{}", hex(&self.hasher.finalize()));
        if got != self.want {
            return Err(io::Error::other(format!("its content has digest {got}")));
        }
        Ok(())
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended = true;
        }
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn basic(c: &Credentials) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password))
    )
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `Bearer realm="…",service="…"` → (`Bearer`, [(realm, …), (service, …)]).
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (q[..i].to_string(), &q[i + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(i) => (after[..i].trim().to_string(), &after[i..]),
                None => (after.trim().to_string(), ""),
            }
        };
        params.push((key, value));
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_string(), params)
}

fn read_document(
    resp: &mut ureq::http::Response<ureq::Body>,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    resp.body_mut()
        .with_config()
        .limit(MAX_DOCUMENT)
        .read_to_vec()
        .map_err(|e| {
            RegistryError::Transport(format!(
                "cannot read the {what}: {}",
                super::http::reason(&e)
            ))
        })
}

fn parse_manifest(bytes: &[u8]) -> Result<serde_json::Value, RegistryError> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Image(format!("the manifest is not JSON: {e}")))
}

/// The message of a registry's error body (`{"errors":[{"code":…,"message":…}]}`), if any.
fn registry_error_text(resp: &mut ureq::http::Response<ureq::Body>) -> Option<String> {
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_vec()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let e = v.get("errors")?.as_array()?.first()?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
    let text = format!("{code} {msg}").trim().to_string();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_writes_them() {
        let r = ImageRef::parse("docker://127.0.0.1:5000/disks/fedora:40").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "disks/fedora", "40")
        );
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        assert_eq!(r.to_string(), "127.0.0.1:5000/disks/fedora:40");
        let r = ImageRef::parse("quay.io/containerdisks/fedora").unwrap();
        assert_eq!(r.reference, "latest");
        assert!(r.is_latest());
        assert_eq!(r.base_url(), "https://quay.io");
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.base_url(), "https://registry-1.docker.io");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/x@{d}")).unwrap();
        assert!(r.is_digest());
        assert_eq!(r.base_url(), "http://localhost:5000");
        assert_eq!(r.to_string(), format!("localhost:5000/x@{d}"));
        for bad in [
            "",
            "docker://",
            "http://host/x",
            "host:5000/UPPER",
            "host:5000/x:bad tag",
            "host:5000/x@sha256:abc",
            "host:99999/x",
            "host:5000/../x",
            "host:5000//x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn challenges_are_read() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull".into()),
            ]
        );
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p, vec![("realm".into(), "Registry Realm".into())]);
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    #[test]
    fn only_files_directly_under_disk_count() {
        assert_eq!(disk_entry_name("disk/disk.qcow2"), Some("disk.qcow2"));
        assert_eq!(disk_entry_name("./disk/x.img"), Some("x.img"));
        assert_eq!(disk_entry_name("/disk/x.img"), Some("x.img"));
        assert_eq!(disk_entry_name("disk/"), None);
        assert_eq!(disk_entry_name("disk/sub/x"), None);
        assert_eq!(disk_entry_name("disk/.wh.x"), None);
        assert_eq!(disk_entry_name("etc/disk/x"), None);
    }

    #[test]
    fn verified_reader_checks_digest_and_length() {
        let data = b"layer bytes".to_vec();
        let digest = format!("sha256:{}", hex(&Sha256::digest(&data)));
        let mut ok = Verified::new(&data[..], &digest, Some(data.len() as u64));
        io::copy(&mut ok, &mut io::sink()).unwrap();
        ok.verify().unwrap();
        let mut short = Verified::new(&data[..], &digest, Some(99));
        io::copy(&mut short, &mut io::sink()).unwrap();
        assert!(short.verify().is_err());
        let wrong = format!("sha256:{}", "0".repeat(64));
        let mut bad = Verified::new(&data[..], &wrong, None);
        io::copy(&mut bad, &mut io::sink()).unwrap();
        assert!(bad.verify().unwrap_err().to_string().contains("digest"));
    }
}
