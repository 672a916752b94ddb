//! KubeVirt's `api.Domain` as its virt-handler decodes it (notify events, `GetDomain`):
//! Go's `encoding/json` of `pkg/virt-launcher/virtwrap/api/schema.go`'s structs, so keys are
//! Go field names (`Spec`, `Devices`, `UUID`, `MAC`), except `ObjectMeta`, which keeps the
//! lower-case Kubernetes keys, and `Alias`, written `{"Name":…,"UserDefined":true}`. Times
//! are RFC 3339. Built only from what the core publishes (the watched [`Status`] and the
//! VMI): no libvirt call.
//!
//! What the handler reads, and what a wrong value costs, is in the contract notes (section
//! 4.3): every disk with a source needs an `Alias` and every interface an `Alias` and a `MAC`
//! (a missing one is a nil dereference in virt-handler), and the state `Unknown` is the
//! handler's own ("launcher unreachable"): never sent.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::spec::VirtualMachineInstance;
use crate::vm::state::{MigrationPhase, Phase, State, Status};

/// `apiVersion` of KubeVirt's domain reference (`schema.go` `NewDomainReferenceFromName`).
pub const DOMAIN_API_VERSION: &str = "1.2.2";

/// The guest agent's channel, whose `State` makes the handler's AgentConnected condition.
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// `api.Domain`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Domain {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(
        rename = "apiVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub api_version: String,
    #[serde(rename = "ObjectMeta")]
    pub object_meta: ObjectMeta,
    #[serde(rename = "Spec")]
    pub spec: DomainSpec,
    #[serde(rename = "Status")]
    pub status: DomainStatus,
}

/// The Kubernetes `ObjectMeta` keys the handler reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Set on the last event: the domain is gone for good.
    #[serde(
        rename = "deletionTimestamp",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DomainSpec {
    #[serde(default)]
    pub r#type: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "UUID", default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_memory: Option<Memory>,
    #[serde(rename = "OS", default)]
    pub os: Os,
    #[serde(default)]
    pub devices: Devices,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Memory {
    pub value: u64,
    pub unit: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Os {
    #[serde(rename = "Type", default)]
    pub os_type: OsType,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OsType {
    #[serde(rename = "OS", default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
}

/// `Features`: only ACPI is read by the handler (present: a destroyed domain means the
/// grace period expired, so the VMI failed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    #[serde(rename = "ACPI", default, skip_serializing_if = "Option::is_none")]
    pub acpi: Option<Enabled>,
}

/// An empty element that is on by being there (`FeatureEnabled`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Enabled {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Devices {
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub channels: Vec<Channel>,
}

/// A disk: the alias is not optional here, so a disk the handler would crash on cannot be
/// written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Disk {
    pub device: String,
    pub r#type: String,
    pub source: DiskSource,
    pub target: DiskTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<Enabled>,
    pub alias: Alias,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DiskSource {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dev: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DiskTarget {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bus: String,
    pub device: String,
}

/// `Alias` as its custom JSON writes it; `UserDefined` aliases are `ua-<Name>` in the XML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Alias {
    pub name: String,
    #[serde(default)]
    pub user_defined: bool,
}

impl Alias {
    pub fn user(name: &str) -> Alias {
        Alias {
            name: name.to_string(),
            user_defined: true,
        }
    }
}

/// An interface: alias and MAC are not optional here (the handler dereferences both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Interface {
    pub r#type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<InterfaceTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Model>,
    #[serde(rename = "MAC")]
    pub mac: Mac,
    pub alias: Alias,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceTarget {
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub managed: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Model {
    pub r#type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mac {
    #[serde(rename = "MAC")]
    pub mac: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Channel {
    pub r#type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ChannelTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelTarget {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub r#type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(rename = "KubeVirt", default)]
    pub kubevirt: KubeVirtMetadata,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KubeVirtMetadata {
    #[serde(rename = "UID", default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<GracePeriod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GracePeriod {
    pub deletion_grace_period_seconds: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_for_graceful_shutdown: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Migration {
    #[serde(rename = "UID", default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_timestamp: Option<String>,
    #[serde(default)]
    pub failed: bool,
    #[serde(default)]
    pub failure_reason: String,
    #[serde(default)]
    pub abort_status: String,
    #[serde(default)]
    pub mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DomainStatus {
    pub status: String,
    pub reason: String,
    /// The guest agent's interfaces (none known: `null`, as the Go launcher sends before the
    /// agent reports).
    #[serde(default)]
    pub interfaces: Option<Vec<serde_json::Value>>,
    #[serde(rename = "OSInfo", default)]
    pub os_info: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "FSFreezeStatus", default)]
    pub fs_freeze_status: FsFreeze,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FsFreeze {
    pub status: String,
}

/// The interfaces whose guest took a lease from us, as `api.InterfaceStatus`; `None` when none.
fn lease_statuses(facts: &crate::vm::state::DomainFacts) -> Option<Vec<serde_json::Value>> {
    let v: Vec<serde_json::Value> = facts
        .interfaces
        .iter()
        .filter(|i| !i.ips.is_empty() && !i.mac.is_empty())
        .map(|i| serde_json::json!({"Mac": i.mac, "Ip": i.ips[0], "IPs": i.ips}))
        .collect();
    (!v.is_empty()).then_some(v)
}

/// `metav1.Time` as JSON: RFC 3339, whole seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// KubeVirt's `Status.Status` and `Status.Reason` for our state (`schema.go` LifeCycle and
/// StateChangeReason; libvirt's reasons as `util.ConvReason` names them). None: no domain.
pub fn lifecycle(status: &Status) -> Option<(&'static str, &'static str)> {
    let migrating = status
        .migration
        .as_ref()
        .is_some_and(|m| m.phase == MigrationPhase::Running);
    Some(match status.state {
        State::None => return None,
        // On a migration target the incoming QEMU waits paused for the data.
        State::Starting if status.reason == "incoming migration" => ("Paused", "StartingUp"),
        // Defined, not started yet: the handler tolerates Shutoff/Unknown while Scheduled.
        State::Starting => ("Shutoff", "Unknown"),
        State::Running => ("Running", "Unknown"),
        State::Paused => ("Paused", pause_reason(&status.reason, migrating)),
        State::ShuttingDown => ("ShuttingDown", "User"),
        // The guest panicked; QEMU still runs.
        State::Crashed if status.reason == "panicked" => ("Crashed", "Panicked"),
        State::Shutoff | State::Crashed => ("Shutoff", shutoff_reason(&status.reason)),
    })
}

/// A pause's reason as the core words it (libvirt's suspended detail).
fn pause_reason(reason: &str, migrating: bool) -> &'static str {
    match reason {
        "paused" if migrating => "Migration",
        "paused" => "User",
        "migration" => "Migration",
        "ioerror" => "IOError",
        "watchdog" => "Watchdog",
        "fromsnapshot" | "restored" => "FromSnapshot",
        "postcopy" => "Postcopy",
        "postcopy failed" => "PostcopyFailed",
        _ => "Unknown",
    }
}

/// A stop's reason as the core words it (libvirt's stopped detail, lower case).
fn shutoff_reason(reason: &str) -> &'static str {
    match reason {
        "shutdown" => "Shutdown",
        "destroyed" => "Destroyed",
        "crashed" => "Crashed",
        "migrated" => "Migrated",
        "saved" => "Saved",
        "failed" => "Failed",
        "fromsnapshot" => "FromSnapshot",
        _ => "Unknown",
    }
}

/// The domain as the handler should see it now; None while there is no domain (nothing to
/// notify, `GetDomain` answers empty).
pub fn render(status: &Status, vmi: &VirtualMachineInstance) -> Option<Domain> {
    let (lifecycle, reason) = lifecycle(status)?;
    let mut d = skeleton(status, vmi);
    d.status.status = lifecycle.into();
    d.status.reason = reason.into();
    Some(d)
}

/// The last event's domain: gone for good (undefined), `NoState`/`NonExistent` with a
/// `deletionTimestamp`, as KubeVirt's launcher sends after the undefine (`client.go`
/// `eventCallback` + `processLifecycleEvent`).
pub fn gone(status: &Status, vmi: &VirtualMachineInstance, now: SystemTime) -> Domain {
    let mut d = skeleton(status, vmi);
    d.spec.devices = Devices::default();
    d.object_meta.deletion_timestamp = Some(rfc3339(now));
    d.status.status = "NoState".into();
    d.status.reason = "NonExistent".into();
    d
}

fn skeleton(status: &Status, vmi: &VirtualMachineInstance) -> Domain {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let facts = &status.domain;
    let kv = &status.kubevirt;
    let memory = (facts.memory_kib > 0).then(|| Memory {
        value: facts.memory_kib,
        unit: "KiB".into(),
    });
    let disks = status
        .disks
        .iter()
        // A hot-plugged disk is in the domain only once attached (the handler reports a
        // volume with a target as attached) and until it is detached.
        .filter(|d| !d.hotplugged || matches!(d.phase, Phase::Ready | Phase::Detaching))
        .filter(|d| !matches!(d.phase, Phase::Detached))
        .map(|d| {
            let mut source = DiskSource::default();
            if d.block {
                source.dev = d.source.clone();
            } else {
                source.file = d.source.clone();
            }
            Disk {
                device: if d.device.is_empty() {
                    "disk".into()
                } else {
                    d.device.clone()
                },
                r#type: if d.block { "block" } else { "file" }.into(),
                source,
                target: DiskTarget {
                    bus: d.bus.clone(),
                    device: d.target.clone(),
                },
                read_only: d.readonly.then(Enabled::default),
                alias: Alias::user(&d.volume),
            }
        })
        .collect();
    let interfaces = facts
        .interfaces
        .iter()
        // A MAC libvirt has not told yet: left out rather than sent without one.
        .filter(|i| !i.mac.is_empty())
        .map(|i| Interface {
            r#type: if i.kind.is_empty() {
                "ethernet".into()
            } else {
                i.kind.clone()
            },
            target: (!i.tap.is_empty()).then(|| InterfaceTarget {
                device: i.tap.clone(),
                managed: "no".into(),
            }),
            model: (!i.model.is_empty()).then(|| Model {
                r#type: i.model.clone(),
            }),
            mac: Mac { mac: i.mac.clone() },
            alias: Alias::user(&i.name),
        })
        .collect();
    let channels = facts
        .channels
        .iter()
        .map(|name| Channel {
            r#type: "unix".into(),
            target: Some(ChannelTarget {
                name: name.clone(),
                r#type: "virtio".into(),
                state: if name == GUEST_AGENT_CHANNEL {
                    if facts.agent_connected {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into()
                } else {
                    String::new()
                },
            }),
        })
        .collect();
    let grace_period = Some(GracePeriod {
        deletion_grace_period_seconds: if kv.deletion_grace_period_seconds != 0 {
            kv.deletion_grace_period_seconds
        } else {
            vmi.termination_grace_period().as_secs() as i64
        },
        deletion_timestamp: kv.deletion_timestamp.map(rfc3339),
        marked_for_graceful_shutdown: kv.marked_for_graceful_shutdown.then_some(true),
    });
    let migration = kv.migration.as_ref().map(|m| Migration {
        uid: m.uid.clone(),
        start_timestamp: m.start_timestamp.map(rfc3339),
        end_timestamp: m.end_timestamp.map(rfc3339),
        failed: m.failed,
        failure_reason: m.failure_reason.clone(),
        abort_status: m.abort_status.clone(),
        mode: m.mode.clone(),
    });
    Domain {
        kind: "Domain".into(),
        api_version: DOMAIN_API_VERSION.into(),
        object_meta: ObjectMeta {
            name: vmi.metadata.name.clone(),
            namespace: vmi.namespace().to_string(),
            uid: uid.clone(),
            deletion_timestamp: None,
        },
        spec: DomainSpec {
            r#type: if facts.domain_type.is_empty() {
                "kvm".into()
            } else {
                facts.domain_type.clone()
            },
            name: if status.name.is_empty() {
                format!("{}_{}", vmi.namespace(), vmi.metadata.name)
            } else {
                status.name.clone()
            },
            uuid: facts.uuid.clone(),
            memory: memory.clone(),
            current_memory: memory,
            os: Os {
                os_type: OsType {
                    os: "hvm".into(),
                    arch: facts.arch.clone(),
                    machine: facts.machine.clone(),
                },
            },
            devices: Devices {
                disks,
                interfaces,
                channels,
            },
            metadata: Metadata {
                kubevirt: KubeVirtMetadata {
                    uid,
                    grace_period,
                    migration,
                },
            },
            features: facts.acpi.then_some(Features {
                acpi: Some(Enabled {}),
            }),
        },
        status: DomainStatus {
            status: String::new(),
            reason: String::new(),
            // The guest agent's view when it reported; until then the leases our DHCP server
            // gave (KubeVirt's InterfaceStatus fields; the handler matches them by MAC).
            interfaces: super::guest::interfaces(&facts.guest).or_else(|| lease_statuses(facts)),
            os_info: super::guest::os_info(&facts.guest),
            fs_freeze_status: FsFreeze {
                status: super::guest::fs_freeze_status(facts),
            },
        },
    }
}

/// The domain as JSON bytes (serializing these structs cannot fail).
pub fn to_json(d: &Domain) -> Vec<u8> {
    serde_json::to_vec(d).unwrap_or_default()
}

#[cfg(test)]
// `KubevirtMetadata {..}.into()`: the same tests whether the status keeps it boxed or not.
#[allow(clippy::useless_conversion)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::vm::state::{
        DiskStatus, DomainFacts, InterfaceFacts, KubevirtMetadata, MigrationMetadata,
        MigrationProgress,
    };

    const UID: &str = "6a1c5ad6-6a6e-4f67-9b2e-4d1d5b0f0001";
    const UUID: &str = "5b1a3f1e-0c0d-4e6f-8a9b-0c1d2e3f4a5b";

    fn vmi(grace: Option<u64>) -> VirtualMachineInstance {
        let mut v: VirtualMachineInstance = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "testvmi", "namespace": "default", "uid": UID},
            "spec": {"domain": {"devices": {}}}
        }))
        .unwrap();
        v.spec.termination_grace_period_seconds = grace;
        v
    }

    fn disk(volume: &str, target: &str, hotplugged: bool, phase: Phase) -> DiskStatus {
        DiskStatus {
            volume: volume.into(),
            target: target.into(),
            bus: "virtio".into(),
            source: format!("/var/run/kubevirt-private/vmi-disks/{volume}/disk.img"),
            phase,
            message: String::new(),
            hotplugged,
            shared: false,
            readonly: false,
            size_bytes: 0,
            device: "disk".into(),
            block: false,
        }
    }

    /// The contract's minimal domain (section 4.3): a running VM, one PVC disk, one pod NIC.
    fn status() -> Status {
        Status {
            name: "default_testvmi".into(),
            uid: UID.into(),
            state: State::Running,
            reason: "started".into(),
            disks: vec![disk("rootdisk", "vda", false, Phase::Ready)],
            // `.into()`: the status may keep it boxed.
            kubevirt: KubevirtMetadata {
                deletion_grace_period_seconds: 30,
                ..Default::default()
            }
            .into(),
            domain: Box::new(DomainFacts {
                domain_type: "kvm".into(),
                uuid: UUID.into(),
                arch: "x86_64".into(),
                machine: "pc-q35-rhel9.6.0".into(),
                memory_kib: 131072,
                acpi: true,
                interfaces: vec![InterfaceFacts {
                    name: "default".into(),
                    mac: "02:7a:1e:00:00:01".into(),
                    kind: "ethernet".into(),
                    tap: "tap0".into(),
                    model: "virtio".into(),
                    ips: vec![],
                }],
                channels: vec![GUEST_AGENT_CHANNEL.into()],
                agent_connected: false,
                frozen: false,
                guest: Default::default(),
            }),
            ..Default::default()
        }
    }

    fn rendered(s: &Status, v: &VirtualMachineInstance) -> serde_json::Value {
        serde_json::from_slice(&to_json(&render(s, v).unwrap())).unwrap()
    }

    #[test]
    fn the_contracts_minimal_domain_field_by_field() {
        let d = rendered(&status(), &vmi(Some(30)));
        let at = |p: &str| d.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
        for (path, want) in [
            ("/ObjectMeta/name", json!("testvmi")),
            ("/ObjectMeta/namespace", json!("default")),
            ("/ObjectMeta/uid", json!(UID)),
            ("/Spec/Type", json!("kvm")),
            ("/Spec/Name", json!("default_testvmi")),
            ("/Spec/UUID", json!(UUID)),
            (
                "/Spec/CurrentMemory",
                json!({"Value": 131072, "Unit": "KiB"}),
            ),
            (
                "/Spec/OS/Type",
                json!({"OS": "hvm", "Arch": "x86_64", "Machine": "pc-q35-rhel9.6.0"}),
            ),
            ("/Spec/Features/ACPI", json!({})),
            (
                "/Spec/Devices/Disks",
                json!([{"Device": "disk", "Type": "file",
                        "Source": {"File": "/var/run/kubevirt-private/vmi-disks/rootdisk/disk.img"},
                        "Target": {"Bus": "virtio", "Device": "vda"},
                        "Alias": {"Name": "rootdisk", "UserDefined": true}}]),
            ),
            (
                "/Spec/Devices/Interfaces",
                json!([{"Type": "ethernet", "Target": {"Device": "tap0", "Managed": "no"},
                        "Model": {"Type": "virtio"},
                        "MAC": {"MAC": "02:7a:1e:00:00:01"},
                        "Alias": {"Name": "default", "UserDefined": true}}]),
            ),
            (
                "/Spec/Devices/Channels",
                json!([{"Type": "unix", "Target": {"Name": "org.qemu.guest_agent.0",
                        "Type": "virtio", "State": "disconnected"}}]),
            ),
            ("/Spec/Metadata/KubeVirt/UID", json!(UID)),
            (
                "/Spec/Metadata/KubeVirt/GracePeriod",
                json!({"DeletionGracePeriodSeconds": 30}),
            ),
            ("/Status/Status", json!("Running")),
            ("/Status/Reason", json!("Unknown")),
            ("/Status/OSInfo", json!({})),
            ("/Status/FSFreezeStatus", json!({"Status": ""})),
            ("/Status/Interfaces", json!(null)),
        ] {
            assert_eq!(at(path), want, "{path} in {d}");
        }
        assert!(at("/ObjectMeta/deletionTimestamp").is_null());
        // Decodes back into the same structs (what the test's notify server does).
        let back: Domain = serde_json::from_value(d).unwrap();
        assert_eq!(back, render(&status(), &vmi(Some(30))).unwrap());
    }

    #[test]
    fn each_state_maps_to_kubevirts_lifecycle_and_never_unknown() {
        let mut s = status();
        let cases = [
            (State::Starting, "sync", None, ("Shutoff", "Unknown")),
            (
                State::Starting,
                "incoming migration",
                None,
                ("Paused", "StartingUp"),
            ),
            (State::Running, "started", None, ("Running", "Unknown")),
            (State::Running, "unpaused", None, ("Running", "Unknown")),
            (State::Paused, "paused", None, ("Paused", "User")),
            (
                State::Paused,
                "paused",
                Some(MigrationPhase::Running),
                ("Paused", "Migration"),
            ),
            (
                State::ShuttingDown,
                "guest shutdown",
                None,
                ("ShuttingDown", "User"),
            ),
            (State::Shutoff, "shutdown", None, ("Shutoff", "Shutdown")),
            (State::Shutoff, "destroyed", None, ("Shutoff", "Destroyed")),
            (State::Shutoff, "migrated", None, ("Shutoff", "Migrated")),
            (State::Shutoff, "saved", None, ("Shutoff", "Saved")),
            (State::Shutoff, "failed", None, ("Shutoff", "Failed")),
            (State::Crashed, "panicked", None, ("Crashed", "Panicked")),
            (State::Crashed, "crashed", None, ("Shutoff", "Crashed")),
            (State::Crashed, "failed", None, ("Shutoff", "Failed")),
            (
                State::Crashed,
                "fromsnapshot",
                None,
                ("Shutoff", "FromSnapshot"),
            ),
            (State::Crashed, "unknown", None, ("Shutoff", "Unknown")),
        ];
        for (state, reason, migration, want) in cases {
            s.state = state;
            s.reason = reason.into();
            s.migration = migration.map(MigrationProgress::new);
            let d = rendered(&s, &vmi(None));
            let got = (d["Status"]["Status"].clone(), d["Status"]["Reason"].clone());
            assert_eq!(got, (json!(want.0), json!(want.1)), "{state:?}/{reason}");
            assert_ne!(got.0, json!("Unknown"));
        }
        s.state = State::None;
        assert!(
            render(&s, &vmi(None)).is_none(),
            "no domain, nothing to send"
        );
    }

    #[test]
    fn grace_and_migration_metadata_are_rendered() {
        let t = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let mut s = status();
        s.kubevirt = KubevirtMetadata {
            deletion_grace_period_seconds: 45,
            deletion_timestamp: Some(t(1_796_190_382)),
            marked_for_graceful_shutdown: true,
            migration: Some(MigrationMetadata {
                uid: "mig-1".into(),
                start_timestamp: Some(t(1_796_190_000)),
                end_timestamp: Some(t(1_796_190_100)),
                failed: true,
                failure_reason: "target killed".into(),
                abort_status: "Aborting".into(),
                mode: "PreCopy".into(),
            }),
        }
        .into();
        let d = rendered(&s, &vmi(Some(30)));
        let kv = &d["Spec"]["Metadata"]["KubeVirt"];
        assert_eq!(
            kv["GracePeriod"],
            json!({"DeletionGracePeriodSeconds": 45,
                   "DeletionTimestamp": "2026-12-02T05:46:22Z",
                   "MarkedForGracefulShutdown": true})
        );
        assert_eq!(
            kv["Migration"],
            json!({"UID": "mig-1", "StartTimestamp": "2026-12-02T05:40:00Z",
                   "EndTimestamp": "2026-12-02T05:41:40Z", "Failed": true,
                   "FailureReason": "target killed", "AbortStatus": "Aborting",
                   "Mode": "PreCopy"})
        );
        // The core has not stamped a grace period yet: the VMI's is used.
        *s.kubevirt = Default::default();
        let d = rendered(&s, &vmi(Some(7)));
        assert_eq!(
            d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"],
            json!({"DeletionGracePeriodSeconds": 7})
        );
        assert!(d["Spec"]["Metadata"]["KubeVirt"]["Migration"].is_null());
    }

    #[test]
    fn every_disk_and_interface_has_an_alias_and_every_interface_a_mac() {
        let mut s = status();
        s.disks = vec![
            disk("rootdisk", "vda", false, Phase::Ready),
            disk("booting", "vdb", false, Phase::Attaching),
            disk("hp-ready", "sda", true, Phase::Ready),
            disk("hp-leaving", "sdb", true, Phase::Detaching),
            disk("hp-pending", "sdc", true, Phase::Attaching),
            disk("hp-failed", "sdd", true, Phase::Failed),
            disk("hp-gone", "sde", true, Phase::Detached),
        ];
        s.disks[1].block = true;
        s.disks[1].device = "lun".into();
        s.domain.interfaces.push(InterfaceFacts {
            name: "nomac".into(),
            mac: String::new(),
            kind: "ethernet".into(),
            tap: "tap1".into(),
            model: "virtio".into(),
            ips: vec![],
        });
        let d = rendered(&s, &vmi(None));
        let disks = d["Spec"]["Devices"]["Disks"].as_array().unwrap();
        let names: Vec<_> = disks.iter().map(|x| x["Alias"]["Name"].clone()).collect();
        assert_eq!(
            names,
            [
                json!("rootdisk"),
                json!("booting"),
                json!("hp-ready"),
                json!("hp-leaving")
            ],
            "a hot-plugged disk is in the domain only while attached"
        );
        for x in disks {
            assert_eq!(x["Alias"]["UserDefined"], json!(true));
            assert!(x["Target"]["Device"]
                .as_str()
                .is_some_and(|t| !t.is_empty()));
        }
        assert_eq!(
            disks[1]["Source"],
            json!({"Dev": "/var/run/kubevirt-private/vmi-disks/booting/disk.img"})
        );
        assert_eq!(
            (&disks[1]["Type"], &disks[1]["Device"]),
            (&json!("block"), &json!("lun"))
        );
        let ifaces = d["Spec"]["Devices"]["Interfaces"].as_array().unwrap();
        assert_eq!(ifaces.len(), 1, "an interface without a MAC is left out");
        assert!(ifaces
            .iter()
            .all(|i| i["MAC"]["MAC"].is_string() && i["Alias"]["Name"].is_string()));
        // Decoding a disk without an alias is an error here too: it cannot be made.
        let bad = json!({"Device": "disk", "Type": "file", "Source": {"File": "/x"},
                         "Target": {"Device": "vda"}});
        assert!(serde_json::from_value::<Disk>(bad).is_err());
    }

    #[test]
    fn agent_and_freeze_state_are_rendered() {
        let mut s = status();
        s.domain.agent_connected = true;
        s.domain.frozen = true;
        let d = rendered(&s, &vmi(None));
        assert_eq!(
            d["Spec"]["Devices"]["Channels"][0]["Target"]["State"],
            json!("connected")
        );
        assert_eq!(d["Status"]["FSFreezeStatus"]["Status"], json!("frozen"));
    }

    #[test]
    fn the_gone_domain_has_a_deletion_timestamp_and_no_state() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_190_382);
        let d: serde_json::Value =
            serde_json::from_slice(&to_json(&gone(&status(), &vmi(None), now))).unwrap();
        assert_eq!(
            d["ObjectMeta"],
            json!({"name": "testvmi", "namespace": "default", "uid": UID,
                   "deletionTimestamp": "2026-12-02T05:46:22Z"})
        );
        assert_eq!(d["Status"]["Status"], json!("NoState"));
        assert_eq!(d["Status"]["Reason"], json!("NonExistent"));
        assert_eq!(d["Spec"]["Metadata"]["KubeVirt"]["UID"], json!(UID));
    }

    #[test]
    fn the_lease_we_gave_is_the_interface_status_until_the_agent_reports() {
        let mut s = status();
        assert_eq!(
            rendered(&s, &vmi(None))["Status"]["Interfaces"],
            json!(null)
        );
        s.domain.interfaces[0].ips = vec!["10.0.2.2".into()];
        assert_eq!(
            rendered(&s, &vmi(None))["Status"]["Interfaces"],
            json!([{"Mac": "02:7a:1e:00:00:01", "Ip": "10.0.2.2", "IPs": ["10.0.2.2"]}])
        );
    }
}
