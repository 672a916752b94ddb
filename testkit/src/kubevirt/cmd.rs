//! Playing virt-handler's cmd side: a client of KubeVirt's cmd protocol built from the same
//! protocol definitions the launcher serves (`proto/kubevirt/cmd`), dialled and
//! version-checked the way virt-handler's `cmdclient.NewClient` does, with its deadlines; and
//! the VMI as the handler sends it.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use virt_launcher::api::kubevirt::pb::cmd::auth as auth_pb;
use virt_launcher::api::kubevirt::pb::cmd::info as info_pb;
use virt_launcher::api::kubevirt::pb::cmd::v1 as cmd_pb;

pub use cmd_pb::Response as CmdResponse;

/// A client of `kubevirt.cmd.v1.Cmd`.
pub type CmdClient = cmd_pb::cmd_client::CmdClient<Channel>;

/// The handler's deadline for reads (GetDomain, Ping, stats, versions).
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The handler's deadline for every VMI mutation, Sync included.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(20);
/// The handler's deadline for a freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// The cmd versions the launcher at `socket` offers (`CmdInfo/Info`).
pub async fn cmd_versions(socket: &Path) -> Result<Vec<u32>> {
    let mut info = info_pb::cmd_info_client::CmdInfoClient::new(dial(socket).await?);
    let reply = info
        .info(with_timeout(info_pb::CmdInfoRequest {}, SHORT_TIMEOUT))
        .await
        .context("CmdInfo/Info")?;
    Ok(reply.into_inner().supported_cmd_versions)
}

/// Connects as virt-handler does: dial (2 s), `CmdInfo/Info`, which must offer version 1.
pub async fn connect_cmd(socket: &Path) -> Result<CmdClient> {
    let versions = cmd_versions(socket).await?;
    ensure!(
        versions.contains(&1),
        "launcher offers cmd versions {versions:?}, not 1"
    );
    Ok(CmdClient::new(dial(socket).await?))
}

/// A client of `kubevirt.cmd.auth.CmdAuth`, as virt-handler asks it right after dialling.
pub async fn connect_auth(socket: &Path) -> Result<AuthClient> {
    Ok(AuthClient::new(dial(socket).await?))
}

/// A client of `kubevirt.cmd.auth.CmdAuth`.
pub type AuthClient = auth_pb::cmd_auth_client::CmdAuthClient<Channel>;

async fn dial(socket: &Path) -> Result<Channel> {
    Endpoint::try_from(format!("unix://{}", socket.display()))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("dial {}", socket.display()))
}

/// `msg` with a gRPC deadline, as the handler sets one on every call.
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// The options a handler sends with a Sync (cluster defaults: balloon period 10 s, Bochs
/// display for EFI guests).
pub fn sync_options() -> cmd_pb::VirtualMachineOptions {
    cmd_pb::VirtualMachineOptions {
        mem_balloon_stats_period: 10,
        cluster_config: Some(cmd_pb::ClusterConfig {
            bochs_display_for_efi_guests: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A request carrying `vmi` (as JSON) and the handler's Sync options.
pub fn vmi_request(vmi: &Value) -> cmd_pb::VmiRequest {
    raw_vmi_request(serde_json::to_vec(vmi).expect("a JSON value serialises"))
}

/// A request carrying `vmi_json` as it is (malformed input for bad-input tests).
pub fn raw_vmi_request(vmi_json: Vec<u8>) -> cmd_pb::VmiRequest {
    cmd_pb::VmiRequest {
        vmi: Some(cmd_pb::Vmi { vmi_json }),
        options: Some(sync_options()),
    }
}

/// The VMI `yaml` (a VMI manifest, e.g. `testkit::vmi::GuestVmi::yaml`) as the handler's
/// informer copy: JSON, with `status.phase` and some of the fields a real VMI carries that the
/// launcher does not read.
pub fn handler_vmi(yaml: &str, phase: &str) -> Result<Value> {
    let vmi = virt_launcher::spec::from_str(yaml, "test VMI")?;
    let mut v = serde_json::to_value(&vmi)?;
    let status = v
        .as_object_mut()
        .context("VMI is an object")?
        .entry("status")
        .or_insert_with(|| json!({}));
    if status.is_null() {
        *status = json!({});
    }
    status["phase"] = json!(phase);
    status["activePods"] = json!({"0d2c6d4e-0000-4000-8000-000000000001": "node-1"});
    status["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    status["migrationTransport"] = json!("Unix");
    v["metadata"]["finalizers"] = json!(["foregroundDeleteVirtualMachine"]);
    v["metadata"]["resourceVersion"] = json!("4711");
    Ok(v)
}

/// Sets `status.phase` of a handler VMI.
pub fn set_phase(vmi: &mut Value, phase: &str) {
    vmi["status"]["phase"] = json!(phase);
}

/// Adds (or replaces) the volume `volume`, a Filesystem PVC hot-plugged by the handler: the
/// disk on `bus`, the claim source (no `hotpluggable` flag: the handler's status says it),
/// and its `volumeStatus` entry in `phase` with `hotplugVolume`.
pub fn set_hotplug_volume(vmi: &mut Value, volume: &str, bus: &str, phase: &str) {
    let disks = vmi["spec"]["domain"]["devices"]["disks"]
        .as_array_mut()
        .expect("spec.domain.devices.disks");
    disks.retain(|d| d["name"] != volume);
    disks.push(json!({"name": volume, "disk": {"bus": bus}}));
    let volumes = vmi["spec"]["volumes"].as_array_mut().expect("spec.volumes");
    volumes.retain(|v| v["name"] != volume);
    volumes.push(json!({"name": volume, "persistentVolumeClaim": {"claimName": volume}}));
    let status = &mut vmi["status"]["volumeStatus"];
    if !status.is_array() {
        *status = json!([]);
    }
    let entries = status.as_array_mut().expect("an array");
    entries.retain(|e| e["name"] != volume);
    entries.push(json!({
        "name": volume,
        "phase": phase,
        "hotplugVolume": {"attachPodName": format!("hp-volume-{volume}"), "attachPodUID": "5b1d"},
        "persistentVolumeClaimInfo": {"claimName": volume, "volumeMode": "Filesystem"},
    }));
}

/// Adds the volume `volume` as virt-handler rewrites a Filesystem PVC: a `hostDisk` of type
/// `DiskOrCreate` at `path` (in a pod: `/var/run/kubevirt-private/vmi-disks/<vol>/disk.img`)
/// with the claim's `capacity`, on a virtio disk.
pub fn add_host_disk(vmi: &mut Value, volume: &str, path: &Path, capacity: &str) {
    vmi["spec"]["domain"]["devices"]["disks"]
        .as_array_mut()
        .expect("spec.domain.devices.disks")
        .push(json!({"name": volume, "disk": {"bus": "virtio"}}));
    vmi["spec"]["volumes"]
        .as_array_mut()
        .expect("spec.volumes")
        .push(json!({"name": volume, "hostDisk": {
            "path": path, "type": "DiskOrCreate", "capacity": capacity, "shared": false,
        }}));
}

/// The VMI with `uid` as its `metadata.uid`.
pub fn with_uid(vmi: &Value, uid: &str) -> Value {
    let mut v = vmi.clone();
    v["metadata"]["uid"] = json!(uid);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_vmi_parses_and_says_it_is_hot_plugged() {
        let disks = [crate::vmi::Disk::new("data", "virtio", 1)];
        let yaml = crate::vmi::GuestVmi {
            name: "t",
            uid: Some("00000000-0000-4000-8000-000000000001"),
            grace_seconds: 7,
            kernel_args: crate::vmi::KERNEL_ARGS,
            disks: &disks,
            annotations: &[],
            rwx: false,
        }
        .yaml();
        let mut v = handler_vmi(&yaml, "Scheduled").unwrap();
        set_hotplug_volume(&mut v, "hp", "scsi", "AttachedToNode");
        let mut parsed = virt_launcher::spec::from_str(&v.to_string(), "t").unwrap();
        assert_eq!(
            parsed.status.as_ref().unwrap().phase.as_deref(),
            Some("Scheduled")
        );
        parsed.apply_volume_status_hotplug();
        let hp = parsed.spec.volumes.iter().find(|v| v.name == "hp").unwrap();
        assert!(hp.is_hotpluggable());
        let data = parsed
            .spec
            .volumes
            .iter()
            .find(|v| v.name == "data")
            .unwrap();
        assert!(!data.is_hotpluggable());
    }
}
