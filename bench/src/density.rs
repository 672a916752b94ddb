//! Benchmark: density. N launchers (N pods) started at once against N `createXML` on one
//! shared warm raw daemon: the time until every domain runs, and what each VM costs besides
//! its guest (QEMU excluded on both sides). For 1, 4, 8 and 16 VMs (quick: 1 and 2), plotted.
//!
//! Memory is reported as RSS and as PSS. RSS counts each pod's libvirt libraries in full;
//! PSS splits the pages the pods share (the same files through the page cache, as pods of
//! one image on one node share them), which is what a node pays per extra VM.

use crate::*;

/// One density round's result.
#[derive(Debug, Clone, Serialize)]
pub struct DensityPoint {
    pub vms: usize,
    /// Spawn of the first launcher → the last `domain running`.
    pub launcher_all_running_ms: f64,
    /// The first `createXML` call → the last one returned (all calls in parallel).
    pub raw_all_running_ms: f64,
    /// Per VM: its launcher + its libvirtd.
    pub launcher_per_vm_rss_mib: f64,
    pub launcher_per_vm_pss_mib: f64,
    /// Per VM: the shared daemon divided by the VMs it runs.
    pub raw_per_vm_rss_mib: f64,
    pub raw_per_vm_pss_mib: f64,
}

fn sizes(quick: bool) -> &'static [usize] {
    if quick {
        &[1, 2]
    } else {
        &[1, 4, 8, 16]
    }
}

pub(crate) fn bench_density(ctx: &mut Ctx) -> Result<()> {
    // The shared daemon's first domain start is not a sample (it loads what a warm daemon
    // has loaded).
    raw_warm_once(ctx, 1, WarmStop::DestroyAtOnce)?;
    let mut points = Vec::new();
    for &n in sizes(ctx.opts.quick) {
        check_interrupt()?;
        let (l_ms, l_rss, l_pss) = launchers_at_once(ctx, n)?;
        check_interrupt()?;
        let (r_ms, r_rss, r_pss) = raw_at_once(ctx, n)?;
        progress(&format!(
            "{n} VMs: launchers all running {} ms (raw {} ms); per VM besides QEMU: launcher pod \
             RSS {l_rss:.1} / PSS {l_pss:.1} MiB, raw daemon share RSS {r_rss:.1} / PSS {r_pss:.1} MiB",
            fmt_num(l_ms),
            fmt_num(r_ms)
        ));
        points.push(DensityPoint {
            vms: n,
            launcher_all_running_ms: l_ms,
            raw_all_running_ms: r_ms,
            launcher_per_vm_rss_mib: l_rss,
            launcher_per_vm_pss_mib: l_pss,
            raw_per_vm_rss_mib: r_rss,
            raw_per_vm_pss_mib: r_pss,
        });
    }
    let last = points.last().expect("at least one size").clone();
    ctx.figure(
        "density.all_running",
        "density: N VMs started at once → all running (N = the largest size)",
        "ms",
        &[last.launcher_all_running_ms],
        "N launchers spawned together → the last logs `domain running`",
        Some((
            &[last.raw_all_running_ms],
            "N createXML in parallel on one warm shared daemon",
        )),
        Some(Goal::RatioAtMost(1.3)),
    );
    ctx.figure(
        "density.per_vm_pss",
        "density: memory per VM besides its QEMU, PSS (N = the largest size)",
        "MiB",
        &[last.launcher_per_vm_pss_mib],
        "its launcher + its libvirtd",
        Some((&[last.raw_per_vm_pss_mib], "the shared daemon's PSS / N")),
        Some(Goal::Below(25.0)),
    );
    ctx.density = points;
    Ok(())
}

/// A VMI with one small disk, named apart from every other pod of the round, with a one-second
/// grace period: a guest still booting when the round ends is destroyed after it.
fn density_pod(ctx: &mut Ctx, tag: &str, i: usize) -> Result<(PathBuf, PodFiles, String)> {
    let dir = ctx.fresh_dir(tag)?;
    let name = format!("{}n{i}", ctx.name);
    let spec = VmiSpec {
        grace_seconds: 1,
        // Each VM its own UUID: the raw side runs them all on one daemon.
        uid: Some(format!(
            "0c9f7a6e-0000-4000-8001-{:04x}{:08x}",
            i,
            std::process::id()
        )),
        ..VmiSpec::plain(&name, 1)
    };
    let files = write_spec_pod(&dir, &dir.join("pvcs"), &spec)?;
    Ok((dir, files, name))
}

/// `n` launchers spawned one right after the other; (all running ms, per-VM RSS, per-VM PSS).
fn launchers_at_once(ctx: &mut Ctx, n: usize) -> Result<(f64, f64, f64)> {
    let mut made = Vec::new();
    for i in 0..n {
        made.push(density_pod(ctx, "dl", i)?);
    }
    let timeout = start_timeout(1) * n as u32;
    let t0 = Instant::now();
    let mut pods = Vec::new();
    for (dir, files, _) in &made {
        pods.push(LauncherProc::spawn(ctx.opts, files, &dir.join("runtime"))?);
    }
    let mut last = t0;
    for pod in &mut pods {
        let (running, _) = pod.wait_line(|v| message(v) == "domain running", timeout)?;
        last = last.max(running);
    }
    let all_running = ms(last - t0);
    std::thread::sleep(SETTLE);
    let (mut rss, mut pss) = (0.0, 0.0);
    for (pod, (dir, ..)) in pods.iter().zip(&made) {
        let libvirtd = testkit::launcher::daemon_pid(&dir.join("runtime"), "libvirtd")?;
        // The pod's processes: the launcher (not the standalone waiter in front of its PID
        // namespace, which a pod does not have) and its libvirtd.
        let launcher = pod.launcher_pid();
        rss += rss_mib(launcher)? + rss_mib(libvirtd)?;
        pss += pss_mib(launcher)? + pss_mib(libvirtd)?;
    }
    for pod in &pods {
        pod.signal(Signal::SIGTERM)?;
    }
    for pod in &mut pods {
        pod.wait_exit(Duration::from_secs(90))?;
    }
    drop(pods);
    for (dir, ..) in made {
        let _ = fs::remove_dir_all(dir);
    }
    Ok((all_running, rss / n as f64, pss / n as f64))
}

/// `n` createXML calls in parallel on the shared warm daemon; (all running ms, per-VM RSS and
/// PSS of the daemon).
fn raw_at_once(ctx: &mut Ctx, n: usize) -> Result<(f64, f64, f64)> {
    let mut xmls = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let (dir, files, _) = density_pod(ctx, "dr", i)?;
        xmls.push(domain_xml(
            &files,
            &ctx.opts.guest_dir,
            &dir.join("private"),
        )?);
        dirs.push(dir);
    }
    let warm = ctx.warm()?;
    let conn = warm.conn.as_ref().ok_or_else(|| anyhow!("not connected"))?;
    let t0 = Instant::now();
    let created: Vec<Result<Domain>> = std::thread::scope(|s| {
        let calls: Vec<_> = xmls
            .iter()
            .map(|xml| {
                s.spawn(move || {
                    conn.create_domain_xml(xml, 0)
                        .map_err(|e| anyhow!("createXML: {e}"))
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| Err(anyhow!("createXML panicked")))
            })
            .collect()
    });
    let all_running = ms(t0.elapsed());
    let doms = created
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .map_err(|e| anyhow!("{e}\n{}", warm.log_tail()))?;
    std::thread::sleep(SETTLE);
    let daemon = warm.pid(RawDaemon::Libvirtd)?;
    let (rss, pss) = (rss_mib(daemon)?, pss_mib(daemon)?);
    for d in doms {
        d.destroy().context("destroy")?;
    }
    for dir in dirs {
        let _ = fs::remove_dir_all(dir);
    }
    Ok((all_running, rss / n as f64, pss / n as f64))
}

/// `density.png`: both sides' time to all running, and the memory per VM, against N.
pub(crate) fn plot_density(r: &Report, out: &Path) -> Result<Option<PathBuf>> {
    let mut dat = String::from(
        "# vms launcher_all_running_ms raw_all_running_ms launcher_rss raw_rss launcher_pss raw_pss\n",
    );
    for p in &r.density {
        let _ = writeln!(
            dat,
            "{} {:.1} {:.1} {:.2} {:.2} {:.2} {:.2}",
            p.vms,
            p.launcher_all_running_ms,
            p.raw_all_running_ms,
            p.launcher_per_vm_rss_mib,
            p.raw_per_vm_rss_mib,
            p.launcher_per_vm_pss_mib,
            p.raw_per_vm_pss_mib
        );
    }
    let dat_path = out.join("density.dat");
    write(&dat_path, &dat)?;
    let png = out.join("density.png");
    let xtics = r
        .density
        .iter()
        .map(|p| p.vms.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        "set terminal pngcairo size 1100,480 font ',10'\n\
         set output '{png}'\n\
         set multiplot layout 1,2 title 'density: N VMs started at once, TCG test guest, {date}'\n\
         set grid\nset key top left\nset offsets 0, 0, graph 0.3, 0\n\
         set xlabel 'VMs (pods)'\nset xtics ({xtics})\nset yrange [0:*]\n\
         set ylabel 'ms'\nset title 'start → every domain running'\n\
         plot '{dat}' using 1:2 with linespoints lw 2 title 'N launchers (N pods)', \
              '' using 1:3 with linespoints title 'raw: N createXML on one warm daemon'\n\
         set ylabel 'MiB per VM'\nset title 'memory per VM besides its QEMU'\n\
         plot '{dat}' using 1:4 with linespoints lw 2 title 'launcher pod RSS', \
              '' using 1:6 with linespoints lw 2 title 'launcher pod PSS', \
              '' using 1:5 with linespoints title 'raw daemon RSS / N', \
              '' using 1:7 with linespoints title 'raw daemon PSS / N', \
              25 with lines dashtype 2 title 'goal: 25 MiB'\n\
         unset multiplot\n",
        png = png.display(),
        dat = dat_path.display(),
        date = r.date,
    );
    let gp = out.join("density.gp");
    write(&gp, &script)?;
    Ok(gnuplot(&gp)?.then_some(png))
}
