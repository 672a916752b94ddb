//! What the benchmarks on a running VM share: their VMIs, the control API client, the
//! guest's `LV-BLOCK` console lines, and the launcher's memory.

use super::*;

use virt_launcher::api::pb;

pub(super) type Client = pb::launcher_client::LauncherClient<tonic::transport::Channel>;

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
}

/// The VMI's `metadata.uid` (a migration target checks it).
pub(super) fn uid() -> String {
    format!("0c9f7a6e-0000-4000-8000-{:012x}", std::process::id())
}

fn vmi_yaml(s: &VmiSpec) -> String {
    let mut disks = String::new();
    let mut volumes = String::new();
    let mut status = String::new();
    for i in 0..s.disks {
        let d = format!("d{i}");
        let _ = write!(
            disks,
            "        - name: {d}\n          disk:\n            bus: virtio\n"
        );
        let _ = write!(
            volumes,
            "    - name: {d}\n      persistentVolumeClaim:\n        claimName: {d}\n"
        );
        if s.rwx {
            let _ = write!(
                status,
                "    - name: {d}\n      phase: Ready\n      persistentVolumeClaimInfo:\n        \
                 claimName: {d}\n        accessModes: [ReadWriteMany]\n"
            );
        }
    }
    if !status.is_empty() {
        status = format!("status:\n  volumeStatus:\n{status}");
    }
    let annotations = match s.spare_root_ports {
        Some(n) => format!(
            "  annotations:\n    {}: \"{n}\"\n",
            convert::SPARE_ROOT_PORTS_ANNOTATION
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: kubevirt.io/v1\n\
         kind: VirtualMachineInstance\n\
         metadata:\n  name: {name}\n  namespace: default\n  uid: {uid}\n{annotations}\
         spec:\n  terminationGracePeriodSeconds: 30\n  domain:\n\
         \x20   resources:\n      requests:\n        memory: 128Mi\n\
         \x20   firmware:\n      kernelBoot:\n        kernelArgs: \"{args}\"\n\
         \x20       container:\n          image: test-guest\n\
         \x20         kernelPath: /vmlinuz\n          initrdPath: /initramfs.gz\n\
         \x20   devices:\n      disks:\n{disks}\
         \x20 volumes:\n{volumes}{status}",
        name = s.name,
        uid = uid(),
        args = s.kernel_args,
    )
}

/// Writes `dir/vmi.yaml` and the PVC images under `pvcs` (which two pods may share).
pub(super) fn write_spec_pod(dir: &Path, pvcs: &Path, s: &VmiSpec) -> Result<PodFiles> {
    for i in 0..s.disks {
        let pvc = pvcs.join(format!("d{i}"));
        fs::create_dir_all(&pvc).with_context(|| format!("create {}", pvc.display()))?;
        sparse_file(&pvc.join("disk.img"), 1 << 20)?;
    }
    let vmi = dir.join("vmi.yaml");
    write(&vmi, &vmi_yaml(s))?;
    Ok(PodFiles {
        vmi,
        pvcs: pvcs.to_path_buf(),
    })
}

pub(super) fn sparse_file(path: &Path, bytes: u64) -> Result<()> {
    fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("create {}", path.display()))
}

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

pub(super) async fn connect(socket: &Path) -> Result<Client> {
    virt_launcher::api::client::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))
}

/// The number of disks in the guest's latest `LV-BLOCK` line, and whether any of its lines
/// lists a disk of `sectors` sectors.
fn block_lines(console: &str, sectors: Option<u64>) -> (usize, bool) {
    let suffix = sectors.map(|s| format!(":{s}"));
    let mut latest = 0;
    let mut seen = false;
    for l in console.lines().filter(|l| l.starts_with("LV-BLOCK")) {
        let entries: Vec<&str> = l.split_whitespace().skip(1).collect();
        latest = entries.len();
        if let Some(sfx) = &suffix {
            seen |= entries.iter().any(|e| e.ends_with(sfx.as_str()));
        }
    }
    (latest, seen)
}

/// Polls the guest's console until an `LV-BLOCK` line lists a disk of `sectors` sectors (the
/// guest looks for new disks every 50 ms); returns when it appeared.
pub(super) fn wait_guest_disk(
    console: &Path,
    sectors: u64,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<Instant> {
    loop {
        let text = fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if block_lines(&text, Some(sectors)).1 {
            return Ok(Instant::now());
        }
        check_interrupt()?;
        alive()?;
        if Instant::now() > deadline {
            bail!(
                "the guest console {} never listed a disk of {sectors} sectors",
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the guest's latest `LV-BLOCK` line lists `n` disks.
pub(super) fn wait_guest_disk_count(
    console: &Path,
    n: usize,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    loop {
        let text = fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let (latest, _) = block_lines(&text, None);
        if latest == n {
            return Ok(());
        }
        check_interrupt()?;
        alive()?;
        if Instant::now() > deadline {
            bail!(
                "the guest console {} lists {latest} disks, not {n}",
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
