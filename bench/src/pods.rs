//! What the benchmarks share about a pod: their VMIs and PVCs, the domain XML the launcher
//! would define for them, waits on the guest's console (`LV-READY`, `LV-BLOCK`, `LV-COUNT`),
//! the control API client, and the launcher's memory.

use super::*;

pub(super) use testkit::launcher::{connect, Client};

/// A benchmark VMI: `disks` Filesystem-mode PVCs `d0`, `d1`, … of 1 MiB on virtio.
pub(super) struct VmiSpec<'a> {
    pub name: &'a str,
    pub disks: usize,
    /// The guest's kernel command line (scripts/guest-init.sh reads its `lv.*` parameters).
    pub kernel_args: &'a str,
    /// Report every claim as ReadWriteMany (a live migration needs shared storage).
    pub rwx: bool,
    /// Spare `pcie-root-port`s for virtio hot-plug (the launcher's annotation).
    pub spare_root_ports: Option<u32>,
    /// `terminationGracePeriodSeconds`.
    pub grace_seconds: u64,
    /// `metadata.uid` (the domain's UUID derives from it) when not [`uid`].
    pub uid: Option<String>,
}

/// The VMI's `metadata.uid` (a migration target checks it).
pub(super) fn uid() -> String {
    format!("0c9f7a6e-0000-4000-8000-{:012x}", std::process::id())
}

impl VmiSpec<'_> {
    /// A VMI of `disks` disks and the guest's plain kernel command line.
    pub(super) fn plain(name: &str, disks: usize) -> VmiSpec<'_> {
        VmiSpec {
            name,
            disks,
            kernel_args: testkit::vmi::KERNEL_ARGS,
            rwx: false,
            spare_root_ports: None,
            grace_seconds: 30,
            uid: None,
        }
    }
}

/// Writes `dir/vmi.yaml` and the PVC images under `pvcs` (which two pods may share).
pub(super) fn write_spec_pod(dir: &Path, pvcs: &Path, s: &VmiSpec) -> Result<PodFiles> {
    let disks: Vec<testkit::vmi::Disk> = (0..s.disks)
        .map(|i| testkit::vmi::Disk::new(format!("d{i}"), "virtio", 1))
        .collect();
    let annotations: Vec<String> = s
        .spare_root_ports
        .map(|n| format!("{}: \"{n}\"", convert::SPARE_ROOT_PORTS_ANNOTATION))
        .into_iter()
        .collect();
    let vmi = dir.join("vmi.yaml");
    testkit::vmi::GuestVmi {
        name: s.name,
        uid: Some(&s.uid.clone().unwrap_or_else(uid)),
        grace_seconds: s.grace_seconds,
        kernel_args: s.kernel_args,
        disks: &disks,
        annotations: &annotations,
        rwx: s.rwx,
    }
    .write(&vmi, pvcs)?;
    Ok(PodFiles {
        vmi,
        pvcs: pvcs.to_path_buf(),
    })
}

pub(super) use testkit::vmi::sparse_file;

/// The `<disk>` element the launcher hot-plugs for `volume`: the converter's disk for the VMI
/// with that volume (`domain::Disk::to_xml`, as the launcher's attach renders it).
pub(super) fn hotplug_disk_xml(
    vmi: &Value,
    files: &PodFiles,
    guest_dir: &Path,
    private: &Path,
    hotplug: &Path,
    volume: &str,
) -> Result<String> {
    let vmi = spec::from_str(&vmi.to_string(), "hot-plug VMI")?;
    let domain = convert_vmi(&vmi, files, guest_dir, private, Some(hotplug))?;
    domain
        .devices
        .disks
        .iter()
        .find(|d| d.volume() == volume)
        .map(|d| d.to_xml())
        .ok_or_else(|| anyhow!("the converted VMI has no disk for volume {volume}"))
}

/// A tokio runtime for the control API client (2 workers: the machine has 2 CPUs).
pub(super) fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Polls the guest's console until an `LV-BLOCK` line lists a disk of `sectors` sectors (the
/// guest looks for new disks every 50 ms); returns when it appeared.
pub(super) fn wait_guest_disk(
    console: &Path,
    sectors: u64,
    deadline: Instant,
    alive: impl FnMut() -> Result<()>,
) -> Result<Instant> {
    poll_console(console, deadline, Duration::from_millis(5), alive, |text| {
        testkit::guest::ever_listed(text, sectors)
            .then_some(())
            .ok_or_else(|| format!("never listed a disk of {sectors} sectors"))
    })
}

/// Waits until the guest's latest `LV-BLOCK` line lists `n` disks.
pub(super) fn wait_guest_disk_count(
    console: &Path,
    n: usize,
    deadline: Instant,
    alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    poll_console(
        console,
        deadline,
        Duration::from_millis(20),
        alive,
        |text| {
            let latest = testkit::guest::latest_block_line(text).map_or(0, |disks| disks.len());
            (latest == n)
                .then_some(())
                .ok_or_else(|| format!("lists {latest} disks, not {n}"))
        },
    )
    .map(drop)
}

/// Polls the guest's console log for [`READY_MARKER`]; returns when it appeared.
pub(crate) fn wait_console(
    path: &Path,
    deadline: Instant,
    alive: impl FnMut() -> Result<()>,
) -> Result<Instant> {
    let every = Duration::from_millis(5);
    wait_marker(path, READY_MARKER, deadline, every, alive)
}

/// Polls the guest's console log at `path` every `every` until it shows `marker`; returns when
/// it did.
pub(crate) fn wait_marker(
    path: &Path,
    marker: &str,
    deadline: Instant,
    every: Duration,
    alive: impl FnMut() -> Result<()>,
) -> Result<Instant> {
    poll_console(path, deadline, every, alive, |text| {
        text.contains(marker)
            .then_some(())
            .ok_or_else(|| format!("did not show {marker} in time"))
    })
}

/// Polls the console log at `path` every `every` until `done` accepts its text; returns when
/// it did. `done` says what is missing otherwise, for the error after `deadline`; `alive`
/// fails when the side running the guest died.
fn poll_console(
    path: &Path,
    deadline: Instant,
    every: Duration,
    mut alive: impl FnMut() -> Result<()>,
    done: impl Fn(&str) -> Result<(), String>,
) -> Result<Instant> {
    let mut missing = String::new();
    poll(deadline, every, || {
        match done(&testkit::guest::read_console(path)) {
            Ok(()) => return Ok(Some(Instant::now())),
            Err(m) => missing = m,
        }
        alive().map(|()| None)
    })?
    .ok_or_else(|| anyhow!("the guest console {} {missing}", path.display()))
}

/// The launcher process's memory (MiB).
#[derive(Debug, Clone, Copy)]
pub(super) struct LauncherMem {
    pub rss: f64,
    pub anon: f64,
    pub pss: f64,
}

pub(super) fn launcher_mem(pid: i32) -> Result<LauncherMem> {
    Ok(LauncherMem {
        rss: rss_mib(pid)?,
        anon: status_mib(pid, "RssAnon")?,
        pss: pss_mib(pid)?,
    })
}

/// The `p`-th percentile (0–100) of `v`, nearest rank.
pub(super) fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// How long a start may take: TCG boots slow down with many disks.
pub(crate) fn start_timeout(disks: usize) -> Duration {
    Duration::from_secs(90 + 2 * disks as u64)
}

/// The files of one "pod": a VMI with `disks` Filesystem-mode PVCs (1 MiB, sparse).
pub(crate) struct PodFiles {
    pub(crate) vmi: PathBuf,
    pub(crate) pvcs: PathBuf,
}

/// A pod of `disks` 1 MiB virtio PVCs in `dir` (`vmi.yaml`, `pvcs/`).
pub(crate) fn write_pod(dir: &Path, name: &str, disks: usize) -> Result<PodFiles> {
    write_spec_pod(dir, &dir.join("pvcs"), &VmiSpec::plain(name, disks))
}

/// The domain XML the launcher generates for `files`, with the VM's private files (console
/// log) under `private` — exactly as `virt-launcher run` computes it in standalone mode.
pub(crate) fn domain_xml(files: &PodFiles, guest_dir: &Path, private: &Path) -> Result<String> {
    domain_xml_with(files, guest_dir, private, None)
}

/// As [`domain_xml`], with hot-plugged volumes under `hotplug` (the launcher's `--hotplug-dir`).
pub(crate) fn domain_xml_with(
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
pub(crate) fn convert_vmi(
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

pub(crate) fn shutdown_acpi(dom: &Domain) -> Result<()> {
    dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        .context("shutdown (ACPI power button)")
}

/// Waits until a (transient) domain is no longer active.
pub(crate) fn wait_inactive(dom: &Domain, timeout: Duration) -> Result<()> {
    poll(Instant::now() + timeout, Duration::from_millis(5), || {
        Ok((!matches!(dom.is_active(), Ok(true))).then_some(()))
    })?
    .ok_or_else(|| anyhow!("the domain did not shut off within {timeout:?}"))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or("")
}
