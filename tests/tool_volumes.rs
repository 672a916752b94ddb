//! VMs whose start runs external tools (`xorrisofs` for a cloud-init NoCloud ISO, `qemu-img`
//! for an emptyDisk and for the qcow2 overlay of an ephemeral volume, the containerDisk code
//! path) start every time: these tools run while the launcher's reaper owns `waitpid(-1)`, and
//! each start must get its tool's exit status (issue 15: they used to fail now and then with
//! "No child processes").

mod common;

use std::time::{Duration, Instant};

use common::Pod;
use nix::sys::signal::Signal;

const STARTS: usize = 30;

/// A VMI with a cloud-init NoCloud disk, an emptyDisk and an ephemeral (qcow2 overlay over a
/// PVC) disk; grace 0 so that SIGTERM destroys it at once.
fn vmi_yaml(pod: &Pod) -> String {
    format!(
        r##"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: {name}
  namespace: default
  uid: {uid}
spec:
  terminationGracePeriodSeconds: 0
  domain:
    resources:
      requests:
        memory: 128Mi
    firmware:
      kernelBoot:
        kernelArgs: "console=ttyS0 quiet"
        container:
          image: test-guest
          kernelPath: /vmlinuz
          initrdPath: /initramfs.gz
    devices:
      disks:
        - name: root
          disk:
            bus: virtio
        - name: scratch
          disk:
            bus: virtio
        - name: ci
          disk:
            bus: virtio
  volumes:
    - name: root
      ephemeral:
        persistentVolumeClaim:
          claimName: root
    - name: scratch
      emptyDisk:
        capacity: 16Mi
    - name: ci
      cloudInitNoCloud:
        userData: "#cloud-config\n"
"##,
        name = pod.name,
        uid = pod.uid(),
    )
}

/// Starts a fresh pod (so every tool runs again) and waits for the domain to run; `Err` with
/// the launcher's log when the launcher exits first.
fn start_once(i: usize) -> Result<Pod, String> {
    let mut pod = Pod::new(&format!("tools-{i}")).with_disk("root", "virtio", 16);
    pod.prepare();
    std::fs::write(pod.vmi_path(), vmi_yaml(&pod)).unwrap();
    pod.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if pod.log().contains("\"message\":\"domain running\"") {
            return Ok(pod);
        }
        if let Some(status) = pod.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            let log = pod.log();
            let _ = std::fs::remove_dir_all(&pod.dir);
            return Err(format!("start {i}: launcher exited ({status}):\n{log}"));
        }
        assert!(
            Instant::now() < deadline,
            "start {i}: domain not running within 60 s\n{}",
            pod.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vms_whose_start_runs_tools_start_every_time() {
    common::guest_dir();
    let t = Instant::now();
    let mut failures = Vec::new();
    let (mut starting, mut stopping) = (Duration::ZERO, Duration::ZERO);
    for i in 0..STARTS {
        let t = Instant::now();
        match start_once(i) {
            Ok(mut pod) => {
                starting += t.elapsed();
                let t = Instant::now();
                // The ISO, the empty disk and the overlay exist: the tools did run.
                let runtime = pod.runtime_dir();
                for f in [
                    // KubeVirt's place: <ephemeral>/cloud-init-data/<namespace>/<name>/.
                    runtime
                        .join("ephemeral/cloud-init-data/default")
                        .join(&pod.name)
                        .join("noCloud.iso"),
                    runtime.join("ephemeral/empty-disks/scratch.qcow2"),
                    runtime.join("ephemeral/disk-data/root/disk.qcow2"),
                ] {
                    assert!(f.is_file(), "{} missing\n{}", f.display(), pod.dump());
                }
                pod.signal(Signal::SIGTERM);
                let status = pod.wait_exit(Duration::from_secs(30));
                stopping += t.elapsed();
                assert!(status.success(), "exit {status}\n{}", pod.dump());
                let left = pod.leftover_processes();
                assert!(left.is_empty(), "processes left behind: {left:#?}");
                let _ = std::fs::remove_dir_all(&pod.dir);
            }
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{STARTS} starts in {:?} (to running {starting:?}, stopping {stopping:?}), {} failed",
        t.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {STARTS} starts failed; the first:\n{}",
        failures.len(),
        failures[0]
    );
}
