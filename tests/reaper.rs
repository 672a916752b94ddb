//! The reaper runs in its own test binary: it owns `waitpid(-1)` for the whole process, which
//! would race with any other test that waits for its own children, so it is one test too.

use std::process::Command;

use virt_launcher::pod::process::{Exit, Reaper};

#[tokio::test]
async fn statuses_reach_their_spawner_and_orphans_are_reaped() {
    let reaper = Reaper::start().unwrap();
    let mut ok = Command::new("true");
    let mut bad = Command::new("sh");
    bad.args(["-c", "exit 7"]);
    let a = reaper.spawn(&mut ok).unwrap();
    let b = reaper.spawn(&mut bad).unwrap();
    assert_eq!(b.exit.await.unwrap(), Exit::Code(7));
    assert_eq!(a.exit.await.unwrap(), Exit::Code(0));
    let (exit, text) = reaper
        .output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(exit, Exit::Code(3));
    assert!(text.contains("out") && text.contains("err"), "{text}");

    // The shell exits at once; its background sleep is re-parented to us (subreaper).
    let (exit, text) = reaper
        .output(Command::new("sh").args(["-c", "sleep 0.2 & echo $!"]))
        .await
        .unwrap();
    assert!(exit.success());
    let orphan: i32 = text.trim().parse().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "orphan {orphan} was never reaped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
