//! `kubevirt.cmd.info.CmdInfo`: virt-handler asks it first on every new connection and picks
//! the highest version both sides know (it knows only 1).

use tonic::{Request, Response, Status};

use super::pb::cmd::info::{cmd_info_server::CmdInfo, CmdInfoRequest, CmdInfoResponse};

/// The cmd protocol versions served.
pub const SUPPORTED_CMD_VERSIONS: [u32; 1] = [1];

/// The version-discovery service.
#[derive(Debug, Default, Clone, Copy)]
pub struct InfoService;

#[tonic::async_trait]
impl CmdInfo for InfoService {
    async fn info(
        &self,
        _req: Request<CmdInfoRequest>,
    ) -> Result<Response<CmdInfoResponse>, Status> {
        Ok(Response::new(CmdInfoResponse {
            supported_cmd_versions: SUPPORTED_CMD_VERSIONS.to_vec(),
        }))
    }
}
