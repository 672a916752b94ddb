//! Benchmarks on one running VM per side, driven through the control API:
//!
//! - control path: GetDomain from 50 concurrent clients (one connection each) against 50
//!   threads calling `virDomainGetState` + `virDomainGetXMLDesc` on a raw daemon (there is no
//!   raw GetDomain; that pair is what a controller would otherwise call);
//! - hot-plug: Sync → volume Ready, and → the guest lists the disk, against raw
//!   `virDomainAttachDeviceFlags(LIVE | CONFIG)` of the same `<disk>` XML;
//! - memory: the launcher's RSS and PSS once 32 disks are hot-plugged.
//!
//! The launcher pod and the raw domain boot from the same VMI (one 1 MiB PVC, 32 spare
//! `pcie-root-port`s); each hot-plugged disk has its own size so that the guest's `LV-BLOCK`
//! lines tell the disks apart. The hot-plug samples are taken on [`HOTPLUG_PAIRS`] such pairs
//! in turn ([`HOTPLUG_SAMPLES`] virtio disks each); the control path and memory on the first.

use super::pods::*;
use super::*;

use virt_launcher::api::client;
use virt_launcher::api::pb;

/// Disks hot-plugged into the launcher's VM before its memory is measured.
const HOTPLUG_TOTAL: usize = 32;
/// Hot-plug samples per side and VM pair, each a new virtio disk.
const HOTPLUG_SAMPLES: usize = 24;
/// VM pairs the hot-plug samples are taken on (one after the other). A libvirt attach varies
/// by ±40 % from one sample to the next here (10–40 ms), on either side, and when the guest
/// sees a new disk falls into two modes ~45 ms apart: with 8 samples the ratio of the medians
/// swung 0.94–1.24 between runs of the same code, with 24 still 1.05–1.23.
const HOTPLUG_PAIRS: usize = 2;
/// Spare `pcie-root-port`s in the VMI (the launcher's annotation): 32, the most the launcher
/// accepts. The domain's own PCIe devices take 4 of them, which leaves 28 for the virtio
/// hot-plug samples; the rest of the 32 disks go on virtio-scsi.
const SPARE_ROOT_PORTS: u32 = 32;
/// Concurrent control-path clients.
const CLIENTS: usize = 50;

/// Each hot-plugged disk `hp<i>` is `i + 2` MiB (the boot disk is 1 MiB).
fn hotplug_sectors(i: usize) -> u64 {
    (i as u64 + 2) * 2048
}

/// One launcher pod and one raw domain booted from the same VMI, with what the hot-plug
/// samples need of each.
struct Pair {
    pod: LauncherProc,
    ldir: PathBuf,
    lhot: PathBuf,
    lconsole: PathBuf,
    raw: RawLibvirt,
    dom: virt::domain::Domain,
    rdir: PathBuf,
    rfiles: PodFiles,
    rhot: PathBuf,
    rprivate: PathBuf,
    rconsole: PathBuf,
}

impl Pair {
    /// A fresh directory `<tag><n>` with the VMI, its PVCs and a hot-plug directory.
    fn pod_dir(ctx: &mut Ctx, tag: &str, spec: &VmiSpec) -> Result<(PathBuf, PodFiles, PathBuf)> {
        let dir = ctx.fresh_dir(tag)?;
        let files = write_spec_pod(&dir, &dir.join("pvcs"), spec)?;
        let hot = dir.join("hotplug");
        fs::create_dir_all(&hot)?;
        Ok((dir, files, hot))
    }

    /// Boots both VMs at once (set-up, not measured) and waits until both guests are up.
    fn boot(ctx: &mut Ctx, spec: &VmiSpec, raw_name: &str) -> Result<Pair> {
        let (ldir, lfiles, lhot) = Pair::pod_dir(ctx, "hl", spec)?;
        let lruntime = ldir.join("runtime");
        let lconsole = testkit::guest::console_log(&lruntime);
        let mut pod = LauncherProc::spawn_with(
            ctx.opts,
            Some(&lfiles.vmi),
            &lfiles.pvcs,
            Some(&lhot),
            &lruntime,
        )?;

        let (rdir, rfiles, rhot) = Pair::pod_dir(ctx, "hr", spec)?;
        let rprivate = rdir.join("private");
        let rconsole = testkit::guest::console_in(&rprivate);
        let xml = domain_xml_with(&rfiles, &ctx.opts.guest_dir, &rprivate, Some(&rhot))?;
        let (mut raw, _) = RawLibvirt::start(&rdir, raw_name)?;
        raw.connect()?;
        let dom = raw.define_start(&xml)?;

        let timeout = start_timeout(HOTPLUG_TOTAL);
        pod.note_namespace();
        wait_console(&lconsole, Instant::now() + timeout, || pod.check_alive())?;
        wait_console(&rconsole, Instant::now() + timeout, || raw.check_alive())?;
        pod.wait_socket(Duration::from_secs(30))?;
        std::thread::sleep(SETTLE);
        Ok(Pair {
            pod,
            ldir,
            lhot,
            lconsole,
            raw,
            dom,
            rdir,
            rfiles,
            rhot,
            rprivate,
            rconsole,
        })
    }

    /// Stops both sides and removes their files.
    fn stop(mut self) -> Result<()> {
        self.pod.signal(Signal::SIGTERM)?;
        self.pod.wait_exit(Duration::from_secs(90))?;
        drop(self.pod);
        drop(self.dom);
        self.raw.stop()?;
        drop(self.raw);
        let _ = fs::remove_dir_all(&self.ldir);
        let _ = fs::remove_dir_all(&self.rdir);
        Ok(())
    }
}

/// Hot-plug samples of both sides: Sync → Ready and → seen by the guest, attach → seen.
#[derive(Default)]
struct HotplugSamples {
    l_att: Vec<f64>,
    l_vis: Vec<f64>,
    r_att: Vec<f64>,
    r_vis: Vec<f64>,
}

/// `samples` interleaved hot-plugs on `pair`: disk hp<i> on both sides in iteration i, the
/// side going first alternating. The Sync client runs on a single-thread runtime, as the raw
/// side's call runs on the calling thread: neither side's figure includes hand-offs between
/// the client's threads. Returns the launcher's client and VMI (as last synced).
fn hotplug_round(
    rt: &tokio::runtime::Runtime,
    ctx: &Ctx,
    pair: &mut Pair,
    samples: usize,
    label: &str,
    out: &mut HotplugSamples,
) -> Result<(Client, Value)> {
    let mut c = rt.block_on(connect(&pair.pod.socket()))?;
    let got = rt
        .block_on(c.get_vmi(pb::Empty {}))
        .map_err(|e| anyhow!("GetVMI: {e}"))?;
    let mut lvmi: Value = serde_json::from_slice(&got.into_inner().vmi).context("GetVMI JSON")?;
    let mut rvmi = lvmi.clone();
    let deadline = || Instant::now() + Duration::from_secs(60);
    for i in 0..samples {
        let volume = format!("hp{i}");
        let sectors = hotplug_sectors(i);
        for step in 0..2 {
            check_interrupt()?;
            std::thread::sleep(poll_phase_delay(2 * i + step));
            let launcher = (i + step) % 2 == 0;
            let (t0, attached, seen) = if launcher {
                sparse_file(&pair.lhot.join(format!("{volume}.img")), sectors * 512)?;
                client::add_hotplug_volume(&mut lvmi, &volume, &volume, "virtio", false)?;
                let body = serde_json::to_vec(&lvmi)?;
                let t0 = Instant::now();
                let attached = sync_ready(rt, &mut c, body, &volume)?;
                let pod = &mut pair.pod;
                let seen =
                    wait_guest_disk(&pair.lconsole, sectors, deadline(), || pod.check_alive())?;
                (t0, attached, seen)
            } else {
                sparse_file(&pair.rhot.join(format!("{volume}.img")), sectors * 512)?;
                client::add_hotplug_volume(&mut rvmi, &volume, &volume, "virtio", false)?;
                let disk = hotplug_disk_xml(
                    &rvmi,
                    &pair.rfiles,
                    &ctx.opts.guest_dir,
                    &pair.rprivate,
                    &pair.rhot,
                    &volume,
                )?;
                let flags = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;
                let t0 = Instant::now();
                pair.dom
                    .attach_device_flags(&disk, flags)
                    .map_err(|e| anyhow!("attachDeviceFlags: {e}\n{disk}"))?;
                let attached = Instant::now();
                let raw = &mut pair.raw;
                let seen =
                    wait_guest_disk(&pair.rconsole, sectors, deadline(), || raw.check_alive())?;
                (t0, attached, seen)
            };
            let (what, att, vis) = if launcher {
                (
                    "launcher hot-plug: Sync → Ready",
                    &mut out.l_att,
                    &mut out.l_vis,
                )
            } else {
                ("raw attachDeviceFlags:", &mut out.r_att, &mut out.r_vis)
            };
            progress(&format!(
                "{label}{}/{samples} {what} {} ms, → guest {} ms",
                i + 1,
                fmt_num(ms(attached - t0)),
                fmt_num(ms(seen - t0))
            ));
            att.push(ms(attached - t0));
            vis.push(ms(seen - t0));
        }
    }
    Ok((c, lvmi))
}

/// How often the test guest looks for new disks (`scripts/guest-init.sh`).
const GUEST_DISK_POLL: Duration = Duration::from_millis(50);

/// A pause before hot-plug sample `k`, spread evenly over one guest disk poll (a golden-ratio
/// sequence). Without it each sample began right after the other guest had seen its disk, at
/// the same phase of this guest's polling every time: one side's "seen by the guest" came out
/// one poll (~45 ms) longer than the other's for a whole run, which side depending on how the
/// two guests' polls happened to line up (ratios 0.99–1.25 between runs of the same code).
fn poll_phase_delay(k: usize) -> Duration {
    GUEST_DISK_POLL.mul_f64((k as f64 * 0.618_033_988_749_895).fract())
}

pub(super) fn bench_running(ctx: &mut Ctx) -> Result<()> {
    let quick = ctx.opts.quick;
    let (pairs, samples) = if quick {
        (1, 1)
    } else {
        (HOTPLUG_PAIRS, HOTPLUG_SAMPLES)
    };
    let (rounds, round) = if quick {
        (1, Duration::from_millis(500))
    } else {
        (5, Duration::from_secs(2))
    };
    let name = ctx.name.clone();
    let spec = VmiSpec {
        name: &name,
        disks: 1,
        kernel_args: "console=ttyS0 quiet",
        rwx: false,
        spare_root_ports: Some(SPARE_ROOT_PORTS),
        grace_seconds: 30,
        uid: None,
    };
    let mut pair = Pair::boot(ctx, &spec, "lvb-hotplug")?;
    let before = launcher_mem(pair.pod.launcher_pid())?;
    progress(&format!(
        "running VM: both guests up, launcher RSS {:.1} MiB",
        before.rss
    ));

    // Control path, interleaved rounds.
    let rt = tokio_runtime()?;
    let socket = pair.pod.socket();
    let uri = pair.raw.uri();
    let dom_name = format!("default_{name}");
    let (mut l_rps, mut l_p99, mut r_rps, mut r_p99) = (vec![], vec![], vec![], vec![]);
    for i in 0..rounds {
        for step in 0..2 {
            check_interrupt()?;
            let (load, side, rps, p99) = if (i + step) % 2 == 0 {
                let load = rt.block_on(getdomain_load(&socket, CLIENTS, round))?;
                (load, "launcher GetDomain", &mut l_rps, &mut l_p99)
            } else {
                let load = libvirt_load(&uri, &dom_name, CLIENTS, round)?;
                (load, "raw GetState+GetXMLDesc", &mut r_rps, &mut r_p99)
            };
            progress(&format!(
                "{}/{rounds} {side} x{CLIENTS}: {:.0} calls/s, p99 {:.2} ms",
                i + 1,
                load.rps(),
                load.p99_ms()
            ));
            rps.push(load.rps());
            p99.push(load.p99_ms());
        }
    }
    drop(rt);

    // Hot-plug, in rounds of fresh VM pairs (each VM has room for HOTPLUG_SAMPLES virtio
    // disks); the first pair's launcher then takes the rest of the 32 disks for the memory
    // figure.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut hp = HotplugSamples::default();
    let (mut c, mut lvmi) = hotplug_round(&rt, ctx, &mut pair, samples, "", &mut hp)?;

    // Memory: the launcher's VM gets 32 hot-plugged disks in all, the ones after the samples
    // on virtio-scsi, one Sync each (the smoke run adds them in one Sync).
    for i in samples..HOTPLUG_TOTAL {
        check_interrupt()?;
        let volume = format!("hp{i}");
        sparse_file(
            &pair.lhot.join(format!("{volume}.img")),
            hotplug_sectors(i) * 512,
        )?;
        client::add_hotplug_volume(&mut lvmi, &volume, &volume, "scsi", false)?;
        if !quick || i + 1 == HOTPLUG_TOTAL {
            sync_ready(&rt, &mut c, serde_json::to_vec(&lvmi)?, &volume)?;
        }
    }
    progress(&format!("{HOTPLUG_TOTAL} disks hot-plugged"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let pod = &mut pair.pod;
    wait_guest_disk_count(&pair.lconsole, 1 + HOTPLUG_TOTAL, deadline, || {
        pod.check_alive()
    })?;
    std::thread::sleep(SETTLE);
    let after = launcher_mem(pair.pod.launcher_pid())?;
    progress(&format!(
        "launcher with {HOTPLUG_TOTAL} hot-plugged disks: RSS {:.1} MiB (PSS {:.1} MiB)",
        after.rss, after.pss
    ));
    drop(c);
    pair.stop()?;
    for n in 1..pairs {
        let mut pair = Pair::boot(ctx, &spec, &format!("lvb-hotplug{n}"))?;
        let label = format!("pair {}: ", n + 1);
        drop(hotplug_round(
            &rt, ctx, &mut pair, samples, &label, &mut hp,
        )?);
        pair.stop()?;
    }
    drop(rt);
    progress("running VM: both sides stopped");
    let HotplugSamples {
        l_att,
        l_vis,
        r_att,
        r_vis,
    } = hp;

    ctx.figure(
        "hotplug.attached",
        "hot-plug: Sync → disk attached (vs raw attachDeviceFlags)",
        "ms",
        &l_att,
        "Sync with the VMI plus one hot-plug PVC (MountedToPod) → the call returns with the \
         volume Ready (parse, diff, convert, checks, attach LIVE|CONFIG)",
        Some((
            &r_att,
            "virDomainAttachDeviceFlags(LIVE|CONFIG) of the same <disk> XML, in process, on a \
             raw private daemon pair",
        )),
        Some(Goal::RatioAtMost(1.2)),
    );
    ctx.figure(
        "hotplug.guest_visible",
        "hot-plug: Sync → disk visible in the guest (vs raw attach → visible)",
        "ms",
        &l_vis,
        "as hotplug.attached, until the guest's console lists the disk in an LV-BLOCK line \
         (the guest looks for new disks every 50 ms)",
        Some((
            &r_vis,
            "attachDeviceFlags → the guest's LV-BLOCK line lists the disk",
        )),
        Some(Goal::RatioAtMost(1.2)),
    );
    ctx.figure(
        "memory.hotplug_32",
        "memory: launcher RSS with 32 hot-plugged disks",
        "MiB",
        &[after.rss],
        "VmRSS of the launcher 0.5 s after its guest lists 33 disks (32 hot-plugged, one \
         Sync each: the hot-plug samples on virtio, the others on virtio-scsi)",
        None,
        None,
    );
    ctx.figure(
        "memory.hotplug_32_pss",
        "memory: launcher PSS with 32 hot-plugged disks",
        "MiB",
        &[after.pss],
        "Pss of the launcher (shared pages split), sampled with memory.hotplug_32",
        None,
        None,
    );
    const CONTROL_RAW: &str = "no raw GetDomain exists: 50 threads, one connection each, \
                               calling virDomainGetState + virDomainGetXMLDesc (what a \
                               controller would otherwise call) on a raw daemon";
    ctx.figure(
        "control.getdomain_rps",
        "control path: GetDomain calls/s, 50 concurrent clients (higher is better)",
        "calls/s",
        &l_rps,
        "50 clients, one connection each, calling GetDomain back to back; calls per second \
         of each round",
        Some((&r_rps, CONTROL_RAW)),
        None,
    );
    ctx.figure(
        "control.getdomain_p99",
        "control path: GetDomain p99 latency, 50 concurrent clients",
        "ms",
        &l_p99,
        "99th percentile of the calls' latencies in each round",
        Some((&r_p99, CONTROL_RAW)),
        None,
    );
    let row = |what, f: fn(&LauncherMem) -> f64| HotplugMemoryRow {
        what,
        after_boot_mib: f(&before),
        with_32_hotplugged_mib: f(&after),
    };
    ctx.hotplug_memory = vec![
        row("RSS", |m| m.rss),
        row("anonymous (heap, stacks)", |m| m.anon),
        row("file-backed (binary, shared libraries)", |m| m.rss - m.anon),
        row("PSS", |m| m.pss),
    ];
    Ok(())
}

/// Sync; returns when the call came back with `volume` Ready.
fn sync_ready(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    vmi: Vec<u8>,
    volume: &str,
) -> Result<Instant> {
    let d = rt
        .block_on(c.sync(pb::SyncRequest { vmi }))
        .map_err(|e| anyhow!("Sync adding {volume}: {e}"))?;
    let at = Instant::now();
    let d = d.into_inner().domain.unwrap_or_default();
    match d.disks.iter().find(|k| k.volume == volume) {
        Some(k) if k.phase() == pb::VolumePhase::Ready => Ok(at),
        other => bail!("Sync returned without {volume} Ready: {other:?}"),
    }
}

/// One round of the control-path load: every call's latency.
struct Load {
    latencies_ms: Vec<f64>,
    secs: f64,
}

impl Load {
    fn rps(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.secs
    }

    fn p99_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 99.0)
    }
}

/// `clients` connections to the launcher socket calling GetDomain back to back for `dur`.
async fn getdomain_load(socket: &Path, clients: usize, dur: Duration) -> Result<Load> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(connect(socket).await?);
    }
    let t0 = Instant::now();
    let end = t0 + dur;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    c.get_domain(pb::Empty {})
                        .await
                        .map_err(|e| anyhow!("GetDomain: {e}"))?;
                    lat.push(ms(t.elapsed()));
                }
                Ok::<_, anyhow::Error>(lat)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for t in tasks {
        latencies_ms.extend(t.await.context("GetDomain client")??);
    }
    Ok(Load {
        latencies_ms,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// `clients` threads, one libvirt connection each, calling virDomainGetState +
/// virDomainGetXMLDesc back to back for `dur` (one latency per pair).
fn libvirt_load(uri: &str, dom_name: &str, clients: usize, dur: Duration) -> Result<Load> {
    let ready = Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (uri, name, ready) = (uri.to_string(), dom_name.to_string(), ready.clone());
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let opened = Connect::open(Some(&uri))
                    .map_err(|e| anyhow!("connect {uri}: {e}"))
                    .and_then(|conn| {
                        let dom = conn
                            .lookup_domain_by_name(&name)
                            .map_err(|e| anyhow!("lookup {name}: {e}"))?;
                        Ok((conn, dom))
                    });
                ready.wait();
                let (conn, dom) = opened?;
                let end = Instant::now() + dur;
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    dom.state().map_err(|e| anyhow!("GetState: {e}"))?;
                    dom.xml_desc(0).map_err(|e| anyhow!("GetXMLDesc: {e}"))?;
                    lat.push(ms(t.elapsed()));
                }
                drop(dom);
                drop(conn);
                Ok(lat)
            })
        })
        .collect();
    ready.wait();
    let t0 = Instant::now();
    let mut latencies_ms = Vec::new();
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(lat)) => latencies_ms.extend(lat),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(anyhow!("a libvirt client panicked"))),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(Load {
        latencies_ms,
        secs: t0.elapsed().as_secs_f64(),
    })
}
