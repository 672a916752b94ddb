//! `launcherctl`: a debug client for people in the pod. Readable output by default, `--json`
//! for scripts.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tonic::Code;

use virt_launcher::api::client;
use virt_launcher::api::pb::{self, DomainState, EventKind, VolumePhase};

#[derive(Parser)]
#[command(
    name = "launcherctl",
    version,
    about = "Talk to a virt-launcher over its control socket"
)]
struct Cli {
    /// The launcher's control socket [default: KubeVirt's pod's,
    /// /var/run/kubevirt/sockets/launcher-sock].
    #[arg(long, env = "LAUNCHER_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// The standalone launcher of this VM (NAME or NAMESPACE/NAME; see `launcherctl list`);
    /// it takes precedence over --socket and LAUNCHER_SOCKET.
    #[arg(long, global = true, value_name = "NAME")]
    vm: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The standalone launchers on this machine: VM, state, runtime directory.
    List,
    /// The domain: state, reason, disks and their phases.
    Status,
    /// The VMI the launcher runs (JSON), as last synced.
    Vmi,
    /// Follow domain and volume events (Ctrl-C to stop).
    Events {
        /// Resume after this sequence number (0: from now, starting with the current state).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Attach to the guest's serial console (Ctrl-] detaches), or print its log (--log).
    ///
    /// As `virtctl console`: what you type goes to the guest, what it writes comes back;
    /// Ctrl-] (byte 0x1d) detaches, as does the end of stdin. On a terminal, the terminal is
    /// put in raw mode and restored on exit. With --log, print the console's log instead (what
    /// the guest wrote since it started). With --json, the guest's output is one JSON object
    /// per line (`{"line": ...}`), attached or not.
    Console {
        /// Print the console log instead of attaching.
        #[arg(long)]
        log: bool,
        /// With --log: keep printing what the guest adds (implies --log).
        #[arg(long, short)]
        follow: bool,
    },
    /// The live domain XML, as libvirt has it (as `virsh dumpxml` prints it).
    Xml,
    /// The launcher's own log (what it writes on stderr), as `kubectl logs` prints a
    /// container's.
    ///
    /// The launcher keeps it in `<runtime dir>/launcher.log` (rotated to `launcher.log.1` at
    /// --log-max-bytes), fresh at every start.
    Logs {
        /// Keep printing what the launcher adds (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines (then follow from there with -f).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Grow a volume's claim to SIZE, as when a PVC is resized; the guest sees it at once.
    ///
    /// The claim's capacity in the VMI's status becomes SIZE (what virt-controller records for
    /// a grown claim) and the launcher grows the disk online: a Filesystem claim's disk.img to
    /// SIZE less the filesystem overhead (5.5% unless the status gives filesystemOverhead).
    /// Shrinking is refused.
    Expand {
        /// The VM's volume (a persistentVolumeClaim or dataVolume volume).
        volume: String,
        /// The claim's new capacity, a Kubernetes quantity (`2Gi`, `500M`).
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
    /// Hot-plug a PVC (or DataVolume) as a disk: adds it to the VMI and syncs; a volume whose
    /// attach failed is retried.
    Attach {
        /// The new volume's name (and its disk's).
        volume: String,
        /// The claim's name (default: the volume's name).
        #[arg(long)]
        claim: Option<String>,
        /// The disk's bus: virtio or scsi.
        #[arg(long, default_value = "virtio")]
        bus: String,
        /// The volume is a DataVolume rather than a plain PVC.
        #[arg(long)]
        datavolume: bool,
    },
    /// Sync the VMI in FILE (JSON or YAML, checked as `virt-launcher run` checks a file): the
    /// running VM is reconciled to it (hot-plug, unplug, expansion).
    Sync {
        /// The VirtualMachineInstance file.
        file: PathBuf,
    },
    /// Hot-unplug a volume: removes it from the VMI and syncs (waits for the guest).
    Detach {
        /// The hot-plugged volume's name.
        volume: String,
    },
    /// Pause the guest's CPUs (a paused VM stays paused).
    Pause,
    /// Resume a paused guest (a running VM stays running).
    Resume,
    /// ACPI shutdown; destroyed after the grace period.
    Shutdown {
        /// Seconds [default: the VMI's terminationGracePeriodSeconds].
        #[arg(long)]
        grace: Option<u32>,
    },
    /// Immediate power-off.
    Kill,
    /// ACPI reboot request.
    Reboot,
    /// Freeze the guest's filesystems (guest agent); thawed automatically after --timeout.
    Freeze {
        /// Seconds after which the filesystems are thawed if no unfreeze came.
        #[arg(long, default_value_t = 60)]
        timeout: u32,
    },
    /// Thaw the guest's filesystems.
    Unfreeze,
    /// CPU, memory and per-disk I/O figures.
    Stats,
    /// Versions and capabilities.
    Info,
    /// Whether the launcher answers.
    Ping,
    /// Ready this VM-less launcher to receive the VMI in FILE by live migration.
    PrepareTarget {
        /// The VMI the source runs (JSON or YAML).
        vmi: PathBuf,
        /// The source launcher's control socket: its local (not shared) disks' sizes size the
        /// destination images a block migration copies into (created when missing).
        #[arg(long)]
        source: Option<PathBuf>,
    },
    /// Live-migrate the VM to the prepared launcher behind --target; follows progress.
    Migrate {
        /// The target launcher's control socket.
        #[arg(long)]
        target: PathBuf,
        /// MiB/s (0: unlimited).
        #[arg(long, default_value_t = 0)]
        bandwidth: u64,
        /// Allow switching to post-copy when pre-copy does not converge.
        #[arg(long)]
        post_copy: bool,
        /// Allow QEMU to throttle the guest's CPUs so that the copy converges.
        #[arg(long)]
        auto_converge: bool,
        /// Copy local (non-shared, e.g. ReadWriteOnce) disks to the target over NBD.
        #[arg(long)]
        block: bool,
        /// Abort when the migration takes longer than this many seconds per GiB of guest
        /// memory (0: no limit).
        #[arg(long, default_value_t = 0)]
        completion_timeout_per_gib: u64,
        /// Abort when no progress is made for this many seconds (0: no limit).
        #[arg(long, default_value_t = 0)]
        progress_timeout: u64,
    },
    /// Abort the running migration (the VM stays here).
    CancelMigration,
    /// Snapshot every claim of the running VM into the launcher's storage directory (list,
    /// restore and delete with `virt-launcher snapshot`).
    Snapshot {
        /// The snapshot's name (unique in the VM's namespace).
        name: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("launcherctl: {e:#}");
        std::process::exit(1);
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::Unavailable => "unavailable",
        Code::PermissionDenied => "permission denied",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::OutOfRange => "out of range",
        _ => "error",
    };
    anyhow::anyhow!("{code}: {}", s.message())
}

/// KubeVirt's pod's control socket.
const POD_SOCKET: &str = "/var/run/kubevirt/sockets/launcher-sock";

/// The standalone launcher's runtime directory for VM `vm` (NAME or NAMESPACE/NAME), from the
/// machine-wide lock it holds (`virt-launcher run` writes its runtime directory there).
fn runtime_dir_of(vm: &str) -> Result<PathBuf> {
    let (ns, name) = vm.split_once('/').unwrap_or(("default", vm));
    if !virt_launcher::spec::is_dns1123_label(ns)
        || !virt_launcher::spec::is_dns1123_subdomain(name)
    {
        bail!("--vm {vm:?}: not a VM name (NAME or NAMESPACE/NAME)");
    }
    let lock_dir = Path::new(virt_launcher::pod::VM_LOCK_DIR);
    virt_launcher::pod::vm_lock_holder(lock_dir, &format!("{ns}_{name}")).ok_or_else(|| {
        anyhow::anyhow!(
            "no standalone launcher has run VM {ns}/{name} here (see `launcherctl list`)"
        )
    })
}

/// The launchers that hold a VM lock here: (namespace/name, runtime dir), sorted.
fn standalone_launchers() -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(virt_launcher::pod::VM_LOCK_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let domain = file.strip_suffix(".lock")?;
            let dir = std::fs::read_to_string(e.path()).ok()?;
            Some((domain.replacen('_', "/", 1), PathBuf::from(dir.trim())))
        })
        .collect();
    out.sort();
    out
}

async fn list(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for (vm, dir) in standalone_launchers() {
        let socket = dir.join("launcher-sock");
        // A lock file outlives its launcher: only those that answer are listed.
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), client::connect(&socket)).await
        else {
            continue;
        };
        let state = match c.get_domain(pb::Empty {}).await {
            Ok(d) => state_name(d.into_inner().state).to_string(),
            Err(e) => format!("({})", e.message()),
        };
        rows.push((vm, state, dir));
    }
    if json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(vm, state, dir)| json!({"vm": vm, "state": state, "runtimeDir": dir.display().to_string()}))
            .collect();
        println!("{}", Value::Array(v));
    } else if rows.is_empty() {
        println!("no standalone launcher runs here");
    } else {
        println!("{:<32} {:<12} RUNTIME DIR", "VM", "STATE");
        for (vm, state, dir) in rows {
            println!("{vm:<32} {state:<12} {}", dir.display());
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    if let Cmd::List = cli.command {
        return list(json).await;
    }
    let socket = match (&cli.vm, &cli.socket) {
        (Some(vm), _) => runtime_dir_of(vm)?.join("launcher-sock"),
        (None, Some(s)) => s.clone(),
        (None, None) => PathBuf::from(POD_SOCKET),
    };
    let mut c = client::connect(&socket)
        .await
        .with_context(|| match &cli.vm {
            Some(vm) => format!(
                "the launcher of VM {vm} does not answer on {}",
                socket.display()
            ),
            None => format!("cannot connect to {}", socket.display()),
        })?;
    match cli.command {
        Cmd::List => unreachable!("handled above"),
        Cmd::Vmi => {
            let vmi = current_vmi(&mut c).await?;
            println!("{}", serde_json::to_string_pretty(&vmi)?);
        }
        Cmd::Status => {
            let d = c
                .get_domain(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_domain(&d, json);
        }
        Cmd::Events { after } => {
            let mut stream = c
                .watch(pb::WatchRequest { after_seq: after })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(status_error)? {
                print_event(&ev, json);
                if ev.kind() == EventKind::Final {
                    break;
                }
            }
        }
        Cmd::Console { log, follow } => {
            let info = c
                .info(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            if info.console_log.is_empty() {
                bail!("no console yet: the launcher has not started a domain");
            }
            if log || follow {
                tail(&PathBuf::from(info.console_log), follow, json, None)?;
            } else {
                let name = c
                    .get_domain(pb::Empty {})
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .name;
                console::attach(&PathBuf::from(info.console_socket), &name, json)?;
            }
        }
        Cmd::Xml => {
            let x = c
                .get_domain_xml(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            out(json, json!({"xml": x.xml}), x.xml.trim_end());
        }
        Cmd::Logs { follow, tail: n } => {
            let info = c
                .info(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            if info.launcher_log.is_empty() {
                bail!("this launcher keeps no log file (its log is on its stderr only)");
            }
            tail(&PathBuf::from(info.launcher_log), follow, json, n)?;
        }
        Cmd::Expand { volume, size } => expand(&mut c, &volume, &size, json).await?,
        Cmd::Attach {
            volume,
            claim,
            bus,
            datavolume,
        } => {
            let mut vmi = current_vmi(&mut c).await?;
            let added = client::add_hotplug_volume(
                &mut vmi,
                &volume,
                claim.as_deref().unwrap_or(&volume),
                &bus,
                datavolume,
            );
            if let Err(e) = added {
                // A volume whose attach failed is still in the VMI: syncing it again retries
                // the attach (no detach needed first).
                let d = c.get_domain(pb::Empty {}).await.map_err(status_error)?;
                let failed = d
                    .into_inner()
                    .disks
                    .iter()
                    .any(|x| x.volume == volume && x.phase() == VolumePhase::Failed);
                if !failed {
                    return Err(e.into());
                }
            }
            let d = sync(&mut c, &vmi).await?;
            print_domain(&d, json);
        }
        Cmd::Sync { file } => {
            let manifest = virt_launcher::spec::Manifest::read(&file)?;
            // Refused here with the field as written, rather than by the launcher.
            manifest.vmi_checked(virt_launcher::spec::UnknownFields::Refuse)?;
            let doc = manifest
                .find_kind("VirtualMachineInstance")
                .with_context(|| format!("{}: no VirtualMachineInstance", file.display()))?;
            let d = sync(&mut c, doc).await?;
            print_domain(&d, json);
        }
        Cmd::Detach { volume } => {
            let mut vmi = current_vmi(&mut c).await?;
            client::remove_volume(&mut vmi, &volume)?;
            let d = sync(&mut c, &vmi).await?;
            print_domain(&d, json);
        }
        Cmd::Pause => done(
            c.pause(pb::Empty {}).await.map_err(status_error)?,
            "paused",
            json,
        ),
        Cmd::Resume => match c.unpause(pb::Empty {}).await {
            Ok(r) => done(r, "resumed", json),
            // As pause: asking for the state the VM is in succeeds.
            Err(e) => {
                let d = c.get_domain(pb::Empty {}).await.map_err(status_error)?;
                if d.into_inner().state() != DomainState::Running {
                    return Err(status_error(e));
                }
                out(json, json!({"ok": true}), "already running");
            }
        },
        Cmd::Shutdown { grace } => done(
            c.shutdown(pb::ShutdownRequest {
                // 0: the VMI's terminationGracePeriodSeconds.
                grace_seconds: grace.unwrap_or(0),
            })
            .await
            .map_err(status_error)?,
            "shutdown requested",
            json,
        ),
        Cmd::Kill => done(
            c.kill(pb::Empty {}).await.map_err(status_error)?,
            "kill requested",
            json,
        ),
        Cmd::Reboot => done(
            c.reboot(pb::Empty {}).await.map_err(status_error)?,
            "reboot requested",
            json,
        ),
        Cmd::Freeze { timeout } => {
            let r = c
                .freeze(pb::FreezeRequest {
                    timeout_seconds: timeout,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out(
                json,
                json!({"frozen": r.filesystems}),
                &format!(
                    "froze {} filesystems (auto-thaw in {timeout}s)",
                    r.filesystems
                ),
            );
        }
        Cmd::Unfreeze => {
            let r = c
                .unfreeze(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            out(
                json,
                json!({"thawed": r.filesystems}),
                &format!("thawed {} filesystems", r.filesystems),
            );
        }
        Cmd::Stats => {
            let s = c
                .get_stats(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            let disks: Vec<Value> = s
                .disks
                .iter()
                .map(|d| json!({"volume": d.volume, "target": d.target, "readBytes": d.read_bytes, "writeBytes": d.write_bytes, "errors": d.errors}))
                .collect();
            let text = format!(
                "cpu {:.2}s  memory {} KiB (max {})  balloon {} KiB  rss {} KiB\n{}",
                s.cpu_time_ns as f64 / 1e9,
                s.memory_kib,
                s.max_memory_kib,
                s.balloon_actual_kib,
                s.rss_kib,
                s.disks
                    .iter()
                    .map(|d| format!(
                        "  {:<16} {:<5} read {:>12} B  written {:>12} B",
                        d.volume, d.target, d.read_bytes, d.write_bytes
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            out(
                json,
                json!({"cpuTimeNs": s.cpu_time_ns, "memoryKiB": s.memory_kib, "balloonActualKiB": s.balloon_actual_kib, "rssKiB": s.rss_kib, "disks": disks}),
                &text,
            );
        }
        Cmd::Info => {
            let i = c
                .info(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            out(
                json,
                json!({"launcher": i.launcher_version, "libvirt": i.libvirt_version, "qemu": i.qemu_version, "api": i.api_version, "domainType": i.domain_type, "capabilities": i.capabilities, "consoleLog": i.console_log}),
                &format!(
                    "launcher {}  libvirt {}  qemu {}  api {}  domain type {}\ncapabilities: {}",
                    i.launcher_version,
                    i.libvirt_version,
                    i.qemu_version,
                    i.api_version,
                    i.domain_type,
                    i.capabilities.join(", ")
                ),
            );
        }
        Cmd::PrepareTarget { vmi, source } => {
            let body = std::fs::read(&vmi).with_context(|| vmi.display().to_string())?;
            let mut disk_sizes = std::collections::HashMap::new();
            if let Some(source) = source {
                let mut s = client::connect(&source)
                    .await
                    .with_context(|| format!("cannot connect to {}", source.display()))?;
                let d = s
                    .get_domain(pb::Empty {})
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for disk in d.disks.into_iter().filter(|d| !d.shared) {
                    disk_sizes.insert(disk.volume, disk.size_bytes);
                }
            }
            let t = c
                .prepare_migration_target(pb::PrepareMigrationTargetRequest {
                    vmi: body,
                    disk_sizes,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out(
                json,
                json!({"uid": t.uid, "libvirtUri": t.libvirt_uri, "migrationUri": t.migration_uri, "disksUri": t.disks_uri}),
                &format!(
                    "prepared for {}: libvirt {} data {}",
                    t.uid, t.libvirt_uri, t.migration_uri
                ),
            );
        }
        Cmd::Migrate {
            target,
            bandwidth,
            post_copy,
            auto_converge,
            block,
            completion_timeout_per_gib,
            progress_timeout,
        } => {
            // Follow progress on a second connection while the call runs.
            let mut watcher = client::connect(&socket).await?;
            let after = watcher
                .get_domain(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner()
                .last_seq;
            let mut stream = watcher
                .watch(pb::WatchRequest { after_seq: after })
                .await
                .map_err(status_error)?
                .into_inner();
            let follow = tokio::spawn(async move {
                while let Ok(Some(ev)) = stream.message().await {
                    if ev.kind() == EventKind::Migration {
                        print_event(&ev, json);
                    }
                }
            });
            let req = pb::MigrateRequest {
                target_socket: target.display().to_string(),
                options: Some(pb::MigrationOptions {
                    bandwidth_mib: bandwidth,
                    allow_post_copy: post_copy,
                    allow_auto_converge: auto_converge,
                    block_migration: block,
                    completion_timeout_per_gib,
                    progress_timeout,
                    ..Default::default()
                }),
            };
            let r = c.migrate(req).await.map_err(status_error);
            tokio::time::sleep(Duration::from_millis(300)).await;
            follow.abort();
            let r = r?.into_inner();
            let p = r.progress.unwrap_or_default();
            out(
                json,
                json!({"success": r.success, "message": r.message, "downtimeMs": p.downtime_ms, "totalMs": p.elapsed_ms}),
                &format!(
                    "{}: {} (downtime {} ms, total {} ms)",
                    if r.success {
                        "migrated"
                    } else {
                        "migration failed"
                    },
                    r.message,
                    p.downtime_ms,
                    p.elapsed_ms
                ),
            );
            if !r.success {
                bail!("migration failed");
            }
            // Standalone: the source exits now and the target takes the VM's lock over; wait
            // for that, so that the next `launcherctl --vm` reaches the target.
            if let Some(vm) = &cli.vm {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while runtime_dir_of(vm).map(|d| d.join("launcher-sock") == socket)? {
                    if std::time::Instant::now() > deadline {
                        bail!("migrated, but the target has not taken VM {vm} over after 30 s");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Cmd::CancelMigration => done(
            c.cancel_migration(pb::Empty {})
                .await
                .map_err(status_error)?,
            "cancel requested",
            json,
        ),
        Cmd::Ping => done(
            c.ping(pb::Empty {}).await.map_err(status_error)?,
            "pong",
            json,
        ),
        Cmd::Snapshot { name } => snapshot(&mut c, name, json).await?,
    }
    Ok(())
}

/// Prints a result; a closed stdout (`| head`) ends the output quietly.
fn out(json: bool, value: Value, text: &str) {
    let mut stdout = std::io::stdout();
    let _ = if json {
        writeln!(stdout, "{value}")
    } else {
        writeln!(stdout, "{text}")
    };
}

fn done<T>(_: tonic::Response<T>, what: &str, json: bool) {
    out(json, json!({"ok": true}), what);
}

async fn current_vmi(
    c: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
) -> Result<Value> {
    let r = c
        .get_vmi(pb::Empty {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(serde_json::from_slice(&r.vmi)?)
}

async fn sync(
    c: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    vmi: &Value,
) -> Result<pb::Domain> {
    let r = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(vmi)?,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    r.domain.context("launcher returned no domain")
}

fn state_name(s: i32) -> &'static str {
    match DomainState::try_from(s).unwrap_or(DomainState::Unspecified) {
        DomainState::None => "None",
        DomainState::Starting => "Starting",
        DomainState::Running => "Running",
        DomainState::Paused => "Paused",
        DomainState::ShuttingDown => "ShuttingDown",
        DomainState::Shutoff => "Shutoff",
        DomainState::Crashed => "Crashed",
        DomainState::Unspecified => "-",
    }
}

fn phase_name(p: i32) -> &'static str {
    match VolumePhase::try_from(p).unwrap_or(VolumePhase::Unspecified) {
        VolumePhase::Attaching => "Attaching",
        VolumePhase::Ready => "Ready",
        VolumePhase::Detaching => "Detaching",
        VolumePhase::Detached => "Detached",
        VolumePhase::Failed => "Failed",
        VolumePhase::Unspecified => "-",
    }
}

fn print_domain(d: &pb::Domain, json: bool) {
    let disks: Vec<Value> = d
        .disks
        .iter()
        .map(|k| json!({"volume": k.volume, "target": k.target, "bus": k.bus, "source": k.source, "phase": phase_name(k.phase), "message": k.message, "hotplugged": k.hotplugged, "shared": k.shared, "sizeBytes": k.size_bytes}))
        .collect();
    let mut text = format!(
        "domain {}  uid {}\nstate  {} ({})\n",
        d.name,
        d.uid,
        state_name(d.state),
        d.reason
    );
    text += &format!(
        "{:<20} {:<6} {:<7} {:<10} {:>10}  {}\n",
        "VOLUME", "TARGET", "BUS", "PHASE", "SIZE", "SOURCE"
    );
    for k in &d.disks {
        text += &format!(
            "{:<20} {:<6} {:<7} {:<10} {:>10}  {}{}{}\n",
            k.volume,
            k.target,
            k.bus,
            phase_name(k.phase),
            k.size_bytes,
            k.source,
            if k.shared { "  (shared)" } else { "" },
            if k.message.is_empty() {
                String::new()
            } else {
                format!("  — {}", k.message)
            }
        );
    }
    let interfaces: Vec<Value> = d
        .interfaces
        .iter()
        .map(|i| json!({"name": i.name, "mac": i.mac, "type": i.r#type, "tap": i.tap, "ipAddresses": i.ip_addresses}))
        .collect();
    if !d.interfaces.is_empty() {
        text += &format!(
            "{:<20} {:<17} {:<9} {:<8} {}\n",
            "INTERFACE", "MAC", "TYPE", "TAP", "ADDRESSES"
        );
    }
    for i in &d.interfaces {
        text += &format!(
            "{:<20} {:<17} {:<9} {:<8} {}\n",
            i.name,
            i.mac,
            i.r#type,
            if i.tap.is_empty() { "-" } else { &i.tap },
            if i.ip_addresses.is_empty() {
                "-".to_string()
            } else {
                i.ip_addresses.join(",")
            }
        );
    }
    out(
        json,
        json!({"name": d.name, "uid": d.uid, "state": state_name(d.state), "reason": d.reason, "disks": disks, "interfaces": interfaces, "lastSeq": d.last_seq}),
        text.trim_end(),
    );
}

fn print_event(e: &pb::Event, json: bool) {
    let kind = match e.kind() {
        EventKind::Domain => "domain",
        EventKind::Volume => "volume",
        EventKind::Daemon => "daemon",
        EventKind::IoError => "io-error",
        EventKind::Final => "final",
        EventKind::Agent => "agent",
        EventKind::Migration => "migration",
        EventKind::Unspecified => "-",
    };
    let text = match e.kind() {
        EventKind::Migration => {
            let m = e.migration.unwrap_or_default();
            format!(
                "#{} {kind:<8} {:?} {:?} {}/{} MiB remaining {} MiB iter {} downtime {} ms elapsed {} ms {}",
                e.seq,
                m.phase(),
                m.mode(),
                m.data_processed >> 20,
                m.data_total >> 20,
                m.data_remaining >> 20,
                m.iteration,
                m.downtime_ms,
                m.elapsed_ms,
                e.message
            )
        }
        EventKind::Volume | EventKind::IoError => format!(
            "#{} {kind:<8} {} {} {}",
            e.seq,
            e.volume,
            phase_name(e.phase),
            e.message
        ),
        _ => format!(
            "#{} {kind:<8} {} ({}) {}",
            e.seq,
            state_name(e.state),
            e.reason,
            e.message
        ),
    };
    // When it happened (UTC, to the millisecond), first on the line.
    let time =
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(e.time_unix_ms).unwrap_or(0));
    let stamp = humantime::format_rfc3339_millis(time).to_string();
    out(
        json,
        json!({"seq": e.seq, "time": stamp, "timeUnixMs": e.time_unix_ms, "kind": kind, "state": state_name(e.state), "reason": e.reason, "volume": e.volume, "phase": phase_name(e.phase), "message": e.message}),
        &format!("{stamp} {}", text.trim_end()),
    );
}

/// Prints the file at `path` (only its last `last` lines if given); with `follow`, what is
/// added to it, across truncation (a new boot) and rotation (a new file at `path`).
fn tail(path: &PathBuf, follow: bool, json: bool, last: Option<usize>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    // --json: whole lines only, each as {"line": ...}; a partial last line waits for its end.
    let mut partial = Vec::new();
    let mut first = true;
    loop {
        buf.clear();
        f.read_to_end(&mut buf)?;
        if let (true, Some(n)) = (std::mem::take(&mut first), last) {
            let starts: Vec<usize> = std::iter::once(0)
                .chain(
                    buf.iter()
                        .enumerate()
                        .filter(|(i, b)| **b == b'\n' && i + 1 < buf.len())
                        .map(|(i, _)| i + 1),
                )
                .collect();
            let from = starts[starts.len().saturating_sub(n)..]
                .first()
                .copied()
                .unwrap_or(0);
            buf.drain(..if n == 0 { buf.len() } else { from });
        }
        if json {
            partial.extend_from_slice(&buf);
            while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                writeln!(stdout, "{}", json!({ "line": text }))?;
            }
            if !follow && !partial.is_empty() {
                let text = String::from_utf8_lossy(&partial).into_owned();
                writeln!(stdout, "{}", json!({ "line": text }))?;
            }
        } else {
            stdout.write_all(&buf)?;
        }
        stdout.flush()?;
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        // Truncated (a new boot with append off): start over.
        let pos = f.stream_position()?;
        let now = std::fs::metadata(path)?;
        if now.ino() != f.metadata()?.ino() {
            // Rotated: the rest of the old file, then the new one from its start.
            buf.clear();
            f.read_to_end(&mut buf)?;
            stdout.write_all(&buf)?;
            f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
        } else if now.len() < pos {
            f.seek(SeekFrom::Start(0))?;
        }
    }
}

/// `launcherctl expand VOLUME --size SIZE`: the claim's capacity in the VMI's status, synced.
async fn expand(
    c: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    volume: &str,
    size: &str,
    json: bool,
) -> Result<()> {
    let bytes = virt_launcher::spec::parse_quantity(size)
        .ok()
        .map(|milli| milli / 1000)
        .filter(|b| *b > 0)
        .with_context(|| format!("--size {size:?}: not a size (a quantity such as 2Gi)"))?;
    let mut vmi = current_vmi(c).await?;
    let claim = vmi["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
        .and_then(|v| {
            v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .or(v["dataVolume"]["name"].as_str())
        })
        .map(str::to_string)
        .with_context(|| {
            format!("volume {volume}: not a persistentVolumeClaim or dataVolume volume of the VM")
        })?;
    let before = disk_size(c, volume).await?;
    // As virt-controller records a claim that grew: status.volumeStatus[].
    // persistentVolumeClaimInfo.capacity.storage (the entry made if the VMI has none).
    let statuses = vmi["status"]["volumeStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut statuses: Vec<Value> = statuses;
    let i = match statuses.iter().position(|s| s["name"] == volume) {
        Some(i) => i,
        None => {
            statuses.push(json!({"name": volume, "phase": "Ready"}));
            statuses.len() - 1
        }
    };
    let info = &mut statuses[i]["persistentVolumeClaimInfo"];
    if !info.is_object() {
        *info = json!({});
    }
    info["claimName"] = json!(claim);
    info["capacity"]["storage"] = json!(size);
    if !vmi["status"].is_object() {
        vmi["status"] = json!({});
    }
    vmi["status"]["volumeStatus"] = Value::Array(statuses);
    sync(c, &vmi).await?;
    let after = disk_size(c, volume).await?;
    out(
        json,
        json!({"volume": volume, "claim": claim, "capacity": size, "capacityBytes": bytes as u64, "sizeBytesBefore": before, "sizeBytes": after}),
        &if after > before {
            format!("volume {volume}: claim {claim} is {size}; the disk grew from {before} to {after} bytes")
        } else {
            format!("volume {volume}: claim {claim} is {size}; the disk stays {after} bytes (already that large, or larger than the capacity less the filesystem overhead)")
        },
    );
    Ok(())
}

async fn disk_size(
    c: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    volume: &str,
) -> Result<u64> {
    let d = c
        .get_domain(pb::Empty {})
        .await
        .map_err(status_error)?
        .into_inner();
    d.disks
        .iter()
        .find(|d| d.volume == volume)
        .map(|d| d.size_bytes)
        .with_context(|| format!("volume {volume}: not a disk of the running VM"))
}

/// `launcherctl snapshot NAME`: waits for the copy; the launcher logs its progress.
async fn snapshot(
    c: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    name: String,
    json: bool,
) -> Result<()> {
    let r = c
        .snapshot(pb::SnapshotRequest { name })
        .await
        .map_err(status_error)?
        .into_inner();
    let consistency = if r.indications.iter().any(|i| i == "GuestAgent") {
        format!("guest agent froze the filesystems for {} ms", r.frozen_ms)
    } else {
        "no guest agent: crash-consistent".to_string()
    };
    let volumes: Vec<String> = r
        .volumes
        .iter()
        .map(|v| format!("{} ({}, {} bytes)", v.volume, v.claim, v.size_bytes))
        .collect();
    out(
        json,
        json!({
            "namespace": r.namespace, "name": r.name, "vm": r.vm,
            "creationTime": r.creation_time, "indications": r.indications,
            "frozenMs": r.frozen_ms, "bytes": r.bytes, "copyMs": r.copy_ms,
            "directory": r.directory,
            "volumes": r.volumes.iter().map(|v| json!({
                "volume": v.volume, "claim": v.claim, "sizeBytes": v.size_bytes})).collect::<Vec<_>>(),
        }),
        &format!(
            "snapshot {}/{} of VM {} taken at {} ({consistency}; indications {}): {} copied in {} ms into {}\nvolumes: {}",
            r.namespace,
            r.name,
            r.vm,
            r.creation_time,
            r.indications.join(","),
            r.bytes,
            r.copy_ms,
            r.directory,
            volumes.join(", ")
        ),
    );
    Ok(())
}

/// The interactive serial console (`launcherctl console`), as `virtctl console` is: stdin to
/// the guest, the guest to stdout, Ctrl-] to detach.
mod console {
    use std::io::{IsTerminal, Read, Write};
    use std::net::Shutdown;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    use anyhow::{Context, Result};
    use nix::sys::termios::{self, SetArg, Termios};
    use serde_json::json;

    /// Ctrl-], virtctl's escape sequence.
    pub const DETACH: u8 = 0x1d;

    /// The terminal's settings before raw mode; restored when dropped (on every way out).
    struct RawMode(Termios);

    impl RawMode {
        fn enter() -> Result<RawMode> {
            let stdin = std::io::stdin();
            let saved = termios::tcgetattr(stdin.as_fd()).context("read the terminal's mode")?;
            let mut raw = saved.clone();
            termios::cfmakeraw(&mut raw);
            termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
                .context("set the terminal to raw mode")?;
            Ok(RawMode(saved))
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
        }
    }

    /// Attaches to the console socket of domain `name` until Ctrl-], the end of stdin, or the
    /// guest's side closing (the VM stopped).
    pub fn attach(socket: &Path, name: &str, json: bool) -> Result<()> {
        let stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot connect to the serial console at {}",
                socket.display()
            )
        })?;
        eprint!("Successfully connected to {name} console. The escape sequence is ^]\r\n");
        let raw = if std::io::stdin().is_terminal() {
            Some(RawMode::enter()?)
        } else {
            None
        };
        let mut to_guest = stream.try_clone().context("console socket")?;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                if let Some(i) = chunk.iter().position(|b| *b == DETACH) {
                    let _ = to_guest.write_all(&chunk[..i]);
                    break;
                }
                if to_guest.write_all(chunk).is_err() {
                    break;
                }
            }
            // Ends the reading side below too.
            let _ = to_guest.shutdown(Shutdown::Both);
        });
        let mut from_guest = stream;
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        let mut partial: Vec<u8> = Vec::new();
        let line = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            json!({ "line": text.trim_end_matches(['\n', '\r']) }).to_string()
        };
        loop {
            let n = match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if json {
                partial.extend_from_slice(&buf[..n]);
                while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = partial.drain(..=i).collect();
                    if writeln!(stdout, "{}", line(&l)).is_err() {
                        return Ok(());
                    }
                }
            } else if stdout.write_all(&buf[..n]).is_err() {
                return Ok(());
            }
            let _ = stdout.flush();
        }
        if json && !partial.is_empty() {
            let _ = writeln!(stdout, "{}", line(&partial));
        }
        drop(raw);
        eprintln!();
        Ok(())
    }
}
