//! Live migration: the launcher's Migrate between two launcher pods against a raw
//! `virsh migrate --live --p2p` between two raw private daemon pairs, same VMI and guest.
//!
//! Each side moves its VM back and forth; every migration goes to a **fresh** target, as a
//! migration always does with launcher pods (the target pod and its daemons are new): a new
//! launcher pod (prepared with PrepareMigrationTarget), or a new raw daemon pair in its own
//! mount/UTS namespace with its own hostname and host_uuid. Starting the target is set-up, not
//! measured. The VMI's claim is ReadWriteMany; both sides of one pair see it at the same path
//! (launcher pods share their PVC directory), and the guest counts on it (`lv.counter=vda`).

use super::pods::*;
use super::*;

use virt_launcher::api::pb;
use virt_launcher::vm::migration::rewrite_paths;

/// One raw daemon pair holding the VM, and its private directory (console log).
struct RawSide {
    raw: RawLibvirt,
    private: PathBuf,
}

/// Launcher and raw migrations, interleaved, in a full run: an even number, so that each side
/// goes first in half the pairs (the order alternates: L R, R L, L R, …).
const MIGRATION_PAIRS: usize = 12;
/// After a VM arrives, how long it runs before it moves again. The order above makes each side
/// migrate twice in a row; a VM sent on right after it arrived leaves a QEMU still busy
/// rebuilding its TCG translation cache, and those migrations showed 2–3× the downtime of
/// the others (on both sides).
const SETTLE_AFTER_ARRIVAL: Duration = Duration::from_secs(2);

pub(super) fn bench_migration(ctx: &mut Ctx) -> Result<()> {
    // Downtime under TCG on 2 shared cores varies 45–205 ms from one run to the next on either
    // side: more pairs than the other benchmarks, for steadier medians.
    let n = if ctx.opts.quick { 1 } else { MIGRATION_PAIRS };
    let name = ctx.name.clone();
    let dom_name = format!("default_{name}");
    let spec = VmiSpec {
        name: &name,
        disks: 1,
        kernel_args: "console=ttyS0 quiet lv.counter=vda",
        rwx: true,
        spare_root_ports: None,
        grace_seconds: 30,
        uid: None,
    };
    let rt = tokio_runtime()?;
    let timeout = start_timeout(1);

    // The launcher's source pod and the raw source pair boot at once (set-up).
    let shared = ctx.fresh_dir("mshared")?;
    let ldir = ctx.fresh_dir("ml")?;
    let lfiles = write_spec_pod(&ldir, &shared, &spec)?;
    let vmi_bytes = fs::read(&lfiles.vmi).context("read the VMI")?;
    let mut source = LauncherProc::spawn_with(
        ctx.opts,
        Some(&lfiles.vmi),
        &shared,
        None,
        &ldir.join("runtime"),
    )?;
    let mut source_dir = ldir;

    let rpvcs = ctx.fresh_dir("mrpvcs")?;
    let rdir = ctx.fresh_dir("mr")?;
    let rfiles = write_spec_pod(&rdir, &rpvcs, &spec)?;
    let private = rdir.join("private");
    let xml = domain_xml(&rfiles, &ctx.opts.guest_dir, &private)?;
    let (mut raw, _) = RawLibvirt::start(&rdir, "lvb-mig0")?;
    raw.connect()?;
    drop(raw.define_start(&xml)?);
    let mut rside = RawSide { raw, private };

    source.note_namespace();
    let lconsole = testkit::guest::console_log(&source_dir.join("runtime"));
    wait_console(&lconsole, Instant::now() + timeout, || source.check_alive())?;
    let rconsole = testkit::guest::console_in(&rside.private);
    wait_console(&rconsole, Instant::now() + timeout, || {
        rside.raw.check_alive()
    })?;
    source.wait_socket(Duration::from_secs(30))?;
    std::thread::sleep(SETTLE);
    progress("migration: both guests up");

    let (mut l_total, mut l_down, mut l_job) = (vec![], vec![], vec![]);
    let (mut r_total, mut r_down, mut r_job) = (vec![], vec![], vec![]);
    for i in 0..n {
        for step in 0..2 {
            check_interrupt()?;
            if (i + step) % 2 == 0 {
                let tdir = ctx.fresh_dir("ml")?;
                let mut target =
                    LauncherProc::spawn_with(ctx.opts, None, &shared, None, &tdir.join("runtime"))?;
                target.note_namespace();
                target.wait_socket(Duration::from_secs(60))?;
                let (total, result) = rt.block_on(launcher_migrate(
                    &source.socket(),
                    &target.socket(),
                    vmi_bytes.clone(),
                ))?;
                let p = result.progress.unwrap_or_default();
                if !result.success {
                    bail!(
                        "the launcher's migration failed: {}\n{}\n{}",
                        result.message,
                        source.log_tail(),
                        target.log_tail()
                    );
                }
                progress(&format!(
                    "{}/{n} launcher Migrate: {} ms, downtime {} ms (libvirt job {} ms)",
                    i + 1,
                    fmt_num(total),
                    p.downtime_ms,
                    p.elapsed_ms
                ));
                l_total.push(total);
                l_down.push(p.downtime_ms as f64);
                l_job.push(p.elapsed_ms as f64);
                // The source launcher exits once its VM has left; the guest counts on.
                source.wait_exit(Duration::from_secs(60))?;
                let console = testkit::guest::console_log(&tdir.join("runtime"));
                settle_on_target(&console, || target.check_alive())?;
                drop(std::mem::replace(&mut source, target));
                let _ = fs::remove_dir_all(std::mem::replace(&mut source_dir, tdir));
            } else {
                let tdir = ctx.fresh_dir("mr")?;
                let (mut traw, _) = RawLibvirt::start(&tdir, &format!("lvb-mig{}", i + 1))?;
                traw.connect()?;
                let target = RawSide {
                    raw: traw,
                    private: tdir.join("private"),
                };
                fs::create_dir_all(&target.private)?;
                let (total, down, job) = raw_migrate(&rside, &target, &dom_name, &tdir)?;
                progress(&format!(
                    "{}/{n} raw virsh migrate: {} ms, downtime {} ms (libvirt job {} ms)",
                    i + 1,
                    fmt_num(total),
                    fmt_num(down),
                    fmt_num(job)
                ));
                r_total.push(total);
                r_down.push(down);
                r_job.push(job);
                let console = testkit::guest::console_in(&target.private);
                let mut target = target;
                settle_on_target(&console, || target.raw.check_alive())?;
                let mut old = std::mem::replace(&mut rside, target);
                old.raw.stop()?;
                let _ = fs::remove_dir_all(&old.raw.root);
            }
        }
    }
    drop(rt);
    source.signal(Signal::SIGTERM)?;
    source.wait_exit(Duration::from_secs(60))?;
    drop(source);
    rside.raw.stop()?;
    let _ = fs::remove_dir_all(&rside.raw.root);
    drop(rside);
    let _ = fs::remove_dir_all(&source_dir);

    const SAME: &str = "the same VMI and guest (128 MiB, counting on its RWX disk), moved \
                        between two pods on this machine";
    ctx.figure(
        "migration.total",
        "live migration: total time (vs raw virsh migrate)",
        "ms",
        &l_total,
        "the Migrate call on the source launcher, to a fresh prepared target pod: target \
         check, migratable XML, peer-to-peer live migration over unix sockets, completed-job \
         statistics",
        Some((
            &r_total,
            "`virsh migrate --live --p2p --unsafe --persistent --xml <target paths>` to a fresh \
             raw pair, --migrateuri unix://…: the virsh process from spawn to exit",
        )),
        Some(Goal::RatioAtMost(1.1)),
    );
    ctx.figure(
        "migration.downtime",
        "live migration: downtime (vs raw virsh migrate)",
        "ms",
        &l_down,
        "MigrationResult.progress.downtime_ms: libvirt's completed-job statistics (downtime) \
         on the source; the launcher's default downtime limit (50 ms from the first pass, \
         doubling per pass up to 300 ms)",
        Some((
            &r_down,
            "`virsh domjobinfo --completed` on the source: Total downtime; QEMU's default \
             downtime limit (300 ms), as virsh migrate leaves it",
        )),
        Some(Goal::RatioAtMost(1.0)),
    );
    ctx.figure(
        "migration.job_elapsed",
        "live migration: libvirt's own job time (completed-job statistics)",
        "ms",
        &l_job,
        SAME,
        Some((
            &r_job,
            "`virsh domjobinfo --completed` on the source: Time elapsed",
        )),
        None,
    );
    Ok(())
}

/// PrepareMigrationTarget on `target`, then Migrate on `source`; returns the Migrate call's
/// duration (ms) and its result.
async fn launcher_migrate(
    source: &Path,
    target: &Path,
    vmi: Vec<u8>,
) -> Result<(f64, pb::MigrationResult)> {
    let mut t = connect(target).await?;
    t.prepare_migration_target(pb::PrepareMigrationTargetRequest {
        vmi,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("PrepareMigrationTarget: {e}"))?;
    drop(t);
    let mut c = connect(source).await?;
    let req = pb::MigrateRequest {
        target_socket: target.display().to_string(),
        options: Some(pb::MigrationOptions::default()),
    };
    let t0 = Instant::now();
    let r = c
        .migrate(req)
        .await
        .map_err(|e| anyhow!("Migrate: {e}"))?
        .into_inner();
    Ok((ms(t0.elapsed()), r))
}

/// `virsh migrate` from `from` to `to` (the launcher's flags: live, peer-to-peer, unsafe,
/// persistent on the target, the target's private paths in the destination XML); returns
/// total, downtime and libvirt's job time in ms.
fn raw_migrate(
    from: &RawSide,
    to: &RawSide,
    dom_name: &str,
    tdir: &Path,
) -> Result<(f64, f64, f64)> {
    let conn = from
        .raw
        .conn
        .as_ref()
        .ok_or_else(|| anyhow!("not connected"))?;
    let dom = conn
        .lookup_domain_by_name(dom_name)
        .map_err(|e| anyhow!("lookup {dom_name}: {e}"))?;
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
        .map_err(|e| anyhow!("migratable XML: {e}"))?;
    drop(dom);
    let dest_xml = rewrite_paths(
        &xml,
        &[(
            from.private.display().to_string(),
            to.private.display().to_string(),
        )],
    );
    let xml_file = tdir.join("dest.xml");
    write(&xml_file, &dest_xml)?;
    let mig_uri = format!("unix://{}", tdir.join("migration.sock").display());
    let mut cmd = Command::new("virsh");
    cmd.arg("-c")
        .arg(from.raw.uri())
        .args([
            "migrate",
            "--live",
            "--p2p",
            "--unsafe",
            "--persistent",
            "--xml",
        ])
        .arg(&xml_file)
        .arg(dom_name)
        .arg(to.raw.uri())
        .arg("--migrateuri")
        .arg(&mig_uri);
    let t0 = Instant::now();
    let out = run_known(&mut cmd)?;
    let total = ms(t0.elapsed());
    if !out.status.success() {
        bail!(
            "virsh migrate failed ({}): {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            from.raw.log_tail(),
            to.raw.log_tail()
        );
    }
    let out = run_known(Command::new("virsh").arg("-c").arg(from.raw.uri()).args([
        "domjobinfo",
        "--completed",
        dom_name,
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no {key:?} in `virsh domjobinfo --completed`:\n{text}"))
    };
    Ok((total, field("Total downtime:")?, field("Time elapsed:")?))
}

/// Waits until the guest counts on the target (its console at `console`), then lets it settle.
fn settle_on_target(console: &Path, alive: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_marker(
        console,
        "LV-COUNT",
        deadline,
        Duration::from_millis(20),
        alive,
    )?;
    std::thread::sleep(SETTLE_AFTER_ARRIVAL);
    Ok(())
}
