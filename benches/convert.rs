//! Conversion benchmark (std::time only). Prints a Markdown table of the time to convert a VMI
//! with 1, 13, 64 and 256 disks (and to serialise it to XML); `--json <file>` also writes the
//! figures as JSON. Goal: a 13-disk VMI converts in well under 1 ms. Not a pass/fail test.
//!
//! `cargo bench --bench convert [-- --json out.json]`

use std::time::{Duration, Instant};
use virt_launcher::convert::facts::PodFacts;
use virt_launcher::{convert, spec};

/// A VMI with `n` disks cycling through the volume kinds and buses the converter handles.
fn vmi_with_disks(n: usize) -> spec::VirtualMachineInstance {
    let mut disks = Vec::new();
    let mut volumes = Vec::new();
    let mut status = Vec::new();
    for i in 0..n {
        let name = format!("disk-{i}");
        let (disk, volume) = match i % 6 {
            0 => (
                serde_json::json!({"name": name, "disk": {"bus": "virtio"}}),
                serde_json::json!({"name": name, "persistentVolumeClaim": {"claimName": name}}),
            ),
            1 => (
                serde_json::json!({"name": name, "disk": {"bus": "scsi"}}),
                serde_json::json!({"name": name, "dataVolume": {"name": name}}),
            ),
            2 => (
                serde_json::json!({"name": name, "disk": {"bus": "virtio"}, "dedicatedIOThread": true}),
                serde_json::json!({"name": name, "containerDisk": {"image": "quay.io/x/y:1"}}),
            ),
            3 => (
                serde_json::json!({"name": name, "cdrom": {"bus": "sata"}}),
                serde_json::json!({"name": name, "emptyDisk": {"capacity": "1Gi"}}),
            ),
            4 => (
                serde_json::json!({"name": name, "disk": {"bus": "virtio"}, "cache": "writethrough"}),
                serde_json::json!({"name": name, "ephemeral": {"persistentVolumeClaim": {"claimName": name}}}),
            ),
            _ => (
                serde_json::json!({"name": name, "disk": {"bus": "scsi"}}),
                serde_json::json!({"name": name, "persistentVolumeClaim": {"claimName": name, "hotpluggable": true}}),
            ),
        };
        if i % 6 == 5 {
            status.push(serde_json::json!({"name": name, "phase": "Ready"}));
        }
        disks.push(disk);
        volumes.push(volume);
    }
    let doc = serde_json::json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "bench", "namespace": "ns", "uid": "0c9f7a6e-2f7d-4c57-9a59-8b3f6a0c2d11"},
        "spec": {
            "domain": {
                "cpu": {"cores": 4},
                "resources": {"requests": {"memory": "4Gi"}},
                "ioThreadsPolicy": "shared",
                "devices": {"disks": disks, "interfaces": [{"name": "default", "masquerade": {}}]}
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": volumes
        },
        "status": {"volumeStatus": status}
    });
    spec::from_str(&doc.to_string(), "bench").expect("bench VMI parses")
}

fn measure(f: impl Fn()) -> Duration {
    // Warm up, then take the median of batches sized to run ~20 ms each.
    for _ in 0..10 {
        f();
    }
    let t = Instant::now();
    f();
    let one = t.elapsed().max(Duration::from_nanos(100));
    let per_batch =
        (Duration::from_millis(20).as_nanos() / one.as_nanos()).clamp(1, 100_000) as u32;
    let mut samples: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed() / per_batch
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut rows = Vec::new();
    println!("| disks | convert (µs) | convert + to_xml (µs) | XML bytes |");
    println!("| ---: | ---: | ---: | ---: |");
    for n in [1usize, 13, 64, 256] {
        let vmi = vmi_with_disks(n);
        let facts = PodFacts::defaults(&vmi);
        let conv = measure(|| {
            let d = convert::convert(&vmi, &facts).expect("converts");
            std::hint::black_box(d);
        });
        let both = measure(|| {
            let d = convert::convert(&vmi, &facts).expect("converts");
            std::hint::black_box(d.to_xml());
        });
        let bytes = convert::convert(&vmi, &facts)
            .expect("converts")
            .to_xml()
            .len();
        let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
        println!("| {n} | {:.1} | {:.1} | {bytes} |", us(conv), us(both));
        rows.push(serde_json::json!({
            "disks": n, "convert_us": us(conv), "convert_and_xml_us": us(both), "xml_bytes": bytes
        }));
    }
    if let Some(path) = json_out {
        let text = serde_json::to_string_pretty(&rows).expect("json");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
}
