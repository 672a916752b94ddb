//! Migration through virt-handler's proxies, as KubeVirt's launcher does it
//! (`pkg/virt-launcher/virtwrap/live-migration-source.go:1073-1135, 1317-1373`,
//! `pkg/virt-handler/migration-proxy/migration-proxy.go`).
//!
//! The handlers of both nodes prepare everything between the pods: in the source pod they
//! listen on `<share>/migrationproxy/<uid>-source.sock` (relayed to the target pod's libvirt
//! daemon, `/var/run/libvirt/virtqemud-sock`) and `<uid>-49152-source.sock` /
//! `<uid>-49153-source.sock` (relayed to the same names in the target pod, where the incoming
//! QEMU listens: memory and, for block migration, NBD). So the source's core migrates
//! peer-to-peer to `qemu+unix:///system?socket=…-source.sock` with the migration URI
//! `unix://…-49152-source.sock`, and asks no target launcher anything: [`HandlerProxies`] is
//! the [`MigrationPeer`] that says so. Both pods keep KubeVirt's in-pod paths, so the domain's
//! paths need no rewriting.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::vm::migration::{MigrationPeer, PeerFuture, PreparedTarget};
use crate::vm::state::TargetInfo;

/// The port KubeVirt names the memory stream's socket after.
pub const MEMORY_PORT: u16 = 49152;
/// The port KubeVirt names the block migration's (NBD) socket after.
pub const DISKS_PORT: u16 = 49153;

/// virt-handler's proxies in this pod, for the VMI `uid`.
#[derive(Debug, Clone)]
pub struct HandlerProxies {
    dir: PathBuf,
    uid: String,
}

impl HandlerProxies {
    /// The proxies in `dir` (`<share>/migrationproxy`) for VMI `uid`; the uid names files, so
    /// it must be a plain name (KubeVirt's are UUIDs).
    pub fn new(dir: &Path, uid: &str) -> Result<HandlerProxies, String> {
        if !is_plain_uid(uid) {
            return Err(format!(
                "VMIRequest.vmi.vmiJson: metadata.uid {uid:?}: letters, digits and '-' expected"
            ));
        }
        Ok(HandlerProxies {
            dir: dir.to_path_buf(),
            uid: uid.to_string(),
        })
    }

    /// The libvirt control connection's socket (`<uid>-source.sock`).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join(format!("{}-source.sock", self.uid))
    }

    /// A data stream's socket (`<uid>-<port>-source.sock`).
    pub fn data_socket(&self, port: u16) -> PathBuf {
        self.dir.join(format!("{}-{port}-source.sock", self.uid))
    }
}

/// A uid that is safe as part of a file name and a URI.
fn is_plain_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl MigrationPeer for HandlerProxies {
    fn location(&self) -> String {
        format!("virt-handler's migration proxies in {}", self.dir.display())
    }

    fn prepared(&self) -> PeerFuture<'_, Result<PreparedTarget, String>> {
        // The handler prepared the target; what it is reached through is fixed by name.
        let target = TargetInfo {
            uid: self.uid.clone(),
            libvirt_uri: format!(
                "qemu+unix:///system?socket={}",
                self.control_socket().display()
            ),
            migration_uri: format!("unix://{}", self.data_socket(MEMORY_PORT).display()),
            disks_uri: format!("unix://{}", self.data_socket(DISKS_PORT).display()),
            // Same paths in both pods: nothing to rewrite.
            ..Default::default()
        };
        Box::pin(async move {
            Ok(PreparedTarget {
                target: Some(target),
                disks: Vec::new(),
                disks_unknown: true,
            })
        })
    }

    fn give_up(&self) -> PeerFuture<'_, ()> {
        // The handler tells the target pod (SignalTargetPodCleanup) once it sees the failure.
        Box::pin(async {})
    }
}

/// What the launcher reads of the VMI's `status.migrationState` and `status.migrationMethod`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationState {
    /// `sourceState.migrationUid`, else `migrationUid` (KubeVirt's `MigrationUID`,
    /// `live-migration-source.go:968-976`).
    pub migration_uid: String,
    pub target_pod: String,
    /// `status.migrationMethod` is `BlockMigration`: local disks are copied.
    pub block_migration: bool,
}

impl MigrationState {
    /// Reads it from the VMI JSON the handler sent; None when the VMI has no
    /// `status.migrationState`.
    pub fn of(vmi_json: &[u8]) -> Option<MigrationState> {
        let v: Value = serde_json::from_slice(vmi_json).ok()?;
        let status = v.get("status")?;
        let state = status.get("migrationState").filter(|s| s.is_object())?;
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        let source_uid = text(state.get("sourceState").and_then(|s| s.get("migrationUid")));
        Some(MigrationState {
            migration_uid: if source_uid.is_empty() {
                text(state.get("migrationUid"))
            } else {
                source_uid
            },
            target_pod: text(state.get("targetPod")),
            block_migration: status.get("migrationMethod").and_then(Value::as_str)
                == Some("BlockMigration"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_proxies_are_kubevirts_names_in_the_share_dir() {
        let p =
            HandlerProxies::new(Path::new("/var/run/kubevirt/migrationproxy"), "abc-1").unwrap();
        let t = p.prepared().await.unwrap();
        assert!(t.disks_unknown);
        let t = t.target.unwrap();
        assert_eq!(
            t.libvirt_uri,
            "qemu+unix:///system?socket=/var/run/kubevirt/migrationproxy/abc-1-source.sock"
        );
        assert_eq!(
            t.migration_uri,
            "unix:///var/run/kubevirt/migrationproxy/abc-1-49152-source.sock"
        );
        assert_eq!(
            t.disks_uri,
            "unix:///var/run/kubevirt/migrationproxy/abc-1-49153-source.sock"
        );
        assert_eq!(t.uid, "abc-1");
        for bad in ["", "../x", "a/b", "a b", "a?socket=/etc"] {
            let e = HandlerProxies::new(Path::new("/d"), bad).unwrap_err();
            assert!(e.contains("metadata.uid"), "{e}");
        }
    }

    #[test]
    fn the_migration_state_is_read_as_kubevirt_reads_it() {
        let vmi = br#"{"status": {"migrationMethod": "BlockMigration", "migrationState": {
            "migrationUid": "m1", "targetPod": "virt-launcher-x-abcde",
            "sourceState": {"migrationUid": "m2"}}}}"#;
        let s = MigrationState::of(vmi).unwrap();
        assert_eq!(s.migration_uid, "m2");
        assert_eq!(s.target_pod, "virt-launcher-x-abcde");
        assert!(s.block_migration);
        let s = MigrationState::of(br#"{"status": {"migrationState": {"migrationUid": "m1"}}}"#)
            .unwrap();
        assert_eq!(s.migration_uid, "m1");
        assert!(!s.block_migration);
        assert_eq!(
            MigrationState::of(br#"{"status": {"phase": "Running"}}"#),
            None
        );
        assert_eq!(MigrationState::of(b"{"), None);
    }
}
