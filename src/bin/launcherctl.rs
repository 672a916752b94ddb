//! `launcherctl`: a debug client for people in the pod. Readable output by default, `--json`
//! for scripts.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
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
    /// Print the guest's serial console log; with --follow, keep printing what it adds;
    /// with --json, one JSON object per line (`{"line": ...}`).
    Console {
        #[arg(long, short)]
        follow: bool,
    },
    /// Hot-plug a PVC (or DataVolume) as a disk: adds it to the VMI and syncs; a volume whose
    /// attach failed is retried.
    Attach {
        volume: String,
        /// The claim's name (default: the volume's name).
        #[arg(long)]
        claim: Option<String>,
        #[arg(long, default_value = "virtio")]
        bus: String,
        /// The volume is a DataVolume rather than a plain PVC.
        #[arg(long)]
        datavolume: bool,
    },
    /// Sync the VMI in FILE (JSON or YAML, checked as `virt-launcher run` checks a file): the
    /// running VM is reconciled to it (hot-plug, unplug, expansion).
    Sync {
        file: PathBuf,
    },
    /// Hot-unplug a volume: removes it from the VMI and syncs (waits for the guest).
    Detach {
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
    Reboot,
    /// Freeze the guest's filesystems (guest agent); thawed automatically after --timeout.
    Freeze {
        #[arg(long, default_value_t = 60)]
        timeout: u32,
    },
    Unfreeze,
    /// CPU, memory and per-disk I/O figures.
    Stats,
    /// Versions and capabilities.
    Info,
    Ping,
    /// Ready this VM-less launcher to receive the VMI in FILE by live migration.
    PrepareTarget {
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
        #[arg(long)]
        post_copy: bool,
        #[arg(long)]
        auto_converge: bool,
        /// Copy local (non-shared) disks.
        #[arg(long)]
        block: bool,
        #[arg(long, default_value_t = 0)]
        completion_timeout_per_gib: u64,
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
    let lock = PathBuf::from(virt_launcher::pod::VM_LOCK_DIR).join(format!("{ns}_{name}.lock"));
    let dir = std::fs::read_to_string(&lock).map_err(|_| {
        anyhow::anyhow!(
            "no standalone launcher has run VM {ns}/{name} here (see `launcherctl list`)"
        )
    })?;
    Ok(PathBuf::from(dir.trim()))
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
        Cmd::Console { follow } => {
            let info = c
                .info(pb::Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            if info.console_log.is_empty() {
                bail!("no console yet: the launcher has not started a domain");
            }
            tail(&PathBuf::from(info.console_log), follow, json)?;
        }
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

fn tail(path: &PathBuf, follow: bool, json: bool) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    // --json: whole lines only, each as {"line": ...}; a partial last line waits for its end.
    let mut partial = Vec::new();
    loop {
        buf.clear();
        f.read_to_end(&mut buf)?;
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
        if std::fs::metadata(path)?.len() < pos {
            f.seek(SeekFrom::Start(0))?;
        }
    }
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
