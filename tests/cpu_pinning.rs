//! `dedicatedCpuPlacement` on real QEMU: the launcher takes its own affinity as the pod's CPU
//! set, and the running QEMU's vCPU thread and emulator thread are really confined to the CPUs
//! the domain pins them to (read from the kernel, /proc/<tid>/status `Cpus_allowed_list`),
//! while the guest boots and runs on its one vCPU.

mod common;

use std::time::Duration;

use common::Pod;
use nix::sched::{sched_getaffinity, CpuSet};
use nix::unistd::Pid;
use virt_launcher::api::pb;

/// The host's id of the thread `tid` of the pod's PID namespace (the one `in_ns` is in):
/// QEMU runs in the pod's namespace, and QMP reports its thread ids there.
fn host_tid(in_ns: i32, tid: i64) -> i64 {
    let ns = std::fs::read_link(format!("/proc/{in_ns}/ns/pid")).unwrap();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != Some(ns.clone()) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            let nspid = field(&status, "NSpid:");
            if nspid.split_whitespace().last() == Some(tid.to_string().as_str()) {
                return t.file_name().to_string_lossy().parse().unwrap();
            }
        }
    }
    panic!("no thread {tid} in the pod's PID namespace {ns:?}");
}

/// `Cpus_allowed_list` of a task (thread or process) as the kernel reports it.
fn cpus_allowed(tid: i64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
    field(&status, "Cpus_allowed_list:")
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
        .to_string()
}

/// A 1-vCPU guest with dedicated CPUs and an isolated emulator thread, on this machine's
/// (at least) 2 CPUs: the vCPU is pinned to the first CPU of the launcher's set, the emulator
/// to the second (KubeVirt's order), and the kernel confines QEMU's threads accordingly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_with_dedicated_cpus_runs_its_vcpu_pinned() {
    let mine = sched_getaffinity(Pid::this()).unwrap();
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| mine.is_set(c).unwrap_or(false))
        .collect();
    assert!(
        cpus.len() >= 2,
        "this test needs 2 CPUs (vCPU + isolated emulator thread), the test runs on {cpus:?}"
    );
    let mut pod = Pod::new("cpupin").with_disk("data", "virtio", 1);
    pod.prepare();
    let yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    let yaml = yaml.replacen(
        "    resources:\n",
        "    cpu:\n      cores: 1\n      dedicatedCpuPlacement: true\n      isolateEmulatorThread: true\n    resources:\n",
        1,
    );
    assert!(yaml.contains("dedicatedCpuPlacement"), "{yaml}");
    std::fs::write(pod.vmi_path(), yaml).unwrap();
    pod.spawn();
    pod.wait_console("LV-READY", Duration::from_secs(90));
    pod.wait_online_cpus("0");
    let domain = format!("default_{}", pod.name);

    // The domain libvirt runs pins as the converter said.
    let xml = pod.virsh(&["dumpxml", &domain]);
    let (vcpu_cpu, emu_cpu) = (cpus[0].to_string(), cpus[1].to_string());
    assert!(
        xml.contains(&format!("<vcpupin vcpu='0' cpuset='{vcpu_cpu}'/>")),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<emulatorpin cpuset='{emu_cpu}'/>")),
        "{xml}"
    );

    // The kernel's view: the vCPU thread QEMU reports, and QEMU's main (emulator) thread.
    let out = pod.virsh(&[
        "qemu-monitor-command",
        &domain,
        r#"{"execute":"query-cpus-fast"}"#,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vcpus = v["return"].as_array().unwrap();
    assert_eq!(vcpus.len(), 1, "{out}");
    let libvirtd = pod.daemon_pid("libvirtd").expect("libvirtd pid");
    let tid = host_tid(libvirtd, vcpus[0]["thread-id"].as_i64().unwrap());
    assert_eq!(cpus_allowed(tid), vcpu_cpu, "vCPU thread {tid}");
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
    let qemu: i64 = field(&status, "Tgid:").parse().unwrap();
    assert_ne!(qemu, tid, "QEMU runs its vCPU in a thread of its own");
    assert_eq!(cpus_allowed(qemu), emu_cpu, "QEMU's emulator thread {qemu}");

    // A migration would carry this pod's pins to another pod: refused, the VM runs on.
    let mut c = pod.client().await;
    let e = c
        .migrate(pb::MigrateRequest {
            target_socket: "/nonexistent/launcher-sock".into(),
            options: Some(pb::MigrationOptions::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("dedicatedCpuPlacement"), "{e:?}");
    assert_eq!(
        cpus_allowed(tid),
        vcpu_cpu,
        "vCPU thread {tid} after the refusal"
    );
    common::stop_cleanly(pod, Duration::from_secs(40)).await;
}
