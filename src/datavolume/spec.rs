//! A CDI DataVolume template (`spec.dataVolumeTemplates[]` of a VirtualMachine) read into what
//! standalone import needs. The VM model keeps the template's `spec` as raw JSON; this module
//! reads it into a serde model (with `serde_path_to_error`, as the VMI is read) and then checks
//! what serde cannot, so that every error names the DataVolume and the field as written in
//! the VM (`spec.dataVolumeTemplates[0].spec.source.http.url`).

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::claim::ClaimMeta;
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

/// `source.http` or `source.s3`: an image fetched over HTTP(S). Secrets and ConfigMaps are
/// named here and read from the manifest at import time (`virt-launcher-import`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Remote {
    pub url: String,
    /// `extraHeaders` (http only), `Name: value`.
    pub headers: Vec<String>,
    /// `secretRef`: a Secret with `accessKeyId` and `secretKey` (CDI's keys): basic auth for
    /// http, the S3 credentials for s3.
    pub secret_ref: Option<String>,
    /// `secretExtraHeaders` (http only): Secrets whose values are more `Name: value` headers.
    pub secret_extra_headers: Vec<String>,
    /// `certConfigMap`: a ConfigMap whose `ca.pem` is trusted besides the system roots.
    pub cert_config_map: Option<String>,
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `source.http`: an image (raw/qcow2, optionally gz/xz compressed) fetched with GET.
    Http(Remote),
    /// `source.s3`: an object of an S3-compatible store, path-style URL
    /// (`https://endpoint/bucket/key`; `s3://endpoint/bucket/key` is https), SigV4-signed.
    S3(Remote),
    /// `source.pvc`: a copy of another local claim.
    Pvc(ClaimRef),
    /// `source.blank`: an empty (zero) disk.
    Blank,
    /// `source.registry`: the one file under `/disk/` of a container image
    /// (`docker://host[:port]/repo[:tag|@digest]`), with CDI's Secret (`accessKeyId` /
    /// `secretKey`) and CA ConfigMap named by `secretRef` / `certConfigMap`.
    Registry {
        url: String,
        secret_ref: Option<String>,
        cert_config_map: Option<String>,
    },
    /// `source.snapshot` (namespace/name): a copy of a volume of a local VM snapshot
    /// (`<snapshot>` holding one volume, or `<snapshot>.<volume>`).
    Snapshot(ClaimRef),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Http(_) => "http",
            Source::S3(_) => "s3",
            Source::Pvc(_) => "pvc",
            Source::Blank => "blank",
            Source::Registry { .. } => "registry",
            Source::Snapshot(_) => "snapshot",
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

/// A validated DataVolume template.
#[derive(Clone, Debug, PartialEq)]
pub struct DataVolumeSpec {
    /// Its index in `spec.dataVolumeTemplates` (for field paths).
    pub index: usize,
    pub claim: ClaimRef,
    /// `spec.dataVolumeTemplates[i]`: where the template is, for error messages.
    pub template: String,
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

    /// What the claim directory records of this DataVolume (`claim.json`), for a disk of
    /// `size` bytes; `completed_at` empty while the claim is not complete.
    pub fn claim_meta(&self, size: u64, shared: bool, completed_at: String) -> ClaimMeta {
        ClaimMeta {
            name: self.claim.name.clone(),
            namespace: self.claim.namespace.clone(),
            source: self.source_json.clone(),
            requested: self
                .requested
                .as_ref()
                .map(|(t, _)| t.clone())
                .unwrap_or_default(),
            size,
            volume_mode: self.volume_mode,
            access_modes: self.access_modes.clone(),
            shared,
            completed_at,
        }
    }
}

// ------------------------------------------------------------------------------ the model

/// `spec` of a DataVolume template, as written. Unknown fields are ignored, as the VMI model
/// ignores them (a DataVolume a cluster accepts must read here too: `storageClassName`,
/// `priorityClassName`, checkpoints...), except unknown source types ([`SourceDoc`]).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SpecDoc {
    source: Option<SourceDoc>,
    source_ref: Option<IgnoredAny>,
    pvc: Option<StorageDoc>,
    storage: Option<StorageDoc>,
    content_type: Option<String>,
    preallocation: Option<bool>,
}

/// `spec.pvc` or `spec.storage`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct StorageDoc {
    resources: ResourcesDoc,
    volume_mode: Option<VolumeMode>,
    access_modes: Option<Vec<AccessMode>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ResourcesDoc {
    requests: RequestsDoc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestsDoc {
    storage: Option<Quantity>,
}

/// Access modes Kubernetes knows (named as Kubernetes names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[allow(clippy::enum_variant_names)]
enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

impl AccessMode {
    fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadOnlyMany => "ReadOnlyMany",
            AccessMode::ReadWriteMany => "ReadWriteMany",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

/// `spec.source.http`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct HttpDoc {
    url: Option<String>,
    extra_headers: Option<Vec<String>>,
    secret_ref: Option<String>,
    secret_extra_headers: Option<Vec<String>>,
    cert_config_map: Option<String>,
}

/// `spec.source.s3`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct S3Doc {
    url: Option<String>,
    secret_ref: Option<String>,
    cert_config_map: Option<String>,
}

/// `spec.source.registry` (CDI's `DataVolumeSourceRegistry`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RegistryDoc {
    url: Option<String>,
    image_stream: Option<String>,
    pull_method: Option<String>,
    secret_ref: Option<String>,
    cert_config_map: Option<String>,
    platform: Option<PlatformDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PlatformDoc {
    architecture: Option<String>,
}

/// `spec.source.pvc`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PvcSourceDoc {
    name: Option<String>,
    namespace: Option<String>,
}

/// One source type of `spec.source`, as written.
#[derive(Debug)]
enum SourceKind {
    Http(HttpDoc),
    S3(S3Doc),
    Pvc(PvcSourceDoc),
    /// `spec.source.snapshot`: the same two fields as `pvc`.
    Snapshot(PvcSourceDoc),
    Blank,
    Registry(RegistryDoc),
    /// A CDI source type that standalone mode cannot serve (its name).
    Unsupported(&'static str),
}

/// `spec.source`: the source types it names (a `null` one is not named). A type CDI does not
/// have is refused here, with its name.
#[derive(Debug, Default)]
struct SourceDoc {
    kinds: Vec<(String, SourceKind)>,
}

/// CDI fields of a DataVolume's `spec` that only the cluster acts on (storage classes,
/// scheduling, limits a claim does not use).
const CLUSTER_ONLY: &[&str] = &[
    "priorityClassName",
    "pvc.storageClassName",
    "storage.storageClassName",
    "pvc.volumeAttributesClassName",
    "storage.volumeAttributesClassName",
    "pvc.resources.limits",
    "storage.resources.limits",
];

/// CDI's source types that need a cluster (or a registry) to import from.
const CLUSTER_SOURCES: &[&str] = &["gcs", "upload", "imageio", "vddk"];

impl<'de> Deserialize<'de> for SourceDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Kinds;
        impl<'de> Visitor<'de> for Kinds {
            type Value = SourceDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "an object naming one source type (http, s3, registry, pvc, snapshot or blank)",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SourceDoc, A::Error> {
                let mut kinds = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let kind = match key.as_str() {
                        "http" => map.next_value::<Option<HttpDoc>>()?.map(SourceKind::Http),
                        "s3" => map.next_value::<Option<S3Doc>>()?.map(SourceKind::S3),
                        "pvc" => map
                            .next_value::<Option<PvcSourceDoc>>()?
                            .map(SourceKind::Pvc),
                        "snapshot" => map
                            .next_value::<Option<PvcSourceDoc>>()?
                            .map(SourceKind::Snapshot),
                        "blank" => map
                            .next_value::<Option<IgnoredAny>>()?
                            .map(|_| SourceKind::Blank),
                        "registry" => map
                            .next_value::<Option<RegistryDoc>>()?
                            .map(SourceKind::Registry),
                        k => match CLUSTER_SOURCES.iter().find(|c| **c == k) {
                            Some(name) => map
                                .next_value::<Option<IgnoredAny>>()?
                                .map(|_| SourceKind::Unsupported(name)),
                            None => {
                                if map.next_value::<Option<IgnoredAny>>()?.is_none() {
                                    continue;
                                }
                                return Err(serde::de::Error::custom(format!(
                                    "unknown source type {k:?} (standalone mode imports http, s3, registry, pvc, snapshot and blank)"
                                )));
                            }
                        },
                    };
                    if let Some(kind) = kind {
                        kinds.push((key, kind));
                    }
                }
                Ok(SourceDoc { kinds })
            }
        }
        d.deserialize_map(Kinds)
    }
}

// ------------------------------------------------------------------------------ validation

/// Read `spec.dataVolumeTemplates[index]` (`metadata` and `spec`) for a VM in `namespace`.
/// Errors name the DataVolume and the field as written in the VM
/// (`spec.dataVolumeTemplates[0].spec.source.http.url`).
pub fn parse(
    namespace: &str,
    index: usize,
    template_name: &str,
    template_namespace: Option<&str>,
    spec: &Value,
) -> Result<DataVolumeSpec, DataVolumeError> {
    let claim = ClaimRef {
        namespace: namespace.to_string(),
        name: template_name.to_string(),
    };
    let dv = claim.to_string();
    let template = format!("spec.dataVolumeTemplates[{index}]");
    let field_err = |field: &str, reason: String| DataVolumeError::Spec {
        dv: dv.clone(),
        field: format!("{template}.{field}"),
        reason,
    };
    let unsupported = |what: &str, reason: &str| DataVolumeError::Unsupported {
        dv: dv.clone(),
        what: format!("{template}.{what}"),
        reason: reason.to_string(),
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
    let mut skipped = Vec::new();
    let mut on_skip =
        |path: serde_ignored::Path| skipped.push(crate::spec::fields::segments(&path));
    let de = serde_ignored::Deserializer::new(spec, &mut on_skip);
    let doc: SpecDoc = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        field_err(&field, e.into_inner().to_string())
    })?;

    // CDI's fields this model skips: those that only a cluster acts on are ignored, as a
    // pod's launcher never sees them; the others would change the claim and are refused.
    // Fields CDI does not know were refused with the VM, or allowed (`spec::fields`); empty
    // ones ask for nothing.
    let refused = skipped.iter().find_map(|segs| {
        use crate::spec::fields::{display, known, Seg};
        let pointer: String = segs
            .iter()
            .map(|s| match s {
                Seg::Key(k) => format!("/{k}"),
                Seg::Index(i) => format!("/{i}"),
            })
            .collect();
        let empty = match spec.pointer(&pointer) {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        let field = display(segs);
        (known("v1beta1.DataVolumeSpec", segs) && !empty && !CLUSTER_ONLY.contains(&field.as_str()))
            .then_some(field)
    });
    if let Some(field) = refused {
        return Err(unsupported(
            &format!("spec.{field}"),
            "a CDI field standalone import does not support: remove it to import without it",
        ));
    }

    if let Some(ct) = &doc.content_type {
        if ct != "kubevirt" {
            return Err(unsupported(
                &format!("spec.contentType {ct:?}"),
                "standalone mode imports disk images only (contentType kubevirt)",
            ));
        }
    }

    let source_json = spec.get("source").cloned().unwrap_or(Value::Null);
    let source = match doc.source {
        Some(s) => source(&claim, s, &field_err, &unsupported)?,
        None if doc.source_ref.is_some() => return Err(unsupported(
            "spec.sourceRef",
            "a DataSource reference needs the cluster's CDI; give spec.source (http, s3, registry, pvc, snapshot or blank)",
        )),
        None => {
            return Err(field_err(
                "spec.source",
                "is required (http, s3, registry, pvc, snapshot or blank)".into(),
            ))
        }
    };

    let (form, storage) = match (doc.pvc, doc.storage) {
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

    let requested = match storage.resources.requests.storage {
        None => None,
        Some(q) => {
            let bytes = q
                .value()
                .map_err(|e| field_err(&f("resources.requests.storage"), e.to_string()))?;
            Some((q.0, bytes))
        }
    };
    let clone_infers_size =
        form == StorageForm::Storage && matches!(source, Source::Pvc(_) | Source::Snapshot(_));
    if requested.is_none() && !clone_infers_size {
        return Err(field_err(
            &f("resources.requests.storage"),
            "is required (the size of the claim)".into(),
        ));
    }

    let mut access_modes: Vec<String> = Vec::new();
    for m in storage.access_modes.unwrap_or_default() {
        if !access_modes.iter().any(|x| x == m.as_str()) {
            access_modes.push(m.as_str().to_string());
        }
    }
    if access_modes.is_empty() {
        // A storage profile would pick one in a cluster; ReadWriteOnce is the safe default.
        access_modes.push(AccessMode::ReadWriteOnce.as_str().to_string());
    }

    let spec = DataVolumeSpec {
        index,
        claim,
        template: template.clone(),
        source,
        source_json,
        form,
        requested,
        volume_mode: storage.volume_mode.unwrap_or(VolumeMode::Filesystem),
        access_modes,
        preallocation: doc.preallocation.unwrap_or(false),
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

/// The one source `spec.source` names, checked.
fn source(
    claim: &ClaimRef,
    doc: SourceDoc,
    field_err: &dyn Fn(&str, String) -> DataVolumeError,
    unsupported: &dyn Fn(&str, &str) -> DataVolumeError,
) -> Result<Source, DataVolumeError> {
    let mut kinds = doc.kinds.into_iter();
    let kind = match (kinds.next(), kinds.next()) {
        (Some((_, k)), None) => k,
        (None, _) => {
            return Err(field_err(
                "spec.source",
                "names no source type (http, s3, registry, pvc, snapshot or blank)".into(),
            ))
        }
        (Some((a, _)), Some((b, _))) => {
            return Err(field_err(
                "spec.source",
                format!("names two source types ({a} and {b}): use one"),
            ))
        }
    };
    match kind {
        SourceKind::Http(http) => {
            let url = match http.url.as_deref().map(str::trim) {
                Some(u) if !u.is_empty() => u.to_string(),
                _ => {
                    return Err(field_err(
                        "spec.source.http.url",
                        "is required (a string)".into(),
                    ))
                }
            };
            let headers = http.extra_headers.unwrap_or_default();
            if let Some(i) = headers.iter().position(|h| !valid_header(h)) {
                return Err(field_err(
                    &format!("spec.source.http.extraHeaders[{i}]"),
                    format!("{:?} is not a \"Name: value\" header", headers[i]),
                ));
            }
            let secret_extra_headers = http.secret_extra_headers.unwrap_or_default();
            for (i, name) in secret_extra_headers.iter().enumerate() {
                object_name(
                    field_err,
                    &format!("spec.source.http.secretExtraHeaders[{i}]"),
                    name,
                )?;
            }
            Ok(Source::Http(Remote {
                url,
                headers,
                secret_ref: optional_name(
                    field_err,
                    "spec.source.http.secretRef",
                    http.secret_ref,
                )?,
                secret_extra_headers,
                cert_config_map: optional_name(
                    field_err,
                    "spec.source.http.certConfigMap",
                    http.cert_config_map,
                )?,
            }))
        }
        SourceKind::S3(s3) => {
            let url = match s3.url.as_deref().map(str::trim) {
                Some(u) if !u.is_empty() => u.to_string(),
                _ => {
                    return Err(field_err(
                        "spec.source.s3.url",
                        "is required (a string)".into(),
                    ))
                }
            };
            if let Err(reason) = super::s3::ObjectUrl::parse(&url) {
                return Err(field_err(
                    "spec.source.s3.url",
                    format!("{url:?}: {reason}"),
                ));
            }
            Ok(Source::S3(Remote {
                url,
                secret_ref: optional_name(field_err, "spec.source.s3.secretRef", s3.secret_ref)?,
                cert_config_map: optional_name(
                    field_err,
                    "spec.source.s3.certConfigMap",
                    s3.cert_config_map,
                )?,
                ..Remote::default()
            }))
        }
        SourceKind::Pvc(pvc) => {
            let name = match pvc.name {
                Some(n) if is_dns1123_subdomain(&n) => n,
                other => {
                    return Err(field_err(
                        "spec.source.pvc.name",
                        format!(
                            "{} is not a claim name",
                            other.map_or("missing".to_string(), |n| format!("{n:?}"))
                        ),
                    ))
                }
            };
            let namespace = match pvc.namespace {
                None => claim.namespace.clone(),
                Some(n) if n.is_empty() => claim.namespace.clone(),
                Some(n) if is_dns1123_label(&n) => n,
                Some(other) => {
                    return Err(field_err(
                        "spec.source.pvc.namespace",
                        format!("{other:?} is not a namespace name"),
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
        SourceKind::Blank => Ok(Source::Blank),
        SourceKind::Registry(r) => registry(r, field_err, unsupported),
        SourceKind::Snapshot(snap) => {
            let name = match snap.name {
                Some(n) if is_dns1123_subdomain(&n) => n,
                other => {
                    return Err(field_err(
                        "spec.source.snapshot.name",
                        format!(
                            "{} is not a snapshot name",
                            other.map_or("missing".to_string(), |n| format!("{n:?}"))
                        ),
                    ))
                }
            };
            let namespace = match snap.namespace {
                None => claim.namespace.clone(),
                Some(n) if n.is_empty() => claim.namespace.clone(),
                Some(n) if is_dns1123_label(&n) => n,
                Some(other) => {
                    return Err(field_err(
                        "spec.source.snapshot.namespace",
                        format!("{other:?} is not a namespace name"),
                    ))
                }
            };
            Ok(Source::Snapshot(ClaimRef { namespace, name }))
        }
        SourceKind::Unsupported(kind) => Err(unsupported(
            &format!("spec.source.{kind}"),
            "it needs services of a cluster (CDI); standalone mode imports http, s3, registry, pvc, snapshot and blank",
        )),
    }
}

/// `spec.source.registry`, checked (the URL parses as an image reference; what standalone
/// mode cannot do is refused by name).
fn registry(
    r: RegistryDoc,
    field_err: &dyn Fn(&str, String) -> DataVolumeError,
    unsupported: &dyn Fn(&str, &str) -> DataVolumeError,
) -> Result<Source, DataVolumeError> {
    if r.image_stream.is_some() {
        return Err(unsupported(
            "spec.source.registry.imageStream",
            "an OpenShift ImageStream needs a cluster; give spec.source.registry.url",
        ));
    }
    // "pod" (CDI's default) and "node" end alike here: the launcher pulls the image itself.
    if let Some(m) = r.pull_method.as_deref() {
        if m != "pod" && m != "node" {
            return Err(field_err(
                "spec.source.registry.pullMethod",
                format!("{m:?} is not pod or node"),
            ));
        }
    }
    if let Some(arch) = r.platform.and_then(|p| p.architecture) {
        if !arch.is_empty() && arch != "amd64" {
            return Err(unsupported(
                "spec.source.registry.platform.architecture",
                &format!("{arch:?}: this launcher runs amd64 guests only"),
            ));
        }
    }
    let url = match r.url.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => {
            return Err(field_err(
                "spec.source.registry.url",
                "is required (docker://host[:port]/repository[:tag])".into(),
            ))
        }
    };
    if !url.starts_with("docker://") {
        return Err(field_err(
            "spec.source.registry.url",
            format!("{url:?} is not a docker:// URL (docker://host[:port]/repository[:tag])"),
        ));
    }
    super::registry::ImageRef::parse(&url)
        .map_err(|e| field_err("spec.source.registry.url", e.to_string()))?;
    let name = |field: &str, v: Option<String>| -> Result<Option<String>, DataVolumeError> {
        match v {
            None => Ok(None),
            Some(n) if is_dns1123_subdomain(&n) => Ok(Some(n)),
            Some(n) => Err(field_err(
                &format!("spec.source.registry.{field}"),
                format!("{n:?} is not an object name"),
            )),
        }
    };
    Ok(Source::Registry {
        url,
        secret_ref: name("secretRef", r.secret_ref)?,
        cert_config_map: name("certConfigMap", r.cert_config_map)?,
    })
}

/// A Secret or ConfigMap name (DNS-1123 subdomain) as written at `field`.
fn object_name(
    field_err: &dyn Fn(&str, String) -> DataVolumeError,
    field: &str,
    name: &str,
) -> Result<(), DataVolumeError> {
    if is_dns1123_subdomain(name) {
        Ok(())
    } else {
        Err(field_err(
            field,
            format!("{name:?} is not a Secret or ConfigMap name"),
        ))
    }
}

/// An optional object name; an empty string counts as absent (as CDI treats it).
fn optional_name(
    field_err: &dyn Fn(&str, String) -> DataVolumeError,
    field: &str,
    name: Option<String>,
) -> Result<Option<String>, DataVolumeError> {
    match name.filter(|n| !n.is_empty()) {
        Some(n) => object_name(field_err, field, &n).map(|()| Some(n)),
        None => Ok(None),
    }
}

pub(crate) fn valid_header(s: &str) -> bool {
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
        parse("default", 0, "disk", None, &spec)
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
            Source::Http(Remote {
                url: "http://example.com/my-vm-image.qcow2".into(),
                ..Remote::default()
            })
        );
    }

    #[test]
    fn registry_source_reads_url_secret_and_ca() {
        let s = dv(json!({
            "source": {"registry": {"url": "docker://127.0.0.1:5000/disks/alpine:3",
                "secretRef": "reg-creds", "certConfigMap": "reg-ca", "pullMethod": "node"}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}}
        }))
        .expect("valid");
        assert_eq!(
            s.source,
            Source::Registry {
                url: "docker://127.0.0.1:5000/disks/alpine:3".into(),
                secret_ref: Some("reg-creds".into()),
                cert_config_map: Some("reg-ca".into()),
            }
        );
        assert_eq!(s.source.kind(), "registry");
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

    /// CDI's `source.snapshot` (namespace/name): a local VM snapshot here; the storage form
    /// takes its size; a bad name is refused naming the field.
    #[test]
    fn snapshot_source_names_a_local_snapshot() {
        let s = dv(
            json!({"source": {"snapshot": {"namespace": "prod", "name": "snap1.root"}},
            "storage": {}}),
        )
        .expect("valid");
        assert_eq!(
            s.source,
            Source::Snapshot(ClaimRef {
                namespace: "prod".into(),
                name: "snap1.root".into()
            })
        );
        assert_eq!(s.source.kind(), "snapshot");
        assert_eq!(s.requested, None);
        let err = dv(json!({"source": {"snapshot": {"name": "../x"}}, "storage": {}}))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source.snapshot.name: \"../x\" is not a snapshot name"
        );
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
                "DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source: unknown source type \"nfs\"",
            ),
            (
                json!({"source": {"registry": {"url": "http://x/y"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source.registry.url: \"http://x/y\" is not a docker:// URL",
            ),
            (
                json!({"source": {"registry": {"url": "docker://h:5000/X"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source.registry.url: \"docker://h:5000/X\" has an invalid repository",
            ),
            (
                json!({"source": {"registry": {"imageStream": "is"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[0].spec.source.registry.imageStream is not supported",
            ),
            (
                json!({"source": {"registry": {"url": "docker://h/x", "secretRef": "Bad_Name"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "spec.source.registry.secretRef: \"Bad_Name\" is not an object name",
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

    /// Each error names the field as written in the VM, from `spec.dataVolumeTemplates[i]`
    /// down, serde's own type errors included.
    #[test]
    fn errors_name_the_full_field_path() {
        let at = |index, spec: Value| {
            parse("default", index, "disk", None, &spec)
                .expect_err(&spec.to_string())
                .to_string()
        };
        let cases = [
            (
                json!({"source": {"http": {"url": 5}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.http.url: invalid type: integer `5`, expected a string",
            ),
            (
                json!({"source": {"http": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.http.url: is required (a string)",
            ),
            (
                json!({"source": {"http": {"url": "http://x", "extraHeaders": ["A: b", 7]}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.http.extraHeaders[1]: invalid type: integer `7`, expected a string",
            ),
            (
                json!({"source": {"http": {"url": "http://x", "extraHeaders": ["A: b", "nocolon"]}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.http.extraHeaders[1]: \"nocolon\" is not a \"Name: value\" header",
            ),
            (
                json!({"source": {"nfs": {"server": "x"}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source: unknown source type \"nfs\"",
            ),
            (
                json!({"source": {"blank": {}}, "storage": {"accessModes": ["ReadWriteOnce", "RWX"], "resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.storage.accessModes[1]: unknown variant `RWX`",
            ),
            (
                json!({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": {"a": 1}}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.pvc.resources.requests.storage: invalid type: map, expected a quantity",
            ),
            (
                json!({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}, "preallocation": "yes"}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.preallocation: invalid type: string \"yes\", expected a boolean",
            ),
            (
                json!({"source": "http://x", "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source: invalid type: string \"http://x\", expected an object naming one source type",
            ),
            (
                json!({"source": {"gcs": {"url": "gs://x"}}, "pvc": {}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.gcs is not supported in standalone mode",
            ),
            (
                json!({"source": {"s3": {"url": "s3://host/bucket-only"}}, "pvc": {}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.s3.url: \"s3://host/bucket-only\": names no object key",
            ),
            (
                json!({"source": {"http": {"url": "https://h/x", "certConfigMap": "Bad_Name"}}, "pvc": {}}),
                "DataVolume default/disk: spec.dataVolumeTemplates[2].spec.source.http.certConfigMap: \"Bad_Name\" is not a Secret or ConfigMap name",
            ),
        ];
        for (spec, want) in cases {
            let err = at(2, spec.clone());
            assert!(err.starts_with(want), "{spec}:\n got  {err}\n want {want}");
        }
    }

    /// Fields the model does not use are ignored, as the VMI ignores them; a `null` source
    /// type counts as absent.
    #[test]
    fn cluster_fields_unknown_fields_and_null_sources_are_ignored() {
        let s = dv(json!({
            "priorityClassName": "p", "checkpoints": [], "nonsense": 1,
            "source": {"http": {"url": " http://x/a.img ", "certConfigMap": null, "extra": 1},
                       "blank": null, "nfs": null},
            "pvc": {"storageClassName": "fast", "dataSource": null,
                    "resources": {"requests": {"storage": "1Gi"}, "limits": {"storage": "2Gi"}}}
        }))
        .expect("valid");
        assert_eq!(
            s.source,
            Source::Http(Remote {
                url: "http://x/a.img".into(),
                ..Remote::default()
            })
        );
        assert_eq!(s.access_modes, vec!["ReadWriteOnce".to_string()]);
        assert!(!s.preallocation);
    }

    #[test]
    fn cdi_fields_standalone_does_not_implement_are_refused_by_name() {
        for (field, value, path) in [
            (
                "checkpoints",
                json!([{"previous": "", "current": "a"}]),
                "spec.checkpoints",
            ),
            (
                "pvc",
                json!({"resources": {"requests": {"storage": "1Gi"}},
                           "dataSource": {"kind": "VolumeSnapshot", "name": "s"}}),
                "spec.pvc.dataSource",
            ),
            (
                "pvc",
                json!({"resources": {"requests": {"storage": "1Gi"}}, "volumeName": "pv1"}),
                "spec.pvc.volumeName",
            ),
        ] {
            let mut spec = json!({"source": {"blank": {}},
                                  "pvc": {"resources": {"requests": {"storage": "1Gi"}}}});
            spec[field] = value;
            let e = dv(spec).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "spec.dataVolumeTemplates[0].{path} is not supported in standalone mode"
                )),
                "{e}"
            );
        }
    }
}
