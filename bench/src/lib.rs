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
//! - **raw, cold**: what the launcher does, done by hand: a fresh private libvirtd
//!   in its own mount/UTS namespace with the launcher's configuration, then `createXML` of the
//!   XML the launcher would generate.
//! - **raw, warm**: `createXML` on a private daemon started once for the whole run.
//!
//! Both sides start their private daemons with the same QEMU capabilities cache, primed once per
//! run (the launcher's `--capabilities-cache`; libvirt re-probes a stale file by itself).
//!
//! Launcher and raw iterations are interleaved (rotating their order) and reported as medians.
//!
//! The program is this crate (dev-only, a member of the workspace); `benches/launcher.rs` is
//! its entry point for `cargo bench` and `tests/bench_smoke.rs` its smoke run. One file a
//! benchmark: `conversion.rs`, `start_stop.rs` (start, stop and memory with one guest),
//! `disks.rs` (the disks sweep), `running.rs` (hot-plug, control path, memory with 32
//! hot-plugged disks on a running VM), `migration.rs`, `density.rs` (N pods started at
//! once against N createXML on one shared daemon), `dropin.rs` (KubeVirt's protocol against
//! our own API on the same launcher) and `import.rs` (a DataVolume import against curl +
//! qemu-img); what they share: `pods.rs` (VMIs,
//! domain XML, the guest's console, the API client), `launcher_proc.rs` (the launcher as a
//! child), `raw.rs` (the raw libvirt daemons), `orphans.rs` (reaping raw QEMU processes),
//! `report.rs` (results, table, plot). The launcher harness it shares with the integration
//! tests is the `testkit` crate.
//!
//! To add a benchmark: write `fn bench_x(ctx: &mut Ctx) -> Result<()>` in a file of its own
//! that pushes [`Figure`]s with [`Ctx::figure`], list it in [`BENCHMARKS`], drop its ids from
//! [`NOT_YET_MEASURED`] and add them to `FIGURES` in `tests/bench_smoke.rs`.

mod conversion;
mod density;
mod disks;
mod dropin;
mod import;
mod launcher_proc;
mod migration;
mod orphans;
mod pods;
pub mod raw;
mod report;
mod running;
mod start_stop;

// What every file of the benchmark uses (`use crate::*`).
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
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
use testkit::procs::{
    find_qemu, kill_matching, kill_namespace, mount_ns, pids, pss_mib, rss_mib, status_mib,
};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use virt_launcher::convert::facts::{PodFacts, PodPaths};
use virt_launcher::domain::DomainType;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

use conversion::bench_conversion;
pub use conversion::Conversion;
pub use density::DensityPoint;
use disks::bench_disks;
use launcher_proc::*;
use orphans::*;
use pods::*;
use raw::*;
pub use report::*;
use start_stop::*;

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
    ("density (plot)", density::bench_density),
    ("drop-in path", dropin::bench_dropin),
    ("import", import::bench_import),
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
pub const CONVERSION_DISKS: [usize; 4] = [1, 13, 64, 256];
/// How long after the guest's first console line the memory is sampled.
const SETTLE: Duration = Duration::from_millis(500);
/// How long after the guest's first console line the start/stop benchmark stops a VM, on every
/// side. Not at [`SETTLE`]: the guest agent connects ~0.4 s after that line, and the launcher
/// (as KubeVirt's, which fills its cache as soon as the agent connects) then asks it nine
/// things in a row. A stop in the middle of that round waits for the guest to answer the
/// command in flight: ACPI → stopped took 297–353 ms by hand against 285–297 ms without the
/// polls, a cost of the agent round, not of the stop path (raw libvirt polls nothing). By
/// 2 s the round is over; the launcher sends no new agent command once it has pressed the
/// button.
const STOP_AFTER: Duration = Duration::from_secs(2);
/// The console line the test guest prints once it is up (scripts/guest-init.sh).
const READY_MARKER: &str = testkit::guest::READY;

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
    /// Defaults: the launcher binary `launcher` (the one cargo built for the bench or test
    /// calling this), the test guest in `.cache/guest` (or `$GUEST_DIR`), output in
    /// `<target>/bench`.
    pub fn defaults(launcher: &Path, quick: bool) -> Options {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| testkit::root().join("target"));
        Options {
            quick,
            launcher: launcher.to_path_buf(),
            guest_dir: testkit::guest::dir(),
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
    density: Vec<DensityPoint>,
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
    let work = testkit::fresh_dir(work).context("the benchmark's work directory")?;
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
        density: Vec::new(),
        load_during: Vec::new(),
    };
    let machine = machine();
    let reaper = OrphanReaper::start()?;
    prime_capabilities(&work, &opts.out_dir.join("qemu-capabilities"))?;
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
        density: std::mem::take(&mut ctx.density),
        density_plot: None,
        load_during: std::mem::take(&mut ctx.load_during),
        not_yet_measured: NOT_YET_MEASURED.to_vec(),
        plot: None,
        leftover_processes,
    };
    drop(ctx);
    if opts.plot && !report.disks.is_empty() {
        report.plot = plot(&report, &opts.out_dir)?;
    }
    if opts.plot && !report.density.is_empty() {
        report.density_plot = density::plot_density(&report, &opts.out_dir)?;
    }
    report.duration_s = began.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&report).context("serialise results")?;
    write(&opts.out_dir.join("results.json"), &json)?;
    let md = markdown(&report);
    write(&opts.out_dir.join("results.md"), &md)?;
    if let Some(doc) = &opts.update_doc {
        // The document shows the plot from its own folder (docs/disks.png), committed with it.
        let mut in_doc = report.clone();
        if let (Some(plot), Some(dir)) = (&report.plot, doc.parent()) {
            let committed = Path::new("docs/disks.png");
            fs::create_dir_all(dir.join("docs")).context("create docs/")?;
            fs::copy(plot, dir.join(committed)).context("copy the plot to docs/")?;
            in_doc.plot = Some(committed.to_path_buf());
        }
        if let (Some(plot), Some(dir)) = (&report.density_plot, doc.parent()) {
            let committed = Path::new("docs/density.png");
            fs::copy(plot, dir.join(committed)).context("copy the density plot to docs/")?;
            in_doc.density_plot = Some(committed.to_path_buf());
        }
        update_doc(doc, &markdown(&in_doc))?;
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
    for tool in ["libvirtd", "unshare", "qemu-system-x86_64"] {
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

/// The QEMU capabilities cache both sides start with (`--capabilities-cache` for the
/// launcher, copied into the raw daemons' private `/var/cache/libvirt`), primed once per run.
static CAPABILITIES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Fills the capabilities cache shared by both sides: a fresh raw daemon probes QEMU once
/// (`virConnectGetCapabilities`) and its cache file is kept. libvirt checks each file against
/// the QEMU binary, itself, the kernel and the CPU when it loads it, so a stale one from an
/// earlier run costs a probe in that daemon, never a wrong figure.
fn prime_capabilities(work: &Path, dir: &Path) -> Result<()> {
    let _ = CAPABILITIES.set(dir.to_path_buf());
    let root = work.join("caps");
    let (mut raw, _) = RawLibvirt::start(&root, "lvb-caps")?;
    raw.connect()?;
    let t = Instant::now();
    raw.conn
        .as_ref()
        .expect("connected")
        .capabilities()
        .map_err(|e| anyhow!("capabilities: {e}\n{}", raw.log_tail()))?;
    let probe = t.elapsed();
    raw.stop()?;
    let saved = virt_launcher::pod::capcache::save(&root.join(raw::CAPABILITIES_DIR), dir);
    progress(&format!(
        "QEMU capabilities: {} ms with the cache ({saved} file(s) updated)",
        fmt_num(ms(probe))
    ));
    Ok(())
}

fn progress(msg: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench: [{t:6.1} s] {msg}");
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

/// [`testkit::poll`] that also stops on Ctrl-C / SIGTERM.
fn poll<T>(
    deadline: Instant,
    every: Duration,
    mut step: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    testkit::poll(deadline, every, || match step()? {
        Some(v) => Ok(Some(v)),
        None => check_interrupt().map(|()| None),
    })
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

/// The benchmark command (`cargo bench --bench launcher -- --help`), `launcher` the default
/// launcher binary.
pub fn main(launcher: &Path) -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut opts = Options::defaults(launcher, false);
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
        opts.update_doc = Some(testkit::root().join("BENCHMARKS.md"));
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
