//! KubeVirt's launcher command line: what virt-controller puts into the `compute` container
//! (`/usr/bin/virt-launcher-monitor` plus its arguments), parsed the way KubeVirt's binaries do.
//!
//! Both `virt-launcher-monitor` and `virt-launcher` accept the union of the flags of KubeVirt's
//! two binaries (the monitor passes everything on, and KubeVirt versions add flags), plus our
//! own `--domain-type`. A flag we do not know is not an error: it is returned in
//! [`KubevirtArgs::unknown`] for a warning, and, as Go's pflag does with unknown flags
//! whitelisted, the argument after it is taken as its value unless it looks like a flag.
//! Values are given as `--flag value` or `--flag=value`; boolean flags take no separate value
//! (`--flag` or `--flag=true|false`); one or two leading dashes, as pflag accepts.

use std::path::PathBuf;
use std::time::Duration;

/// A flag's value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("--{flag}: {message} (got {value:?})")]
    BadValue {
        flag: String,
        value: String,
        message: String,
    },
    #[error("--{0} needs a value")]
    MissingValue(String),
    #[error("unexpected argument {0:?} (KubeVirt's launcher takes flags only)")]
    Positional(String),
}

/// The launcher's settings from KubeVirt's command line (defaults as KubeVirt's own).
#[derive(Debug, Clone, PartialEq)]
pub struct KubevirtArgs {
    /// `--qemu-timeout`: how long the domain may take to be defined and started.
    pub qemu_timeout: Duration,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    /// `--kubevirt-share-dir` (`/var/run/kubevirt`): sockets/, the notify pipe, hotplug-disks/.
    pub share_dir: PathBuf,
    pub ephemeral_disk_dir: PathBuf,
    pub container_disk_dir: PathBuf,
    /// `--hotplug-disk-dir` (default `/var/run/kubevirt/hotplug-disks`).
    pub hotplug_disk_dir: PathBuf,
    /// `--grace-period-seconds`: after SIGTERM the launcher destroys QEMU itself this late.
    pub grace_period: Duration,
    pub hook_sidecars: u32,
    pub ovmf_path: PathBuf,
    pub disk_memory_limit: i64,
    pub hypervisor: String,
    pub libvirt_log_filters: String,
    pub run_as_nonroot: bool,
    pub allow_emulation: bool,
    pub allow_cross_arch_emulation: bool,
    pub keep_after_failure: bool,
    pub simulate_crash: bool,
    /// Feature-gate flags accepted and not acted on (named for the start-up log).
    pub ignored: Vec<String>,
    /// Our own `--domain-type kvm|qemu` (the tests force TCG with it).
    pub domain_type: Option<String>,
    /// Flags nobody here knows, as given (`--name`), for a warning.
    pub unknown: Vec<String>,
}

impl Default for KubevirtArgs {
    fn default() -> Self {
        KubevirtArgs {
            qemu_timeout: Duration::from_secs(180),
            name: String::new(),
            uid: String::new(),
            namespace: String::new(),
            share_dir: "/var/run/kubevirt".into(),
            ephemeral_disk_dir: "/var/run/kubevirt-ephemeral-disks".into(),
            container_disk_dir: "/var/run/kubevirt/container-disks".into(),
            hotplug_disk_dir: "/var/run/kubevirt/hotplug-disks".into(),
            grace_period: Duration::from_secs(30),
            hook_sidecars: 0,
            ovmf_path: "/usr/share/OVMF".into(),
            disk_memory_limit: 2_097_152_000,
            hypervisor: "kvm".into(),
            libvirt_log_filters: String::new(),
            run_as_nonroot: false,
            allow_emulation: false,
            allow_cross_arch_emulation: false,
            keep_after_failure: false,
            simulate_crash: false,
            ignored: Vec::new(),
            domain_type: None,
            unknown: Vec::new(),
        }
    }
}

/// Boolean flags of KubeVirt's launcher that change nothing here.
const IGNORED_BOOLS: &[&str] = &[
    "image-volume",
    "upgrade-ordinal-ifaces",
    "vgpu-dedicated-hook",
    "vm-stats-collector",
    "firmware-auto-selection",
];

/// Flags with a value that change nothing here (the guest-agent poll intervals, the log
/// verbosity `-v`).
const IGNORED_VALUES: &[&str] = &[
    "qemu-agent-sys-interval",
    "qemu-agent-file-interval",
    "qemu-agent-user-interval",
    "qemu-agent-version-interval",
    "qemu-fsfreeze-status-interval",
    "v",
];

const BOOLS: &[&str] = &[
    "run-as-nonroot",
    "allow-emulation",
    "allow-cross-arch-emulation",
    "keep-after-failure",
    "simulate-crash",
];

const VALUES: &[&str] = &[
    "qemu-timeout",
    "name",
    "uid",
    "namespace",
    "kubevirt-share-dir",
    "ephemeral-disk-dir",
    "container-disk-dir",
    "hotplug-disk-dir",
    "grace-period-seconds",
    "hook-sidecars",
    "ovmf-path",
    "disk-memory-limit",
    "hypervisor",
    "libvirt-log-filters",
    "domain-type",
];

/// Whether `arg` is one of KubeVirt's launcher flags (or ours), with or without a value: how
/// `virt-launcher` tells KubeVirt's command line from its own subcommands.
pub fn is_known_flag(arg: &str) -> bool {
    let Some(name) = flag_name(arg) else {
        return false;
    };
    let name = name.split_once('=').map_or(name, |(n, _)| n);
    [BOOLS, VALUES, IGNORED_BOOLS, IGNORED_VALUES]
        .iter()
        .any(|set| set.contains(&name))
}

fn flag_name(arg: &str) -> Option<&str> {
    let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    (!name.is_empty() && !name.starts_with('-')).then_some(name)
}

impl KubevirtArgs {
    /// Parses the arguments after the program name.
    pub fn parse<I, S>(args: I) -> Result<KubevirtArgs, CmdlineError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out = KubevirtArgs::default();
        let mut hotplug_given = false;
        let mut args = args.into_iter().map(Into::into).peekable();
        while let Some(arg) = args.next() {
            let Some(name) = flag_name(&arg) else {
                return Err(CmdlineError::Positional(arg));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            let is_bool = BOOLS.contains(&name.as_str()) || IGNORED_BOOLS.contains(&name.as_str());
            let is_value =
                VALUES.contains(&name.as_str()) || IGNORED_VALUES.contains(&name.as_str());
            if is_bool {
                let on = match inline.as_deref() {
                    None => true,
                    Some(v) => parse_bool(&name, v)?,
                };
                match name.as_str() {
                    "run-as-nonroot" => out.run_as_nonroot = on,
                    "allow-emulation" => out.allow_emulation = on,
                    "allow-cross-arch-emulation" => out.allow_cross_arch_emulation = on,
                    "keep-after-failure" => out.keep_after_failure = on,
                    "simulate-crash" => out.simulate_crash = on,
                    _ => {
                        if on {
                            out.ignored.push(name);
                        }
                    }
                }
                continue;
            }
            if !is_value {
                // pflag with unknown flags whitelisted: a following non-flag is its value.
                if inline.is_none() && args.peek().is_some_and(|a| !a.starts_with('-')) {
                    args.next();
                }
                out.unknown.push(format!("--{name}"));
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| CmdlineError::MissingValue(name.clone()))?,
            };
            let bad = |message: &str| CmdlineError::BadValue {
                flag: name.clone(),
                value: value.clone(),
                message: message.to_string(),
            };
            match name.as_str() {
                "qemu-timeout" => {
                    out.qemu_timeout =
                        parse_go_duration(&value).ok_or_else(|| bad("not a duration like 271s"))?
                }
                "name" => out.name = value,
                "uid" => out.uid = value,
                "namespace" => out.namespace = value,
                "kubevirt-share-dir" => out.share_dir = value.into(),
                "ephemeral-disk-dir" => out.ephemeral_disk_dir = value.into(),
                "container-disk-dir" => out.container_disk_dir = value.into(),
                "hotplug-disk-dir" => {
                    hotplug_given = true;
                    out.hotplug_disk_dir = value.into()
                }
                "grace-period-seconds" => {
                    let s: u64 = value
                        .parse()
                        .map_err(|_| bad("not a whole number of seconds"))?;
                    out.grace_period = Duration::from_secs(s)
                }
                "hook-sidecars" => {
                    out.hook_sidecars = value.parse().map_err(|_| bad("not a count"))?
                }
                "ovmf-path" => out.ovmf_path = value.into(),
                "disk-memory-limit" => {
                    out.disk_memory_limit = value.parse().map_err(|_| bad("not a byte count"))?
                }
                "hypervisor" => out.hypervisor = value,
                "libvirt-log-filters" => out.libvirt_log_filters = value,
                "domain-type" => out.domain_type = Some(value),
                _ => out.ignored.push(name),
            }
        }
        if !hotplug_given {
            out.hotplug_disk_dir = out.share_dir.join("hotplug-disks");
        }
        Ok(out)
    }

    /// `<namespace>_<name>`, KubeVirt's domain name.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }

    /// The command socket before it serves (`<share>/sockets/launcher-init-sock`); the API
    /// server renames it to `launcher-sock` once it serves.
    pub fn init_socket(&self) -> PathBuf {
        self.share_dir.join("sockets").join("launcher-init-sock")
    }
}

fn parse_bool(flag: &str, v: &str) -> Result<bool, CmdlineError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(CmdlineError::BadValue {
            flag: flag.to_string(),
            value: v.to_string(),
            message: "not true or false".into(),
        }),
    }
}

/// A Go `time.Duration` string: `271s`, `3m0s`, `1h2m3.5s`, `500ms`, `0` (no sign).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// virt-controller's command line (`template.go`), with a flag from a later KubeVirt.
    #[test]
    fn kubevirts_command_line() {
        let a = KubevirtArgs::parse([
            "--qemu-timeout",
            "271s",
            "--name",
            "testvmi",
            "--uid",
            "1234",
            "--namespace",
            "default",
            "--kubevirt-share-dir",
            "/var/run/kubevirt",
            "--ephemeral-disk-dir",
            "/var/run/kubevirt-ephemeral-disks",
            "--container-disk-dir",
            "/var/run/kubevirt/container-disks",
            "--grace-period-seconds",
            "45",
            "--hook-sidecars",
            "0",
            "--ovmf-path",
            "/usr/share/OVMF",
            "--disk-memory-limit",
            "2097152000",
            "--hypervisor",
            "kvm",
            "--run-as-nonroot",
            "--image-volume",
            "--libvirt-log-filters=3:remote",
            "--allow-emulation",
            "--keep-after-failure",
            "--some-future-flag",
            "value",
            "--another-future-switch",
            "--v=4",
            "--domain-type",
            "qemu",
        ])
        .unwrap();
        assert_eq!(a.qemu_timeout, Duration::from_secs(271));
        assert_eq!(a.domain_name(), "default_testvmi");
        assert_eq!(a.uid, "1234");
        assert_eq!(a.grace_period, Duration::from_secs(45));
        assert_eq!(
            a.hotplug_disk_dir,
            PathBuf::from("/var/run/kubevirt/hotplug-disks")
        );
        assert_eq!(
            a.init_socket(),
            PathBuf::from("/var/run/kubevirt/sockets/launcher-init-sock")
        );
        assert!(a.run_as_nonroot && a.allow_emulation && a.keep_after_failure);
        assert_eq!(a.libvirt_log_filters, "3:remote");
        assert_eq!(a.domain_type.as_deref(), Some("qemu"));
        assert_eq!(a.ignored, ["image-volume", "v"]);
        assert_eq!(a.unknown, ["--some-future-flag", "--another-future-switch"]);
    }

    #[test]
    fn defaults_and_derived_paths() {
        let a = KubevirtArgs::parse(["--kubevirt-share-dir=/tmp/share", "--allow-emulation=false"])
            .unwrap();
        assert_eq!(
            a.hotplug_disk_dir,
            PathBuf::from("/tmp/share/hotplug-disks")
        );
        assert_eq!(a.qemu_timeout, Duration::from_secs(180));
        assert!(!a.allow_emulation);
        let a = KubevirtArgs::parse(["--hotplug-disk-dir", "/h", "--kubevirt-share-dir", "/s"])
            .unwrap();
        assert_eq!(a.hotplug_disk_dir, PathBuf::from("/h"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = KubevirtArgs::parse(["--qemu-timeout", "soon"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--qemu-timeout: not a duration like 271s (got \"soon\")"
        );
        let e = KubevirtArgs::parse(["--grace-period-seconds=-1"]).unwrap_err();
        assert!(e.to_string().starts_with("--grace-period-seconds:"), "{e}");
        assert_eq!(
            KubevirtArgs::parse(["--name"]).unwrap_err(),
            CmdlineError::MissingValue("name".into())
        );
        assert!(matches!(
            KubevirtArgs::parse(["run"]).unwrap_err(),
            CmdlineError::Positional(_)
        ));
        assert!(KubevirtArgs::parse(["--allow-emulation=maybe"]).is_err());
    }

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("271s"), Some(Duration::from_secs(271)));
        assert_eq!(d("3m0s"), Some(Duration::from_secs(180)));
        assert_eq!(d("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        for bad in ["", "s", "10", "-5s", "5x", "1.2.3s"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn known_flags() {
        assert!(is_known_flag("--qemu-timeout"));
        assert!(is_known_flag("--uid=x"));
        assert!(is_known_flag("--allow-emulation"));
        assert!(is_known_flag("-v"));
        assert!(!is_known_flag("run"));
        assert!(!is_known_flag("--vmi"));
        assert!(!is_known_flag("--help"));
    }
}
