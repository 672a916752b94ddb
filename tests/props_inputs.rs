//! Fuzz-style property tests of every parser fed from outside the launcher, with committed
//! seed corpora in `tests/corpus/<target>/`: VMI text (spec + conversion), the pod-facts file,
//! gRPC request decoding (every request type, and Sync's own handling of its bytes), and the
//! live-domain XML parser. Each target runs mutated inputs for a bounded time; every input
//! must finish without panicking, within a per-input time box, and within an allocation bound
//! (peak live bytes on the thread, counted by a counting allocator). Huge and deeply nested
//! inputs (1 MiB) are tried explicitly.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use virt_launcher::api::pb;
use virt_launcher::convert::facts::PodFacts;
use virt_launcher::domain::live::LiveDomain;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

// ------------------------------------------------------------------ allocation accounting

/// Peak extra bytes live on this thread while `f` runs (the allocation-counter crate's
/// counting allocator: no `unsafe` of ours).
fn peak_alloc(f: impl FnOnce()) -> isize {
    allocation_counter::measure(f).bytes_max as isize
}

// ------------------------------------------------------------------ mutator

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const MAX_INPUT: usize = 1 << 20;

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"<",
    b">",
    b"</",
    b"/>",
    b"\"",
    b"'",
    b":",
    b",",
    b"\n",
    b"- ",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"\\u0000",
    b"\0",
    b"\xff\xfe",
    b"..",
    b"../",
    b"/etc/passwd",
    b"<disk>",
    b"<devices>",
    b"<![CDATA[",
    b"&amp;",
    b"&#0;",
    b"&#xFFFFFFFF;",
    b"<!ENTITY",
    b"<?xml ?>",
    b"volumes",
    b"name",
    b"persistentVolumeClaim",
    b"hotpluggable",
    b"kernelPath",
    b"hostDisk",
    b"blockVolumes",
    b"spareRootPorts",
    b"4294967296",
    b"-1",
    b"1e999",
    b"99999999Ei",
    b"\x80",
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x12\x00",
];

fn mutate(r: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..=r.below(4) {
        let len = data.len();
        match r.below(9) {
            0 if len > 0 => {
                let i = r.below(len);
                data[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                const BYTES: &[u8] = b"\0\xff<>\"{[\\&:\n-";
                data[i] = BYTES[r.below(BYTES.len())];
            }
            2 | 3 => {
                let t = TOKENS[r.below(TOKENS.len())];
                let i = r.below(len + 1);
                data.splice(i..i, t.iter().copied());
            }
            4 if len > 0 => {
                let a = r.below(len);
                let b = (a + r.below(64)).min(len);
                data.drain(a..b);
            }
            5 if len > 0 => {
                // Duplicate a range, sometimes many times (nesting, long lists).
                let a = r.below(len);
                let b = (a + 1 + r.below(32)).min(len);
                let chunk = data[a..b].to_vec();
                for _ in 0..if r.below(10) == 0 {
                    1 + r.below(2000)
                } else {
                    1
                } {
                    data.splice(b..b, chunk.iter().copied());
                }
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[r.below(corpus.len())];
                if !other.is_empty() {
                    let a = r.below(other.len());
                    let b = (a + r.below(256)).min(other.len());
                    let i = r.below(len + 1);
                    data.splice(i..i, other[a..b].iter().copied());
                }
            }
            7 if len > 0 => data.truncate(r.below(len)),
            _ => {}
        }
    }
    data.truncate(MAX_INPUT);
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let out: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(out.len() >= 3, "{}: seed corpus too small", dir.display());
    out
}

/// Hostile inputs of up to 1 MiB every target gets besides the mutations.
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

/// Runs `one` on the seeds, the huge inputs and mutations for up to `budget`, on a worker
/// thread watched for hangs; returns how many inputs ran.
fn fuzz(target: &'static str, seed: u64, budget: Duration, one: fn(&[u8])) -> usize {
    let seeds = corpus(target);
    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (current, done) = (current.clone(), done.clone());
        std::thread::Builder::new()
            .name(format!("fuzz-{target}"))
            .stack_size(8 << 20)
            .spawn(move || {
                let mut r = Rng(seed);
                let start = Instant::now();
                let fixed: Vec<Vec<u8>> = seeds.iter().cloned().chain(huge_inputs()).collect();
                let mut i = 0;
                // At least MIN_INPUTS mutations however slow the machine, then more until
                // the time budget is spent: the count never depends on the load.
                while i < fixed.len() + MIN_INPUTS || start.elapsed() < budget {
                    let input = if i < fixed.len() {
                        fixed[i].clone()
                    } else {
                        let mut d = seeds[r.below(seeds.len())].clone();
                        mutate(&mut r, &mut d, &seeds);
                        d
                    };
                    *current.lock().unwrap() = input.clone();
                    let t = Instant::now();
                    let peak = peak_alloc(|| one(&input));
                    let bound = 64 * input.len() as isize + (16 << 20);
                    assert!(
                        peak <= bound,
                        "{target}: {peak} bytes live for a {}-byte input",
                        input.len()
                    );
                    assert!(
                        t.elapsed() < Duration::from_secs(5),
                        "{target}: one input took {:?}",
                        t.elapsed()
                    );
                    i += 1;
                    done.store(i, Ordering::SeqCst);
                }
                i
            })
            .unwrap()
    };
    // Watchdog: an input running for more than 20 s is a hang (the per-input assertion above
    // catches slow ones that do finish).
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let n = done.load(Ordering::SeqCst);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(20) {
            let input = current.lock().unwrap().clone();
            let dump = std::env::temp_dir().join(format!("hang-{target}.bin"));
            let _ = std::fs::write(&dump, &input);
            panic!("{target}: input #{n} hangs (saved to {})", dump.display());
        }
    }
    let n = match worker.join() {
        Ok(n) => n,
        Err(p) => {
            let input = current.lock().unwrap().clone();
            let dump = std::env::temp_dir().join(format!("crash-{target}.bin"));
            let _ = std::fs::write(&dump, &input);
            std::panic::resume_unwind(p)
        }
    };
    println!("{target}: {n} inputs in {budget:?}");
    n
}

const BUDGET: Duration = Duration::from_secs(3);
/// Mutated inputs every target runs, on top of its seeds and the huge inputs.
const MIN_INPUTS: usize = 150;

fn vmi_pipeline(text: &str) {
    if let Ok(vmi) = spec::from_str(text, "fuzz") {
        let facts = PodFacts::defaults(&vmi);
        if let Ok(d) = convert::convert(&vmi, &facts) {
            let xml = d.to_xml();
            LiveDomain::parse(&xml).expect("our own XML reads back");
        }
    }
}

#[test]
fn vmi_text_spec_and_conversion() {
    fuzz("vmi", 1, BUDGET, |b| {
        vmi_pipeline(&String::from_utf8_lossy(b))
    });
}

#[test]
fn pod_facts_file() {
    let vmi = spec::from_str(
        r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"v"}}"#,
        "t",
    )
    .unwrap();
    fuzz("podfacts", 2, BUDGET, |b| {
        let vmi = spec::from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"v"}}"#,
            "t",
        )
        .unwrap();
        let _ = podfacts::from_json(&String::from_utf8_lossy(b), &vmi);
    });
    // The seeds that are facts files are accepted.
    assert!(podfacts::from_json(r#"{"blockVolumes":["a"]}"#, &vmi).is_ok());
}

#[test]
fn grpc_requests_decode_and_sync_handling() {
    fn one(b: &[u8]) {
        let _ = pb::Empty::decode(b);
        let _ = pb::ShutdownRequest::decode(b);
        let _ = pb::FreezeRequest::decode(b);
        let _ = pb::WatchRequest::decode(b);
        // Responses too: launcherctl and controllers decode them.
        let _ = pb::Domain::decode(b);
        let _ = pb::Stats::decode(b);
        let _ = pb::Event::decode(b);
        let _ = pb::InfoResponse::decode(b);
        if let Ok(req) = pb::SyncRequest::decode(b) {
            // What the Sync handler does with the bytes before the core sees them.
            if let Ok(text) = std::str::from_utf8(&req.vmi) {
                vmi_pipeline(text);
            }
        }
    }
    fuzz("grpc", 3, BUDGET, one);
}

#[test]
fn live_domain_xml() {
    fuzz("livexml", 4, BUDGET, |b| {
        let _ = LiveDomain::parse(&String::from_utf8_lossy(b));
    });
    // The corpus' real dumps parse.
    for seed in corpus("livexml") {
        let text = String::from_utf8(seed).unwrap();
        if text.starts_with("<domain") {
            let d = LiveDomain::parse(&text).expect("corpus domain parses");
            assert!(d.name.is_some());
        }
    }
}
