//! Conversion benchmark (std::time only). Prints a Markdown table of the time to convert a VMI
//! with 1, 13, 64 and 256 disks (and to serialise it to XML); `--json <file>` also writes the
//! figures as JSON. Goal: a 13-disk VMI converts in well under 1 ms. Not a pass/fail test.
//! The same measurement as the launcher benchmark's conversion figures, on its own.
//!
//! `cargo bench --bench convert [-- --json out.json]`

use launcher_bench::Conversion;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut rows = Vec::new();
    println!("| disks | convert (µs) | convert + to_xml (µs) | XML bytes |");
    println!("| ---: | ---: | ---: | ---: |");
    for n in launcher_bench::CONVERSION_DISKS {
        let row = match Conversion::measure(n, false) {
            Ok(c) => c.row(),
            Err(e) => {
                eprintln!("convert: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!(
            "| {n} | {:.1} | {:.1} | {} |",
            row.convert_us, row.convert_and_xml_us, row.xml_bytes
        );
        rows.push(row);
    }
    if let Some(path) = json_out {
        let text = serde_json::to_string_pretty(&rows).expect("json");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write {path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
