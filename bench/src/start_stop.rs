//! Benchmark: start, stop and memory with one guest, the launcher against raw libvirt cold
//! (fresh daemons) and warm (running daemons); and one iteration of each side, which the disks
//! sweep runs too.

use crate::*;

/// One launcher run: spawn → guest up → SIGTERM → exit.
#[derive(Debug, Clone)]
pub(crate) struct LauncherRun {
    pub(crate) to_daemons_ms: f64,
    pub(crate) define_start_ms: f64,
    pub(crate) to_running_ms: f64,
    pub(crate) to_console_ms: f64,
    pub(crate) own_ms: f64,
    pub(crate) rss: PodRss,
    pub(crate) stop_acpi_ms: f64,
    pub(crate) stop_exit_ms: f64,
}

/// One raw cold run: fresh daemons → createXML → guest up → ACPI → shut off → daemons stopped.
#[derive(Debug, Clone)]
pub(crate) struct RawColdRun {
    pub(crate) daemons_ms: f64,
    pub(crate) create_ms: f64,
    pub(crate) to_running_ms: f64,
    pub(crate) to_console_ms: f64,
    pub(crate) rss: PodRss,
    pub(crate) stop_acpi_ms: f64,
    pub(crate) stop_exit_ms: f64,
}

/// One raw warm run: createXML on the long-lived daemons → guest up → (ACPI | destroy).
#[derive(Debug, Clone)]
pub(crate) struct RawWarmRun {
    pub(crate) create_ms: f64,
    pub(crate) to_console_ms: Option<f64>,
    pub(crate) stop_ms: f64,
}

/// RSS in MiB; `launcher` is 0 for raw libvirt.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PodRss {
    pub(crate) launcher: f64,
    /// The launcher's anonymous memory (heap, stacks); the rest of its RSS is file-backed
    /// (its binary and the shared libraries, libvirt's among them).
    pub(crate) launcher_anon: f64,
    /// The launcher's proportional set size: shared pages split among the processes mapping
    /// them (libvirtd maps the same libvirt libraries).
    pub(crate) launcher_pss: f64,
    pub(crate) libvirtd: f64,
    /// libvirtd's anonymous memory; the rest of its RSS is its binary and ~60 shared
    /// libraries (file-backed, shared with every other pod's daemon through the page cache).
    pub(crate) libvirtd_anon: f64,
    pub(crate) libvirtd_pss: f64,
    pub(crate) qemu: f64,
}

/// The test guest's memory (`testkit::vmi`: `resources.requests.memory: 128Mi`), the part of
/// QEMU's RSS that is the guest's own.
const GUEST_MEMORY_MIB: f64 = 128.0;

impl PodRss {
    pub(crate) fn total(&self) -> f64 {
        self.launcher + self.libvirtd + self.qemu
    }

    /// Everything in the pod but QEMU: what the pod costs besides the VM itself.
    pub(crate) fn besides_qemu(&self) -> f64 {
        self.launcher + self.libvirtd
    }

    /// QEMU's RSS beyond the guest's memory (device models, TCG's translation cache, its
    /// libraries). The guest's pages count in full although a small guest has not touched them
    /// all, so this is the least QEMU adds.
    pub(crate) fn qemu_overhead(&self) -> f64 {
        self.qemu - GUEST_MEMORY_MIB
    }
}

pub(crate) type RssField = fn(&PodRss) -> f64;

#[derive(Clone, Copy)]
pub(crate) enum WarmStop {
    /// Boot, then press the ACPI power button.
    Acpi,
    /// Boot, then destroy.
    Destroy,
    /// Destroy right after createXML returned (only the create time counts).
    DestroyAtOnce,
}

pub(crate) fn bench_lifecycle(ctx: &mut Ctx) -> Result<()> {
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
                           libvirtd start, connect, define + start)";
    const COLD: &str = "fresh private libvirtd (namespace, configs) started, \
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
            "unshare + binds + libvirtd, until the socket accepts",
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
        "SIGTERM → process exit: guest off, libvirtd stopped",
        Some((
            &cv(|r| r.stop_exit_ms),
            "ACPI shutdown → shut off, then SIGTERM libvirtd and wait for it",
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
        "memory: whole pod RSS (launcher + libvirtd + QEMU)",
        "MiB",
        &lv(|r| r.rss.total()),
        "sum of VmRSS of the launcher, its libvirtd and QEMU",
        Some((
            &cv(|r| r.rss.total()),
            "libvirtd + QEMU of a cold raw daemon with one guest, sampled likewise",
        )),
        None,
    );
    ctx.figure(
        "memory.pod_besides_qemu",
        "memory: everything in the pod but QEMU (launcher + libvirtd RSS), 1 running guest",
        "MiB",
        &lv(|r| r.rss.besides_qemu()),
        "VmRSS of the launcher + its libvirtd, 0.5 s after LV-READY",
        None,
        Some(Goal::Below(25.0)),
    );
    ctx.figure(
        "memory.pod_besides_qemu_pss",
        "memory: everything in the pod but QEMU, PSS (shared pages split with QEMU and other pods)",
        "MiB",
        &lv(|r| r.rss.launcher_pss + r.rss.libvirtd_pss),
        "Pss of the launcher + its libvirtd, sampled likewise",
        None,
        None,
    );
    ctx.figure(
        "memory.qemu_overhead",
        "memory: QEMU's RSS beyond the guest's 128 MiB (TCG)",
        "MiB",
        &lv(|r| r.rss.qemu_overhead()),
        "VmRSS of QEMU minus the guest's memory size",
        Some((
            &cv(|r| r.rss.qemu_overhead()),
            "the same for the cold raw daemon's QEMU",
        )),
        None,
    );
    let rows: [(&'static str, RssField); 11] = [
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
        ("libvirtd: anonymous (heap, stacks)", |r| r.libvirtd_anon),
        ("libvirtd: file-backed (binary, shared libraries)", |r| {
            r.libvirtd - r.libvirtd_anon
        }),
        ("libvirtd: PSS (shared pages split)", |r| r.libvirtd_pss),
        ("everything but QEMU (launcher + libvirtd)", |r| {
            r.besides_qemu()
        }),
        ("qemu-system-x86_64", |r| r.qemu),
        ("qemu-system-x86_64 beyond the guest's 128 MiB", |r| {
            r.qemu_overhead()
        }),
    ];
    for (process, f) in rows {
        let lm = Stat::of(&l.iter().map(|r| f(&r.rss)).collect::<Vec<_>>()).map(|s| s.median);
        let rm = Stat::of(&c.iter().map(|r| f(&r.rss)).collect::<Vec<_>>()).map(|s| s.median);
        ctx.memory.push(MemoryRow {
            process,
            launcher_pod_mib: lm,
            raw_libvirt_mib: rm.filter(|_| {
                !process.starts_with("virt-launcher") && !process.starts_with("everything")
            }),
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

pub(crate) fn launcher_once(ctx: &mut Ctx, disks: usize) -> Result<LauncherRun> {
    let dir = ctx.fresh_dir("l")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let runtime = dir.join("runtime");
    let console = testkit::guest::console_log(&runtime);
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

    let libvirtd = testkit::launcher::daemon_pid(&runtime, "libvirtd")?;
    let qemu = find_qemu(&ctx.name, &mount_ns(libvirtd)?)?;
    // The launcher itself, not the waiter in front of its PID namespace.
    let launcher = pod.launcher_pid();
    let rss = PodRss {
        launcher: rss_mib(launcher)?,
        launcher_anon: status_mib(launcher, "RssAnon")?,
        launcher_pss: pss_mib(launcher)?,
        libvirtd: rss_mib(libvirtd)?,
        libvirtd_anon: status_mib(libvirtd, "RssAnon")?,
        libvirtd_pss: pss_mib(libvirtd)?,
        qemu: rss_mib(qemu)?,
    };

    std::thread::sleep(STOP_AFTER - SETTLE);
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

pub(crate) fn raw_cold_once(ctx: &mut Ctx, disks: usize) -> Result<RawColdRun> {
    let dir = ctx.fresh_dir("c")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let private = dir.join("private");
    let xml = domain_xml(&files, &ctx.opts.guest_dir, &private)?;
    let console = testkit::guest::console_in(&private);
    let timeout = start_timeout(disks);

    let t0 = Instant::now();
    let (mut raw, daemons) = RawLibvirt::start(&dir, "lvb-cold")?;
    raw.connect()?;
    let (dom, create) = raw.create(&xml)?;
    let to_running = t0.elapsed();
    let booted = wait_console(&console, t0 + timeout, || raw.check_alive())?;
    std::thread::sleep(SETTLE);
    let libvirtd = raw.pid(RawDaemon::Libvirtd)?;
    let rss = PodRss {
        launcher: 0.0,
        launcher_anon: 0.0,
        launcher_pss: 0.0,
        libvirtd: rss_mib(libvirtd)?,
        libvirtd_anon: status_mib(libvirtd, "RssAnon")?,
        libvirtd_pss: pss_mib(libvirtd)?,
        qemu: rss_mib(find_qemu(&ctx.name, &raw.mnt_ns)?)?,
    };

    std::thread::sleep(STOP_AFTER - SETTLE);
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

pub(crate) fn raw_warm_once(ctx: &mut Ctx, disks: usize, stop: WarmStop) -> Result<RawWarmRun> {
    let dir = ctx.fresh_dir("w")?;
    let files = write_pod(&dir, &ctx.name, disks)?;
    let private = dir.join("private");
    let xml = domain_xml(&files, &ctx.opts.guest_dir, &private)?;
    let console = testkit::guest::console_in(&private);
    let timeout = start_timeout(disks);
    let warm = ctx.warm()?;

    let t0 = Instant::now();
    let (dom, create) = warm.create(&xml)?;
    let mut to_console_ms = None;
    if !matches!(stop, WarmStop::DestroyAtOnce) {
        let booted = wait_console(&console, t0 + timeout, || warm.check_alive())?;
        to_console_ms = Some(ms(booted - t0));
        std::thread::sleep(STOP_AFTER);
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
