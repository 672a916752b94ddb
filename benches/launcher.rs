//! `cargo bench --bench launcher -- --help`: the launcher benchmark (the `launcher-bench` crate
//! in `bench/`), run on the launcher binary cargo built for it unless `--launcher` names another.

fn main() -> std::process::ExitCode {
    launcher_bench::main(std::path::Path::new(env!("CARGO_BIN_EXE_virt-launcher")))
}
