//! `virt-launcher-import`: the standalone DataVolume import, in a process of its own.
//!
//! `virt-launcher run --vm` starts it (through `pod::process`) before the VM and waits for it.
//! It reads the VirtualMachine manifest (with the ConfigMaps and Secrets its DataVolumes
//! name), makes every DataVolume a complete claim under `--storage-dir` (http/https, s3, pvc
//! clone, blank), and exits: 0 when every claim is complete, 1 with the one-line reason on
//! stdout (the launcher reports it as its own). Logs and progress go to stderr, shared with the
//! launcher's. With `--container-disks-of VMI.json` it instead pulls the VMI's containerDisk
//! images into the cache and links them for the launcher (`datavolume::container_disk`).
//!
//! Why a process: the TLS stack (rustls, *ring*, the system's CA certificates), the S3 signer
//! and the download buffers live here and go away with it; the long-running launcher never
//! links them (they are only reachable from this binary), so its resident set does not grow.
//! It dies with the launcher (`PR_SET_PDEATHSIG`) and leads its own process group, which the
//! launcher kills on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use virt_launcher::datavolume::{self, ProgressStyle};
use virt_launcher::logging;
use virt_launcher::spec::VirtualMachineInstance;

#[derive(Parser)]
#[command(
    name = "virt-launcher-import",
    version,
    about = "Imports a VirtualMachine's DataVolumes into a standalone storage directory (run by virt-launcher run --vm)"
)]
struct Args {
    /// The kubevirt.io/v1 VirtualMachine (YAML or JSON; ConfigMaps and Secrets as further
    /// documents of the same file).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "container_disks_of"
    )]
    vm: Option<PathBuf>,
    /// The VM's namespace (its DataVolumes', ConfigMaps' and Secrets').
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Where claims live (`<dir>/claims/<namespace>/<name>`).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "container_disks_of"
    )]
    storage_dir: Option<PathBuf>,
    /// Pull the containerDisk images of this VMI (JSON, as the launcher runs it) instead.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vm", "storage_dir"], requires_all = ["container_disk_cache", "container_disk_links"])]
    container_disks_of: Option<PathBuf>,
    /// The image cache (`virt-launcher run --container-disk-cache`).
    #[arg(long, value_name = "DIR")]
    container_disk_cache: Option<PathBuf>,
    /// Where each volume's disk is linked as `disk_<index>.img`.
    #[arg(long, value_name = "DIR")]
    container_disk_links: Option<PathBuf>,
    /// bar (a terminal) or log (JSON lines).
    #[arg(long, value_parser = ["bar", "log"], default_value = "log")]
    progress: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let style = if args.progress == "bar" {
        ProgressStyle::Bar
    } else {
        ProgressStyle::Log
    };
    logging::init(style == ProgressStyle::Log);
    // Not left behind by a launcher that was killed.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(error = %e, "PR_SET_PDEATHSIG");
    }
    let result = match (&args.container_disks_of, &args.vm, &args.storage_dir) {
        (Some(vmi), _, _) => pull_container_disks(vmi, &args, style),
        (None, Some(vm), Some(storage)) => {
            datavolume::import_claims(vm, &args.namespace, storage, style)
                .map_err(|e| e.to_string())
        }
        // clap requires one or the other.
        _ => Err("--vm and --storage-dir, or --container-disks-of".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The launcher reads the links this leaves (and removes them at its end).
fn pull_container_disks(vmi: &Path, args: &Args, style: ProgressStyle) -> Result<(), String> {
    use datavolume::container_disk;
    let text = std::fs::read(vmi).map_err(|e| format!("{}: {e}", vmi.display()))?;
    let vmi: VirtualMachineInstance =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", vmi.display()))?;
    let (Some(cache), Some(links)) = (&args.container_disk_cache, &args.container_disk_links)
    else {
        return Err("--container-disk-cache and --container-disk-links are required".into());
    };
    let options = container_disk::Options {
        cache_dir: cache.clone(),
        progress: style,
    };
    container_disk::prepare(&vmi, &options, links)
        .map(container_disk::ContainerDisks::keep)
        .map_err(|e| e.to_string())
}
