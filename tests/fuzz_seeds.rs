//! The fuzz seeds of `fuzz/corpus/libvirt_packets/` and the generated ones of
//! `fuzz/corpus/grpc_requests/`, made with the launcher's own encoders (there are no recorded
//! libvirt packets), and the DHCP requests of `fuzz/corpus/dhcp_packets/`. The test fails when a committed seed is no longer what the encoders make;
//! `WRITE_SEEDS=1 cargo test --test fuzz_seeds` rewrites them.

use std::path::Path;

use prost::Message;
use virt_launcher::api::pb;
use virt_launcher::libvirt::rpc::{self, encode_packet, kind, procs, status, Header};
use virt_launcher::libvirt::xdr::{
    encode_typed_params, Encoder, RemoteDomain, TypedParam, TypedValue,
};
use virt_launcher::libvirt::{
    VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED as AGENT_CONNECTED,
    VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
};

const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;

fn header(proc_: i32, kind: u32, serial: u32, status: u32) -> Header {
    Header {
        prog: rpc::REMOTE_PROGRAM,
        vers: rpc::REMOTE_PROTOCOL_VERSION,
        proc_,
        kind,
        serial,
        status,
    }
}

fn dom(e: &mut Encoder) {
    RemoteDomain {
        name: "default_vm".into(),
        uuid: *b"0123456789abcdef",
        id: 1,
    }
    .encode(e);
}

/// A domain event: callbackID, domain, then `rest`.
fn event(proc_: i32, rest: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(1);
    dom(&mut e);
    rest(&mut e);
    encode_packet(
        &header(proc_, kind::MESSAGE, 0, status::OK),
        &e.into_bytes(),
    )
}

fn reply(proc_: i32, serial: u32, st: u32, body: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new();
    body(&mut e);
    encode_packet(&header(proc_, kind::REPLY, serial, st), &e.into_bytes())
}

fn every_typed_value() -> Vec<TypedParam> {
    vec![
        TypedParam::new("downtime", TypedValue::ULLong(42)),
        TypedParam::new("time_elapsed", TypedValue::LLong(-1)),
        TypedParam::new("memory_total", TypedValue::UInt(7)),
        TypedParam::new("compression_cache", TypedValue::Int(-7)),
        TypedParam::new("memory_dirty_rate", TypedValue::Double(1.5)),
        TypedParam::new("auto_converge", TypedValue::Boolean(true)),
        TypedParam::new("operation", TypedValue::String("outgoing".into())),
    ]
}

/// `remote_error` with its optional domain and network present.
fn remote_error(e: &mut Encoder) {
    e.i32(42)
        .i32(10)
        .opt_string(Some("Domain not found: no domain with matching name"));
    e.i32(2).u32(1);
    dom(e);
    e.opt_string(Some("str1"))
        .opt_string(None)
        .opt_string(Some("str3"));
    e.i32(0)
        .i32(0)
        .u32(1)
        .string("default")
        .fixed_opaque(b"fedcba9876543210");
}

fn libvirt_packets() -> Vec<(&'static str, Vec<u8>)> {
    let lifecycle = |ev: u32, detail: u32| {
        event(procs::DOMAIN_EVENT_CALLBACK_LIFECYCLE, |e| {
            e.i32(ev as i32).i32(detail as i32);
        })
    };
    let keepalive = |proc_| {
        let h = Header {
            prog: KEEPALIVE_PROGRAM,
            vers: 1,
            proc_,
            kind: kind::MESSAGE,
            serial: 0,
            status: status::OK,
        };
        encode_packet(&h, &[])
    };
    let started = lifecycle(VIR_DOMAIN_EVENT_STARTED, 0);
    let job_stats = reply(procs::DOMAIN_GET_JOB_STATS, 7, status::OK, |e| {
        e.i32(3);
        encode_typed_params(e, &every_typed_value());
    });
    vec![
        ("event-lifecycle-started.bin", started.clone()),
        (
            "event-lifecycle-stopped-migrated.bin",
            lifecycle(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
        ),
        (
            "event-reboot.bin",
            event(procs::DOMAIN_EVENT_CALLBACK_REBOOT, |_| {}),
        ),
        (
            "event-watchdog.bin",
            event(procs::DOMAIN_EVENT_CALLBACK_WATCHDOG, |e| {
                e.i32(1);
            }),
        ),
        (
            "event-io-error.bin",
            event(procs::DOMAIN_EVENT_CALLBACK_IO_ERROR_REASON, |e| {
                e.string("/var/run/kubevirt-private/vmi-disks/d/disk.img")
                    .string("ua-d")
                    .i32(1)
                    .string("enospc");
            }),
        ),
        (
            "event-device-removed-and-failed.bin",
            [
                event(procs::DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED, |e| {
                    e.string("ua-hp");
                }),
                event(procs::DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED, |e| {
                    e.string("ua-hp2");
                }),
            ]
            .concat(),
        ),
        (
            "event-job-completed.bin",
            event(procs::DOMAIN_EVENT_CALLBACK_JOB_COMPLETED, |e| {
                encode_typed_params(e, &every_typed_value());
            }),
        ),
        (
            "event-agent-lifecycle.bin",
            event(procs::DOMAIN_EVENT_CALLBACK_AGENT_LIFECYCLE, |e| {
                e.i32(AGENT_CONNECTED as i32).i32(1);
            }),
        ),
        (
            "reply-lookup-domain.bin",
            reply(procs::DOMAIN_LOOKUP_BY_NAME, 2, status::OK, dom),
        ),
        ("reply-job-stats.bin", job_stats.clone()),
        (
            "reply-error.bin",
            reply(procs::DOMAIN_LOOKUP_BY_NAME, 3, status::ERROR, remote_error),
        ),
        (
            "reply-get-xml.bin",
            reply(procs::DOMAIN_GET_XML_DESC, 4, status::OK, |e| {
                e.string("<domain type='kvm'><name>default_vm</name></domain>");
            }),
        ),
        (
            "keepalive-ping-pong.bin",
            [keepalive(1), keepalive(2)].concat(),
        ),
        (
            "conversation.bin",
            [
                reply(procs::AUTH_LIST, 1, status::OK, |e| {
                    e.u32(1).u32(0);
                }),
                reply(procs::CONNECT_OPEN, 2, status::OK, |_| {}),
                reply(procs::CONNECT_GET_LIB_VERSION, 3, status::OK, |e| {
                    e.u64(9_000_000);
                }),
                started,
                keepalive(1),
                job_stats,
                reply(procs::DOMAIN_GET_STATE, 8, status::OK, |e| {
                    e.i32(1).i32(1);
                }),
            ]
            .concat(),
        ),
    ]
}

fn grpc_requests() -> Vec<(&'static str, Vec<u8>)> {
    let vmi = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/host-disk/vmi.yaml"),
    )
    .expect("golden VMI");
    vec![
        (
            "prepare-migration-target.bin",
            pb::PrepareMigrationTargetRequest {
                vmi,
                // One entry: a map's encoding order is not fixed.
                disk_sizes: [("disk0".to_string(), 64 << 20)].into_iter().collect(),
            }
            .encode_to_vec(),
        ),
        (
            "migrate.bin",
            pb::MigrateRequest {
                target_socket: "/var/run/kubevirt/target/launcher.sock".into(),
                options: Some(pb::MigrationOptions {
                    bandwidth_mib: 64,
                    max_downtime_ms: 300,
                    completion_timeout_per_gib: 150,
                    progress_timeout: 150,
                    allow_post_copy: true,
                    allow_auto_converge: true,
                    parallel_connections: 2,
                    block_migration: true,
                }),
            }
            .encode_to_vec(),
        ),
    ]
}

fn check(target: &str, seeds: Vec<(&'static str, Vec<u8>)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let write = std::env::var_os("WRITE_SEEDS").is_some();
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            committed,
            bytes,
            "{} is stale: WRITE_SEEDS=1",
            path.display()
        );
    }
}

#[test]
fn libvirt_packet_seeds_are_what_the_encoder_makes() {
    let seeds = libvirt_packets();
    // Each decodes whole, as the client's reader thread decodes it.
    for (name, bytes) in &seeds {
        let mut stream = &bytes[..];
        let mut n = 0;
        while let Some(packet) = rpc::read_packet(&mut stream).unwrap() {
            match rpc::decode_packet(&packet).unwrap() {
                rpc::Incoming::Event { event, .. } => {
                    assert!(event.unwrap().is_some(), "{name}: an event we follow")
                }
                rpc::Incoming::Reply { result, .. } => {
                    assert_eq!(result.is_err(), name.contains("error"), "{name}")
                }
                _ => {}
            }
            n += 1;
        }
        assert!(n > 0, "{name}");
    }
    check("libvirt_packets", seeds);
}

#[test]
fn grpc_request_seeds_are_what_prost_makes() {
    check("grpc_requests", grpc_requests());
}

/// Requests from the guest's DHCP client: each kind the server answers or ignores, one from
/// another client.
fn dhcp_packets() -> Vec<(&'static str, Vec<u8>)> {
    use virt_launcher::pod::net::dhcp::{request, MessageType};
    let ours = [2, 0, 0, 0xaa, 0xbb, 1];
    let ip = std::net::Ipv4Addr::new(10, 0, 2, 2);
    vec![
        ("discover.bin", request(MessageType::Discover, ours, None)),
        ("request.bin", request(MessageType::Request, ours, Some(ip))),
        (
            "request-other-address.bin",
            request(MessageType::Request, ours, Some([10, 0, 2, 9].into())),
        ),
        ("inform.bin", request(MessageType::Inform, ours, None)),
        ("release.bin", request(MessageType::Release, ours, None)),
        (
            "discover-other-client.bin",
            request(MessageType::Discover, [2, 0, 0, 0, 0, 9], None),
        ),
        // The fuzzer's first find: hlen 144 made dhcproto's chaddr() panic.
        ("discover-hlen-144.bin", {
            let mut p = request(MessageType::Discover, ours, None);
            p[2] = 144;
            p
        }),
    ]
}

#[test]
fn dhcp_seeds_are_what_the_encoder_makes() {
    check("dhcp_packets", dhcp_packets());
}

/// DHCPv6 client messages: each kind the server answers, one for another server, one with
/// rapid commit.
fn dhcpv6_packets() -> Vec<(&'static str, Vec<u8>)> {
    use virt_launcher::pod::net::dhcpv6::{request, MessageType};
    let mac = [2, 0, 0, 0xaa, 0xbb, 1];
    let ours = vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 0];
    vec![
        ("solicit.bin", request(MessageType::Solicit, mac, None)),
        (
            "request.bin",
            request(MessageType::Request, mac, Some(ours.clone())),
        ),
        (
            "renew.bin",
            request(MessageType::Renew, mac, Some(ours.clone())),
        ),
        (
            "release.bin",
            request(MessageType::Release, mac, Some(ours)),
        ),
        (
            "information-request.bin",
            request(MessageType::InformationRequest, mac, None),
        ),
        (
            "request-other-server.bin",
            request(
                MessageType::Request,
                mac,
                Some(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]),
            ),
        ),
        ("solicit-rapid-commit.bin", {
            // Option 14 (rapid commit), length 0, appended.
            let mut p = request(MessageType::Solicit, mac, None);
            p.extend_from_slice(&[0, 14, 0, 0]);
            p
        }),
    ]
}

#[test]
fn dhcpv6_seeds_are_what_the_encoder_makes() {
    check("dhcpv6_packets", dhcpv6_packets());
}
