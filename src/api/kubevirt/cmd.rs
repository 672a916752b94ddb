//! `kubevirt.cmd.v1.Cmd`: virt-handler's calls, as KubeVirt's own launcher answers them
//! (`pkg/virt-launcher/virtwrap/cmd-server/server.go`): failures in-band
//! (`Response{success: false, message}`, gRPC OK), `success: true` always set on success.
//! Thin: decode, one command to the core, map the answer. RPCs not implemented here answer
//! UNIMPLEMENTED (the generated trait's default).

use std::time::Duration;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::migration::{HandlerProxies, MigrationState};
use super::options::MigrationOptions;
use super::pb::cmd::v1 as pb;
use super::pb::cmd::v1::cmd_server::Cmd;
use super::{domain, guest};
use crate::api::{deadline, decode_vmi};
use crate::spec::{HandlerOptions, Smbios, VirtualMachineInstance};
use crate::vm::{Command, ControlError, Handle, Reply, FREEZE_TIMEOUT};

/// The cmd service: one per launcher, beside launcher.v1.
pub struct CmdService {
    core: Handle,
    /// The Sync options not acted on were said once (a warning), then at debug level: the
    /// handler sends the same options with every Sync.
    ignored_said: std::sync::atomic::AtomicBool,
}

impl CmdService {
    pub fn new(core: Handle) -> Self {
        CmdService {
            core,
            ignored_said: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends `cmd` to the core within the caller's deadline (the core carries on with it).
    async fn send<R>(&self, req: &Request<R>, cmd: Command) -> Result<Reply, ControlError> {
        let name = cmd.name();
        let answer = match deadline(req) {
            Some(d) => tokio::time::timeout(d, self.core.send(cmd))
                .await
                .unwrap_or_else(|_| {
                    Err(ControlError::Precondition(format!(
                        "{name}: the caller's deadline of {d:?} passed; it goes on"
                    )))
                }),
            None => self.core.send(cmd).await,
        };
        if let Err(e) = &answer {
            tracing::debug!(command = name, error = %e, "cmd call failed");
        }
        answer
    }

    /// Sends `cmd`; "no domain" counts as done (Kill, Shutdown, Delete: nothing to do is no
    /// error).
    async fn send_idempotent<R>(&self, req: &Request<R>, cmd: Command) -> pb::Response {
        match self.send(req, cmd).await {
            // The core has ended (the pod is going away after its domain stopped): there is
            // nothing left to shut down, kill or delete. The handler's Delete after the final
            // event lands here.
            Ok(_) | Err(ControlError::NoDomain) | Err(ControlError::Stopping) => ok(),
            Err(e) => failed(e.to_string()),
        }
    }

    /// A call carrying a VMI: refused in-band when it is another VMI's (the running one's uid
    /// differs), else `cmd`'s answer.
    async fn for_this_vmi<R>(
        &self,
        req: &Request<R>,
        vmi: Option<&pb::Vmi>,
        cmd: Command,
        how: How,
    ) -> Result<Response<pb::Response>, Status> {
        if let Err(m) = same_vmi(&self.core, vmi) {
            return Ok(Response::new(failed(m)));
        }
        Ok(Response::new(match how {
            How::Plain => self.simple(req, cmd).await,
            How::Idempotent => self.send_idempotent(req, cmd).await,
        }))
    }

    async fn simple<R>(&self, req: &Request<R>, cmd: Command) -> pb::Response {
        match self.send(req, cmd).await {
            Ok(_) => ok(),
            Err(e) => failed(e.to_string()),
        }
    }
}

impl CmdService {
    /// A probe names the domain (`<namespace>_<name>`); libvirt's lookup of another name
    /// fails, and so does ours. Empty: this launcher's one domain.
    fn this_domain(&self, name: &str) -> Result<(), Status> {
        let ours = self.core.status().name;
        if name.is_empty() || name == ours {
            Ok(())
        } else {
            Err(Status::unknown(format!(
                "no domain named {name:?} (this launcher runs {ours:?})"
            )))
        }
    }
}

/// A probe's timeout: its seconds, at least one (virt-probe's default).
fn probe_timeout(seconds: i32) -> Duration {
    Duration::from_secs(seconds.max(1) as u64)
}

/// How a command's failure is answered.
enum How {
    /// As it is.
    Plain,
    /// "Nothing to do" (no domain, the core has ended) is success.
    Idempotent,
}

/// Success, said explicitly (proto3's default is `false`, which older handlers read as failure).
fn ok() -> pb::Response {
    pb::Response {
        success: true,
        message: String::new(),
    }
}

fn failed(message: impl Into<String>) -> pb::Response {
    let mut message = message.into();
    if message.is_empty() {
        message = "failed".into();
    }
    pb::Response {
        success: false,
        message,
    }
}

/// The VMI of a request; the error names the field.
fn vmi_of(vmi: Option<&pb::Vmi>, field: &str) -> Result<VirtualMachineInstance, String> {
    let json_field = format!("{field}.vmiJson");
    let Some(v) = vmi.filter(|v| !v.vmi_json.is_empty()) else {
        return Err(format!("{json_field}: required"));
    };
    decode_vmi(&v.vmi_json, &json_field).map_err(|s| s.message().to_string())
}

/// Checks what the launcher reads of the handler's options; the error names the field.
/// (The rest is accepted as it is: see [`options_used`].)
fn check_options(o: Option<&pb::VirtualMachineOptions>) -> Result<(), String> {
    let Some(o) = o else { return Ok(()) };
    if !o.plugins_json.is_empty() {
        let v: serde_json::Value = serde_json::from_slice(&o.plugins_json)
            .map_err(|e| format!("VMIRequest.options.pluginsJson: not valid JSON: {e}"))?;
        if !v.is_array() && !v.is_null() {
            return Err("VMIRequest.options.pluginsJson: a JSON list of plugins expected".into());
        }
    }
    Ok(())
}

/// What the converter honours of the handler's options (KubeVirt's converter reads the same:
/// the cluster's SMBIOS, the balloon's statistics period, two clusterConfig flags).
fn handler_options(o: &pb::VirtualMachineOptions) -> HandlerOptions {
    let cc = o.cluster_config.as_ref();
    HandlerOptions {
        smbios: o.virtual_machine_sm_bios.as_ref().map(|s| Smbios {
            manufacturer: s.manufacturer.clone(),
            product: s.product.clone(),
            version: s.version.clone(),
            sku: s.sku.clone(),
            family: s.family.clone(),
        }),
        mem_balloon_stats_period: o.mem_balloon_stats_period,
        free_page_reporting_disabled: cc.is_some_and(|c| c.free_page_reporting_disabled),
        serial_console_log_disabled: cc.is_some_and(|c| c.serial_console_log_disabled),
        bochs_display_for_efi_guests: cc.is_some_and(|c| c.bochs_display_for_efi_guests),
    }
}

/// The handler's options the launcher does not act on, for the log.
fn options_ignored(o: Option<&pb::VirtualMachineOptions>) -> Vec<String> {
    let Some(o) = o else { return Vec::new() };
    let mut ignored = Vec::new();
    // SMBios, MemBalloonStatsPeriod and clusterConfig's FreePageReportingDisabled,
    // SerialConsoleLogDisabled and BochsDisplayForEFIGuests go to the converter (handler_options). PreallocatedVolumes is
    // honoured through the VMI itself: the handler derives it from
    // volumeStatus[].persistentVolumeClaimInfo.preallocated, which the converter reads.
    if let Some(c) = &o.cluster_config {
        for (on, name) in [
            (
                c.pcinuma_aware_topology_enabled,
                "PCINUMAAwareTopologyEnabled",
            ),
            (c.vgpu_live_migration_enabled, "VGPULiveMigrationEnabled"),
            (
                c.grace_io_virtualization_enabled,
                "GraceIOVirtualizationEnabled",
            ),
        ] {
            if on {
                ignored.push(format!("clusterConfig.{name}"));
            }
        }
    }
    if o.topology.is_some() {
        ignored.push("topology".to_string());
    }
    if !o.interface_domain_attachment.is_empty() {
        ignored.push("interfaceDomainAttachment".to_string());
    }
    if !o.plugins_json.is_empty() {
        ignored.push("pluginsJson".to_string());
    }
    ignored
}

/// The request's VMI, which must be the one this launcher runs (if it runs one).
fn same_vmi(core: &Handle, vmi: Option<&pb::Vmi>) -> Result<(), String> {
    let vmi = vmi_of(vmi, "VMIRequest.vmi")?;
    let running = core.status();
    let given = vmi.metadata.uid.unwrap_or_default();
    if !running.uid.is_empty() && running.uid != given {
        return Err(ControlError::WrongUid {
            running: running.uid,
            given,
        }
        .to_string());
    }
    Ok(())
}

/// KubeVirt's `stats.DomainStats` JSON (Go field names, `…Set` flags) of what we measure.
fn domain_stats_json(name: &str, uid: &str, s: &crate::libvirt::DomainStats) -> String {
    let blocks: Vec<_> = s
        .disks
        .iter()
        .map(|b| {
            json!({
                "NameSet": true, "Name": b.target,
                "RdReqsSet": true, "RdReqs": b.read_requests.max(0),
                "RdBytesSet": true, "RdBytes": b.read_bytes.max(0),
                "WrReqsSet": true, "WrReqs": b.write_requests.max(0),
                "WrBytesSet": true, "WrBytes": b.write_bytes.max(0),
                "ErrorsSet": true, "Errors": b.errors.max(0),
            })
        })
        .collect();
    json!({
        "Name": name,
        "UUID": uid,
        "Cpu": {"TimeSet": true, "Time": s.cpu_time_ns},
        "Memory": {
            "ActualBalloonSet": s.balloon_actual_kib > 0, "ActualBalloon": s.balloon_actual_kib,
            "UnusedSet": s.balloon_unused_kib > 0, "Unused": s.balloon_unused_kib,
            "AvailableSet": s.balloon_available_kib > 0, "Available": s.balloon_available_kib,
            "RSSSet": s.rss_kib > 0, "RSS": s.rss_kib,
        },
        "Block": blocks,
    })
    .to_string()
}

#[tonic::async_trait]
impl Cmd for CmdService {
    async fn sync_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        let r = req.get_ref();
        let mut vmi = match vmi_of(r.vmi.as_ref(), "VMIRequest.vmi")
            .and_then(|v| check_options(r.options.as_ref()).map(|()| v))
        {
            Ok(v) => v,
            Err(m) => return Ok(Response::new(failed(m))),
        };
        vmi.handler_options = r.options.as_ref().map(handler_options);
        let ignored = options_ignored(r.options.as_ref());
        if !ignored.is_empty() {
            if self
                .ignored_said
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::debug!(?ignored, "Sync options not acted on");
            } else {
                tracing::warn!(?ignored, "Sync options not acted on (said once)");
            }
        }
        Ok(Response::new(
            self.simple(&req, Command::HandlerSync(vmi)).await,
        ))
    }

    /// CPU hot-plug (KubeVirt's `UpdateVCPUs`): the vCPUs of the VMI's sockets online.
    async fn sync_virtual_machine_cp_us(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        let vmi = match vmi_of(req.get_ref().vmi.as_ref(), "VMIRequest.vmi") {
            Ok(v) => v,
            Err(m) => return Ok(Response::new(failed(m))),
        };
        Ok(Response::new(
            self.simple(&req, Command::HandlerSyncVcpus(vmi)).await,
        ))
    }

    async fn shutdown_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::AcpiShutdown,
            How::Idempotent,
        )
        .await
    }

    async fn kill_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::Kill,
            How::Idempotent,
        )
        .await
    }

    async fn delete_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::Delete,
            How::Idempotent,
        )
        .await
    }

    async fn pause_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(&req, req.get_ref().vmi.as_ref(), Command::Pause, How::Plain)
            .await
    }

    async fn unpause_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::Unpause,
            How::Plain,
        )
        .await
    }

    async fn soft_reboot_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::Reboot,
            How::Plain,
        )
        .await
    }

    async fn reset_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(&req, req.get_ref().vmi.as_ref(), Command::Reset, How::Plain)
            .await
    }

    async fn freeze_virtual_machine(
        &self,
        req: Request<pb::FreezeRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        if let Err(m) = same_vmi(&self.core, req.get_ref().vmi.as_ref()) {
            return Ok(Response::new(failed(m)));
        }
        let timeout = match req.get_ref().unfreeze_timeout_seconds {
            s if s > 0 => Duration::from_secs(s as u64),
            _ => FREEZE_TIMEOUT,
        };
        Ok(Response::new(
            self.simple(&req, Command::Freeze { timeout }).await,
        ))
    }

    async fn unfreeze_virtual_machine(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        self.for_this_vmi(
            &req,
            req.get_ref().vmi.as_ref(),
            Command::Unfreeze,
            How::Plain,
        )
        .await
    }

    async fn get_domain(
        &self,
        _req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::DomainResponse>, Status> {
        // The api.Domain JSON, as the notify events carry it; "" when there is no domain
        // (none yet, or deleted).
        let status = self.core.status();
        let vmi = self.core.vmi.borrow().clone();
        let domain = match vmi {
            Some(vmi) if !status.deleted => domain::render(&status, &vmi)
                .map(|d| String::from_utf8_lossy(&domain::to_json(&d)).into_owned())
                .unwrap_or_default(),
            _ => String::new(),
        };
        Ok(Response::new(pb::DomainResponse {
            response: Some(ok()),
            domain,
        }))
    }

    async fn get_domain_stats(
        &self,
        req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::DomainStatsResponse>, Status> {
        let (response, domain_stats) = match self.send(&req, Command::Stats).await {
            Ok(Reply::Stats { stats, .. }) => {
                let s = self.core.status();
                (ok(), domain_stats_json(&s.name, &s.uid, &stats))
            }
            Ok(r) => (failed(format!("unexpected reply {r:?}")), String::new()),
            Err(e) => (failed(e.to_string()), String::new()),
        };
        Ok(Response::new(pb::DomainStatsResponse {
            response: Some(response),
            domain_stats,
        }))
    }

    async fn get_qemu_version(
        &self,
        req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::QemuVersionResponse>, Status> {
        let (response, version) = match self.send(&req, Command::Versions).await {
            Ok(Reply::Versions { qemu, .. }) => (ok(), qemu),
            Ok(r) => (failed(format!("unexpected reply {r:?}")), String::new()),
            Err(e) => (failed(e.to_string()), String::new()),
        };
        Ok(Response::new(pb::QemuVersionResponse {
            response: Some(response),
            version,
        }))
    }

    /// The guest agent's facts as last polled (KubeVirt's launcher answers from its poller's
    /// cache too); empty fields before the agent has answered.
    async fn get_guest_info(
        &self,
        _req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::GuestInfoResponse>, Status> {
        let facts = self.core.status().domain;
        Ok(Response::new(pb::GuestInfoResponse {
            response: Some(ok()),
            guest_info_response: guest::guest_info(&facts).to_string(),
        }))
    }

    /// The guest's logged-in users, as last polled (`[]` before the agent answered).
    async fn get_users(
        &self,
        _req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::GuestUserListResponse>, Status> {
        let facts = self.core.status().domain;
        Ok(Response::new(pb::GuestUserListResponse {
            response: Some(ok()),
            guest_user_list_response: json!(guest::users(&facts.guest, usize::MAX)).to_string(),
        }))
    }

    /// The guest's mounted filesystems, as last polled (`[]` before the agent answered).
    async fn get_filesystems(
        &self,
        _req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::GuestFilesystemsResponse>, Status> {
        let facts = self.core.status().domain;
        Ok(Response::new(pb::GuestFilesystemsResponse {
            response: Some(ok()),
            guest_filesystems_response: json!(guest::filesystems(&facts.guest, usize::MAX))
                .to_string(),
        }))
    }

    async fn migrate_virtual_machine(
        &self,
        req: Request<pb::MigrationRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        // Bad input is answered in-band, as KubeVirt's launcher does before it migrates; the
        // migration itself is reported through the domain's KubeVirt metadata only.
        let r = req.get_ref();
        if let Err(m) = same_vmi(&self.core, r.vmi.as_ref()) {
            return Ok(Response::new(failed(m)));
        }
        let options = match MigrationOptions::decode(&r.options) {
            Ok(o) => o,
            Err(m) => return Ok(Response::new(failed(m))),
        };
        let vmi_json = r
            .vmi
            .as_ref()
            .map(|v| v.vmi_json.as_slice())
            .unwrap_or_default();
        let Some(state) = MigrationState::of(vmi_json) else {
            return Ok(Response::new(failed(
                "VMIRequest.vmi.vmiJson: status.migrationState: required (the migration is not ready)",
            )));
        };
        let uid = match vmi_of(r.vmi.as_ref(), "VMIRequest.vmi") {
            Ok(v) => v.metadata.uid.unwrap_or_default(),
            Err(m) => return Ok(Response::new(failed(m))),
        };
        let Some(dir) = self.core.migration_proxy_dir() else {
            return Ok(Response::new(failed(
                "this launcher does not run in KubeVirt's pod (no migration proxy directory)",
            )));
        };
        let peer = match HandlerProxies::new(dir, &uid) {
            Ok(p) => p,
            Err(m) => return Ok(Response::new(failed(m))),
        };
        let cmd = Command::HandlerMigrate {
            migration_uid: state.migration_uid,
            peer: Box::new(peer),
            options: options.to_core(state.block_migration),
        };
        Ok(Response::new(match self.send(&req, cmd).await {
            Ok(_) => ok(),
            Err(ControlError::NoDomain) => failed("VMIRequest.vmi: no domain runs here to migrate"),
            Err(e) => failed(e.to_string()),
        }))
    }

    async fn sync_migration_target(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        let r = req.get_ref();
        let vmi = match vmi_of(r.vmi.as_ref(), "VMIRequest.vmi")
            .and_then(|v| check_options(r.options.as_ref()).map(|()| v))
        {
            Ok(v) => v,
            Err(m) => return Ok(Response::new(failed(m))),
        };
        if let Err(m) = same_vmi(&self.core, r.vmi.as_ref()) {
            return Ok(Response::new(failed(m)));
        }
        let Some(dir) = self.core.migration_proxy_dir() else {
            return Ok(Response::new(failed(
                "this launcher does not run in KubeVirt's pod (no migration proxy directory)",
            )));
        };
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        if let Err(m) = HandlerProxies::new(dir, &uid) {
            return Ok(Response::new(failed(m)));
        }
        let vmi_json = r
            .vmi
            .as_ref()
            .map(|v| v.vmi_json.as_slice())
            .unwrap_or_default();
        let migration_uid = MigrationState::of(vmi_json)
            .map(|s| s.migration_uid)
            .unwrap_or_default();
        let cmd = Command::HandlerMigrationTarget {
            vmi,
            migration_uid,
            proxy_dir: dir.to_path_buf(),
        };
        Ok(Response::new(self.simple(&req, cmd).await))
    }

    async fn cancel_virtual_machine_migration(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        if let Err(m) = same_vmi(&self.core, req.get_ref().vmi.as_ref()) {
            return Ok(Response::new(failed(m)));
        }
        // As KubeVirt's launcher: nothing to cancel is no error; the abort's result shows in
        // the metadata (`AbortStatus`).
        Ok(Response::new(
            match self.send(&req, Command::CancelMigration).await {
                Ok(_) | Err(ControlError::NoDomain) | Err(ControlError::Precondition(_)) => ok(),
                Err(e) => failed(e.to_string()),
            },
        ))
    }

    async fn finalize_virtual_machine_migration(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        // KubeVirt's launcher refreshes binding plugins' links and syncs the guest's clock
        // here; neither applies to our domains. Any number of times.
        if let Err(m) = same_vmi(&self.core, req.get_ref().vmi.as_ref()) {
            return Ok(Response::new(failed(m)));
        }
        Ok(Response::new(ok()))
    }

    async fn signal_target_pod_cleanup(
        &self,
        req: Request<pb::VmiRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        // Addressed to this pod when its `POD_NAME` is the VMI's
        // `status.migrationState.targetPod` (`cmd-server/server.go:186-201`); else nothing.
        let r = req.get_ref();
        if let Err(m) = vmi_of(r.vmi.as_ref(), "VMIRequest.vmi") {
            return Ok(Response::new(failed(m)));
        }
        let vmi_json = r
            .vmi
            .as_ref()
            .map(|v| v.vmi_json.as_slice())
            .unwrap_or_default();
        let target_pod = MigrationState::of(vmi_json)
            .map(|s| s.target_pod)
            .unwrap_or_default();
        let me = std::env::var("POD_NAME").unwrap_or_default();
        if me.is_empty() || me != target_pod {
            return Ok(Response::new(ok()));
        }
        Ok(Response::new(
            self.simple(&req, Command::TargetCleanup).await,
        ))
    }

    /// virt-probe's exec probe. As KubeVirt's launcher: a command that ran answers success
    /// with its exit code and standard output (a non-zero exit included); a failure (no
    /// agent, another domain, not exited in time) answers the gRPC status UNKNOWN with the
    /// message.
    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let r = req.get_ref();
        self.this_domain(&r.domain_name)?;
        let cmd = Command::Exec {
            path: r.command.clone(),
            args: r.args.clone(),
            timeout: probe_timeout(r.timeout_seconds),
        };
        match self.send(&req, cmd).await {
            Ok(Reply::Exec(o)) => Ok(Response::new(pb::ExecResponse {
                response: Some(ok()),
                exit_code: o.exit_code,
                std_out: o.stdout,
            })),
            Ok(r) => Err(Status::unknown(format!("unexpected reply {r:?}"))),
            Err(e) => Err(Status::unknown(e.to_string())),
        }
    }

    /// virt-probe's guest-agent ping probe: success when the agent answers `guest-ping`
    /// within the timeout, else the gRPC status UNKNOWN with why.
    async fn guest_ping(
        &self,
        req: Request<pb::GuestPingRequest>,
    ) -> Result<Response<pb::GuestPingResponse>, Status> {
        let r = req.get_ref();
        self.this_domain(&r.domain_name)?;
        let cmd = Command::GuestPing {
            timeout: probe_timeout(r.timeout_seconds),
        };
        match self.send(&req, cmd).await {
            Ok(_) => Ok(Response::new(pb::GuestPingResponse {
                response: Some(ok()),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "guest agent ping probe failed");
                Err(Status::unknown(e.to_string()))
            }
        }
    }

    async fn ping(
        &self,
        _req: Request<pb::EmptyRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        Ok(Response::new(ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_always_carry_a_message_and_success_is_explicit() {
        assert!(ok().success);
        let f = failed("");
        assert!(!f.success && !f.message.is_empty());
    }

    #[test]
    fn a_missing_or_malformed_vmi_names_the_field() {
        let e = vmi_of(None, "VMIRequest.vmi").unwrap_err();
        assert!(e.contains("VMIRequest.vmi.vmiJson"), "{e}");
        let bad = pb::Vmi {
            vmi_json: b"{\"kind\": ".to_vec(),
        };
        let e = vmi_of(Some(&bad), "VMIRequest.vmi").unwrap_err();
        assert!(e.contains("VMIRequest.vmi.vmiJson"), "{e}");
    }

    #[test]
    fn plugins_json_must_be_a_json_list() {
        let mut o = pb::VirtualMachineOptions::default();
        assert!(check_options(Some(&o)).is_ok());
        o.plugins_json = b"[]".to_vec();
        assert!(check_options(Some(&o)).is_ok());
        o.plugins_json = b"{".to_vec();
        let e = check_options(Some(&o)).unwrap_err();
        assert!(e.contains("options.pluginsJson"), "{e}");
        o.plugins_json = b"{}".to_vec();
        assert!(check_options(Some(&o)).is_err());
    }

    #[test]
    fn domain_stats_use_kubevirts_field_names() {
        let s = crate::libvirt::DomainStats {
            cpu_time_ns: 5,
            rss_kib: 7,
            disks: vec![crate::libvirt::BlockIo {
                target: "vda".into(),
                read_bytes: 9,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&domain_stats_json("ns_vm", "u", &s)).unwrap();
        assert_eq!(v["Cpu"]["Time"], 5);
        assert_eq!(v["Memory"]["RSS"], 7);
        assert_eq!(v["Memory"]["RSSSet"], true);
        assert_eq!(v["Memory"]["UnusedSet"], false);
        assert_eq!(v["Block"][0]["Name"], "vda");
        assert_eq!(v["Block"][0]["RdBytes"], 9);
    }
}
