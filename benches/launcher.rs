//! The launcher benchmark: every figure the project promises (issue 8), each measured in the
//! same run for the launcher and for raw libvirt doing the same work, with their ratio.
//!
//! ```text
//! ./devtool bench [--quick] [--update-doc]
//! cargo bench --bench launcher -- [--quick] [--update-doc] [--out DIR] [--launcher BIN] [--guest-dir DIR]
//! ```
//!
//! Writes `<target>/bench/results.json`, `results.md` (the table) and `disks.png` (start time
//! and launcher RSS against the number of disks). Needs root, libvirt, QEMU and the test guest,
//! like the integration tests. Nothing here is pass/fail: goals are reported as met or not.
//!
//! Sides (see BENCHMARKS.md for what each includes):
//! - **launcher**: `virt-launcher run` spawned with a VMI file, booting the TCG test guest.
//! - **raw, cold**: what the launcher does, done by hand: a fresh private virtlogd + libvirtd pair
//!   in its own mount/UTS namespace with the launcher's configuration, then `createXML` of the
//!   XML the launcher would generate.
//! - **raw, warm**: `createXML` on a private daemon pair started once for the whole run.
//!
//! Launcher and raw iterations are interleaved (rotating their order) and reported as medians.
//!
//! To add a benchmark: write `fn bench_x(ctx: &mut Ctx) -> Result<()>` that pushes
//! [`Figure`]s with [`Ctx::figure`], list it in [`BENCHMARKS`], drop its ids from
//! [`NOT_YET_MEASURED`] and add them to `FIGURES` in `tests/bench_smoke.rs`. Benchmarks that
//! drive a running VM through the control API live in `benches/launcher/`: `running.rs`
//! (hot-plug, control path, memory with 32 hot-plugged disks) and `migration.rs`, with the
//! pieces they share in `pods.rs`.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use virt_launcher::convert::facts::{PodFacts, PodPaths};
use virt_launcher::domain::DomainType;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

// Paths relative to this file's directory, so that `tests/bench_smoke.rs` (which includes this
// file with `#[path]`) finds them too.
#[path = "launcher/migration.rs"]
mod migration;
#[path = "launcher/pods.rs"]
mod pods;
#[path = "launcher/running.rs"]
mod running;

// ------------------------------------------------------------------------------------------
// What is measured

type BenchFn = fn(&mut Ctx) -> Result<()>;

/// Every benchmark, in the order it runs.
pub const BENCHMARKS: &[(&str, BenchFn)] = &[
    ("conversion", bench_conversion),
    ("start, stop and memory", bench_lifecycle),
    ("disks (plot)", bench_disks),
    (
        "hot-plug, control path, memory with 32 hot-plugged disks",
        running::bench_running,
    ),
    ("live migration", migration::bench_migration),
];

/// A promised figure whose feature has not landed yet: listed in the output, never omitted.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub id: &'static str,
    pub name: &'static str,
    pub goal: &'static str,
}

pub const NOT_YET_MEASURED: &[Planned] = &[];

/// Disk counts of the conversion benchmark.
const CONVERSION_DISKS: [usize; 4] = [1, 13, 64, 256];
/// How long after the guest's first console line the memory is sampled.
const SETTLE: Duration = Duration::from_millis(500);
/// The console line the test guest prints once it is up (scripts/guest-init.sh).
const READY_MARKER: &str = "LV-READY";

// ------------------------------------------------------------------------------------------
// Options

pub struct Options {
    /// One iteration, few disks: the smoke run of the test suite (< 60 s).
    pub quick: bool,
    pub launcher: PathBuf,
    pub guest_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Rewrite the results section of this Markdown file (BENCHMARKS.md).
    pub update_doc: Option<PathBuf>,
    /// Make the PNG plot (needs gnuplot).
    pub plot: bool,
    /// Run only the benchmarks whose name contains one of these (all when empty).
    pub only: Vec<String>,
    /// Keep each launcher's log (its stderr) in `<out>/logs/` (with `RUST_LOG=virt_launcher=
    /// debug`, a Sync's parts are timed there).
    pub keep_logs: bool,
}

impl Options {
    /// Defaults: the launcher binary cargo built for this bench/test, the test guest in
    /// `.cache/guest` (or `$GUEST_DIR`), output in `<target>/bench`.
    pub fn defaults(quick: bool) -> Options {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Options {
            quick,
            launcher: PathBuf::from(env!("CARGO_BIN_EXE_virt-launcher")),
            guest_dir: std::env::var_os("GUEST_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join(".cache/guest")),
            out_dir: absolute(&target).join("bench"),
            update_doc: None,
            plot: true,
            only: Vec::new(),
            keep_logs: false,
        }
    }

    /// Rounds of the start/stop benchmark. A TCG guest's boot varies by ±1 s from one sample
    /// to the next on either side: 5 rounds left the console ratio swinging 0.93–1.14 between
    /// runs.
    fn iterations(&self) -> usize {
        if self.quick {
            1
        } else {
            9
        }
    }

    /// Disk counts of the start/RSS plot (the 1-disk point comes from the start benchmark).
    fn sweep(&self) -> &'static [usize] {
        if self.quick {
            &[1, 4]
        } else {
            &[1, 8, 16, 32, 64]
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

// ------------------------------------------------------------------------------------------
// Results

/// Median and spread of one side's samples.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    pub samples: Vec<f64>,
}

impl Stat {
    fn of(samples: &[f64]) -> Option<Stat> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Some(Stat {
            median,
            min: s[0],
            max: s[s.len() - 1],
            n: s.len(),
            samples: samples.to_vec(),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Goal {
    /// The launcher's value stays below this.
    Below(f64),
    /// launcher / raw stays at or below this.
    RatioAtMost(f64),
}

impl Goal {
    fn text(self, unit: &str) -> String {
        match self {
            Goal::Below(v) => format!("< {} {unit}", fmt_num(v)),
            Goal::RatioAtMost(r) => format!("ratio ≤ {r:.2}"),
        }
    }

    fn met(self, launcher: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::Below(v) => Some(launcher < v),
            Goal::RatioAtMost(r) => ratio.map(|x| x <= r),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub name: &'static str,
    pub unit: &'static str,
    pub launcher: Option<Stat>,
    /// What the launcher's number includes.
    pub launcher_does: &'static str,
    pub raw: Option<Stat>,
    /// What raw libvirt does for the same work; `None` when there is no raw counterpart.
    pub raw_does: Option<&'static str>,
    /// launcher median / raw median.
    pub ratio: Option<f64>,
    pub goal: Option<String>,
    pub goal_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub process: &'static str,
    pub launcher_pod_mib: Option<f64>,
    pub raw_libvirt_mib: Option<f64>,
}

/// One point of the disks plot (medians when there were several samples).
#[derive(Debug, Clone, Serialize)]
pub struct DiskPoint {
    pub disks: usize,
    pub launcher_to_running_ms: f64,
    pub launcher_to_console_ms: f64,
    pub raw_cold_to_running_ms: f64,
    pub raw_cold_to_console_ms: f64,
    pub raw_warm_create_ms: f64,
    pub launcher_rss_mib: f64,
    pub qemu_rss_mib: f64,
    pub libvirtd_rss_mib: f64,
}

/// The launcher's memory in one pod right after boot and with 32 hot-plugged disks.
#[derive(Debug, Clone, Serialize)]
pub struct HotplugMemoryRow {
    pub what: &'static str,
    pub after_boot_mib: f64,
    pub with_32_hotplugged_mib: f64,
}

/// `/proc/loadavg` (1, 5, 15 min) when a benchmark began.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSample {
    pub benchmark: &'static str,
    pub load: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversionRow {
    pub disks: usize,
    pub convert_us: f64,
    pub convert_and_xml_us: f64,
    pub xml_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub libvirt: String,
    pub qemu: String,
    pub accelerator: String,
    /// `/proc/loadavg` (1, 5, 15 min) when the run began: other people's guests share the CPUs.
    pub load_at_start: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub date: String,
    /// `/proc/loadavg` (1, 5, 15 min) when the run ended.
    pub load_at_end: String,
    pub quick: bool,
    pub iterations: usize,
    pub duration_s: f64,
    pub machine: Machine,
    pub figures: Vec<Figure>,
    pub memory: Vec<MemoryRow>,
    pub disks: Vec<DiskPoint>,
    pub conversion: Vec<ConversionRow>,
    pub hotplug_memory: Vec<HotplugMemoryRow>,
    /// The load average at the start of each benchmark (other people's tests share the CPUs).
    pub load_during: Vec<LoadSample>,
    pub not_yet_measured: Vec<Planned>,
    pub plot: Option<PathBuf>,
    /// Processes of this run still alive at the end (killed then); should be empty.
    pub leftover_processes: Vec<String>,
}

// ------------------------------------------------------------------------------------------
// The run

/// Shared state of one benchmark run.
pub struct Ctx<'a> {
    opts: &'a Options,
    work: PathBuf,
    /// The VMI's name (the domain is `default_<name>`): unique per run.
    name: String,
    seq: usize,
    warm: Option<RawLibvirt>,
    figures: Vec<Figure>,
    memory: Vec<MemoryRow>,
    disks: Vec<DiskPoint>,
    conversion: Vec<ConversionRow>,
    hotplug_memory: Vec<HotplugMemoryRow>,
    load_during: Vec<LoadSample>,
}

impl Ctx<'_> {
    /// Records a figure; the ratio and the goal's verdict are computed here.
    #[allow(clippy::too_many_arguments)]
    fn figure(
        &mut self,
        id: &'static str,
        name: &'static str,
        unit: &'static str,
        launcher: &[f64],
        launcher_does: &'static str,
        raw: Option<(&[f64], &'static str)>,
        goal: Option<Goal>,
    ) {
        let launcher = Stat::of(launcher);
        let raw_stat = raw.and_then(|(s, _)| Stat::of(s));
        let ratio = match (&launcher, &raw_stat) {
            (Some(l), Some(r)) if r.median > 0.0 => Some(l.median / r.median),
            _ => None,
        };
        let goal_met = match (goal, &launcher) {
            (Some(g), Some(l)) => g.met(l.median, ratio),
            _ => None,
        };
        self.figures.push(Figure {
            id,
            name,
            unit,
            launcher,
            launcher_does,
            raw: raw_stat,
            raw_does: raw.map(|(_, d)| d),
            ratio,
            goal: goal.map(|g| g.text(unit)),
            goal_met,
        });
    }

    fn fresh_dir(&mut self, tag: &str) -> Result<PathBuf> {
        self.seq += 1;
        let dir = self.work.join(format!("{tag}{}", self.seq));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// The raw daemon pair that stays up for the whole run (started on first use).
    fn warm(&mut self) -> Result<&mut RawLibvirt> {
        if self.warm.is_none() {
            let dir = self.fresh_dir("warm")?;
            let (mut raw, ready) = RawLibvirt::start(&dir, "lvb-warm")?;
            raw.connect()?;
            progress(&format!("raw warm daemons up in {} ms", fmt_num(ms(ready))));
            self.warm = Some(raw);
        }
        Ok(self.warm.as_mut().expect("just started"))
    }
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        if let Some(mut warm) = self.warm.take() {
            let _ = warm.stop();
        }
    }
}

/// Runs every benchmark and writes `results.json`, `results.md` and `disks.png`.
pub fn run(opts: &Options) -> Result<Report> {
    preflight(opts)?;
    virt::error::clear_error_callback();
    let began = Instant::now();
    let _ = STARTED.set(began);
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let work = std::env::temp_dir().join(format!("lvb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let mut ctx = Ctx {
        opts,
        work: work.clone(),
        name: format!("lvb{}", std::process::id()),
        seq: 0,
        warm: None,
        figures: Vec::new(),
        memory: Vec::new(),
        disks: Vec::new(),
        conversion: Vec::new(),
        hotplug_memory: Vec::new(),
        load_during: Vec::new(),
    };
    let machine = machine();
    let reaper = OrphanReaper::start()?;
    for (name, bench) in BENCHMARKS {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let load = load_average();
        progress(&format!("== {name} (load average {load})"));
        ctx.load_during.push(LoadSample {
            benchmark: name,
            load,
        });
        bench(&mut ctx).with_context(|| format!("benchmark {name:?}"))?;
    }
    if let Some(mut warm) = ctx.warm.take() {
        warm.stop()?;
    }
    drop(reaper);
    let leftover_processes = kill_matching(&[
        work.display().to_string(),
        format!("guest=default_{},", ctx.name),
    ]);

    fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("create {}", opts.out_dir.display()))?;
    let mut report = Report {
        schema: 1,
        date,
        load_at_end: load_average(),
        quick: opts.quick,
        iterations: opts.iterations(),
        duration_s: 0.0,
        machine,
        figures: std::mem::take(&mut ctx.figures),
        memory: std::mem::take(&mut ctx.memory),
        disks: std::mem::take(&mut ctx.disks),
        conversion: std::mem::take(&mut ctx.conversion),
        hotplug_memory: std::mem::take(&mut ctx.hotplug_memory),
        load_during: std::mem::take(&mut ctx.load_during),
        not_yet_measured: NOT_YET_MEASURED.to_vec(),
        plot: None,
        leftover_processes,
    };
    drop(ctx);
    if opts.plot && !report.disks.is_empty() {
        report.plot = plot(&report, &opts.out_dir)?;
    }
    report.duration_s = began.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&report).context("serialise results")?;
    write(&opts.out_dir.join("results.json"), &json)?;
    let md = markdown(&report);
    write(&opts.out_dir.join("results.md"), &md)?;
    if let Some(doc) = &opts.update_doc {
        update_doc(doc, &md)?;
    }
    let _ = fs::remove_dir_all(&work);
    Ok(report)
}

fn preflight(opts: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark needs root (private libvirt daemons, mount namespaces)");
    }
    if !opts.launcher.is_file() {
        bail!(
            "no launcher binary at {}: cargo build --release",
            opts.launcher.display()
        );
    }
    for f in ["vmlinuz", "initramfs.gz"] {
        if !opts.guest_dir.join(f).is_file() {
            bail!(
                "test guest missing in {}: run scripts/build-guest.sh (or ./devtool setup)",
                opts.guest_dir.display()
            );
        }
    }
    for tool in [
        "libvirtd",
        "virtlogd",
        "unshare",
        "nsenter",
        "qemu-system-x86_64",
    ] {
        if !in_path(tool) {
            bail!("{tool} not found: run scripts/setup-host.sh (or ./devtool setup)");
        }
    }
    Ok(())
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// When the run began (for the progress lines' time stamps).
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn progress(msg: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench: [{t:6.1} s] {msg}");
}

// ------------------------------------------------------------------------------------------
// Benchmark: conversion

fn bench_conversion(ctx: &mut Ctx) -> Result<()> {
    let quick = ctx.opts.quick;
    let mut samples: Vec<(usize, Vec<f64>)> = Vec::new();
    for n in CONVERSION_DISKS {
        check_interrupt()?;
        let vmi = vmi_with_disks(n)?;
        let facts = PodFacts::defaults(&vmi);
        let conv = us_per_call(quick, || {
            let d = convert::convert(&vmi, &facts).expect("bench VMI converts");
            std::hint::black_box(d);
        });
        let both = us_per_call(quick, || {
            let d = convert::convert(&vmi, &facts).expect("bench VMI converts");
            std::hint::black_box(d.to_xml());
        });
        let xml_bytes = convert::convert(&vmi, &facts)
            .context("convert the bench VMI")?
            .to_xml()
            .len();
        let med = |v: &[f64]| Stat::of(v).map_or(0.0, |s| s.median);
        progress(&format!(
            "conversion, {n} disks: {:.1} µs (+ XML: {:.1} µs)",
            med(&conv),
            med(&both)
        ));
        ctx.conversion.push(ConversionRow {
            disks: n,
            convert_us: med(&conv),
            convert_and_xml_us: med(&both),
            xml_bytes,
        });
        samples.push((n, both));
    }
    let does = "VMI → domain model → XML text, in process (one sample per batch of calls)";
    let names: [(&'static str, &'static str, Option<Goal>); 4] = [
        ("convert.disks_1", "conversion, 1 disk", None),
        (
            "convert.disks_13",
            "conversion, 13 disks",
            Some(Goal::Below(1000.0)),
        ),
        ("convert.disks_64", "conversion, 64 disks", None),
        ("convert.disks_256", "conversion, 256 disks", None),
    ];
    for ((id, name, goal), (_, s)) in names.into_iter().zip(&samples) {
        ctx.figure(id, name, "µs", s, does, None, goal);
    }
    Ok(())
}

/// Time of one call in µs, one sample per batch: warm-up, then batches sized to ~20 ms
/// (5 ms when quick).
fn us_per_call(quick: bool, f: impl Fn()) -> Vec<f64> {
    let (batch_time, batches) = if quick {
        (Duration::from_millis(5), 5)
    } else {
        (Duration::from_millis(20), 15)
    };
    for _ in 0..10 {
        f();
    }
    let t = Instant::now();
    f();
    let one = t.elapsed().max(Duration::from_nanos(100));
    let per_batch = (batch_time.as_nanos() / one.as_nanos()).clamp(1, 100_000) as u32;
    (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            (t.elapsed() / per_batch).as_secs_f64() * 1e6
        })
        .collect()
}

/// A VMI with `n` disks cycling through the volume kinds and buses the converter handles
/// (the same mix as `benches/convert.rs`).
fn vmi_with_disks(n: usize) -> Result<spec::VirtualMachineInstance> {
    use serde_json::json;
    let mut disks = Vec::new();
    let mut volumes = Vec::new();
    let mut status = Vec::new();
    for i in 0..n {
        let name = format!("disk-{i}");
        let (disk, volume) = match i % 6 {
            0 => (
                json!({"name": name, "disk": {"bus": "virtio"}}),
                json!({"name": name, "persistentVolumeClaim": {"claimName": name}}),
            ),
            1 => (
                json!({"name": name, "disk": {"bus": "scsi"}}),
                json!({"name": name, "dataVolume": {"name": name}}),
            ),
            2 => (
                json!({"name": name, "disk": {"bus": "virtio"}, "dedicatedIOThread": true}),
                json!({"name": name, "containerDisk": {"image": "quay.io/x/y:1"}}),
            ),
            3 => (
                json!({"name": name, "cdrom": {"bus": "sata"}}),
                json!({"name": name, "emptyDisk": {"capacity": "1Gi"}}),
            ),
            4 => (
                json!({"name": name, "disk": {"bus": "virtio"}, "cache": "writethrough"}),
                json!({"name": name, "ephemeral": {"persistentVolumeClaim": {"claimName": name}}}),
            ),
            _ => (
                json!({"name": name, "disk": {"bus": "scsi"}}),
                json!({"name": name, "persistentVolumeClaim": {"claimName": name, "hotpluggable": true}}),
            ),
        };
        if i % 6 == 5 {
            status.push(json!({"name": name, "phase": "Ready"}));
        }
        disks.push(disk);
        volumes.push(volume);
    }
    let doc = json!({
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
    Ok(spec::from_str(&doc.to_string(), "bench")?)
}

// ------------------------------------------------------------------------------------------
// Benchmark: start, stop and memory with one guest

/// One launcher run: spawn → guest up → SIGTERM → exit.
#[derive(Debug, Clone)]
struct LauncherRun {
    to_daemons_ms: f64,
    define_start_ms: f64,
    to_running_ms: f64,
    to_console_ms: f64,
    own_ms: f64,
    rss: PodRss,
    stop_acpi_ms: f64,
    stop_exit_ms: f64,
}

/// One raw cold run: fresh daemons → createXML → guest up → ACPI → shut off → daemons stopped.
#[derive(Debug, Clone)]
struct RawColdRun {
    daemons_ms: f64,
    create_ms: f64,
    to_running_ms: f64,
    to_console_ms: f64,
    rss: PodRss,
    stop_acpi_ms: f64,
    stop_exit_ms: f64,
}

/// One raw warm run: createXML on the long-lived daemons → guest up → (ACPI | destroy).
#[derive(Debug, Clone)]
struct RawWarmRun {
    create_ms: f64,
    to_console_ms: Option<f64>,
    stop_ms: f64,
}

/// RSS in MiB; `launcher` is 0 for raw libvirt.
#[derive(Debug, Clone, Copy, Default)]
struct PodRss {
    launcher: f64,
    /// The launcher's anonymous memory (heap, stacks); the rest of its RSS is file-backed
    /// (its binary and the shared libraries, libvirt's among them).
    launcher_anon: f64,
    /// The launcher's proportional set size: shared pages split among the processes mapping
    /// them (libvirtd maps the same libvirt libraries).
    launcher_pss: f64,
    libvirtd: f64,
    virtlogd: f64,
    qemu: f64,
}

impl PodRss {
    fn total(&self) -> f64 {
        self.launcher + self.libvirtd + self.virtlogd + self.qemu
    }
}

type RssField = fn(&PodRss) -> f64;

#[derive(Clone, Copy)]
enum WarmStop {
    /// Boot, then press the ACPI power button.
    Acpi,
    /// Boot, then destroy.
    Destroy,
    /// Destroy right after createXML returned (only the create time counts).
    DestroyAtOnce,
}

fn bench_lifecycle(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.opts.iterations();
    // Warm means warm: the pair's first domain start (QEMU capability probe) is not a sample.
    raw_warm_once(ctx, 1, WarmStop::DestroyAtOnce)?;
    let (mut l, mut c, mut wa, mut wd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        // Rotate the order so drift on a noisy machine does not favour one side.
        for step in 0..4 {
            check_interrupt()?;
            match (step + i) % 4 {
                0 => {
                    let r = launcher_once(ctx, 1)?;
                    progress(&format!(
                        "{}/{n} launcher: running {} ms, console {} ms, stop {} ms, RSS {:.1} MiB",
                        i + 1,
                        fmt_num(r.to_running_ms),
                        fmt_num(r.to_console_ms),
                        fmt_num(r.stop_exit_ms),
                        r.rss.launcher
                    ));
                    l.push(r);
                }
                1 => {
                    let r = raw_cold_once(ctx, 1)?;
                    progress(&format!(
                        "{}/{n} raw cold: running {} ms, console {} ms, stop {} ms",
                        i + 1,
                        fmt_num(r.to_running_ms),
                        fmt_num(r.to_console_ms),
                        fmt_num(r.stop_exit_ms)
                    ));
                    c.push(r);
                }
                2 => {
                    let r = raw_warm_once(ctx, 1, WarmStop::Acpi)?;
                    progress(&format!(
                        "{}/{n} raw warm: createXML {} ms, console {} ms, ACPI stop {} ms",
                        i + 1,
                        fmt_num(r.create_ms),
                        fmt_num(r.to_console_ms.unwrap_or(0.0)),
                        fmt_num(r.stop_ms)
                    ));
                    wa.push(r);
                }
                _ => {
                    // The smoke run does not wait for this guest's console (the destroy sample
                    // is then of a guest still booting).
                    let stop = if ctx.opts.quick {
                        WarmStop::DestroyAtOnce
                    } else {
                        WarmStop::Destroy
                    };
                    let r = raw_warm_once(ctx, 1, stop)?;
                    progress(&format!(
                        "{}/{n} raw warm: createXML {} ms, destroy {} ms",
                        i + 1,
                        fmt_num(r.create_ms),
                        fmt_num(r.stop_ms)
                    ));
                    wd.push(r);
                }
            }
        }
    }
    let lv = |f: fn(&LauncherRun) -> f64| l.iter().map(f).collect::<Vec<f64>>();
    let cv = |f: fn(&RawColdRun) -> f64| c.iter().map(f).collect::<Vec<f64>>();
    let warm: Vec<&RawWarmRun> = wa.iter().chain(wd.iter()).collect();
    let warm_create: Vec<f64> = warm.iter().map(|r| r.create_ms).collect();
    let warm_console: Vec<f64> = warm.iter().filter_map(|r| r.to_console_ms).collect();
    // ACPI → shut off is the same work on a warm or a cold pair: both count.
    let warm_acpi: Vec<f64> = wa
        .iter()
        .map(|r| r.stop_ms)
        .chain(c.iter().map(|r| r.stop_acpi_ms))
        .collect();
    let warm_destroy: Vec<f64> = wd.iter().map(|r| r.stop_ms).collect();

    const L_SPAWN: &str = "spawn of `virt-launcher run` (parse, convert, namespace, configs, \
                           virtlogd + libvirtd start, connect, define + start)";
    const COLD: &str = "fresh private virtlogd + libvirtd (namespace, configs) started, \
                        connect, createXML";
    ctx.figure(
        "start.running",
        "start: spawn → domain running",
        "ms",
        &lv(|r| r.to_running_ms),
        L_SPAWN,
        Some((&cv(|r| r.to_running_ms), COLD)),
        Some(Goal::RatioAtMost(1.10)),
    );
    ctx.figure(
        "start.console",
        "start: spawn → guest's first console line",
        "ms",
        &lv(|r| r.to_console_ms),
        "as start.running, then until LV-READY is in the console log",
        Some((
            &cv(|r| r.to_console_ms),
            "as start.running (cold), then until LV-READY is in the console log",
        )),
        Some(Goal::RatioAtMost(1.10)),
    );
    ctx.figure(
        "start.daemons",
        "start: spawn → libvirtd serving (daemons ready)",
        "ms",
        &lv(|r| r.to_daemons_ms),
        "spawn → the launcher logs libvirtd `daemon ready` (socket accepts)",
        Some((
            &cv(|r| r.daemons_ms),
            "unshare + binds + virtlogd, nsenter + libvirtd, until the socket accepts",
        )),
        None,
    );
    ctx.figure(
        "start.define_start",
        "start: domain defined + started (fresh daemons)",
        "ms",
        &lv(|r| r.define_start_ms),
        "the launcher's defineXML + create (its `elapsed_ms`)",
        Some((
            &cv(|r| r.create_ms),
            "createXML, first domain on fresh daemons",
        )),
        None,
    );
    ctx.figure(
        "start.own",
        "start: the launcher's own work",
        "ms",
        &lv(|r| r.own_ms),
        "spawn → domain running, minus daemon start-up and define + start",
        None,
        None,
    );
    ctx.figure(
        "start.running_warm",
        "start: spawn → domain running, vs createXML on running daemons",
        "ms",
        &lv(|r| r.to_running_ms),
        L_SPAWN,
        Some((
            &warm_create,
            "createXML only: daemons already running, capabilities cached",
        )),
        None,
    );
    ctx.figure(
        "start.console_warm",
        "start: spawn → first console line, vs createXML → console on running daemons",
        "ms",
        &lv(|r| r.to_console_ms),
        "as start.console",
        Some((
            &warm_console,
            "createXML → LV-READY, daemons already running",
        )),
        None,
    );
    ctx.figure(
        "stop.acpi",
        "stop: ACPI shutdown → domain shut off",
        "ms",
        &lv(|r| r.stop_acpi_ms),
        "SIGTERM → the launcher logs `domain stopped` (ACPI button, event, undefine)",
        Some((
            &warm_acpi,
            "shutdown(ACPI power button) → domain no longer active (warm and cold pairs)",
        )),
        None,
    );
    ctx.figure(
        "stop.exit",
        "stop: SIGTERM → launcher exited (daemons stopped)",
        "ms",
        &lv(|r| r.stop_exit_ms),
        "SIGTERM → process exit: guest off, libvirtd and virtlogd stopped",
        Some((
            &cv(|r| r.stop_exit_ms),
            "ACPI shutdown → shut off, then SIGTERM libvirtd, virtlogd and wait for both",
        )),
        None,
    );
    ctx.figure(
        "stop.destroy",
        "stop: destroy",
        "ms",
        &[],
        "not applicable: the launcher destroys only when the grace period runs out",
        Some((
            &warm_destroy,
            "virDomainDestroy (returns once QEMU is gone)",
        )),
        None,
    );
    ctx.figure(
        "memory.launcher",
        "memory: launcher RSS, 1 running guest",
        "MiB",
        &lv(|r| r.rss.launcher),
        "VmRSS of the virt-launcher process, 0.5 s after LV-READY",
        None,
        Some(Goal::Below(15.0)),
    );
    ctx.figure(
        "memory.pod_total",
        "memory: whole pod RSS (launcher + libvirtd + virtlogd + QEMU)",
        "MiB",
        &lv(|r| r.rss.total()),
        "sum of VmRSS of the launcher, its libvirtd, virtlogd and QEMU",
        Some((
            &cv(|r| r.rss.total()),
            "libvirtd + virtlogd + QEMU of a cold pair with one guest, sampled likewise",
        )),
        None,
    );
    let rows: [(&'static str, RssField); 7] = [
        ("virt-launcher", |r| r.launcher),
        ("virt-launcher: anonymous (heap, stacks)", |r| {
            r.launcher_anon
        }),
        (
            "virt-launcher: file-backed (binary, shared libraries)",
            |r| r.launcher - r.launcher_anon,
        ),
        ("virt-launcher: PSS (shared pages split)", |r| {
            r.launcher_pss
        }),
        ("libvirtd", |r| r.libvirtd),
        ("virtlogd", |r| r.virtlogd),
        ("qemu-system-x86_64", |r| r.qemu),
    ];
    for (process, f) in rows {
        let lm = Stat::of(&l.iter().map(|r| f(&r.rss)).collect::<Vec<_>>()).map(|s| s.median);
        let rm = Stat::of(&c.iter().map(|r| f(&r.rss)).collect::<Vec<_>>()).map(|s| s.median);
        ctx.memory.push(MemoryRow {
            process,
            launcher_pod_mib: lm,
            raw_libvirt_mib: rm.filter(|_| !process.starts_with("virt-launcher")),
        });
    }
    ctx.memory.push(MemoryRow {
        process: "total",
        launcher_pod_mib: Stat::of(&lv(|r| r.rss.total())).map(|s| s.median),
        raw_libvirt_mib: Stat::of(&cv(|r| r.rss.total())).map(|s| s.median),
    });

    // The 1-disk point of the plot is this benchmark's medians.
    let med = |v: Vec<f64>| Stat::of(&v).map(|s| s.median).unwrap_or(0.0);
    ctx.disks.push(DiskPoint {
        disks: 1,
        launcher_to_running_ms: med(lv(|r| r.to_running_ms)),
        launcher_to_console_ms: med(lv(|r| r.to_console_ms)),
        raw_cold_to_running_ms: med(cv(|r| r.to_running_ms)),
        raw_cold_to_console_ms: med(cv(|r| r.to_console_ms)),
        raw_warm_create_ms: med(warm_create.clone()),
        launcher_rss_mib: med(lv(|r| r.rss.launcher)),
        qemu_rss_mib: med(lv(|r| r.rss.qemu)),
        libvirtd_rss_mib: med(lv(|r| r.rss.libvirtd)),
    });
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Benchmark: start time and RSS against the number of disks

fn bench_disks(ctx: &mut Ctx) -> Result<()> {
    for &n in ctx.opts.sweep() {
        if ctx.disks.iter().any(|p| p.disks == n) {
            continue; // the 1-disk point came from the start benchmark
        }
        check_interrupt()?;
        // One sample per side and size, order rotated by size.
        let mut l = None;
        let mut c = None;
        let mut w = None;
        for step in 0..3 {
            match (step + n) % 3 {
                0 => l = Some(launcher_once(ctx, n)?),
                1 => c = Some(raw_cold_once(ctx, n)?),
                _ => w = Some(raw_warm_once(ctx, n, WarmStop::DestroyAtOnce)?),
            }
        }
        let (l, c, w) = (l.expect("ran"), c.expect("ran"), w.expect("ran"));
        progress(&format!(
            "{n} disks: launcher running {} ms (raw cold {} ms, warm createXML {} ms), console {} ms, RSS {:.1} MiB",
            fmt_num(l.to_running_ms),
            fmt_num(c.to_running_ms),
            fmt_num(w.create_ms),
            fmt_num(l.to_console_ms),
            l.rss.launcher
        ));
        ctx.disks.push(DiskPoint {
            disks: n,
            launcher_to_running_ms: l.to_running_ms,
            launcher_to_console_ms: l.to_console_ms,
            raw_cold_to_running_ms: c.to_running_ms,
            raw_cold_to_console_ms: c.to_console_ms,
            raw_warm_create_ms: w.create_ms,
            launcher_rss_mib: l.rss.launcher,
            qemu_rss_mib: l.rss.qemu,
            libvirtd_rss_mib: l.rss.libvirtd,
        });
    }
    ctx.disks.sort_by_key(|p| p.disks);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// One iteration of each side

/// How long a start may take: TCG boots slow down with many disks.
fn start_timeout(disks: usize) -> Duration {
    Duration::from_secs(90 + 2 * disks as u64)
}

/// The files of one "pod": a VMI with `disks` Filesystem-mode PVCs (1 MiB, sparse).
struct PodFiles {
    vmi: PathBuf,
    pvcs: PathBuf,
}

fn write_pod(dir: &Path, name: &str, disks: usize) -> Result<PodFiles> {
    let pvcs = dir.join("pvcs");
    let mut disk_yaml = String::new();
    let mut volume_yaml = String::new();
    for i in 0..disks {
        let d = format!("d{i}");
        let pvc = pvcs.join(&d);
        fs::create_dir_all(&pvc).with_context(|| format!("create {}", pvc.display()))?;
        let img = pvc.join("disk.img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .with_context(|| format!("create {}", img.display()))?;
        let _ = write!(
            disk_yaml,
            "        - name: {d}\n          disk:\n            bus: virtio\n"
        );
        let _ = write!(
            volume_yaml,
            "    - name: {d}\n      persistentVolumeClaim:\n        claimName: {d}\n"
        );
    }
    let yaml = format!(
        "apiVersion: kubevirt.io/v1\n\
         kind: VirtualMachineInstance\n\
         metadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  terminationGracePeriodSeconds: 30\n  domain:\n\
         \x20   resources:\n      requests:\n        memory: 128Mi\n\
         \x20   firmware:\n      kernelBoot:\n        kernelArgs: \"console=ttyS0 quiet\"\n\
         \x20       container:\n          image: test-guest\n\
         \x20         kernelPath: /vmlinuz\n          initrdPath: /initramfs.gz\n\
         \x20   devices:\n      disks:\n{disk_yaml}\
         \x20 volumes:\n{volume_yaml}"
    );
    let vmi = dir.join("vmi.yaml");
    write(&vmi, &yaml)?;
    Ok(PodFiles { vmi, pvcs })
}

/// The domain XML the launcher generates for `files`, with the VM's private files (console
/// log) under `private` — exactly as `virt-launcher run` computes it in standalone mode.
fn domain_xml(files: &PodFiles, guest_dir: &Path, private: &Path) -> Result<String> {
    domain_xml_with(files, guest_dir, private, None)
}

/// As [`domain_xml`], with hot-plugged volumes under `hotplug` (the launcher's `--hotplug-dir`).
fn domain_xml_with(
    files: &PodFiles,
    guest_dir: &Path,
    private: &Path,
    hotplug: Option<&Path>,
) -> Result<String> {
    let vmi = spec::load_file(&files.vmi)?;
    Ok(convert_vmi(&vmi, files, guest_dir, private, hotplug)?.to_xml())
}

/// The launcher's conversion of `vmi` with the pod paths a standalone launcher would use for
/// `files`, the guest, its private directory and its hot-plug directory.
fn convert_vmi(
    vmi: &spec::VirtualMachineInstance,
    files: &PodFiles,
    guest_dir: &Path,
    private: &Path,
    hotplug: Option<&Path>,
) -> Result<virt_launcher::domain::Domain> {
    let mut paths = PodPaths::kubevirt_defaults(vmi);
    paths.vmi_disks_dir = absolute(&files.pvcs);
    paths.kernel_boot_dir = absolute(guest_dir);
    paths.private_dir = private.to_path_buf();
    paths.ephemeral_disks_dir = private.join("ephemeral");
    if let Some(dir) = hotplug {
        paths.hotplug_disks_dir = absolute(dir);
    }
    fs::create_dir_all(private).with_context(|| format!("create {}", private.display()))?;
    // Pod facts may run tools (qemu-img) and wait for them: not while the reaper runs.
    let facts = without_reaping(|| podfacts::probe(vmi, paths, DomainType::Qemu))?;
    Ok(convert::convert(vmi, &facts)?)
}

fn launcher_once(ctx: &mut Ctx, disks: usize) -> Result<LauncherRun> {
    let dir = ctx.fresh_dir("l")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let runtime = dir.join("runtime");
    let console = runtime.join("private/virt-serial0-log");
    let timeout = start_timeout(disks);

    let mut pod = LauncherProc::spawn(ctx.opts, &files, &runtime)?;
    let t0 = pod.t0;
    let (starting, _) = pod.wait_line(|v| message(v) == "launcher starting", timeout)?;
    pod.note_namespace();
    let (daemons, _) = pod.wait_line(
        |v| message(v) == "daemon ready" && v["subcomponent"] == "libvirtd",
        timeout,
    )?;
    let (running, line) = pod.wait_line(|v| message(v) == "domain running", timeout)?;
    let define_start_ms = line["elapsed_ms"]
        .as_f64()
        .ok_or_else(|| anyhow!("`domain running` has no elapsed_ms: {line}"))?;
    let booted = wait_console(&console, t0 + timeout, || pod.check_alive())?;
    std::thread::sleep(SETTLE);

    let libvirtd = read_pid(&runtime.join("pids/libvirtd.pid"))?;
    let virtlogd = read_pid(&runtime.join("pids/virtlogd.pid"))?;
    let qemu = find_qemu(&ctx.name, &mount_ns(libvirtd)?)?;
    let rss = PodRss {
        launcher: rss_mib(pod.pid())?,
        launcher_anon: status_mib(pod.pid(), "RssAnon")?,
        launcher_pss: pss_mib(pod.pid())?,
        libvirtd: rss_mib(libvirtd)?,
        virtlogd: rss_mib(virtlogd)?,
        qemu: rss_mib(qemu)?,
    };

    let ts = Instant::now();
    pod.signal(Signal::SIGTERM)?;
    let (stopped, _) =
        pod.wait_line(|v| message(v) == "domain stopped", Duration::from_secs(60))?;
    let exited = pod.wait_exit(Duration::from_secs(60))?;

    let to_running = ms(running - t0);
    let daemons_span = ms(daemons - starting);
    let run = LauncherRun {
        to_daemons_ms: ms(daemons - t0),
        define_start_ms,
        to_running_ms: to_running,
        to_console_ms: ms(booted - t0),
        own_ms: (to_running - daemons_span - define_start_ms).max(0.0),
        rss,
        stop_acpi_ms: ms(stopped - ts),
        stop_exit_ms: ms(exited - ts),
    };
    drop(pod);
    let _ = fs::remove_dir_all(&dir);
    Ok(run)
}

fn raw_cold_once(ctx: &mut Ctx, disks: usize) -> Result<RawColdRun> {
    let dir = ctx.fresh_dir("c")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let private = dir.join("private");
    let xml = domain_xml(&files, &ctx.opts.guest_dir, &private)?;
    let console = private.join("virt-serial0-log");
    let timeout = start_timeout(disks);

    let t0 = Instant::now();
    let (mut raw, daemons) = RawLibvirt::start(&dir, "lvb-cold")?;
    raw.connect()?;
    let (dom, create) = raw.create(&xml)?;
    let to_running = t0.elapsed();
    let booted = wait_console(&console, t0 + timeout, || raw.check_alive())?;
    std::thread::sleep(SETTLE);
    let rss = PodRss {
        launcher: 0.0,
        launcher_anon: 0.0,
        launcher_pss: 0.0,
        libvirtd: rss_mib(raw.pid(RawDaemon::Libvirtd)?)?,
        virtlogd: rss_mib(raw.pid(RawDaemon::Virtlogd)?)?,
        qemu: rss_mib(find_qemu(&ctx.name, &raw.mnt_ns)?)?,
    };

    let ts = Instant::now();
    shutdown_acpi(&dom)?;
    wait_inactive(&dom, Duration::from_secs(60))?;
    let stop_acpi = ts.elapsed();
    drop(dom);
    raw.stop()?;
    let stop_exit = ts.elapsed();
    drop(raw);
    let _ = fs::remove_dir_all(&dir);
    Ok(RawColdRun {
        daemons_ms: ms(daemons),
        create_ms: ms(create),
        to_running_ms: ms(to_running),
        to_console_ms: ms(booted - t0),
        rss,
        stop_acpi_ms: ms(stop_acpi),
        stop_exit_ms: ms(stop_exit),
    })
}

fn raw_warm_once(ctx: &mut Ctx, disks: usize, stop: WarmStop) -> Result<RawWarmRun> {
    let dir = ctx.fresh_dir("w")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let private = dir.join("private");
    let xml = domain_xml(&files, &ctx.opts.guest_dir, &private)?;
    let console = private.join("virt-serial0-log");
    let timeout = start_timeout(disks);
    let warm = ctx.warm()?;

    let t0 = Instant::now();
    let (dom, create) = warm.create(&xml)?;
    let mut to_console_ms = None;
    if !matches!(stop, WarmStop::DestroyAtOnce) {
        let booted = wait_console(&console, t0 + timeout, || warm.check_alive())?;
        to_console_ms = Some(ms(booted - t0));
        std::thread::sleep(SETTLE);
    }
    let ts = Instant::now();
    match stop {
        WarmStop::Acpi => {
            shutdown_acpi(&dom)?;
            wait_inactive(&dom, Duration::from_secs(60))?;
        }
        WarmStop::Destroy | WarmStop::DestroyAtOnce => dom.destroy().context("destroy")?,
    }
    let stop_ms = ms(ts.elapsed());
    drop(dom);
    let _ = fs::remove_dir_all(&dir);
    Ok(RawWarmRun {
        create_ms: ms(create),
        to_console_ms,
        stop_ms,
    })
}

fn shutdown_acpi(dom: &Domain) -> Result<()> {
    dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        .context("shutdown (ACPI power button)")
}

/// Waits until a (transient) domain is no longer active.
fn wait_inactive(dom: &Domain, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while let Ok(true) = dom.is_active() {
        check_interrupt()?;
        if Instant::now() > deadline {
            bail!("the domain did not shut off within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Polls the guest's console log for [`READY_MARKER`]; returns when it appeared.
fn wait_console(
    path: &Path,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<Instant> {
    loop {
        if fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).contains(READY_MARKER))
            .unwrap_or(false)
        {
            return Ok(Instant::now());
        }
        check_interrupt()?;
        alive()?;
        if Instant::now() > deadline {
            bail!(
                "the guest console {} did not show {READY_MARKER} in time",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or("")
}

// ------------------------------------------------------------------------------------------
// The launcher as a child process

struct LauncherProc {
    child: Child,
    runtime: PathBuf,
    t0: Instant,
    /// stderr lines (JSON parsed when possible) with their arrival time.
    lines: Arc<Mutex<Vec<(Instant, Value)>>>,
    /// Its private mount namespace, once known (for clean-up).
    mnt_ns: Option<String>,
    exited: bool,
}

impl LauncherProc {
    fn spawn(opts: &Options, files: &PodFiles, runtime: &Path) -> Result<LauncherProc> {
        LauncherProc::spawn_with(opts, Some(&files.vmi), &files.pvcs, None, runtime)
    }

    /// `virt-launcher run` with the VMI file (none: it serves its socket and waits for Sync or
    /// PrepareMigrationTarget), the PVC directory, and a hot-plug directory if given.
    fn spawn_with(
        opts: &Options,
        vmi: Option<&Path>,
        pvcs: &Path,
        hotplug: Option<&Path>,
        runtime: &Path,
    ) -> Result<LauncherProc> {
        let mut cmd = Command::new(&opts.launcher);
        cmd.arg("run");
        if let Some(vmi) = vmi {
            cmd.arg("--vmi").arg(vmi);
        }
        if let Some(dir) = hotplug {
            cmd.arg("--hotplug-dir").arg(dir);
        }
        cmd.args(["--domain-type", "qemu", "--json-logs", "--runtime-dir"])
            .arg(runtime)
            .arg("--volumes-dir")
            .arg(pvcs)
            .arg("--kernel-boot-dir")
            .arg(&opts.guest_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Our own process group: a Ctrl-C on the bench reaches the bench only, which then
            // stops this launcher in order.
            .process_group(0);
        let t0 = Instant::now();
        let mut child =
            spawn_known(&mut cmd).with_context(|| format!("spawn {}", opts.launcher.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let mut kept = None;
        if opts.keep_logs {
            let dir = opts.out_dir.join("logs");
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            // Named after the pod's directory (hl3, ml5, …: unique within a run).
            let pod = runtime
                .parent()
                .and_then(Path::file_name)
                .unwrap_or_default();
            let path = dir.join(format!("{}.log", pod.to_string_lossy()));
            kept = Some(std::io::BufWriter::new(
                fs::File::create(&path).with_context(|| format!("create {}", path.display()))?,
            ));
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Some(f) = kept.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap_or_else(|e| e.into_inner()).push((at, v));
            }
        });
        Ok(LauncherProc {
            child,
            runtime: runtime.to_path_buf(),
            t0,
            lines,
            mnt_ns: None,
            exited: false,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The control socket (published by renaming once the launcher serves).
    fn socket(&self) -> PathBuf {
        self.runtime.join("launcher-sock")
    }

    /// Waits until the control socket is published.
    fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.socket().exists() {
            check_interrupt()?;
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the launcher did not publish {} within {timeout:?}\n{}",
                    self.socket().display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn note_namespace(&mut self) {
        self.mnt_ns = mount_ns(self.pid()).ok();
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), sig).with_context(|| format!("send {sig} to the launcher"))
    }

    /// The first log line matching `pred`, and when it arrived.
    fn wait_line(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, v)) = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(_, v)| pred(v))
            {
                return Ok((*at, v.clone()));
            }
            check_interrupt()?;
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the launcher did not log the expected line within {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            std::thread::sleep(Duration::from_millis(50)); // let the reader drain stderr
            bail!("the launcher exited early ({status})\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Waits for the launcher to exit successfully; returns when it did.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let at = Instant::now();
                self.exited = true;
                if !status.success() {
                    std::thread::sleep(Duration::from_millis(50));
                    bail!("the launcher exited with {status}\n{}", self.log_tail());
                }
                return Ok(at);
            }
            check_interrupt()?;
            if Instant::now() > deadline {
                bail!(
                    "the launcher did not exit within {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn log_tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(30);
        let mut out = format!("--- launcher log (last {} lines):\n", lines.len() - start);
        for (_, v) in &lines[start..] {
            let _ = writeln!(out, "{v}");
        }
        out
    }
}

impl Drop for LauncherProc {
    /// An aborted run: stop the launcher like kubelet would (SIGTERM, then SIGKILL), then kill
    /// whatever is left in its namespace.
    fn drop(&mut self) {
        if !self.exited && matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(40);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(ns) = &self.mnt_ns {
            kill_namespace(ns);
        }
        kill_matching(&[self.runtime.display().to_string()]);
    }
}

// ------------------------------------------------------------------------------------------
// Raw libvirt: a private virtlogd + libvirtd pair, as the launcher runs them

#[derive(Clone, Copy)]
enum RawDaemon {
    Virtlogd,
    Libvirtd,
}

struct RawLibvirt {
    root: PathBuf,
    virtlogd: Option<Child>,
    libvirtd: Option<Child>,
    conn: Option<Connect>,
    mnt_ns: String,
}

/// Binds private state directories over libvirt's (as the launcher's `pod::isolate` does),
/// installs qemu.conf, sets the hostname and becomes virtlogd. `$1` root, `$2` hostname.
const NAMESPACE_SCRIPT: &str = r#"set -e
R=$1
for pair in run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt etc:/etc/libvirt; do
    mkdir -p "${pair#*:}"
    mount --bind "$R/state/${pair%%:*}" "${pair#*:}"
done
cp "$R/conf/qemu.conf" /etc/libvirt/qemu.conf
hostname "$2"
exec virtlogd -f "$R/conf/virtlogd.conf" -p "$R/pids/virtlogd.pid"
"#;

impl RawLibvirt {
    /// Writes the configuration (the launcher's, from `src/pod/mod.rs`), starts virtlogd in
    /// a new mount + UTS namespace and libvirtd in the same one; returns once libvirtd's socket
    /// accepts, with the time that took.
    fn start(root: &Path, hostname: &str) -> Result<(RawLibvirt, Duration)> {
        let t0 = Instant::now();
        for d in [
            "sock",
            "conf",
            "pids",
            "state/run",
            "state/lib",
            "state/log",
            "state/cache",
            "state/etc",
        ] {
            let d = root.join(d);
            fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")?;
        let sock_dir = root.join("sock");
        // The launcher's own configuration, byte for byte.
        write(
            &root.join("conf/libvirtd.conf"),
            &virt_launcher::pod::libvirtd_conf(&sock_dir, uuid.trim()),
        )?;
        write(
            &root.join("conf/virtlogd.conf"),
            virt_launcher::pod::VIRTLOGD_CONF,
        )?;
        write(&root.join("conf/qemu.conf"), virt_launcher::pod::QEMU_CONF)?;

        let log = |name: &str| -> Result<fs::File> {
            let p = root.join(format!("{name}.log"));
            fs::File::create(&p).with_context(|| format!("create {}", p.display()))
        };
        let virtlogd = spawn_known(
            Command::new("unshare")
                .args([
                    "--mount",
                    "--uts",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                ])
                .arg(NAMESPACE_SCRIPT)
                .arg("sh")
                .arg(root)
                .arg(hostname)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log("virtlogd")?)
                .process_group(0),
        )
        .context("spawn unshare … virtlogd")?;
        let mut raw = RawLibvirt {
            root: root.to_path_buf(),
            virtlogd: Some(virtlogd),
            libvirtd: None,
            conn: None,
            mnt_ns: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        raw.wait_socket(&root.join("state/run/virtlogd-sock"), deadline)?;
        let vpid = raw.pid(RawDaemon::Virtlogd)?;
        raw.mnt_ns = mount_ns(vpid)?;
        if raw.mnt_ns == mount_ns(std::process::id() as i32)? {
            bail!("virtlogd is not in a private mount namespace");
        }
        let libvirtd = spawn_known(
            Command::new("nsenter")
                .arg("--target")
                .arg(vpid.to_string())
                .args(["--mount", "--uts", "--", "libvirtd", "-f"])
                .arg(root.join("conf/libvirtd.conf"))
                .arg("-p")
                .arg(root.join("pids/libvirtd.pid"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log("libvirtd")?)
                .process_group(0),
        )
        .context("spawn nsenter … libvirtd")?;
        raw.libvirtd = Some(libvirtd);
        raw.wait_socket(&sock_dir.join("libvirt-sock"), deadline)?;
        Ok((raw, t0.elapsed()))
    }

    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.root.join("sock/libvirt-sock").display()
        )
    }

    fn connect(&mut self) -> Result<()> {
        let conn = Connect::open(Some(&self.uri()))
            .with_context(|| format!("connect to {}", self.uri()))?;
        self.conn = Some(conn);
        Ok(())
    }

    /// createXML; returns the running domain and how long the call took.
    fn create(&self, xml: &str) -> Result<(Domain, Duration)> {
        let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
        let t = Instant::now();
        let dom = conn
            .create_domain_xml(xml, 0)
            .map_err(|e| anyhow!("createXML: {e}\n{}", self.log_tail()))?;
        Ok((dom, t.elapsed()))
    }

    /// defineXML + create (a persistent domain, as the launcher's): hot-plug with
    /// AFFECT_CONFIG and completed-job statistics after a migration need one.
    fn define_start(&self, xml: &str) -> Result<Domain> {
        let conn = self.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
        let dom = conn
            .define_domain_xml(xml)
            .map_err(|e| anyhow!("defineXML: {e}\n{}", self.log_tail()))?;
        dom.create()
            .map_err(|e| anyhow!("create: {e}\n{}", self.log_tail()))?;
        Ok(dom)
    }

    fn pid(&self, which: RawDaemon) -> Result<i32> {
        let child = match which {
            RawDaemon::Virtlogd => &self.virtlogd,
            RawDaemon::Libvirtd => &self.libvirtd,
        };
        child
            .as_ref()
            .map(|c| c.id() as i32)
            .ok_or_else(|| anyhow!("daemon not running"))
    }

    fn wait_socket(&mut self, socket: &Path, deadline: Instant) -> Result<()> {
        while UnixStream::connect(socket).is_err() {
            check_interrupt()?;
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{} did not appear\n{}", socket.display(), self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        let mut died = None;
        for (name, child) in [
            ("virtlogd", &mut self.virtlogd),
            ("libvirtd", &mut self.libvirtd),
        ] {
            if let Some(status) = child.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
                *child = None;
                died = Some((name, status));
            }
        }
        match died {
            Some((name, status)) => bail!("raw {name} exited ({status})\n{}", self.log_tail()),
            None => Ok(()),
        }
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for name in ["virtlogd", "libvirtd"] {
            let text =
                fs::read_to_string(self.root.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- raw {name} log:");
            for l in &lines[lines.len().saturating_sub(15)..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    /// Destroys any domain still running, stops libvirtd then virtlogd (SIGTERM, SIGKILL after
    /// 10 s), and kills anything left in the namespace. Returns how long it took.
    fn stop(&mut self) -> Result<Duration> {
        let t = Instant::now();
        if let Some(conn) = self.conn.take() {
            if let Ok(doms) = conn.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE) {
                for d in doms {
                    let _ = d.destroy();
                }
            }
            drop(conn);
        }
        let mut result = Ok(());
        for child in [self.libvirtd.take(), self.virtlogd.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = terminate(child, Duration::from_secs(10)) {
                result = Err(e);
            }
        }
        if !self.mnt_ns.is_empty() {
            kill_namespace(&self.mnt_ns);
        }
        result.map(|()| t.elapsed())
    }
}

impl Drop for RawLibvirt {
    fn drop(&mut self) {
        let _ = self.stop();
        // With the separator: `…/mr4/` must not match another pair's `…/mr41/`.
        kill_matching(&[format!("{}/", self.root.display())]);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; errors if SIGKILL was needed.
fn terminate(mut child: Child, grace: Duration) -> Result<()> {
    let pid = child.id() as i32;
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("pid {pid} ignored SIGTERM for {grace:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ------------------------------------------------------------------------------------------
// Orphans

/// Pids of the children this benchmark spawned itself (their `Child` waits for them).
static KNOWN_CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static REAPING: AtomicBool = AtomicBool::new(false);

/// Spawns a child that the orphan reaper must leave alone.
fn spawn_known(cmd: &mut Command) -> std::io::Result<Child> {
    let mut known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    known.push(child.id() as i32);
    Ok(child)
}

/// Runs a command to completion as a known child: the orphan reaper keeps reaping other
/// processes meanwhile (a paused reaper would slow down libvirt's QEMU shutdowns).
fn run_known(cmd: &mut Command) -> Result<std::process::Output> {
    let child = spawn_known(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as i32;
    let out = child.wait_with_output();
    KNOWN_CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
    out.with_context(|| format!("wait for {cmd:?}"))
}

/// Runs `f` with the reaper paused (for code that spawns and waits for its own commands).
fn without_reaping<T>(f: impl FnOnce() -> T) -> T {
    let _known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Makes this process the reaper of its orphaned descendants and reaps them at once, for the
/// duration of the run.
///
/// QEMU daemonizes, so raw libvirtd's QEMU processes are orphans. On a normal host init reaps
/// them at once (and in a pod the launcher does); this sandbox's PID 1 reaps only every second
/// or two, and until then libvirt sees a dying QEMU as alive: capability probes, shutdowns and
/// destroys of raw libvirt would look slower than they are. The launcher is a subreaper itself
/// and needs none of this.
struct OrphanReaper(Option<std::thread::JoinHandle<()>>);

impl OrphanReaper {
    fn start() -> Result<OrphanReaper> {
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        REAPING.store(true, Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name("orphan-reaper".into())
            .spawn(|| {
                while REAPING.load(Ordering::SeqCst) {
                    if !reap_orphans() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
            .context("spawn the orphan reaper")?;
        Ok(OrphanReaper(Some(handle)))
    }
}

impl Drop for OrphanReaper {
    fn drop(&mut self) {
        REAPING.store(false, Ordering::SeqCst);
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
        let _ = nix::sys::prctl::set_child_subreaper(false);
    }
}

/// Reaps the exited children that are not [`KNOWN_CHILDREN`]; true if it reaped any.
fn reap_orphans() -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let known = KNOWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let Some(first) = waitid(Id::All, peek).ok().and_then(|s| s.pid()) else {
        return false;
    };
    // The first zombie may be one of ours, hiding others: then look at all of them.
    let zombies = if known.contains(&first.as_raw()) {
        zombie_children()
    } else {
        vec![first.as_raw()]
    };
    let mut reaped = false;
    for pid in zombies.into_iter().filter(|p| !known.contains(p)) {
        let reap = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        reaped |= waitid(Id::Pid(Pid::from_raw(pid)), reap).is_ok();
    }
    reaped
}

/// Our children that are zombies, from /proc.
fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|p| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next().and_then(|x| x.parse().ok()) == Some(me)
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// /proc

fn read_pid(path: &Path) -> Result<i32> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a pid: {text:?}", path.display()))
}

/// VmRSS of `pid`, in MiB.
fn rss_mib(pid: i32) -> Result<f64> {
    status_mib(pid, "VmRSS")
}

/// Pss of `pid` from `/proc/<pid>/smaps_rollup`, in MiB.
fn pss_mib(pid: i32) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("read /proc/{pid}/smaps_rollup"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/smaps_rollup has no Pss"))?;
    Ok(kib / 1024.0)
}

/// A memory field of `/proc/<pid>/status` (VmRSS, RssAnon, RssFile, …), in MiB.
fn status_mib(pid: i32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {field}"))?;
    Ok(kib / 1024.0)
}

fn mount_ns(pid: i32) -> Result<String> {
    Ok(fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .with_context(|| format!("read /proc/{pid}/ns/mnt"))?
        .display()
        .to_string())
}

fn cmdline(pid: i32) -> Option<String> {
    let mut raw = Vec::new();
    fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_end(&mut raw))
        .ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

fn pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != me)
                .collect()
        })
        .unwrap_or_default()
}

/// The QEMU process of domain `default_<name>` in mount namespace `ns`.
fn find_qemu(name: &str, ns: &str) -> Result<i32> {
    let needle = format!("guest=default_{name},");
    pids()
        .into_iter()
        .find(|&p| {
            cmdline(p).is_some_and(|c| c.contains(&needle)) && mount_ns(p).is_ok_and(|n| n == ns)
        })
        .ok_or_else(|| anyhow!("no QEMU process for default_{name} in {ns}"))
}

/// SIGKILLs every process in mount namespace `ns` (never our own namespace).
fn kill_namespace(ns: &str) {
    if mount_ns(std::process::id() as i32).is_ok_and(|me| me == ns) {
        return;
    }
    for p in pids() {
        if mount_ns(p).is_ok_and(|n| n == ns) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// SIGKILLs every process whose command line contains one of `needles`; returns them.
fn kill_matching(needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for p in pids() {
        let Some(c) = cmdline(p) else { continue };
        if needles.iter().any(|n| c.contains(n.as_str())) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            found.push(format!("{p}: {}", c.trim()));
        }
    }
    found
}

// ------------------------------------------------------------------------------------------
// Output

fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default();
    let accelerator = if Path::new("/dev/kvm").exists() {
        "TCG (domain type qemu; /dev/kvm exists but KVM is nested and unusable for guests)"
    } else {
        "TCG (domain type qemu; no /dev/kvm)"
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        memory_gib,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        os,
        libvirt: command_line("libvirtd", &["--version"]),
        qemu: command_line("qemu-system-x86_64", &["--version"]),
        accelerator: accelerator.into(),
        load_at_start: load_average(),
    }
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first line of a command's output ("" if it fails).
fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

/// A number for people: no decimals from 100 up, one below, two below 1.
fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: &Option<Stat>, unit: &str) -> String {
    match s {
        Some(s) => format!("{} {unit} (n={})", fmt_num(s.median), s.n),
        None => "—".into(),
    }
}

/// The Markdown report: machine, the figures table, memory, disks, conversion.
pub fn markdown(r: &Report) -> String {
    let m = &r.machine;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Measured {} by `./devtool bench`{} in {:.0} s. Medians of interleaved runs; \
         n = number of samples.\n",
        r.date,
        if r.quick { " --quick (smoke run)" } else { "" },
        r.duration_s
    );
    let _ = writeln!(
        o,
        "Machine: {} CPUs ({}), {:.0} GiB RAM, kernel {}, {}; {}; {}; guests under {}.\n",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.os, m.libvirt, m.qemu, m.accelerator
    );
    let during = r
        .load_during
        .iter()
        .map(|l| format!("{} {}", l.benchmark, l.load))
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(
        o,
        "Load average (1, 5, 15 min): {} at the start, {} at the end (the CPUs are shared with \
         whatever else runs on the machine); at the start of each benchmark: {during}.\n",
        m.load_at_start, r.load_at_end
    );
    o.push_str("| figure | launcher | raw libvirt | ratio | goal | met? |\n");
    o.push_str("| --- | ---: | ---: | ---: | --- | --- |\n");
    for f in &r.figures {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            f.name,
            cell(&f.launcher, f.unit),
            cell(&f.raw, f.unit),
            f.ratio.map_or("—".into(), |x| format!("{x:.2}")),
            f.goal.as_deref().unwrap_or(""),
            match f.goal_met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    }
    for p in &r.not_yet_measured {
        let _ = writeln!(
            o,
            "| {} | not yet measured | not yet measured | — | {} | |",
            p.name, p.goal
        );
    }

    o.push_str("\n**Memory with one running guest** (VmRSS, MiB, medians; raw = cold pair):\n\n");
    o.push_str("| process | launcher pod | raw libvirt |\n| --- | ---: | ---: |\n");
    for row in &r.memory {
        let f = |v: Option<f64>| v.map_or("—".into(), |x| format!("{x:.1}"));
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            row.process,
            f(row.launcher_pod_mib),
            f(row.raw_libvirt_mib)
        );
    }

    if !r.hotplug_memory.is_empty() {
        o.push_str(
            "\n**The launcher's memory with hot-plugged disks** (MiB, one pod: after boot, then \
             with 32 disks hot-plugged by Sync, the hot-plug samples on virtio and the others \
             on virtio-scsi):\n\n",
        );
        o.push_str(
            "| virt-launcher | after boot | 32 hot-plugged disks |\n| --- | ---: | ---: |\n",
        );
        for row in &r.hotplug_memory {
            let _ = writeln!(
                o,
                "| {} | {:.1} | {:.1} |",
                row.what, row.after_boot_mib, row.with_32_hotplugged_mib
            );
        }
    }

    o.push_str(
        "\n**Start time and RSS against the number of virtio disks** (ms, MiB; the 1-disk row \
         is the medians above, the others one sample each):\n\n",
    );
    o.push_str(
        "| disks | launcher → running | raw cold → running | raw warm createXML | \
         launcher → console | raw cold → console | launcher RSS | libvirtd RSS | QEMU RSS |\n",
    );
    o.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for p in &r.disks {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            p.disks,
            fmt_num(p.launcher_to_running_ms),
            fmt_num(p.raw_cold_to_running_ms),
            fmt_num(p.raw_warm_create_ms),
            fmt_num(p.launcher_to_console_ms),
            fmt_num(p.raw_cold_to_console_ms),
            p.launcher_rss_mib,
            p.libvirtd_rss_mib,
            p.qemu_rss_mib
        );
    }

    o.push_str("\n**Conversion** (µs per call, median of batches):\n\n");
    o.push_str("| disks | convert | convert + XML | XML bytes |\n| ---: | ---: | ---: | ---: |\n");
    for c in &r.conversion {
        let _ = writeln!(
            o,
            "| {} | {:.1} | {:.1} | {} |",
            c.disks, c.convert_us, c.convert_and_xml_us, c.xml_bytes
        );
    }
    if let Some(p) = &r.plot {
        let _ = writeln!(o, "\nPlot: `{}`", p.display());
    }
    if !r.leftover_processes.is_empty() {
        let _ = writeln!(
            o,
            "\n**Processes left behind (killed):** {}",
            r.leftover_processes.join("; ")
        );
    }
    o
}

/// Writes `disks.dat` and `disks.gp` and runs gnuplot; `None` when gnuplot is missing.
fn plot(r: &Report, out: &Path) -> Result<Option<PathBuf>> {
    let mut dat = String::from(
        "# disks launcher_running_ms raw_cold_running_ms raw_warm_create_ms \
         launcher_console_ms raw_cold_console_ms launcher_rss_mib libvirtd_rss_mib\n",
    );
    for p in &r.disks {
        let _ = writeln!(
            dat,
            "{} {:.1} {:.1} {:.1} {:.1} {:.1} {:.2} {:.2}",
            p.disks,
            p.launcher_to_running_ms,
            p.raw_cold_to_running_ms,
            p.raw_warm_create_ms,
            p.launcher_to_console_ms,
            p.raw_cold_to_console_ms,
            p.launcher_rss_mib,
            p.libvirtd_rss_mib
        );
    }
    let dat_path = out.join("disks.dat");
    write(&dat_path, &dat)?;
    let png = out.join("disks.png");
    let xtics = r
        .disks
        .iter()
        .map(|p| p.disks.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        "set terminal pngcairo size 1500,520 font ',10'\n\
         set output '{png}'\n\
         set multiplot layout 1,3 title 'virt-launcher vs raw libvirt, TCG test guest, {date}'\n\
         set grid\nset key top left\nset offsets 0, 0, graph 0.3, 0\n\
         set xlabel 'virtio disks at start'\nset xtics ({xtics})\nset yrange [0:*]\n\
         set ylabel 'ms'\nset title 'start: → domain running'\n\
         plot '{dat}' using 1:2 with linespoints lw 2 title 'launcher: spawn → running', \
              '' using 1:3 with linespoints title 'raw cold: daemons + createXML', \
              '' using 1:4 with linespoints title 'raw warm: createXML only'\n\
         set title 'start: → guest console (LV-READY)'\n\
         plot '{dat}' using 1:5 with linespoints lw 2 title 'launcher: spawn → console', \
              '' using 1:6 with linespoints title 'raw cold: daemons → console'\n\
         set ylabel 'MiB'\nset title 'RSS with one running guest'\n\
         plot '{dat}' using 1:7 with linespoints lw 2 title 'virt-launcher', \
              '' using 1:8 with linespoints title 'its libvirtd', \
              15 with lines dashtype 2 title 'goal: launcher < 15 MiB'\n\
         unset multiplot\n",
        png = png.display(),
        dat = dat_path.display(),
        date = r.date,
    );
    let gp = out.join("disks.gp");
    write(&gp, &script)?;
    if !in_path("gnuplot") {
        progress("gnuplot not found: no plot (./devtool bench installs gnuplot-nox)");
        return Ok(None);
    }
    let out = Command::new("gnuplot")
        .arg(&gp)
        .output()
        .context("run gnuplot")?;
    if !out.status.success() {
        bail!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(png))
}

const DOC_BEGIN: &str = "<!-- bench-results:begin -->";
const DOC_END: &str = "<!-- bench-results:end -->";

/// Replaces the part of `doc` between the result markers with `md`.
fn update_doc(doc: &Path, md: &str) -> Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        bail!("{} has no {DOC_BEGIN} … {DOC_END} section", doc.display());
    };
    let new = format!("{}{DOC_BEGIN}\n{md}{}", &text[..b], &text[e..]);
    write(doc, &new)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

// ------------------------------------------------------------------------------------------
// Interruption

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Ctrl-C / SIGTERM: finish the current wait, clean up every process and namespace, exit.
/// Taken by tokio's signal handling on a thread of its own: no handler of ours, no `unsafe`,
/// and no blocked signal mask for the launchers and daemons the benchmark spawns to inherit.
fn install_signal_handlers() {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            let _ = ready_tx.send(());
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        });
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
}

// ------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut opts = Options::defaults(false);
    let mut update_doc = false;
    while let Some(a) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let r = match a.as_str() {
            "--quick" => {
                opts.quick = true;
                Ok(())
            }
            "--update-doc" => {
                update_doc = true;
                Ok(())
            }
            "--no-plot" => {
                opts.plot = false;
                Ok(())
            }
            "--keep-logs" => {
                opts.keep_logs = true;
                Ok(())
            }
            "--only" => value("--only").map(|v| {
                opts.only
                    .extend(v.to_string_lossy().split(',').map(str::to_string))
            }),
            "--out" => value("--out").map(|v| opts.out_dir = absolute(&v)),
            "--launcher" => value("--launcher").map(|v| opts.launcher = absolute(&v)),
            "--guest-dir" => value("--guest-dir").map(|v| opts.guest_dir = absolute(&v)),
            "--bench" => Ok(()), // added by `cargo bench`
            "-h" | "--help" => {
                println!(
                    "usage: launcher [--quick] [--update-doc] [--no-plot] [--only NAME,…] \
                     [--keep-logs] [--out DIR] [--launcher BIN] [--guest-dir DIR]\n\
                     --only runs the benchmarks whose name contains one of the words \
                     (conversion, start, disks, hot-plug, migration), for debugging\n\
                     --keep-logs keeps each launcher's log in <out>/logs/"
                );
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other:?} (try --help)")),
        };
        if let Err(e) = r {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    }
    if update_doc {
        opts.update_doc = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md"));
    }
    install_signal_handlers();
    match run(&opts) {
        Ok(report) => {
            println!("{}", markdown(&report));
            println!(
                "results: {}/results.json, results.md{}",
                opts.out_dir.display(),
                if report.plot.is_some() {
                    ", disks.png"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
