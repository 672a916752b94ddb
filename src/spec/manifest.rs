//! The one manifest reader: a file or string of JSON, or YAML with one or several documents,
//! split into its documents, with the guard against YAML flow nesting that would stall the
//! scanner. Every manifest the launcher reads (VMI, VM, DataVolume templates inside a VM)
//! comes through here; callers pick the document they want and deserialise it with
//! [`Manifest::deserialize`], whose errors name the field path as the user wrote it.

use super::SpecError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::Path;

/// Deepest YAML flow nesting (`[`/`{`) scanned; counted naively (brackets inside scalars
/// count too), hence well above the deserialiser's limit of 128 real levels.
pub const MAX_FLOW_DEPTH: usize = 256;

/// The largest manifest read (4 MiB, the gRPC default message size): Kubernetes stores an
/// object in at most ~1.5 MiB (etcd), so anything larger is not a KubeVirt object.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A manifest's documents (empty YAML documents left out) and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Names the source in error messages (the file's path).
    pub origin: String,
    pub docs: Vec<serde_json::Value>,
}

impl Manifest {
    /// Read and split `path`.
    pub fn read(path: &Path) -> Result<Manifest, SpecError> {
        use std::io::Read;
        let origin = path.display().to_string();
        let read_err = |source| SpecError::Read {
            origin: origin.clone(),
            source,
        };
        // Refused before anything is parsed, or even read past the limit (a pipe, a file that
        // grows): parsing a 200 MB VMI took 623 MB.
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            let size = std::fs::metadata(path)
                .map(|m| m.len())
                .unwrap_or(bytes.len() as u64)
                .max(bytes.len() as u64);
            return Err(SpecError::TooLarge { origin, size });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Manifest::parse(&text, &origin)
    }

    /// Split `text` (JSON, or YAML documents); `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, SpecError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(SpecError::TooLarge {
                origin: origin.to_string(),
                size: text.len() as u64,
            });
        }
        let syntax = |reason: String| SpecError::Syntax {
            origin: origin.to_string(),
            reason,
        };
        let docs = if text.trim_start().starts_with('{') {
            vec![serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?]
        } else {
            // The YAML scanner's time grows with the square of the flow nesting depth: 20 000
            // `[` take seconds, 1 MiB of them hours. No spec nests that deep (the
            // deserialiser's own limit is 128 levels): refuse before scanning.
            if let Some(line) = too_deep_flow(text) {
                return Err(syntax(format!(
                    "more than {MAX_FLOW_DEPTH} nested '[' or '{{' (line {line})"
                )));
            }
            let mut docs = Vec::new();
            for de in serde_norway::Deserializer::from_str(text) {
                let v = serde_json::Value::deserialize(de).map_err(|e| syntax(e.to_string()))?;
                if !v.is_null() {
                    docs.push(v);
                }
            }
            docs
        };
        Ok(Manifest {
            origin: origin.to_string(),
            docs,
        })
    }

    /// The first document of `kind`.
    pub fn find_kind(&self, kind: &str) -> Option<&serde_json::Value> {
        self.docs.iter().find(|d| str_field(d, "kind") == kind)
    }

    /// `doc` (one of [`Manifest::docs`]) as a `T`; an error names the field path
    /// (`spec.template.spec.domain.cpu.cores`) and the reason.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        doc: &serde_json::Value,
    ) -> Result<T, SpecError> {
        serde_path_to_error::deserialize(doc).map_err(|e| SpecError::Field {
            origin: self.origin.clone(),
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })
    }
}

impl Manifest {
    /// [`Manifest::deserialize`], telling `on_skip` the path of every field the model does
    /// not read.
    pub fn deserialize_tracking<T: DeserializeOwned>(
        &self,
        doc: &serde_json::Value,
        on_skip: &mut dyn FnMut(Vec<super::fields::Seg>),
    ) -> Result<T, SpecError> {
        let mut callback = |path: serde_ignored::Path| on_skip(super::fields::segments(&path));
        let de = serde_ignored::Deserializer::new(doc, &mut callback);
        serde_path_to_error::deserialize(de).map_err(|e| SpecError::Field {
            origin: self.origin.clone(),
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })
    }
}

/// A top-level string field of a document (`kind`, `apiVersion`), or "".
pub(super) fn str_field<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v.get(k).and_then(|s| s.as_str()).unwrap_or_default()
}

/// The line where the naive `[`/`{` depth first passes [`MAX_FLOW_DEPTH`], if it does.
fn too_deep_flow(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(line);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' => line += 1,
            _ => {}
        }
    }
    None
}
