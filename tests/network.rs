//! Pod networking with real guests (issue #18).
//!
//! `masquerade_guest_gets_its_lease_and_reaches_the_peer_through_nat` builds a pod network
//! namespace the way KubeVirt's virt-handler's phase 1 leaves it (pod interface `eth0`, a veth to
//! a "node" namespace; bridge `k6t-eth0` with 10.0.2.1/24; tap `tap0` on it; nftables masquerade
//! out of `eth0` and a DNAT of one port back to the guest) and runs the launcher in it: the guest
//! gets 10.0.2.2 and the pod's DNS settings from our DHCP server, fetches a line from a TCP
//! server in the node namespace (which sees the pod's address: NAT), and answers on its own port
//! through the DNAT. The pod has IPv6 too: the guest's own DHCPv6 client (wide-dhcpv6's dhcp6c
//! in the test guest) gets fd10:0:2::2 and the pod's IPv6 DNS server from our DHCPv6 server and
//! fetches a line from the node over IPv6 through the pod's ip6 masquerade.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::Pod;

/// Runs a command, panics with its output when it fails.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces (`pod`, `node`) and the pod's resolv.conf; removed on drop.
struct Netns {
    pod: String,
    node: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let id = std::process::id();
        let n = Netns {
            pod: format!("vl-{tag}-{id}-pod"),
            node: format!("vl-{tag}-{id}-node"),
        };
        run(&["ip", "netns", "add", &n.pod]);
        run(&["ip", "netns", "add", &n.node]);
        n
    }

    fn ip(&self, ns: &str, args: &str) {
        let mut v = vec!["ip", "-n", ns];
        v.extend(args.split_whitespace());
        run(&v);
    }

    fn exec(&self, ns: &str, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(args);
        run(&v);
    }

    /// Runs `f` on a thread that lives in namespace `ns` (a thread's network namespace is its
    /// own: the test process stays where it is).
    fn in_ns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.pod));
    }
}

/// Phase 1 as virt-handler builds it for a masquerade interface, with the pod interface
/// `eth0` (10.99.0.2/24, MTU 1400) wired to the node namespace (10.99.0.1).
fn phase1(n: &Netns) {
    n.ip(&n.pod, "link add eth0 type veth peer name veth-pod");
    n.ip(&n.pod, &format!("link set veth-pod netns {}", n.node));
    n.ip(&n.pod, "link set eth0 mtu 1400");
    n.ip(&n.node, "link set veth-pod mtu 1400");
    n.ip(&n.pod, "addr add 10.99.0.2/24 dev eth0");
    // The pod has IPv6 too (the launcher then serves DHCPv6), and phase 1 gives the bridge
    // KubeVirt's fd10:0:2::1/120.
    n.ip(&n.pod, "-6 addr add fd99::2/64 dev eth0 nodad");
    n.ip(&n.node, "addr add 10.99.0.1/24 dev veth-pod");
    n.ip(&n.node, "-6 addr add fd99::1/64 dev veth-pod nodad");
    for ns in [&n.pod, &n.node] {
        n.ip(ns, "link set lo up");
    }
    n.ip(&n.pod, "link set eth0 up");
    n.ip(&n.node, "link set veth-pod up");
    n.ip(&n.pod, "route add default via 10.99.0.1");
    // KubeVirt gives every masquerade bridge one MAC (link.StaticMasqueradeBridgeMAC): the
    // guest's ARP entry for its gateway stays right after a migration to another pod.
    n.ip(
        &n.pod,
        "link add k6t-eth0 address 02:00:00:00:00:00 type bridge",
    );
    n.ip(&n.pod, "addr add 10.0.2.1/24 dev k6t-eth0");
    n.ip(&n.pod, "-6 addr add fd10:0:2::1/120 dev k6t-eth0 nodad");
    n.ip(&n.pod, "tuntap add dev tap0 mode tap");
    n.ip(&n.pod, "link set tap0 mtu 1400");
    n.ip(&n.pod, "link set tap0 master k6t-eth0");
    n.ip(&n.pod, "link set tap0 up");
    n.ip(&n.pod, "link set k6t-eth0 up");
    n.exec(&n.pod, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    n.exec(
        &n.pod,
        &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
    );
    let rules = "table ip nat {\n\
        chain prerouting { type nat hook prerouting priority -100; iifname \"eth0\" tcp dport 8081 dnat to 10.0.2.2; }\n\
        chain postrouting { type nat hook postrouting priority 100; ip saddr 10.0.2.2 oifname \"eth0\" masquerade; }\n\
        }\n\
        table ip6 nat {\n\
        chain postrouting { type nat hook postrouting priority 100; ip6 saddr fd10:0:2::2 oifname \"eth0\" masquerade; }\n\
        }\n\
        table ip filter {\n\
        chain output { type filter hook output priority 0; ip daddr 10.96.0.10 reject; }\n\
        }\n";
    let file = std::env::temp_dir().join(format!("{}.nft", n.pod));
    std::fs::write(&file, rules).unwrap();
    n.exec(&n.pod, &["nft", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(file);
    // `ip netns exec` shows /etc/netns/<ns>/resolv.conf as /etc/resolv.conf: the pod's DNS.
    // No DNS server answers here: the filter above refuses the pod's own queries at once
    // (libvirt resolves host names at start and migration; each would wait out its timeout),
    // and the pod has no route to the IPv6 one (what DHCPv6 gives the guest).
    let etc = format!("/etc/netns/{}", n.pod);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        format!("{etc}/resolv.conf"),
        "search default.svc.cluster.local svc.cluster.local cluster.local\n\
         nameserver 10.96.0.10\nnameserver fd00:10:96::a\noptions ndots:5\n",
    )
    .unwrap();
}

/// The VMI of `pod` with KubeVirt's default network (what its admission webhook adds).
fn with_default_network(yaml: &str) -> String {
    yaml.replacen(
        "    devices:\n",
        "    devices:\n      interfaces:\n      - name: default\n        masquerade: {}\n",
        1,
    )
    .replacen(
        "  volumes:\n",
        "  networks:\n  - name: default\n    pod: {}\n  volumes:\n",
        1,
    )
}

#[test]
fn masquerade_guest_gets_its_lease_and_reaches_the_peer_through_nat() {
    let n = Netns::new("masq");
    phase1(&n);

    // The "node"'s TCP server: one line naming the address the connection came from.
    let server = Netns::in_ns(&n.node, || {
        let l = TcpListener::bind("10.99.0.1:8080").unwrap();
        let (mut s, from) = l.accept().unwrap();
        writeln!(s, "peer-says-hi from={}", from.ip()).unwrap();
    });
    let server6 = Netns::in_ns(&n.node, || {
        let l = TcpListener::bind("[fd99::1]:8086").unwrap();
        let (mut s, from) = l.accept().unwrap();
        writeln!(s, "peer6-says-hi from={}", from.ip()).unwrap();
    });

    let mut pod = Pod::new("masq")
        .with_disk("data", "virtio", 16)
        .kernel_args(
            "lv.net=dhcp lv.net6=dhcp lv.gw6=fd10:0:2::1 lv.fetch=10.99.0.1:8080 \
             lv.fetch=[fd99::1]:8086 lv.serve=8081",
        );
    pod.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), n.pod.clone()];
    pod.prepare();
    std::fs::write(pod.vmi_path(), with_default_network(&pod.vmi_yaml())).unwrap();
    pod.spawn();

    let console = pod.wait_console("LV-NET ", Duration::from_secs(180));
    let lease = console
        .lines()
        .find(|l| l.contains("LV-NET "))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        lease.ends_with(
            "LV-NET 10.0.2.2/24 router=10.0.2.1 dns=10.96.0.10 \
             domain=default.svc.cluster.local mtu=1400 hostname=vl-masq"
        ),
        "unexpected lease: {lease}\n{}",
        pod.dump()
    );
    // Out through the masquerade: the node sees the pod's address, not the guest's.
    pod.wait_console(
        "LV-FETCH 10.99.0.1:8080 peer-says-hi from=10.99.0.2",
        Duration::from_secs(90),
    );
    server.join().unwrap();

    // In through the DNAT to the guest's responder.
    pod.wait_console("LV-SERVING 8081", Duration::from_secs(10));
    let reply = Netns::in_ns(&n.node, || {
        for _ in 0..30 {
            if let Ok(s) = TcpStream::connect_timeout(
                &"10.99.0.2:8081".parse().unwrap(),
                Duration::from_secs(3),
            ) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty() {
                    return line;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        String::new()
    })
    .join()
    .unwrap();
    assert_eq!(
        reply.trim(),
        "lv-guest vl-masq 10.0.2.2",
        "no reply from the guest\n{}",
        pod.dump()
    );

    // The domain got the tap, a stable MAC, the pod interface's MTU and no option ROM.
    let xml = pod.virsh(&["dumpxml", "default_vl-masq"]);
    let mac = virt_launcher::convert::names::stable_mac(&pod.uid(), "default");
    for want in [
        "<target dev='tap0' managed='no'/>".to_string(),
        format!("<mac address='{mac}'/>"),
        "<mtu size='1400'/>".into(),
        "<rom enabled='no'/>".into(),
    ] {
        assert!(xml.contains(&want), "domain XML lacks {want}:\n{xml}");
    }
    // Our GetDomain carries the interface with the lease the guest took.
    let domain = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = testkit::launcher::connect(&pod.socket()).await.unwrap();
        c.get_domain(virt_launcher::api::pb::Empty {})
            .await
            .unwrap()
            .into_inner()
    });
    let ifc = domain
        .interfaces
        .iter()
        .find(|i| i.name == "default")
        .expect("interface default in GetDomain");
    assert_eq!(
        (ifc.mac.as_str(), ifc.tap.as_str(), ifc.r#type.as_str()),
        (mac.as_str(), "tap0", "ethernet")
    );
    // The lease, or the guest agent's view of the same interface once it has reported.
    assert!(
        ifc.ip_addresses.contains(&"10.0.2.2".to_string()),
        "{:?}",
        ifc.ip_addresses
    );

    // DHCPv6 (the pod has IPv6): the guest's dhcp6c got fd10:0:2::2 and the pod's IPv6 DNS
    // server from our server, and reached the node over IPv6 through the pod's masquerade.
    let lease6 = pod
        .wait_console("LV-NET6 ", Duration::from_secs(120))
        .lines()
        .find(|l| l.contains("LV-NET6 "))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        lease6.ends_with("LV-NET6 fd10:0:2::2/128 dns=fd00:10:96::a"),
        "unexpected DHCPv6 lease: {lease6}\n{}",
        pod.dump()
    );
    pod.wait_console(
        "LV-FETCH fd99::1:8086 peer6-says-hi from=fd99::2",
        Duration::from_secs(90),
    );
    server6.join().unwrap();
    pod.wait_log("DHCPv6 lease given", Duration::from_secs(30));
    // GetDomain: the IPv6 address too, from the guest agent (polled at 10, 30, 70, 150 s after
    // it connected, as KubeVirt's launcher does: the address may come after a round) or, before
    // the agent's first report, from the DHCPv6 lease.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let addresses = loop {
        let addresses = rt.block_on(async {
            let mut c = testkit::launcher::connect(&pod.socket()).await.unwrap();
            let d = c
                .get_domain(virt_launcher::api::pb::Empty {})
                .await
                .unwrap()
                .into_inner();
            d.interfaces
                .into_iter()
                .find(|i| i.name == "default")
                .map(|i| i.ip_addresses)
                .unwrap_or_default()
        });
        if addresses.contains(&"fd10:0:2::2".to_string()) || std::time::Instant::now() > deadline {
            break addresses;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        addresses.contains(&"fd10:0:2::2".to_string()),
        "{addresses:?}"
    );
    let pid = pod.child.as_ref().unwrap().id() as i32;
    eprintln!(
        "launcher RSS with the guest running and the DHCP server up: {:.1} MiB",
        testkit::procs::rss_mib(pid).unwrap_or(0.0)
    );

    pod.signal(nix::sys::signal::Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
}

/// The first line the guest's responder sends to a connection from namespace `ns` to `addr`
/// (through the pod's DNAT), retried for 30 s; empty if none came.
fn guest_reply(ns: &str, addr: &'static str) -> String {
    Netns::in_ns(ns, move || {
        for _ in 0..30 {
            if let Ok(s) =
                TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
            {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty() {
                    return line.trim().to_string();
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        String::new()
    })
    .join()
    .unwrap()
}

/// Test 5d: a masquerade interface survives a live migration to another pod (its own network
/// namespace, built by its own phase 1, as two pods on two nodes are): the target's domain has
/// the same MAC on its `tap0`, and the guest keeps its address (no new lease) and answers
/// through the target pod's DNAT.
#[test]
fn masquerade_interface_survives_a_live_migration_with_its_mac_and_address() {
    let (n1, n2) = (Netns::new("nmgs"), Netns::new("nmgt"));
    phase1(&n1);
    phase1(&n2);

    let mut src = Pod::new("netmig")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.net=dhcp lv.serve=8081");
    src.rwx = true;
    src.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), n1.pod.clone()];
    src.prepare();
    let vmi = with_default_network(&src.vmi_yaml());
    std::fs::write(src.vmi_path(), &vmi).unwrap();
    src.spawn();
    let console = src.wait_console("LV-NET ", Duration::from_secs(180));
    let lease = console.lines().find(|l| l.contains("LV-NET ")).unwrap();
    assert!(
        lease.contains("LV-NET 10.0.2.2/24 router=10.0.2.1 "),
        "unexpected lease: {lease}
{}",
        src.dump()
    );
    src.wait_console("LV-SERVING 8081", Duration::from_secs(30));
    assert_eq!(
        guest_reply(&n1.node, "10.99.0.2:8081"),
        "lv-guest vl-netmig 10.0.2.2",
        "no reply from the guest on the source\n{}",
        src.dump()
    );
    let mac = virt_launcher::convert::names::stable_mac(&src.uid(), "default");
    let src_xml = src.virsh(&["dumpxml", "default_vl-netmig"]);
    assert!(
        src_xml.contains(&format!("<mac address='{mac}'/>")),
        "{src_xml}"
    );

    // The target: an empty pod in the other namespace, sharing the RWX claim.
    let mut dst = Pod::new("netmig-t").with_disk("data", "virtio", 16);
    dst.shared_pvcs = Some(src.pvcs_dir());
    dst.wait_for_sync = true;
    dst.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), n2.pod.clone()];
    dst.start();
    dst.wait_socket(Duration::from_secs(60));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let mut t = dst.client().await;
        t.prepare_migration_target(virt_launcher::api::pb::PrepareMigrationTargetRequest {
            vmi: vmi.as_bytes().to_vec(),
            disk_sizes: Default::default(),
        })
        .await
        .expect("prepare the target");
        let mut s = src.client().await;
        s.migrate(virt_launcher::api::pb::MigrateRequest {
            target_socket: dst.socket().display().to_string(),
            options: Some(virt_launcher::api::pb::MigrationOptions {
                progress_timeout: 120,
                ..Default::default()
            }),
        })
        .await
        .expect("Migrate call")
        .into_inner()
    });
    assert!(
        result.success,
        "migration failed: {}\n{}\n{}",
        result.message,
        src.dump(),
        dst.dump()
    );
    let status = src.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "source exit {status}\n{}", src.dump());

    // Same MAC on the target's tap0, and the guest (no new DHCP exchange: its lease holds)
    // still has 10.0.2.2: it answers through the target pod's DNAT.
    let dst_xml = dst.virsh(&["dumpxml", "default_vl-netmig"]);
    for want in [
        format!("<mac address='{mac}'/>"),
        "<target dev='tap0' managed='no'/>".into(),
    ] {
        assert!(
            dst_xml.contains(&want),
            "target domain lacks {want}:\n{dst_xml}"
        );
    }
    assert_eq!(
        guest_reply(&n2.node, "10.99.0.2:8081"),
        "lv-guest vl-netmig 10.0.2.2",
        "no reply from the guest on the target\n{}",
        dst.dump()
    );
    dst.signal(nix::sys::signal::Signal::SIGTERM);
    let status = dst.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "target exit {status}\n{}", dst.dump());
}

/// A free TCP port on the host's loopback (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A standalone pod with the default network (its interface bound by `binding`, e.g.
/// `masquerade: {}`): `--publish <published>:8081`, the guest asked to fetch from the host's
/// loopback port `fetch` through its gateway and to serve on 8081.
fn standalone_pod(name: &str, binding: &str, fetch: u16, published: u16) -> Pod {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 16)
        .kernel_args(&format!("lv.net=dhcp lv.fetch=gw:{fetch} lv.serve=8081"));
    pod.extra_args = vec!["--publish".into(), format!("{published}:8081")];
    pod.prepare();
    let yaml = with_default_network(&pod.vmi_yaml()).replace("masquerade: {}", binding);
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();
    pod
}

fn stop(mut pod: Pod) {
    pod.signal(nix::sys::signal::Signal::SIGTERM);
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "launcher exit {status}\n{}", pod.dump());
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind (passt?): {left:#?}");
}

#[test]
fn standalone_passt_binding_guest_gets_its_address_from_passt() {
    let published = free_port();
    // KubeVirt's passt binding: standalone it is the same socket-mode passt as masquerade
    // (test 5c below boots masquerade).
    let mut pod = standalone_pod("passt", "passtBinding: {}", free_port(), published);
    // passt hands the guest the host's own address and gateway by DHCP.
    let console = pod.wait_console("LV-NET ", Duration::from_secs(180));
    let lease = console.lines().find(|l| l.contains("LV-NET ")).unwrap();
    let route = String::from_utf8(
        Command::new("ip")
            .args(["-4", "route", "show", "default"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let gateway = route.split_whitespace().nth(2).unwrap_or("?").to_string();
    assert!(
        lease.contains(&format!(" router={gateway} ")),
        "lease {lease:?} does not name the host's gateway {gateway}\n{}",
        pod.dump()
    );
    let xml = pod.virsh(&["dumpxml", "default_vl-passt"]);
    for want in [
        "<interface type='user'>".to_string(),
        "<backend type='passt'".into(),
        format!("<range start='{published}' to='8081'/>"),
        "<rom enabled='no'/>".into(),
        // KubeVirt's memory backing for a passtBinding (memory_backing.go isMemfdRequired):
        // shared memfd memory and the synthetic NUMA cell, without hugepages: issue #20's
        // hugepages-less memfd start, booted (the guest got its lease above).
        "<source type='memfd'/>".into(),
        "<access mode='shared'/>".into(),
        "<cell id='0' cpus='0' memory='131072' unit='KiB'".into(),
    ] {
        assert!(xml.contains(&want), "domain XML lacks {want}:\n{xml}");
    }
    assert!(!xml.contains("<hugepages"), "{xml}");
    let needle = "guest=default_vl-passt,";
    let qemu = testkit::procs::pids()
        .into_iter()
        .filter_map(testkit::procs::cmdline)
        .find(|c| c.contains(needle))
        .unwrap_or_else(|| panic!("no QEMU for vl-passt\n{}", pod.dump()));
    assert!(
        qemu.contains("memory-backend-memfd") && qemu.contains("\"share\":true"),
        "QEMU's guest memory is not a shared memfd:\n{qemu}"
    );
    // No DHCP server of ours here: GetDomain has the address from the guest agent.
    let address = lease
        .split("LV-NET ")
        .nth(1)
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    let ips = common::wait(Duration::from_secs(150), Duration::from_secs(1), || {
        let d = tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut c = testkit::launcher::connect(&pod.socket()).await.ok()?;
            c.get_domain(virt_launcher::api::pb::Empty {})
                .await
                .ok()
                .map(|r| r.into_inner())
        })?;
        let i = d.interfaces.into_iter().find(|i| i.name == "default")?;
        (!i.ip_addresses.is_empty()).then_some(i.ip_addresses)
    })
    .unwrap_or_else(|| panic!("no address in GetDomain\n{}", pod.dump()));
    assert!(ips.contains(&address), "{ips:?} lacks {address}");
    stop(pod);
}

/// Needs passt newer than Debian 12's (0.0~git20230309 carries no TCP payload with QEMU 10's
/// `-netdev stream`): `./devtool setup` builds trixie's 0.0~git20250503 into /usr/local/bin,
/// which libvirt finds first in PATH.
#[test]
fn standalone_guest_reaches_host_loopback_and_answers_on_a_published_port() {
    // A server on the host's loopback: passt maps the guest's gateway address to it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        writeln!(s, "host-loopback-says-hi").unwrap();
    });
    let published = free_port();
    let mut pod = standalone_pod("passt-tcp", "masquerade: {}", port, published);
    let console = pod.wait_console("LV-NET ", Duration::from_secs(180));
    // "LV-NET <ip>/<len> …": the address passt gave the guest (the host's own).
    let address = console
        .lines()
        .find_map(|l| l.split("LV-NET ").nth(1))
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    pod.wait_console("host-loopback-says-hi", Duration::from_secs(90));
    server.join().unwrap();

    pod.wait_console("LV-SERVING 8081", Duration::from_secs(10));
    let mut reply = String::new();
    for _ in 0..30 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", published)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            reply.clear();
            if BufReader::new(s).read_line(&mut reply).is_ok() && !reply.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // "lv-guest <hostname> <ip>": passt gives no hostname by DHCP, the guest keeps its own.
    assert!(
        reply.starts_with("lv-guest ") && reply.trim_end().ends_with(&format!(" {address}")),
        "no reply through the published port {published}: {reply:?}\n{}",
        pod.dump()
    );
    stop(pod);
}

/// Phase 1 as virt-handler builds it for a bridge binding: the pod interface renamed
/// `eth0-nic` (its address moved to the guest), on bridge `k6t-eth0` (169.254.75.10/32) with
/// `tap0`; the pod's address, gateway, MAC and MTU cached in `vif-cache-eth0.json`.
fn phase1_bridge(n: &Netns, private: &std::path::Path) {
    n.ip(&n.pod, "link add eth0-nic type veth peer name veth-pod");
    n.ip(&n.pod, &format!("link set veth-pod netns {}", n.node));
    n.ip(&n.pod, "link set eth0-nic mtu 1400");
    n.ip(&n.node, "link set veth-pod mtu 1400");
    n.ip(&n.node, "addr add 10.99.0.1/24 dev veth-pod");
    for ns in [&n.pod, &n.node] {
        n.ip(ns, "link set lo up");
    }
    n.ip(&n.node, "link set veth-pod up");
    n.ip(&n.pod, "link add k6t-eth0 type bridge");
    n.ip(&n.pod, "addr add 169.254.75.10/32 dev k6t-eth0");
    n.ip(&n.pod, "tuntap add dev tap0 mode tap");
    n.ip(&n.pod, "link set tap0 mtu 1400");
    for l in ["eth0-nic", "tap0"] {
        n.ip(&n.pod, &format!("link set {l} master k6t-eth0"));
        n.ip(&n.pod, &format!("link set {l} up"));
    }
    n.ip(&n.pod, "link set k6t-eth0 up");
    // KubeVirt's cache.DHCPConfig as Go writes it (MAC 02:00:00:aa:bb:02 in base64).
    std::fs::create_dir_all(private).unwrap();
    std::fs::write(
        private.join("vif-cache-eth0.json"),
        r#"{"Name":"eth0","IP":{"IP":"10.99.0.2","Mask":"////AA==","Label":"","Flags":0,"Scope":0,"Peer":null,"Broadcast":"","PreferedLft":0,"ValidLft":0,"LinkIndex":0},"IPv6":{"IP":"","Mask":null,"Label":"","Flags":0,"Scope":0,"Peer":null,"Broadcast":"","PreferedLft":0,"ValidLft":0,"LinkIndex":0},"MAC":"AgAAqrsC","AdvertisingIPAddr":"","AdvertisingIPv6Addr":"","Routes":[{"LinkIndex":3,"ILinkIndex":0,"Scope":0,"Dst":null,"Src":"","Gw":"10.99.0.1","MultiPath":null,"Protocol":0,"Priority":0,"Table":254,"Type":1,"Tos":0,"Flags":0}],"Mtu":1400,"IPAMDisabled":false,"Gateway":"10.99.0.1","Subdomain":""}"#,
    )
    .unwrap();
    let etc = format!("/etc/netns/{}", n.pod);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
}

#[test]
fn bridge_guest_gets_the_cached_pod_address_and_mac() {
    let n = Netns::new("brdg");
    let mut pod = Pod::new("brdg")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.net=dhcp lv.fetch=10.99.0.1:8080");
    let private = pod.dir.join("kubevirt-private");
    phase1_bridge(&n, &private);
    let server = Netns::in_ns(&n.node, || {
        let l = TcpListener::bind("10.99.0.1:8080").unwrap();
        let (mut s, from) = l.accept().unwrap();
        writeln!(s, "node-says-hi from={}", from.ip()).unwrap();
    });
    // The cache lives in the pod's /var/run/kubevirt-private: a private bind mount in the
    // mount namespace `ip netns exec` makes.
    pod.wrapper = vec![
        "ip".into(),
        "netns".into(),
        "exec".into(),
        n.pod.clone(),
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p /var/run/kubevirt-private && mount --bind {} /var/run/kubevirt-private && exec \"$@\"",
            private.display()
        ),
        "sh".into(),
    ];
    pod.prepare();
    let yaml = with_default_network(&pod.vmi_yaml()).replace("masquerade: {}", "bridge: {}");
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();

    let console = pod.wait_console("LV-NET ", Duration::from_secs(180));
    let lease = console.lines().find(|l| l.contains("LV-NET ")).unwrap();
    assert!(
        lease.contains("LV-NET 10.99.0.2/24 router=10.99.0.1 dns=10.96.0.10 ")
            && lease.contains(" mtu=1400 "),
        "unexpected lease: {lease}\n{}",
        pod.dump()
    );
    // Straight onto the node's network: the node sees the guest's own (the pod's) address.
    pod.wait_console(
        "LV-FETCH 10.99.0.1:8080 node-says-hi from=10.99.0.2",
        Duration::from_secs(90),
    );
    server.join().unwrap();
    let xml = pod.virsh(&["dumpxml", "default_vl-brdg"]);
    assert!(
        xml.contains("<mac address='02:00:00:aa:bb:02'/>")
            && xml.contains("<target dev='tap0' managed='no'/>"),
        "the domain does not take over the pod interface's MAC on tap0:\n{xml}"
    );
    stop(pod);
}
