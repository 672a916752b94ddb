//! `virt-probe`: the client KubeVirt's exec and guest-agent-ping probes run in the compute
//! container (virt-controller wraps a VMI's exec probe as
//! `virt-probe --domainName NS_NAME --timeoutSeconds N --command CMD -- ARGS…`, and a
//! `guestAgentPing` probe as `… --guestAgentPing`). It dials the launcher's socket, checks the
//! cmd version as virt-handler's client does, and calls `Exec` or `GuestPing` with the
//! deadline KubeVirt's client gives them (the probe's timeout plus 5 s).
//!
//! Exit codes as KubeVirt's: `Exec` exits with the guest command's exit code (its stdout
//! printed first), 255 when the call itself failed; `GuestPing` exits 0 or 1. Unlike
//! KubeVirt's, the reason of a failure is one plain line on stderr.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::pb::cmd::info as info_pb;
use super::pb::cmd::v1 as cmd_pb;

/// Where the compute container finds the launcher's socket (KubeVirt's `SocketOnGuest`).
pub const DEFAULT_SOCKET: &str = "/var/run/kubevirt/sockets/launcher-sock";

/// KubeVirt's client adds this to the probe's own timeout for the call's deadline.
const EXTRA: Duration = Duration::from_secs(5);
/// The deadline of the version check.
const SHORT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {}: {reason}", socket.display())]
    Connect { socket: PathBuf, reason: String },
    #[error("{call}: {reason}")]
    Call { call: &'static str, reason: String },
}

/// The command line, read as KubeVirt's pflag parser reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct ProbeArgs {
    pub socket: PathBuf,
    pub domain_name: String,
    pub command: String,
    /// What follows `--` (pflag's positional arguments).
    pub args: Vec<String>,
    pub timeout_seconds: i32,
    pub guest_agent_ping: bool,
}

impl ProbeArgs {
    /// `--flag value` and `--flag=value`; `-v N` (klog verbosity) is accepted and has no
    /// effect here, as the probe logs nothing but failures.
    pub fn parse(argv: &[String]) -> Result<Self, ProbeError> {
        let mut out = ProbeArgs {
            socket: PathBuf::from(DEFAULT_SOCKET),
            domain_name: String::new(),
            command: String::new(),
            args: Vec::new(),
            timeout_seconds: 1,
            guest_agent_ping: false,
        };
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if arg == "--" {
                out.args.extend(it.by_ref().cloned());
                break;
            }
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                out.args.push(arg.clone());
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if name == "guestAgentPing" {
                out.guest_agent_ping = match inline.as_deref() {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(v) => return Err(usage(format!("--guestAgentPing={v}: not a boolean"))),
                };
                continue;
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| usage(format!("--{name} needs a value")))
            };
            match name {
                "socket" => out.socket = PathBuf::from(value()?),
                "domainName" => out.domain_name = value()?,
                "command" => out.command = value()?,
                "timeoutSeconds" => {
                    let v = value()?;
                    out.timeout_seconds = v.parse().map_err(|_| {
                        usage(format!(
                            "--timeoutSeconds {v}: not a whole number of seconds"
                        ))
                    })?;
                }
                "v" => {
                    value()?;
                }
                "memProfile" => {
                    return Err(usage(
                        "--memProfile is not supported: it writes a Go heap profile".into(),
                    ))
                }
                other => return Err(usage(format!("unknown flag --{other}"))),
            }
        }
        if !out.guest_agent_ping && out.command.is_empty() {
            return Err(usage(
                "either --command or --guestAgentPing must be given".into(),
            ));
        }
        Ok(out)
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds.max(0) as u64) + EXTRA
    }
}

fn usage(msg: String) -> ProbeError {
    ProbeError::Usage(msg)
}

/// What the probe ends with: the exit code, and the guest command's stdout to print.
#[derive(Debug)]
pub struct ProbeOutcome {
    pub exit_code: i32,
    pub stdout: String,
}

/// Runs the probe. `Err` is a failure to reach or to be answered by the launcher.
pub async fn run(args: &ProbeArgs) -> Result<ProbeOutcome, ProbeError> {
    let channel = dial(args).await?;
    check_version(channel.clone()).await?;
    let mut client = cmd_pb::cmd_client::CmdClient::new(channel);
    if args.guest_agent_ping {
        let reply = client
            .guest_ping(with_deadline(
                cmd_pb::GuestPingRequest {
                    domain_name: args.domain_name.clone(),
                    timeout_seconds: args.timeout_seconds,
                },
                args.deadline(),
            ))
            .await
            .map_err(|s| call_failed("GuestPing", &s))?
            .into_inner();
        answered("GuestPing", reply.response)?;
        return Ok(ProbeOutcome {
            exit_code: 0,
            stdout: String::new(),
        });
    }
    let reply = client
        .exec(with_deadline(
            cmd_pb::ExecRequest {
                domain_name: args.domain_name.clone(),
                command: args.command.clone(),
                args: args.args.clone(),
                timeout_seconds: args.timeout_seconds,
            },
            args.deadline(),
        ))
        .await
        .map_err(|s| call_failed("Exec", &s))?
        .into_inner();
    // A command that ran and failed is an answer with its exit code, not a failed call.
    answered("Exec", reply.response)?;
    Ok(ProbeOutcome {
        exit_code: reply.exit_code,
        stdout: reply.std_out,
    })
}

async fn dial(args: &ProbeArgs) -> Result<Channel, ProbeError> {
    let failed = |reason: String| ProbeError::Connect {
        socket: args.socket.clone(),
        reason,
    };
    Endpoint::try_from(format!("unix://{}", args.socket.display()))
        .map_err(|e| failed(e.to_string()))?
        .connect_timeout(SHORT)
        .connect()
        .await
        .map_err(|e| failed(format!("{e}")))
}

async fn check_version(channel: Channel) -> Result<(), ProbeError> {
    let versions = info_pb::cmd_info_client::CmdInfoClient::new(channel)
        .info(with_deadline(info_pb::CmdInfoRequest {}, SHORT))
        .await
        .map_err(|s| call_failed("CmdInfo", &s))?
        .into_inner()
        .supported_cmd_versions;
    if versions.contains(&1) {
        Ok(())
    } else {
        Err(ProbeError::Call {
            call: "CmdInfo",
            reason: format!("the launcher offers cmd versions {versions:?}, not 1"),
        })
    }
}

fn with_deadline<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(deadline);
    req
}

fn call_failed(call: &'static str, status: &tonic::Status) -> ProbeError {
    ProbeError::Call {
        call,
        reason: format!("{}: {}", status.code(), status.message()),
    }
}

fn answered(call: &'static str, response: Option<cmd_pb::Response>) -> Result<(), ProbeError> {
    match response {
        Some(r) if r.success => Ok(()),
        Some(r) => Err(ProbeError::Call {
            call,
            reason: r.message,
        }),
        None => Err(ProbeError::Call {
            call,
            reason: "the launcher's answer has no response".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn virt_controllers_exec_probe_is_read_as_pflag_reads_it() {
        let p = ProbeArgs::parse(&argv(&[
            "--domainName",
            "default_vm",
            "--timeoutSeconds",
            "3",
            "--command",
            "cat",
            "--",
            "/tmp/healthy",
            "--not-a-flag",
        ]))
        .unwrap();
        assert_eq!(p.domain_name, "default_vm");
        assert_eq!(p.timeout_seconds, 3);
        assert_eq!(p.command, "cat");
        assert_eq!(p.args, argv(&["/tmp/healthy", "--not-a-flag"]));
        assert!(!p.guest_agent_ping);
        assert_eq!(p.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(p.deadline(), Duration::from_secs(8));
    }

    #[test]
    fn guest_agent_ping_and_inline_values() {
        let p = ProbeArgs::parse(&argv(&[
            "--domainName=ns_vm",
            "--timeoutSeconds=1",
            "--guestAgentPing",
            "--socket=/x/sock",
            "-v",
            "4",
        ]))
        .unwrap();
        assert!(p.guest_agent_ping);
        assert_eq!(p.domain_name, "ns_vm");
        assert_eq!(p.socket, PathBuf::from("/x/sock"));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        let err = |a: &[&str]| ProbeArgs::parse(&argv(a)).unwrap_err().to_string();
        assert_eq!(
            err(&["--domainName", "a_b"]),
            "either --command or --guestAgentPing must be given"
        );
        assert_eq!(
            err(&["--command", "x", "--timeoutSeconds", "soon"]),
            "--timeoutSeconds soon: not a whole number of seconds"
        );
        assert_eq!(err(&["--command"]), "--command needs a value");
        assert_eq!(err(&["--bogus", "1"]), "unknown flag --bogus");
        assert!(err(&["--command", "x", "--memProfile", "/p"]).contains("not supported"));
    }
}
