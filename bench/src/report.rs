//! The results: figures with their medians, ratios and goals; the machine; the Markdown
//! table, the JSON file, the plot and the results section of BENCHMARKS.md.

use crate::*;

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
    pub(crate) fn of(samples: &[f64]) -> Option<Stat> {
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
pub(crate) enum Goal {
    /// The launcher's value stays below this.
    Below(f64),
    /// launcher / raw stays at or below this.
    RatioAtMost(f64),
}

impl Goal {
    pub(crate) fn text(self, unit: &str) -> String {
        match self {
            Goal::Below(v) => format!("< {} {unit}", fmt_num(v)),
            Goal::RatioAtMost(r) => format!("ratio ≤ {r:.2}"),
        }
    }

    pub(crate) fn met(self, launcher: f64, ratio: Option<f64>) -> Option<bool> {
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
    /// Density: N VMs started at once, for each N.
    pub density: Vec<crate::DensityPoint>,
    pub density_plot: Option<PathBuf>,
    /// The load average at the start of each benchmark (other people's tests share the CPUs).
    pub load_during: Vec<LoadSample>,
    pub not_yet_measured: Vec<Planned>,
    pub plot: Option<PathBuf>,
    /// Processes of this run still alive at the end (killed then); should be empty.
    pub leftover_processes: Vec<String>,
}

pub(crate) fn machine() -> Machine {
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

pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first line of a command's output ("" if it fails).
pub(crate) fn command_line(cmd: &str, args: &[&str]) -> String {
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
pub(crate) fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(crate) fn cell(s: &Option<Stat>, unit: &str) -> String {
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

    if !r.density.is_empty() {
        o.push_str(
            "\n**Density: N VMs started at once** (one sample each; ms, and MiB per VM besides \
             its QEMU: a launcher pod is its launcher + its libvirtd, raw is one shared warm \
             daemon divided by N):\n\n",
        );
        o.push_str(
            "| VMs | launchers → all running | raw: N createXML | ratio | launcher pod RSS | \
             launcher pod PSS | raw daemon RSS / N | raw daemon PSS / N |\n",
        );
        o.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for p in &r.density {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
                p.vms,
                fmt_num(p.launcher_all_running_ms),
                fmt_num(p.raw_all_running_ms),
                p.launcher_all_running_ms / p.raw_all_running_ms.max(1e-9),
                p.launcher_per_vm_rss_mib,
                p.launcher_per_vm_pss_mib,
                p.raw_per_vm_rss_mib,
                p.raw_per_vm_pss_mib
            );
        }
        if let Some(p) = &r.density_plot {
            let _ = writeln!(o, "\n![density]({})", p.display());
        }
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
        let _ = writeln!(
            o,
            "\n![start time and RSS against the number of disks]({})",
            p.display()
        );
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
pub(crate) fn plot(r: &Report, out: &Path) -> Result<Option<PathBuf>> {
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
    Ok(gnuplot(&gp)?.then_some(png))
}

/// Runs gnuplot on the script `gp`; false when gnuplot is missing.
pub(crate) fn gnuplot(gp: &Path) -> Result<bool> {
    if !in_path("gnuplot") {
        progress("gnuplot not found: no plot (./devtool bench installs gnuplot-nox)");
        return Ok(false);
    }
    let out = Command::new("gnuplot")
        .arg(gp)
        .output()
        .context("run gnuplot")?;
    if !out.status.success() {
        bail!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(true)
}

pub(crate) const DOC_BEGIN: &str = "<!-- bench-results:begin -->";
pub(crate) const DOC_END: &str = "<!-- bench-results:end -->";

/// Replaces the part of `doc` between the result markers with `md`.
pub(crate) fn update_doc(doc: &Path, md: &str) -> Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        bail!("{} has no {DOC_BEGIN} … {DOC_END} section", doc.display());
    };
    let new = format!("{}{DOC_BEGIN}\n{md}{}", &text[..b], &text[e..]);
    write(doc, &new)
}

pub(crate) fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_goals_and_numbers() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]).expect("samples");
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert_eq!(Stat::of(&[4.0, 1.0, 9.0]).map(|s| s.median), Some(4.0));
        assert!(Stat::of(&[]).is_none());
        assert_eq!(Goal::RatioAtMost(1.1).met(5.0, Some(1.2)), Some(false));
        assert_eq!(Goal::RatioAtMost(1.1).met(5.0, None), None);
        assert_eq!(Goal::Below(15.0).met(9.3, None), Some(true));
        assert_eq!(Goal::Below(15.0).text("MiB"), "< 15.0 MiB");
        assert_eq!(
            [fmt_num(1234.5), fmt_num(12.34), fmt_num(0.1234)],
            ["1234", "12.3", "0.12"]
        );
    }
}
