//! Network phase 2, the launcher's half of KubeVirt's pod networking (`SetupPodNetworkPhase2`):
//! the handler's phase 1 built the tap (`tap0`, `tap<hash>` for Multus), the bridge
//! `k6t-<pod interface>` and, for `masquerade`, the NAT rules; the launcher finds them, gives
//! the domain interface the tap, MAC and MTU (the converter does, from [`probe_mtus`]), and
//! serves the guest its address with a single-client DHCP server on the bridge ([`setup`]).
//!
//! Decisions (where KubeVirt's code is not simply followed):
//! - The guest's MAC, when the VMI gives none, is derived from the VMI's uid and the
//!   interface's name (see [`crate::convert::names::stable_mac`]), not taken from the pod
//!   interface: it stays the same across restarts and migrations, and the DHCP server only
//!   answers that MAC.
//! - The DHCP hostname is the VMI's `spec.hostname`, else its name (what virt-controller makes
//!   the pod's hostname).
//! - A missing tap is an error naming the interface (KubeVirt falls back to the pod interface
//!   itself, which only works with binding plugins we do not support).

pub mod dhcp;
pub mod dhcpv6;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::convert::names;
use crate::domain::{Attachment, Domain};
use crate::spec::VirtualMachineInstance;

/// Where the pod's resolver configuration is (DNS servers and search domains for the guest).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// KubeVirt's default `vmNetworkCIDR` for masquerade.
pub const DEFAULT_MASQUERADE_CIDR: &str = "10.0.2.0/24";
/// KubeVirt's default `vmIPv6NetworkCIDR` for masquerade.
pub const DEFAULT_MASQUERADE_CIDR6: &str = "fd10:0:2::/120";

/// Why phase 2 failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {interface}: no tap device {tap} in this pod (KubeVirt's virt-handler creates it in network phase 1)")]
    NoTap { interface: String, tap: String },
    #[error("interface {interface}: no bridge {bridge} in this pod (KubeVirt's virt-handler creates it in network phase 1)")]
    NoBridge { interface: String, bridge: String },
    #[error("{field}: {reason}")]
    Spec { field: String, reason: String },
    #[error("interface {interface}: standalone networking needs passt, which is not in PATH: install it (apt-get install passt; ./devtool setup builds a newer one into /usr/local/bin)")]
    NoPasst { interface: String },
    #[error("interface {interface}: --host-bridge {bridge} is not a bridge on this host")]
    NoHostBridge { interface: String, bridge: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interface {interface}: {source}")]
    Dhcp {
        interface: String,
        source: dhcp::DhcpError,
    },
}

/// A network interface of this pod's network namespace.
fn link_dir(name: &str) -> PathBuf {
    Path::new("/sys/class/net").join(name)
}

fn link_mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(link_dir(name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether KubeVirt's phase 1 built this network namespace's pod network (its `tap0`).
pub fn phase1_present() -> bool {
    link_dir("tap0").exists()
}

/// Whether `program` is an executable file in `PATH`.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// libvirt's directory for passt's socket and pid file. QEMU runs as root here, so libvirt
/// starts passt as root. passt then gives up its capabilities (still uid 0, without
/// `CAP_DAC_OVERRIDE`) before it binds its socket, and older passt (Debian 12's) changes to
/// `nobody` before it writes its pid file: the directory is root's and `nobody`'s group's,
/// mode 0770, so both can write it. It is this launcher's private `/run/libvirt` (standalone).
pub const PASST_STATE_DIR: &str = "/run/libvirt/qemu/passt";

fn passt_state_dir() -> Result<(), NetError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source: std::io::Error| NetError::Io {
        path: PathBuf::from(PASST_STATE_DIR),
        source,
    };
    std::fs::create_dir_all(PASST_STATE_DIR).map_err(fail)?;
    let nobody_gid = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .map(|u| u.gid)
        .unwrap_or(65534.into());
    nix::unistd::chown(
        PASST_STATE_DIR,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nobody_gid),
    )
    .map_err(|e| fail(e.into()))?;
    std::fs::set_permissions(PASST_STATE_DIR, std::fs::Permissions::from_mode(0o770)).map_err(fail)
}

/// The `masquerade`/`bridge` interfaces of a VMI: (index in spec.networks, interface name,
/// Multus or not, pod interface name).
fn tap_interfaces(
    vmi: &VirtualMachineInstance,
) -> Vec<(usize, &crate::spec::Interface, bool, String)> {
    let mut out = Vec::new();
    for ifc in &vmi.spec.domain.devices.interfaces {
        if ifc.masquerade.is_none() && ifc.bridge.is_none() {
            continue;
        }
        let Some((k, net)) = vmi
            .spec
            .networks
            .iter()
            .enumerate()
            .find(|(_, n)| n.name == ifc.name)
        else {
            continue;
        };
        let multus = net.pod.is_none();
        let status = vmi.status.as_ref().and_then(|s| {
            s.interfaces
                .iter()
                .find(|st| st.name.as_deref() == Some(ifc.name.as_str()))
                .and_then(|st| st.pod_interface_name.clone())
                .filter(|d| !d.is_empty())
        });
        let pod = names::pod_interface_name(&ifc.name, multus, status.as_deref());
        out.push((k, ifc, multus, pod));
    }
    out
}

/// The MTU of the pod interface behind each `masquerade`/`bridge` interface (by interface
/// name), for the converter; interfaces whose pod interface is not there are left out.
pub fn probe_mtus(vmi: &VirtualMachineInstance) -> BTreeMap<String, u32> {
    tap_interfaces(vmi)
        .into_iter()
        .filter_map(|(_, ifc, _, pod)| Some((ifc.name.clone(), link_mtu(&pod)?)))
        .collect()
}

/// Gateway (the bridge's address), the guest's address and the prefix of a masquerade
/// `vmNetworkCIDR` (`a.b.c.d/p`, p ≤ 30): the network's first and second addresses.
pub fn masquerade_addresses(cidr: &str) -> Result<(Ipv4Addr, Ipv4Addr, u8), String> {
    let (ip, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{cidr:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
    let prefix: u8 =
        prefix.parse().ok().filter(|p| *p <= 30).ok_or_else(|| {
            format!("{cidr:?}: the prefix must be 0..30 (room for gateway and VM)")
        })?;
    let net = u32::from(ip) & u32::from(dhcp::netmask(prefix));
    Ok((Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2), prefix))
}

/// Gateway (the bridge's address) and the guest's address of a masquerade
/// `vmIPv6NetworkCIDR` (`addr/p`, p ≤ 126): the network's first and second addresses.
pub fn masquerade_addresses6(cidr: &str) -> Result<(Ipv6Addr, Ipv6Addr), String> {
    let net: ipnet::Ipv6Net = cidr
        .parse()
        .map_err(|_| format!("{cidr:?} is not an IPv6 CIDR (addr/n)"))?;
    if net.prefix_len() > 126 {
        return Err(format!(
            "{cidr:?}: the prefix must be 0..126 (room for gateway and VM)"
        ));
    }
    let base = u128::from(net.trunc().addr());
    Ok((Ipv6Addr::from(base + 1), Ipv6Addr::from(base + 2)))
}

/// Whether pod interface `name` has a global IPv6 address (ULAs count, as Go's
/// `IsGlobalUnicast`): KubeVirt's condition for the DHCPv6 server. From `/proc/net/if_inet6`
/// (`<addr> <index> <prefix> <scope> <flags> <name>`, scope 00 = global).
fn has_global_ipv6(name: &str) -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 6 && f[5] == name && f[3] == "00"
        })
    })
}

/// A link's MAC (`/sys/class/net/<name>/address`).
fn link_mac(name: &str) -> Option<[u8; 6]> {
    dhcp::parse_mac(
        std::fs::read_to_string(link_dir(name).join("address"))
            .ok()?
            .trim(),
    )
}

/// The IPv6 DNS servers of a resolv.conf.
pub fn parse_resolv_conf_v6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            w.next()?.parse().ok()
        })
        .collect()
}

/// DNS servers (IPv4) and search domains of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> (Vec<Ipv4Addr>, Vec<String>) {
    let (mut dns, mut search) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<Ipv4Addr>().ok()) {
                    dns.push(ip);
                }
            }
            Some("search") | Some("domain") => {
                search = words
                    .filter(|d| d.len() <= 253 && *d != ".")
                    .map(|d| d.trim_end_matches('.').to_string())
                    .collect();
            }
            _ => {}
        }
    }
    (dns, search)
}

/// What virt-handler's phase 1 cached for a bridge binding (`vif-cache-<pod iface>.json` in
/// the pod's private dir; KubeVirt's `cache.DHCPConfig` as Go's encoding/json writes it: a
/// `netlink.Addr` as `{"IP": "...", "Mask": "<base64>"}`, a MAC as base64).
#[derive(Debug, Default, serde::Deserialize)]
pub struct VifCache {
    #[serde(rename = "IP", default)]
    pub ip: Option<GoAddr>,
    #[serde(rename = "MAC", default)]
    pub mac: Option<String>,
    #[serde(rename = "Mtu", default)]
    pub mtu: Option<u16>,
    #[serde(rename = "IPAMDisabled", default)]
    pub ipam_disabled: bool,
    #[serde(rename = "Gateway", default)]
    pub gateway: Option<String>,
    #[serde(rename = "Routes", default)]
    pub routes: Option<Vec<GoRoute>>,
}

/// Go's `net.IPNet` in JSON.
#[derive(Debug, Default, serde::Deserialize)]
pub struct GoAddr {
    #[serde(rename = "IP", default)]
    pub ip: Option<String>,
    #[serde(rename = "Mask", default)]
    pub mask: Option<String>,
}

/// The parts of Go's `netlink.Route` a DHCP route needs.
#[derive(Debug, Default, serde::Deserialize)]
pub struct GoRoute {
    #[serde(rename = "Dst", default)]
    pub dst: Option<GoAddr>,
    #[serde(rename = "Gw", default)]
    pub gw: Option<String>,
}

impl GoAddr {
    /// (address, prefix length), IPv4 only.
    fn v4(&self) -> Option<(Ipv4Addr, u8)> {
        let ip: Ipv4Addr = self.ip.as_deref()?.parse().ok()?;
        let mask = crate::pod::prepare::decode_base64(self.mask.as_deref()?).ok()?;
        let mask = &mask[mask.len().checked_sub(4)?..];
        let bits = u32::from_be_bytes(mask.try_into().ok()?);
        (bits.leading_ones() == bits.count_ones()).then_some((ip, bits.count_ones() as u8))
    }
}

impl VifCache {
    /// The MAC the pod interface had (the guest takes it over).
    pub fn mac(&self) -> Option<String> {
        let b = crate::pod::prepare::decode_base64(self.mac.as_deref()?).ok()?;
        (b.len() == 6).then(|| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }
}

/// The cache file of pod interface `pod` under the pod's private dir.
pub fn vif_cache_path(config_dir: &Path, pod: &str) -> PathBuf {
    config_dir.join(format!("vif-cache-{pod}.json"))
}

/// Reads a pod interface's cache; `Ok(None)` when there is none.
pub fn read_vif_cache(path: &Path) -> Result<Option<VifCache>, NetError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| NetError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The MACs the handler cached for the bridge-bound interfaces (by interface name).
pub fn probe_bridge_macs(
    vmi: &VirtualMachineInstance,
    config_dir: &Path,
) -> BTreeMap<String, String> {
    tap_interfaces(vmi)
        .into_iter()
        .filter(|(_, ifc, _, _)| ifc.bridge.is_some())
        .filter_map(|(_, ifc, _, pod)| {
            let cache = read_vif_cache(&vif_cache_path(config_dir, &pod)).ok()??;
            Some((ifc.name.clone(), cache.mac()?))
        })
        .collect()
}

/// The DHCP config of a bridge binding from the handler's cache; `None` when the pod
/// interface had no IPv4 address (no IPAM: the guest is on its own).
fn bridge_dhcp(
    vmi: &VirtualMachineInstance,
    ifc: &crate::spec::Interface,
    cache: &VifCache,
    client_mac: [u8; 6],
    mtu: Option<u16>,
) -> Option<dhcp::DhcpConfig> {
    if cache.ipam_disabled {
        return None;
    }
    let (ip, prefix) = cache.ip.as_ref()?.v4()?;
    // KubeVirt's "fake" bridge address, 169.254.75.1<index of the interface>.
    let index = vmi
        .spec
        .domain
        .devices
        .interfaces
        .iter()
        .position(|i| i.name == ifc.name)
        .unwrap_or(0);
    let server_ip = Ipv4Addr::new(169, 254, 75, 10u8.saturating_add(index.min(9) as u8));
    let routes = cache
        .routes
        .iter()
        .flatten()
        .filter_map(|r| {
            let gw: Ipv4Addr = r.gw.as_deref()?.parse().ok()?;
            let (dst, p) = r
                .dst
                .as_ref()
                .and_then(GoAddr::v4)
                .unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
            Some((dst, p, gw))
        })
        .collect::<Vec<_>>();
    let mut routes_sorted: Vec<_> = routes.iter().filter(|r| r.1 != 0).copied().collect();
    routes_sorted.extend(routes.iter().filter(|r| r.1 == 0).copied());
    Some(dhcp::DhcpConfig {
        client_mac,
        client_ip: ip,
        prefix,
        server_ip,
        router: cache.gateway.as_deref().and_then(|g| g.parse().ok()),
        dns: Vec::new(),
        search: Vec::new(),
        mtu: cache.mtu.filter(|m| *m > 0).or(mtu),
        hostname: None,
        routes: routes_sorted,
    })
}

/// The DHCP servers phase 2 started, kept running for the pod's life (dropping one stops it).
#[derive(Debug, Default)]
pub struct Phase2 {
    /// By bridge name.
    pub servers: BTreeMap<String, (String, dhcp::Server)>,
    /// The DHCPv6 servers (masquerade, pods with IPv6), by bridge name.
    pub servers6: BTreeMap<String, dhcpv6::Server>,
    /// Servers started since [`Phase2::take_started`] was last called: (interface, address,
    /// lease watch).
    started: Vec<(String, IpAddr, tokio::sync::watch::Receiver<bool>)>,
}

impl Phase2 {
    /// The servers started since the last call, to follow their leases.
    pub fn take_started(&mut self) -> Vec<(String, IpAddr, tokio::sync::watch::Receiver<bool>)> {
        std::mem::take(&mut self.started)
    }

    fn insert(&mut self, bridge: String, interface: &str, ip: Ipv4Addr, server: dhcp::Server) {
        self.started
            .push((interface.to_string(), ip.into(), server.lease_watch()));
        self.servers.insert(bridge, (interface.to_string(), server));
    }

    fn insert6(&mut self, bridge: String, interface: &str, ip: Ipv6Addr, server: dhcpv6::Server) {
        self.started
            .push((interface.to_string(), ip.into(), server.lease_watch()));
        self.servers6.insert(bridge, server);
    }

    /// Whether the guest on interface `name` got its address from us.
    pub fn leased(&self, interface: &str) -> Option<bool> {
        self.servers
            .values()
            .find(|(i, _)| i == interface)
            .map(|(_, s)| s.leased())
    }
}

/// Phase 2 for `domain` (converted from `vmi`): checks each tap is there and starts the DHCP
/// server of each `masquerade` interface on its bridge (once per bridge: a server already
/// running in `running` is kept). `resolv_conf` is the pod's resolver configuration.
pub fn setup(
    vmi: &VirtualMachineInstance,
    domain: &Domain,
    config_dir: &Path,
    resolv_conf: &Path,
    running: &mut Phase2,
) -> Result<(), NetError> {
    for i in &domain.devices.interfaces {
        match &i.attachment {
            Attachment::User { .. } | Attachment::Passt { .. } if !in_path("passt") => {
                return Err(NetError::NoPasst {
                    interface: i.alias.strip_prefix("ua-").unwrap_or(&i.alias).to_string(),
                })
            }
            Attachment::Bridge(b) if !link_dir(b).join("bridge").exists() => {
                return Err(NetError::NoHostBridge {
                    interface: i.alias.strip_prefix("ua-").unwrap_or(&i.alias).to_string(),
                    bridge: b.clone(),
                })
            }
            _ => {}
        }
    }
    if domain
        .devices
        .interfaces
        .iter()
        .any(|i| matches!(i.attachment, Attachment::User { .. }))
    {
        passt_state_dir()?;
    }
    let taps = tap_interfaces(vmi);
    if taps.is_empty() {
        return Ok(());
    }
    let (dns, search) =
        parse_resolv_conf(&std::fs::read_to_string(resolv_conf).unwrap_or_default());
    let hostname = vmi
        .spec
        .hostname
        .clone()
        .unwrap_or_else(|| vmi.metadata.name.clone());
    let hostname: String = hostname.chars().take(63).collect();
    for (k, ifc, _multus, pod) in taps {
        let alias = format!("ua-{}", ifc.name);
        let Some(di) = domain.devices.interfaces.iter().find(|i| i.alias == alias) else {
            continue;
        };
        let Attachment::Tap(tap) = &di.attachment else {
            continue;
        };
        if !link_dir(tap).exists() {
            return Err(NetError::NoTap {
                interface: ifc.name.clone(),
                tap: tap.clone(),
            });
        }
        let bridge = names::bridge_name(&pod);
        if running.servers.contains_key(&bridge) {
            continue;
        }
        if !link_dir(&bridge).exists() {
            return Err(NetError::NoBridge {
                interface: ifc.name.clone(),
                bridge,
            });
        }
        let client_mac =
            di.mac
                .as_deref()
                .and_then(dhcp::parse_mac)
                .ok_or_else(|| NetError::Spec {
                    field: format!("interface {}", ifc.name),
                    reason: "has no MAC address".into(),
                })?;
        if ifc.masquerade.is_none() {
            let path = vif_cache_path(config_dir, &pod);
            let Some(cache) = read_vif_cache(&path)? else {
                tracing::warn!(interface = %ifc.name, path = %path.display(), "bridge binding without the handler's cache: no DHCP server (the guest configures itself)");
                continue;
            };
            let mtu = link_mtu(&format!("{pod}-nic"))
                .or_else(|| link_mtu(&pod))
                .and_then(|m| u16::try_from(m).ok());
            let Some(mut cfg) = bridge_dhcp(vmi, ifc, &cache, client_mac, mtu) else {
                tracing::info!(interface = %ifc.name, "bridge binding: the pod interface had no IPv4 address, no DHCP server");
                continue;
            };
            cfg.dns = dns.clone();
            cfg.search = search.clone();
            cfg.hostname = Some(hostname.clone());
            let ip = cfg.client_ip;
            let server = dhcp::Server::start(cfg, &bridge).map_err(|source| NetError::Dhcp {
                interface: ifc.name.clone(),
                source,
            })?;
            tracing::info!(interface = %ifc.name, %tap, %bridge, %ip, "network phase 2 done (bridge)");
            running.insert(bridge, &ifc.name, ip, server);
            continue;
        }
        let cidr = vmi.spec.networks[k]
            .pod
            .as_ref()
            .and_then(|p| p.get("vmNetworkCIDR"))
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .unwrap_or(DEFAULT_MASQUERADE_CIDR);
        let (gateway, guest, prefix) =
            masquerade_addresses(cidr).map_err(|reason| NetError::Spec {
                field: format!("spec.networks[{k}].pod.vmNetworkCIDR"),
                reason,
            })?;
        let mtu = di
            .mtu
            .or_else(|| link_mtu(&pod))
            .and_then(|m| u16::try_from(m).ok());
        let cfg = dhcp::DhcpConfig {
            client_mac,
            client_ip: guest,
            prefix,
            server_ip: gateway,
            router: Some(gateway),
            dns: dns.clone(),
            search: search.clone(),
            mtu,
            hostname: Some(hostname.clone()),
            routes: Vec::new(),
        };
        let server = dhcp::Server::start(cfg, &bridge).map_err(|source| NetError::Dhcp {
            interface: ifc.name.clone(),
            source,
        })?;
        tracing::info!(interface = %ifc.name, %tap, %bridge, ip = %guest, "network phase 2 done");
        running.insert(bridge.clone(), &ifc.name, guest, server);
        // DHCPv6 where the pod has IPv6 (KubeVirt's condition: a global address on the pod
        // interface).
        if has_global_ipv6(&pod) && !running.servers6.contains_key(&bridge) {
            let field = format!("spec.networks[{k}].pod.vmIPv6NetworkCIDR");
            let cidr = vmi.spec.networks[k]
                .pod
                .as_ref()
                .and_then(|p| p.get("vmIPv6NetworkCIDR"))
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty())
                .unwrap_or(DEFAULT_MASQUERADE_CIDR6);
            let (_, guest6) =
                masquerade_addresses6(cidr).map_err(|reason| NetError::Spec { field, reason })?;
            let cfg = dhcpv6::Dhcpv6Config {
                client_ip: guest6,
                server_mac: link_mac(&bridge).unwrap_or([2, 0, 0, 0, 0, 0]),
                dns: parse_resolv_conf_v6(
                    &std::fs::read_to_string(resolv_conf).unwrap_or_default(),
                ),
            };
            let server = dhcpv6::Server::start(cfg, &bridge).map_err(|source| NetError::Dhcp {
                interface: ifc.name.clone(),
                source,
            })?;
            tracing::info!(interface = %ifc.name, %bridge, ip = %guest6, "DHCPv6 server up");
            running.insert6(bridge, &ifc.name, guest6, server);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_cidrs() {
        assert_eq!(
            masquerade_addresses("10.0.2.0/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 1), Ipv4Addr::new(10, 0, 2, 2), 24)
        );
        assert_eq!(
            masquerade_addresses("192.168.7.77/28").unwrap(),
            (
                Ipv4Addr::new(192, 168, 7, 65),
                Ipv4Addr::new(192, 168, 7, 66),
                28
            )
        );
        assert!(masquerade_addresses("10.0.2.0").is_err());
        assert!(masquerade_addresses("10.0.2.0/31").is_err());
        assert!(masquerade_addresses("fd00::/64").is_err());
        assert_eq!(
            masquerade_addresses6(DEFAULT_MASQUERADE_CIDR6).unwrap(),
            (
                "fd10:0:2::1".parse().unwrap(),
                "fd10:0:2::2".parse().unwrap()
            )
        );
        assert_eq!(
            masquerade_addresses6("fd20::77/112").unwrap().1,
            "fd20::2".parse::<Ipv6Addr>().unwrap()
        );
        assert!(masquerade_addresses6("fd20::/127").is_err());
        assert!(masquerade_addresses6("10.0.2.0/24").is_err());
        assert_eq!(
            parse_resolv_conf_v6("nameserver 10.96.0.10\nnameserver fd00::10\nsearch a\n"),
            vec!["fd00::10".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn vif_cache_as_go_writes_it() {
        let text = r#"{"Name":"eth0","IP":{"IP":"10.99.0.2","Mask":"////AA==","Label":"","Flags":0,"Scope":0,"Peer":null,"Broadcast":"","PreferedLft":0,"ValidLft":0,"LinkIndex":0},"IPv6":{"IP":"","Mask":null,"Label":"","Flags":0,"Scope":0,"Peer":null,"Broadcast":"","PreferedLft":0,"ValidLft":0,"LinkIndex":0},"MAC":"AgAAqrsC","AdvertisingIPAddr":"","AdvertisingIPv6Addr":"","Routes":[{"LinkIndex":3,"ILinkIndex":0,"Scope":0,"Dst":null,"Src":"","Gw":"10.99.0.1","MultiPath":null,"Protocol":0,"Priority":0,"Table":254,"Type":1,"Tos":0,"Flags":0},{"LinkIndex":3,"Dst":{"IP":"10.99.0.0","Mask":"////AA=="},"Gw":""}],"Mtu":1400,"IPAMDisabled":false,"Gateway":"10.99.0.1","Subdomain":""}"#;
        let cache: VifCache = serde_json::from_str(text).unwrap();
        assert_eq!(cache.mac().as_deref(), Some("02:00:00:aa:bb:02"));
        assert_eq!(
            cache.ip.as_ref().unwrap().v4(),
            Some((Ipv4Addr::new(10, 99, 0, 2), 24))
        );
        let vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm"},
            "spec": {"domain": {"devices": {"interfaces": [{"name": "default", "bridge": {}}]}},
                     "networks": [{"name": "default", "pod": {}}]}
        }))
        .unwrap();
        let ifc = &vmi.spec.domain.devices.interfaces[0];
        let cfg = bridge_dhcp(&vmi, ifc, &cache, [2, 0, 0, 0xaa, 0xbb, 2], None).unwrap();
        assert_eq!(cfg.client_ip, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(cfg.prefix, 24);
        assert_eq!(cfg.server_ip, Ipv4Addr::new(169, 254, 75, 10));
        assert_eq!(cfg.router, Some(Ipv4Addr::new(10, 99, 0, 1)));
        assert_eq!(cfg.mtu, Some(1400));
        // The default route goes last (RFC 3442 clients ignore option 3 when 121 is there).
        assert_eq!(
            cfg.routes,
            vec![(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 99, 0, 1))]
        );
    }

    #[test]
    fn resolv_conf() {
        let (dns, search) = parse_resolv_conf(
            "# comment\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n",
        );
        assert_eq!(dns, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            search,
            vec![
                "ns1.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
    }
}
