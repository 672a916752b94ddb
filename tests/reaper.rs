//! The reaper runs in its own test binary: once started it owns `waitpid(-1)` for the whole
//! process, for good, so every test here runs with it (the lib's unit tests run without it).

use std::time::{Duration, Instant};

use virt_launcher::pod::process::{Command, Exit, Reaper};

/// Waits until `pid` is gone (reaped), or fails.
async fn wait_reaped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "orphan {pid} was never reaped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn statuses_reach_their_spawner_and_orphans_are_reaped() {
    Reaper::start().unwrap();
    let a = Command::new("true").spawn().unwrap();
    let b = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
    assert_eq!(b.exited().await.unwrap(), Exit::Code(7));
    assert_eq!(a.exited().await.unwrap(), Exit::Code(0));
    let out = Command::new("sh")
        .args(["-c", "echo out; echo err >&2; exit 3"])
        .output_async()
        .await
        .unwrap();
    assert_eq!(out.exit, Exit::Code(3));
    assert_eq!(
        (&out.stdout[..], &out.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );

    // The shell exits at once; its background sleep is re-parented to us (subreaper).
    let out = Command::new("sh")
        .args(["-c", "sleep 0.2 & echo $!"])
        .run_async()
        .await
        .unwrap();
    let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    wait_reaped(orphan).await;
}

/// What helper `i` does, and the status it must end with.
fn helper(i: usize) -> (Command, Exit) {
    let mut cmd = Command::new("sh");
    match i % 5 {
        // Killed by a signal.
        0 => {
            cmd.args(["-c", "kill -TERM $$"]);
            (cmd, Exit::Signal(15))
        }
        // Leaves an orphan behind, re-parented to us while the others run.
        1 => {
            cmd.args(["-c", "sleep 0.05 & exit 1"]);
            (cmd, Exit::Code(1))
        }
        _ => {
            let code = (i % 251) as i32;
            cmd.args(["-c", &format!("exit {code}")]);
            (cmd, Exit::Code(code))
        }
    }
}

/// Issue 15: helpers waited for by their spawner while the reaper runs. 2 000 of them: 1 000
/// from four plain threads through the blocking API, 1 000 from tasks through the async API,
/// one in five leaving an orphan to be reaped meanwhile. None may fail, every status must be
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_helpers_while_the_reaper_runs() {
    Reaper::start().unwrap();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 250;
    const TASKS: usize = 1000;
    const AT_ONCE: usize = 32;

    let blocking: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for n in 0..PER_THREAD {
                    let i = t * PER_THREAD + n;
                    let (mut cmd, want) = helper(i);
                    // Half run to completion, half are spawned and waited for.
                    let got = if i % 2 == 0 {
                        cmd.output().map(|o| o.exit)
                    } else {
                        cmd.spawn().and_then(|mut c| c.wait())
                    };
                    match got {
                        Ok(exit) if exit == want => {}
                        other => failures.push(format!("blocking helper {i}: {other:?}")),
                    }
                }
                failures
            })
        })
        .collect();

    let mut failures = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in THREADS * PER_THREAD..THREADS * PER_THREAD + TASKS {
        if tasks.len() >= AT_ONCE {
            failures.extend(tasks.join_next().await.unwrap().unwrap());
        }
        tasks.spawn(async move {
            let (mut cmd, want) = helper(i);
            let got = if i % 2 == 0 {
                cmd.output_async().await.map(|o| o.exit)
            } else {
                match cmd.spawn() {
                    Ok(c) => c.exited().await,
                    Err(e) => Err(e),
                }
            };
            match got {
                Ok(exit) if exit == want => None,
                other => Some(format!("async helper {i}: {other:?}")),
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        failures.extend(r.unwrap());
    }
    for t in blocking {
        failures.extend(t.join().unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 2000 helpers failed; first: {}",
        failures.len(),
        failures[0]
    );

    // Every orphan was reaped too: no zombie child is left once the last sleep is over.
    let me = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zombies: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() == Some(&"Z") && f.get(1) == Some(&me.as_str())
            })
            .collect();
        if zombies.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left unreaped: {zombies:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
