//! Live migration between two launcher pods on one machine: each has its own mount and UTS
//! namespace and libvirt daemons, and both see the RWX claim at the same path (block
//! migration: each has its own ReadWriteOnce claim). The guest writes an increasing counter to
//! the disk and its console (`lv.counter=vda`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Pod;
use testkit::guest::{counts, first_line};
use tonic::Code;
use virt_launcher::api::pb::{self, DomainState, EventKind, MigrationMode, MigrationPhase};

/// A source pod running the counting guest on an RWX claim.
fn source(name: &str, rwx: bool) -> Pod {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 16)
        .kernel_args("lv.counter=vda");
    pod.rwx = rwx;
    pod.start();
    pod.wait_console("LV-COUNT 5", Duration::from_secs(90));
    pod
}

/// A VM-less target pod sharing `src`'s claims, serving and waiting.
fn target(name: &str, src: &Pod) -> Pod {
    let mut pod = Pod::new(name).with_disk("data", "virtio", 16);
    pod.shared_pvcs = Some(src.pvcs_dir());
    pod.wait_for_sync = true;
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    pod
}

async fn prepare(target: &Pod, vmi_yaml: &str) -> pb::MigrationTarget {
    prepare_with(target, vmi_yaml, HashMap::new())
        .await
        .expect("prepare target")
}

async fn prepare_with(
    target: &Pod,
    vmi_yaml: &str,
    disk_sizes: HashMap<String, u64>,
) -> Result<pb::MigrationTarget, tonic::Status> {
    let mut c = target.client().await;
    c.prepare_migration_target(pb::PrepareMigrationTargetRequest {
        vmi: vmi_yaml.as_bytes().to_vec(),
        disk_sizes,
    })
    .await
    .map(|r| r.into_inner())
}

fn options() -> pb::MigrationOptions {
    pb::MigrationOptions {
        progress_timeout: 60,
        ..Default::default()
    }
}

/// Migrates `from` to `to` and checks the counter continues on `to` without a gap.
async fn migrate_and_check(from: Pod, to: &mut Pod, vmi_yaml: &str) -> pb::MigrationResult {
    prepare(to, vmi_yaml).await;
    migrate_prepared_and_check(from, to, options()).await.0
}

/// Migrates `from` to the prepared `to` with `opts` and checks the counter continues on `to`
/// without a gap. Returns the result and the (exited) source pod.
async fn migrate_prepared_and_check(
    from: Pod,
    to: &mut Pod,
    opts: pb::MigrationOptions,
) -> (pb::MigrationResult, Pod) {
    let mut c = from.client().await;
    // Progress arrives on Watch at least every 400 ms while the migration runs.
    let mut watch = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let progress = tokio::spawn(async move {
        let mut stamps = Vec::new();
        while let Ok(Some(e)) = watch.message().await {
            if e.kind() == EventKind::Migration {
                let running = e
                    .migration
                    .as_ref()
                    .is_some_and(|m| m.phase() == MigrationPhase::Running);
                stamps.push((
                    e.time_unix_ms,
                    running,
                    e.migration.map(|m| m.data_total).unwrap_or(0),
                ));
                if !running {
                    break;
                }
            }
        }
        stamps
    });
    let r = c
        .migrate(pb::MigrateRequest {
            target_socket: to.socket().display().to_string(),
            options: Some(opts),
        })
        .await
        .expect("Migrate call")
        .into_inner();
    assert!(
        r.success,
        "migration failed: {}\n{}\n{}",
        r.message,
        from.dump(),
        to.dump()
    );
    let p = r.progress.unwrap();
    assert!(
        p.downtime_ms > 0 && p.elapsed_ms > 0 && p.data_total > 0,
        "{p:?}"
    );

    let stamps = tokio::time::timeout(Duration::from_secs(10), progress)
        .await
        .unwrap()
        .unwrap();
    let running: Vec<i64> = stamps
        .iter()
        .filter(|s| s.1 && s.2 > 0)
        .map(|s| s.0)
        .collect();
    for w in running.windows(2) {
        assert!(
            w[1] - w[0] <= 1000,
            "progress gap of {} ms: {stamps:?}",
            w[1] - w[0]
        );
    }

    // The source launcher exits 0 once the VM has left.
    let (status, from) = common::exit_status(from, Duration::from_secs(30)).await;
    assert!(status.success(), "{}", from.dump());
    assert!(
        from.log().contains("\"reason\":\"Migrated\""),
        "{}",
        from.dump()
    );
    assert!(
        from.leftover_processes().is_empty(),
        "source left: {:?}",
        from.leftover_processes()
    );

    // The counter goes on on the target with no gap.
    let last_src = *counts(&from.console()).last().expect("source counted");
    let deadline = Instant::now() + Duration::from_secs(30);
    let on_target = loop {
        let c = counts(&to.console());
        if c.len() >= 3 {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no counting on the target\n{}",
            to.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        on_target[0] <= last_src + 1 && on_target[0] >= last_src,
        "gap: source stopped at {last_src}, target continued at {}",
        on_target[0]
    );
    assert!(
        on_target.windows(2).all(|w| w[1] == w[0] + 1),
        "target skipped values: {on_target:?}"
    );
    assert!(
        to.disk_counter("data") >= on_target[0],
        "the target's disk lags behind the guest"
    );
    (r, from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_moves_to_the_target_and_back_with_its_disk_data() {
    let a = source("mig-a", true);
    let vmi = a.vmi_yaml();
    let mut b = target("mig-b", &a);
    let first = migrate_and_check(a, &mut b, &vmi).await;
    let mut c = b.client().await;
    let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(d.state(), DomainState::Running);
    assert!(d.migration_target.is_none());
    assert!(d.disks[0].shared);

    // And back, to a fresh pod on the first "node".
    let mut a2 = {
        let mut pod = Pod::new("mig-a2").with_disk("data", "virtio", 16);
        pod.shared_pvcs = Some(b.pvcs_dir());
        pod.wait_for_sync = true;
        pod.start();
        pod.wait_socket(Duration::from_secs(30));
        pod
    };
    let second = migrate_and_check(b, &mut a2, &vmi).await;
    eprintln!(
        "migration A->B: total {} ms downtime {} ms; B->A: total {} ms downtime {} ms",
        first.progress.as_ref().unwrap().elapsed_ms,
        first.progress.as_ref().unwrap().downtime_ms,
        second.progress.as_ref().unwrap().elapsed_ms,
        second.progress.as_ref().unwrap().downtime_ms
    );
    a2.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, a2) = common::exit_status(a2, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", a2.dump());
}

/// Starts a slow migration (1 MiB/s) and waits until it is running.
async fn slow_migration(
    a: &Pod,
    b: &Pod,
) -> tokio::task::JoinHandle<Result<pb::MigrationResult, tonic::Status>> {
    slow_migration_with(a, b, options()).await
}

/// [`slow_migration`] with these options (the bandwidth is always 1 MiB/s).
async fn slow_migration_with(
    a: &Pod,
    b: &Pod,
    opts: pb::MigrationOptions,
) -> tokio::task::JoinHandle<Result<pb::MigrationResult, tonic::Status>> {
    prepare(b, &a.vmi_yaml()).await;
    let socket = a.socket();
    let target = b.socket().display().to_string();
    let call = tokio::spawn(async move {
        let mut c = testkit::launcher::connect(&socket).await.unwrap();
        let opts = pb::MigrationOptions {
            bandwidth_mib: 1,
            ..opts
        };
        c.migrate(pb::MigrateRequest {
            target_socket: target,
            options: Some(opts),
        })
        .await
        .map(|r| r.into_inner())
    });
    let mut c = a.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = c.get_domain(pb::Empty {}).await.unwrap().into_inner();
        if d.migration
            .as_ref()
            .is_some_and(|m| m.phase() == MigrationPhase::Running && m.data_processed > 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migration never got going: {d:?}\n{}",
            a.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    call
}

/// The VM still runs on `a` and keeps counting.
async fn still_running_on(a: &Pod) {
    let mut c = a.client().await;
    assert_eq!(
        c.get_domain(pb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .state(),
        DomainState::Running
    );
    let n = counts(&a.console()).last().copied().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counts(&a.console()).last().copied().unwrap_or(0) < n + 3 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped counting on the source\n{}",
            a.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_migration_keeps_the_vm_on_the_source() {
    let a = source("mig-cancel", true);
    let b = target("mig-cancel-t", &a);
    let call = slow_migration(&a, &b).await;
    let mut c = a.client().await;
    // No max_downtime_ms asked: the first pass runs with the launcher's low default limit
    // (QEMU's own is 300 ms; virsh prints milliseconds).
    let domain = c.get_domain(pb::Empty {}).await.unwrap().into_inner().name;
    assert_eq!(a.virsh(&["migrate-getmaxdowntime", &domain]), "50");
    c.cancel_migration(pb::Empty {}).await.expect("cancel");
    let r = call.await.unwrap().expect("Migrate returns a result");
    assert!(!r.success);
    assert_eq!(
        r.progress.unwrap().phase(),
        MigrationPhase::Cancelled,
        "{}",
        r.message
    );
    still_running_on(&a).await;
    // The target was told to clean up and exits.
    let (status, b) = common::exit_status(b, Duration::from_secs(30)).await;
    assert!(status.success(), "{}", b.dump());
    assert!(
        b.leftover_processes().is_empty(),
        "target left: {:?}",
        b.leftover_processes()
    );
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, a) = common::exit_status(a, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", a.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_dying_mid_migration_keeps_the_vm_on_the_source() {
    let a = source("mig-kill", true);
    let mut b = target("mig-kill-t", &a);
    let call = slow_migration_with(
        &a,
        &b,
        pb::MigrationOptions {
            max_downtime_ms: 120,
            ..options()
        },
    )
    .await;
    // The downtime limit asked for holds from the first pass on.
    let domain = a
        .client()
        .await
        .get_domain(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .name;
    assert_eq!(a.virsh(&["migrate-getmaxdowntime", &domain]), "120");
    // The target pod dies: its launcher, daemons and the incoming QEMU.
    b.signal(nix::sys::signal::Signal::SIGKILL);
    for p in b.leftover_processes() {
        let pid: i32 = p.split(':').next().unwrap().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = b.wait_exit(Duration::from_secs(10));
    let r = tokio::time::timeout(Duration::from_secs(90), call)
        .await
        .expect("Migrate returned")
        .unwrap()
        .expect("result");
    assert!(!r.success);
    assert_eq!(r.progress.unwrap().phase(), MigrationPhase::Failed);
    assert!(!r.message.is_empty(), "the failure must say why");
    still_running_on(&a).await;
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, a) = common::exit_status(a, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", a.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migrations_are_refused_and_the_vm_stays() {
    // A ReadWriteOnce claim cannot be migrated without block migration.
    let a = source("mig-rwo", false);
    let b = target("mig-rwo-t", &a);
    let mut c = a.client().await;
    let target_socket = b.socket().display().to_string();
    let migrate = |socket: String| pb::MigrateRequest {
        target_socket: socket,
        options: Some(options()),
    };

    // Not prepared yet.
    let e = c.migrate(migrate(target_socket.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("not prepared"), "{}", e.message());
    // Unreachable target.
    let e = c
        .migrate(migrate("/nonexistent/launcher-sock".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Prepared for another VMI.
    let other = a
        .vmi_yaml()
        .replace(&a.uid(), "99999999-0000-4000-8000-000000000001");
    prepare(&b, &other).await;
    let e = c.migrate(migrate(target_socket.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("99999999"), "{}", e.message());
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, b) = common::exit_status(b, Duration::from_secs(20)).await;

    // The right VMI, but the claim is ReadWriteOnce.
    let b2 = target("mig-rwo-t2", &a);
    prepare(&b2, &a.vmi_yaml()).await;
    let e = c
        .migrate(migrate(b2.socket().display().to_string()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("data") && e.message().contains("block migration"),
        "{}",
        e.message()
    );
    still_running_on(&a).await;
    drop(b);
    b2.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = common::exit_status(b2, Duration::from_secs(20)).await;
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, a) = common::exit_status(a, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", a.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_migration_past_its_deadline_switches_to_post_copy() {
    let a = source("mig-post", true);
    let mut b = target("mig-post-t", &a);
    prepare(&b, &a.vmi_yaml()).await;
    let mut c = a.client().await;
    // 2 MiB/s cannot move 128 MiB in time; 1 s per GiB is a 0.125 s deadline.
    let opts = pb::MigrationOptions {
        bandwidth_mib: 2,
        allow_post_copy: true,
        completion_timeout_per_gib: 1,
        ..options()
    };
    let mut watch = c
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let r = c
        .migrate(pb::MigrateRequest {
            target_socket: b.socket().display().to_string(),
            options: Some(opts),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{}\n{}", r.message, a.dump());
    let mut saw_post_copy = false;
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(2), watch.message()).await
    {
        if e.migration
            .as_ref()
            .is_some_and(|m| m.mode() == MigrationMode::PostCopy)
        {
            saw_post_copy = true;
        }
    }
    assert!(saw_post_copy, "no post-copy switch was reported");
    let (status, a) = common::exit_status(a, Duration::from_secs(30)).await;
    assert!(status.success(), "{}", a.dump());
    // The guest runs on the target and counts on.
    let n = counts(&b.console()).last().copied().unwrap_or(0);
    b.wait_console(&format!("LV-COUNT {}", n + 3), Duration::from_secs(30));
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, b) = common::exit_status(b, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", b.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_migration_cancels_it_and_stops_with_the_data_intact() {
    let a = source("mig-term", true);
    let b = target("mig-term-t", &a);
    let call = slow_migration(&a, &b).await;
    // The source pod is deleted mid-migration.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let r = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("Migrate returned")
        .unwrap();
    if let Ok(r) = r {
        assert!(
            !r.success,
            "a migration must not complete after SIGTERM: {r:?}"
        );
    }
    let (status, a) = common::exit_status(a, Duration::from_secs(45)).await;
    assert!(status.success(), "{}", a.dump());
    assert!(a.log().contains("cancelling it"), "{}", a.dump());
    assert!(
        a.log().contains("\"reason\":\"Shutdown\""),
        "the guest was not shut down cleanly\n{}",
        a.dump()
    );
    // Everything the guest reported as written is on the shared disk.
    let last = *counts(&a.console()).last().expect("the guest counted");
    assert!(
        a.disk_counter("data") >= last,
        "disk holds {} but the guest wrote {last}",
        a.disk_counter("data")
    );
    let (status, b) = common::exit_status(b, Duration::from_secs(30)).await;
    assert!(status.success(), "{}", b.dump());
    assert!(a.leftover_processes().is_empty() && b.leftover_processes().is_empty());
}

/// Sizes of the source's local disks, as an orchestrator passes them to the target.
async fn local_disk_sizes(src: &Pod) -> HashMap<String, u64> {
    let d = src
        .client()
        .await
        .get_domain(pb::Empty {})
        .await
        .unwrap()
        .into_inner();
    d.disks
        .into_iter()
        .filter(|d| !d.shared)
        .map(|d| (d.volume, d.size_bytes))
        .collect()
}

/// A VM-less target pod with its own (ReadWriteOnce) claim directories but no `disk.img` in
/// them, as a fresh claim on another node.
fn empty_target(name: &str) -> Pod {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 16)
        .with_disk("logs", "virtio", 8);
    pod.wait_for_sync = true;
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    for d in ["data", "logs"] {
        std::fs::remove_file(pod.disk_image(d)).unwrap();
    }
    pod
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_migration_copies_local_disks_to_the_target() {
    // The source runs on two ReadWriteOnce claims: the guest counts on `data` (vda) and wrote
    // a line to `logs` (vdb) at boot; `data` also holds a block written before the VM started
    // (as an OS image would), far from where the guest writes.
    const SEED_AT: u64 = 12 << 20;
    const SEED: &[u8] = b"lv-seeded-before-boot";
    let mut a = Pod::new("mig-blk")
        .with_disk("data", "virtio", 16)
        .with_disk("logs", "virtio", 8)
        .kernel_args("lv.write=vdb:lv-written-by-the-guest lv.counter=vda");
    a.start();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.disk_image("data"))
            .unwrap();
        f.write_all_at(SEED, SEED_AT).unwrap();
        f.sync_all().unwrap();
    }
    a.wait_console(
        "LV-WROTE vdb lv-written-by-the-guest",
        Duration::from_secs(90),
    );
    a.wait_console("LV-COUNT 5", Duration::from_secs(90));
    let vmi = a.vmi_yaml();
    let sizes = local_disk_sizes(&a).await;
    assert_eq!(
        sizes,
        HashMap::from([
            ("data".to_string(), 16 << 20),
            ("logs".to_string(), 8 << 20)
        ])
    );
    let mut c = a.client().await;
    let block = pb::MigrationOptions {
        block_migration: true,
        ..options()
    };

    // A target without the source's sizes has nothing to copy into (and the VMI states no
    // capacity): refused, naming the missing file.
    let b = empty_target("mig-blk-t");
    let e = prepare_with(&b, &vmi, HashMap::new()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("disk.img") && e.message().contains("data"),
        "{}",
        e.message()
    );
    // A destination of the wrong size is refused before anything is copied.
    let mut wrong = sizes.clone();
    wrong.insert("data".into(), 8 << 20);
    prepare_with(&b, &vmi, wrong).await.expect("prepare");
    let e = c
        .migrate(pb::MigrateRequest {
            target_socket: b.socket().display().to_string(),
            options: Some(block),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("data") && e.message().contains("same size"),
        "{}",
        e.message()
    );
    still_running_on(&a).await;
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, b) = common::exit_status(b, Duration::from_secs(20)).await;
    drop(b);

    // The right target: the sparse destinations are created at the source's sizes.
    let mut b = empty_target("mig-blk-t2");
    prepare_with(&b, &vmi, sizes.clone())
        .await
        .expect("prepare");
    for (d, size) in &sizes {
        let m = std::fs::metadata(b.disk_image(d)).unwrap();
        assert_eq!(m.len(), *size, "{d}");
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&m) * 512 < 1 << 20,
            "{d} is not sparse"
        );
    }
    // Without block migration the local claims are refused.
    let e = c
        .migrate(pb::MigrateRequest {
            target_socket: b.socket().display().to_string(),
            options: Some(options()),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("block migration"), "{}", e.message());

    let (r, a) = migrate_prepared_and_check(a, &mut b, block).await;
    let p = r.progress.unwrap();
    eprintln!(
        "block migration: total {} ms, downtime {} ms, {} bytes",
        p.elapsed_ms, p.downtime_ms, p.data_total
    );
    // The target's own files hold what the guest and the image had before the migration.
    let last_src = *counts(&a.console()).last().unwrap();
    assert_eq!(read_at(&b.disk_image("data"), SEED_AT, SEED.len()), SEED);
    assert_eq!(first_line(&b.disk_image("logs")), "lv-written-by-the-guest");
    assert!(
        b.disk_counter("data") >= last_src,
        "target disk holds {} but the guest had written {last_src}",
        b.disk_counter("data")
    );
    // The source's copy is no longer used.
    let src_now = a.disk_counter("data");
    let n = counts(&b.console()).last().copied().unwrap();
    b.wait_console(&format!("LV-COUNT {}", n + 5), Duration::from_secs(30));
    assert_eq!(
        a.disk_counter("data"),
        src_now,
        "something still writes the source's copy"
    );
    let d = b
        .client()
        .await
        .get_domain(pb::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state(), DomainState::Running);
    assert!(d
        .disks
        .iter()
        .all(|d| d.source.starts_with(&b.pvcs_dir().display().to_string())));

    // Stopped on the target, every count the guest printed is in the target's file.
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, b) = common::exit_status(b, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", b.dump());
    let last = *counts(&b.console()).last().unwrap();
    assert!(
        b.disk_counter("data") >= last,
        "target disk holds {} but the guest wrote {last}",
        b.disk_counter("data")
    );
    assert!(b.leftover_processes().is_empty() && a.leftover_processes().is_empty());
}

/// `virsh migrate` run by hand on `src`'s libvirtd, past the launcher's own checks: only the
/// target's libvirt (its migration hook) can refuse it. Its stderr.
fn virsh_migrate_by_hand(src: &Pod, target: &pb::MigrationTarget) -> String {
    let pid = src.daemon_pid("libvirtd").expect("libvirtd pid file");
    let uri = format!(
        "qemu+unix:///system?socket={}/sock/libvirt-sock",
        src.runtime_dir().display()
    );
    let domain = format!("default_{}", src.name);
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "virsh", "-c", &uri])
        .args(["migrate", "--live", "--p2p", "--unsafe", &domain])
        .arg(&target.libvirt_uri)
        .args(["--migrateuri", &target.migration_uri])
        .output()
        .expect("run virsh");
    assert!(!out.status.success(), "virsh migrate went through");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_takes_only_the_vm_it_was_prepared_for() {
    // The same uid (hand-written VMIs copied from one another, or with none at all), another VM.
    let a = source("migi", true);
    let b = target("migi-t", &a);
    let other = a.vmi_yaml().replace(&a.name, "vl-other");
    let prepared = prepare(&b, &other).await;
    assert_eq!(
        (prepared.namespace.as_str(), prepared.name.as_str()),
        ("default", "vl-other")
    );
    assert!(!prepared.domain_uuid.is_empty(), "{prepared:?}");

    // Through the launcher: refused before anything starts, naming both VMs.
    let mut c = a.client().await;
    let e = c
        .migrate(pb::MigrateRequest {
            target_socket: b.socket().display().to_string(),
            options: Some(options()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("default/vl-other") && e.message().contains("default/vl-migi"),
        "{}",
        e.message()
    );

    // Past the launcher: the target's libvirt asks its hook, which refuses before QEMU starts.
    let err = virsh_migrate_by_hand(&a, &prepared);
    assert!(
        err.contains("refused")
            && err.contains("default_vl-migi")
            && err.contains("default/vl-other"),
        "{err}"
    );
    assert!(
        !b.log().contains("incoming migration arrived"),
        "{}",
        b.dump()
    );
    assert!(
        b.client()
            .await
            .get_domain(pb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .migration_target
            .is_some(),
        "the target no longer awaits its VM"
    );
    still_running_on(&a).await;

    // Nothing was lost: the target ends as a target that no VM reached, the VM stops cleanly.
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, b) = common::exit_status(b, Duration::from_secs(20)).await;
    assert!(status.success(), "{}", b.dump());
    assert!(
        b.leftover_processes().is_empty(),
        "{:?}",
        b.leftover_processes()
    );
    let before = a.disk_counter("data");
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, a) = common::exit_status(a, Duration::from_secs(40)).await;
    assert!(status.success(), "{}", a.dump());
    assert!(a.disk_counter("data") >= before);
    assert!(
        a.leftover_processes().is_empty(),
        "{:?}",
        a.leftover_processes()
    );
}
