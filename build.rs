//! Compiles `proto/` into Rust with protox (pure Rust: no `protoc` needed).

const PROTOS: &[&str] = &[
    "proto/launcher/v1/launcher.proto",
    "proto/kubevirt/notify/v1/notify.proto",
    "proto/kubevirt/notify/info/info.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
