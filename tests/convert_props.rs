//! Property test (deterministic seeds, `fastrand`): arbitrary JSON and mutated real VMIs go
//! through `spec::from_str` → `convert` → `to_xml`. Nothing may panic, and every produced XML
//! must be well-formed and readable by `domain::live::LiveDomain::parse`.

use fastrand::Rng;
use serde_json::{json, Map, Value};
use virt_launcher::convert::facts::PodFacts;
use virt_launcher::domain::live::LiveDomain;
use virt_launcher::domain::DomainType;
use virt_launcher::{convert, spec};

const KEYS: &[&str] = &[
    "name",
    "disk",
    "cdrom",
    "lun",
    "bus",
    "bootOrder",
    "serial",
    "cache",
    "io",
    "shareable",
    "errorPolicy",
    "dedicatedIOThread",
    "blockSize",
    "custom",
    "logical",
    "physical",
    "readonly",
    "tray",
    "reservation",
    "persistentVolumeClaim",
    "claimName",
    "hotpluggable",
    "dataVolume",
    "containerDisk",
    "image",
    "path",
    "ephemeral",
    "emptyDisk",
    "capacity",
    "hostDisk",
    "type",
    "cloudInitNoCloud",
    "userData",
    "cloudInitConfigDrive",
    "configMap",
    "secret",
    "secretName",
    "serviceAccount",
    "downwardAPI",
    "memory",
    "guest",
    "hugepages",
    "pageSize",
    "cpu",
    "cores",
    "sockets",
    "threads",
    "model",
    "features",
    "policy",
    "firmware",
    "uuid",
    "bootloader",
    "efi",
    "bios",
    "secureBoot",
    "kernelBoot",
    "kernelArgs",
    "container",
    "kernelPath",
    "initrdPath",
    "clock",
    "utc",
    "offsetSeconds",
    "timezone",
    "timer",
    "hpet",
    "rtc",
    "tickPolicy",
    "track",
    "hyperv",
    "spinlocks",
    "vendorid",
    "acpi",
    "apic",
    "smm",
    "enabled",
    "interfaces",
    "masquerade",
    "bridge",
    "macAddress",
    "mtu",
    "networks",
    "pod",
    "multus",
    "inputs",
    "rng",
    "resources",
    "requests",
    "limits",
    "volumes",
    "devices",
    "disks",
    "ioThreadsPolicy",
    "ioThreads",
    "supplementalPoolThreadCount",
    "changedBlockTracking",
    "state",
    "runtimeUser",
    "passtBinding",
    "ports",
    "port",
    "protocol",
    "interfaces",
    "podInterfaceName",
    "machine",
    "volumeStatus",
    "target",
    "phase",
    "annotations",
];

const STRINGS: &[&str] = &[
    "",
    "a",
    "root",
    "..",
    "../x",
    "/",
    "a/b",
    "\0",
    "x\u{1}y",
    "virtio",
    "sata",
    "scsi",
    "usb",
    "none",
    "writeback",
    "native",
    "open",
    "1Gi",
    "0",
    "-1",
    "99999999Ei",
    "1e30",
    "2Mi",
    "q35",
    "host-model",
    "host-passthrough",
    "auto",
    "shared",
    "supplementalPool",
    "Enabled",
    "Initializing",
    "UDP",
    "Ready",
    "MountedToPod",
    "vda",
    "sdzz",
    "<&'\">",
    "ümlaut",
    "DiskOrCreate",
    "Disk",
    "/boot/vmlinuz",
    "kvm",
    "5d307ca9-b3ef-428c-8861-06e72d69f223",
];

fn gen_value(r: &mut Rng, depth: u32) -> Value {
    let k = if depth > 4 {
        r.usize(..4)
    } else {
        r.usize(..7)
    };
    match k {
        0 => Value::Null,
        1 => Value::Bool(r.u8(..100) < 50),
        2 => match r.usize(..4) {
            0 => json!(r.i64(..)),
            1 => json!(r.usize(..600)),
            2 => json!(-(r.usize(..10) as i64)),
            _ => json!(r.u64(..) as f64 / 3.0),
        },
        3 => Value::String(STRINGS[r.usize(..STRINGS.len())].to_string()),
        4 | 5 => {
            let mut m = Map::new();
            for _ in 0..r.usize(..5) {
                m.insert(
                    KEYS[r.usize(..KEYS.len())].to_string(),
                    gen_value(r, depth + 1),
                );
            }
            Value::Object(m)
        }
        _ => Value::Array((0..r.usize(..4)).map(|_| gen_value(r, depth + 1)).collect()),
    }
}

/// Replace a random subtree of `v` (or insert a random key) with a random value.
fn mutate(r: &mut Rng, v: &mut Value, depth: u32) {
    match v {
        Value::Object(m) if !m.is_empty() && depth < 8 && r.u8(..100) < 75 => {
            let idx = r.usize(..m.len());
            if let Some((_, child)) = m.iter_mut().nth(idx) {
                mutate(r, child, depth + 1);
            }
        }
        Value::Object(m) if r.u8(..100) < 50 => {
            m.insert(KEYS[r.usize(..KEYS.len())].to_string(), gen_value(r, depth));
        }
        Value::Array(a) if !a.is_empty() && depth < 8 && r.u8(..100) < 75 => {
            let idx = r.usize(..a.len());
            if r.u8(..100) < 15 {
                let dup = a[idx].clone();
                a.push(dup);
            } else {
                mutate(r, &mut a[idx], depth + 1);
            }
        }
        _ => *v = gen_value(r, depth),
    }
}

fn seeds() -> Vec<Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).expect("golden dir").flatten() {
        for f in ["vmi.yaml", "vmi.json"] {
            let p = entry.path().join(f);
            if let Ok(vmi) = spec::load_file(&p) {
                out.push(serde_json::to_value(&vmi).expect("vmi serialises"));
            }
        }
    }
    assert!(
        out.len() >= 20,
        "expected golden seeds, found {}",
        out.len()
    );
    out
}

fn random_facts(r: &mut Rng, vmi: &spec::VirtualMachineInstance) -> PodFacts {
    let mut f = PodFacts::defaults(vmi);
    f.direct_io = r.u8(..100) < 50;
    f.domain_type = if r.u8(..100) < 50 {
        DomainType::Kvm
    } else {
        DomainType::Qemu
    };
    for v in &vmi.spec.volumes {
        if r.u8(..100) < 30 {
            f.block_volumes.insert(v.name.clone());
        }
        if r.u8(..100) < 20 {
            f.preallocated_volumes.insert(v.name.clone());
        }
    }
    f.spare_root_ports = r.usize(..40) as u32;
    f
}

/// Run the pipeline; returns whether conversion succeeded.
fn check(text: &str, r: &mut Rng) -> bool {
    let Ok(vmi) = spec::from_str(text, "prop") else {
        return false;
    };
    let facts = random_facts(r, &vmi);
    let Ok(domain) = convert::convert(&vmi, &facts) else {
        return false;
    };
    let xml = domain.to_xml();
    let mut reader = quick_xml::Reader::from_str(&xml);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("output XML does not parse: {e}\n{xml}\ninput: {text}"),
        }
    }
    let live = LiveDomain::parse(&xml)
        .unwrap_or_else(|e| panic!("LiveDomain cannot read our XML: {e}\n{xml}"));
    assert_eq!(live.name.as_deref(), Some(domain.name()));
    assert_eq!(live.disks().len(), domain.devices.disks.len());
    true
}

#[test]
fn mutated_golden_vmis_never_panic_and_produce_wellformed_xml() {
    let seeds = seeds();
    let mut r = Rng::with_seed(0x9E37_79B9_7F4A_7C15);
    let mut converted = 0;
    let n = 4000;
    for i in 0..n {
        let mut v = seeds[i % seeds.len()].clone();
        for _ in 0..=r.usize(..3) {
            mutate(&mut r, &mut v, 0);
        }
        let text = if r.u8(..100) < 50 {
            serde_json::to_string(&v).expect("json")
        } else {
            serde_norway::to_string(&v).expect("yaml")
        };
        if check(&text, &mut r) {
            converted += 1;
        }
    }
    // The mutations must leave enough valid VMIs to exercise the writer, and reject some.
    assert!(
        converted > n / 20,
        "only {converted}/{n} mutated VMIs converted"
    );
    assert!(converted < n, "no mutated VMI was rejected");
}

#[test]
fn arbitrary_json_never_panics() {
    let mut r = Rng::with_seed(0xDEAD_BEEF_CAFE_F00D);
    for _ in 0..4000 {
        let mut doc = Map::new();
        doc.insert("apiVersion".into(), json!("kubevirt.io/v1"));
        doc.insert(
            "kind".into(),
            json!(if r.u8(..100) < 80 {
                "VirtualMachineInstance"
            } else {
                "VirtualMachine"
            }),
        );
        doc.insert(
            "metadata".into(),
            json!({"name": STRINGS[r.usize(..STRINGS.len())]}),
        );
        doc.insert("spec".into(), gen_value(&mut r, 0));
        if r.u8(..100) < 30 {
            doc.insert("status".into(), gen_value(&mut r, 0));
        }
        let text = serde_json::to_string(&Value::Object(doc)).expect("json");
        check(&text, &mut r);
    }
}

#[test]
fn arbitrary_text_never_panics() {
    let mut r = Rng::with_seed(42);
    let alphabet: Vec<char> = "{}[]:,\"' \n-#&*!|>apiVersion kind:kubevirt.io/v1\u{0}\u{feff}é"
        .chars()
        .collect();
    for _ in 0..3000 {
        let len = r.usize(..200);
        let text: String = (0..len)
            .map(|_| alphabet[r.usize(..alphabet.len())])
            .collect();
        assert!(!check(&text, &mut r) || text.contains("kubevirt.io/v1"));
    }
}
