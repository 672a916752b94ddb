//! The drop-in path (issue 23, item 5): the same launcher binary driven as KubeVirt's
//! virt-handler drives it — `virt-launcher-monitor` in a compute container
//! (`testkit::compute`), `SyncVirtualMachine` over `kubevirt.cmd.v1`, domain events on the
//! handler's notify pipe (`testkit::kubevirt::NotifyServer`) — against our own `launcher.v1`
//! API (Sync, then the `Watch` stream). Both sides start timing once their socket serves, so the
//! figures are the protocol paths, not the pod starts:
//!
//! - `dropin.sync_running`: Sync sent → the client learns the domain runs (a Running domain
//!   event received by the notify server / a RUNNING event on `Watch`);
//! - `dropin.notify_pause`: Pause sent → the client is told the domain paused (the libvirt
//!   event relayed as `HandleDomainEvent` / as a `Watch` event).
//!
//! - `dropin.sync_running_late`: as `dropin.sync_running`, with the Sync sent a second after
//!   the socket serves. A handler Syncs a VMI once it is `Scheduled`, which virt-controller sets
//!   only when the pod is Ready (`pkg/virt-controller/watch/vmi/lifecycle.go`): the kubelet's
//!   status report and two API round trips after the containers started, while the launcher is
//!   already serving. The first figure is the worst case (a Sync at once); this one what the
//!   launcher's start-up leaves for the VM's start when the handler takes a second.
//!
//! Rounds alternate which side goes first; each side boots its own guest from its own copy of
//! the PVC.

use super::pods::*;
use super::*;

use testkit::compute::{self, Compute};
use testkit::kubevirt::{
    connect_cmd, handler_vmi, vmi_request, with_timeout, CmdClient, NotifyServer, LONG_TIMEOUT,
};
use virt_launcher::api::pb;

/// Samples of each figure on each side.
fn rounds(ctx: &Ctx) -> usize {
    if ctx.opts.quick {
        1
    } else {
        5
    }
}

pub(super) fn bench_dropin(ctx: &mut Ctx) -> Result<()> {
    let rt = tokio_runtime()?;
    let n = rounds(ctx);
    let (mut k_sync, mut k_pause, mut o_sync, mut o_pause) = (vec![], vec![], vec![], vec![]);
    let (mut k_late, mut o_late) = (vec![], vec![]);
    for i in 0..n {
        for step in 0..4 {
            check_interrupt()?;
            let late = step >= 2;
            let delay = if late { LATE_SYNC } else { Duration::ZERO };
            let when = if late {
                "a second after the socket"
            } else {
                "at once"
            };
            if (i + step) % 2 == 0 {
                let (sync, pause) = kubevirt_round(ctx, &rt, delay)?;
                progress(&format!(
                    "{}/{n} drop-in (kubevirt.cmd.v1), Sync {when}: Sync → Running notified {} ms, Pause → notified {} ms",
                    i + 1,
                    fmt_num(sync),
                    fmt_num(pause)
                ));
                if late {
                    k_late.push(sync);
                } else {
                    k_sync.push(sync);
                    k_pause.push(pause);
                }
            } else {
                let (sync, pause) = own_round(ctx, &rt, delay)?;
                progress(&format!(
                    "{}/{n} drop-in (launcher.v1), Sync {when}: Sync → RUNNING watched {} ms, Pause → watched {} ms",
                    i + 1,
                    fmt_num(sync),
                    fmt_num(pause)
                ));
                if late {
                    o_late.push(sync);
                } else {
                    o_sync.push(sync);
                    o_pause.push(pause);
                }
            }
        }
    }
    ctx.figure(
        "dropin.sync_running",
        "drop-in: KubeVirt's SyncVirtualMachine → Running notified (vs our own Sync → RUNNING watched)",
        "ms",
        &k_sync,
        "virt-launcher-monitor in a compute container: SyncVirtualMachine (phase Scheduled) over \
         kubevirt.cmd.v1 → a domain event with status Running received by the handler's notify \
         server",
        Some((
            &o_sync,
            "the same launcher binary standalone: launcher.v1 Sync with the same VMI → a \
             RUNNING event on its Watch stream",
        )),
        None,
    );
    ctx.figure(
        "dropin.sync_running_late",
        "drop-in: SyncVirtualMachine a second after the socket serves → Running notified (vs our own Sync, as late)",
        "ms",
        &k_late,
        "as dropin.sync_running, the Sync sent 1 s after launcher-sock serves (a handler that \
         learns a second later that the pod is Ready)",
        Some((
            &o_late,
            "as the launcher.v1 side of dropin.sync_running, the Sync sent 1 s after the socket \
             serves",
        )),
        None,
    );
    ctx.figure(
        "dropin.notify_pause",
        "drop-in: Pause → the handler notified (vs our own Pause → Watch event)",
        "ms",
        &k_pause,
        "PauseVirtualMachine over kubevirt.cmd.v1 → the Paused domain event received by the \
         handler's notify server (libvirt's event relayed as HandleDomainEvent)",
        Some((
            &o_pause,
            "launcher.v1 Pause → the PAUSED event on the Watch stream",
        )),
        None,
    );
    Ok(())
}

/// How long after its socket serves a launcher gets the late Sync.
const LATE_SYNC: Duration = Duration::from_secs(1);

/// One VM under KubeVirt's protocol, Synced `delay` after the socket serves: (Sync → Running
/// notified, Pause → Paused notified) in ms.
fn kubevirt_round(
    ctx: &mut Ctx,
    rt: &tokio::runtime::Runtime,
    delay: Duration,
) -> Result<(f64, f64)> {
    let dir = ctx.fresh_dir("dk")?;
    let name = format!("{}-dk{}", ctx.name, ctx.seq);
    let c = Compute {
        top: dir.join("container"),
        name: name.clone(),
        uid: uid(),
        grace_seconds: 5,
        qemu_timeout: "271s".into(),
        extra_args: vec![],
    };
    c.prepare(&ctx.opts.guest_dir)?;
    let files = write_spec_pod(&dir, &c.vmi_disks(), &VmiSpec::plain(&name, 1))?;
    let yaml = fs::read_to_string(&files.vmi).context("read the VMI")?;
    let monitor = ctx.opts.launcher.with_file_name("virt-launcher-monitor");
    let mut cmd = c.command(&monitor)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("container.log"))?)
        .process_group(0);
    let mut child =
        spawn_known(&mut cmd).with_context(|| format!("spawn {}", monitor.display()))?;
    let outcome = (|| {
        let pid1 = compute::monitor_pid(child.id() as i32, &monitor, Duration::from_secs(20))?;
        let _container = compute::Guard::of(pid1)?;
        let sock = c.socket();
        poll(
            Instant::now() + Duration::from_secs(60),
            Duration::from_millis(2),
            || Ok(sock.exists().then_some(())),
        )?
        .ok_or_else(|| anyhow!("launcher-sock not served within 60 s"))?;
        rt.block_on(async {
            let mut h = connect_cmd(&sock).await?;
            let notify = NotifyServer::start(&c.share().join("domain-notify-pipe.sock"))?;
            let vmi = handler_vmi(&yaml, "Scheduled")?;
            tokio::time::sleep(delay).await;
            let t0 = Instant::now();
            call_ok("Sync", h.sync_virtual_machine(req(&vmi)).await)?;
            let running = notified(&notify, "Running", start_timeout(1)).await?;
            let t1 = Instant::now();
            call_ok("Pause", pause(&mut h, &vmi).await)?;
            let paused = notified(&notify, "Paused", Duration::from_secs(30)).await?;
            notify.stop().await;
            Ok::<_, anyhow::Error>((ms(running - t0), ms(paused - t1)))
        })
    })();
    // The container ends with its PID 1 (the guard killed what was in it).
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
    let r = outcome.with_context(|| {
        format!(
            "drop-in round; the container's log:\n{}",
            fs::read_to_string(dir.join("container.log")).unwrap_or_default()
        )
    })?;
    let _ = fs::remove_dir_all(&dir);
    Ok(r)
}

fn req(vmi: &Value) -> tonic::Request<virt_launcher::api::kubevirt::pb::cmd::v1::VmiRequest> {
    with_timeout(vmi_request(vmi), LONG_TIMEOUT)
}

async fn pause(
    h: &mut CmdClient,
    vmi: &Value,
) -> Result<tonic::Response<virt_launcher::api::kubevirt::pb::cmd::v1::Response>, tonic::Status> {
    h.pause_virtual_machine(req(vmi)).await
}

fn call_ok(
    what: &str,
    r: Result<tonic::Response<virt_launcher::api::kubevirt::pb::cmd::v1::Response>, tonic::Status>,
) -> Result<()> {
    match r {
        Ok(r) if r.get_ref().success => Ok(()),
        Ok(r) => bail!("{what}: {}", r.get_ref().message),
        Err(e) => bail!("{what}: {e}"),
    }
}

/// When the first domain event with `status` arrived at the notify server.
async fn notified(notify: &NotifyServer, status: &str, timeout: Duration) -> Result<Instant> {
    let got = notify
        .wait_for(timeout, |e| e.iter().any(|r| r.status() == status))
        .await
        .ok_or_else(|| anyhow!("no {status} domain event within {timeout:?}"))?;
    Ok(got.iter().find(|r| r.status() == status).expect("found").at)
}

/// One VM under our own API, Synced `delay` after the socket serves: (Sync → RUNNING watched,
/// Pause → PAUSED watched) in ms.
fn own_round(ctx: &mut Ctx, rt: &tokio::runtime::Runtime, delay: Duration) -> Result<(f64, f64)> {
    let dir = ctx.fresh_dir("do")?;
    let name = format!("{}-do{}", ctx.name, ctx.seq);
    let pvcs = dir.join("pvcs");
    let files = write_spec_pod(&dir, &pvcs, &VmiSpec::plain(&name, 1))?;
    let vmi = fs::read(&files.vmi).context("read the VMI")?;
    let mut pod = LauncherProc::spawn_with(ctx.opts, None, &pvcs, None, &dir.join("runtime"))?;
    pod.note_namespace();
    let outcome = (|| {
        pod.wait_socket(Duration::from_secs(60))?;
        rt.block_on(async {
            let mut c = connect(&pod.socket()).await?;
            let mut events = c
                .watch(pb::WatchRequest { after_seq: 0 })
                .await
                .map_err(|e| anyhow!("Watch: {e}"))?
                .into_inner();
            tokio::time::sleep(delay).await;
            let t0 = Instant::now();
            c.sync(pb::SyncRequest { vmi })
                .await
                .map_err(|e| anyhow!("Sync: {e}"))?;
            let running = watched(&mut events, pb::DomainState::Running, start_timeout(1)).await?;
            let t1 = Instant::now();
            c.pause(pb::Empty {})
                .await
                .map_err(|e| anyhow!("Pause: {e}"))?;
            let paused = watched(
                &mut events,
                pb::DomainState::Paused,
                Duration::from_secs(30),
            )
            .await?;
            Ok::<_, anyhow::Error>((ms(running - t0), ms(paused - t1)))
        })
    })();
    pod.signal(Signal::SIGKILL)?;
    let _ = pod.wait_exit(Duration::from_secs(30));
    let r = outcome.with_context(|| format!("own-API round\n{}", pod.log_tail()))?;
    drop(pod);
    let _ = fs::remove_dir_all(&dir);
    Ok(r)
}

/// When the Watch stream first showed `state`.
async fn watched(
    events: &mut tonic::Streaming<pb::Event>,
    state: pb::DomainState,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, events.message())
            .await
            .map_err(|_| anyhow!("no {state:?} event within {timeout:?}"))?;
        match next {
            Ok(Some(e)) if e.state() == state => return Ok(Instant::now()),
            Ok(Some(_)) => {}
            Err(e) => bail!("Watch: {e}"),
            Ok(None) => bail!("the Watch stream ended before {state:?}"),
        }
    }
}
