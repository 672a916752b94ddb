//! The guest agent through KubeVirt's cmd protocol, played as virt-handler and virt-probe
//! play it, on real TCG guests running the test guest's agent: `Exec` runs a command in the
//! guest and returns its real output and exit code, `GuestPing` answers with an agent and
//! fails clearly without one; the agent's facts (polled while it is connected) come back in
//! `GetGuestInfo`, `GetUsers`, `GetFilesystems` and in the notified domain.

mod common;

use std::time::Duration;

use common::Pod;
use testkit::kubevirt::{
    self as kv, handler_vmi, set_phase, vmi_request, with_timeout, CmdClient, NotifyServer,
    LONG_TIMEOUT, SHORT_TIMEOUT,
};
use tonic::Code;
use virt_launcher::api::kubevirt::pb::cmd::v1 as cmd;

/// A pod started by the handler's Sync (phase Scheduled), its guest booted.
async fn started(name: &str, kernel_args: &str) -> (Pod, CmdClient, NotifyServer, String) {
    let mut pod = Pod::new(name)
        .with_disk("data", "virtio", 8)
        .kernel_args(kernel_args);
    pod.wait_for_sync = true;
    let share = pod.dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    pod.extra_args = vec!["--kubevirt-share-dir".into(), share.display().to_string()];
    pod.start();
    pod.wait_socket(Duration::from_secs(30));
    let notify = NotifyServer::start(&share.join("domain-notify-pipe.sock")).unwrap();
    let mut h = kv::connect_cmd(&pod.socket()).await.unwrap();
    let mut vmi = handler_vmi(&pod.vmi_yaml(), "Scheduled").unwrap();
    let r = h
        .sync_virtual_machine(with_timeout(vmi_request(&vmi), LONG_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}\n{}", pod.dump());
    set_phase(&mut vmi, "Running");
    pod.wait_console("LV-READY", Duration::from_secs(120));
    let domain = format!("default_{}", pod.name);
    (pod, h, notify, domain)
}

/// The launcher's resident memory (`VmRSS` of its status), for the log.
fn launcher_rss(pod: &Pod) -> String {
    let pid = pod.child.as_ref().map_or(0, |c| c.id());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:"));
    line.unwrap_or("VmRSS: ?")
        .trim_start_matches("VmRSS:")
        .trim()
        .to_string()
}

/// GetDomain's api.Domain JSON, parsed.
async fn domain(h: &mut CmdClient) -> serde_json::Value {
    let r = h
        .get_domain(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&r.domain).unwrap_or_default()
}

/// GetGuestInfo's JSON, parsed.
async fn guest_info(h: &mut CmdClient) -> serde_json::Value {
    let r = h
        .get_guest_info(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(r.response.as_ref().unwrap().success, "{r:?}");
    serde_json::from_str(&r.guest_info_response).unwrap()
}

/// The agent channel's state in GetDomain's JSON.
async fn agent_state(h: &mut CmdClient) -> String {
    let d = domain(h).await;
    d["Spec"]["Devices"]["Channels"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["Target"]["Name"] == "org.qemu.guest_agent.0")
        .and_then(|c| c["Target"]["State"].as_str())
        .unwrap_or("")
        .to_string()
}

async fn wait_agent_connected(h: &mut CmdClient, pod: &Pod) {
    for _ in 0..240 {
        if agent_state(h).await == "connected" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the guest agent never connected\n{}", pod.dump());
}

async fn exec(
    h: &mut CmdClient,
    domain: &str,
    command: &str,
    args: &[&str],
    timeout_seconds: i32,
) -> Result<cmd::ExecResponse, tonic::Status> {
    h.exec(with_timeout(
        cmd::ExecRequest {
            domain_name: domain.into(),
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            timeout_seconds,
        },
        LONG_TIMEOUT * 3,
    ))
    .await
    .map(|r| r.into_inner())
}

async fn guest_ping(
    h: &mut CmdClient,
    domain: &str,
) -> Result<cmd::GuestPingResponse, tonic::Status> {
    h.guest_ping(with_timeout(
        cmd::GuestPingRequest {
            domain_name: domain.into(),
            timeout_seconds: 10,
        },
        LONG_TIMEOUT,
    ))
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_guest_ping_reach_the_guest_agent() {
    // A token only this guest's kernel command line carries: Exec's output must come from it.
    let token = format!("lv.token=t{}", std::process::id());
    let (mut pod, mut h, notify, dom) = started("kv-agent", &token).await;
    wait_agent_connected(&mut h, &pod).await;

    // The agent's facts, polled as soon as it connected: what the guest itself says.
    let mut info = serde_json::Value::Null;
    for _ in 0..120 {
        info = guest_info(&mut h).await;
        // The first round of polls is over once its last answer (the freeze state) is in.
        if info["os"]["id"] == "lv-test" && info["fsFreezeStatus"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let kernel = std::fs::read_to_string(common::guest_dir().join("kernel-version")).unwrap();
    let kernel = kernel
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("linux-image-");
    assert_eq!(info["os"]["kernelRelease"], kernel, "{info}");
    assert_eq!(
        info["os"]["prettyName"], "lv test guest 1 (busybox)",
        "{info}"
    );
    assert_eq!(info["os"]["machine"], "x86_64", "{info}");
    assert_eq!(info["hostname"], "lv-guest", "{info}");
    assert_eq!(info["guestAgentVersion"], "lv-0.1", "{info}");
    assert_eq!(info["timezone"], "UTC, 0", "{info}");
    assert_eq!(info["fsFreezeStatus"], "thawed", "{info}");
    assert!(
        info["supportedCommands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "guest-exec" && c["enabled"] == true),
        "{info}"
    );
    assert_eq!(info["userList"][0]["userName"], "root", "{info}");
    let tmp = |list: &serde_json::Value| {
        list.as_array().into_iter().flatten().any(|f| {
            f["mountPoint"] == "/tmp"
                && f["fileSystemType"] == "tmpfs"
                && f["totalBytes"].as_i64() > Some(0)
        })
    };
    assert!(tmp(&info["fsInfo"]["disks"]), "{info}");
    let users = h
        .get_users(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    let users: serde_json::Value = serde_json::from_str(&users.guest_user_list_response).unwrap();
    assert_eq!(users[0]["userName"], "root", "{users}");
    assert!(users[0]["loginTime"].as_f64() > Some(0.0), "{users}");
    let fs = h
        .get_filesystems(with_timeout(cmd::EmptyRequest {}, SHORT_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    let fs: serde_json::Value = serde_json::from_str(&fs.guest_filesystems_response).unwrap();
    assert!(tmp(&fs), "{fs}");
    // The notified domain carries the agent's facts and the connected channel (virt-handler's
    // AgentConnected condition and vmi.status.guestOSInfo come from it).
    let got = notify
        .wait_for(Duration::from_secs(60), |evs| {
            evs.iter().any(|e| {
                e.json["Status"]["OSInfo"]["Id"] == "lv-test"
                    && e.json["Status"]["Interfaces"].is_array()
                    && e.json["Spec"]["Devices"]["Channels"][0]["Target"]["State"] == "connected"
            })
        })
        .await;
    assert!(got.is_some(), "{:#?}", notify.received().last());
    let d = domain(&mut h).await;
    assert_eq!(d["Status"]["OSInfo"]["KernelRelease"], kernel, "{d}");
    assert_eq!(d["Status"]["FSFreezeStatus"]["Status"], "thawed", "{d}");

    eprintln!("launcher with the agent polled: {}", launcher_rss(&pod));
    let p = guest_ping(&mut h, &dom).await.expect("GuestPing");
    assert!(p.response.unwrap().success);

    // Paused by its user, the guest cannot answer, yet the VM is healthy: the probe passes
    // (KubeVirt's launcher does the same), and Exec fails clearly.
    let vmi = handler_vmi(&pod.vmi_yaml(), "Running").unwrap();
    let r = h
        .pause_virtual_machine(with_timeout(vmi_request(&vmi), LONG_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}");
    for _ in 0..100 {
        if domain(&mut h).await["Status"]["Status"] == "Paused" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = guest_ping(&mut h, &dom)
        .await
        .expect("GuestPing of a paused VM");
    assert!(p.response.unwrap().success);
    let e = exec(&mut h, &dom, "true", &[], 2)
        .await
        .expect_err("Exec in a paused VM");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    eprintln!("Exec while paused: {}", e.message());
    let r = h
        .unpause_virtual_machine(with_timeout(vmi_request(&vmi), LONG_TIMEOUT))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}");

    // A command run in the guest: its real output.
    let r = exec(&mut h, &dom, "cat", &["/proc/cmdline"], 20)
        .await
        .expect("Exec cat");
    assert!(r.response.as_ref().unwrap().success, "{r:?}");
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.std_out.contains(&token), "{r:?}");
    pod.wait_console("LV-EXEC", Duration::from_secs(10));

    // A non-zero exit is an outcome: success, with the exit code and the output so far.
    let r = exec(
        &mut h,
        &dom,
        "sh",
        &["-c", "echo partial $((6*7)); exit 3"],
        20,
    )
    .await
    .expect("Exec exit 3");
    assert!(r.response.as_ref().unwrap().success, "{r:?}");
    assert_eq!(
        (r.exit_code, r.std_out.as_str()),
        (3, "partial 42\n"),
        "{r:?}"
    );

    // A command that outlives its timeout: an error (gRPC UNKNOWN, as KubeVirt's launcher).
    let e = exec(&mut h, &dom, "sleep", &["600"], 2)
        .await
        .expect_err("Exec past its timeout");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert!(e.message().contains("timed out"), "{e:?}");

    // Another domain's name: refused, nothing run.
    let execs = pod.console_count("LV-EXEC");
    let e = exec(&mut h, "default_other", "true", &[], 5)
        .await
        .expect_err("Exec in another domain");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert!(e.message().contains("default_other"), "{e:?}");
    assert_eq!(pod.console_count("LV-EXEC"), execs);
    common::stop_cleanly(pod, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ping_and_exec_without_an_agent_fail_clearly() {
    let (pod, mut h, notify, dom) = started("kv-noagent", "lv.agent=off").await;
    assert_eq!(agent_state(&mut h).await, "disconnected");
    // Nothing polled: the guest info has no facts (and is no error: the handler's status
    // update would fail).
    let info = guest_info(&mut h).await;
    assert_eq!(
        info,
        serde_json::json!({"os": {}, "fsInfo": {"disks": null}})
    );
    eprintln!("launcher without an agent: {}", launcher_rss(&pod));
    let e = guest_ping(&mut h, &dom)
        .await
        .expect_err("GuestPing without agent");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert!(e.message().contains("agent is not connected"), "{e:?}");
    // The handler hears of it: a Warning event GuestAgentPingFailed on the VMI.
    let got = notify
        .wait_for(Duration::from_secs(30), |evs| {
            evs.iter().any(|e| {
                e.event_type == "K8S"
                    && e.json["reason"] == "GuestAgentPingFailed"
                    && e.json["type"] == "Warning"
                    && e.json["involvedObject"]["name"] == pod.name.as_str()
            })
        })
        .await;
    assert!(got.is_some(), "{:#?}", notify.received());
    let e = exec(&mut h, &dom, "true", &[], 5)
        .await
        .expect_err("Exec without agent");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert!(e.message().contains("agent is not connected"), "{e:?}");
    common::stop_cleanly(pod, Duration::from_secs(60)).await;
}

/// `kubevirt.cmd.auth.CmdAuth/Authenticate` hands virt-handler the pod's projected token,
/// read at each call (the kubelet refreshes it); without the file: UNIMPLEMENTED, as from a
/// launcher that predates the service. No guest needed: the launcher waits for its Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_auth_hands_over_the_pods_token_read_at_each_call() {
    let mut pod = Pod::new("kv-auth").with_disk("data", "virtio", 8);
    pod.wait_for_sync = true;
    let token_file = pod.dir.join("tokens/cmd-auth-token");
    pod.prepare();
    let mut cmd = pod.command();
    cmd.env("VIRT_LAUNCHER_CMD_AUTH_TOKEN", &token_file);
    pod.spawn_command(cmd);
    pod.wait_socket(Duration::from_secs(30));
    let mut a = kv::connect_auth(&pod.socket()).await.unwrap();
    let auth = |a: &mut kv::AuthClient| {
        let mut a = a.clone();
        async move {
            a.authenticate(with_timeout(
                virt_launcher::api::kubevirt::pb::cmd::auth::AuthRequest {},
                SHORT_TIMEOUT,
            ))
            .await
        }
    };

    let e = auth(&mut a).await.expect_err("no token file");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("cmd-auth-token"), "{e:?}");

    std::fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.first.sig").unwrap();
    let r = auth(&mut a).await.expect("token").into_inner();
    assert_eq!(r.token, "eyJhbGciOiJSUzI1NiJ9.first.sig");
    // The kubelet's refresh (an atomic replace): the next call hands over the new token.
    let fresh = token_file.with_extension("new");
    std::fs::write(&fresh, "eyJhbGciOiJSUzI1NiJ9.second.sig\n").unwrap();
    std::fs::rename(&fresh, &token_file).unwrap();
    let r = auth(&mut a).await.expect("refreshed token").into_inner();
    assert_eq!(r.token, "eyJhbGciOiJSUzI1NiJ9.second.sig");
    // An empty file is no token.
    std::fs::write(&token_file, "").unwrap();
    let e = auth(&mut a).await.expect_err("empty token file");
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("empty"), "{e:?}");
    // The cmd service goes on beside it.
    assert_eq!(kv::cmd_versions(&pod.socket()).await.unwrap(), vec![1]);
    common::stop_cleanly(pod, Duration::from_secs(30)).await;
}
