//! Hostile inputs of up to 1 MiB (deep nesting, long lists, NUL floods) through every parser fed
//! from outside the launcher: VMI text (spec + conversion), the pod-facts file, gRPC request
//! decoding and Sync's handling of its bytes, and the live-domain XML parser. Each input must
//! give a value or an error, within a time box and a memory bound.
//!
//! Coverage-guided fuzzing of the same parsers, with small inputs, is `fuzz/` (`./devtool fuzz`);
//! its inputs stay at a few KiB, so the sizes where quadratic time or memory amplification show
//! are tried here.

use std::time::{Duration, Instant};

use prost::Message;
use virt_launcher::api::pb;
use virt_launcher::convert::facts::PodFacts;
use virt_launcher::domain::live::LiveDomain;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

const MAX_INPUT: usize = 1 << 20;

fn huge_inputs() -> Vec<Vec<u8>> {
    let n = MAX_INPUT / 4;
    let yaml =
        b"apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  x: ".to_vec();
    vec![
        [&yaml[..], &b"[".repeat(MAX_INPUT - yaml.len())].concat(),
        [&yaml[..], &b"{a: ".repeat(n - yaml.len())].concat(),
        [b"{\"a\":".to_vec(), b"[".repeat(n), b"]".repeat(n)].concat(),
        [
            b"<domain>".to_vec(),
            b"<a>".repeat(n / 2),
            b"</a>".repeat(n / 2),
        ]
        .concat(),
        [
            b"<domain><devices>".to_vec(),
            b"<disk><target dev='vda'/></disk>".repeat(n / 16),
            b"</devices></domain>".to_vec(),
        ]
        .concat(),
        [
            yaml.clone(),
            b"\n  labels:\n".to_vec(),
            (0..20000)
                .flat_map(|i| format!("    k{i}: v\n").into_bytes())
                .collect(),
        ]
        .concat(),
        b"\0".repeat(MAX_INPUT),
        [b"\x0a\x80\x80\x40".to_vec(), b"{".repeat(MAX_INPUT - 4)].concat(),
    ]
}

fn vmi_pipeline(text: &str) {
    if let Ok(vmi) = spec::from_str(text, "hostile") {
        let facts = PodFacts::defaults(&vmi);
        if let Ok(d) = convert::convert(&vmi, &facts) {
            LiveDomain::parse(&d.to_xml()).expect("our own XML reads back");
        }
    }
}

fn every_parser(b: &[u8]) {
    let text = String::from_utf8_lossy(b);
    vmi_pipeline(&text);
    let vmi = spec::from_str(
        r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"v"}}"#,
        "t",
    )
    .unwrap();
    let _ = podfacts::from_json(&text, &vmi);
    let _ = LiveDomain::parse(&text);
    let _ = pb::Empty::decode(b);
    let _ = pb::ShutdownRequest::decode(b);
    let _ = pb::FreezeRequest::decode(b);
    let _ = pb::WatchRequest::decode(b);
    let _ = pb::MigrateRequest::decode(b);
    let _ = pb::SnapshotRequest::decode(b);
    let _ = pb::PrepareMigrationTargetRequest::decode(b);
    if let Ok(req) = pb::SyncRequest::decode(b) {
        // What the Sync handler does with the bytes before the core sees them.
        if let Ok(text) = std::str::from_utf8(&req.vmi) {
            vmi_pipeline(text);
        }
    }
}

/// A `kB` figure of `/proc/self/status`.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Peak resident memory `f` added, in bytes: the high-water mark is reset first (`clear_refs`
/// 5). Pages the allocator had kept from earlier are reused without showing, so this is a
/// lower bound of what `f` allocated: the check below can miss growth, never invent it. The
/// only test in this binary, so no other thread allocates meanwhile.
fn peak_growth(f: impl FnOnce()) -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let base = status_kib("VmRSS:");
    f();
    status_kib("VmHWM:").saturating_sub(base) * 1024
}

#[test]
fn huge_and_deeply_nested_inputs_are_bounded_in_time_and_memory() {
    for (i, input) in huge_inputs().iter().enumerate() {
        let t = Instant::now();
        let peak = peak_growth(|| every_parser(input));
        let bound = 64 * input.len() as u64 + (16 << 20);
        assert!(
            peak <= bound,
            "hostile input #{i}: {peak} bytes for a {}-byte input",
            input.len()
        );
        // A hang guard, not a performance figure: each parser refuses these at once.
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "hostile input #{i} took {:?}",
            t.elapsed()
        );
    }
}
