//! What the guest agent reported, in KubeVirt's shapes: `GetGuestInfo`'s
//! `VirtualMachineInstanceGuestAgentInfo`, `GetUsers`' and `GetFilesystems`' lists (JSON names
//! of `kubevirt.io/api/core/v1`), and the domain's `Status.OSInfo` / `Status.Interfaces`
//! (Go field names of the launcher's `api.Domain`). Pure: the core keeps the agent's answers
//! as the agent gave them (`DomainFacts::guest`, by command).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::vm::state::DomainFacts;

type Answers = BTreeMap<String, Value>;

/// How many users and filesystems GetGuestInfo lists (KubeVirt's launcher: 10; GetUsers and
/// GetFilesystems list them all).
const INFO_LIMIT: usize = 10;

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn int(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn list<'a>(answers: &'a Answers, command: &str) -> impl Iterator<Item = &'a Value> {
    answers
        .get(command)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Inserts `key: value` unless the value is empty (Go's `omitempty`).
fn put(m: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Null => true,
        _ => false,
    };
    if !empty {
        m.insert(key.into(), value);
    }
}

/// `guest-get-users` as `VirtualMachineInstanceGuestOSUser`s.
pub fn users(answers: &Answers, limit: usize) -> Vec<Value> {
    list(answers, "guest-get-users")
        .take(limit)
        .map(|u| {
            let mut m = Map::new();
            m.insert("userName".into(), json!(text(u, "user")));
            put(&mut m, "domain", json!(text(u, "domain")));
            let login = u.get("login-time").and_then(Value::as_f64).unwrap_or(0.0);
            if login != 0.0 {
                m.insert("loginTime".into(), json!(login));
            }
            Value::Object(m)
        })
        .collect()
}

/// `guest-get-fsinfo` as `VirtualMachineInstanceFileSystem`s.
pub fn filesystems(answers: &Answers, limit: usize) -> Vec<Value> {
    list(answers, "guest-get-fsinfo")
        .take(limit)
        .map(|f| {
            let mut m = Map::new();
            m.insert("diskName".into(), json!(text(f, "name")));
            m.insert("mountPoint".into(), json!(text(f, "mountpoint")));
            m.insert("fileSystemType".into(), json!(text(f, "type")));
            m.insert("usedBytes".into(), json!(int(f, "used-bytes")));
            m.insert("totalBytes".into(), json!(int(f, "total-bytes")));
            let disks: Vec<Value> = f
                .get("disk")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|d| {
                    let mut m = Map::new();
                    put(&mut m, "serial", json!(text(d, "serial")));
                    m.insert("busType".into(), json!(text(d, "bus-type")));
                    Value::Object(m)
                })
                .collect();
            put(&mut m, "disk", Value::Array(disks));
            Value::Object(m)
        })
        .collect()
}

/// `guest-get-osinfo`'s fields: (agent name, KubeVirt JSON name, api.Domain Go name).
const OS_FIELDS: &[(&str, &str, &str)] = &[
    ("name", "name", "Name"),
    ("kernel-release", "kernelRelease", "KernelRelease"),
    ("version", "version", "Version"),
    ("pretty-name", "prettyName", "PrettyName"),
    ("version-id", "versionId", "VersionId"),
    ("kernel-version", "kernelVersion", "KernelVersion"),
    ("machine", "machine", "Machine"),
    ("id", "id", "Id"),
];

/// GetGuestInfo's `VirtualMachineInstanceGuestAgentInfo`.
pub fn guest_info(facts: &DomainFacts) -> Value {
    let a = &facts.guest;
    let none = Value::Null;
    let mut m = Map::new();
    let info = a.get("guest-info").unwrap_or(&none);
    put(&mut m, "guestAgentVersion", json!(text(info, "version")));
    let commands: Vec<Value> = info
        .get("supported_commands")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let mut m = Map::new();
            m.insert("name".into(), json!(text(c, "name")));
            if c.get("enabled").and_then(Value::as_bool) == Some(true) {
                m.insert("enabled".into(), json!(true));
            }
            Value::Object(m)
        })
        .collect();
    put(&mut m, "supportedCommands", Value::Array(commands));
    let host = a.get("guest-get-host-name").unwrap_or(&none);
    put(&mut m, "hostname", json!(text(host, "host-name")));
    let os = a.get("guest-get-osinfo").unwrap_or(&none);
    let mut o = Map::new();
    for (agent, kubevirt, _) in OS_FIELDS {
        put(&mut o, kubevirt, json!(text(os, agent)));
    }
    m.insert("os".into(), Value::Object(o));
    // "<zone>, <offset>" as KubeVirt's launcher formats it; nothing when the agent has not
    // told (KubeVirt would say ", 0").
    if let Some(tz) = a.get("guest-get-timezone") {
        m.insert(
            "timezone".into(),
            json!(format!("{}, {}", text(tz, "zone"), int(tz, "offset"))),
        );
    }
    put(&mut m, "userList", Value::Array(users(a, INFO_LIMIT)));
    let fs = filesystems(a, INFO_LIMIT);
    m.insert(
        "fsInfo".into(),
        json!({"disks": if fs.is_empty() { Value::Null } else { Value::Array(fs) }}),
    );
    put(&mut m, "fsFreezeStatus", json!(fs_freeze_status(facts)));
    Value::Object(m)
}

/// `frozen` while a freeze of ours holds, else what the agent last said (`thawed`,
/// `frozen`), else nothing.
pub fn fs_freeze_status(facts: &DomainFacts) -> String {
    if facts.frozen {
        return "frozen".into();
    }
    facts
        .guest
        .get("guest-fsfreeze-status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// api.Domain's `Status.OSInfo` (Go field names; empty strings kept, as Go sends them).
pub fn os_info(answers: &Answers) -> Map<String, Value> {
    let none = Value::Null;
    let os = answers.get("guest-get-osinfo").unwrap_or(&none);
    if os.is_null() {
        return Map::new();
    }
    OS_FIELDS
        .iter()
        .map(|(agent, _, go)| (go.to_string(), json!(text(os, agent))))
        .collect()
}

/// api.Domain's `Status.Interfaces`: the agent's interfaces but loopback, with the first IPv4
/// address (else the first address) as `Ip`. `None` until the agent has told.
pub fn interfaces(answers: &Answers) -> Option<Vec<Value>> {
    answers.get("guest-network-get-interfaces")?;
    Some(
        list(answers, "guest-network-get-interfaces")
            .filter(|i| text(i, "name") != "lo")
            .map(|i| {
                let addrs: Vec<(String, String)> = i
                    .get("ip-addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|a| (text(a, "ip-address-type"), text(a, "ip-address")))
                    .collect();
                let ip = addrs
                    .iter()
                    .find(|(t, _)| t == "ipv4")
                    .or(addrs.first())
                    .map(|(_, ip)| ip.clone())
                    .unwrap_or_default();
                let ips: Vec<&String> = addrs.iter().map(|(_, ip)| ip).collect();
                json!({
                    "Mac": text(i, "hardware-address"),
                    "Ip": ip,
                    "IPs": if ips.is_empty() { Value::Null } else { json!(ips) },
                    "InterfaceName": text(i, "name"),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(answers: Value) -> DomainFacts {
        DomainFacts {
            guest: serde_json::from_value(answers).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_known_is_an_empty_info_as_kubevirt_sends_it() {
        let f = DomainFacts::default();
        assert_eq!(guest_info(&f), json!({"os": {}, "fsInfo": {"disks": null}}));
        assert!(os_info(&f.guest).is_empty());
        assert_eq!(interfaces(&f.guest), None);
    }

    #[test]
    fn agent_answers_become_kubevirts_fields() {
        let mut f = facts(json!({
            "guest-info": {"version": "8.1", "supported_commands": [
                {"name": "guest-ping", "enabled": true, "success-response": true},
                {"name": "guest-exec", "enabled": false}]},
            "guest-get-host-name": {"host-name": "vm1"},
            "guest-get-osinfo": {"id": "fedora", "name": "Fedora", "pretty-name": "Fedora 40",
                "version-id": "40", "kernel-release": "6.8", "machine": "x86_64"},
            "guest-get-timezone": {"zone": "CET", "offset": 3600},
            "guest-get-users": [{"user": "alice", "login-time": 1700000000.5},
                                {"user": "bob", "domain": "CORP", "login-time": 1.0}],
            "guest-get-fsinfo": [{"name": "vda1", "mountpoint": "/", "type": "xfs",
                "used-bytes": 10, "total-bytes": 20,
                "disk": [{"serial": "s1", "bus-type": "virtio", "bus": 0}]}],
            "guest-fsfreeze-status": "thawed",
            "guest-network-get-interfaces": [
                {"name": "lo", "hardware-address": "00:00:00:00:00:00"},
                {"name": "eth0", "hardware-address": "02:00:00:00:00:01", "ip-addresses": [
                    {"ip-address-type": "ipv6", "ip-address": "fd00::2", "prefix": 64},
                    {"ip-address-type": "ipv4", "ip-address": "10.0.2.2", "prefix": 24}]},
                {"name": "eth1", "hardware-address": "02:00:00:00:00:02"}],
        }));
        assert_eq!(
            guest_info(&f),
            json!({
                "guestAgentVersion": "8.1",
                "supportedCommands": [{"name": "guest-ping", "enabled": true},
                                      {"name": "guest-exec"}],
                "hostname": "vm1",
                "os": {"name": "Fedora", "kernelRelease": "6.8", "prettyName": "Fedora 40",
                       "versionId": "40", "machine": "x86_64", "id": "fedora"},
                "timezone": "CET, 3600",
                "userList": [{"userName": "alice", "loginTime": 1700000000.5},
                             {"userName": "bob", "domain": "CORP", "loginTime": 1.0}],
                "fsInfo": {"disks": [{"diskName": "vda1", "mountPoint": "/",
                    "fileSystemType": "xfs", "usedBytes": 10, "totalBytes": 20,
                    "disk": [{"serial": "s1", "busType": "virtio"}]}]},
                "fsFreezeStatus": "thawed",
            })
        );
        f.frozen = true;
        assert_eq!(guest_info(&f)["fsFreezeStatus"], "frozen");
        assert_eq!(os_info(&f.guest)["PrettyName"], "Fedora 40");
        assert_eq!(os_info(&f.guest)["Version"], "");
        assert_eq!(
            interfaces(&f.guest).unwrap(),
            vec![
                json!({"Mac": "02:00:00:00:00:01", "Ip": "10.0.2.2",
                       "IPs": ["fd00::2", "10.0.2.2"], "InterfaceName": "eth0"}),
                json!({"Mac": "02:00:00:00:00:02", "Ip": "", "IPs": null,
                       "InterfaceName": "eth1"}),
            ]
        );
        assert_eq!(users(&f.guest, 1).len(), 1);
        assert_eq!(filesystems(&f.guest, usize::MAX).len(), 1);
    }
}
