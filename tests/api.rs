//! The control API, driven through the real socket against a launcher running a TCG guest.

mod common;

use std::time::{Duration, Instant};

use common::Pod;
use tonic::Code;
use tonic_types::StatusExt;
use virt_launcher::api::client;
use virt_launcher::api::pb::{self, DomainState, EventKind, VolumePhase};

use common::Client;

async fn domain(c: &mut Client) -> pb::Domain {
    c.get_domain(pb::Empty {}).await.unwrap().into_inner()
}

/// Polls GetDomain until `pred` holds.
async fn wait_domain(c: &mut Client, what: &str, pred: impl Fn(&pb::Domain) -> bool) -> pb::Domain {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = domain(c).await;
        if pred(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "domain never became {what}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vmi_json(pod: &Pod) -> Vec<u8> {
    let v: serde_json::Value = serde_norway::from_str(&pod.vmi_yaml()).unwrap();
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_works_against_a_real_guest() {
    let mut pod = Pod::new("api").with_disk("data", "virtio", 16);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let mut c = pod.client().await;

    c.ping(pb::Empty {}).await.unwrap();
    let info = c.info(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(info.api_version, "launcher.v1");
    assert!(info.libvirt_version.starts_with("11."), "{info:?}");
    assert_eq!(info.domain_type, "qemu");
    assert_eq!(std::path::Path::new(&info.console_log), pod.console_log());

    let d = domain(&mut c).await;
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(d.uid, pod.uid());
    assert_eq!(d.disks.len(), 1);
    assert_eq!(
        (d.disks[0].volume.as_str(), d.disks[0].target.as_str()),
        ("data", "vda")
    );
    assert_eq!(d.disks[0].phase(), VolumePhase::Ready);
    assert_eq!(d.disks[0].size_bytes, 16 << 20);

    let stats = c.get_stats(pb::Empty {}).await.unwrap().into_inner();
    assert!(stats.cpu_time_ns > 0, "{stats:?}");
    assert_eq!(stats.max_memory_kib, 128 * 1024);
    assert_eq!(stats.disks.len(), 1);
    assert_eq!(stats.disks[0].volume, "data");
    assert!(
        stats.disks[0].read_bytes > 0,
        "the guest read its disk at boot: {stats:?}"
    );

    let vmi: serde_json::Value =
        serde_json::from_slice(&c.get_vmi(pb::Empty {}).await.unwrap().into_inner().vmi).unwrap();
    assert_eq!(vmi["metadata"]["name"], pod.name.as_str());

    // Watch from now: the first event is the current state.
    let mut watch = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state(), DomainState::Running);
    let resume_from = first.seq;

    c.pause(pb::Empty {}).await.unwrap();
    wait_domain(&mut c, "paused", |d| d.state() == DomainState::Paused).await;
    c.unpause(pb::Empty {}).await.unwrap();
    wait_domain(&mut c, "running", |d| d.state() == DomainState::Running).await;

    // The live stream saw both, in order, with consecutive sequence numbers.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = watch.message().await.unwrap().unwrap();
        if e.kind() == EventKind::Domain {
            seen.push((e.seq, e.state()));
        }
    }
    assert_eq!(
        seen.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![DomainState::Paused, DomainState::Running]
    );

    // A reconnecting controller resumes exactly where it stopped.
    drop(watch);
    let mut resumed = c
        .watch(pb::WatchRequest {
            after_seq: resume_from,
        })
        .await
        .unwrap()
        .into_inner();
    let again = resumed.message().await.unwrap().unwrap();
    assert_eq!(
        again.seq,
        resume_from + 1,
        "resume must continue with the next event"
    );

    // Freeze/unfreeze through the guest agent.
    let frozen = c
        .freeze(pb::FreezeRequest {
            timeout_seconds: 30,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(frozen.filesystems, 1);
    pod.wait_console("LV-FROZEN 1", Duration::from_secs(5));
    let thawed = c.unfreeze(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(thawed.filesystems, 1);
    pod.wait_console("LV-THAWED 1", Duration::from_secs(5));

    // Reboot: the guest comes up a second time.
    c.reboot(pb::Empty {}).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pod.console_count("LV-READY") < 2 {
        assert!(
            Instant::now() < deadline,
            "guest did not reboot\n{}",
            pod.dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Shutdown: the stream ends with the final event, the launcher exits 0.
    let mut tail = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    c.shutdown(pb::ShutdownRequest { grace_seconds: 20 })
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Ok(Some(e)) = tail.message().await {
        kinds.push(e.kind());
        if e.kind() == EventKind::Final {
            break;
        }
    }
    assert_eq!(
        kinds.last(),
        Some(&EventKind::Final),
        "no final event: {kinds:?}"
    );
    common::exit_cleanly(pod, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_mode_waits_for_sync_and_bad_requests_get_clear_codes() {
    let mut pod = Pod::new("apibad").with_disk("data", "virtio", 16);
    pod.wait_for_sync = true;
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    assert!(
        !common::Pod::socket(&pod)
            .with_file_name("launcher-init-sock")
            .exists(),
        "temporary socket left"
    );
    let mut c = pod.client().await;

    // Before any domain: state None, operations are FailedPrecondition.
    assert_eq!(domain(&mut c).await.state(), DomainState::None);
    assert_eq!(
        c.pause(pb::Empty {}).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        c.get_stats(pb::Empty {}).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Garbage and wrong fields: InvalidArgument naming the field.
    let e = c
        .sync(pb::SyncRequest {
            vmi: b"{not json".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let bad = pod.vmi_yaml().replace(
        "disk:\n            bus: virtio",
        "lun:\n            bus: virtio",
    );
    let bad: serde_json::Value = serde_norway::from_str(&bad).unwrap();
    let e = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&bad).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let field = e
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations[0]
        .field
        .clone();
    assert!(field.starts_with("spec.domain.devices.disks[0]"), "{field}");

    // Oversized message: refused, the launcher keeps serving.
    let e = c
        .sync(pb::SyncRequest {
            vmi: vec![b' '; 5 << 20],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    c.ping(pb::Empty {}).await.unwrap();

    // A good Sync starts the domain.
    let d = c
        .sync(pb::SyncRequest {
            vmi: vmi_json(&pod),
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert!(
        matches!(d.state(), DomainState::Running | DomainState::Starting),
        "{d:?}"
    );
    pod.wait_console("LV-READY", Duration::from_secs(90));

    // A Sync for another VMI is refused; the guest is unaffected.
    let other = pod
        .vmi_yaml()
        .replace(&pod.uid(), "99999999-0000-4000-8000-000000000000");
    let other: serde_json::Value = serde_norway::from_str(&other).unwrap();
    let e = c
        .sync(pb::SyncRequest {
            vmi: serde_json::to_vec(&other).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(domain(&mut c).await.state(), DomainState::Running);

    // A client that disconnects mid-stream harms nobody.
    let watch = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    drop(watch);
    c.ping(pb::Empty {}).await.unwrap();

    c.kill(pb::Empty {}).await.unwrap();
    let pod = common::exit_cleanly(pod, Duration::from_secs(30)).await;
    assert!(
        pod.log().contains("\"reason\":\"Destroyed\""),
        "{}",
        pod.dump()
    );
}

#[test]
fn peers_with_other_uids_are_refused() {
    let mut pod = Pod::new("apiuid").with_disk("data", "virtio", 16);
    pod.wait_for_sync = true;
    // The socket is group-accessible so that uid 65534 can connect at all; the uid check is
    // what must refuse it.
    pod.extra_args = vec!["--socket-group".into(), "65534".into()];
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    // The runtime root is 0700: give the stranger a way in to the socket's directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pod.runtime_dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&pod.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let ctl = env!("CARGO_BIN_EXE_launcherctl");
    let out = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(ctl)
            .arg("--socket")
            .arg(pod.socket())
            .arg("ping")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("permission denied") && stderr.contains("65534"),
        "{stderr}"
    );
    // The launcher's own uid is served.
    let ok = std::process::Command::new(ctl)
        .arg("--socket")
        .arg(pod.socket())
        .arg("ping")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    pod.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        pod.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        pod.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_read_while_sync_hot_plugs() {
    let mut pod = Pod::new("apiload").with_disk("data", "virtio", 16);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    for i in 0..3 {
        let f = std::fs::File::create(pod.hotplug_dir().join(format!("load{i}.img"))).unwrap();
        f.set_len(8 << 20).unwrap();
    }
    let mut c = pod.client().await;
    let mut vmi: serde_json::Value =
        serde_json::from_slice(&c.get_vmi(pb::Empty {}).await.unwrap().into_inner().vmi).unwrap();
    for i in 0..3 {
        client::add_hotplug_volume(
            &mut vmi,
            &format!("load{i}"),
            &format!("load{i}"),
            "virtio",
            false,
        )
        .unwrap();
    }
    let socket = pod.socket();
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move {
                let mut c = client::connect(&socket).await.expect("connect");
                let t = Instant::now();
                let mut n = 0;
                while t.elapsed() < Duration::from_secs(2) {
                    let mut req = tonic::Request::new(pb::Empty {});
                    req.set_timeout(Duration::from_secs(10));
                    c.get_domain(req).await.expect("GetDomain answered");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let sync = tokio::spawn({
        let socket = socket.clone();
        let body = serde_json::to_vec(&vmi).unwrap();
        async move {
            let mut c = client::connect(&socket).await.unwrap();
            c.sync(pb::SyncRequest { vmi: body })
                .await
                .map(|r| r.into_inner())
        }
    });
    let mut total = 0;
    for r in readers {
        total += tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("reader finished")
            .unwrap();
    }
    let d = sync.await.unwrap().expect("Sync succeeded").domain.unwrap();
    assert!(total >= 200, "every reader got answers ({total} in all)");
    assert_eq!(
        d.disks
            .iter()
            .filter(|d| d.phase() == VolumePhase::Ready)
            .count(),
        4,
        "{d:?}"
    );
    pod.wait_console("vdd:16384", Duration::from_secs(20));
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_without_a_guest_agent_is_a_failed_precondition() {
    let mut pod = Pod::new("noagent")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.agent=off");
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let mut c = pod.client().await;
    let e = c
        .freeze(pb::FreezeRequest { timeout_seconds: 5 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("agent"), "{}", e.message());
    // The guest is unaffected.
    assert_eq!(domain(&mut c).await.state(), DomainState::Running);
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}

#[test]
fn a_claim_without_disk_img_gets_a_sparse_one_sized_to_the_claim() {
    let mut pod = Pod::new("sparse")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.write=vda:on-new-image");
    pod.prepare();
    std::fs::remove_file(pod.disk_image("data")).unwrap();
    // The controller reports a 100 MiB claim with CDI's default overhead (5.5 %).
    let mut yaml = pod.vmi_yaml();
    yaml += "status:\n  volumeStatus:\n    - name: data\n      phase: Ready\n      persistentVolumeClaimInfo:\n        claimName: data\n        capacity:\n          storage: 100Mi\n";
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    let log = std::fs::File::create(pod.launcher_log()).unwrap();
    pod.child = Some(
        pod.command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    pod.wait_console("LV-WROTE vda on-new-image", Duration::from_secs(90));
    let meta = std::fs::metadata(pod.disk_image("data")).unwrap();
    // 100 MiB × 0.945 = 94.5 MiB, rounded down to whole MiB.
    assert_eq!(meta.len(), 94 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 8 << 20, "the image is not sparse");
    assert!(
        pod.console()
            .contains(&format!("vda:{}", (94u64 << 20) / 512)),
        "{}",
        pod.dump()
    );
    pod.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        pod.wait_exit(Duration::from_secs(40)).success(),
        "{}",
        pod.dump()
    );
}

/// A standalone launcher's private libvirtd keeps QEMU's capabilities from one start to the
/// next (`--capabilities-cache`), and a damaged cache costs a probe, never a start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_capabilities_are_kept_between_starts_and_a_bad_one_is_probed_again() {
    use std::time::SystemTime;
    let seed = testkit::fresh_dir(
        std::env::temp_dir().join(format!("vl-capcache-{}", std::process::id())),
    )
    .unwrap();
    // The file libvirt names after the QEMU binary's path.
    let name = "0000000000000000000000000000000000000000000000000000000000000000.xml";
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let set = |path: &std::path::Path, content: Option<&[u8]>| {
        if let Some(c) = content {
            std::fs::write(path, c).unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    };
    // The daemon's copy, while the launcher runs.
    let daemon_caps = |pod: &Pod| -> Vec<(String, SystemTime, String)> {
        let dir = pod.runtime_dir().join("state/cache/qemu/capabilities");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let content = std::fs::read_to_string(e.path()).unwrap();
                let mtime = e.metadata().unwrap().modified().unwrap();
                (e.file_name().into_string().unwrap(), mtime, content)
            })
            .collect();
        v.sort();
        v
    };
    let run = |tag: &str| {
        let mut pod = Pod::new(tag).with_disk("data", "virtio", 16);
        pod.extra_args = vec!["--capabilities-cache".into(), seed.display().to_string()];
        pod.start();
        pod.wait_console("LV-READY", Duration::from_secs(90));
        pod
    };

    // 1. A seed that is not a capabilities file libvirt could use (and one under a name no
    //    binary has): the guest starts, libvirt probed, and the probe is saved.
    set(&seed.join(name), Some(b"garbage"));
    let pod = run("caps1");
    let probed = daemon_caps(&pod);
    let real: Vec<_> = probed.iter().filter(|(n, ..)| n != name).collect();
    assert_eq!(real.len(), 1, "one QEMU binary probed: {probed:?}");
    let (real_name, probed_at, content) = real[0];
    assert!(content.contains("<qemuCaps>"), "{content:.200}");
    assert!(*probed_at > long_ago);
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
    let saved = std::fs::read_to_string(seed.join(real_name)).unwrap();
    assert_eq!(&saved, content, "the probe is kept for the next start");

    // 2. A damaged file under the real name: libvirt does not trust it, probes again, and the
    //    good result replaces the damaged one.
    set(&seed.join(real_name), Some(b"<qemuCaps><damaged"));
    let pod = run("caps2");
    let (_, reprobed_at, content) = daemon_caps(&pod)
        .into_iter()
        .find(|(n, ..)| n == real_name)
        .unwrap();
    assert!(reprobed_at > long_ago, "libvirt rewrote the damaged file");
    assert!(content.contains("<qemuCaps>"), "{content:.200}");
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
    assert_eq!(
        std::fs::read_to_string(seed.join(real_name)).unwrap(),
        content
    );

    // 3. A good file: the daemon uses it as it is (libvirt rewrites a file only when it probes),
    //    and the seed is left alone.
    set(&seed.join(real_name), None);
    let pod = run("caps3");
    let (_, used_at, _) = daemon_caps(&pod)
        .into_iter()
        .find(|(n, ..)| n == real_name)
        .unwrap();
    assert_eq!(
        used_at, long_ago,
        "libvirt probed although the cache was valid"
    );
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
    let kept = std::fs::metadata(seed.join(real_name))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(kept, long_ago);
    std::fs::remove_dir_all(&seed).unwrap();
}

/// `launcherctl` finds a standalone launcher by its VM's name (`--vm`), lists it, and its
/// commands say what they did: pause and resume twice each succeed, events carry their time,
/// `console --json` prints JSON lines, `vmi` prints the VMI.
#[test]
fn launcherctl_finds_a_standalone_launcher_by_vm_name() {
    let mut pod = Pod::new("ctl").with_disk("data", "virtio", 16);
    pod.start();
    pod.wait_console("LV-READY", Duration::from_secs(120));
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_launcherctl"))
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let vm = pod.name.clone();

    let (ok, list, err) = ctl(&["list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with(&format!("default/{vm} ")))
        .unwrap_or_else(|| panic!("{vm} not listed:\n{list}{err}"));
    assert!(ok && row.contains("Running"), "{row}");
    assert!(
        row.contains(&pod.runtime_dir().display().to_string()),
        "{row}"
    );

    let (ok, status, err) = ctl(&["--vm", &vm, "--json", "status"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "Running", "{status}");

    for cmd in ["pause", "pause", "resume", "resume"] {
        let (ok, out, err) = ctl(&["--vm", &vm, cmd]);
        assert!(ok, "{cmd}: {out}{err}");
    }
    let (_, status, _) = ctl(&["--vm", &vm, "--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "Running", "{status}");

    let (ok, console, err) = ctl(&["--vm", &vm, "--json", "console", "--log"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = console
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["line"].as_str().is_some_and(|t| t.contains("LV-READY"))),
        "{console}"
    );

    let (ok, vmi, err) = ctl(&["--vm", &format!("default/{vm}"), "vmi"]);
    assert!(ok, "{err}");
    let vmi: serde_json::Value = serde_json::from_str(&vmi).unwrap();
    assert_eq!(vmi["metadata"]["name"], vm.as_str());

    // A failed attach (no image yet) is retried by attaching again, without a detach.
    let (ok, _, err) = ctl(&["--vm", &vm, "attach", "late"]);
    assert!(!ok, "attached a volume with no image");
    assert!(err.contains("late"), "{err}");
    let f = std::fs::File::create(pod.hotplug_dir().join("late.img")).unwrap();
    f.set_len(8 << 20).unwrap();
    let (ok, out, err) = ctl(&["--vm", &vm, "--json", "attach", "late"]);
    assert!(ok, "retry: {out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let late = status["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["volume"] == "late"))
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(late["phase"], "Ready", "{status}");
    // The guest sees the 8 MiB disk (16384 sectors) in its block-device list.
    pod.wait_console(":16384", Duration::from_secs(60));

    // `sync FILE`: the VMI as synced, less the hot-plugged volume, unplugs it.
    let (_, synced, _) = ctl(&["--vm", &vm, "vmi"]);
    let mut synced: serde_json::Value = serde_json::from_str(&synced).unwrap();
    client::remove_volume(&mut synced, "late").unwrap();
    let file = pod.dir.join("synced.json");
    std::fs::write(&file, synced.to_string()).unwrap();
    let (ok, out, err) = ctl(&["--vm", &vm, "--json", "sync", file.to_str().unwrap()]);
    assert!(ok, "sync: {out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        status["disks"]
            .as_array()
            .is_some_and(|d| !d.iter().any(|d| d["volume"] == "late")),
        "{status}"
    );
    // A typo in the file is refused before anything is sent.
    std::fs::write(
        &file,
        synced
            .to_string()
            .replacen("\"domain\":{", "\"domain\":{\"cpux\":{},", 1),
    )
    .unwrap();
    let (ok, _, err) = ctl(&["--vm", &vm, "sync", file.to_str().unwrap()]);
    assert!(
        !ok && err.contains("field spec.domain.cpux: unknown field"),
        "{err}"
    );

    // The first event (the current state) with its time.
    let mut events = std::process::Command::new(env!("CARGO_BIN_EXE_launcherctl"))
        .args(["--vm", &vm, "events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(events.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _ = events.kill();
    let _ = events.wait();
    let stamp = first.split_whitespace().next().unwrap_or_default();
    assert!(
        humantime::parse_rfc3339(stamp).is_ok(),
        "no timestamp first: {first}"
    );

    let (ok, _, err) = ctl(&["--vm", "no-such-vm", "status"]);
    assert!(!ok);
    assert!(
        err.contains("no standalone launcher has run VM default/no-such-vm here"),
        "{err}"
    );

    pod.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        pod.wait_exit(Duration::from_secs(40)).success(),
        "{}",
        pod.dump()
    );
}
