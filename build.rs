//! Compiles `proto/` into Rust with protox (pure Rust: no `protoc` needed): our own
//! launcher.v1, and KubeVirt's protocols that virt-handler speaks (kubevirt.cmd.*, served;
//! kubevirt.notify.*, called).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ours = ["proto/launcher/v1/launcher.proto"];
    let kubevirt = [
        "proto/kubevirt/cmd/info/info.proto",
        "proto/kubevirt/cmd/auth/auth.proto",
        "proto/kubevirt/cmd/v1/cmd.proto",
        "proto/kubevirt/notify/v1/notify.proto",
        "proto/kubevirt/notify/info/info.proto",
    ];
    for p in ours.iter().chain(&kubevirt) {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_fds(protox::compile(ours, ["proto"])?)?;
    // KubeVirt's cmd protocol has more RPCs than the launcher serves: the ones it does not
    // implement answer UNIMPLEMENTED.
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .compile_fds(protox::compile(kubevirt, ["proto"])?)?;
    Ok(())
}
