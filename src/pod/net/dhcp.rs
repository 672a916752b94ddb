//! A single-client DHCPv4 server, as KubeVirt's launcher runs one on the in-pod bridge of a
//! `masquerade` (or `bridge`) interface: it answers one guest (its MAC) with one address, an
//! infinite lease and the pod's DNS settings.
//!
//! [`reply`] is the whole protocol, pure and bounded: one datagram in (at most
//! [`MAX_PACKET`] bytes are looked at), at most one datagram out. [`Server`] is the socket
//! around it: bound to the bridge, replies broadcast (the guest has no address yet), at most
//! [`MAX_PER_SECOND`] requests handled a second so that a flooding client costs the launcher
//! a bounded amount of work.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

pub use dhcproto::v4::MessageType;
use dhcproto::v4::{DhcpOption, Flags, HType, Message, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Name};

/// KubeVirt's "infinite" lease: 999 days, in seconds.
pub const LEASE_SECONDS: u32 = 999 * 24 * 3600;
/// The longest request looked at (an Ethernet frame's payload); longer datagrams are cut.
pub const MAX_PACKET: usize = 1500;
/// Requests handled per second at most; the rest are dropped unread.
pub const MAX_PER_SECOND: u32 = 64;

/// The per-second budget of requests a server handles: [`MAX_PER_SECOND`] in each window of
/// one second, the rest dropped unread (shared by the DHCPv4 and DHCPv6 servers).
#[derive(Debug)]
pub(super) struct Budget {
    window: Instant,
    handled: u32,
}

impl Budget {
    pub(super) fn new(now: Instant) -> Budget {
        Budget {
            window: now,
            handled: 0,
        }
    }

    /// Whether a request arriving at `now` is handled, and, when a new window begins after
    /// a flood, how many requests the last window received.
    pub(super) fn admit(&mut self, now: Instant) -> (bool, Option<u32>) {
        let mut flood = None;
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.handled > MAX_PER_SECOND {
                flood = Some(self.handled);
            }
            (self.window, self.handled) = (now, 0);
        }
        self.handled = self.handled.saturating_add(1);
        (self.handled <= MAX_PER_SECOND, flood)
    }
}

/// What the server offers its one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The guest's MAC: requests from any other client are ignored.
    pub client_mac: [u8; 6],
    pub client_ip: Ipv4Addr,
    /// Prefix length of the client's subnet.
    pub prefix: u8,
    /// The server identifier (the bridge's address).
    pub server_ip: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Search domains (option 119); the first is also the domain name (option 15).
    pub search: Vec<String>,
    pub mtu: Option<u16>,
    pub hostname: Option<String>,
    /// Classless static routes (option 121): (destination, prefix, gateway).
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Netmask of a prefix length (0..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// Decodes a datagram with dhcproto, bounded to [`MAX_PACKET`] bytes. dhcproto has panics on
/// some malformed input (a `debug_assert!` on option lengths, found by fuzzing; `chaddr()` is
/// guarded by checking `hlen` first): a panic is caught and the datagram dropped, so no
/// client's bytes can stop the server.
fn decode(packet: &[u8]) -> Option<Message> {
    let packet = &packet[..packet.len().min(MAX_PACKET)];
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(packet)).ok())
        .ok()
        .flatten()
}

/// The answer to one datagram from a client, or `None` (not ours, not a request we answer,
/// not DHCP at all). Never panics, whatever the bytes.
pub fn reply(cfg: &DhcpConfig, packet: &[u8]) -> Option<Vec<u8>> {
    let req = decode(packet)?;
    // `hlen` first: dhcproto's `chaddr()` slices by it and panics past 16 (found by fuzzing).
    if req.opcode() != Opcode::BootRequest
        || req.htype() != HType::Eth
        || req.hlen() != 6
        || req.chaddr().get(..6)? != cfg.client_mac
    {
        return None;
    }
    let kind = req.opts().msg_type()?;
    let (answer, yiaddr) = match kind {
        MessageType::Discover => (MessageType::Offer, cfg.client_ip),
        MessageType::Request => {
            // A client that chose another server's offer: not ours to answer.
            if let Some(DhcpOption::ServerIdentifier(s)) =
                req.opts().get(OptionCode::ServerIdentifier)
            {
                if *s != cfg.server_ip {
                    return None;
                }
            }
            let asked = match req.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => req.ciaddr(),
            };
            if asked == cfg.client_ip || asked.is_unspecified() {
                (MessageType::Ack, cfg.client_ip)
            } else {
                (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
            }
        }
        MessageType::Inform => (MessageType::Ack, Ipv4Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut msg = Message::new_with_id(
        req.xid(),
        if kind == MessageType::Inform {
            req.ciaddr()
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        yiaddr,
        cfg.server_ip,
        req.giaddr(),
        &cfg.client_mac,
    );
    msg.set_opcode(Opcode::BootReply);
    msg.set_flags(req.flags());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(answer));
    opts.insert(DhcpOption::ServerIdentifier(cfg.server_ip));
    if answer != MessageType::Nak {
        if kind != MessageType::Inform {
            opts.insert(DhcpOption::AddressLeaseTime(LEASE_SECONDS));
        }
        opts.insert(DhcpOption::SubnetMask(netmask(cfg.prefix)));
        if let Some(r) = cfg.router {
            opts.insert(DhcpOption::Router(vec![r]));
        }
        if !cfg.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(cfg.dns.clone()));
        }
        let names: Vec<Name> = cfg
            .search
            .iter()
            .filter_map(|d| Name::from_ascii(d).ok())
            .collect();
        if !names.is_empty() {
            opts.insert(DhcpOption::DomainSearch(names));
        }
        if let Some(d) = cfg.search.first() {
            opts.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = &cfg.hostname {
            opts.insert(DhcpOption::Hostname(h.clone()));
        }
        if let Some(m) = cfg.mtu {
            opts.insert(DhcpOption::InterfaceMtu(m));
        }
        let routes: Vec<_> = cfg
            .routes
            .iter()
            .filter_map(|(dst, p, gw)| Some((ipnet::Ipv4Net::new(*dst, *p).ok()?.trunc(), *gw)))
            .collect();
        if !routes.is_empty() {
            opts.insert(DhcpOption::ClasslessStaticRoute(routes));
        }
    }
    msg.to_vec().ok()
}

/// The parts of a DHCP message a reader checks (the fuzz target, the server's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// A BOOTREPLY (from a server).
    pub reply: bool,
    pub mac: [u8; 6],
    pub kind: Option<MessageType>,
    pub yiaddr: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
}

/// Decodes a DHCP message; `None` when it is not one.
pub fn summarize(packet: &[u8]) -> Option<Summary> {
    let m = decode(packet)?;
    if m.hlen() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(m.chaddr().get(..6)?);
    Some(Summary {
        reply: m.opcode() == Opcode::BootReply,
        mac,
        kind: m.opts().msg_type(),
        yiaddr: m.yiaddr(),
        server: match m.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        },
    })
}

/// Where a reply goes: unicast to a client that has its address (`ciaddr`, a renewal),
/// broadcast otherwise (the guest has no address to receive on, and we send no ARP).
fn destination(request: &[u8]) -> SocketAddrV4 {
    let unicast = decode(request)
        .map(|m| m.ciaddr())
        .filter(|ip| !ip.is_unspecified() && !ip.is_broadcast());
    SocketAddrV4::new(unicast.unwrap_or(Ipv4Addr::BROADCAST), 68)
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP server on {bridge}: {step}: {source}")]
    Socket {
        bridge: String,
        step: &'static str,
        source: std::io::Error,
    },
}

/// A non-blocking UDP socket of `family` for `bridge` only (`SO_BINDTODEVICE`), with
/// `SO_REUSEADDR` (one server per bridge shares the port) and `options` set, bound to `addr`.
pub(super) fn device_socket(
    bridge: &str,
    family: nix::sys::socket::AddressFamily,
    options: impl FnOnce(&OwnedFd) -> Result<(), (&'static str, nix::Error)>,
    addr: &dyn nix::sys::socket::SockaddrLike,
    bind_step: &'static str,
) -> Result<std::net::UdpSocket, DhcpError> {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, SockFlag, SockType};
    let fail = |step: &'static str| {
        move |e: nix::Error| DhcpError::Socket {
            bridge: bridge.to_string(),
            step,
            source: std::io::Error::from(e),
        }
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(fail("socket"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail("SO_REUSEADDR"))?;
    options(&fd).map_err(|(step, e)| fail(step)(e))?;
    setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(bridge),
    )
    .map_err(fail("SO_BINDTODEVICE"))?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), addr).map_err(fail(bind_step))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// A UDP socket on port 67 of `bridge` only, allowed to broadcast.
fn bind(bridge: &str) -> Result<std::net::UdpSocket, DhcpError> {
    use nix::sys::socket::{setsockopt, sockopt, AddressFamily, SockaddrIn};
    device_socket(
        bridge,
        AddressFamily::Inet,
        |fd| setsockopt(fd, sockopt::Broadcast, &true).map_err(|e| ("SO_BROADCAST", e)),
        &SockaddrIn::new(0, 0, 0, 0, 67),
        "bind 0.0.0.0:67",
    )
}

/// A running server; dropping it stops it.
#[derive(Debug)]
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    leased: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Starts serving `cfg` on `bridge` (on the current tokio runtime).
    pub fn start(cfg: DhcpConfig, bridge: &str) -> Result<Server, DhcpError> {
        let std_socket = bind(bridge)?;
        let socket =
            tokio::net::UdpSocket::from_std(std_socket).map_err(|source| DhcpError::Socket {
                bridge: bridge.to_string(),
                step: "register",
                source,
            })?;
        let (tx, leased) = tokio::sync::watch::channel(false);
        let bridge = bridge.to_string();
        let task = tokio::spawn(async move { serve(socket, cfg, bridge, tx).await });
        Ok(Server { task, leased })
    }

    /// Whether the client was given its address (an ACK was sent).
    pub fn leased(&self) -> bool {
        *self.leased.borrow()
    }

    /// Becomes true when the client was given its address.
    pub fn lease_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leased.clone()
    }
}

async fn serve(
    socket: tokio::net::UdpSocket,
    cfg: DhcpConfig,
    bridge: String,
    leased: tokio::sync::watch::Sender<bool>,
) {
    tracing::info!(%bridge, client_ip = %cfg.client_ip, "DHCP server started");
    let mut buf = vec![0u8; MAX_PACKET];
    let mut budget = Budget::new(Instant::now());
    loop {
        let n = match socket.recv_from(&mut buf).await {
            Ok((n, _)) => n,
            Err(e) => {
                tracing::warn!(%bridge, error = %e, "DHCP receive");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (admitted, flood) = budget.admit(Instant::now());
        if let Some(requests) = flood {
            tracing::warn!(%bridge, requests, "DHCP flood: requests dropped");
        }
        if !admitted {
            continue;
        }
        let request = &buf[..n];
        let Some(answer) = reply(&cfg, request) else {
            continue;
        };
        let to = destination(request);
        match socket.send_to(&answer, to).await {
            Ok(_) => {
                let ack = summarize(&answer).and_then(|m| m.kind) == Some(MessageType::Ack);
                if ack && !*leased.borrow() {
                    tracing::info!(%bridge, ip = %cfg.client_ip, "DHCP lease given");
                    leased.send_replace(true);
                }
            }
            Err(e) => tracing::warn!(%bridge, error = %e, %to, "DHCP send"),
        }
    }
}

/// For tests and the fuzz target: a request of `kind` from `mac`.
pub fn request(kind: MessageType, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Vec<u8> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(
        0x1234_5678,
        unspecified,
        unspecified,
        unspecified,
        unspecified,
        &mac,
    );
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some(ip) = requested {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DhcpConfig {
        DhcpConfig {
            client_mac: [2, 0, 0, 0xaa, 0xbb, 1],
            client_ip: Ipv4Addr::new(10, 0, 2, 2),
            prefix: 24,
            server_ip: Ipv4Addr::new(10, 0, 2, 1),
            router: Some(Ipv4Addr::new(10, 0, 2, 1)),
            dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
            search: vec!["ns1.svc.cluster.local".into(), "cluster.local".into()],
            mtu: Some(1450),
            hostname: Some("my-vm".into()),
            routes: vec![],
        }
    }

    fn decode(b: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(b)).unwrap()
    }

    #[test]
    fn discover_gets_an_offer_with_every_option() {
        let c = cfg();
        let out = decode(&reply(&c, &request(MessageType::Discover, c.client_mac, None)).unwrap());
        assert_eq!(out.opcode(), Opcode::BootReply);
        assert_eq!(out.xid(), 0x1234_5678);
        assert_eq!(out.yiaddr(), c.client_ip);
        assert_eq!(out.opts().msg_type(), Some(MessageType::Offer));
        let o = out.opts();
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![c.server_ip]))
        );
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(c.dns.clone()))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1450))
        );
        assert_eq!(
            o.get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("my-vm".into()))
        );
        assert_eq!(
            o.get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("ns1.svc.cluster.local".into()))
        );
        assert!(
            matches!(o.get(OptionCode::DomainSearch), Some(DhcpOption::DomainSearch(v)) if v.len() == 2)
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(LEASE_SECONDS))
        );
    }

    #[test]
    fn request_for_our_address_is_acked_another_is_naked() {
        let c = cfg();
        let ack = decode(
            &reply(
                &c,
                &request(MessageType::Request, c.client_mac, Some(c.client_ip)),
            )
            .unwrap(),
        );
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), c.client_ip);
        let nak = decode(
            &reply(
                &c,
                &request(
                    MessageType::Request,
                    c.client_mac,
                    Some(Ipv4Addr::new(192, 168, 1, 9)),
                ),
            )
            .unwrap(),
        );
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn other_clients_garbage_and_releases_get_nothing() {
        let c = cfg();
        assert!(reply(
            &c,
            &request(MessageType::Discover, [2, 0, 0, 0, 0, 9], None)
        )
        .is_none());
        assert!(reply(&c, &request(MessageType::Release, c.client_mac, None)).is_none());
        assert!(reply(&c, b"").is_none());
        assert!(reply(&c, &[0xff; 4000]).is_none());
        let mut cut = request(MessageType::Discover, c.client_mac, None);
        cut.truncate(100);
        assert!(reply(&c, &cut).is_none());
        // A hardware address length past chaddr's 16 bytes (dhcproto would panic on it).
        let mut long = request(MessageType::Discover, c.client_mac, None);
        long[2] = 144;
        assert!(reply(&c, &long).is_none());
        assert!(summarize(&long).is_none());
        // The fuzzer's second find: an option whose length trips a dhcproto debug_assert!.
        let odd = include_bytes!(
            "../../../fuzz/corpus/dhcp_packets/crash-option-length-debug-assert.bin"
        );
        assert!(reply(&c, odd).is_none());
    }

    #[test]
    fn the_budget_handles_at_most_max_per_second_requests_a_second() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let admitted = (0..10_000).filter(|_| b.admit(t0).0).count();
        assert_eq!(admitted, MAX_PER_SECOND as usize);
        // The next window: admitted again, and the flood of the last one reported once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), (true, Some(10_000)));
        assert_eq!(b.admit(t1), (true, None));
        // A quiet window reports nothing.
        let t2 = t1 + Duration::from_millis(1500);
        assert_eq!(b.admit(t2), (true, None));
    }

    #[test]
    fn macs_and_masks() {
        assert_eq!(
            parse_mac("02:00:00:AA:bb:01"),
            Some([2, 0, 0, 0xaa, 0xbb, 1])
        );
        assert_eq!(parse_mac("02:00:00:aa:bb"), None);
        assert_eq!(parse_mac("02:00:00:aa:bb:01:02"), None);
        assert_eq!(parse_mac("02:00:00:aa:bb:zz"), None);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
