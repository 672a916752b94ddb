//! A whole VM life driven as KubeVirt's virt-handler drives it, black-box, with every piece of
//! the contract at once: `virt-launcher-monitor` in KubeVirt's compute container
//! (`testkit::compute`, TCG), the cmd protocol from the same `.proto` files the handler uses
//! (`testkit::kubevirt` client), and a notify server that records the domain events.
//!
//! The sequence (the handler's, `vm.go` in KubeVirt): first contact (`CmdInfo/Info`, the notify
//! pipe created only now), `Sync` with phase `Scheduled`, events ADDED → MODIFIED Running, a
//! second `Sync` with phase `Running` that changes nothing; then the pod is deleted: SIGTERM to
//! the monitor, the launcher notifies `MarkedForGracefulShutdown`, and the handler runs its
//! shutdown loop on what it was notified — `Shutdown` (which stamps `DeletionTimestamp`, once),
//! re-sent every ≤5 s while the guest (which ignores ACPI here) keeps running, `Kill` once the
//! VMI's grace period has passed since the stamp — then computes the VMI's phase from the
//! notified domain (contract 4.4); the launcher, whose pod is being deleted, sends the final
//! event and everything in the container exits.

mod common;

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{monitor_binary, wait_for, Pod};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use testkit::compute::{self, Compute};
use testkit::kubevirt::{
    connect_cmd, handler_vmi, set_phase, vmi_request, with_timeout, CmdClient, NotifyServer,
    Received, LONG_TIMEOUT, SHORT_TIMEOUT,
};
use virt_launcher::api::kubevirt::pb::cmd::v1 as cmd;

/// The VMI's `terminationGracePeriodSeconds`: the handler kills this long after its first
/// Shutdown.
const VMI_GRACE: i64 = 6;

/// A VMI-carrying call; the in-band answer.
async fn call(h: &mut CmdClient, what: &str, vmi: &Value) -> Result<cmd::Response, tonic::Status> {
    let req = with_timeout(vmi_request(vmi), LONG_TIMEOUT);
    let r = match what {
        "Sync" => h.sync_virtual_machine(req).await,
        "Shutdown" => h.shutdown_virtual_machine(req).await,
        "Kill" => h.kill_virtual_machine(req).await,
        "Delete" => h.delete_virtual_machine(req).await,
        other => panic!("no call {other}"),
    };
    r.map(|r| r.into_inner())
}

async fn ok(h: &mut CmdClient, what: &str, vmi: &Value, pod: &Pod) {
    let r = call(h, what, vmi).await;
    match r {
        Ok(r) if r.success => {}
        other => panic!("{what}: {other:?}\n{}", pod.log()),
    }
}

async fn get_domain(h: &mut CmdClient) -> String {
    h.get_domain(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .expect("GetDomain")
        .into_inner()
        .domain
}

/// The last domain event the handler was notified of.
fn last(events: &[Received]) -> &Value {
    &events.last().expect("an event").json
}

fn grace(domain: &Value) -> &Value {
    &domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]
}

/// `DeletionTimestamp` of a notified domain, as virt-handler reads it (RFC 3339, seconds).
fn deletion_timestamp(domain: &Value) -> Option<i64> {
    let t = grace(domain)["DeletionTimestamp"].as_str()?;
    Some(
        humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
            .unwrap_or_else(|e| panic!("DeletionTimestamp {t:?}: {e}"))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The VMI phase virt-handler computes from a stopped domain (contract 4.4).
fn vmi_phase(domain: &Value, vmi_has_grace: bool) -> &'static str {
    let status = domain["Status"]["Status"].as_str().unwrap_or("");
    let reason = domain["Status"]["Reason"].as_str().unwrap_or("");
    let acpi = !domain["Spec"]["Features"]["ACPI"].is_null();
    match (status, reason) {
        ("Shutoff" | "Crashed", "Crashed" | "Panicked") => "Failed",
        ("Shutoff", "Destroyed") if vmi_has_grace && acpi => "Failed",
        ("Shutoff", "Destroyed" | "Shutdown" | "Saved" | "FromSnapshot") => "Succeeded",
        _ => "Running",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virt_handler_drives_a_vm_from_scheduled_to_deleted() {
    // The guest ignores the ACPI power button: only the handler's Kill can end it.
    let mut pod = Pod::new("kvhandler")
        .kernel_args("lv.acpi=ignore")
        .with_disk("data", "virtio", 8);
    pod.wait_for_sync = true;
    let c = Compute {
        top: pod.dir.join("container"),
        name: pod.name.clone(),
        uid: pod.uid(),
        // The launcher's own destroy comes long after the handler's Kill.
        grace_seconds: 120,
        qemu_timeout: "271s".into(),
        extra_args: vec![],
    };
    c.prepare(&common::guest_dir()).unwrap();
    for d in &pod.disks {
        d.create(&c.vmi_disks()).unwrap();
    }
    let binary = monitor_binary();
    let mut command = c.command(&binary).unwrap();
    command.stdin(Stdio::null());
    pod.spawn_command(command);
    let unshare = pod.child.as_ref().unwrap().id() as i32;
    let monitor = compute::monitor_pid(unshare, &binary, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pod.log()));
    let ns = testkit::procs::mount_ns(monitor).unwrap();
    let _container = compute::Guard::of(monitor).unwrap();

    // Readiness is launcher-sock; the handler's first contact: Info, then the notify pipe.
    let sock = c.socket();
    wait_for("launcher-sock", Duration::from_secs(60), || {
        fs::symlink_metadata(&sock)
            .is_ok_and(|m| m.file_type().is_socket())
            .then_some(())
    });
    let mut h = connect_cmd(&sock).await.unwrap();
    let pipe = c.share().join("domain-notify-pipe.sock");
    let notify = NotifyServer::start(&pipe).unwrap();
    let pinged = h
        .ping(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(pinged.success, "{pinged:?}");
    assert_eq!(get_domain(&mut h).await, "", "a domain before any Sync");
    // While it waits for the handler, the launcher has QEMU's capabilities loaded (here a
    // probe: KubeVirt's pod starts with an empty cache), so the Sync does not wait for them.
    wait_for(
        "capabilities loaded before the Sync",
        Duration::from_secs(60),
        || {
            pod.log()
                .contains("QEMU capabilities loaded ahead of the VM")
                .then_some(())
        },
    );

    // Start: Sync with phase Scheduled returns without waiting for the guest.
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Scheduled").unwrap();
    vmi["spec"]["terminationGracePeriodSeconds"] = json!(VMI_GRACE);
    let synced = Instant::now();
    ok(&mut h, "Sync", &vmi, &pod).await;
    let sync_returned = synced.elapsed();
    let events = notify
        .wait_for(Duration::from_secs(60), |e| {
            e.iter().any(|r| r.status() == "Running")
        })
        .await
        .unwrap_or_else(|| panic!("no Running event: {:?}\n{}", notify.received(), pod.log()));
    let to_running = synced.elapsed();
    assert_eq!(events[0].event_type, "ADDED", "{events:?}");
    assert!(
        events.iter().skip(1).all(|e| e.event_type == "MODIFIED"),
        "{events:?}"
    );
    let running = events.iter().find(|e| e.status() == "Running").unwrap();
    let d = &running.json;
    assert_eq!(d["ObjectMeta"]["name"], pod.name.as_str());
    assert_eq!(d["ObjectMeta"]["namespace"], "default");
    assert_eq!(d["Spec"]["Metadata"]["KubeVirt"]["UID"], pod.uid().as_str());
    assert_eq!(grace(d)["DeletionGracePeriodSeconds"], VMI_GRACE);
    assert!(grace(d)["DeletionTimestamp"].is_null(), "{d}");
    assert!(!d["Spec"]["Features"]["ACPI"].is_null(), "{d}");
    let uuid = d["Spec"]["UUID"].as_str().unwrap().to_string();
    let disk = &d["Spec"]["Devices"]["Disks"][0];
    assert_eq!(disk["Alias"]["Name"], "data");
    assert_eq!(disk["Target"]["Device"], "vda");
    assert!(
        events.iter().all(|e| e.status() != "Unknown"),
        "Unknown is the handler's own state: {events:?}"
    );

    // The handler's next reconcile: phase Running, a Sync that changes nothing.
    let before = notify.received().len();
    set_phase(&mut vmi, "Running");
    ok(&mut h, "Sync", &vmi, &pod).await;
    let now: Value = serde_json::from_str(&get_domain(&mut h).await).unwrap();
    assert_eq!(
        now["Spec"]["UUID"],
        uuid.as_str(),
        "the domain was replaced"
    );
    assert_eq!(now["Status"]["Status"], "Running");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        notify.received()[before..]
            .iter()
            .all(|e| e.event_type != "ADDED"),
        "a second Sync defined the domain again: {:?}",
        &notify.received()[before..]
    );
    let console = c.vm_private().join("virt-serial0-log");
    wait_for("the guest booted", Duration::from_secs(120), || {
        testkit::guest::read_console(&console)
            .contains("LV-READY")
            .then_some(())
    });

    // Figures, not checks (timing belongs to the benchmarks): what this start took, and the
    // memory of the pod's own processes with the guest up.
    let launcher = testkit::procs::pids()
        .into_iter()
        .find(|p| {
            compute::parent(*p) == Some(monitor)
                && testkit::procs::cmdline(*p).is_some_and(|c| c.contains("virt-launcher "))
        })
        .unwrap_or_else(|| panic!("no virt-launcher under the monitor\n{}", pod.log()));
    let rss = |pid| testkit::procs::status_mib(pid, "VmRSS").unwrap();
    eprintln!(
        "Sync returned after {sync_returned:?}, Running notified {to_running:?} after the Sync; \
         RSS with the guest up: monitor {:.1} MiB, launcher {:.1} MiB ({})",
        rss(monitor),
        rss(launcher),
        binary.display()
    );

    // The pod is deleted: SIGTERM to the monitor. The launcher only marks the domain; the
    // handler, notified, begins the shutdown.
    kill(Pid::from_raw(monitor), Signal::SIGTERM).unwrap();
    notify
        .wait_for(Duration::from_secs(10), |e| {
            grace(last(e))["MarkedForGracefulShutdown"] == true
        })
        .await
        .unwrap_or_else(|| panic!("not marked: {:?}\n{}", notify.received(), pod.log()));
    assert_eq!(last(&notify.received())["Status"]["Status"], "Running");

    // The handler's shutdown loop, on what it was notified (vm.go helperVmShutdown).
    let (mut shutdowns, mut killed_after) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let d = last(&notify.received()).clone();
        match deletion_timestamp(&d) {
            None => {
                ok(&mut h, "Shutdown", &vmi, &pod).await;
                shutdowns += 1;
            }
            Some(stamp) if now_s() - stamp < VMI_GRACE => {
                if d["Status"]["Status"] != "ShuttingDown" {
                    ok(&mut h, "Shutdown", &vmi, &pod).await;
                    shutdowns += 1;
                }
            }
            Some(stamp) => {
                ok(&mut h, "Kill", &vmi, &pod).await;
                killed_after = Some(now_s() - stamp);
                break;
            }
        }
        // Requeued after min(5, grace) s; sooner here so the stamp is seen at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let killed_after = killed_after.unwrap_or_else(|| panic!("never killed\n{}", pod.log()));
    assert!(shutdowns >= 2, "Shutdown sent {shutdowns} times");
    assert!(
        killed_after >= VMI_GRACE,
        "killed {killed_after} s after the stamp"
    );
    // The stamp is set once: every later Shutdown left it alone.
    let stamps: Vec<i64> = notify
        .received()
        .iter()
        .filter_map(|e| deletion_timestamp(&e.json))
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] == w[1]),
        "DeletionTimestamp changed: {stamps:?}"
    );
    assert!(
        testkit::guest::read_console(&console).contains("LV-ACPI-IGNORED"),
        "the handler's Shutdown pressed no power button"
    );

    // Destroyed, notified; with ACPI and a grace period the VMI fails (it did not shut down).
    let events = notify
        .wait_for(Duration::from_secs(30), |e| {
            e.iter().skip(1).any(|r| r.status() == "Shutoff")
        })
        .await
        .unwrap_or_else(|| panic!("no Shutoff: {:?}\n{}", notify.received(), pod.log()));
    // (The first event, ADDED, is the defined domain: Shutoff/Unknown.)
    let stopped = &events
        .iter()
        .skip(1)
        .find(|r| r.status() == "Shutoff")
        .unwrap()
        .json;
    assert_eq!(stopped["Status"]["Reason"], "Destroyed", "{stopped}");
    assert_eq!(vmi_phase(stopped, true), "Failed");

    // The pod is going away (SIGTERM came first): the launcher does not wait for a Delete
    // once its domain is down; the final event says the domain is gone, and the handler's
    // Delete finds nothing to do (success) or the launcher already gone ("disconnected",
    // which the handler ignores for Delete, vm.go).
    let events = notify
        .wait_for(Duration::from_secs(30), |e| e.iter().any(|r| r.is_gone()))
        .await
        .unwrap_or_else(|| panic!("no final event: {:?}\n{}", notify.received(), pod.log()));
    let gone = events.iter().find(|r| r.is_gone()).unwrap();
    assert_eq!(gone.event_type, "MODIFIED");
    assert_eq!(gone.status(), "NoState");
    assert_eq!(gone.reason(), "NonExistent");
    assert!(
        events.last().unwrap().is_gone(),
        "events after the final one: {events:?}"
    );
    match call(&mut h, "Delete", &vmi).await {
        Ok(r) => assert!(r.success, "{r:?}"),
        Err(e) => assert!(
            matches!(
                e.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            "Delete: {e:?}"
        ),
    }
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", pod.log());
    let left: Vec<i32> = testkit::procs::pids()
        .into_iter()
        .filter(|p| testkit::procs::mount_ns(*p).is_ok_and(|n| n == ns))
        .collect();
    assert!(left.is_empty(), "left in the container: {left:?}");
    drop(notify);
    fs::remove_dir_all(&c.top).unwrap();
}
