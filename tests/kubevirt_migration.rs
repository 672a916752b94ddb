//! Live migration between two drop-in launchers, driven as virt-handler drives them: two
//! `compute` containers (`testkit::compute`, each its own mount namespace with KubeVirt's
//! share dir at `/var/run/kubevirt`) for the same VMI uid; the source started by a KubeVirt
//! Sync, the target readied by `SyncMigrationTarget`; unix-socket relays in this process stand
//! in for the handlers' TLS proxies, reached through `/proc/<pid>/root/…` of each container's
//! PID 1 as the handler reaches them: in the source's `migrationproxy/`, `<uid>-source.sock`
//! → the target's `/var/run/libvirt/virtqemud-sock` and `<uid>-49152-source.sock` → the
//! target's `migrationproxy/<uid>-49152-source.sock` (where the incoming QEMU listens). The
//! guest counts on its RWX disk (`lv.counter=vda`), both pods mounting the same file.
//! Progress and result are read only from the notified (and GetDomain) domain metadata.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Pod;
use serde_json::{json, Value};
use testkit::compute::{self, Compute};
use testkit::kubevirt::{
    self as kv, handler_vmi, vmi_request, with_timeout, CmdClient, NotifyServer, Received,
    LONG_TIMEOUT, SHORT_TIMEOUT,
};
use tokio::net::{UnixListener, UnixStream};
use virt_launcher::api::kubevirt::pb::cmd::v1 as cmd;

const MONITOR: &str = env!("CARGO_BIN_EXE_virt-launcher-monitor");
const MIGRATION_UID: &str = "5f0c7e2a-0000-4000-8000-000000000161";
const TARGET_POD: &str = "virt-launcher-vl-kvmig-target";

/// One compute container running `virt-launcher-monitor`.
struct Container {
    pod: Pod,
    c: Compute,
    monitor: i32,
    ns: String,
}

impl Drop for Container {
    /// Nothing of the container is left running; its files go when the test passed (kept
    /// for a look otherwise).
    fn drop(&mut self) {
        // Only while its PID 1 is in it: a namespace's number is reused once it is gone
        // (another test's container may have it now).
        let alive = testkit::procs::mount_ns(self.monitor).is_ok_and(|ns| ns == self.ns);
        if alive {
            testkit::procs::kill_namespace(&self.ns);
        }
        if !std::thread::panicking() {
            if let Some(mut child) = self.pod.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&self.pod.dir);
        }
    }
}

impl Container {
    /// Starts the container for `pod` (KubeVirt's command line, the share dir at
    /// `/var/run/kubevirt` inside) and waits for its command socket.
    async fn start(mut pod: Pod, env: &[(&str, &str)]) -> Container {
        let c = Compute {
            top: pod.dir.join("container"),
            name: pod.name.clone(),
            uid: pod.uid(),
            grace_seconds: 5,
            qemu_timeout: "271s".into(),
            extra_args: vec!["--kubevirt-share-dir".into(), "/var/run/kubevirt".into()],
        };
        c.prepare(&common::guest_dir()).unwrap();
        let mut command = c.command(Path::new(MONITOR)).unwrap();
        command.stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        pod.spawn_command(command);
        let unshare = pod.child.as_ref().unwrap().id() as i32;
        let monitor = compute::monitor_pid(unshare, Path::new(MONITOR), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", pod.log()));
        let ns = testkit::procs::mount_ns(monitor).unwrap();
        let me = Container {
            pod,
            c,
            monitor,
            ns,
        };
        let sock = me.socket();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "no launcher-sock\n{}",
                me.pod.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }

    /// A path inside the container, as the handler reaches it.
    fn inside(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.monitor))
    }
    fn share(&self) -> PathBuf {
        self.inside("/run/kubevirt")
    }
    fn socket(&self) -> PathBuf {
        self.share().join("sockets/launcher-sock")
    }
    fn proxy_dir(&self) -> PathBuf {
        self.share().join("migrationproxy")
    }
    /// The VM's serial console log (outside view).
    fn console(&self) -> String {
        testkit::guest::read_console(&self.c.vm_private().join("virt-serial0-log"))
    }
    /// The RWX claim's image (outside view).
    fn disk(&self) -> PathBuf {
        self.c.vmi_disks().join("data/disk.img")
    }
    async fn client(&self) -> CmdClient {
        kv::connect_cmd(&self.socket()).await.unwrap()
    }
    fn notify(&self) -> NotifyServer {
        NotifyServer::start(&self.share().join("domain-notify-pipe.sock")).unwrap()
    }
    fn dump(&self) -> String {
        self.pod.dump()
    }
    /// Whether the container's PID 1 has exited (`unshare` reaped it).
    fn exited(&self) -> bool {
        !Path::new(&format!("/proc/{}", self.monitor)).exists()
    }
}

/// A unix-socket relay: each connection to `listen` is joined to a new one to `to`.
struct Relay(tokio::task::JoinHandle<()>);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn relay(listen: &Path, to: PathBuf) -> Relay {
    relay_at(listen, to, None)
}

/// A relay whose way towards `to` carries at most `rate` bytes per second (a slow network).
fn relay_at(listen: &Path, to: PathBuf, rate: Option<u64>) -> Relay {
    let l = UnixListener::bind(listen).unwrap_or_else(|e| panic!("{}: {e}", listen.display()));
    Relay(tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let mut b = match UnixStream::connect(&to).await {
                    Ok(b) => b,
                    Err(e) => return eprintln!("relay to {}: {e}", to.display()),
                };
                let Some(rate) = rate else {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut ar, mut aw) = a.into_split();
                let (mut br, mut bw) = b.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut br, &mut aw).await;
                });
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match ar.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if bw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                }
                let _ = bw.shutdown().await;
                let _ = back.await;
            });
        }
    }))
}

/// The handler's relays in `src` to `dst`, as its migration proxies put them.
fn proxies(src: &Container, dst: &Container, uid: &str) -> Vec<Relay> {
    proxies_at(src, dst, uid, None)
}

/// [`proxies`] with the memory stream limited to `rate` bytes per second.
fn proxies_at(src: &Container, dst: &Container, uid: &str, rate: Option<u64>) -> Vec<Relay> {
    let dir = src.proxy_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for port in ["", "-49152", "-49153"] {
        let _ = std::fs::remove_file(dir.join(format!("{uid}{port}-source.sock")));
    }
    vec![
        relay(
            &dir.join(format!("{uid}-source.sock")),
            dst.inside("/run/libvirt/virtqemud-sock"),
        ),
        relay_at(
            &dir.join(format!("{uid}-49152-source.sock")),
            dst.proxy_dir().join(format!("{uid}-49152-source.sock")),
            rate,
        ),
        relay(
            &dir.join(format!("{uid}-49153-source.sock")),
            dst.proxy_dir().join(format!("{uid}-49153-source.sock")),
        ),
    ]
}

/// The VMI as the handler sends it: the RWX claim rewritten to a shared hostDisk.
fn vmi_of(pod: &Pod, phase: &str) -> Value {
    let mut vmi = handler_vmi(&pod.vmi_yaml(), phase).unwrap();
    vmi["spec"]["volumes"] = json!([{"name": "data", "hostDisk": {
        "path": "/var/run/kubevirt-private/vmi-disks/data/disk.img",
        "type": "DiskOrCreate", "capacity": "16Mi", "shared": pod.rwx}}]);
    vmi
}

/// `vmi` with the migration's state, as virt-controller sets it.
fn migrating(vmi: &Value) -> Value {
    migrating_as(vmi, MIGRATION_UID)
}

/// `vmi` with the state of migration `uid`.
fn migrating_as(vmi: &Value, uid: &str) -> Value {
    let mut v = vmi.clone();
    v["status"]["migrationState"] = json!({
        "migrationUid": uid,
        "targetPod": TARGET_POD,
        "sourcePod": "virt-launcher-vl-kvmig-source",
        "sourceState": {"migrationUid": uid},
    });
    v["status"]["migrationMethod"] = json!("LiveMigration");
    v
}

/// KubeVirt's options JSON (`migration-source.go:537-572`), with a bandwidth and, as for a
/// VMI without CPU limits, 8 parallel migration threads.
fn options(bandwidth: &str) -> Vec<u8> {
    json!({"Bandwidth": bandwidth, "ProgressTimeout": 150, "CompletionTimeoutPerGiB": 150,
        "MaxDowntimeMs": 300, "UnsafeMigration": false, "AllowAutoConverge": false,
        "AllowPostCopy": false, "ParallelMigrationThreads": 8, "AllowWorkloadDisruption": false,
        "StallDetectorOptions": null, "Compression": null, "DowntimeTuning": null})
    .to_string()
    .into_bytes()
}

async fn call(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<cmd::Response>, tonic::Status>>,
) -> cmd::Response {
    let r = tokio::time::timeout(Duration::from_secs(25), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into_inner();
    eprintln!("{what}: success={} {}", r.success, r.message);
    r
}

async fn migrate(h: &mut CmdClient, vmi: &Value, opts: Vec<u8>) -> cmd::Response {
    let req = cmd::MigrationRequest {
        vmi: Some(cmd::Vmi {
            vmi_json: serde_json::to_vec(vmi).unwrap(),
        }),
        options: opts,
    };
    call(
        "Migrate",
        h.migrate_virtual_machine(with_timeout(req, LONG_TIMEOUT)),
    )
    .await
}

fn migration_of(r: &Received) -> &Value {
    &r.json["Spec"]["Metadata"]["KubeVirt"]["Migration"]
}

fn describe(got: &[Received]) -> String {
    got.iter()
        .map(|r| {
            format!(
                "{} {}/{} {}",
                r.event_type,
                r.status(),
                r.reason(),
                migration_of(r)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn get_domain(h: &mut CmdClient) -> Value {
    let d = h
        .get_domain(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&d.domain).unwrap_or(Value::Null)
}

/// The source running the counting guest, started by the handler's Sync.
async fn source(name: &str) -> (Container, NotifyServer, CmdClient, Value) {
    source_with(name, true).await
}

/// The source, its claim ReadWriteMany (`rwx`) or local to the pod.
async fn source_with(name: &str, rwx: bool) -> (Container, NotifyServer, CmdClient, Value) {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.rwx = rwx;
    pod.wait_for_sync = true;
    let src = Container::start(pod, &[("POD_NAME", "virt-launcher-vl-kvmig-source")]).await;
    for d in &src.pod.disks {
        d.create(&src.c.vmi_disks()).unwrap();
    }
    let notify = src.notify();
    let mut h = src.client().await;
    let vmi = vmi_of(&src.pod, "Scheduled");
    let r = call(
        "Sync",
        h.sync_virtual_machine(with_timeout(vmi_request(&vmi), LONG_TIMEOUT)),
    )
    .await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !src.console().contains("LV-COUNT 3") {
        assert!(
            Instant::now() < deadline,
            "guest did not count\n{}",
            src.dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut vmi = vmi;
    kv::set_phase(&mut vmi, "Running");
    (src, notify, h, vmi)
}

/// A VM-less target for `src`'s VMI, sharing its claim, readied by SyncMigrationTarget.
async fn target(name: &str, src: &Container, vmi: &Value) -> (Container, NotifyServer, CmdClient) {
    let mut pod = Pod::new(name).with_disk("data", "virtio", 16);
    pod.rwx = src.pod.rwx;
    pod.wait_for_sync = true;
    let dst = Container::start(pod, &[("POD_NAME", TARGET_POD)]).await;
    let image = dst.disk();
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    if src.pod.rwx {
        // The same RWX claim: the same file.
        std::fs::hard_link(src.disk(), &image).unwrap();
    } else {
        // Its own claim, an empty image of the same size, as the handler creates it.
        testkit::vmi::sparse_file(&image, 16 << 20).unwrap();
    }
    let notify = dst.notify();
    let mut h = dst.client().await;
    let r = call(
        "SyncMigrationTarget",
        h.sync_migration_target(with_timeout(vmi_request(&migrating(vmi)), LONG_TIMEOUT)),
    )
    .await;
    assert!(r.success, "{}\n{}", r.message, dst.dump());
    assert!(dst.proxy_dir().is_dir(), "no migrationproxy/ on the target");
    (dst, notify, h)
}

/// Waits (up to 120 s) for a notified domain whose `Migration` has an `EndTimestamp`.
async fn wait_migration_end(
    n: &NotifyServer,
    what: &str,
    dump: &dyn Fn() -> String,
) -> Vec<Received> {
    wait_events(
        n,
        what,
        Duration::from_secs(120),
        |got| {
            got.iter()
                .any(|r| migration_of(r)["EndTimestamp"].is_string())
        },
        dump,
    )
    .await
}

async fn wait_events(
    n: &NotifyServer,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
    dump: &dyn Fn() -> String,
) -> Vec<Received> {
    match n.wait_for(timeout, done).await {
        Some(got) => got,
        None => panic!(
            "{what}: not within {timeout:?}\n{}\n{}",
            describe(&n.received()),
            dump()
        ),
    }
}

fn counter(image: &Path) -> u64 {
    testkit::guest::disk_counter(image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_through_the_handlers_proxies_and_counts_on_on_the_target() {
    let (src, src_notify, mut hs, vmi) = source("kvmig-src").await;
    let uid = src.pod.uid();
    let (dst, dst_notify, mut ht) = target("kvmig-dst", &src, &vmi).await;

    // Again: nothing more to do. Another VMI: refused, naming the uid.
    let r = call(
        "SyncMigrationTarget again",
        ht.sync_migration_target(with_timeout(vmi_request(&migrating(&vmi)), LONG_TIMEOUT)),
    )
    .await;
    assert!(r.success, "{}", r.message);
    let other = kv::with_uid(&migrating(&vmi), "00000000-0000-4000-8000-0000000000ff");
    let r = call(
        "SyncMigrationTarget of another VMI",
        ht.sync_migration_target(with_timeout(vmi_request(&other), LONG_TIMEOUT)),
    )
    .await;
    assert!(!r.success && r.message.contains("uid"), "{}", r.message);

    // Bad input on the source: no options, no migration state.
    let r = migrate(&mut hs, &migrating(&vmi), Vec::new()).await;
    assert!(
        !r.success && r.message.contains("MigrationRequest.options"),
        "{}",
        r.message
    );
    let r = migrate(&mut hs, &vmi, options("0")).await;
    assert!(
        !r.success && r.message.contains("status.migrationState"),
        "{}",
        r.message
    );

    let _relays = proxies(&src, &dst, &uid);
    let before = counter(&src.disk());
    let asked = Instant::now();
    let r = migrate(&mut hs, &migrating(&vmi), options("0")).await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "Migrate returns at once"
    );

    // The source: Start, then End without failure, then Shutoff/Migrated.
    let dump = || format!("{}\n{}", src.dump(), dst.dump());
    let got = wait_events(
        &src_notify,
        "the source's migration end",
        Duration::from_secs(120),
        |got| {
            got.iter()
                .any(|r| r.status() == "Shutoff" && r.reason() == "Migrated")
                && got
                    .iter()
                    .any(|r| migration_of(r)["EndTimestamp"].is_string())
        },
        &dump,
    )
    .await;
    let started = got
        .iter()
        .find(|r| !migration_of(r)["StartTimestamp"].is_null())
        .unwrap_or_else(|| panic!("no StartTimestamp\n{}", describe(&got)));
    assert_eq!(migration_of(started)["UID"], json!(MIGRATION_UID));
    assert_eq!(migration_of(started)["Mode"], json!("PreCopy"));
    let ended = got
        .iter()
        .find(|r| !migration_of(r)["EndTimestamp"].is_null())
        .unwrap_or_else(|| panic!("no EndTimestamp\n{}", describe(&got)));
    let m = migration_of(ended);
    assert_eq!(m["Failed"], json!(false), "{}", describe(&got));
    assert_eq!(m["UID"], json!(MIGRATION_UID));
    assert!(m["StartTimestamp"].is_string());

    // The target: the domain arrived and runs; its own metadata has the end.
    let got = wait_events(
        &dst_notify,
        "the target's end",
        Duration::from_secs(60),
        |got| {
            got.iter()
                .any(|r| r.status() == "Running" && !migration_of(r)["EndTimestamp"].is_null())
        },
        &dump,
    )
    .await;
    assert_eq!(got[0].event_type, "ADDED", "{}", describe(&got));
    assert_eq!(got[0].json["ObjectMeta"]["uid"], json!(uid));
    let d = get_domain(&mut ht).await;
    assert_eq!(d["Status"]["Status"], json!("Running"));
    let m = &d["Spec"]["Metadata"]["KubeVirt"]["Migration"];
    assert_eq!(m["UID"], json!(MIGRATION_UID), "{d}");
    assert!(m["EndTimestamp"].is_string(), "{d}");
    for _ in 0..2 {
        let r = call(
            "Finalize",
            ht.finalize_virtual_machine_migration(with_timeout(
                vmi_request(&migrating(&vmi)),
                LONG_TIMEOUT,
            )),
        )
        .await;
        assert!(r.success, "{}", r.message);
    }

    // The source launcher ends by itself; the guest counts on on the target, its disk data
    // intact (the counter goes on from where it was).
    let deadline = Instant::now() + Duration::from_secs(40);
    while !src.exited() {
        assert!(
            Instant::now() < deadline,
            "the source did not exit\n{}",
            src.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_end = counter(&dst.disk());
    assert!(at_end > before, "counter {at_end} after, {before} before");
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&dst.disk()) < at_end + 3 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped counting on the target ({})\n{}",
            counter(&dst.disk()),
            dst.dump()
        );
        assert!(!dst.exited(), "target exited\n{}", dst.dump());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = dst.console();
    eprintln!(
        "counter {before} before, {at_end} when the source ended, {} now; target console: {} lines",
        counter(&dst.disk()),
        after.lines().count()
    );

    // The target ends as any VM: Kill, Delete.
    let req = || with_timeout(vmi_request(&vmi), LONG_TIMEOUT);
    assert!(call("Kill", ht.kill_virtual_machine(req())).await.success);
    wait_events(
        &dst_notify,
        "the target stopped",
        Duration::from_secs(30),
        |got| got.iter().any(|r| r.status() == "Shutoff"),
        &dump,
    )
    .await;
    assert!(
        call("Delete", ht.delete_virtual_machine(req()))
            .await
            .success
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    while !dst.exited() {
        assert!(
            Instant::now() < deadline,
            "the target did not exit\n{}",
            dst.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `c` to exit.
async fn wait_exit(c: &Container, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !c.exited() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            c.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the guest's counter on `image` passes `above`.
async fn counts_past(image: &Path, above: u64, what: &str, dump: &dyn Fn() -> String) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = counter(image);
        if n > above {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: counter stuck at {n}\n{}",
            dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_broken_migration_leaves_the_vm_running_on_the_source() {
    let (src, src_notify, mut hs, vmi) = source("kvmig-csrc").await;
    let uid = src.pod.uid();

    // Cancel: a slow migration aborted while it copies memory.
    let (dst, _dst_notify, mut ht) = target("kvmig-cdst1", &src, &vmi).await;
    // A slow network (32 KiB/s per memory connection): the migration takes a while.
    let relays = proxies_at(&src, &dst, &uid, Some(32 << 10));
    let first = "5f0c7e2a-0000-4000-8000-0000000c0001";
    let r = migrate(&mut hs, &migrating_as(&vmi, first), options("0")).await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let dump = || format!("{}\n{}", src.dump(), dst.dump());
    wait_events(
        &src_notify,
        "the migration's start",
        Duration::from_secs(30),
        |got| got.iter().any(|r| migration_of(r)["UID"] == json!(first)),
        &dump,
    )
    .await;
    // Asked again while it runs: nothing to do, answered at once.
    let again = Instant::now();
    let r = migrate(&mut hs, &migrating_as(&vmi, first), options("0")).await;
    assert!(r.success, "{}", r.message);
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "{:?}",
        again.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let req = || with_timeout(vmi_request(&migrating_as(&vmi, first)), LONG_TIMEOUT);
    let r = call("Cancel", hs.cancel_virtual_machine_migration(req())).await;
    assert!(r.success, "{}", r.message);
    let d = get_domain(&mut hs).await;
    let abort = d["Spec"]["Metadata"]["KubeVirt"]["Migration"]["AbortStatus"].clone();
    assert!(
        abort == json!("Aborting") || abort == json!("Succeeded"),
        "right after Cancel: {d}"
    );
    let got = wait_events(
        &src_notify,
        "the aborted migration's end",
        Duration::from_secs(60),
        |got| {
            got.iter().any(|r| {
                migration_of(r)["UID"] == json!(first)
                    && migration_of(r)["EndTimestamp"].is_string()
            })
        },
        &dump,
    )
    .await;
    let m = migration_of(got.last().unwrap());
    assert_eq!(m["Failed"], json!(true), "{}", describe(&got));
    assert_eq!(m["AbortStatus"], json!("Succeeded"), "{}", describe(&got));
    assert_eq!(m["FailureReason"], json!("Live migration has been aborted"));
    // Cancel again: nothing to cancel, no error.
    let r = call("Cancel again", hs.cancel_virtual_machine_migration(req())).await;
    assert!(r.success, "{}", r.message);
    // The VM runs on here.
    let d = get_domain(&mut hs).await;
    assert_eq!(d["Status"]["Status"], json!("Running"), "{d}");
    let n = counter(&src.disk());
    counts_past(&src.disk(), n + 2, "the source after the cancel", &dump).await;
    // The same migration again: refused, it ran once.
    let r = migrate(&mut hs, &migrating_as(&vmi, first), options("0")).await;
    assert!(
        !r.success && r.message.contains("already ran"),
        "{}",
        r.message
    );
    // The handler cleans the target pod up: it goes (the source's pod is not addressed).
    let r = call(
        "SignalTargetPodCleanup (source)",
        hs.signal_target_pod_cleanup(req()),
    )
    .await;
    assert!(r.success, "{}", r.message);
    let _ = tokio::time::timeout(Duration::from_secs(5), ht.signal_target_pod_cleanup(req())).await;
    wait_exit(
        &dst,
        "the cleaned-up target's exit",
        Duration::from_secs(10),
    )
    .await;
    drop(relays);
    drop(dst);

    // A target killed during the migration: the VM stays here, the metadata says why.
    let (dst, _dst_notify, _ht) = target("kvmig-cdst2", &src, &vmi).await;
    let _relays = proxies_at(&src, &dst, &uid, Some(32 << 10));
    let second = "5f0c7e2a-0000-4000-8000-0000000c0002";
    let r = migrate(&mut hs, &migrating_as(&vmi, second), options("0")).await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let dump = || format!("{}\n{}", src.dump(), dst.dump());
    wait_events(
        &src_notify,
        "the second migration's start",
        Duration::from_secs(30),
        |got| got.iter().any(|r| migration_of(r)["UID"] == json!(second)),
        &dump,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    testkit::procs::kill_namespace(&dst.ns);
    let got = wait_events(
        &src_notify,
        "the broken migration's end",
        Duration::from_secs(120),
        |got| {
            got.iter().any(|r| {
                migration_of(r)["UID"] == json!(second)
                    && migration_of(r)["EndTimestamp"].is_string()
            })
        },
        &dump,
    )
    .await;
    let m = migration_of(got.last().unwrap());
    assert_eq!(m["Failed"], json!(true), "{}", describe(&got));
    assert!(
        !m["FailureReason"].as_str().unwrap_or_default().is_empty(),
        "{}",
        describe(&got)
    );
    assert_eq!(m["AbortStatus"], json!(""));
    eprintln!("killed target: {}", m["FailureReason"]);
    let d = get_domain(&mut hs).await;
    assert_eq!(d["Status"]["Status"], json!("Running"), "{d}");
    let n = counter(&src.disk());
    counts_past(&src.disk(), n + 2, "the source after the failure", &dump).await;
    drop(dst);

    // SignalTargetPodCleanup: a target whose VM never came goes when it is addressed (its
    // POD_NAME is the VMI's targetPod), within KubeVirt's 2 s, leaving no process behind.
    let (dst, _dst_notify, mut ht) = target("kvmig-cdst3", &src, &vmi).await;
    let mut elsewhere = migrating(&vmi);
    elsewhere["status"]["migrationState"]["targetPod"] = json!("virt-launcher-vl-other");
    let r = call(
        "SignalTargetPodCleanup (another pod)",
        ht.signal_target_pod_cleanup(with_timeout(vmi_request(&elsewhere), LONG_TIMEOUT)),
    )
    .await;
    assert!(r.success, "{}", r.message);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!dst.exited(), "not addressed, yet gone\n{}", dst.dump());
    // Its processes (monitor, launcher, libvirt's daemons), to be gone; not `unshare`, this
    // test's child, which stays until reaped.
    let unshare = dst.pod.child.as_ref().map(|c| c.id() as i32);
    let before: Vec<i32> = testkit::procs::pids()
        .into_iter()
        .filter(|p| Some(*p) != unshare)
        .filter(|p| testkit::procs::mount_ns(*p).is_ok_and(|n| n == dst.ns))
        .collect();
    assert!(before.len() >= 3, "{before:?}");
    let r = call(
        "SignalTargetPodCleanup",
        ht.signal_target_pod_cleanup(with_timeout(vmi_request(&migrating(&vmi)), LONG_TIMEOUT)),
    )
    .await;
    assert!(r.success, "{}", r.message);
    let asked = Instant::now();
    wait_exit(&dst, "the addressed target's exit", Duration::from_secs(10)).await;
    eprintln!("target pod cleaned up in {:?}", asked.elapsed());
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let left: Vec<i32> = before
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(
        left.is_empty(),
        "processes left of the target's container: {left:?}"
    );
    // The source was never disturbed.
    let d = get_domain(&mut hs).await;
    assert_eq!(d["Status"]["Status"], json!("Running"), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_migration_copies_the_local_disk_through_the_disks_proxy() {
    let (src, src_notify, mut hs, vmi) = source_with("kvmig-bsrc", false).await;
    let uid = src.pod.uid();
    let mut vmi = vmi;
    vmi["status"]["migrationMethod"] = json!("BlockMigration");
    let (dst, dst_notify, _ht) = target("kvmig-bdst", &src, &vmi).await;
    let _relays = proxies(&src, &dst, &uid);
    let dump = || format!("{}\n{}", src.dump(), dst.dump());

    // A local disk without block migration: refused at once, the VM untouched.
    let mut live = migrating(&vmi);
    live["status"]["migrationMethod"] = json!("LiveMigration");
    let r = migrate(&mut hs, &live, options("0")).await;
    assert!(!r.success && r.message.contains("data"), "{}", r.message);

    let mut block = migrating(&vmi);
    block["status"]["migrationMethod"] = json!("BlockMigration");
    let r = migrate(&mut hs, &block, options("0")).await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let got = wait_migration_end(&src_notify, "the block migration's end", &dump).await;
    let m = migration_of(
        got.iter()
            .rev()
            .find(|r| migration_of(r)["EndTimestamp"].is_string())
            .unwrap(),
    );
    assert_eq!(m["Failed"], json!(false), "{}", describe(&got));
    wait_events(
        &dst_notify,
        "the target running",
        Duration::from_secs(60),
        |got| got.iter().any(|r| r.status() == "Running"),
        &dump,
    )
    .await;
    wait_exit(&src, "the source's exit", Duration::from_secs(40)).await;
    // The copy holds the source's data: the counter goes on from it on the target's own disk.
    let copied = counter(&dst.disk());
    let at_source = counter(&src.disk());
    assert!(
        copied >= at_source && copied > 0,
        "target {copied}, source {at_source}"
    );
    counts_past(
        &dst.disk(),
        copied + 2,
        "the target after block migration",
        &dump,
    )
    .await;
    eprintln!("block migration: source disk at {at_source}, target's copy at {copied}");
}

/// KubeVirt's migration monitor: a migration that overruns `CompletionTimeoutPerGiB` (here
/// 8 s per GiB of the 128 MiB guest: 1 s, on a slow network and a 1 MiB/s `Bandwidth`) is
/// aborted by the source; the VM runs on there and the notified `Migration` says Failed, why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_past_its_completion_timeout_is_aborted_and_the_vm_stays_on_the_source() {
    let (src, src_notify, mut hs, vmi) = source("kvmig-tsrc").await;
    let uid = src.pod.uid();
    let (dst, _dst_notify, _ht) = target("kvmig-tdst", &src, &vmi).await;
    let _relays = proxies_at(&src, &dst, &uid, Some(32 << 10));
    let mig = "5f0c7e2a-0000-4000-8000-0000000d0001";
    let mut opts: Value = serde_json::from_slice(&options("1Mi")).unwrap();
    opts["CompletionTimeoutPerGiB"] = json!(8);
    let r = migrate(
        &mut hs,
        &migrating_as(&vmi, mig),
        opts.to_string().into_bytes(),
    )
    .await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let dump = || format!("{}\n{}", src.dump(), dst.dump());
    let got = wait_events(
        &src_notify,
        "the overrunning migration's end",
        Duration::from_secs(120),
        |got| {
            got.iter().any(|r| {
                migration_of(r)["UID"] == json!(mig) && migration_of(r)["EndTimestamp"].is_string()
            })
        },
        &dump,
    )
    .await;
    let m = migration_of(got.last().unwrap());
    assert_eq!(m["Failed"], json!(true), "{}", describe(&got));
    let reason = m["FailureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("did not complete within") && reason.contains("8s per GiB"),
        "{}",
        describe(&got)
    );
    // No abort was asked for: the monitor's own.
    assert_eq!(m["AbortStatus"], json!(""), "{}", describe(&got));
    let d = get_domain(&mut hs).await;
    assert_eq!(d["Status"]["Status"], json!("Running"), "{d}");
    let n = counter(&src.disk());
    counts_past(&src.disk(), n + 2, "the source after the abort", &dump).await;
}

/// A paused VM migrates paused (KubeVirt's launcher: `VIR_MIGRATE_PAUSED` when the domain is
/// paused): the target adopts it paused, its guest does not run until the user unpauses it
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_migrates_and_stays_paused_on_the_target() {
    let (src, src_notify, mut hs, vmi) = source("kvmig-psrc").await;
    let uid = src.pod.uid();
    let (dst, dst_notify, mut ht) = target("kvmig-pdst", &src, &vmi).await;
    let _relays = proxies(&src, &dst, &uid);
    let req = || with_timeout(vmi_request(&vmi), LONG_TIMEOUT);
    let r = call("Pause", hs.pause_virtual_machine(req())).await;
    assert!(r.success, "{}", r.message);
    let dump = || format!("{}\n{}", src.dump(), dst.dump());
    wait_events(
        &src_notify,
        "the source paused",
        Duration::from_secs(30),
        |got| got.iter().any(|r| r.status() == "Paused"),
        &dump,
    )
    .await;
    let paused_at = counter(&src.disk());

    let mig = "5f0c7e2a-0000-4000-8000-0000000e0001";
    let r = migrate(&mut hs, &migrating_as(&vmi, mig), options("0")).await;
    assert!(r.success, "{}\n{}", r.message, src.dump());
    let got = wait_migration_end(
        &src_notify,
        "the paused migration's end on the source",
        &dump,
    )
    .await;
    let ended = got
        .iter()
        .find(|r| migration_of(r)["EndTimestamp"].is_string())
        .unwrap();
    assert_eq!(
        migration_of(ended)["Failed"],
        json!(false),
        "{}",
        describe(&got)
    );
    let got = wait_events(
        &dst_notify,
        "the VM adopted paused on the target",
        Duration::from_secs(60),
        |got| {
            got.iter()
                .any(|r| r.status() == "Paused" && migration_of(r)["EndTimestamp"].is_string())
        },
        &dump,
    )
    .await;
    assert!(
        !got.iter().any(|r| r.status() == "Running"),
        "the target ran the paused VM\n{}",
        describe(&got)
    );
    // Paused there: the guest's counter stands still ...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(counter(&dst.disk()), paused_at, "{}", dump());
    let d = get_domain(&mut ht).await;
    assert_eq!(d["Status"]["Status"], json!("Paused"), "{d}");
    // ... until the user unpauses it on the target.
    let r = call("Unpause", ht.unpause_virtual_machine(req())).await;
    assert!(r.success, "{}", r.message);
    counts_past(
        &dst.disk(),
        paused_at + 2,
        "the target after unpause",
        &dump,
    )
    .await;
}
