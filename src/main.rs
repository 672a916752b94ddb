//! The `virt-launcher` binary: the edge where errors become one readable line and an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use virt_launcher::pod::{self, PodLayout};
use virt_launcher::podfacts::{self, DomainType, PodPaths};
use virt_launcher::spec::{self, VirtualMachineInstance};
use virt_launcher::supervisor::{self, LaunchPlan};
use virt_launcher::{convert, datavolume, logging, prepare};

#[derive(Parser)]
#[command(
    name = "virt-launcher",
    version,
    about = "Runs a KubeVirt VirtualMachineInstance as a libvirt/QEMU domain"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a VM until it stops or the launcher gets SIGTERM (standalone: a VMI or VM file in, a VM
    /// out).
    Run(RunArgs),
    /// Print the libvirt domain XML a VMI converts to.
    Render(RenderArgs),
}

#[derive(Args)]
struct PathArgs {
    /// Where Filesystem-mode PVCs are mounted (`<dir>/<volume>/disk.img`).
    #[arg(long, value_name = "DIR")]
    volumes_dir: Option<PathBuf>,
    /// Where hot-plugged volumes appear (`<dir>/<volume>.img` or the block node `<dir>/<volume>`).
    #[arg(long, value_name = "DIR")]
    hotplug_dir: Option<PathBuf>,
    /// Where Block-mode PVCs appear as device nodes (`<dir>/<volume>`).
    #[arg(long, value_name = "DIR")]
    block_dir: Option<PathBuf>,
    /// The kernelBoot container's files: kernelPath and initrdPath are resolved inside it.
    #[arg(long, value_name = "DIR")]
    kernel_boot_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// A kubevirt.io/v1 VirtualMachineInstance, or a VirtualMachine (its spec.template is run);
    /// JSON or YAML.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "vm",
        conflicts_with = "vm"
    )]
    vmi: Option<PathBuf>,
    /// A kubevirt.io/v1 VirtualMachine whose spec.dataVolumeTemplates are imported into
    /// --storage-dir first, as CDI would (http, pvc clone, blank); its PVC and DataVolume
    /// volumes are that directory's claims.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["volumes_dir", "block_dir"])]
    vm: Option<PathBuf>,
    /// Where claims of --vm live (`<dir>/claims/<namespace>/<name>`), kept across runs.
    #[arg(long, value_name = "DIR", default_value = virt_launcher::datavolume::DEFAULT_STORAGE_DIR)]
    storage_dir: PathBuf,
    /// kvm (production default) or qemu (TCG software emulation, for machines without usable KVM).
    #[arg(long, env = "VIRT_LAUNCHER_DOMAIN_TYPE", default_value = "kvm", value_parser = parse_domain_type)]
    domain_type: DomainType,
    /// The launcher's runtime root (daemon sockets, configuration, console log). Default:
    /// /run/virt-launcher/<namespace>_<name>.
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Do not create a private mount/UTS namespace (inside a pod the container already is one).
    #[arg(long)]
    no_isolate: bool,
    /// Seconds the domain may take to start before the launcher gives up.
    #[arg(long, default_value_t = 240)]
    qemu_timeout: u64,
    /// Always log JSON lines, even on a terminal.
    #[arg(long)]
    json_logs: bool,
    #[command(flatten)]
    paths: PathArgs,
}

#[derive(Args)]
struct RenderArgs {
    #[arg(long, value_name = "FILE")]
    vmi: PathBuf,
    /// Pod facts as JSON (`{"blockVolumes": [...], "directIO": true, "domainType": "kvm"}`);
    /// without it the real filesystem is probed.
    #[arg(long, value_name = "FILE")]
    pod_facts: Option<PathBuf>,
    #[arg(long, env = "VIRT_LAUNCHER_DOMAIN_TYPE", default_value = "kvm", value_parser = parse_domain_type)]
    domain_type: DomainType,
    #[command(flatten)]
    paths: PathArgs,
}

fn parse_domain_type(s: &str) -> Result<DomainType, String> {
    match s {
        "kvm" => Ok(DomainType::Kvm),
        "qemu" | "tcg" => Ok(DomainType::Qemu),
        other => Err(format!("unknown domain type {other:?}: use kvm or qemu")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => {
            logging::init(args.json_logs);
            run(args)
        }
        Cmd::Render(args) => render(args).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "launcher failed");
            eprintln!("virt-launcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pod_paths(vmi: &VirtualMachineInstance, args: &PathArgs) -> PodPaths {
    let mut paths = PodPaths::kubevirt_defaults(vmi);
    let set = |dst: &mut PathBuf, src: &Option<PathBuf>| {
        if let Some(p) = src {
            *dst = absolute(p);
        }
    };
    set(&mut paths.vmi_disks_dir, &args.volumes_dir);
    set(&mut paths.hotplug_disks_dir, &args.hotplug_dir);
    set(&mut paths.block_dev_dir, &args.block_dir);
    set(&mut paths.kernel_boot_dir, &args.kernel_boot_dir);
    paths
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn render(args: RenderArgs) -> Result<()> {
    let vmi = spec::load_file(&args.vmi)?;
    let facts = match &args.pod_facts {
        Some(f) => podfacts::from_file(f, &vmi)?,
        None => podfacts::probe(&vmi, pod_paths(&vmi, &args.paths), args.domain_type)?,
    };
    let domain =
        convert::convert(&vmi, &facts).with_context(|| format!("{}", args.vmi.display()))?;
    print!("{}", domain.to_xml());
    Ok(())
}

fn run(args: RunArgs) -> Result<i32> {
    let input = args
        .vm
        .as_ref()
        .or(args.vmi.as_ref())
        .context("--vmi or --vm")?;
    let vmi = spec::load_file(input)?;
    let name = vmi.domain_name();
    let root = args
        .runtime_dir
        .clone()
        .unwrap_or_else(|| Path::new("/run/virt-launcher").join(&name));
    let layout = PodLayout::new(absolute(&root), !args.no_isolate);

    let mut paths = pod_paths(&vmi, &args.paths);
    if layout.is_isolated() {
        // Standalone: the VM's private and ephemeral files live in our runtime root, not in
        // the host's /var/run/kubevirt* directories.
        paths.private_dir = layout.private_dir();
        paths.ephemeral_disks_dir = layout.root().join("ephemeral");
    }
    // Standalone DataVolumes: claims imported into the storage dir; kept (loop devices of Block
    // claims attached) until the launcher returns.
    let _claims = match &args.vm {
        Some(vm) => Some(datavolume::materialise(
            vm,
            &vmi,
            &datavolume::Options {
                storage_dir: absolute(&args.storage_dir),
                progress: datavolume::ProgressStyle::auto(args.json_logs),
            },
            &mut paths,
        )?),
        None => None,
    };
    let facts = podfacts::probe(&vmi, paths, args.domain_type)?;
    let domain = convert::convert(&vmi, &facts).with_context(|| format!("{}", input.display()))?;
    let plan = LaunchPlan {
        domain: domain.name().to_string(),
        xml: domain.to_xml(),
        grace: vmi.termination_grace_period(),
        qemu_timeout: Duration::from_secs(args.qemu_timeout),
        console_log: Some(facts.paths.serial_log()),
    };

    layout.create()?;
    let _lock = layout.lock()?;
    if layout.is_isolated() {
        pod::isolate(&layout, &hostname(&vmi))?;
    }
    layout.write_configs(&pod::random_uuid()?)?;
    prepare::prepare(&vmi, &facts)?;
    tracing::info!(
        vmi = %input.display(),
        domain = %plan.domain,
        domain_type = ?args.domain_type,
        runtime_dir = %layout.root().display(),
        console_log = %facts.paths.serial_log().display(),
        "launcher starting"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let outcome = runtime.block_on(supervisor::run(&layout, &plan));
    runtime.shutdown_timeout(Duration::from_secs(2));
    layout.remove_daemon_state();
    let outcome = outcome?;
    Ok(outcome.exit_code())
}

/// A pod-like hostname: libvirt refuses to migrate between two daemons with the same one.
fn hostname(vmi: &VirtualMachineInstance) -> String {
    let suffix = format!("{:05x}", std::process::id() & 0xfffff);
    let mut base = format!("virt-launcher-{}", vmi.metadata.name);
    base.truncate(63 - suffix.len() - 1);
    format!("{base}-{suffix}")
}
