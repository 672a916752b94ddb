//! The storage directory: one directory per claim, and its metadata.
//!
//! ```text
//! <storage>/claims/<namespace>/<name>/disk.img     Filesystem claim: the raw disk (podfacts'
//!                                                  <volume>/disk.img layout)
//! <storage>/claims/<namespace>/<name>/block.img    Block claim: the file behind its loop device
//! <storage>/claims/<namespace>/<name>/claim.json   metadata; written last, atomically: a claim
//!                                                  is complete exactly when it exists
//! <storage>/claims/<namespace>/<name>/.import/     scratch space of an import in progress
//! <storage>/claims/<namespace>/.<name>.lock        flock held while the claim is imported
//! <storage>/vms/<namespace>/<vm>/volumes/<volume>  → the claim directory (the launcher's
//!                                                  --volumes-dir for this VM)
//! <storage>/vms/<namespace>/<vm>/block/<volume>    → /dev/loopN (the launcher's --block-dir)
//! ```
//!
//! A claim that is not listed in a VM's `dataVolumeTemplates` can be made by hand: a directory
//! `claims/<namespace>/<name>` holding `disk.img` (Filesystem) or `block.img` (Block). Such a
//! claim can be a VM's `persistentVolumeClaim` volume or the source of a `pvc` clone.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::spec::{ClaimRef, VolumeMode};

pub const META_FILE: &str = "claim.json";
pub const FS_IMAGE: &str = "disk.img";
pub const BLOCK_IMAGE: &str = "block.img";
pub const STAGING_DIR: &str = ".import";

/// `claim.json`: what was imported, how big, and how the claim may be shared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimMeta {
    pub name: String,
    pub namespace: String,
    /// The DataVolume's `spec.source`, as written.
    pub source: serde_json::Value,
    /// `resources.requests.storage` as written (empty when a clone took the source's size).
    pub requested: String,
    /// Size of `disk.img` / `block.img` in bytes: what the guest sees.
    pub size: u64,
    pub volume_mode: VolumeMode,
    pub access_modes: Vec<String>,
    /// `ReadWriteMany` is among the access modes: two launchers may use the claim at once
    /// (live migration between local launchers).
    pub shared: bool,
    /// RFC 3339 UTC time the import completed.
    pub completed_at: String,
}

pub fn claims_root(storage: &Path) -> PathBuf {
    storage.join("claims")
}

pub fn claim_dir(storage: &Path, claim: &ClaimRef) -> PathBuf {
    claims_root(storage)
        .join(&claim.namespace)
        .join(&claim.name)
}

pub fn lock_path(storage: &Path, claim: &ClaimRef) -> PathBuf {
    claims_root(storage)
        .join(&claim.namespace)
        .join(format!(".{}.lock", claim.name))
}

pub fn vm_dir(storage: &Path, namespace: &str, vm: &str) -> PathBuf {
    storage.join("vms").join(namespace).join(vm)
}

pub fn image_name(mode: VolumeMode) -> &'static str {
    match mode {
        VolumeMode::Filesystem => FS_IMAGE,
        VolumeMode::Block => BLOCK_IMAGE,
    }
}

/// The metadata of a complete claim; `None` when the claim is absent or incomplete (an
/// unreadable `claim.json` counts as incomplete: it is only ever renamed into place whole).
pub fn read_meta(dir: &Path) -> Option<ClaimMeta> {
    let text = fs::read_to_string(dir.join(META_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Makes the claim in `dir` complete: its metadata written atomically as `claim.json` (the
/// one writer of what [`read_meta`] reads).
pub fn write_meta(dir: &Path, meta: &ClaimMeta) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(META_FILE), &json)
}

/// The data file of a claim (complete or made by hand) and its mode, if it has one.
pub fn existing_image(dir: &Path) -> Option<(PathBuf, VolumeMode)> {
    if let Some(meta) = read_meta(dir) {
        let p = dir.join(image_name(meta.volume_mode));
        return p.is_file().then_some((p, meta.volume_mode));
    }
    [VolumeMode::Filesystem, VolumeMode::Block]
        .into_iter()
        .map(|m| (dir.join(image_name(m)), m))
        .find(|(p, _)| p.is_file())
}

/// Write `bytes` to `path` atomically: temp file in the same directory, fsync, rename, fsync
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// RFC 3339 UTC timestamp of `t` (seconds precision); a time before 1970 reads as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)),
            "2026-12-31T23:59:59Z"
        );
    }

    #[test]
    fn meta_round_trips_and_partial_meta_is_incomplete() {
        let dir = std::env::temp_dir().join(format!("vl-dv-meta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let meta = ClaimMeta {
            name: "d".into(),
            namespace: "default".into(),
            source: serde_json::json!({"blank": {}}),
            requested: "1Gi".into(),
            size: 1 << 20,
            volume_mode: VolumeMode::Block,
            access_modes: vec!["ReadWriteMany".into()],
            shared: true,
            completed_at: rfc3339(SystemTime::now()),
        };
        assert_eq!(read_meta(&dir), None);
        let text = serde_json::to_vec(&meta).expect("json");
        write_atomic(&dir.join(META_FILE), &text[..text.len() / 2]).expect("write");
        assert_eq!(read_meta(&dir), None, "a torn claim.json is not complete");
        write_atomic(&dir.join(META_FILE), &text).expect("write");
        assert_eq!(read_meta(&dir), Some(meta));
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(META_FILE)).expect("read")).expect("json");
        assert_eq!(json["accessModes"][0], "ReadWriteMany");
        assert_eq!(json["volumeMode"], "Block");
        let _ = fs::remove_dir_all(&dir);
    }
}
