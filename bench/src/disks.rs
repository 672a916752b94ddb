//! Benchmark: start time and RSS against the number of disks (the plot).

use crate::*;

pub(crate) fn bench_disks(ctx: &mut Ctx) -> Result<()> {
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
