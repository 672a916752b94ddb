//! Bad input to `virt-launcher run`: one clear line naming the file, the volume and what is
//! wrong, a non-zero exit, and no daemon or QEMU left behind (none is started).

mod common;

use common::{run_launcher, run_launcher_env, Pod};

/// Runs the launcher on `pod`'s VMI file and returns its last stderr line, asserting a
/// failed exit with one clear line and no process left.
fn fails(pod: &Pod) -> String {
    fails_with_runtime(pod, &pod.runtime_dir())
}

fn fails_with_runtime(pod: &Pod, runtime: &std::path::Path) -> String {
    fails_with(pod, runtime, &[], &[])
}

/// [`fails`] with extra arguments and environment variables.
fn fails_with(
    pod: &Pod,
    runtime: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> String {
    let vmi = pod.vmi_path();
    let pvcs = pod.pvcs_dir();
    let guest = common::guest_dir();
    let mut args = vec![
        "run",
        "--vmi",
        vmi.to_str().unwrap(),
        "--domain-type",
        "qemu",
        "--runtime-dir",
        runtime.to_str().unwrap(),
        "--volumes-dir",
        pvcs.to_str().unwrap(),
        "--kernel-boot-dir",
        guest.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (status, stderr) = run_launcher_env(&args, env);
    assert!(!status.success(), "launcher succeeded on bad input");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("virt-launcher: "),
        "no one-line error at the end of stderr:\n{stderr}"
    );
    assert!(
        pod.leftover_processes().is_empty(),
        "processes left: {:?}",
        pod.leftover_processes()
    );
    last
}

#[test]
fn missing_spec_file_is_named() {
    let pod = Pod::new("nofile");
    let line = fails(&pod);
    assert!(
        line.contains(&pod.vmi_path().display().to_string()),
        "{line}"
    );
}

#[test]
fn malformed_spec_names_the_file() {
    let pod = Pod::new("malformed");
    std::fs::write(
        pod.vmi_path(),
        "apiVersion: kubevirt.io/v1\nkind: [unclosed\n",
    )
    .unwrap();
    let line = fails(&pod);
    assert!(line.contains("vmi.yaml"), "{line}");
}

#[test]
fn unknown_kind_is_named() {
    let pod = Pod::new("kind");
    std::fs::write(
        pod.vmi_path(),
        "apiVersion: kubevirt.io/v1\nkind: Pod\nmetadata:\n  name: x\nspec: {}\n",
    )
    .unwrap();
    let line = fails(&pod);
    assert!(line.contains("Pod"), "{line}");
}

#[test]
fn unknown_api_version_is_named() {
    let pod = Pod::new("apiversion");
    std::fs::write(
        pod.vmi_path(),
        "apiVersion: kubevirt.io/v9\nkind: VirtualMachineInstance\nmetadata:\n  name: x\nspec: {}\n",
    )
    .unwrap();
    let line = fails(&pod);
    assert!(line.contains("kubevirt.io/v9"), "{line}");
}

#[test]
fn missing_disk_image_names_volume_and_path() {
    let pod = Pod::new("nodisk").with_disk("rootdisk", "virtio", 16);
    pod.prepare();
    std::fs::remove_file(pod.disk_image("rootdisk")).unwrap();
    let line = fails(&pod);
    assert!(line.contains("rootdisk"), "volume not named: {line}");
    assert!(line.contains("disk.img"), "path not named: {line}");
}

#[test]
fn missing_pvc_directory_names_volume() {
    let pod = Pod::new("nodir").with_disk("rootdisk", "virtio", 16);
    pod.prepare();
    std::fs::remove_dir_all(pod.pvcs_dir().join("rootdisk")).unwrap();
    let line = fails(&pod);
    assert!(line.contains("rootdisk"), "volume not named: {line}");
}

#[test]
fn unwritable_runtime_dir_is_named_and_nothing_starts() {
    let pod = Pod::new("rtdir").with_disk("data", "virtio", 16);
    pod.prepare();
    // A runtime directory below a regular file cannot be created.
    let blocker = pod.dir.join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let line = fails_with_runtime(&pod, &blocker.join("runtime"));
    assert!(
        line.contains("runtime directory") && line.contains("not-a-dir"),
        "{line}"
    );
}

/// A manifest over 4 MiB (a KubeVirt object is at most ~1.5 MiB) is refused before it is
/// parsed: one line naming the file and the limit, nothing started, no runtime directory.
#[test]
fn a_manifest_over_4_mib_is_refused_before_parsing() {
    let pod = Pod::new("huge").with_disk("data", "virtio", 16);
    pod.prepare();
    let mut yaml = std::fs::read_to_string(pod.vmi_path()).unwrap();
    yaml = yaml.replacen(
        "metadata:\n",
        &format!(
            "metadata:\n  annotations:\n    pad: \"{}\"\n",
            "x".repeat(5 << 20)
        ),
        1,
    );
    std::fs::write(pod.vmi_path(), &yaml).unwrap();
    let line = fails(&pod);
    assert!(
        line.contains(&pod.vmi_path().display().to_string())
            && line.contains(&format!("{} bytes", yaml.len()))
            && line.contains("at most 4194304 bytes"),
        "{line}"
    );
    assert!(!pod.runtime_dir().exists(), "a runtime directory was made");
}

/// The VMI of `pod` with one interface of `binding` on the pod network.
fn with_pod_interface(pod: &Pod, binding: &str) {
    let yaml = pod
        .vmi_yaml()
        .replacen(
            "    devices:\n",
            &format!(
                "    devices:\n      interfaces:\n      - name: default\n        {binding}: {{}}\n"
            ),
            1,
        )
        .replacen(
            "  volumes:\n",
            "  networks:\n  - name: default\n    pod: {}\n  volumes:\n",
            1,
        );
    std::fs::write(pod.vmi_path(), yaml).unwrap();
}

#[test]
fn standalone_bridge_binding_without_a_host_bridge_names_the_interface() {
    let pod = Pod::new("nobridge").with_disk("data", "virtio", 16);
    pod.prepare();
    with_pod_interface(&pod, "bridge");
    let line = fails(&pod);
    assert!(
        line.contains("spec.domain.devices.interfaces[0].bridge") && line.contains("--host-bridge"),
        "{line}"
    );
}

#[test]
fn standalone_bridge_binding_on_a_host_bridge_that_is_not_one_names_it() {
    let pod = Pod::new("notbridge").with_disk("data", "virtio", 16);
    pod.prepare();
    with_pod_interface(&pod, "bridge");
    let line = fails_with(&pod, &pod.runtime_dir(), &["--host-bridge", "lo"], &[]);
    assert!(
        line.contains("interface default") && line.contains("--host-bridge lo is not a bridge"),
        "{line}"
    );
}

/// A directory with a link to every program of the test's `PATH` except `passt`: the
/// launcher's `PATH` without passt, everything else as it was.
fn path_without_passt(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("passt") {
                continue;
            }
            // The first directory of PATH wins, as in a lookup.
            let _ = std::os::unix::fs::symlink(e.path(), dir.join(&name));
        }
    }
    dir.display().to_string()
}

/// passt missing (standalone masquerade and passtBinding need it): one line naming the
/// interface and what to install; the daemons the launcher had started are gone, no VM runs.
#[test]
fn standalone_network_without_passt_names_the_interface_and_what_to_install() {
    for binding in ["masquerade", "passtBinding"] {
        let pod = Pod::new("nopasst").with_disk("data", "virtio", 16);
        pod.prepare();
        with_pod_interface(&pod, binding);
        let bin = pod.runtime_dir().with_extension("bin");
        let path = path_without_passt(&bin);
        let line = fails_with(&pod, &pod.runtime_dir(), &[], &[("PATH", &path)]);
        let _ = std::fs::remove_dir_all(&bin);
        eprintln!("{binding}: {line}");
        assert!(
            line.contains("interface default")
                && line.contains("passt")
                && line.contains("apt-get install passt"),
            "{binding}: {line}"
        );
    }
}

#[test]
fn bad_publish_flag_is_named() {
    let (status, stderr) = run_launcher(&["run", "--publish", "80:70000", "--vmi", "/nonexistent"]);
    assert!(!status.success());
    assert!(
        stderr.contains("--publish") && stderr.contains("70000"),
        "{stderr}"
    );
}

/// A typo in a field name (`sokets`) is refused as kubectl's strict field validation refuses
/// it: one line naming the field as written and what was meant; nothing started, no runtime
/// directory. `--allow-unknown-fields` lets it through with a warning naming it (the run then
/// stops at the next problem, a missing claim, so no VM boots here).
#[test]
fn a_typo_in_a_field_is_refused_with_a_suggestion_unless_allowed() {
    let pod = Pod::new("typo").with_disk("data", "virtio", 16);
    pod.prepare();
    let yaml = pod
        .vmi_yaml()
        .replacen("  domain:\n", "  domain:\n    cpu:\n      sokets: 2\n", 1);
    std::fs::write(pod.vmi_path(), &yaml).unwrap();
    let line = fails(&pod);
    assert_eq!(
        line,
        format!(
            "virt-launcher: {}: field spec.domain.cpu.sokets: unknown field (KubeVirt has no \
             such field): did you mean \"sockets\"?; --allow-unknown-fields runs it anyway (a \
             warning per unknown field)",
            pod.vmi_path().display()
        )
    );
    assert!(!pod.runtime_dir().exists(), "a runtime directory was made");

    std::fs::remove_dir_all(pod.pvcs_dir().join("data")).unwrap();
    let (status, stderr) = run_launcher(&[
        "run",
        "--allow-unknown-fields",
        "--vmi",
        pod.vmi_path().to_str().unwrap(),
        "--domain-type",
        "qemu",
        "--runtime-dir",
        pod.runtime_dir().to_str().unwrap(),
        "--volumes-dir",
        pod.pvcs_dir().to_str().unwrap(),
    ]);
    assert!(!status.success());
    let warned = stderr
        .lines()
        .any(|l| l.contains("spec.domain.cpu.sokets") && l.contains("WARN"));
    let last = stderr.lines().last().unwrap_or_default();
    assert!(warned && last.contains("data"), "{stderr}");
    assert!(pod.leftover_processes().is_empty());
}

/// A KubeVirt field the launcher does not implement is refused by name, not dropped.
#[test]
fn a_kubevirt_field_not_implemented_is_refused_by_name() {
    let pod = Pod::new("unsupported").with_disk("data", "virtio", 16);
    pod.prepare();
    let yaml = pod.vmi_yaml().replacen(
        "    devices:\n",
        "    devices:\n      panicDevices:\n      - {model: isa}\n",
        1,
    );
    std::fs::write(pod.vmi_path(), &yaml).unwrap();
    let line = fails(&pod);
    assert!(
        line.ends_with(
            "field spec.domain.devices.panicDevices: a KubeVirt field this launcher does not \
             support: remove it to run the VM without it"
        ),
        "{line}"
    );
    assert!(!pod.runtime_dir().exists(), "a runtime directory was made");
}

/// 300 disks do not fit a q35 machine's PCIe topology (measured: 229 virtio disks beside the
/// default controllers and balloon): the first disk that does not fit is named, before any
/// daemon starts.
#[test]
fn too_many_disks_for_the_pcie_topology_name_the_disk_that_does_not_fit() {
    let pod = Pod::new("manydisks");
    let disks: String = (0..300)
        .map(|i| format!("      - name: d{i}\n        disk: {{bus: virtio}}\n"))
        .collect();
    let volumes: String = (0..300)
        .map(|i| format!("  - name: d{i}\n    emptyDisk: {{capacity: 1Mi}}\n"))
        .collect();
    std::fs::write(
        pod.vmi_path(),
        format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {{name: {}}}\n\
             spec:\n  domain:\n    resources: {{requests: {{memory: 64Mi}}}}\n    devices:\n      \
             disks:\n{disks}  volumes:\n{volumes}",
            pod.name
        ),
    )
    .unwrap();
    let line = fails(&pod);
    assert!(
        line.contains("spec.domain.devices.disks[229]: disk \"d229\" does not fit the q35 machine's PCIe topology"),
        "{line}"
    );
    assert!(!pod.runtime_dir().exists(), "a runtime directory was made");
}
