//! The guest agent: freeze and thaw the guest's filesystems, with an automatic thaw.

use std::time::Duration;

use super::core::{ControlError, Launcher};
use super::ledger::Report;
use super::state::EventKind;
use crate::libvirt::{self, LibvirtError};

impl Launcher {
    /// Freezes the guest's filesystems; thaws them by itself after `timeout`.
    pub async fn freeze(&self, timeout: Duration) -> Result<i32, ControlError> {
        let name = self.domain_name()?;
        let n = name.clone();
        let frozen = self
            .blocking(move |hv| hv.fs_freeze(&n))
            .await
            .map_err(agent_error)?;
        // The owner counts the freeze and schedules its automatic thaw.
        self.report(Report::Frozen { timeout });
        self.update(|s| set_frozen(s, true));
        self.publish(
            EventKind::Agent,
            &format!(
                "froze {frozen} filesystems; automatic thaw in {}s",
                timeout.as_secs()
            ),
        );
        Ok(frozen)
    }

    /// Thaws the filesystems of a freeze whose automatic thaw is due (the owner checked that
    /// no later freeze or thaw came since).
    pub(crate) async fn auto_thaw(&self) {
        let Ok(name) = self.domain_name() else {
            return;
        };
        match self.blocking(move |hv| hv.fs_thaw(&name)).await {
            Ok(k) => {
                self.update(|s| set_frozen(s, false));
                self.publish(
                    EventKind::Agent,
                    &format!("freeze timed out: thawed {k} filesystems"),
                )
            }
            Err(e) => tracing::error!(error = %e, "automatic thaw failed"),
        }
    }

    pub async fn unfreeze(&self) -> Result<i32, ControlError> {
        let name = self.domain_name()?;
        self.report(Report::Thawing);
        let thawed = self
            .blocking(move |hv| hv.fs_thaw(&name))
            .await
            .map_err(agent_error)?;
        self.update(|s| set_frozen(s, false));
        self.publish(EventKind::Agent, &format!("thawed {thawed} filesystems"));
        Ok(thawed)
    }
}

/// Our freeze state, and the agent's as polled (so that a thaw shows at once, not at the next
/// poll: virt-handler clears the VMI's freeze status on `thawed`).
fn set_frozen(s: &mut super::state::Status, frozen: bool) {
    s.domain.frozen = frozen;
    let said = if frozen { "frozen" } else { "thawed" };
    s.domain
        .guest
        .insert("guest-fsfreeze-status".into(), said.into());
}

fn agent_error(e: ControlError) -> ControlError {
    match e {
        ControlError::Libvirt(LibvirtError::Call { code, message, .. })
            if code == libvirt::VIR_ERR_AGENT_UNRESPONSIVE =>
        {
            ControlError::Precondition(format!("the guest agent is not connected: {message}"))
        }
        ControlError::Libvirt(LibvirtError::Call { code, message, .. })
            if code == libvirt::VIR_ERR_ARGUMENT_UNSUPPORTED
                || code == libvirt::VIR_ERR_OPERATION_UNSUPPORTED
                || code == libvirt::VIR_ERR_OPERATION_INVALID
                || message.contains("agent") =>
        {
            ControlError::Precondition(format!("the guest agent cannot do this: {message}"))
        }
        e => e,
    }
}

/// How the event of a failed guest-agent ping probe begins (an [`EventKind::Agent`] event).
pub const PING_FAILED: &str = "guest agent ping failed";

/// What a command run in the guest (`guest-exec`) ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: i32,
    /// Its standard output, as text (invalid UTF-8 replaced).
    pub stdout: String,
}

impl Launcher {
    /// One guest-agent command: its `return` value. `timeout`: how long the agent may take.
    async fn agent(
        &self,
        command: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, ControlError> {
        let name = self.domain_name()?;
        let text = command.to_string();
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let answer = self
            .blocking(move |hv| hv.agent_command(&name, &text, secs))
            .await
            .map_err(agent_error)?;
        let mut v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| {
            ControlError::Precondition(format!("the guest agent answered no JSON ({e}): {answer}"))
        })?;
        match v.get_mut("return") {
            Some(r) => Ok(r.take()),
            None => Err(ControlError::Precondition(format!(
                "the guest agent answered no return value: {answer}"
            ))),
        }
    }

    /// `guest-ping`: whether the agent answers within `timeout`. As KubeVirt's launcher, a
    /// VM that cannot answer because it is healthy but not running its guest (a migration
    /// under way here, paused by its user or by a migration) passes: a liveness probe must
    /// not have it restarted for that. Paused by an I/O error or a watchdog, it fails.
    pub async fn guest_ping(&self, timeout: Duration) -> Result<(), ControlError> {
        let r = self
            .agent(serde_json::json!({"execute": "guest-ping"}), timeout)
            .await
            .map(|_| ());
        if let Err(e) = &r {
            let s = self.status();
            let paused_healthy = s.state == super::state::State::Paused
                && matches!(s.reason.as_str(), "paused" | "migration" | "postcopy");
            if paused_healthy || self.migration_running() {
                tracing::debug!(error = %e, state = ?s.state, "guest-ping failed on a healthy VM: passes");
                return Ok(());
            }
            // Said on the event log (KubeVirt's front-end makes it a Kubernetes event).
            self.publish(EventKind::Agent, &format!("{PING_FAILED}: {e}"));
        }
        r
    }

    /// Runs `path args` in the guest through the agent (`guest-exec` with its output
    /// captured) and polls `guest-exec-status` until it exits or `timeout` has passed, as
    /// KubeVirt's launcher does for virt-probe: ten polls over the timeout, at least 100 ms
    /// apart. A non-zero exit is an outcome, not an error; not exiting in time is an error.
    pub async fn guest_exec(
        &self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutcome, ControlError> {
        let timeout = timeout.max(Duration::from_secs(1));
        let until = tokio::time::Instant::now() + timeout;
        let started = self
            .agent(
                serde_json::json!({"execute": "guest-exec", "arguments": {
                    "path": path, "arg": args, "capture-output": true}}),
                timeout,
            )
            .await?;
        let pid = started.get("pid").and_then(|p| p.as_i64()).unwrap_or(0);
        if pid <= 0 {
            return Err(ControlError::Precondition(format!(
                "the guest agent returned no valid pid for {path:?}: {started}"
            )));
        }
        let period = (timeout / 10).max(Duration::from_millis(100));
        loop {
            let status = self
                .agent(
                    serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                    timeout,
                )
                .await?;
            if status.get("exited").and_then(|e| e.as_bool()) == Some(true) {
                return exec_outcome(&status);
            }
            if tokio::time::Instant::now() + period > until {
                return Err(ControlError::Precondition(format!(
                    "timed out after {}s waiting for guest pid {pid} of command {path:?} to exit",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(period).await;
        }
    }
}

/// The outcome in an exited `guest-exec-status` answer.
fn exec_outcome(status: &serde_json::Value) -> Result<ExecOutcome, ControlError> {
    use base64::Engine;
    let exit_code = status.get("exitcode").and_then(|c| c.as_i64()).unwrap_or(0) as i32;
    let out = status
        .get("out-data")
        .and_then(|o| o.as_str())
        .unwrap_or("");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(out)
        .map_err(|e| {
            ControlError::Precondition(format!("the guest agent's out-data is not base64: {e}"))
        })?;
    Ok(ExecOutcome {
        exit_code,
        stdout: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// What KubeVirt's launcher polls from the guest agent, and how often at most (its
/// `--qemu-agent-*-interval` defaults): system facts every 120 s, users every 10 s, the
/// filesystems and the agent's version every 300 s, the freeze state every 5 s.
const POLLED: &[(&[&str], Duration)] = &[
    (
        &[
            "guest-get-osinfo",
            "guest-get-host-name",
            "guest-get-timezone",
            "guest-network-get-interfaces",
        ],
        Duration::from_secs(120),
    ),
    (&["guest-get-users"], Duration::from_secs(10)),
    (&["guest-get-fsinfo"], Duration::from_secs(300)),
    (&["guest-info"], Duration::from_secs(300)),
    (&["guest-fsfreeze-status"], Duration::from_secs(5)),
];
/// The first interval of each poll, doubled after each round up to the poll's own
/// (KubeVirt's `pollInitialInterval`): a guest's facts settle in the first minutes.
const POLL_FIRST: Duration = Duration::from_secs(10);
/// How long one polled command may take the agent.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts polling the guest agent unless a poller runs already. The poller asks right away,
/// then at [`POLLED`]'s intervals, and ends when the agent disconnects or the domain goes.
pub(crate) fn start_polling(core: &std::sync::Arc<Launcher>) {
    use std::sync::atomic::Ordering;
    if core.agent_is_quiet() || core.agent_polling.swap(true, Ordering::SeqCst) {
        return;
    }
    let core = core.clone();
    tokio::spawn(async move {
        core.poll_agent().await;
        core.agent_polling.store(false, Ordering::SeqCst);
        // A connect that came while this poller was ending: poll again (not once quiet).
        if should_poll(&core.status.borrow(), core.agent_is_quiet()) {
            start_polling(&core);
        }
    });
}

/// Ends the guest-agent polls for the rest of the launcher's life: the guest is being shut
/// down. A poll round is nine agent commands one after the other, and a guest answering them
/// while it powers off powers off later: SIGTERM half a second after boot, during the first
/// round, took the TCG test guest 297–353 ms from the ACPI button to stopped, against 285–297 ms
/// with no polls. What the polls keep (users, filesystems, OS facts) has no use once the VM is
/// on its way out; a command already sent still gets its answer.
pub(crate) fn quiet_agent(core: &Launcher) {
    core.agent_quiet
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

impl Launcher {
    /// Whether [`quiet_agent`] was called.
    fn agent_is_quiet(&self) -> bool {
        self.agent_quiet.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Whether the agent is there to poll: connected, the guest alive, and not being shut down
/// (`quiet`, see [`quiet_agent`]).
fn should_poll(s: &super::state::Status, quiet: bool) -> bool {
    use super::state::State;
    !quiet
        && s.domain.agent_connected
        && !s.name.is_empty()
        && !matches!(s.state, State::None | State::Shutoff | State::Crashed)
}

impl Launcher {
    async fn poll_agent(&self) {
        tracing::debug!("polling the guest agent");
        let now = tokio::time::Instant::now();
        // Per poll: when it is due next, and its interval then.
        let mut due: Vec<(tokio::time::Instant, Duration)> = POLLED
            .iter()
            .map(|(_, max)| (now, POLL_FIRST.min(*max)))
            .collect();
        let mut status = self.status.clone();
        'polls: loop {
            if !should_poll(&status.borrow(), self.agent_is_quiet()) {
                break;
            }
            let now = tokio::time::Instant::now();
            for (i, (commands, max)) in POLLED.iter().enumerate() {
                if due[i].0 > now {
                    continue;
                }
                for command in *commands {
                    if self.agent_is_quiet() {
                        break 'polls;
                    }
                    self.poll_one(command).await;
                }
                let interval = due[i].1;
                due[i] = (now + interval, (interval * 2).min(*max));
            }
            let next = due.iter().map(|d| d.0).min().unwrap_or(now + POLL_FIRST);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                changed = status.changed() => if changed.is_err() { break },
            }
        }
        tracing::debug!("guest agent polling ended");
    }

    /// Asks the agent `command`; keeps its answer when it changed. An agent without the
    /// command, or one that does not answer, leaves the last answer be (logged at debug).
    async fn poll_one(&self, command: &'static str) {
        match self
            .agent(serde_json::json!({ "execute": command }), POLL_TIMEOUT)
            .await
        {
            Ok(value) => {
                let unchanged = self.status.borrow().domain.guest.get(command) == Some(&value);
                if !unchanged {
                    self.update(move |s| {
                        s.domain.guest.insert(command.to_string(), value);
                    });
                }
            }
            Err(e) => tracing::debug!(command, error = %e, "guest agent poll failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_agent_is_polled_only_while_connected_and_the_guest_alive() {
        use crate::vm::state::{State, Status};
        let mut s = Status {
            name: "ns_vm".into(),
            state: State::Running,
            ..Default::default()
        };
        assert!(!should_poll(&s, false), "not connected");
        s.domain.agent_connected = true;
        assert!(should_poll(&s, false));
        assert!(!should_poll(&s, true), "the guest is being shut down");
        s.state = State::Paused;
        assert!(should_poll(&s, false));
        for gone in [State::Shutoff, State::Crashed, State::None] {
            s.state = gone;
            assert!(!should_poll(&s, false), "{gone:?}");
        }
    }

    #[test]
    fn exec_status_decodes_exit_code_and_output() {
        let o =
            exec_outcome(&json!({"exited": true, "exitcode": 3, "out-data": "aGVsbG8K"})).unwrap();
        assert_eq!(
            o,
            ExecOutcome {
                exit_code: 3,
                stdout: "hello\n".into()
            }
        );
        // No output captured: empty, exit code 0.
        let o = exec_outcome(&json!({"exited": true})).unwrap();
        assert_eq!((o.exit_code, o.stdout.as_str()), (0, ""));
        assert!(exec_outcome(&json!({"exited": true, "out-data": "!!"})).is_err());
    }
}
