//! The `virt-launcher` binary: the edge where errors become one readable line and an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use tokio::sync::{mpsc, watch};
use virt_launcher::api::{self, server::ServerConfig};
use virt_launcher::domain::DomainType;
use virt_launcher::pod::cmdline::{self, KubevirtArgs};
use virt_launcher::pod::daemons::Daemons;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::pod::process::Reaper;
use virt_launcher::pod::{self, PodLayout};
use virt_launcher::spec::{self, VirtualMachineInstance};
use virt_launcher::vm::plan::{PathOverrides, Planner};
use virt_launcher::vm::{self, OnSigterm, RunOptions};
use virt_launcher::{convert, datavolume, logging};

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
    Run(Box<RunArgs>),
    /// Print the libvirt domain XML a VMI converts to.
    Render(RenderArgs),
    /// libvirt's QEMU hook for an incoming migration (run by the pod's libvirtd): reads the
    /// domain XML on stdin and refuses (exit 1, one line on stderr) any VM but the one awaited.
    #[command(hide = true)]
    MigrationHook {
        /// The awaited VM's identity, as the prepared target wrote it.
        awaited: PathBuf,
    },
    /// Snapshots in a storage directory: list, restore onto the stopped VM, delete (take one
    /// of a running VM with `launcherctl snapshot create`).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshot the claims of the stopped VM in FILE (a running VM: `launcherctl snapshot`).
    Create {
        #[arg(long, value_name = "DIR", default_value = virt_launcher::datavolume::DEFAULT_STORAGE_DIR)]
        storage_dir: PathBuf,
        /// The VirtualMachine (as given to `run --vm`).
        #[arg(long, value_name = "FILE")]
        vm: PathBuf,
        name: String,
        /// Always log JSON lines, even on a terminal.
        #[arg(long)]
        json_logs: bool,
    },
    /// List the snapshots (all namespaces unless --namespace is given).
    List {
        #[command(flatten)]
        at: SnapshotAt,
        /// JSON lines (one manifest per snapshot) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replace the VM's claims with the snapshot's copies (the VM must be stopped).
    Restore {
        #[command(flatten)]
        at: SnapshotAt,
        name: String,
        /// Always log JSON lines, even on a terminal.
        #[arg(long)]
        json_logs: bool,
    },
    /// Delete a snapshot.
    Delete {
        #[command(flatten)]
        at: SnapshotAt,
        name: String,
    },
}

#[derive(Args)]
struct SnapshotAt {
    /// The storage directory of `run --vm`.
    #[arg(long, value_name = "DIR", default_value = virt_launcher::datavolume::DEFAULT_STORAGE_DIR)]
    storage_dir: PathBuf,
    /// The snapshot's namespace (the VM's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
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
    /// JSON or YAML. Without it (and without --vm) the launcher serves its socket and waits
    /// for a Sync call.
    #[arg(long, value_name = "FILE", conflicts_with = "vm")]
    vmi: Option<PathBuf>,
    /// A kubevirt.io/v1 VirtualMachine whose spec.dataVolumeTemplates are imported into
    /// --storage-dir first, as CDI would (http, registry, pvc clone, blank); its PVC and DataVolume
    /// volumes are that directory's claims.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["volumes_dir", "block_dir"])]
    vm: Option<PathBuf>,
    /// Warn about fields KubeVirt does not know (a newer KubeVirt's) instead of refusing the
    /// file; a KubeVirt field the launcher does not support is refused either way.
    #[arg(long)]
    allow_unknown_fields: bool,
    /// Do not start the VM of --vm or --vmi: wait for it to arrive by live migration from the
    /// launcher running it on this machine (`launcherctl --vm NAME migrate --target <this
    /// launcher's socket>`). With --vm, a ReadWriteMany claim is the source's (give the same
    /// --storage-dir); any other claim is created empty in this --storage-dir at the source's
    /// size for `migrate --block`, and kept only once the VM has arrived.
    #[arg(long)]
    migration_target: bool,
    /// Where claims of --vm live (`<dir>/claims/<namespace>/<name>`), kept across runs.
    #[arg(long, value_name = "DIR", default_value = virt_launcher::datavolume::DEFAULT_STORAGE_DIR)]
    storage_dir: PathBuf,
    /// Where containerDisk images pulled from their registries are cached, by digest
    /// (standalone; each run's guest writes go to an overlay removed at stop).
    #[arg(long, value_name = "DIR", default_value = virt_launcher::datavolume::container_disk::DEFAULT_CACHE_DIR)]
    container_disk_cache: PathBuf,
    /// Take containerDisk images from DIR (`disk_<volume index>.img`, raw or qcow2, as
    /// KubeVirt's pod has them) instead of pulling them (offline use); still read-only under
    /// an overlay removed at stop.
    #[arg(long, value_name = "DIR", conflicts_with = "container_disk_cache")]
    container_disk_dir: Option<PathBuf>,
    /// The control API socket (KubeVirt's pod: /var/run/kubevirt/sockets/launcher-sock).
    /// Default: <runtime-dir>/launcher-sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A peer uid allowed to call the API besides the launcher's own (repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// A group given access to the socket (mode 0660 instead of 0600).
    #[arg(long, value_name = "GID")]
    socket_group: Option<u32>,
    /// A hostname for the private UTS namespace (default: virt-launcher-<name>-<pid>).
    #[arg(long)]
    hostname: Option<String>,
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
    /// Where QEMU's capabilities, as libvirt probed them, are kept from one standalone start
    /// to the next (libvirt probes again when QEMU, libvirt, the kernel or the CPU changed).
    #[arg(long, value_name = "DIR", default_value = virt_launcher::pod::capcache::DEFAULT_DIR)]
    capabilities_cache: PathBuf,
    /// Probe QEMU's capabilities afresh at every start (about a second) instead.
    #[arg(long, conflicts_with = "capabilities_cache")]
    no_capabilities_cache: bool,
    /// Forward a host port to the guest's pod-network interface, when no KubeVirt handler
    /// built the pod network (passt): HOST:GUEST, HOST:GUEST/tcp or HOST:GUEST/udp
    /// (repeatable). A masquerade interface's `ports` are forwarded as well.
    #[arg(long = "publish", value_name = "HOST:GUEST")]
    publish: Vec<virt_launcher::convert::facts::Published>,
    /// The existing host bridge a `bridge` interface joins when no KubeVirt handler built the
    /// pod network.
    #[arg(long, value_name = "NAME")]
    host_bridge: Option<String>,
    /// Seconds a hot-unplug waits for the guest to release the disk before it is reported
    /// as failed (the disk then stays attached; a late release is still noticed).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    detach_timeout: f64,
    /// Seconds the domain may take to start before the launcher gives up.
    #[arg(long, default_value_t = 240)]
    qemu_timeout: u64,
    /// The size at which the serial console log and the QEMU log are rotated: copied to
    /// `<log>.1` and truncated (at most twice this per log stays on disk).
    #[arg(long, default_value_t = virt_launcher::pod::daemons::DEFAULT_LOG_MAX_BYTES,
          value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1024..))]
    log_max_bytes: u64,
    /// Seconds after which a guest that wrote nothing to its serial console is warned
    /// about (0: never).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    console_silence_warning: u64,
    /// Always log JSON lines, even on a terminal.
    #[arg(long)]
    json_logs: bool,
    #[command(flatten)]
    paths: PathArgs,
    /// KubeVirt's share dir: the domain is notified to virt-handler on its
    /// `domain-notify-pipe.sock` there.
    #[arg(long, value_name = "DIR")]
    kubevirt_share_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RenderArgs {
    #[arg(long, value_name = "FILE")]
    vmi: PathBuf,
    /// Warn about fields KubeVirt does not know instead of refusing the file.
    #[arg(long)]
    allow_unknown_fields: bool,
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
    // Lossy: only KubeVirt's command line is read from it (ours goes to clap as given).
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // KubeVirt's small tools in the compute container, as the image's symlinks to this binary
    // (`/usr/bin/virt-tail`) or as `virt-launcher virt-tail …`: their flags are KubeVirt's,
    // read by hand (klog flags are ignored); before the KubeVirt check (`--logfile`).
    let invoked_as = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()));
    let (tool, tool_args) = match invoked_as.as_deref() {
        Some(t @ ("virt-tail" | "virt-probe")) => (Some(t.to_string()), &argv[..]),
        _ => match argv.first().map(String::as_str) {
            Some(t @ ("virt-tail" | "virt-probe")) => (Some(t.to_string()), &argv[1..]),
            _ => (None, &argv[..]),
        },
    };
    let result = if tool.as_deref() == Some("virt-tail") {
        virt_tail(tool_args)
    } else if tool.as_deref() == Some("virt-probe") {
        return virt_probe(tool_args);
    } else if is_kubevirt_command_line(&argv) {
        logging::init(true);
        run_kubevirt(argv)
    } else {
        let cli = Cli::parse();
        match cli.command {
            Cmd::Run(args) => {
                logging::init(args.json_logs);
                run(*args)
            }
            Cmd::Render(args) => render(args).map(|()| 0),
            Cmd::MigrationHook { awaited } => return migration_hook(&awaited),
            // Its error is the one line on stderr (its log has progress only).
            Cmd::Snapshot(cmd) => {
                return match snapshot_command(cmd) {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("virt-launcher: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
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

/// `virt-launcher migration-hook`: libvirt prints our stderr in the source's error.
fn migration_hook(awaited: &Path) -> ExitCode {
    let mut xml = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml) {
        eprintln!("incoming migration refused: cannot read the domain XML: {e}");
        return ExitCode::FAILURE;
    }
    match vm::migration::target::judge_incoming(awaited, &xml) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `virt-launcher virt-tail`: one current-thread runtime for the signal and the poll timer.
fn virt_tail(args: &[String]) -> Result<i32> {
    let Some(logfile) = pod::tail::logfile_arg(args) else {
        anyhow::bail!("virt-tail: --logfile must be provided");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(pod::tail::run(&logfile))?;
    Ok(0)
}

/// `virt-launcher virt-probe` (the image's /usr/bin/virt-probe): KubeVirt's exit codes, the
/// guest command's stdout, and a failure's reason as one line on stderr.
fn virt_probe(argv: &[String]) -> ExitCode {
    use api::kubevirt::probe::{self, ProbeArgs};
    let args = match ProbeArgs::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virt-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(probe::run(&args)).map_err(|e| e.to_string()));
    match outcome {
        Ok(o) => {
            if !o.stdout.is_empty() {
                println!("{}", o.stdout);
            }
            // KubeVirt's os.Exit(code): the low byte.
            ExitCode::from(o.exit_code as u8)
        }
        Err(e) => {
            eprintln!("virt-probe: {e}");
            // KubeVirt's: a failed ping exits 1, a failed Exec call with its -1.
            ExitCode::from(if args.guest_agent_ping { 1 } else { 255 })
        }
    }
}

impl PathArgs {
    fn overrides(&self) -> PathOverrides {
        PathOverrides {
            vmi_disks_dir: self.volumes_dir.as_deref().map(absolute),
            hotplug_disks_dir: self.hotplug_dir.as_deref().map(absolute),
            block_dev_dir: self.block_dir.as_deref().map(absolute),
            kernel_boot_dir: self.kernel_boot_dir.as_deref().map(absolute),
            private_dir: None,
            ephemeral_disks_dir: None,
            container_disks_dir: None,
            trusted_roots: Vec::new(),
            // Standalone: the host path as written; KubeVirt's pod mounts its directory.
            host_disk_at_host_path: true,
        }
    }
}

fn unknown_fields(allow: bool) -> spec::UnknownFields {
    if allow {
        spec::UnknownFields::Warn
    } else {
        spec::UnknownFields::Refuse
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn render(args: RenderArgs) -> Result<()> {
    let vmi = spec::load_file_checked(&args.vmi, unknown_fields(args.allow_unknown_fields))?;
    let facts = match &args.pod_facts {
        Some(f) => podfacts::from_file(f, &vmi)?,
        None => podfacts::probe(
            &vmi,
            args.paths.overrides().paths_for(&vmi),
            args.domain_type,
        )?,
    };
    let domain = convert::convert(&vmi, &facts)
        .and_then(|domain| virt_launcher::vm::plan::pcie_fits(&vmi, &domain).map(|()| domain))
        .map_err(|e| anyhow::anyhow!("{}", vmi.user_text(&e.to_string())))
        .with_context(|| format!("{}", args.vmi.display()))?;
    print!("{}", domain.to_xml());
    Ok(())
}

fn run(args: RunArgs) -> Result<i32> {
    if !args.no_isolate && pod::pidns::wanted() {
        // Standalone: PID 1 of a PID namespace of its own, as in a pod (see `pod::pidns`).
        return Ok(pod::pidns::run_as_pid1(std::env::args_os().skip(1))?);
    }
    if pod::pidns::is_child() {
        pod::pidns::bind_to_parent()?;
    }
    let input = args.vm.as_ref().or(args.vmi.as_ref());
    let unknown = unknown_fields(args.allow_unknown_fields);
    let mut vmi = input
        .map(|p| spec::load_file_checked(p, unknown))
        .transpose()?;
    if args.migration_target && vmi.is_none() {
        anyhow::bail!("--migration-target: give the VM it receives (--vm FILE or --vmi FILE)");
    }
    let root = match (&args.runtime_dir, &vmi) {
        (Some(dir), _) => dir.clone(),
        (None, Some(vmi)) => Path::new("/run/virt-launcher").join(vmi.domain_name()),
        (None, None) => Path::new("/run/virt-launcher").join(format!("launcher-{}", launcher_id())),
    };
    let layout = PodLayout::new(absolute(&root), !args.no_isolate).with_capabilities_seed(
        (!args.no_capabilities_cache).then(|| absolute(&args.capabilities_cache)),
    );
    // One launcher per VM on this machine, before any import or daemon (a launcher waiting for
    // a Sync or a migration has no VM yet: a migration target runs the source's VM by design).
    // A migration target takes the lock over once the VM has arrived (the source still runs
    // it until then).
    let _vm_lock = match &vmi {
        Some(vmi) if layout.is_isolated() && !args.migration_target => Some(pod::lock_vm(
            Path::new(pod::VM_LOCK_DIR),
            &vmi.domain_name(),
            layout.root(),
        )?),
        _ => None,
    };

    let mut overrides = args.paths.overrides();
    if layout.is_isolated() {
        // Standalone: the VM's private and ephemeral files live in our runtime root, not in
        // the host's /var/run/kubevirt* directories.
        overrides.private_dir = Some(layout.private_dir());
        overrides.ephemeral_disks_dir = Some(layout.root().join("ephemeral"));
    }
    // The whole VM is checked before any import (hours for a large image) or daemon: its
    // DataVolume templates, then its conversion with the claims as the templates describe them.
    if let (Some(vm), Some(vmi)) = (&args.vm, &vmi) {
        check_before_import(
            vm,
            vmi,
            &overrides,
            args.domain_type,
            &standalone_network(&args, &layout),
        )?;
    }
    // Standalone DataVolumes: claims imported into the storage dir; kept (loop devices of Block
    // claims attached) until the launcher returns.
    // A migration target: the source's local disks' sizes (the destination images of a block
    // migration are created at those), from the launcher running the VM here.
    let source_sizes = match &vmi {
        Some(vmi) if args.migration_target => source_disk_sizes(&vmi.domain_name()),
        _ => Default::default(),
    };
    let mut incoming = None;
    let _claims = match (&args.vm, &vmi) {
        (Some(vm), Some(vmi)) if args.migration_target => {
            // Nothing is imported: the claims come with the VM (shared, or copied by --block).
            let storage = absolute(&args.storage_dir);
            let templates = datavolume::templates(&datavolume::load_vm(vm)?, vmi.namespace())?;
            // Dropped before the VM arrives (an error, a stop), it removes what it created.
            let created = datavolume::incoming::prepare(vmi, &templates, &storage, &source_sizes)?;
            let options = datavolume::Options {
                storage_dir: storage.clone(),
                progress: datavolume::ProgressStyle::auto(args.json_logs),
                importer: datavolume::importer_path(),
            };
            let mut paths = overrides.paths_for(vmi);
            let claims = datavolume::attach(vmi, &options, &mut paths)?;
            incoming = Some(std::sync::Arc::new(std::sync::Mutex::new(created)));
            overrides.vmi_disks_dir = Some(paths.vmi_disks_dir);
            overrides.block_dev_dir = Some(paths.block_dev_dir);
            overrides.trusted_roots = vec![storage.join("claims"), PathBuf::from("/dev")];
            Some(claims)
        }
        (Some(vm), Some(vmi)) => {
            let options = datavolume::Options {
                storage_dir: absolute(&args.storage_dir),
                progress: datavolume::ProgressStyle::auto(args.json_logs),
                importer: datavolume::importer_path(),
            };
            let (vmi, mut paths) = (vmi.clone(), overrides.paths_for(vmi));
            // In `virt-launcher-import` (its TLS stack never enters our memory), spawned from
            // this thread, which outlives it (it dies with its parent thread).
            let process = datavolume::spawn_import(vm, &vmi, &options)?;
            let stopper = process.stopper();
            let Some((claims, paths)) = unless_stopped(
                move || {
                    process.wait()?;
                    datavolume::attach(&vmi, &options, &mut paths).map(|c| (c, paths))
                },
                move || stopper.stop(),
            )?
            else {
                // README: stopped before any VM ran is exit 0. The import works in a scratch
                // directory and renames only a finished image into place: nothing is lost, and
                // the next start imports again.
                tracing::info!("stopped during the import; no VM was started");
                return Ok(0);
            };
            overrides.vmi_disks_dir = Some(paths.vmi_disks_dir);
            overrides.block_dev_dir = Some(paths.block_dev_dir);
            // The view links each volume to its claim and each Block claim to its loop device.
            overrides.trusted_roots = vec![
                absolute(&args.storage_dir).join("claims"),
                PathBuf::from("/dev"),
            ];
            Some(claims)
        }
        _ => None,
    };
    // Standalone containerDisk volumes: each image pulled into the cache (or found there) and
    // linked into our runtime root; the overlays of an earlier run are discarded and this
    // run's are removed when the launcher returns.
    let _container_disks = match &vmi {
        Some(v) if layout.is_isolated() && datavolume::container_disk::wanted(v) => {
            let mut disks = match &args.container_disk_dir {
                Some(dir) => {
                    overrides.container_disks_dir = Some(absolute(dir));
                    datavolume::container_disk::ContainerDisks::default()
                }
                None => {
                    let cache = absolute(&args.container_disk_cache);
                    let links = layout.root().join("container-disks");
                    let options = datavolume::container_disk::Options {
                        cache_dir: cache.clone(),
                        progress: datavolume::ProgressStyle::auto(args.json_logs),
                    };
                    // Pulled in `virt-launcher-import` (the TLS stack stays out of our memory),
                    // which leaves the links for us to own.
                    // The VMI goes to it in a file of our runtime root, which may not exist
                    // yet (created with the mode PodLayout::create gives it); removed once read.
                    let vmi_file = layout.root().join("container-disks-vmi.json");
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(layout.root())
                        .with_context(|| layout.root().display().to_string())?;
                    std::fs::write(&vmi_file, serde_json::to_vec(v)?)
                        .with_context(|| vmi_file.display().to_string())?;
                    let process = datavolume::spawn_container_disk_pull(
                        &datavolume::importer_path(),
                        options.progress,
                        &vmi_file,
                        &options.cache_dir,
                        &links,
                    )?;
                    let stopper = process.stopper();
                    let l2 = links.clone();
                    let pulled = unless_stopped(
                        move || {
                            process
                                .wait()
                                .map(|()| datavolume::container_disk::ContainerDisks::adopt(l2))
                        },
                        move || stopper.stop(),
                    );
                    let _ = std::fs::remove_file(&vmi_file);
                    let Some(disks) = pulled? else {
                        tracing::info!(
                            "stopped while pulling a containerDisk image; no VM was started"
                        );
                        return Ok(0);
                    };
                    overrides.container_disks_dir = Some(links);
                    overrides.trusted_roots.push(cache);
                    disks
                }
            };
            let paths = overrides.paths_for(v);
            disks.discard_overlays(v, |volume| paths.overlay(volume));
            Some(disks)
        }
        _ => None,
    };
    // As virt-controller does from the claims: their access modes decide what a migration
    // may share (a ReadWriteMany DataVolume is not local to this launcher).
    if let (Some(claims), Some(vmi)) = (&_claims, vmi.as_mut()) {
        claims.record_in_status(&absolute(&args.storage_dir), vmi);
    }
    let planner = Planner {
        domain_type: args.domain_type,
        paths: overrides,
        standalone_network: Some(standalone_network(&args, &layout)),
    };
    if let Some(vmi) = &vmi {
        if let Some(why) = vmi.nothing_to_boot() {
            tracing::warn!("{}", vmi.user_text(&why));
        }
    }
    // A bad spec or a missing volume is reported before anything is started.
    let console_log = match (&vmi, input) {
        (Some(vmi), Some(input)) => Some(
            planner
                .plan(vmi)
                .map_err(|e| anyhow::anyhow!("{}", vmi.user_text(&e.to_string())))
                .with_context(|| input.display().to_string())?
                .facts
                .paths
                .serial_log(),
        ),
        _ => None,
    };
    let socket = args
        .socket
        .clone()
        .map(|s| absolute(&s))
        .unwrap_or_else(|| layout.root().join("launcher-sock"));

    layout.create()?;
    let _lock = layout.lock()?;
    layout.clear_stale(&_lock);
    layout.create()?;
    keep_log(&layout, args.log_max_bytes);
    layout.seed_capabilities();
    if layout.is_isolated() {
        let hostname = args
            .hostname
            .clone()
            .unwrap_or_else(|| hostname(vmi.as_ref()));
        pod::isolate(&layout, &hostname)?;
    }
    layout.write_configs(&pod::random_uuid(), vmi.is_none() || args.migration_target)?;
    tracing::info!(
        input = input.map(|p| p.display().to_string()),
        domain_type = args.domain_type.as_str(),
        runtime_dir = %layout.root().display(),
        socket = %socket.display(),
        console_log = console_log.as_ref().map(|p| p.display().to_string()),
        "launcher starting"
    );
    let api = ServerConfig {
        socket,
        allowed_uids: args.allow_uids.clone(),
        group: args.socket_group,
        cmd_auth_token: cmd_auth_token(),
    };
    let opts = RunOptions {
        planner,
        vmi,
        qemu_timeout: Duration::from_secs(args.qemu_timeout),
        detach_timeout: Duration::from_secs_f64(args.detach_timeout),
        log_max_bytes: args.log_max_bytes,
        on_sigterm: OnSigterm::ShutDown,
        migration_proxy_dir: args
            .kubevirt_share_dir
            .as_deref()
            .map(pod::migration_proxy_dir),
        storage: _claims.as_ref().map(|c| vm::snapshot::SnapshotStorage {
            dir: absolute(&args.storage_dir),
            claims: c.volumes.clone(),
        }),
        console_silence: (args.console_silence_warning > 0)
            .then(|| Duration::from_secs(args.console_silence_warning)),
        incoming: args.migration_target.then_some(source_sizes),
    };

    // A migration target: once the VM runs here, the claims created for it are complete and
    // the VM's machine-wide lock passes to this launcher (as the source exits).
    let on_arrival: Option<Box<dyn FnOnce() + Send>> = match (&opts.vmi, args.migration_target) {
        (Some(vmi), true) => {
            let claims = incoming.clone();
            let (domain, root) = (vmi.domain_name(), layout.root().to_path_buf());
            let isolated = layout.is_isolated();
            Some(Box::new(move || {
                if let Some(Ok(mut c)) = claims.as_ref().map(|c| c.lock()) {
                    if let Err(e) = c.arrived() {
                        tracing::error!(error = %e, "cannot complete the migrated claim");
                    }
                }
                if isolated {
                    // Held until this process exits (the descriptor is close-on-exec).
                    std::thread::spawn(move || {
                        match pod::lock_vm_when_free(Path::new(pod::VM_LOCK_DIR), &domain, &root) {
                            Ok(lock) => std::mem::forget(lock),
                            Err(e) => tracing::warn!(error = %e, "cannot take the VM's lock over"),
                        }
                    });
                }
            }))
        }
        _ => None,
    };
    run_core(
        &layout,
        opts,
        &api,
        true,
        args.kubevirt_share_dir.clone(),
        on_arrival,
    )
}

/// The launcher's log goes to `<runtime dir>/launcher.log` too (`launcherctl logs`), fresh at
/// every start as a container's log is; without it (a read-only runtime dir) stderr only.
fn keep_log(layout: &PodLayout, max_bytes: u64) {
    let path = layout.root().join("launcher.log");
    let _ = std::fs::remove_file(&path);
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    let _ = std::fs::remove_file(&old);
    if let Err(e) = logging::also_to_file(&path, max_bytes) {
        tracing::warn!(path = %path.display(), error = %e, "the launcher's log goes to stderr only");
    }
}

/// The sizes of the local (not shared) disks of the launcher running VM `domain`
/// (`<namespace>_<name>`) on this machine, found through the VM's machine-wide lock; empty
/// when none answers.
fn source_disk_sizes(domain: &str) -> std::collections::HashMap<String, u64> {
    let Some(dir) = pod::vm_lock_holder(Path::new(pod::VM_LOCK_DIR), domain) else {
        return Default::default();
    };
    let socket = dir.join("launcher-sock");
    let ask = async {
        let mut c = api::client::connect(&socket).await.ok()?;
        let d = c.get_domain(api::pb::Empty {}).await.ok()?.into_inner();
        Some(
            d.disks
                .into_iter()
                .filter(|d| !d.shared)
                .map(|d| (d.volume, d.size_bytes))
                .collect(),
        )
    };
    let sizes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .and_then(|rt| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), ask)
                    .await
                    .ok()
                    .flatten()
            })
        });
    if sizes.is_none() {
        tracing::info!(socket = %socket.display(), "no source launcher answers for this VM here");
    }
    sizes.unwrap_or_default()
}

fn standalone_network(
    args: &RunArgs,
    layout: &PodLayout,
) -> virt_launcher::convert::facts::StandaloneNetwork {
    virt_launcher::convert::facts::StandaloneNetwork {
        publish: args.publish.clone(),
        host_bridge: args.host_bridge.clone(),
        passt_log: layout.root().join("passt.log"),
    }
}

/// `run --vm`: the DataVolume templates and the VM's conversion, checked without any I/O
/// (the claims taken as their templates describe them), so that a bad spec fails before an
/// import; errors name the fields as written in the VM.
fn check_before_import(
    vm_file: &Path,
    vmi: &VirtualMachineInstance,
    overrides: &PathOverrides,
    domain_type: DomainType,
    network: &virt_launcher::convert::facts::StandaloneNetwork,
) -> Result<()> {
    let vm = datavolume::load_vm(vm_file)?;
    let templates = datavolume::templates(&vm, vmi.namespace())?;
    let mut facts = virt_launcher::convert::facts::PodFacts::defaults(vmi);
    facts.domain_type = domain_type;
    facts.paths = overrides.paths_for(vmi);
    facts.standalone_network = Some(network.clone());
    for t in templates
        .iter()
        .filter(|t| t.volume_mode == datavolume::VolumeMode::Block)
    {
        for v in &vmi.spec.volumes {
            let claim = v.data_volume.as_ref().map(|d| d.name.as_str()).or(v
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str()));
            if claim == Some(t.claim.name.as_str()) {
                facts.block_volumes.insert(v.name.clone());
            }
        }
    }
    convert::convert(vmi, &facts)
        .and_then(|domain| virt_launcher::vm::plan::pcie_fits(vmi, &domain))
        .map_err(|e| anyhow::anyhow!("{}", vmi.user_text(&e.to_string())))
        .with_context(|| vm_file.display().to_string())?;
    Ok(())
}

/// Runs `work` (an import or a pull), unless SIGTERM or SIGINT comes first (None): then
/// `on_stop` runs (it kills an import's process group) and the work is left to die with the
/// process. Without this a launcher that is PID 1 of its namespace would ignore both until the
/// VM ran.
fn unless_stopped<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
    on_stop: impl FnOnce(),
) -> Result<Option<T>>
where
    T: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let outcome = runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let import = tokio::task::spawn_blocking(work);
        tokio::select! {
            r = import => Ok(Some(r.context("import task")??)),
            _ = term.recv() => { on_stop(); Ok(None) }
            _ = int.recv() => { on_stop(); Ok(None) }
        }
    });
    // An import that was left runs on until the process ends: do not wait for it.
    runtime.shutdown_background();
    outcome
}

/// Runs the core and the API on a runtime of their own until the VM stops; then removes the
/// daemons' state. `subreaper`: whether orphans (a daemonized QEMU) become ours;
/// `share_dir`: KubeVirt's share dir, whose notify pipe gets the domain's events.
fn run_core(
    layout: &PodLayout,
    opts: RunOptions,
    api: &ServerConfig,
    subreaper: bool,
    share_dir: Option<PathBuf>,
    on_arrival: Option<Box<dyn FnOnce() + Send>>,
) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let outcome = runtime.block_on(serve(layout, opts, api, subreaper, share_dir, on_arrival));
    runtime.shutdown_timeout(Duration::from_secs(2));
    tracing::debug!("runtime shut down");
    if let Ok(o) = &outcome {
        if let Some(reason) = o.reason.filter(|_| o.exit_code() != 0) {
            // One line that says why, with what QEMU said last (its log goes with the
            // daemons' state).
            let tail = qemu_log_tail(QEMU_LOG_DIR, 5);
            let reason = format!("{reason:?}").to_lowercase();
            tracing::error!(reason = %reason, qemu_log = %tail, "the VM stopped unexpectedly");
            eprintln!("virt-launcher: the VM stopped unexpectedly ({reason}); QEMU's last log lines: {tail}");
        }
    }
    layout.remove_daemon_state();
    tracing::debug!("runtime directory cleaned");
    Ok(outcome?.exit_code())
}

/// Where libvirt keeps QEMU's log (the pod's own: private in standalone mode).
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";

/// The last `n` lines of the newest QEMU log in `dir`, joined with ` | ` (one line).
fn qemu_log_tail(dir: &str, n: usize) -> String {
    let newest = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
    });
    let Some(text) = newest.and_then(|e| std::fs::read_to_string(e.path()).ok()) else {
        return format!("none ({dir} has no QEMU log)");
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Starts the pod's daemons, the core and the control API on it, and runs until the VM
/// stops. Always stops the daemons and kills leftover processes before returning, whether the
/// VM ran or not.
async fn serve(
    layout: &PodLayout,
    opts: RunOptions,
    api: &ServerConfig,
    subreaper: bool,
    share_dir: Option<PathBuf>,
    on_arrival: Option<Box<dyn FnOnce() + Send>>,
) -> Result<vm::Outcome> {
    let reaper = Reaper::start_as(subreaper).context("cannot set up process supervision")?;
    let (daemon_tx, daemon_events) = mpsc::unbounded_channel();
    let mut daemons = Daemons::start(&reaper, layout, daemon_tx).await?;
    let (stop_follow, follow) = watch::channel(false);
    let pod = vm::Pod {
        layout: layout.clone(),
        daemon_events,
        stop_follow: follow,
    };
    let result = async {
        let core = vm::Supervisor::connect(pod, opts).await?;
        let server = api::server::serve(core.handle(), api).await?;
        let notify = share_dir.map(|d| api::kubevirt::notify::spawn(core.handle(), d));
        if let Some(hook) = on_arrival {
            tokio::spawn(when_arrived(core.handle(), hook));
        }
        let outcome = core.run().await;
        tracing::debug!("core ended");
        // As KubeVirt's launcher: wait up to 15 s for the final event to be delivered.
        if let Some(n) = notify {
            let _ = tokio::time::timeout(Duration::from_secs(15), n).await;
        }
        server.shutdown().await;
        tracing::debug!("control API closed");
        Ok(outcome?)
    }
    .await;
    let _ = stop_follow.send(true);
    daemons.stop().await;
    tracing::debug!("daemons stopped");
    pod::children::kill_leftovers().await;
    tracing::debug!("no process left");
    result
}

/// Runs `hook` (off the runtime) once the VM this prepared target awaits has arrived.
async fn when_arrived(handle: vm::Handle, hook: Box<dyn FnOnce() + Send>) {
    let arrived = handle
        .wait_status(|s| {
            s.migration_target.is_none()
                && s.migration
                    .as_ref()
                    .is_some_and(|m| m.phase == vm::state::MigrationPhase::Succeeded)
        })
        .await;
    if arrived {
        let _ = tokio::task::spawn_blocking(hook).await;
    }
}

/// What names this launcher on the machine: in its own PID namespace its pid is 1, and the
/// waiter in front of it has the machine's pid.
fn launcher_id() -> u32 {
    pod::pidns::waiter_pid().unwrap_or_else(std::process::id)
}

/// A pod-like hostname: libvirt refuses to migrate between two daemons with the same one.
fn hostname(vmi: Option<&VirtualMachineInstance>) -> String {
    let suffix = format!("{:05x}", launcher_id() & 0xfffff);
    let mut base = format!(
        "virt-launcher-{}",
        vmi.map(|v| v.metadata.name.as_str()).unwrap_or("pod")
    );
    base.truncate(63 - suffix.len() - 1);
    format!("{base}-{suffix}")
}

// ------------------------------------------------------------------------- KubeVirt's pod

/// KubeVirt's in-pod paths that are not flags.
const KUBEVIRT_PRIVATE_DIR: &str = "/var/run/kubevirt-private";
const KUBEVIRT_LIBVIRT_RUN_DIR: &str = "/var/run/libvirt";

/// Whether `virt-launcher` was started with KubeVirt's command line (by
/// `virt-launcher-monitor`, as virt-controller's pod does): no subcommand of ours first, and
/// at least one of KubeVirt's launcher flags. `virt-launcher run …`, `render …`, `--help` and
/// `--version` keep their meaning.
fn is_kubevirt_command_line(argv: &[String]) -> bool {
    match argv.first().map(String::as_str) {
        None | Some("run" | "render" | "help" | "--help" | "-h" | "--version" | "-V") => false,
        Some(_) => argv.iter().any(|a| cmdline::is_known_flag(a)),
    }
}

/// The launcher in KubeVirt's `compute` container: KubeVirt's flags and paths, the command
/// socket at `<share>/sockets/launcher-sock`, no private namespace, not a subreaper (QEMU
/// goes to the monitor), SIGTERM marks the domain for graceful shutdown.
fn run_kubevirt(argv: Vec<String>) -> Result<i32> {
    let args = KubevirtArgs::parse(argv)?;
    if !args.unknown.is_empty() {
        tracing::warn!(flags = %args.unknown.join(" "), "ignoring unknown flags");
    }
    if args.simulate_crash {
        anyhow::bail!("--simulate-crash: crashing as asked");
    }
    if !nix::unistd::geteuid().is_root() {
        // KubeVirt runs non-root VMIs (`--run-as-nonroot`, uid 107) unless its `Root` feature
        // gate is on (`pkg/virt-api/webhooks/mutating-webhook/mutators/vmi-mutator.go`).
        anyhow::bail!(
            "running as uid {}{}: non-root VMIs are not supported yet (libvirt's session mode); \
             enable KubeVirt's Root feature gate so VMIs run as root",
            nix::unistd::geteuid(),
            if args.run_as_nonroot {
                " (--run-as-nonroot)"
            } else {
                ""
            }
        );
    }
    if args.run_as_nonroot {
        tracing::warn!(
            "--run-as-nonroot: running as root anyway (non-root VMIs are not supported yet)"
        );
    }
    if args.hook_sidecars > 0 {
        tracing::warn!(
            count = args.hook_sidecars,
            "--hook-sidecars: hook sidecars are not supported yet; not waiting for them"
        );
    }
    if args.hypervisor != "kvm" {
        tracing::warn!(hypervisor = %args.hypervisor, "--hypervisor: only kvm is supported");
    }
    // Our `--domain-type` (or VIRT_LAUNCHER_DOMAIN_TYPE, as for `run`), else KubeVirt's rule.
    let forced = args
        .domain_type
        .clone()
        .map(|t| ("--domain-type", t))
        .or_else(|| {
            std::env::var("VIRT_LAUNCHER_DOMAIN_TYPE")
                .ok()
                .map(|t| ("VIRT_LAUNCHER_DOMAIN_TYPE", t))
        });
    let domain_type = match forced {
        Some((by, t)) => parse_domain_type(&t).map_err(|e| anyhow::anyhow!("{by}: {e}"))?,
        None if args.allow_emulation && !Path::new("/dev/kvm").exists() => {
            tracing::warn!(
                "/dev/kvm is missing: software emulation (TCG), as --allow-emulation allows"
            );
            DomainType::Qemu
        }
        None => DomainType::Kvm,
    };
    let layout = PodLayout::kubevirt(
        Path::new(KUBEVIRT_PRIVATE_DIR),
        KUBEVIRT_LIBVIRT_RUN_DIR,
        absolute(&args.container_disk_dir),
    );
    let container_disks = absolute(&args.container_disk_dir);
    let planner = Planner {
        domain_type,
        paths: PathOverrides {
            hotplug_disks_dir: Some(absolute(&args.hotplug_disk_dir)),
            ephemeral_disks_dir: Some(absolute(&args.ephemeral_disk_dir)),
            // KubeVirt mounts the kernelBoot container's files here
            // (`pkg/container-disk/container-disk.go` GetKernelBootArtifactPathFromLauncherView).
            kernel_boot_dir: Some(container_disks.join("kernel-boot")),
            container_disks_dir: Some(container_disks),
            ..PathOverrides::default()
        },
        standalone_network: None,
    };
    let socket = absolute(&args.init_socket()).with_file_name("launcher-sock");
    for dir in [
        socket.parent().unwrap_or(Path::new("/")),
        &args.ephemeral_disk_dir,
        &args.hotplug_disk_dir,
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // The VM's private directory (console socket, generated ISOs), as KubeVirt's launcher
    // creates it at start-up; the VMI's uid keys it (`PodPaths::kubevirt_defaults`).
    if !args.uid.is_empty() && !args.uid.contains('/') && args.uid != "." && args.uid != ".." {
        let vm_private = Path::new(KUBEVIRT_PRIVATE_DIR).join(&args.uid);
        std::fs::create_dir_all(&vm_private)
            .with_context(|| format!("create {}", vm_private.display()))?;
    }
    layout.create()?;
    let _lock = layout.lock()?;
    keep_log(&layout, virt_launcher::pod::daemons::DEFAULT_LOG_MAX_BYTES);
    // Not isolated: no migration hook (the handler's proxies are what reach this libvirtd).
    layout.write_configs(&pod::random_uuid(), false)?;
    layout.link_virtqemud_sock()?;
    layout.link_virtqemud_program()?;
    tracing::info!(
        domain = %args.domain_name(),
        uid = %args.uid,
        domain_type = domain_type.as_str(),
        socket = %socket.display(),
        qemu_timeout_s = args.qemu_timeout.as_secs_f64(),
        grace_period_s = args.grace_period.as_secs(),
        ignored_flags = %args.ignored.join(" "),
        "launcher starting in KubeVirt's pod"
    );
    let api = ServerConfig {
        socket,
        // virt-handler runs as root.
        allowed_uids: vec![0],
        group: None,
        cmd_auth_token: cmd_auth_token(),
    };
    let opts = RunOptions {
        planner,
        vmi: None,
        qemu_timeout: args.qemu_timeout,
        detach_timeout: Duration::from_secs(30),
        log_max_bytes: virt_launcher::pod::daemons::DEFAULT_LOG_MAX_BYTES,
        on_sigterm: OnSigterm::MarkForHandler {
            grace: args.grace_period,
        },
        migration_proxy_dir: Some(pod::migration_proxy_dir(&absolute(&args.share_dir))),
        storage: None,
        // KubeVirt's launcher says nothing of a silent console; neither does ours there.
        console_silence: None,
        incoming: None,
    };
    run_core(
        &layout,
        opts,
        &api,
        false,
        Some(absolute(&args.share_dir)),
        None,
    )
}

/// The pod's cmd-auth token file: KubeVirt's path, unless `VIRT_LAUNCHER_CMD_AUTH_TOKEN`
/// names another (tests, which cannot use the host's `/var/run/secrets`).
fn cmd_auth_token() -> PathBuf {
    std::env::var_os("VIRT_LAUNCHER_CMD_AUTH_TOKEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| virt_launcher::api::kubevirt::auth::TOKEN_FILE.into())
}

/// `virt-launcher snapshot ...`: against the storage directory, no launcher needed.
fn snapshot_command(cmd: SnapshotCmd) -> Result<i32> {
    use virt_launcher::datavolume::snapshot::{self, Listed};
    let sref = |at: &SnapshotAt, name: &str| {
        snapshot::check_ref(at.namespace.as_deref().unwrap_or("default"), name)
    };
    match cmd {
        SnapshotCmd::Create {
            storage_dir,
            vm,
            name,
            json_logs,
        } => {
            logging::init(json_logs);
            let m = snapshot::take_offline(
                &absolute(&storage_dir),
                &absolute(&vm),
                &name,
                datavolume::ProgressStyle::auto(json_logs),
            )?;
            println!(
                "snapshot {}/{} of the stopped VM {} taken: {} bytes ({})",
                m.namespace,
                m.name,
                m.vm,
                m.size(),
                m.volumes
                    .iter()
                    .map(|v| v.volume.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(0)
        }
        SnapshotCmd::List { at, json } => {
            let storage = absolute(&at.storage_dir);
            if let Some(ns) = &at.namespace {
                snapshot::check_ref(ns, "x")?;
            }
            let listed = snapshot::list(&storage, at.namespace.as_deref());
            if json {
                for l in &listed {
                    let v = match l {
                        Listed::Ready(m) => {
                            serde_json::json!({"phase": "Succeeded", "readyToUse": true, "manifest": m})
                        }
                        Listed::Incomplete { namespace, name } => serde_json::json!({
                            "phase": "InProgress", "readyToUse": false,
                            "namespace": namespace, "name": name}),
                    };
                    println!("{v}");
                }
                return Ok(0);
            }
            println!(
                "{:<16} {:<24} {:<16} {:<10} {:<21} {:>12}  INDICATIONS",
                "NAMESPACE", "NAME", "VM", "READY", "CREATED", "BYTES"
            );
            for l in &listed {
                match l {
                    Listed::Ready(m) => println!(
                        "{:<16} {:<24} {:<16} {:<10} {:<21} {:>12}  {}",
                        m.namespace,
                        m.name,
                        m.vm,
                        "true",
                        m.creation_time,
                        m.size(),
                        m.indications.join(",")
                    ),
                    Listed::Incomplete { namespace, name } => println!(
                        "{namespace:<16} {name:<24} {:<16} {:<10} {:<21} {:>12}  (incomplete: being taken, or interrupted)",
                        "-", "false", "-", "-"
                    ),
                }
            }
            Ok(0)
        }
        SnapshotCmd::Restore {
            at,
            name,
            json_logs,
        } => {
            logging::init(json_logs);
            let storage = absolute(&at.storage_dir);
            let s = sref(&at, &name)?;
            let done = snapshot::restore(&storage, &s, datavolume::ProgressStyle::auto(json_logs))?;
            for r in &done {
                println!(
                    "restored volume {} onto claim {} ({} bytes)",
                    r.volume, r.claim, r.size
                );
            }
            Ok(0)
        }
        SnapshotCmd::Delete { at, name } => {
            let storage = absolute(&at.storage_dir);
            let s = sref(&at, &name)?;
            snapshot::delete(&storage, &s)?;
            println!("snapshot {s} deleted");
            Ok(0)
        }
    }
}
