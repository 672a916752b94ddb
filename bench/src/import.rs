//! Benchmark: a standalone DataVolume import (issue 21 item 7). `virt-launcher-import` (what
//! `virt-launcher run --vm` runs before the VM) fetches a qcow2 image from a loopback HTTP
//! server into a claim, against `curl` + `qemu-img convert` + `sync` doing the same work by
//! hand. Both sides read the same image from the same server; rounds alternate.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};

use crate::*;

/// Serves `data` at every path over HTTP/1.1 on 127.0.0.1 (one thread a connection) until the
/// process ends.
fn serve(data: Arc<Vec<u8>>) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let data = data.clone();
            std::thread::spawn(move || answer(conn, &data));
        }
    });
    Ok(port)
}

fn answer(conn: TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut out = reader.into_inner();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        data.len()
    )?;
    out.write_all(data)?;
    out.flush()
}

/// A raw disk of `mib` MiB: pseudo-random data (incompressible, not sparse) in three quarters,
/// zeros in the last quarter — as qcow2.
fn image(dir: &Path, mib: usize) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in raw[..(mib << 20) * 3 / 4].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let src = dir.join("src.raw");
    let dst = dir.join("src.qcow2");
    fs::write(&src, &raw).context("write the raw image")?;
    drop(raw);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&dst),
    )?;
    let q = fs::read(&dst).context("read the qcow2 image")?;
    fs::remove_file(&src).ok();
    fs::remove_file(&dst).ok();
    Ok(q)
}

/// Runs `cmd` as a known child: the benchmark's orphan reaper leaves it to us (with a plain
/// `Command::output` the reaper could take its exit status first: "No child processes").
fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = run_known(cmd)?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(crate) fn bench_import(ctx: &mut Ctx) -> Result<()> {
    let (mib, rounds) = if ctx.opts.quick { (32, 1) } else { (256, 5) };
    let importer = ctx
        .opts
        .launcher
        .parent()
        .map(|d| d.join("virt-launcher-import"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "virt-launcher-import is not beside {}",
                ctx.opts.launcher.display()
            )
        })?;
    let dir = ctx.fresh_dir("import")?;
    let qcow2 = Arc::new(image(&dir, mib)?);
    let port = serve(qcow2.clone())?;
    let url = format!("http://127.0.0.1:{port}/disk.qcow2");
    let vm = dir.join("vm.yaml");
    fs::write(
        &vm,
        format!(
            "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: bench-import\nspec:\n  dataVolumeTemplates:\n  - metadata:\n      name: disk\n    spec:\n      source:\n        http:\n          url: {url}\n      storage:\n        resources:\n          requests:\n            storage: {mib}Mi\n  template:\n    spec:\n      domain:\n        devices: {{}}\n"
        ),
    )?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        check_interrupt()?;
        let storage = dir.join("storage");
        let by_hand = dir.join("by-hand");
        let _ = fs::remove_dir_all(&storage);
        let _ = fs::remove_dir_all(&by_hand);
        fs::create_dir_all(&by_hand)?;
        let import = |ours: &mut Vec<f64>| -> Result<()> {
            let t = Instant::now();
            run_ok(
                Command::new(&importer)
                    .arg("--vm")
                    .arg(&vm)
                    .arg("--storage-dir")
                    .arg(&storage)
                    .args(["--namespace", "default", "--progress", "log"])
                    .env("RUST_LOG", "warn"),
            )?;
            ours.push(t.elapsed().as_secs_f64());
            let disk = storage.join("claims/default/disk/disk.img");
            if fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) != (mib as u64) << 20 {
                bail!("{} is not {mib} MiB", disk.display());
            }
            Ok(())
        };
        let by_hand_run = |theirs: &mut Vec<f64>| -> Result<()> {
            let t = Instant::now();
            let dl = by_hand.join("download");
            let img = by_hand.join("disk.img");
            run_ok(
                Command::new("curl")
                    .args(["-sS", "--fail", "-o"])
                    .arg(&dl)
                    .arg(&url),
            )?;
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(&dl)
                    .arg(&img),
            )?;
            run_ok(Command::new("sync").arg(&img))?;
            theirs.push(t.elapsed().as_secs_f64());
            Ok(())
        };
        // Alternate which side goes first (page cache, CPU frequency).
        if round % 2 == 0 {
            import(&mut ours)?;
            by_hand_run(&mut theirs)?;
        } else {
            by_hand_run(&mut theirs)?;
            import(&mut ours)?;
        }
        progress(&format!(
            "import {mib} MiB qcow2, round {}: virt-launcher-import {:.2} s, curl + qemu-img {:.2} s",
            round + 1,
            ours[round],
            theirs[round]
        ));
    }
    let _ = fs::remove_dir_all(&dir);
    let med = |v: &[f64]| Stat::of(v).map_or(0.0, |s| s.median);
    let size_mib = qcow2.len() as f64 / (1 << 20) as f64;
    progress(&format!(
        "import throughput: {:.0} MiB/s of qcow2 (virt-launcher-import) vs {:.0} MiB/s (curl + qemu-img convert); ratio {:.2}",
        size_mib / med(&ours),
        size_mib / med(&theirs),
        med(&ours) / med(&theirs)
    ));
    ctx.figure(
        "import.http_qcow2",
        "DataVolume import from a loopback HTTP server (qcow2 to a raw claim)",
        "s",
        &ours,
        "virt-launcher-import: GET (sparse), qemu-img info/check, convert to raw, fsync, claim.json",
        Some((&theirs, "curl -o, qemu-img convert -O raw, sync")),
        Some(Goal::RatioAtMost(1.2)),
    );
    Ok(())
}
