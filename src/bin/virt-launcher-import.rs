//! `virt-launcher-import`: the standalone DataVolume import, in a process of its own.
//!
//! `virt-launcher run --vm` starts it (through `pod::process`) before the VM and waits for it.
//! It reads the VirtualMachine manifest (with the ConfigMaps and Secrets its DataVolumes
//! name), makes every DataVolume a complete claim under `--storage-dir` (http/https, s3, pvc
//! clone, blank), and exits: 0 when every claim is complete, 1 with the one-line reason on
//! stdout (the launcher reports it as its own). Logs and progress go to stderr, shared with the
//! launcher's.
//!
//! Why a process: the TLS stack (rustls, *ring*, the system's CA certificates), the S3 signer
//! and the download buffers live here and go away with it; the long-running launcher never
//! links them (they are only reachable from this binary), so its resident set does not grow.
//! It dies with the launcher (`PR_SET_PDEATHSIG`) and leads its own process group, which the
//! launcher kills on SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use virt_launcher::datavolume::{self, ProgressStyle};
use virt_launcher::logging;

#[derive(Parser)]
#[command(
    name = "virt-launcher-import",
    version,
    about = "Imports a VirtualMachine's DataVolumes into a standalone storage directory (run by virt-launcher run --vm)"
)]
struct Args {
    /// The kubevirt.io/v1 VirtualMachine (YAML or JSON; ConfigMaps and Secrets as further
    /// documents of the same file).
    #[arg(long, value_name = "FILE")]
    vm: PathBuf,
    /// The VM's namespace (its DataVolumes', ConfigMaps' and Secrets').
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Where claims live (`<dir>/claims/<namespace>/<name>`).
    #[arg(long, value_name = "DIR")]
    storage_dir: PathBuf,
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
    match datavolume::import_claims(&args.vm, &args.namespace, &args.storage_dir, style) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}
