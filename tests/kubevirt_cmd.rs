//! KubeVirt's cmd protocol, played as virt-handler plays it, against a launcher started
//! without a VMI (waiting for a Sync) on a real TCG guest: version discovery, the idempotent
//! Sync, hot-plug following the handler's volume phases, the handler-driven shutdown (ACPI
//! and a grace stamp, never a destroy of our own; Kill; Delete, after which the launcher
//! exits), and bad input answered in-band with the running VM untouched. launcher.v1 keeps
//! working on the same socket.

mod common;

use std::time::Duration;

use common::{Client, Pod};
use testkit::kubevirt::{
    self as kv, handler_vmi, raw_vmi_request, set_hotplug_volume, set_phase, vmi_request,
    with_timeout, with_uid, CmdClient, CmdResponse, NotifyServer, LONG_TIMEOUT, SHORT_TIMEOUT,
};
use tonic::Code;
use virt_launcher::api::kubevirt::pb::cmd::v1 as cmd;
use virt_launcher::api::pb::{self, DomainState};

async fn sync(h: &mut CmdClient, req: cmd::VmiRequest) -> CmdResponse {
    h.sync_virtual_machine(with_timeout(req, LONG_TIMEOUT))
        .await
        .expect("Sync answers in-band")
        .into_inner()
}

async fn call(
    h: &mut CmdClient,
    what: &str,
    vmi: &serde_json::Value,
) -> Result<CmdResponse, tonic::Status> {
    let req = with_timeout(vmi_request(vmi), LONG_TIMEOUT);
    let r = match what {
        "Shutdown" => h.shutdown_virtual_machine(req).await,
        "Kill" => h.kill_virtual_machine(req).await,
        "Delete" => h.delete_virtual_machine(req).await,
        "Pause" => h.pause_virtual_machine(req).await,
        "Unpause" => h.unpause_virtual_machine(req).await,
        "Reset" => h.reset_virtual_machine(req).await,
        "Unfreeze" => h.unfreeze_virtual_machine(req).await,
        other => panic!("no call {other}"),
    };
    r.map(|r| r.into_inner())
}

/// Calls `what` and expects in-band success.
async fn ok(h: &mut CmdClient, what: &str, vmi: &serde_json::Value) {
    let r = call(h, what, vmi).await.expect(what);
    assert!(r.success, "{what}: {r:?}");
}

async fn domain_json(h: &mut CmdClient) -> String {
    let r = h
        .get_domain(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(r.response.as_ref().unwrap().success, "{r:?}");
    r.domain
}

/// GetDomain's api.Domain JSON, parsed.
async fn domain(h: &mut CmdClient) -> serde_json::Value {
    let json = domain_json(h).await;
    assert!(!json.is_empty(), "GetDomain: no domain");
    serde_json::from_str(&json).unwrap()
}

async fn state(l: &mut Client) -> DomainState {
    l.get_domain(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .state()
}

async fn wait_state(l: &mut Client, pod: &Pod, want: DomainState) {
    for _ in 0..300 {
        if state(l).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("domain never {want:?}\n{}", pod.dump());
}

fn domuuid(pod: &Pod) -> String {
    pod.virsh(&["domuuid", &format!("default_{}", pod.name)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_starts_hotplugs_shuts_down_kills_and_deletes() {
    let mut pod = Pod::new("kv-cmd")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.hotplug=rw lv.acpi=ignore")
        .grace(2);
    pod.wait_for_sync = true;
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let socket = pod.socket();
    // The handler's first contact creates the notify pipe in the pod.
    let notify = NotifyServer::start(&share.join("domain-notify-pipe.sock")).unwrap();

    // Discovery, as every new handler client does it.
    assert_eq!(kv::cmd_versions(&socket).await.unwrap(), vec![1]);
    let mut h = kv::connect_cmd(&socket).await.unwrap();
    let mut l = pod.client().await;
    let ping = h
        .ping(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(ping.success);

    // No domain yet: GetDomain is "", and Shutdown/Kill/Delete have nothing to do.
    assert_eq!(domain_json(&mut h).await, "");
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Running").unwrap();
    // A Filesystem PVC as the handler rewrites it: a hostDisk DiskOrCreate in its own
    // directory (the launcher creates the sparse image if the handler has not).
    let host_image = pod.dir.join("vmi-disks/pvc/disk.img");
    std::fs::create_dir_all(host_image.parent().unwrap()).unwrap();
    kv::add_host_disk(&mut vmi, "pvc", &host_image, "8Mi");
    for what in ["Shutdown", "Kill", "Delete"] {
        ok(&mut h, what, &vmi).await;
    }

    // Bad input: malformed JSON, named.
    let r = sync(&mut h, raw_vmi_request(b"{\"metadata\": ".to_vec())).await;
    assert!(
        !r.success && r.message.contains("VMIRequest.vmi.vmiJson"),
        "{r:?}"
    );
    eprintln!("malformed: {}", r.message);
    let r = sync(&mut h, raw_vmi_request(Vec::new())).await;
    assert!(
        !r.success && r.message.contains("VMIRequest.vmi.vmiJson"),
        "{r:?}"
    );

    // A VMI that is already Running (it runs elsewhere, or ran) is never started.
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    assert_eq!(state(&mut l).await, DomainState::None);
    assert_eq!(domain_json(&mut h).await, "");

    // A start whose volume file is missing (a hostDisk of type Disk): refused, named.
    let mut missing = vmi.clone();
    set_phase(&mut missing, "Scheduled");
    let gone = pod.dir.join("vmi-disks/gone/disk.img");
    kv::add_host_disk(&mut missing, "gone", &gone, "8Mi");
    let last = missing["spec"]["volumes"].as_array().unwrap().len() - 1;
    missing["spec"]["volumes"][last]["hostDisk"]["type"] = "Disk".into();
    let r = sync(&mut h, vmi_request(&missing)).await;
    assert!(
        !r.success
            && r.message
                .contains(&format!("spec.volumes[{last}].hostDisk.path")),
        "{r:?}"
    );
    eprintln!("missing hostDisk: {}", r.message);
    assert_eq!(domain_json(&mut h).await, "");
    ok(&mut h, "Delete", &vmi).await;

    // The start: phase Scheduled. Sync returns once the domain is started.
    set_phase(&mut vmi, "Scheduled");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    wait_state(&mut l, &pod, DomainState::Running).await;
    pod.wait_console("LV-READY", Duration::from_secs(90));
    let uuid = domuuid(&pod);
    assert_eq!(std::fs::metadata(&host_image).unwrap().len(), 8 << 20);
    assert!(
        testkit::guest::device_of(&pod.console(), 16384).is_some(),
        "the guest does not see the hostDisk PVC\n{}",
        pod.dump()
    );
    let d = domain(&mut h).await;
    assert_eq!(d["Status"]["Status"], "Running", "{d}");
    assert_eq!(
        d["Spec"]["Metadata"]["KubeVirt"]["UID"],
        pod.uid().as_str(),
        "{d}"
    );
    assert_eq!(
        d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionGracePeriodSeconds"], 2,
        "{d}"
    );
    assert!(
        d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionTimestamp"].is_null(),
        "{d}"
    );

    // The handler's next reconcile: phase Running. Nothing changes.
    set_phase(&mut vmi, "Running");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    assert_eq!(domuuid(&pod), uuid, "the second Sync must not restart");
    assert_eq!(pod.console_count("LV-READY"), 1);

    // Bad input while running: another VMI's uid; a hot-plugged volume whose file is missing.
    let r = sync(
        &mut h,
        vmi_request(&with_uid(&vmi, "11111111-2222-4333-8444-555555555555")),
    )
    .await;
    assert!(!r.success && r.message.contains("uid"), "{r:?}");
    eprintln!("another uid: {}", r.message);
    let mut ghost = vmi.clone();
    set_hotplug_volume(&mut ghost, "ghost", "virtio", "MountedToPod");
    let r = sync(&mut h, vmi_request(&ghost)).await;
    assert!(!r.success && r.message.contains("ghost"), "{r:?}");
    eprintln!("missing file: {}", r.message);
    assert_eq!(state(&mut l).await, DomainState::Running);
    assert_eq!(domuuid(&pod), uuid);

    // Hot-plug by the handler's phases: AttachedToNode is not yet mounted into the pod.
    let image = pod.hotplug_dir().join("fsvol.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    set_hotplug_volume(&mut vmi, "fsvol", "virtio", "AttachedToNode");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    let d = l.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert!(
        !d.disks.iter().any(|k| k.volume == "fsvol"),
        "attached at AttachedToNode: {d:?}"
    );
    let d = domain(&mut h).await;
    assert!(
        !d["Spec"]["Devices"]["Disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["Alias"]["Name"] == "fsvol"),
        "{d}"
    );
    // MountedToPod: attached, and the guest sees it (32 MiB = 65536 sectors) and writes to it.
    set_hotplug_volume(&mut vmi, "fsvol", "virtio", "MountedToPod");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    let d = l.get_domain(pb::Empty {}).await.unwrap().into_inner();
    let disk = d.disks.iter().find(|k| k.volume == "fsvol").expect("fsvol");
    assert!(disk.hotplugged && !disk.target.is_empty(), "{disk:?}");
    // The handler learns the target from the domain JSON (and then sets phase Ready).
    let d = domain(&mut h).await;
    let disks = d["Spec"]["Devices"]["Disks"].as_array().expect("disks");
    let hp = disks
        .iter()
        .find(|k| k["Alias"]["Name"] == "fsvol")
        .unwrap_or_else(|| panic!("fsvol not in the domain JSON: {d}"));
    assert_eq!(hp["Target"]["Device"], disk.target.as_str(), "{d}");
    let dev = common::wait(Duration::from_secs(30), Duration::from_millis(100), || {
        testkit::guest::device_of(&pod.console(), 65536)
    })
    .unwrap_or_else(|| panic!("guest never saw the hot-plugged disk\n{}", pod.dump()));
    pod.wait_console(
        &format!("LV-HOTWROTE {dev} lv-hot-{dev}"),
        Duration::from_secs(30),
    );
    // Ready (the handler saw the notified target): still a no-op.
    set_hotplug_volume(&mut vmi, "fsvol", "virtio", "Ready");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    // Unplug: the volume leaves the spec (and its status); the Sync detaches it.
    let mut unplugged = vmi.clone();
    virt_launcher::api::client::remove_volume(&mut unplugged, "fsvol").unwrap();
    let r = sync(&mut h, vmi_request(&unplugged)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    let d = domain(&mut h).await;
    assert!(
        !d["Spec"]["Devices"]["Disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["Alias"]["Name"] == "fsvol"),
        "still attached: {d}"
    );
    // And back, as the handler re-plugs it (mounted at once this time).
    set_hotplug_volume(&mut vmi, "fsvol", "virtio", "MountedToPod");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    // (The first read, at the first plug, found the disk empty.)
    pod.wait_console_count("LV-HOTREAD", 2, Duration::from_secs(30));
    let read_back = pod
        .console()
        .lines()
        .any(|l| l.starts_with("LV-HOTREAD ") && l.ends_with(&format!(" lv-hot-{dev}")));
    assert!(
        read_back,
        "the re-plugged disk lost its data\n{}",
        pod.dump()
    );

    // Reads the handler's metrics and downward metrics use.
    let stats = h
        .get_domain_stats(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(stats.response.as_ref().unwrap().success, "{stats:?}");
    let s: serde_json::Value = serde_json::from_str(&stats.domain_stats).unwrap();
    assert!(s["Cpu"]["Time"].as_u64().unwrap() > 0, "{s}");
    let qemu = h
        .get_qemu_version(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(qemu.response.unwrap().success && qemu.version.starts_with("10."));

    // Another VMI's Pause: refused in-band, the VM untouched.
    let other = with_uid(&vmi, "11111111-2222-4333-8444-555555555555");
    let r = call(&mut h, "Pause", &other).await.unwrap();
    assert!(!r.success && r.message.contains("uid"), "{r:?}");
    assert_eq!(state(&mut l).await, DomainState::Running);

    // Pause / unpause, freeze / unfreeze (the guest agent), as virtctl asks through the handler.
    ok(&mut h, "Pause", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Paused).await;
    ok(&mut h, "Unpause", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Running).await;
    let frozen = h
        .freeze_virtual_machine(with_timeout(
            cmd::FreezeRequest {
                vmi: vmi_request(&vmi).vmi,
                unfreeze_timeout_seconds: 30,
            },
            kv::FREEZE_TIMEOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(frozen.success, "{frozen:?}");
    pod.wait_console("LV-FROZEN", Duration::from_secs(10));
    ok(&mut h, "Unfreeze", &vmi).await;
    pod.wait_console("LV-THAWED", Duration::from_secs(10));

    // Not served: UNIMPLEMENTED, as the handler expects for what a launcher lacks.
    let e = h
        .get_sev_info(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    // A Migrate without options, or with an unknown one: in-band, named.
    let migrate = |options: &[u8]| {
        with_timeout(
            cmd::MigrationRequest {
                vmi: vmi_request(&vmi).vmi,
                options: options.to_vec(),
            },
            LONG_TIMEOUT,
        )
    };
    for (options, field) in [
        (&b""[..], "MigrationRequest.options"),
        (b"{\"Bandwith\":\"0\"}", "Bandwith"),
    ] {
        let r = h
            .migrate_virtual_machine(migrate(options))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.success && r.message.contains(field), "{r:?}");
    }
    // Good options, but the VMI has no migration state yet: refused, named (the migration
    // itself: tests/kubevirt_migration.rs).
    let r = h
        .migrate_virtual_machine(migrate(br#"{"Bandwidth":"0","MaxDowntimeMs":900}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.success && r.message.contains("status.migrationState"),
        "{r:?}"
    );
    assert_eq!(state(&mut l).await, DomainState::Running);

    // Reset: the guest starts again without shutting down.
    ok(&mut h, "Reset", &vmi).await;
    pod.wait_console_count("LV-READY", 2, Duration::from_secs(90));

    // Shutdown: the ACPI button, and the grace stamp; the guest ignores it, and the launcher
    // does not destroy it by itself, however long past the grace period (2 s).
    let mut events = l
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    ok(&mut h, "Shutdown", &vmi).await;
    pod.wait_console("LV-ACPI-IGNORED", Duration::from_secs(20));
    let stamped = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(e)) = events.message().await {
            if e.message.contains("deletion timestamp set") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(stamped, Ok(true), "no deletion stamp\n{}", pod.dump());
    let grace = &domain(&mut h).await["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"];
    let stamp = grace["DeletionTimestamp"]
        .as_str()
        .expect("stamped")
        .to_string();
    assert!(stamp.ends_with('Z'), "RFC 3339: {stamp}");
    // ... and notified: the handler reads the grace start from the notified domain.
    let notified = notify
        .wait_for(Duration::from_secs(20), |got| {
            got.iter().any(|r| {
                r.json["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionTimestamp"]
                    == stamp.as_str()
            })
        })
        .await;
    assert!(notified.is_some(), "the deletion stamp was not notified");
    // The handler re-sends Shutdown until it kills: the button is pressed again.
    ok(&mut h, "Shutdown", &vmi).await;
    pod.wait_console_count("LV-ACPI-IGNORED", 2, Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(state(&mut l).await, DomainState::Running, "{}", pod.dump());
    // The stamp is the first Shutdown's, once.
    let d = domain(&mut h).await;
    assert_eq!(d["Status"]["Status"], "Running", "{d}");
    assert_eq!(
        d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionTimestamp"],
        stamp.as_str()
    );

    // Kill: destroyed; the launcher waits for the handler's Delete.
    ok(&mut h, "Kill", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Shutoff).await;
    let d = domain(&mut h).await;
    assert_eq!(
        (
            d["Status"]["Status"].as_str(),
            d["Status"]["Reason"].as_str()
        ),
        (Some("Shutoff"), Some("Destroyed")),
        "{d}"
    );
    ok(&mut h, "Kill", &vmi).await;
    ok(&mut h, "Shutdown", &vmi).await;
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "a Sync of the stopped domain is a no-op: {r:?}");
    assert!(
        pod.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the launcher must wait for Delete\n{}",
        pod.dump()
    );

    // Delete: undefined, and the launcher exits (a disconnect while answering is tolerated
    // by the handler).
    if let Ok(r) = call(&mut h, "Delete", &vmi).await {
        assert!(r.success, "{r:?}");
    }
    let pod = common::exit_cleanly(pod, Duration::from_secs(30)).await;
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    // The last event the handler got says the domain is gone.
    let got = notify.stop().await;
    assert!(
        got.last().is_some_and(|r| r.is_gone()),
        "no final event: {:?}",
        got.iter()
            .map(|r| (r.event_type.clone(), r.status().to_string()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_shut_down_by_the_handler_waits_for_delete_and_a_sigterm_ends_it() {
    let mut pod = Pod::new("kv-cmd-off")
        .with_disk("data", "virtio", 16)
        .grace(20);
    pod.wait_for_sync = true;
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let mut h = kv::connect_cmd(&pod.socket()).await.unwrap();
    let mut l = pod.client().await;
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Scheduled").unwrap();
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    pod.wait_console("LV-READY", Duration::from_secs(90));
    set_phase(&mut vmi, "Running");

    // Delete while the domain runs: refused in-band, the VM untouched.
    let r = call(&mut h, "Delete", &vmi).await.unwrap();
    assert!(!r.success && r.message.contains("running"), "{r:?}");
    assert_eq!(state(&mut l).await, DomainState::Running);

    // Shutdown: this guest powers off on the button; the domain stays defined, Shutoff
    // (Shutdown), for the handler to see and delete.
    ok(&mut h, "Shutdown", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Shutoff).await;
    let d = domain(&mut h).await;
    assert_eq!(
        (
            d["Status"]["Status"].as_str(),
            d["Status"]["Reason"].as_str()
        ),
        (Some("Shutoff"), Some("Shutdown")),
        "{d}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pod.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the launcher must wait for Delete\n{}",
        pod.dump()
    );
    assert!(pod.virsh(&["list", "--all", "--name"]).contains(&pod.name));

    // The pod is deleted before the handler's Delete came: SIGTERM ends the launcher.
    let pod = common::stop_cleanly(pod, Duration::from_secs(30)).await;
    let left = pod.leftover_processes();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

/// A tmpfs over a claim directory, to fill it up.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(dir).unwrap();
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
        Tmpfs(dir.to_path_buf())
    }

    fn filler(&self) -> std::path::PathBuf {
        self.0.join("filler")
    }

    /// Fills it up, so that the next allocation fails with ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.flush();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_resumes_a_vm_paused_by_an_io_error_but_not_one_paused_by_the_user() {
    // The claim's filesystem is full: the guest's first write fails and the error policy
    // (stop) pauses the VM.
    let mut pod = Pod::new("kv-cmd-ioerr")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.write=vda:hello");
    pod.wait_for_sync = true;
    let fs = Tmpfs::mount(&pod.pvcs_dir().join("data"), "1m");
    pod.prepare();
    fs.fill();
    pod.spawn();
    pod.wait_socket(Duration::from_secs(30));
    let mut h = kv::connect_cmd(&pod.socket()).await.unwrap();
    let mut l = pod.client().await;
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Scheduled").unwrap();
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    wait_state(&mut l, &pod, DomainState::Paused).await;
    let d = l.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(d.reason, "ioerror", "{d:?}");

    // Room again; the handler's next Sync resumes the VM and the write goes through.
    std::fs::remove_file(fs.filler()).unwrap();
    set_phase(&mut vmi, "Running");
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    wait_state(&mut l, &pod, DomainState::Running).await;
    pod.wait_console("LV-WROTE vda hello", Duration::from_secs(60));

    // Paused by the user: a Sync leaves it paused.
    ok(&mut h, "Pause", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Paused).await;
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state(&mut l).await, DomainState::Paused);

    ok(&mut h, "Kill", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Shutoff).await;
    if let Ok(r) = call(&mut h, "Delete", &vmi).await {
        assert!(r.success, "{r:?}");
    }
    let pod = common::exit_cleanly(pod, Duration::from_secs(30)).await;
    // Unmounted before the pod's directory goes.
    drop(fs);
    drop(pod);
}

/// CPU hot-plug as virt-handler drives it (issue #20): SyncVirtualMachineCPUs with a VMI of
/// more sockets plugs their vCPUs (KubeVirt's `UpdateVCPUs`) and the guest brings the new CPU
/// online; more sockets than `maxSockets` is refused in-band, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_virtual_machine_cpus_plugs_the_vcpus_of_more_sockets() {
    let mut pod = Pod::new("kv-cpuhp").with_disk("data", "virtio", 1);
    pod.wait_for_sync = true;
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let mut h = kv::connect_cmd(&pod.socket()).await.unwrap();
    let mut l = pod.client().await;
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Scheduled").unwrap();
    vmi["spec"]["domain"]["cpu"] =
        serde_json::json!({"sockets": 1, "cores": 1, "threads": 1, "maxSockets": 2});
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}\n{}", pod.dump());
    wait_state(&mut l, &pod, DomainState::Running).await;
    pod.wait_console("LV-READY", Duration::from_secs(90));
    pod.wait_online_cpus("0");
    set_phase(&mut vmi, "Running");

    let cpus = |vmi: &serde_json::Value| with_timeout(vmi_request(vmi), LONG_TIMEOUT);
    vmi["spec"]["domain"]["cpu"]["sockets"] = 3.into();
    let r = h
        .sync_virtual_machine_cp_us(cpus(&vmi))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.success && r.message.contains("spec.domain.cpu.sockets"),
        "{r:?}"
    );
    vmi["spec"]["domain"]["cpu"]["sockets"] = 2.into();
    let r = h
        .sync_virtual_machine_cp_us(cpus(&vmi))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}\n{}", pod.dump());
    pod.wait_online_cpus("0-1");
    // The handler's next Sync carries the same VMI: nothing more to do.
    let r = sync(&mut h, vmi_request(&vmi)).await;
    assert!(r.success, "{r:?}");

    ok(&mut h, "Kill", &vmi).await;
    wait_state(&mut l, &pod, DomainState::Shutoff).await;
    if let Ok(r) = call(&mut h, "Delete", &vmi).await {
        assert!(r.success, "{r:?}");
    }
    common::exit_cleanly(pod, Duration::from_secs(30)).await;
}
