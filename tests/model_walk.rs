//! The model walk: no field of the v1 VMI model (our `src/spec` types) is accepted and silently
//! ignored. The walk discovers every field of [`VirtualMachineInstance`] through serde (a field
//! set to `{}`, `[{}]`, a bool, a number or a string survives a round trip exactly when the
//! model has it), then, for every leaf field, sets it to a range of plausible values on a valid
//! VMI and converts: the field counts as used when some value changes the result (the domain
//! XML, or the error, which names the field). A field that changes nothing must be listed in
//! [`INERT`] with the reason it is inert (e.g. a field only virt-controller or the pod uses).
//!
//! A second check reads `src/spec/mod.rs` and fails for any field of a VMI struct the walk did
//! not reach (serde's `skip_serializing_if` hides unset fields from a round trip; the base VMI
//! sets those), so a new field cannot slip past the walk.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};
use virt_launcher::convert::{self, facts::PodFacts};
use virt_launcher::spec::VirtualMachineInstance;

/// Fields that change no conversion, each with the reason. Paths use `[]` for array elements.
const INERT: &[(&str, &str)] = &[
    ("apiVersion", "checked when the file is loaded (spec::from_str), not by the converter"),
    ("kind", "checked when the file is loaded (spec::from_str), not by the converter"),
    ("metadata.labels", "cluster metadata: selectors and policies, nothing in the domain (as in KubeVirt)"),
    ("spec.terminationGracePeriodSeconds", "the launcher's shutdown deadline (src/vm), not domain XML"),
    ("spec.hostname", "given to the guest by cloud-init/DHCP in the pod, not by the domain (as in KubeVirt's converter)"),
    ("spec.domain.devices.interfaces[].ports", "passt's forwarded ports: the passt command line (src/pod), not domain XML, except with passtBinding (checked by the net engineer's golden cases)"),
    ("spec.domain.devices.interfaces[].ports[].name", "a label for the port; KubeVirt ignores it too"),
    ("spec.domain.devices.disks[].tag", "KubeVirt uses it only for the guest's device metadata (cloud-init config drive), which we do not generate"),
    ("spec.volumes[].ephemeral.persistentVolumeClaim.readOnly", "the ephemeral overlay is written, the claim below is never written either way"),
    ("spec.volumes[].ephemeral.persistentVolumeClaim.hotpluggable", "an ephemeral volume is not hot-plugged (KubeVirt: only PVC/DataVolume volumes)"),
    ("spec.volumes[].containerDisk.imagePullPolicy", "kubelet's pull policy for the pod"),
    ("spec.volumes[].hostDisk.capacity", "the size `prepare` creates a DiskOrCreate image with (src/vm), not domain XML"),
    ("spec.volumes[].hostDisk.shared", "virt-controller's migration decision; the domain is the same"),
    ("spec.volumes[].cloudInitNoCloud.secretRef", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitNoCloud.secretRef.name", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitNoCloud.networkDataSecretRef", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitNoCloud.networkDataSecretRef.name", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitConfigDrive.secretRef", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitConfigDrive.secretRef.name", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitConfigDrive.networkDataSecretRef", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].cloudInitConfigDrive.networkDataSecretRef.name", "the pod mounts the secret; its content goes into the ISO (src/vm)"),
    ("spec.volumes[].configMap.optional", "kubelet's mount rule for a missing config map"),
    ("spec.volumes[].configMap.volumeLabel", "the ISO's volume label, written by `prepare` (src/vm)"),
    ("spec.volumes[].secret.optional", "kubelet's mount rule for a missing secret"),
    ("spec.volumes[].secret.volumeLabel", "the ISO's volume label, written by `prepare` (src/vm)"),
    ("spec.volumes[].serviceAccount.serviceAccountName", "the pod mounts the account's token; `prepare` makes the ISO"),
    ("spec.domain.devices.interfaces[].bridge", "bridge and masquerade differ in the pod's network set-up (src/pod); the domain's tap interface is the same, as in KubeVirt's converter"),
    ("spec.domain.firmware.bootloader.efi.persistent", "virt-controller mounts the backend-storage PVC at the NVRAM directory; the domain's NVRAM path is the same (KubeVirt compute/os.go)"),
    ("spec.volumes[].cloudInitNoCloud.userDataBase64", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.volumes[].cloudInitNoCloud.networkData", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.volumes[].cloudInitNoCloud.networkDataBase64", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.volumes[].cloudInitConfigDrive.userDataBase64", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.volumes[].cloudInitConfigDrive.networkData", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.volumes[].cloudInitConfigDrive.networkDataBase64", "the content of the ISO `prepare` writes (src/vm), not domain XML"),
    ("spec.domain.devices.gpus[].name", "GPUs are refused whatever they are (spec.domain.devices.gpus[0]: device plugins)"),
    ("spec.domain.devices.gpus[].deviceName", "GPUs are refused whatever they are (spec.domain.devices.gpus[0]: device plugins)"),
    ("spec.domain.devices.hostDevices[].name", "host devices are refused whatever they are (spec.domain.devices.hostDevices[0]: device plugins)"),
    ("spec.domain.devices.hostDevices[].deviceName", "host devices are refused whatever they are (spec.domain.devices.hostDevices[0]: device plugins)"),
    ("spec.domain.devices.tpm.persistent", "a TPM is refused whatever its persistence (spec.domain.devices.tpm: no swtpm in the image)"),
    ("spec.domain.devices.watchdog.diag288.action", "diag288 (s390x) is refused whatever its action (spec.domain.devices.watchdog.diag288)"),
    ("status.phase", "virt-controller's bookkeeping; the domain does not depend on it"),
    ("status.volumeStatus[].phase", "hot-plug readiness only matters for hotpluggable volumes (walked via hotplugVolume); for others KubeVirt ignores it"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.claimName", "virt-controller's bookkeeping"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.accessModes", "the migration decision (src/vm/migration), not domain XML"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.volumeMode", "the pod's device node or image tells Block from Filesystem (PodFacts), as in KubeVirt"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.capacity", "online expansion of a running VM (src/vm/volumes), not domain XML"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.requests", "virt-controller's bookkeeping"),
    ("status.volumeStatus[].persistentVolumeClaimInfo.filesystemOverhead", "online expansion of a running VM (src/vm/volumes), not domain XML"),
    ("status.interfaces", "the pod interface of each VMI interface: read by the pod network set-up (src/pod), not domain XML"),
    ("status.interfaces[].name", "the pod network set-up (src/pod), not domain XML"),
    ("status.runtimeUser", "non-root runs: only the CBT overlay directory depends on it (walked with CBT Enabled in cbt-non-root-initializing); the launcher refuses non-root pods (README)"),
];

/// What a freshly created object or array element starts as, where `{}` is not valid.
const SEEDS: &[(&str, &str)] = &[
    ("spec.domain.cpu.features[]", r#"{"name": "pcid"}"#),
    (
        "spec.domain.devices.disks[].blockSize.custom",
        r#"{"logical": 512, "physical": 4096}"#,
    ),
    (
        "spec.domain.devices.interfaces[].ports[]",
        r#"{"port": 80}"#,
    ),
    (
        "spec.domain.firmware.kernelBoot",
        r#"{"container": {"image": "k", "kernelPath": "/vmlinuz"}}"#,
    ),
    (
        "spec.domain.devices.watchdog",
        r#"{"name": "wd", "i6300esb": {}}"#,
    ),
    ("spec.domain.devices.sound", r#"{"name": "snd"}"#),
    ("spec.volumes[].dataVolume", r#"{"name": "dv"}"#),
    (
        "spec.volumes[].ephemeral",
        r#"{"persistentVolumeClaim": {"claimName": "c"}}"#,
    ),
    ("spec.volumes[].containerDisk", r#"{"image": "img"}"#),
    (
        "spec.volumes[].hostDisk",
        r#"{"path": "/data/disk.img", "type": "Disk"}"#,
    ),
    ("spec.volumes[].configMap", r#"{"name": "cm"}"#),
    (
        "spec.volumes[].sysprep",
        r#"{"configMap": {"name": "unattend"}}"#,
    ),
    ("spec.volumes[].secret", r#"{"secretName": "s"}"#),
    (
        "spec.volumes[].serviceAccount",
        r#"{"serviceAccountName": "sa"}"#,
    ),
    (
        "spec.volumes[].cloudInitNoCloud",
        r##"{"userData": "#cloud-config"}"##,
    ),
    (
        "spec.volumes[].cloudInitConfigDrive",
        r##"{"userData": "#cloud-config"}"##,
    ),
    (
        "status.volumeStatus[].persistentVolumeClaimInfo",
        r#"{"claimName": "root"}"#,
    ),
];

fn seed(path: &[Step]) -> Value {
    let name = show(path);
    SEEDS
        .iter()
        .find(|(p, _)| *p == name)
        .map(|(_, v)| serde_json::from_str(v).expect("seed is JSON"))
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// Leaves that matter only without some other part of the base VMI: (leaf, JSON pointer of
/// the part removed for its test).
const WITHOUT: &[(&str, &str)] = &[
    // The handler's volumeStatus overrides the flag (apply_volume_status_hotplug).
    (
        "spec.volumes[].persistentVolumeClaim.hotpluggable",
        "/status/volumeStatus",
    ),
    (
        "spec.volumes[].dataVolume.hotpluggable",
        "/status/volumeStatus",
    ),
];

/// Fields whose siblings in the same object exclude each other: setting one removes the others.
const ONE_OF: &[&[&str]] = &[
    &["disk", "cdrom", "lun"],
    &[
        "persistentVolumeClaim",
        "dataVolume",
        "containerDisk",
        "ephemeral",
        "emptyDisk",
        "hostDisk",
        "cloudInitNoCloud",
        "cloudInitConfigDrive",
        "configMap",
        "secret",
        "serviceAccount",
        "downwardAPI",
        "sysprep",
    ],
    &[
        "masquerade",
        "bridge",
        "sriov",
        "slirp",
        "passt",
        "passtBinding",
        "binding",
    ],
    &["pod", "multus"],
    &["bios", "efi"],
];

fn base() -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "walk", "namespace": "ns1",
            "uid": "11111111-2222-4333-8444-0000000000ff",
            "labels": {"app": "walk"},
            "annotations": {"note": "x"}
        },
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "hostname": "walk",
            "domain": {
                "resources": {"requests": {"memory": "1Gi"}},
                "devices": {
                    "disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                    "inputs": [{"name": "tablet", "type": "tablet", "bus": "usb"}]
                }
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "root"}}]
        },
        "status": {
            "phase": "Running",
            "runtimeUser": 0,
            "volumeStatus": [{"name": "root", "target": "vdc"}],
            "interfaces": [{"name": "default", "podInterfaceName": "eth0"}]
        }
    })
}

/// One step of a path: an object key, or element 0 of an array.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Key(String),
    Elem,
}

fn show(path: &[Step]) -> String {
    let mut s = String::new();
    for st in path {
        match st {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Elem => s.push_str("[]"),
        }
    }
    s
}

/// What a leaf field holds, as the probe found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    Bool,
    Number,
    Text,
    /// A map of strings (labels, resources).
    Map,
    /// Free-form JSON (`serde_json::Value`).
    Any,
    /// A list of strings.
    TextList,
}

fn round_trip(doc: &Value) -> Option<Value> {
    let vmi: VirtualMachineInstance = serde_json::from_value(doc.clone()).ok()?;
    serde_json::to_value(&vmi).ok()
}

/// The node at `path`, creating objects/arrays on the way (element 0 of an array; a fresh
/// key removes its one-of siblings).
fn node_mut<'a>(doc: &'a mut Value, path: &[Step]) -> &'a mut Value {
    let mut cur = doc;
    for (i, st) in path.iter().enumerate() {
        let here = &path[..=i];
        cur = match st {
            Step::Key(k) => {
                let obj = cur.as_object_mut().expect("object on the path");
                if !obj.contains_key(k) || obj[k].is_null() {
                    for group in ONE_OF {
                        if group.contains(&k.as_str()) {
                            for other in group.iter() {
                                obj.remove(*other);
                            }
                        }
                    }
                    obj.insert(k.clone(), seed(here));
                }
                obj.get_mut(k).expect("just inserted")
            }
            Step::Elem => {
                if !cur.is_array() || cur.as_array().is_some_and(Vec::is_empty) {
                    *cur = Value::Array(vec![seed(here)]);
                }
                &mut cur.as_array_mut().expect("array")[0]
            }
        };
    }
    cur
}

fn get<'a>(doc: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = doc;
    for st in path {
        cur = match st {
            Step::Key(k) => cur.get(k)?,
            Step::Elem => cur.get(0)?,
        };
    }
    Some(cur)
}

fn with(doc: &Value, parent: &[Step], key: &str, v: Value) -> Value {
    let mut d = doc.clone();
    let mut path = parent.to_vec();
    path.push(Step::Key(key.to_string()));
    // Create the key through node_mut so that one-of siblings go.
    *node_mut(&mut d, &path) = v;
    d
}

/// Walks the model under the object at `parent` (which exists in `doc`), collecting leaves.
fn walk(
    doc: &Value,
    parent: &[Step],
    leaves: &mut BTreeMap<Vec<Step>, Leaf>,
    seen: &mut BTreeSet<Vec<Step>>,
) {
    let mut d = doc.clone();
    node_mut(&mut d, parent);
    let Some(rt) = round_trip(&d) else {
        panic!("{}: the walk's document does not deserialise", show(parent));
    };
    let keys: Vec<String> = match get(&rt, parent) {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        _ => return,
    };
    // Keys the round trip hides (skip_serializing_if) but the base document sets.
    let mut keys: BTreeSet<String> = keys.into_iter().collect();
    if let Some(Value::Object(m)) = get(&d, parent) {
        keys.extend(m.keys().cloned());
    }
    for key in keys {
        let mut path = parent.to_vec();
        path.push(Step::Key(key.clone()));
        if !seen.insert(path.clone()) {
            continue;
        }
        let accepts = |v: Value| -> Option<Value> {
            let d2 = with(&d, parent, &key, v);
            let rt = round_trip(&d2)?;
            get(&rt, &path).cloned()
        };
        // Free-form JSON keeps anything; a map keeps a key a struct would drop.
        let probe_key = json!({"zzProbe": "1"});
        if accepts(probe_key.clone()).as_ref() == Some(&probe_key) {
            let kind = if accepts(json!(true)) == Some(json!(true)) {
                Leaf::Any
            } else {
                Leaf::Map
            };
            leaves.insert(path, kind);
            continue;
        }
        if let Some(Value::Object(_)) = accepts(json!({})) {
            let d2 = if matches!(get(&d, &path), Some(Value::Object(_))) {
                d.clone()
            } else {
                with(&d, parent, &key, json!({}))
            };
            walk(&d2, &path, leaves, seen);
            continue;
        }
        if let Some(Value::Array(a)) = accepts(json!([{}])) {
            if matches!(a.first(), Some(Value::Object(_))) {
                let existing =
                    get(&d, &path).filter(|v| v.as_array().is_some_and(|a| !a.is_empty()));
                let d2 = if existing.is_some() {
                    d.clone()
                } else {
                    with(&d, parent, &key, json!([{}]))
                };
                let mut ep = path.clone();
                ep.push(Step::Elem);
                walk(&d2, &ep, leaves, seen);
                continue;
            }
        }
        if accepts(json!(["x"])) == Some(json!(["x"])) {
            leaves.insert(path, Leaf::TextList);
        } else if accepts(json!(true)) == Some(json!(true)) {
            leaves.insert(path, Leaf::Bool);
        } else if accepts(json!(1)).is_some_and(|v| v.is_number()) {
            leaves.insert(path, Leaf::Number);
        } else if accepts(json!("1Gi")).is_some_and(|v| v.is_string()) {
            leaves.insert(path, Leaf::Text);
        } else {
            panic!(
                "{}: the probe cannot tell what this field holds",
                show(&path)
            );
        }
    }
}

fn candidates(kind: Leaf) -> Vec<Value> {
    match kind {
        Leaf::Bool => vec![json!(true), json!(false)],
        Leaf::Number => [0, 1, 2, 3, 7, 30, 100, 4096, 65536, 1_000_000]
            .iter()
            .map(|n| json!(n))
            .collect(),
        Leaf::Text => [
            "x",
            "",
            "root",
            "1",
            "2",
            "true",
            "1Gi",
            "2Mi",
            "0.5",
            "virtio",
            "scsi",
            "sata",
            "usb",
            "none",
            "writethrough",
            "writeback",
            "native",
            "threads",
            "default",
            "open",
            "closed",
            "stop",
            "report",
            "ignore",
            "enospace",
            "host-passthrough",
            "Haswell",
            "q35",
            "pc-q35-rhel9.6.0",
            "Europe/Berlin",
            "catchup",
            "delay",
            "merge",
            "discard",
            "guest",
            "wall",
            "shared",
            "auto",
            "supplementalPool",
            "Disk",
            "DiskOrCreate",
            "/dev/x",
            "/tmp/x.img",
            "Enabled",
            "Initializing",
            "Ready",
            "MountedToPod",
            "UDP",
            "TCP",
            "e1000",
            "tablet",
            "vdz",
            "sdz",
            "02:00:00:00:00:01",
            "a-b",
            "KubeVirt",
            "0f0e0d0c-0b0a-4908-8706-050403020100",
        ]
        .iter()
        .map(|s| json!(s))
        .collect(),
        Leaf::Map => vec![
            json!({"memory": "2Gi"}),
            json!({"cpu": "3"}),
            json!({"storage": "2Gi"}),
            json!({"virt-launcher.kubevirt.io/spare-pcie-root-ports": "2"}),
        ],
        Leaf::Any => vec![
            json!({}),
            json!({"networkName": "x"}),
            json!({"name": "passt"}),
            json!({"fields": []}),
            json!({"manufacturer": "m", "serial": "s"}),
        ],
        Leaf::TextList => vec![json!(["ReadWriteMany"]), json!(["x"])],
    }
}

fn convert_doc(doc: &Value) -> String {
    let mut vmi: VirtualMachineInstance = match serde_json::from_value(doc.clone()) {
        Ok(v) => v,
        Err(e) => return format!("load: {e}"),
    };
    // As loading a VMI (spec::from_str) and a Sync (src/vm) do.
    vmi.apply_volume_status_hotplug();
    let mut facts = PodFacts::defaults(&vmi);
    // `lun` needs a block volume; every other kind ignores this.
    facts.block_volumes.insert("root".into());
    // A pod CPU set to pin onto: `dedicatedCpuPlacement` changes the domain (its <cputune>),
    // not only an error.
    facts.cpu_set = (0..16).collect();
    match convert::convert(&vmi, &facts) {
        Ok(d) => d.to_xml(),
        Err(e) => format!("error: {e}"),
    }
}

/// Does some value of the leaf at `path` change the conversion?
fn changes_output(path: &[Step], kind: Leaf) -> bool {
    let (parent, key) = path.split_at(path.len() - 1);
    let Step::Key(key) = &key[0] else {
        unreachable!("leaves are keys")
    };
    let mut without = base();
    let name = show(path);
    for (leaf, pointer) in WITHOUT {
        if *leaf == name {
            let (head, last) = pointer.rsplit_once('/').expect("a pointer");
            if let Some(Value::Object(m)) = without.pointer_mut(head) {
                m.remove(last);
            }
        }
    }
    node_mut(&mut without, parent)
        .as_object_mut()
        .expect("parent object")
        .remove(key);
    let reference = convert_doc(&without);
    candidates(kind)
        .into_iter()
        .any(|v| convert_doc(&with(&without, parent, key, v)) != reference)
}

#[test]
fn no_field_of_the_vmi_model_is_ignored_unless_listed_as_inert() {
    let mut leaves = BTreeMap::new();
    walk(&base(), &[], &mut leaves, &mut BTreeSet::new());
    assert!(
        leaves.len() > 100,
        "the walk found only {} fields",
        leaves.len()
    );
    let inert: BTreeMap<&str, &str> = INERT.iter().copied().collect();
    let mut ignored = Vec::new();
    let mut listed_but_used = Vec::new();
    let mut reached = BTreeSet::new();
    for (path, kind) in &leaves {
        let name = show(path);
        reached.insert(name.clone());
        let used = changes_output(path, *kind);
        match (used, inert.contains_key(name.as_str())) {
            (false, false) => ignored.push(name),
            (true, true) => listed_but_used.push(name),
            _ => {}
        }
    }
    // Inert entries may also name an object whose leaves are all inert.
    let stale: Vec<&str> = inert
        .keys()
        .filter(|k| {
            !reached.contains(**k)
                && !reached
                    .iter()
                    .any(|r| r.starts_with(&format!("{k}.")) || r.starts_with(&format!("{k}[]")))
        })
        .copied()
        .collect();
    assert!(
        ignored.is_empty() && listed_but_used.is_empty() && stale.is_empty(),
        "fields that change no conversion and are not listed as inert (implement them as \
         KubeVirt does, refuse them naming the field, or list them with the reason):\n  {}\n\
         listed as inert but they do change the output:\n  {}\n\
         listed as inert but not in the model:\n  {}",
        ignored.join("\n  "),
        listed_but_used.join("\n  "),
        stale.join("\n  ")
    );
}

/// Every field declared in the VMI structs of `src/spec/mod.rs` is reached by the walk (a field
/// serde hides from a round trip while unset would otherwise escape it).
#[test]
fn the_walk_reaches_every_field_declared_in_the_spec_module() {
    let mut leaves = BTreeMap::new();
    walk(&base(), &[], &mut leaves, &mut BTreeSet::new());
    let mut reached: BTreeSet<String> = BTreeSet::new();
    for path in leaves.keys() {
        for st in path {
            if let Step::Key(k) = st {
                reached.insert(k.clone());
            }
        }
    }
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/spec/mod.rs"))
        .expect("read src/spec/mod.rs");
    // Structs of the VirtualMachine wrapper, not of the VMI model.
    let not_vmi = [
        "VirtualMachine",
        "VmSpec",
        "VmiTemplate",
        "DataVolumeTemplate",
        // virt-handler's Sync options, not the VMI document (golden cases cover them).
        "HandlerOptions",
        "Smbios",
    ];
    let mut skip_next = false;
    let mut missing = Vec::new();
    let mut current: Option<String> = None;
    let mut rename: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct ") {
            current = rest
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .map(str::to_string);
            continue;
        }
        if t == "}" {
            current = None;
            continue;
        }
        let Some(st) = &current else { continue };
        if not_vmi.contains(&st.as_str()) {
            continue;
        }
        if t == "#[serde(skip)]" {
            skip_next = true;
            continue;
        }
        if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
            rename = r.split('"').next().map(str::to_string);
            continue;
        }
        if let Some(f) = t.strip_prefix("pub ") {
            let Some((field, _)) = f.split_once(':') else {
                continue;
            };
            if std::mem::take(&mut skip_next) {
                continue;
            }
            let json = rename.take().unwrap_or_else(|| camel(field));
            if !reached.contains(&json) {
                missing.push(format!("{st}.{field} ({json})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields the walk did not reach: {missing:?}"
    );
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}
