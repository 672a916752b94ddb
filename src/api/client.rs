//! Connecting to a launcher's socket (for launcherctl, tests and benchmarks).

use std::path::Path;

use serde_json::{json, Value};
use tonic::transport::Channel;

use super::pb::launcher_client::LauncherClient;

/// A client on the launcher socket at `path`.
pub async fn connect(path: &Path) -> Result<LauncherClient<Channel>, tonic::transport::Error> {
    let uri = format!("unix://{}", path.display());
    Ok(LauncherClient::connect(uri)
        .await?
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES))
}

/// Why a VMI edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum VmiEditError {
    #[error("VMI: {0} is not an object")]
    NotObject(String),
    #[error("VMI: {0} is not a list")]
    NotList(String),
    #[error("volume {0} is already attached")]
    AlreadyAttached(String),
    #[error("no disk named {0}")]
    NoSuchDisk(String),
}

fn array<'a>(v: &'a mut Value, path: &[&str]) -> Result<&'a mut Vec<Value>, VmiEditError> {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        let obj = cur
            .as_object_mut()
            .ok_or_else(|| VmiEditError::NotObject(path[..i].join(".")))?;
        let default = if i + 1 == path.len() {
            json!([])
        } else {
            json!({})
        };
        cur = obj.entry(key.to_string()).or_insert(default);
        if cur.is_null() {
            *cur = if i + 1 == path.len() {
                json!([])
            } else {
                json!({})
            };
        }
    }
    cur.as_array_mut()
        .ok_or_else(|| VmiEditError::NotList(path.join(".")))
}

/// Adds a hot-pluggable disk, its volume, and a MountedToPod volume status (what virt-handler
/// reports once the volume is mounted into the pod).
pub fn add_hotplug_volume(
    vmi: &mut Value,
    volume: &str,
    claim: &str,
    bus: &str,
    datavolume: bool,
) -> Result<(), VmiEditError> {
    let disks = array(vmi, &["spec", "domain", "devices", "disks"])?;
    if disks.iter().any(|d| d["name"] == volume) {
        return Err(VmiEditError::AlreadyAttached(volume.into()));
    }
    disks.push(json!({"name": volume, "disk": {"bus": bus}}));
    let source = if datavolume {
        json!({"name": volume, "dataVolume": {"name": claim, "hotpluggable": true}})
    } else {
        json!({"name": volume, "persistentVolumeClaim": {"claimName": claim, "hotpluggable": true}})
    };
    array(vmi, &["spec", "volumes"])?.push(source);
    array(vmi, &["status", "volumeStatus"])?
        .push(json!({"name": volume, "phase": "MountedToPod", "hotplugVolume": {}}));
    Ok(())
}

pub fn remove_volume(vmi: &mut Value, volume: &str) -> Result<(), VmiEditError> {
    let disks = array(vmi, &["spec", "domain", "devices", "disks"])?;
    let before = disks.len();
    disks.retain(|d| d["name"] != volume);
    if disks.len() == before {
        return Err(VmiEditError::NoSuchDisk(volume.into()));
    }
    array(vmi, &["spec", "volumes"])?.retain(|v| v["name"] != volume);
    array(vmi, &["status", "volumeStatus"])?.retain(|v| v["name"] != volume);
    Ok(())
}
