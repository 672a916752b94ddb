//! A CDI DataVolume template (`spec.dataVolumeTemplates[]` of a VirtualMachine) read into what
//! standalone import needs. The VM model keeps the template's `spec` as raw JSON; this module
//! validates it field by field so that errors name the DataVolume and the field.

use serde_json::Value;

use super::DataVolumeError;
use crate::spec::cdi::{usable_space, FilesystemOverhead, ALIGN};
use crate::spec::{is_dns1123_label, is_dns1123_subdomain, Quantity};

/// `namespace/name` of a DataVolume or claim.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `source.http`: an image (raw/qcow2, optionally gz/xz compressed) fetched with GET.
    Http { url: String, headers: Vec<String> },
    /// `source.pvc`: a copy of another local claim.
    Pvc(ClaimRef),
    /// `source.blank`: an empty (zero) disk.
    Blank,
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Http { .. } => "http",
            Source::Pvc(_) => "pvc",
            Source::Blank => "blank",
        }
    }
}

/// `spec.pvc` (a plain PVC spec: no overhead added by CDI) or `spec.storage` (CDI sizes the
/// claim so that the requested size is usable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageForm {
    Pvc,
    Storage,
}

impl StorageForm {
    pub fn field(self) -> &'static str {
        match self {
            StorageForm::Pvc => "spec.pvc",
            StorageForm::Storage => "spec.storage",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

impl VolumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// Access modes Kubernetes knows.
pub const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// A validated DataVolume template.
#[derive(Clone, Debug, PartialEq)]
pub struct DataVolumeSpec {
    pub claim: ClaimRef,
    pub source: Source,
    /// `spec.source` as written (recorded in the claim's metadata).
    pub source_json: Value,
    pub form: StorageForm,
    /// `resources.requests.storage` as written, and in bytes. `None` only for a `storage`-form
    /// clone, which takes the source's size (as CDI does).
    pub requested: Option<(String, u64)>,
    pub volume_mode: VolumeMode,
    pub access_modes: Vec<String>,
    pub preallocation: bool,
}

impl DataVolumeSpec {
    /// Size of the disk the VM sees for a claim of `requested` bytes:
    /// - Block: the requested size rounded up to 1 MiB (the loop device's size);
    /// - Filesystem, `spec.storage`: the requested size rounded up to 1 MiB — CDI enlarges the
    ///   PVC by the filesystem overhead so that the whole request is usable;
    /// - Filesystem, `spec.pvc`: CDI's `GetUsableSpace`: the PVC minus 5.5 % filesystem overhead,
    ///   rounded down to 1 MiB (a 20Gi claim holds a 19353 MiB disk.img).
    pub fn disk_size(&self, requested: u64) -> u64 {
        match (self.volume_mode, self.form) {
            (VolumeMode::Filesystem, StorageForm::Pvc) => {
                usable_space(requested, FilesystemOverhead::DEFAULT)
            }
            _ => requested.div_ceil(ALIGN).saturating_mul(ALIGN),
        }
    }

    /// `ReadWriteMany` claims can be used by two launchers at once (live migration).
    pub fn shared(&self) -> bool {
        self.access_modes.iter().any(|m| m == "ReadWriteMany")
    }
}

/// Read `spec.dataVolumeTemplates[index]` (`metadata` and `spec`) for a VM in `namespace`.
pub fn parse(
    namespace: &str,
    template_name: &str,
    template_namespace: Option<&str>,
    spec: &Value,
) -> Result<DataVolumeSpec, DataVolumeError> {
    let claim = ClaimRef {
        namespace: namespace.to_string(),
        name: template_name.to_string(),
    };
    let dv = claim.to_string();
    let field_err = |field: &str, reason: String| DataVolumeError::Spec {
        dv: dv.clone(),
        field: field.to_string(),
        reason,
    };
    if !is_dns1123_subdomain(template_name) {
        return Err(field_err(
            "metadata.name",
            format!("{template_name:?} is not a DNS-1123 name"),
        ));
    }
    if let Some(ns) = template_namespace {
        if !ns.is_empty() && ns != namespace {
            return Err(field_err(
                "metadata.namespace",
                format!("{ns:?} differs from the VirtualMachine's namespace {namespace:?}"),
            ));
        }
    }
    if !spec.is_object() {
        return Err(field_err("spec", "is missing or not an object".into()));
    }

    if let Some(ct) = spec.get("contentType").and_then(Value::as_str) {
        if ct != "kubevirt" {
            return Err(DataVolumeError::Unsupported {
                dv: dv.clone(),
                what: format!("spec.contentType {ct:?}"),
                reason: "standalone mode imports disk images only (contentType kubevirt)".into(),
            });
        }
    }

    let source_json = spec.get("source").cloned().unwrap_or(Value::Null);
    let source = parse_source(&claim, spec, &source_json)?;

    let (form, storage) = match (spec.get("pvc"), spec.get("storage")) {
        (Some(_), Some(_)) => {
            return Err(field_err(
                "spec",
                "has both pvc and storage: use one of them".into(),
            ))
        }
        (Some(p), None) => (StorageForm::Pvc, p),
        (None, Some(s)) => (StorageForm::Storage, s),
        (None, None) => {
            return Err(field_err(
                "spec",
                "needs pvc or storage (the claim's size and access modes)".into(),
            ))
        }
    };
    let f = |rest: &str| format!("{}.{rest}", form.field());
    if !storage.is_object() {
        return Err(field_err(form.field(), "is not an object".into()));
    }

    let requested = match storage.pointer("/resources/requests/storage") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let q: Quantity = serde_json::from_value(v.clone()).map_err(|_| {
                field_err(
                    &f("resources.requests.storage"),
                    format!("{v} is not a quantity"),
                )
            })?;
            let bytes = q
                .value()
                .map_err(|e| field_err(&f("resources.requests.storage"), e.to_string()))?;
            Some((q.0, bytes))
        }
    };
    let clone_infers_size = form == StorageForm::Storage && matches!(source, Source::Pvc(_));
    if requested.is_none() && !clone_infers_size {
        return Err(field_err(
            &f("resources.requests.storage"),
            "is required (the size of the claim)".into(),
        ));
    }

    let volume_mode = match storage.get("volumeMode") {
        None | Some(Value::Null) => VolumeMode::Filesystem,
        Some(Value::String(s)) if s == "Filesystem" => VolumeMode::Filesystem,
        Some(Value::String(s)) if s == "Block" => VolumeMode::Block,
        Some(other) => {
            return Err(field_err(
                &f("volumeMode"),
                format!("{other} is not Filesystem or Block"),
            ))
        }
    };

    let mut access_modes = Vec::new();
    match storage.get("accessModes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(modes)) => {
            for (i, m) in modes.iter().enumerate() {
                match m.as_str() {
                    Some(s) if ACCESS_MODES.contains(&s) => {
                        if !access_modes.iter().any(|x| x == s) {
                            access_modes.push(s.to_string());
                        }
                    }
                    _ => {
                        return Err(field_err(
                            &f(&format!("accessModes[{i}]")),
                            format!("{m} is not one of {}", ACCESS_MODES.join(", ")),
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(field_err(
                &f("accessModes"),
                format!("{other} is not a list"),
            ))
        }
    }
    if access_modes.is_empty() {
        // A storage profile would pick one in a cluster; ReadWriteOnce is the safe default.
        access_modes.push("ReadWriteOnce".to_string());
    }

    let preallocation = match spec.get("preallocation") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(field_err(
                "spec.preallocation",
                format!("{other} is not true or false"),
            ))
        }
    };

    let spec = DataVolumeSpec {
        claim,
        source,
        source_json,
        form,
        requested,
        volume_mode,
        access_modes,
        preallocation,
    };
    if let Some((text, bytes)) = &spec.requested {
        if spec.disk_size(*bytes) == 0 {
            return Err(field_err(
                &f("resources.requests.storage"),
                format!("{text} leaves no room for a disk (at least 1Mi usable is needed)"),
            ));
        }
    }
    Ok(spec)
}

fn parse_source(claim: &ClaimRef, spec: &Value, source: &Value) -> Result<Source, DataVolumeError> {
    let dv = claim.to_string();
    let field_err = |field: &str, reason: String| DataVolumeError::Spec {
        dv: dv.clone(),
        field: field.to_string(),
        reason,
    };
    let unsupported = |what: &str, reason: &str| DataVolumeError::Unsupported {
        dv: dv.clone(),
        what: what.to_string(),
        reason: reason.to_string(),
    };
    let obj = match source {
        Value::Object(o) => o,
        Value::Null if spec.get("sourceRef").is_some() => return Err(unsupported(
            "spec.sourceRef",
            "a DataSource reference needs the cluster's CDI; give spec.source (http, pvc or blank)",
        )),
        Value::Null => {
            return Err(field_err(
                "spec.source",
                "is required (http, pvc or blank)".into(),
            ))
        }
        other => {
            return Err(field_err(
                "spec.source",
                format!("{other} is not an object"),
            ))
        }
    };
    let mut kinds = obj.iter().filter(|(_, v)| !v.is_null());
    let (kind, body) = match (kinds.next(), kinds.next()) {
        (Some(k), None) => k,
        (None, _) => {
            return Err(field_err(
                "spec.source",
                "names no source type (http, pvc or blank)".into(),
            ))
        }
        (Some((a, _)), Some((b, _))) => {
            return Err(field_err(
                "spec.source",
                format!("names two source types ({a} and {b}): use one"),
            ))
        }
    };
    match kind.as_str() {
        "http" => {
            let url = match body.get("url") {
                Some(Value::String(u)) if !u.trim().is_empty() => u.trim().to_string(),
                _ => {
                    return Err(field_err(
                        "spec.source.http.url",
                        "is required (a string)".into(),
                    ))
                }
            };
            for (key, why) in [
                ("secretRef", "a Secret"),
                ("secretExtraHeaders", "a Secret"),
                ("certConfigMap", "a ConfigMap (and TLS)"),
            ] {
                if body.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(unsupported(
                        &format!("spec.source.http.{key}"),
                        &format!("it needs {why}, which standalone mode does not have"),
                    ));
                }
            }
            let mut headers = Vec::new();
            if let Some(h) = body.get("extraHeaders").filter(|v| !v.is_null()) {
                let list = h.as_array().ok_or_else(|| {
                    field_err(
                        "spec.source.http.extraHeaders",
                        format!("{h} is not a list"),
                    )
                })?;
                for (i, item) in list.iter().enumerate() {
                    match item.as_str() {
                        Some(s) if valid_header(s) => headers.push(s.to_string()),
                        _ => {
                            return Err(field_err(
                                &format!("spec.source.http.extraHeaders[{i}]"),
                                format!("{item} is not a \"Name: value\" header"),
                            ))
                        }
                    }
                }
            }
            Ok(Source::Http { url, headers })
        }
        "pvc" => {
            let name = match body.get("name") {
                Some(Value::String(n)) if is_dns1123_subdomain(n) => n.clone(),
                other => {
                    return Err(field_err(
                        "spec.source.pvc.name",
                        format!(
                            "{} is not a claim name",
                            other.map_or("missing".to_string(), |v| v.to_string())
                        ),
                    ))
                }
            };
            let namespace = match body.get("namespace") {
                None | Some(Value::Null) => claim.namespace.clone(),
                Some(Value::String(n)) if n.is_empty() => claim.namespace.clone(),
                Some(Value::String(n)) if is_dns1123_label(n) => n.clone(),
                Some(other) => {
                    return Err(field_err(
                        "spec.source.pvc.namespace",
                        format!("{other} is not a namespace name"),
                    ))
                }
            };
            let source = ClaimRef { namespace, name };
            if &source == claim {
                return Err(field_err(
                    "spec.source.pvc",
                    "names the DataVolume itself".into(),
                ));
            }
            Ok(Source::Pvc(source))
        }
        "blank" => Ok(Source::Blank),
        "registry" => Err(unsupported(
            "spec.source.registry",
            "pulling a container image needs a registry, which standalone mode does not reach \
             (it works offline); serve the disk image over http, or use a containerDisk volume",
        )),
        "s3" | "gcs" | "upload" | "imageio" | "vddk" | "snapshot" => Err(unsupported(
            &format!("spec.source.{kind}"),
            "it needs services of a cluster (CDI); standalone mode imports http, pvc and blank",
        )),
        other => Err(field_err(
            "spec.source",
            format!("unknown source type {other:?} (standalone mode imports http, pvc and blank)"),
        )),
    }
}

fn valid_header(s: &str) -> bool {
    match s.split_once(':') {
        Some((name, value)) => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
                && !value.contains(['\r', '\n'])
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dv(spec: Value) -> Result<DataVolumeSpec, DataVolumeError> {
        parse("default", "disk", None, &spec)
    }

    #[test]
    fn seed_template_reads_as_pvc_form_http_rwo() {
        let s = dv(json!({
            "storageClassName": "my-fast-storage",
            "source": {"http": {"url": "http://example.com/my-vm-image.qcow2"}},
            "pvc": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}
        }))
        .expect("valid");
        assert_eq!(s.form, StorageForm::Pvc);
        assert_eq!(s.volume_mode, VolumeMode::Filesystem);
        assert!(!s.shared());
        assert_eq!(s.requested, Some(("20Gi".into(), 20 << 30)));
        // 0.945 × 20480 MiB = 19353.6 MiB, rounded down to whole MiB.
        assert_eq!(s.disk_size(20 << 30), 19353 << 20);
        assert_eq!(
            s.source,
            Source::Http {
                url: "http://example.com/my-vm-image.qcow2".into(),
                headers: vec![]
            }
        );
    }

    #[test]
    fn storage_form_keeps_the_requested_size_and_block_is_exact() {
        let s = dv(json!({"source": {"blank": {}},
            "storage": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100M"}}}}))
        .expect("valid");
        assert!(s.shared());
        // 100 MB rounded up to whole MiB.
        assert_eq!(s.disk_size(100_000_000), 96 << 20);
        let b = dv(json!({"source": {"blank": {}},
            "pvc": {"volumeMode": "Block", "resources": {"requests": {"storage": "64Mi"}}}}))
        .expect("valid");
        assert_eq!(b.volume_mode, VolumeMode::Block);
        assert_eq!(b.disk_size(64 << 20), 64 << 20);
        assert_eq!(b.access_modes, vec!["ReadWriteOnce".to_string()]);
    }

    #[test]
    fn clone_in_storage_form_may_omit_the_size() {
        let s = dv(json!({"source": {"pvc": {"name": "golden"}}, "storage": {}})).expect("valid");
        assert_eq!(
            s.source,
            Source::Pvc(ClaimRef {
                namespace: "default".into(),
                name: "golden".into()
            })
        );
        assert_eq!(s.requested, None);
        let err = dv(json!({"source": {"pvc": {"name": "golden"}}, "pvc": {}})).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.pvc.resources.requests.storage"),
            "{err}"
        );
    }

    #[test]
    fn bad_templates_name_the_field() {
        let cases = [
            (
                json!({"source": {"nfs": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.source: unknown source type \"nfs\"",
            ),
            (
                json!({"source": {"registry": {"url": "docker://x"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.source.registry is not supported",
            ),
            (
                json!({"source": {"http": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "spec.source.http.url: is required",
            ),
            (
                json!({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": "lots"}}}}),
                "spec.pvc.resources.requests.storage: \"lots\" is not a quantity",
            ),
            (
                json!({"source": {"blank": {}}, "pvc": {"volumeMode": "Raw", "resources": {"requests": {"storage": "1Gi"}}}}),
                "spec.pvc.volumeMode",
            ),
            (
                json!({"source": {"blank": {}}, "storage": {"accessModes": ["RWX"], "resources": {"requests": {"storage": "1Gi"}}}}),
                "spec.storage.accessModes[0]",
            ),
            (json!({"source": {"blank": {}}}), "needs pvc or storage"),
            (
                json!({"source": {"blank": {}, "http": {"url": "http://x"}}, "pvc": {}}),
                "names two source types",
            ),
            (
                json!({"sourceRef": {"kind": "DataSource", "name": "fedora"}, "pvc": {}}),
                "spec.sourceRef is not supported",
            ),
            (
                json!({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": "1Ki"}}}}),
                "leaves no room",
            ),
        ];
        for (spec, want) in cases {
            let err = dv(spec.clone()).expect_err(&spec.to_string()).to_string();
            assert!(err.contains(want), "{spec}: {err}");
            assert!(err.starts_with("DataVolume default/disk: "), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
