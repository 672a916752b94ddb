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
