//! A short smoke run of the benchmark command (`./devtool bench --quick`): one iteration of each
//! side and few disks, with real launcher runs, real raw libvirt daemons and real TCG guests.
//! It checks that the run produces well-formed results with every figure present and positive;
//! the figures' values are never pass/fail. The benchmark is the `launcher-bench` crate
//! (`bench/`), run here on the launcher binary cargo built for the tests.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

/// Every figure the benchmark measures today, and whether the launcher has a value for it
/// (raw libvirt must have one whenever the figure names what raw libvirt does).
const FIGURES: &[(&str, bool)] = &[
    ("convert.disks_1", true),
    ("convert.disks_13", true),
    ("convert.disks_64", true),
    ("convert.disks_256", true),
    ("start.running", true),
    ("start.console", true),
    ("start.daemons", true),
    ("start.define_start", true),
    ("start.own", true),
    ("start.running_warm", true),
    ("start.console_warm", true),
    ("stop.acpi", true),
    ("stop.exit", true),
    ("stop.destroy", false),
    ("memory.launcher", true),
    ("memory.pod_total", true),
    ("memory.pod_besides_qemu", true),
    ("memory.pod_besides_qemu_pss", true),
    ("memory.qemu_overhead", true),
    ("hotplug.attached", true),
    ("hotplug.guest_visible", true),
    ("memory.hotplug_32", true),
    ("memory.hotplug_32_pss", true),
    ("control.getdomain_rps", true),
    ("control.getdomain_p99", true),
    ("migration.total", true),
    ("migration.downtime", true),
    ("migration.job_elapsed", true),
    ("density.all_running", true),
    ("density.per_vm_pss", true),
    ("dropin.sync_running", true),
    ("dropin.sync_running_late", true),
    ("dropin.notify_pause", true),
    ("import.http_qcow2", true),
];

fn positive(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)
}

fn check_stat(fig: &str, side: &str, s: &Value) {
    assert!(
        positive(&s["median"]),
        "{fig}: {side} median not positive: {s}"
    );
    assert!(
        s["n"].as_u64().is_some_and(|n| n >= 1),
        "{fig}: {side} has no samples: {s}"
    );
    let samples = s["samples"].as_array().expect("samples");
    assert!(samples.iter().all(positive), "{fig}: {side} samples: {s}");
}

#[test]
fn quick_bench_run_writes_every_figure() {
    let out = std::env::temp_dir().join(format!("lvb-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut opts =
        launcher_bench::Options::defaults(Path::new(env!("CARGO_BIN_EXE_virt-launcher")), true);
    opts.out_dir = out.clone();

    let t = Instant::now();
    if let Err(e) = launcher_bench::run(&opts) {
        panic!("the quick benchmark run failed: {e:#}");
    }
    eprintln!("quick benchmark run took {:?}", t.elapsed());

    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&text).expect("results.json is JSON");
    assert_eq!(r["quick"], true);
    assert!(positive(&r["duration_s"]));
    assert!(r["machine"]["cpus"].as_u64().is_some_and(|n| n > 0));

    let figures = r["figures"].as_array().expect("figures");
    for (id, launcher) in FIGURES {
        let f = figures
            .iter()
            .find(|f| f["id"] == *id)
            .unwrap_or_else(|| panic!("figure {id} missing from results.json"));
        if *launcher {
            check_stat(id, "launcher", &f["launcher"]);
        }
        if !f["raw_does"].is_null() {
            check_stat(id, "raw", &f["raw"]);
        }
        if *launcher && !f["raw_does"].is_null() {
            assert!(positive(&f["ratio"]), "{id}: no ratio");
        }
        if !f["goal"].is_null() {
            assert!(f["goal_met"].is_boolean(), "{id}: goal without a verdict");
        }
    }
    // Nothing is measured that the test does not know about (a new figure belongs in FIGURES).
    assert_eq!(figures.len(), FIGURES.len(), "figures: {figures:#?}");

    let memory = r["memory"].as_array().expect("memory");
    for process in ["virt-launcher", "libvirtd", "qemu-system-x86_64", "total"] {
        let row = memory
            .iter()
            .find(|m| m["process"] == process)
            .unwrap_or_else(|| panic!("no memory row for {process}"));
        assert!(positive(&row["launcher_pod_mib"]), "{row}");
        if process != "virt-launcher" {
            assert!(positive(&row["raw_libvirt_mib"]), "{row}");
        }
    }

    let disks = r["disks"].as_array().expect("disks");
    assert!(
        disks.len() >= 2,
        "the disks sweep needs two points: {disks:#?}"
    );
    for p in disks {
        for (k, v) in p.as_object().expect("point") {
            assert!(positive(v), "disks point {k}: {p}");
        }
    }
    let conversion = r["conversion"].as_array().expect("conversion");
    assert_eq!(conversion.len(), 4);
    for c in conversion {
        for (k, v) in c.as_object().expect("row") {
            assert!(positive(v), "conversion {k}: {c}");
        }
    }

    // Every promised figure is measured or listed as not yet measured.
    let planned: Vec<&str> = r["not_yet_measured"]
        .as_array()
        .expect("not_yet_measured")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    for prefix in ["hotplug.", "migration.", "control.", "memory.hotplug"] {
        assert!(
            planned.iter().any(|p| p.starts_with(prefix))
                || figures
                    .iter()
                    .any(|f| f["id"].as_str().is_some_and(|id| id.starts_with(prefix))),
            "{prefix}* is neither measured nor listed as not yet measured"
        );
    }
    let hotplug_memory = r["hotplug_memory"].as_array().expect("hotplug_memory");
    assert_eq!(hotplug_memory.len(), 4, "{hotplug_memory:#?}");
    for row in hotplug_memory {
        assert!(positive(&row["after_boot_mib"]), "{row}");
        assert!(positive(&row["with_32_hotplugged_mib"]), "{row}");
    }
    assert!(
        r["load_during"].as_array().is_some_and(|l| !l.is_empty()),
        "no load average recorded"
    );

    assert_eq!(
        r["leftover_processes"].as_array().map(Vec::len),
        Some(0),
        "the benchmark left processes behind: {}",
        r["leftover_processes"]
    );

    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(md.contains("| figure | launcher | raw libvirt | ratio | goal | met? |"));
    assert!(md.contains("hot-plugged"));
    let _ = std::fs::remove_dir_all(&out);
}
