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
        self.update(|s| s.domain.frozen = true);
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
                self.update(|s| s.domain.frozen = false);
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
        self.update(|s| s.domain.frozen = false);
        self.publish(EventKind::Agent, &format!("thawed {thawed} filesystems"));
        Ok(thawed)
    }
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

    /// `guest-ping`: whether the agent answers within `timeout`.
    pub async fn guest_ping(&self, timeout: Duration) -> Result<(), ControlError> {
        self.agent(serde_json::json!({"execute": "guest-ping"}), timeout)
            .await
            .map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
