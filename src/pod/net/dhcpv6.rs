//! A single-client DHCPv6 server, as KubeVirt's launcher runs one on the bridge of a
//! `masquerade` interface when the pod has IPv6: it gives the guest one address
//! (`fd10:0:2::2` by default) with an infinite lease and the pod's IPv6 DNS servers. As in
//! KubeVirt, no default route: DHCPv6 carries none, and phase 1 sends no router
//! advertisements (the guest sets its gateway, `fd10:0:2::1`, itself, e.g. from cloud-init).
//!
//! [`reply`] is the whole protocol, pure and bounded like the DHCPv4 one: one datagram in (at
//! most [`MAX_PACKET`] bytes looked at), at most one out. [`Server`] is the socket around it:
//! UDP port 547 on the bridge only, joined to All_DHCP_Relay_Agents_and_Servers (`ff02::1:2`)
//! there, replies unicast to the client's link-local address, at most
//! [`MAX_PER_SECOND`] requests handled a second.
//!
//! Decision: KubeVirt answers any client on the bridge (the masquerade bridge has only the
//! guest's tap on it); so does this server. A DHCPv6 client names itself by a DUID, which need
//! not contain its MAC.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

pub use dhcproto::v6::MessageType;
use dhcproto::v6::{DhcpOption, IAAddr, Message, OptionCode, IANA};
use dhcproto::{Decodable, Decoder, Encodable};

use super::dhcp::DhcpError;

/// KubeVirt's "infinite" lease: 999 days, in seconds.
pub const LEASE_SECONDS: u32 = super::dhcp::LEASE_SECONDS;
/// The longest request looked at; longer datagrams are cut.
pub const MAX_PACKET: usize = 1500;
/// Requests handled per second at most; the rest are dropped unread.
pub const MAX_PER_SECOND: u32 = super::dhcp::MAX_PER_SECOND;
/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1).
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

/// What the server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dhcpv6Config {
    pub client_ip: Ipv6Addr,
    /// The bridge's MAC: the server's DUID (DUID-LL), as KubeVirt's.
    pub server_mac: [u8; 6],
    pub dns: Vec<Ipv6Addr>,
}

impl Dhcpv6Config {
    /// The server's DUID: DUID-LL (type 3), hardware type Ethernet (1), the bridge's MAC.
    pub fn server_duid(&self) -> Vec<u8> {
        let mut d = vec![0, 3, 0, 1];
        d.extend_from_slice(&self.server_mac);
        d
    }
}

/// Decodes a datagram with dhcproto, bounded to [`MAX_PACKET`] bytes; a panic inside
/// dhcproto on malformed input is caught and the datagram dropped (as for DHCPv4).
fn decode(packet: &[u8]) -> Option<Message> {
    let packet = &packet[..packet.len().min(MAX_PACKET)];
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(packet)).ok())
        .ok()
        .flatten()
}

/// The answer to one datagram from a client, or `None` (not a client message we answer, not
/// DHCPv6 at all, or one for another server). Never panics, whatever the bytes.
pub fn reply(cfg: &Dhcpv6Config, packet: &[u8]) -> Option<Vec<u8>> {
    let req = decode(packet)?;
    let client_id = match req.opts().get(OptionCode::ClientId) {
        Some(DhcpOption::ClientId(id)) if !id.is_empty() && id.len() <= 128 => id.clone(),
        // Every client message but Information-request carries its DUID (RFC 8415 16).
        _ if req.msg_type() == MessageType::InformationRequest => Vec::new(),
        _ => return None,
    };
    let server_duid = cfg.server_duid();
    // A message naming another server (after its Advertise) is not ours to answer.
    if let Some(DhcpOption::ServerId(s)) = req.opts().get(OptionCode::ServerId) {
        if *s != server_duid {
            return None;
        }
    }
    let rapid = req.opts().get(OptionCode::RapidCommit).is_some();
    let answer = match req.msg_type() {
        MessageType::Solicit if rapid => MessageType::Reply,
        MessageType::Solicit => MessageType::Advertise,
        MessageType::Request
        | MessageType::Renew
        | MessageType::Rebind
        | MessageType::Confirm
        | MessageType::Release
        | MessageType::Decline
        | MessageType::InformationRequest => MessageType::Reply,
        _ => return None,
    };
    let mut msg = Message::new_with_id(answer, req.xid());
    let opts = msg.opts_mut();
    if !client_id.is_empty() {
        opts.insert(DhcpOption::ClientId(client_id));
    }
    opts.insert(DhcpOption::ServerId(server_duid));
    if answer == MessageType::Reply && req.msg_type() == MessageType::Solicit {
        opts.insert(DhcpOption::RapidCommit);
    }
    let gives_address = !matches!(
        req.msg_type(),
        MessageType::InformationRequest
            | MessageType::Release
            | MessageType::Decline
            | MessageType::Confirm
    );
    if gives_address {
        // The client's IA_NA (its id kept); one if it asked for none, as KubeVirt's.
        let id = match req.opts().get(OptionCode::IANA) {
            Some(DhcpOption::IANA(ia)) => ia.id,
            _ => 0,
        };
        let mut ia_opts = dhcproto::v6::DhcpOptions::new();
        ia_opts.insert(DhcpOption::IAAddr(IAAddr {
            addr: cfg.client_ip,
            preferred_life: LEASE_SECONDS,
            valid_life: LEASE_SECONDS,
            opts: dhcproto::v6::DhcpOptions::new(),
        }));
        opts.insert(DhcpOption::IANA(IANA {
            id,
            t1: LEASE_SECONDS / 2,
            t2: LEASE_SECONDS / 8 * 7,
            opts: ia_opts,
        }));
    }
    if !cfg.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServers(cfg.dns.clone()));
    }
    msg.to_vec().ok()
}

/// The parts of a DHCPv6 message a reader checks (tests, the fuzz target, the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub kind: MessageType,
    pub xid: [u8; 3],
    /// The addresses of the first IA_NA.
    pub addresses: Vec<Ipv6Addr>,
    pub dns: Vec<Ipv6Addr>,
    pub server_id: Option<Vec<u8>>,
}

/// Decodes a DHCPv6 message; `None` when it is not one.
pub fn summarize(packet: &[u8]) -> Option<Summary> {
    let m = decode(packet)?;
    let addresses = match m.opts().get(OptionCode::IANA) {
        Some(DhcpOption::IANA(ia)) => ia
            .opts
            .iter()
            .filter_map(|o| match o {
                DhcpOption::IAAddr(a) => Some(a.addr),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(Summary {
        kind: m.msg_type(),
        xid: m.xid(),
        addresses,
        dns: match m.opts().get(OptionCode::DomainNameServers) {
            Some(DhcpOption::DomainNameServers(d)) => d.clone(),
            _ => Vec::new(),
        },
        server_id: match m.opts().get(OptionCode::ServerId) {
            Some(DhcpOption::ServerId(s)) => Some(s.clone()),
            _ => None,
        },
    })
}

/// For tests and the fuzz target: a client message of `kind` with DUID-LL of `mac`, an IA_NA
/// (id 7) and, if given, the server's DUID.
pub fn request(kind: MessageType, mac: [u8; 6], server_id: Option<Vec<u8>>) -> Vec<u8> {
    let mut m = Message::new_with_id(kind, [0x12, 0x34, 0x56]);
    let mut duid = vec![0, 3, 0, 1];
    duid.extend_from_slice(&mac);
    m.opts_mut().insert(DhcpOption::ClientId(duid));
    if let Some(s) = server_id {
        m.opts_mut().insert(DhcpOption::ServerId(s));
    }
    if kind != MessageType::InformationRequest {
        m.opts_mut().insert(DhcpOption::IANA(IANA {
            id: 7,
            t1: 0,
            t2: 0,
            opts: dhcproto::v6::DhcpOptions::new(),
        }));
    }
    m.to_vec().unwrap_or_default()
}

/// A UDP socket on `[::]:port` of `bridge` only (`SO_BINDTODEVICE`), IPv6 only, joined to
/// [`ALL_SERVERS`] on the bridge.
pub fn bind(bridge: &str, port: u16) -> Result<std::net::UdpSocket, DhcpError> {
    use nix::sys::socket::{setsockopt, sockopt, AddressFamily, SockaddrIn6};
    let any = std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    let socket = super::dhcp::device_socket(
        bridge,
        AddressFamily::Inet6,
        |fd| setsockopt(fd, sockopt::Ipv6V6Only, &true).map_err(|e| ("IPV6_V6ONLY", e)),
        &SockaddrIn6::from(any),
        "bind [::]:547",
    )?;
    let index = std::fs::read_to_string(format!("/sys/class/net/{bridge}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| DhcpError::Socket {
            bridge: bridge.to_string(),
            step: "interface index",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
    socket
        .join_multicast_v6(&ALL_SERVERS, index)
        .map_err(|source| DhcpError::Socket {
            bridge: bridge.to_string(),
            step: "join ff02::1:2",
            source,
        })?;
    Ok(socket)
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
    /// Starts serving `cfg` on `bridge`, port 547 (on the current tokio runtime).
    pub fn start(cfg: Dhcpv6Config, bridge: &str) -> Result<Server, DhcpError> {
        Self::start_on(cfg, bridge, 547)
    }

    /// [`Server::start`] on another port (tests).
    pub fn start_on(cfg: Dhcpv6Config, bridge: &str, port: u16) -> Result<Server, DhcpError> {
        let socket = tokio::net::UdpSocket::from_std(bind(bridge, port)?).map_err(|source| {
            DhcpError::Socket {
                bridge: bridge.to_string(),
                step: "register",
                source,
            }
        })?;
        let (tx, leased) = tokio::sync::watch::channel(false);
        let bridge = bridge.to_string();
        let task = tokio::spawn(async move { serve(socket, cfg, bridge, tx).await });
        Ok(Server { task, leased })
    }

    /// Becomes true when the client was given its address (a Reply with it was sent).
    pub fn lease_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leased.clone()
    }
}

async fn serve(
    socket: tokio::net::UdpSocket,
    cfg: Dhcpv6Config,
    bridge: String,
    leased: tokio::sync::watch::Sender<bool>,
) {
    tracing::info!(%bridge, client_ip = %cfg.client_ip, "DHCPv6 server started");
    let mut buf = vec![0u8; MAX_PACKET];
    let mut budget = super::dhcp::Budget::new(Instant::now());
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%bridge, error = %e, "DHCPv6 receive");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (admitted, flood) = budget.admit(Instant::now());
        if let Some(requests) = flood {
            tracing::warn!(%bridge, requests, "DHCPv6 flood: requests dropped");
        }
        if !admitted || !matches!(peer, SocketAddr::V6(_)) {
            continue;
        }
        let Some(answer) = reply(&cfg, &buf[..n]) else {
            continue;
        };
        match socket.send_to(&answer, peer).await {
            Ok(_) => {
                let given = summarize(&answer).is_some_and(|s| {
                    s.kind == MessageType::Reply && s.addresses.contains(&cfg.client_ip)
                });
                if given && !*leased.borrow() {
                    tracing::info!(%bridge, ip = %cfg.client_ip, "DHCPv6 lease given");
                    leased.send_replace(true);
                }
            }
            Err(e) => tracing::warn!(%bridge, error = %e, %peer, "DHCPv6 send"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Dhcpv6Config {
        Dhcpv6Config {
            client_ip: "fd10:0:2::2".parse().unwrap(),
            server_mac: [2, 0, 0, 0, 0, 0],
            dns: vec!["fd00::10".parse().unwrap()],
        }
    }

    const MAC: [u8; 6] = [2, 0, 0, 0xaa, 0xbb, 1];

    #[test]
    fn solicit_gets_an_advertise_then_request_a_reply_with_the_address() {
        let c = cfg();
        let adv =
            summarize(&reply(&c, &request(MessageType::Solicit, MAC, None)).unwrap()).unwrap();
        assert_eq!(adv.kind, MessageType::Advertise);
        assert_eq!(adv.xid, [0x12, 0x34, 0x56]);
        assert_eq!(adv.addresses, vec![c.client_ip]);
        assert_eq!(adv.dns, c.dns);
        assert_eq!(
            adv.server_id.as_deref(),
            Some(&[0, 3, 0, 1, 2, 0, 0, 0, 0, 0][..])
        );
        let rep = summarize(
            &reply(
                &c,
                &request(MessageType::Request, MAC, Some(c.server_duid())),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(rep.kind, MessageType::Reply);
        assert_eq!(rep.addresses, vec![c.client_ip]);
        // The client's IA_NA id and DUID come back, the lease is KubeVirt's 999 days.
        let m = Message::decode(&mut Decoder::new(
            &reply(&c, &request(MessageType::Renew, MAC, Some(c.server_duid()))).unwrap(),
        ))
        .unwrap();
        let Some(DhcpOption::IANA(ia)) = m.opts().get(OptionCode::IANA) else {
            panic!("no IA_NA: {m:?}")
        };
        assert_eq!(ia.id, 7);
        let Some(DhcpOption::IAAddr(a)) = ia.opts.get(OptionCode::IAAddr) else {
            panic!("no IAADDR: {ia:?}")
        };
        assert_eq!(
            (a.valid_life, a.preferred_life),
            (LEASE_SECONDS, LEASE_SECONDS)
        );
        assert_eq!(
            m.opts().get(OptionCode::ClientId),
            Some(&DhcpOption::ClientId(vec![
                0, 3, 0, 1, 2, 0, 0, 0xaa, 0xbb, 1
            ]))
        );
    }

    #[test]
    fn rapid_commit_solicit_gets_a_reply_at_once() {
        let mut m =
            Message::decode(&mut Decoder::new(&request(MessageType::Solicit, MAC, None))).unwrap();
        m.opts_mut().insert(DhcpOption::RapidCommit);
        let out = reply(&cfg(), &m.to_vec().unwrap()).unwrap();
        let s = summarize(&out).unwrap();
        assert_eq!((s.kind, s.addresses.len()), (MessageType::Reply, 1));
    }

    #[test]
    fn other_servers_messages_and_garbage_get_nothing() {
        let c = cfg();
        // A Request for another server, a server's own message type, no client DUID, junk.
        assert!(reply(
            &c,
            &request(
                MessageType::Request,
                MAC,
                Some(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9])
            )
        )
        .is_none());
        assert!(reply(&c, &request(MessageType::Advertise, MAC, None)).is_none());
        let mut bare = Message::new_with_id(MessageType::Solicit, [1, 2, 3]);
        bare.opts_mut().insert(DhcpOption::ElapsedTime(0));
        assert!(reply(&c, &bare.to_vec().unwrap()).is_none());
        // The fuzzer's first find: a vendor-opts option shorter than its 4-byte number made
        // dhcproto's `len - 4` overflow (a panic in debug builds, caught in `decode`).
        let vendor_opts_len_1 = [8, 0x12, 0x34, 0x56, 0, 0x11, 0, 1, 0x0c, 0, 0, 0, 7, 0];
        for junk in [
            &[][..],
            &[1],
            &[1, 0, 0, 0, 0, 1, 0xff, 0xff],
            &[0xff; 2000],
            &vendor_opts_len_1,
        ] {
            assert!(reply(&c, junk).is_none());
        }
        // Information-request: DNS, no address.
        let info =
            summarize(&reply(&c, &request(MessageType::InformationRequest, MAC, None)).unwrap())
                .unwrap();
        assert_eq!(
            (info.kind, info.addresses.len(), info.dns.len()),
            (MessageType::Reply, 0, 1)
        );
    }

    /// Sends `kind` from `client` to `to` and decodes the answer.
    async fn exchange(
        client: &tokio::net::UdpSocket,
        to: SocketAddr,
        kind: MessageType,
        server_id: Option<Vec<u8>>,
    ) -> Summary {
        client
            .send_to(&request(kind, MAC, server_id), to)
            .await
            .unwrap();
        let mut b = vec![0u8; 1500];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut b))
            .await
            .expect("no answer from the server")
            .unwrap();
        summarize(&b[..n]).unwrap()
    }

    /// The server on a real socket (bound to `lo`, joined to ff02::1:2 there): a client on
    /// the same host exchanges Solicit/Advertise and Request/Reply with it, the lease is
    /// reported, and garbage in between changes nothing.
    #[test]
    fn exchange_over_a_real_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = cfg();
            // A free port: the kernel picks one for a probe socket, released again.
            let port = bind("lo", 0)
                .expect("bind on lo (SO_BINDTODEVICE needs root)")
                .local_addr()
                .unwrap()
                .port();
            let server = Server::start_on(c.clone(), "lo", port).unwrap();
            let mut leased = server.lease_watch();
            let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
            let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
            let adv = exchange(&client, to, MessageType::Solicit, None).await;
            assert_eq!(
                (adv.kind, adv.addresses.clone()),
                (MessageType::Advertise, vec![c.client_ip])
            );
            assert!(!*leased.borrow(), "an Advertise is no lease");
            let rep = exchange(&client, to, MessageType::Request, adv.server_id.clone()).await;
            assert_eq!(
                (rep.kind, rep.addresses),
                (MessageType::Reply, vec![c.client_ip])
            );
            tokio::time::timeout(Duration::from_secs(10), leased.wait_for(|l| *l))
                .await
                .expect("lease not reported")
                .unwrap();
            client.send_to(&[0xff; 64], to).await.unwrap();
            let again = exchange(&client, to, MessageType::Renew, adv.server_id.clone()).await;
            assert_eq!(again.kind, MessageType::Reply);

            // A flood: 20,000 datagrams, garbage and real Solicits mixed, as fast as the
            // socket takes them. The server answers at most its budget a second, keeps
            // running, and answers a Request once the flood is over.
            let flooder = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
            let solicit = request(MessageType::Solicit, MAC, None);
            let started = Instant::now();
            for i in 0..20_000u32 {
                let junk = [(i % 251) as u8; 300];
                let packet: &[u8] = if i % 2 == 0 { &solicit } else { &junk };
                let _ = flooder.send_to(packet, to).await;
            }
            let mut answers = 0u32;
            let mut b = vec![0u8; 1500];
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), flooder.recv_from(&mut b)).await
            {
                answers += 1;
            }
            let windows = started.elapsed().as_secs() as u32 + 1;
            eprintln!(
                "flood: 20000 datagrams in {:?}, {answers} answered",
                started.elapsed()
            );
            assert!(answers > 0, "the server answered nothing of the flood");
            assert!(
                answers <= MAX_PER_SECOND * windows,
                "{answers} answers in {windows} windows: more than the budget"
            );
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let after = exchange(&client, to, MessageType::Request, adv.server_id).await;
            assert_eq!(
                (after.kind, after.addresses),
                (MessageType::Reply, vec![c.client_ip])
            );
        });
    }
}
