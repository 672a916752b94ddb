//! The notify client against a notify server playing KubeVirt's virt-handler (built from the
//! same protocol definitions), on a real TCG guest: the pipe socket appears only when the
//! "handler" first contacts the pod, the events and the domain JSON the handler reads
//! (contract notes, section 4.3), a handler that refuses or hangs, a handler restart, and the
//! final event once the domain is gone.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Pod;
use serde_json::{json, Value};
use testkit::kubevirt::{Mode, NotifyServer, Received};
use virt_launcher::api::pb;

fn vmi_json(pod: &Pod) -> Vec<u8> {
    let v: Value = serde_norway::from_str(&pod.vmi_yaml()).unwrap();
    serde_json::to_vec(&v).unwrap()
}

/// A launcher call that must come back while the notify server misbehaves.
async fn soon<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .unwrap_or_else(|_| panic!("{what} was held up by the notify server"))
}

fn describe(got: &[Received]) -> String {
    got.iter()
        .map(|r| {
            format!(
                "{} {}/{} {:?}",
                r.event_type,
                r.status(),
                r.reason(),
                r.mode
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits for an event after the first `skip` that satisfies `pred`.
async fn wait_event(
    server: &NotifyServer,
    skip: usize,
    what: &str,
    pred: impl Fn(&Received) -> bool,
) -> Received {
    match server
        .wait_for(Duration::from_secs(40), |got| {
            got.iter().skip(skip).any(&pred)
        })
        .await
    {
        Some(got) => got.into_iter().skip(skip).find(|r| pred(r)).unwrap(),
        None => panic!("no event: {what}; got:\n{}", describe(&server.received())),
    }
}

/// The domain JSON field by field, as the handler reads it (contract section 4.3).
fn check_running_domain(pod: &Pod, d: &Value) {
    let uid = pod.uid();
    let at = |p: &str| d.pointer(p).cloned().unwrap_or(Value::Null);
    assert_eq!(at("/ObjectMeta/name"), json!(pod.name), "{d}");
    assert_eq!(at("/ObjectMeta/namespace"), json!("default"));
    assert_eq!(at("/ObjectMeta/uid"), json!(uid));
    assert!(at("/ObjectMeta/deletionTimestamp").is_null());
    assert_eq!(at("/Spec/Type"), json!("qemu"));
    assert_eq!(at("/Spec/Name"), json!(format!("default_{}", pod.name)));
    assert_eq!(
        at("/Spec/UUID"),
        json!(uid),
        "the VMI uid is a UUID: it is the domain's"
    );
    assert_eq!(
        at("/Spec/CurrentMemory"),
        json!({"Value": 131072, "Unit": "KiB"})
    );
    assert_eq!(at("/Spec/OS/Type/OS"), json!("hvm"));
    assert_eq!(at("/Spec/OS/Type/Arch"), json!("x86_64"));
    assert!(
        at("/Spec/OS/Type/Machine")
            .as_str()
            .is_some_and(|m| m.contains("q35")),
        "{d}"
    );
    assert_eq!(at("/Spec/Features/ACPI"), json!({}));
    let disks = at("/Spec/Devices/Disks");
    let data = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["Alias"]["Name"] == "data")
        .unwrap_or_else(|| panic!("no disk data: {disks}"));
    assert_eq!(data["Alias"], json!({"Name": "data", "UserDefined": true}));
    assert_eq!(data["Target"], json!({"Bus": "virtio", "Device": "vda"}));
    assert_eq!(
        data["Source"]["File"],
        json!(pod.disk_image("data").display().to_string())
    );
    assert_eq!(
        (&data["Device"], &data["Type"]),
        (&json!("disk"), &json!("file"))
    );
    for x in disks.as_array().unwrap() {
        assert!(x["Alias"]["Name"].is_string(), "disk without alias: {x}");
        assert!(
            x["Target"]["Device"].is_string(),
            "disk without target: {x}"
        );
    }
    for i in at("/Spec/Devices/Interfaces").as_array().unwrap() {
        assert!(
            i["Alias"]["Name"].is_string() && i["MAC"]["MAC"].is_string(),
            "{i}"
        );
    }
    let channels = at("/Spec/Devices/Channels");
    assert_eq!(
        channels[0]["Target"]["Name"],
        json!("org.qemu.guest_agent.0"),
        "{channels}"
    );
    assert_eq!(at("/Spec/Metadata/KubeVirt/UID"), json!(uid));
    assert_eq!(
        at("/Spec/Metadata/KubeVirt/GracePeriod/DeletionGracePeriodSeconds"),
        json!(30)
    );
    assert_eq!(at("/Status/Status"), json!("Running"));
    assert_eq!(at("/Status/Reason"), json!("Unknown"));
    assert!(at("/Status/OSInfo").is_object());
    // Not frozen: nothing known yet, or `thawed` once the guest agent's state was polled.
    let freeze = at("/Status/FSFreezeStatus/Status");
    assert!(freeze == json!("") || freeze == json!("thawed"), "{d}");
}

fn is_rfc3339(s: &str) -> bool {
    humantime::parse_rfc3339(s).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_is_notified_of_the_domain_through_refusals_hangs_and_a_restart() {
    let mut pod = Pod::new("kvnotify").with_disk("data", "virtio", 16);
    pod.wait_for_sync = true;
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let mut c = pod.client().await;
    let sock = share.join("domain-notify-pipe.sock");

    // No handler yet: the launcher starts the VM all the same.
    assert!(!sock.exists());
    c.sync(pb::SyncRequest {
        vmi: vmi_json(&pod),
    })
    .await
    .unwrap();
    let mut pod = tokio::task::spawn_blocking(move || {
        pod.wait_console("LV-READY", Duration::from_secs(120));
        pod
    })
    .await
    .unwrap();

    // The handler contacts the pod: ADDED first, then MODIFIED up to Running.
    let server = NotifyServer::start(&sock).unwrap();
    let running = wait_event(&server, 0, "Running", |r| r.status() == "Running").await;
    let got = server.received();
    assert_eq!(got[0].event_type, "ADDED", "{}", describe(&got));
    assert!(
        got[1..].iter().all(|r| r.event_type == "MODIFIED"),
        "{}",
        describe(&got)
    );
    assert!(
        got.iter().all(|r| r.status() != "Unknown" && !r.is_gone()),
        "{}",
        describe(&got)
    );
    check_running_domain(&pod, &running.json);
    // The guest agent connects: the channel says so.
    wait_event(&server, 0, "agent connected", |r| {
        r.json["Spec"]["Devices"]["Channels"][0]["Target"]["State"] == "connected"
    })
    .await;

    // A handler that answers success:false: logged, the launcher goes on.
    server.set_mode(Mode::Refuse);
    let n = server.received().len();
    soon("Pause", c.pause(pb::Empty {})).await.unwrap();
    wait_event(&server, n, "Paused (refused)", |r| {
        r.status() == "Paused" && r.reason() == "User" && r.mode == Mode::Refuse
    })
    .await;
    server.set_mode(Mode::Accept);
    let n = server.received().len();
    soon("Unpause", c.unpause(pb::Empty {})).await.unwrap();
    wait_event(&server, n, "Running again", |r| r.status() == "Running").await;

    // A handler that never answers: the launcher's calls still come back, and once it
    // answers again the latest domain arrives.
    server.set_mode(Mode::Hang);
    let n = server.received().len();
    soon("Pause", c.pause(pb::Empty {})).await.unwrap();
    wait_event(&server, n, "Paused (hung)", |r| r.status() == "Paused").await;
    soon("Unpause", c.unpause(pb::Empty {})).await.unwrap();
    soon("GetDomain", c.get_domain(pb::Empty {})).await.unwrap();
    server.set_mode(Mode::Accept);
    let n = server.received().len();
    wait_event(&server, n, "Running after the hang", |r| {
        r.status() == "Running" && r.mode == Mode::Accept
    })
    .await;

    // The handler restarts: its pipe goes away and comes back; the change made meanwhile
    // arrives at the new one.
    server.stop().await;
    assert!(!sock.exists());
    soon("Pause", c.pause(pb::Empty {})).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = NotifyServer::start(&sock).unwrap();
    wait_event(&server, 0, "Paused after the restart", |r| {
        r.status() == "Paused"
    })
    .await;
    let n = server.received().len();
    soon("Unpause", c.unpause(pb::Empty {})).await.unwrap();
    wait_event(&server, n, "Running after the restart", |r| {
        r.status() == "Running"
    })
    .await;

    // Shutdown: the guest powers off, Shutoff/Shutdown is notified, then the domain is gone
    // (deletionTimestamp, NoState/NonExistent), and the launcher exits.
    let n = server.received().len();
    soon(
        "Shutdown",
        c.shutdown(pb::ShutdownRequest { grace_seconds: 30 }),
    )
    .await
    .unwrap();
    let gone = wait_event(&server, n, "the final event", Received::is_gone).await;
    let got = server.received();
    let at = got.iter().position(|r| r.is_gone()).unwrap();
    assert_eq!(
        at,
        got.len() - 1,
        "the final event is the last:\n{}",
        describe(&got)
    );
    let before = &got[at - 1];
    assert_eq!(
        (before.status(), before.reason()),
        ("Shutoff", "Shutdown"),
        "{}",
        describe(&got)
    );
    assert_eq!(gone.event_type, "MODIFIED");
    assert_eq!((gone.status(), gone.reason()), ("NoState", "NonExistent"));
    assert!(is_rfc3339(
        gone.json["ObjectMeta"]["deletionTimestamp"]
            .as_str()
            .unwrap()
    ));
    assert_eq!(gone.json["ObjectMeta"]["uid"], json!(pod.uid()));
    pod = common::exit_cleanly(pod, Duration::from_secs(40)).await;
    assert!(
        pod.log().contains("connected to the domain notify socket"),
        "{}",
        pod.dump()
    );
    server.stop().await;
    assert!(!Path::new(&sock).exists());
}

/// A tmpfs mounted for the length of a test (unmounted when dropped).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
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

    /// Fills it up, so that the next allocation fails with ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
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
async fn an_io_error_is_notified_as_a_kubernetes_event_and_an_ioerror_pause() {
    // The claim's filesystem is full: the guest's first write fails with ENOSPC and the
    // error policy (stop) pauses the VM.
    let mut pod = Pod::new("kvioerr")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.write=vda:hello");
    let claim = pod.pvcs_dir().join("data");
    let fs = Tmpfs::mount(&claim, "1m");
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    // The handler's pipe is there from the start this time.
    let server = NotifyServer::start(&share.join("domain-notify-pipe.sock")).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    pod.prepare();
    fs.fill();
    pod.spawn();

    let k8s = wait_event(&server, 0, "the IOerror event", |r| r.event_type == "K8S").await;
    assert_eq!(k8s.json["reason"], json!("IOerror"), "{}", k8s.json);
    assert_eq!(k8s.json["type"], json!("Warning"));
    assert_eq!(
        k8s.json["involvedObject"],
        json!({"kind": "VirtualMachineInstance", "apiVersion": "kubevirt.io/v1",
               "namespace": "default", "name": pod.name, "uid": pod.uid()})
    );
    assert!(
        k8s.json["message"].as_str().unwrap().contains("data"),
        "{}",
        k8s.json
    );
    wait_event(&server, 0, "Paused/IOError", |r| {
        r.status() == "Paused" && r.reason() == "IOError"
    })
    .await;

    let mut c = pod.client().await;
    c.kill(pb::Empty {}).await.unwrap();
    wait_event(&server, 0, "the final event", Received::is_gone).await;
    let (_, pod) = common::exit_status(pod, Duration::from_secs(40)).await;
    // Unmounted before the pod's directory is removed.
    drop(fs);
    drop(pod);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_handler_the_launcher_runs_and_exits_without_waiting_for_one() {
    let mut pod = Pod::new("kvnohandler").with_disk("data", "virtio", 16);
    pod.wait_for_sync = true;
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let mut c = pod.client().await;
    c.sync(pb::SyncRequest {
        vmi: vmi_json(&pod),
    })
    .await
    .unwrap();
    let pod = tokio::task::spawn_blocking(move || {
        pod.wait_console("LV-READY", Duration::from_secs(120));
        pod
    })
    .await
    .unwrap();
    c.kill(pb::Empty {}).await.unwrap();
    // Not the 15 s a launcher gives a handler it knows of to take the final event.
    let pod = common::exit_cleanly(pod, Duration::from_secs(10)).await;
    assert!(
        pod.log().contains("no handler ever contacted the pod"),
        "{}",
        pod.dump()
    );
    assert!(!share.join("domain-notify-pipe.sock").exists());
}

/// Gives `pod` a KubeVirt share dir with a handler's notify pipe in it.
fn with_handler(pod: &mut Pod) -> NotifyServer {
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    NotifyServer::start(&share.join("domain-notify-pipe.sock")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_is_added_on_the_target_and_gone_from_the_source() {
    let mut src = Pod::new("kvmigsrc")
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    src.rwx = true;
    let src_handler = with_handler(&mut src);
    src.start();
    let src = tokio::task::spawn_blocking(move || {
        src.wait_console("LV-COUNT 3", Duration::from_secs(120));
        src
    })
    .await
    .unwrap();
    wait_event(&src_handler, 0, "Running on the source", |r| {
        r.status() == "Running"
    })
    .await;

    let mut dst = Pod::new("kvmigdst").with_disk("data", "virtio", 16);
    dst.shared_pvcs = Some(src.pvcs_dir());
    dst.wait_for_sync = true;
    let dst_handler = with_handler(&mut dst);
    dst.start();
    dst.wait_socket(Duration::from_secs(30));
    let mut t = dst.client().await;
    t.prepare_migration_target(pb::PrepareMigrationTargetRequest {
        vmi: src.vmi_yaml().into_bytes(),
        disk_sizes: Default::default(),
    })
    .await
    .unwrap();
    // A prepared target has no domain yet: nothing to tell.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        dst_handler.received().is_empty(),
        "{}",
        describe(&dst_handler.received())
    );

    let mut c = src.client().await;
    let r = c
        .migrate(pb::MigrateRequest {
            target_socket: dst.socket().display().to_string(),
            options: Some(pb::MigrationOptions {
                progress_timeout: 60,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{}\n{}\n{}", r.message, src.dump(), dst.dump());

    // The target: ADDED for the incoming domain, then Running; never gone.
    wait_event(&dst_handler, 0, "Running on the target", |r| {
        r.status() == "Running"
    })
    .await;
    let got = dst_handler.received();
    assert_eq!(got[0].event_type, "ADDED", "{}", describe(&got));
    assert_eq!(got[0].json["ObjectMeta"]["uid"], json!(src.uid()));
    assert!(got.iter().all(|r| !r.is_gone()), "{}", describe(&got));

    // The source: Shutoff/Migrated, then gone, and it exits.
    let gone = wait_event(
        &src_handler,
        0,
        "the source's final event",
        Received::is_gone,
    )
    .await;
    assert_eq!((gone.status(), gone.reason()), ("NoState", "NonExistent"));
    let got = src_handler.received();
    assert_eq!(got[0].event_type, "ADDED", "{}", describe(&got));
    let before = &got[got.len() - 2];
    assert_eq!(
        (before.status(), before.reason()),
        ("Shutoff", "Migrated"),
        "{}",
        describe(&got)
    );
    assert!(got.last().unwrap().is_gone(), "{}", describe(&got));
    common::exit_cleanly(src, Duration::from_secs(40)).await;

    // The VM goes on on the target; stopping it there ends with its own final event.
    let n = dst_handler.received().len();
    t.kill(pb::Empty {}).await.unwrap();
    wait_event(
        &dst_handler,
        n,
        "the target's final event",
        Received::is_gone,
    )
    .await;
    common::exit_cleanly(dst, Duration::from_secs(40)).await;
    src_handler.stop().await;
    dst_handler.stop().await;
}
