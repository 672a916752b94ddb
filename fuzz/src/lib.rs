//! What the fuzz targets in `fuzz_targets/` check, shared where two targets reach the same
//! code (a VMI arrives as a file and inside gRPC requests). Every function takes untrusted
//! bytes, must return (an error for bad input is fine) and asserts the invariants that hold
//! for every input: a panic is a finding.

use std::path::{Component, Path};

use virt_launcher::convert::facts::PodFacts;
use virt_launcher::domain::live::{LiveDisk, LiveDomain};
use virt_launcher::domain::Domain;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

/// A `vmi_convert` input: VMI text (JSON or YAML), optionally followed by a NUL byte and a
/// pod-facts file (the `--pod-facts` JSON the golden tests use). Without one the facts are
/// KubeVirt's defaults.
pub fn vmi_input(data: &[u8]) {
    let (vmi, facts) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(text) = std::str::from_utf8(vmi) else {
        return;
    };
    let facts = facts.map(String::from_utf8_lossy);
    vmi_text(text, facts.as_deref());
}

/// VMI text → spec → conversion → domain XML, and the XML read back.
pub fn vmi_text(text: &str, facts: Option<&str>) {
    if let Ok(vmi) = spec::from_str(text, "fuzz") {
        vmi_checks(&vmi, facts);
    }
}

/// A parsed VMI: its own JSON reads back as the same VMI; with the pod facts given (or the
/// defaults) it converts to domain XML that reads back and names no path that climbs.
pub fn vmi_checks(vmi: &spec::VirtualMachineInstance, facts: Option<&str>) {
    // What the launcher hands back (GetVMI, launcherctl) reads back as the same VMI.
    let json = serde_json::to_string(&vmi).expect("a parsed VMI serialises");
    match spec::from_str(&json, "fuzz") {
        Ok(mut again) => {
            // Whether the user wrote a VM (error paths say spec.template.spec.…) is not part
            // of the VMI's JSON: that JSON is a VMI.
            again.from_vm = vmi.from_vm;
            assert_eq!(&again, vmi, "the VMI changed through its own JSON: {json}")
        }
        Err(e) => panic!("the VMI's own JSON does not parse: {e}\n{json}"),
    }
    let facts = match facts {
        None => PodFacts::defaults(vmi),
        Some(f) => match podfacts::from_json(f, vmi) {
            Ok(f) => f,
            Err(_) => return,
        },
    };
    let Ok(domain) = convert::convert(vmi, &facts) else {
        return;
    };
    paths_stay_put(&domain);
    domain_reads_back(&domain);
}

/// A name from the spec never turns into a path that climbs elsewhere: every file the domain
/// names (disk sources, kernel, initrd, firmware) is absolute and has no `..`.
pub fn paths_stay_put(d: &Domain) {
    let os = &d.os;
    let paths = d
        .devices
        .disks
        .iter()
        .map(|disk| disk.source_path())
        .chain(os.kernel.as_deref())
        .chain(os.initrd.as_deref())
        .chain(os.loader.as_ref().map(|l| l.path.as_path()))
        .chain(os.nvram.as_ref().map(|n| n.path.as_path()));
    for p in paths {
        assert!(
            p.is_absolute() && !p.components().any(|c| c == Component::ParentDir),
            "domain path {p:?}"
        );
    }
}

/// The domain's XML is well-formed and the read side ([`LiveDomain`], [`LiveDisk`]) finds in
/// it exactly what the write side put there.
pub fn domain_reads_back(d: &Domain) {
    let xml = d.to_xml();
    well_formed(&xml);
    let live = LiveDomain::parse(&xml)
        .unwrap_or_else(|e| panic!("our domain XML does not read back: {e}\n{xml}"));
    assert_eq!(live.name.as_deref(), Some(d.name()), "{xml}");
    assert_eq!(live.uuid, d.uuid, "{xml}");
    assert_eq!(live.disks().len(), d.devices.disks.len(), "{xml}");
    for (read, written) in live.disks().iter().zip(&d.devices.disks) {
        assert_eq!(
            read.target_dev(),
            Some(written.target_dev.as_str()),
            "{xml}"
        );
        assert_eq!(read.bus(), Some(written.bus.as_str()), "{xml}");
        assert_eq!(read.alias(), Some(written.alias.as_str()), "{xml}");
        assert_eq!(read.volume_name(), Some(written.volume()), "{xml}");
        assert_eq!(
            read.source_path().map(Path::new),
            Some(written.source_path()),
            "{xml}"
        );
        assert_eq!(read.serial, written.serial, "{xml}");
        // The hot-plug form of the same disk reads back as the same disk.
        let single = written.to_xml();
        well_formed(&single);
        let alone = LiveDisk::parse(&single)
            .unwrap_or_else(|e| panic!("our disk XML does not read back: {e}\n{single}"));
        assert_eq!(&alone, read, "{single}");
    }
    let ifaces = live.devices.as_ref().map_or(&[][..], |d| &d.interface[..]);
    assert_eq!(ifaces.len(), d.devices.interfaces.len(), "{xml}");
}

/// Every event of `xml` reads without an error, to the end.
pub fn well_formed(xml: &str) {
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("not well-formed XML: {e}\n{xml}"),
        }
    }
}

/// A `dhcpv6_packets` input: one datagram from the guest's side of the bridge, answered as the
/// launcher's DHCPv6 server answers it. Whatever the bytes: no panic, at most one reply, and a
/// reply is a well-formed Advertise or Reply with our server DUID and no address but the
/// guest's.
pub fn dhcpv6_packet(data: &[u8]) {
    use virt_launcher::pod::net::dhcpv6::{self, Dhcpv6Config, MessageType};
    let cfg = Dhcpv6Config {
        client_ip: "fd10:0:2::2".parse().unwrap(),
        server_mac: [2, 0, 0, 0, 0, 0],
        dns: vec!["fd00::10".parse().unwrap()],
    };
    let Some(out) = dhcpv6::reply(&cfg, data) else {
        return;
    };
    assert!(
        out.len() <= dhcpv6::MAX_PACKET,
        "reply of {} bytes",
        out.len()
    );
    let summary = dhcpv6::summarize(&out).expect("our reply decodes");
    assert!(matches!(
        summary.kind,
        MessageType::Advertise | MessageType::Reply
    ));
    assert_eq!(summary.server_id, Some(cfg.server_duid()));
    assert!(summary.addresses.iter().all(|a| *a == cfg.client_ip));
}

/// A `dhcp_packets` input: one datagram from the guest's side of the bridge, answered as the
/// launcher's DHCP server answers it. Whatever the bytes: no panic, at most one reply, and a
/// reply is a well-formed BOOTREPLY to our client's MAC that carries our server identifier.
pub fn dhcp_packet(data: &[u8]) {
    use std::net::Ipv4Addr;
    use virt_launcher::pod::net::dhcp::{self, DhcpConfig};
    let cfg = DhcpConfig {
        client_mac: [2, 0, 0, 0xaa, 0xbb, 1],
        client_ip: Ipv4Addr::new(10, 0, 2, 2),
        prefix: 24,
        server_ip: Ipv4Addr::new(10, 0, 2, 1),
        router: Some(Ipv4Addr::new(10, 0, 2, 1)),
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        mtu: Some(1450),
        hostname: Some("vm".into()),
        routes: vec![(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 2, 1))],
    };
    let Some(out) = dhcp::reply(&cfg, data) else {
        return;
    };
    assert!(
        out.len() <= dhcp::MAX_PACKET,
        "reply of {} bytes",
        out.len()
    );
    let summary = dhcp::summarize(&out).expect("our reply decodes");
    assert_eq!(summary.mac, cfg.client_mac);
    assert_eq!(summary.server, Some(cfg.server_ip));
    assert!(summary.reply);
}
