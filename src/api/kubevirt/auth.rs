//! `kubevirt.cmd.auth.CmdAuth`: virt-handler's check that the socket belongs to a real
//! launcher pod (KubeVirt main, `LauncherSocketAuthentication`). The launcher hands over its
//! pod's projected ServiceAccount token; the handler validates it with a TokenReview.
//!
//! The token file is read at every call: the kubelet replaces it before it expires (1 h). A
//! pod without the file (an older pod template, or outside KubeVirt) answers UNIMPLEMENTED,
//! what the handler gets from a launcher that predates the service; a file that cannot be
//! read, or an empty one, is an error that says which file and why.

use std::io::ErrorKind;
use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::pb::cmd::auth::{cmd_auth_server::CmdAuth, AuthRequest, AuthResponse};

/// Where KubeVirt's pod template projects the token (audience `kubevirt.io/cmd-auth`).
pub const TOKEN_FILE: &str = "/var/run/secrets/tokens/cmd-auth-token";

/// The authentication service.
#[derive(Debug, Clone)]
pub struct AuthService {
    token_file: PathBuf,
}

impl AuthService {
    pub fn new(token_file: PathBuf) -> Self {
        AuthService { token_file }
    }
}

#[tonic::async_trait]
impl CmdAuth for AuthService {
    async fn authenticate(
        &self,
        _req: Request<AuthRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let file = self.token_file.display();
        // A small file on the pod's tmpfs: read in place.
        match std::fs::read_to_string(&self.token_file) {
            Ok(token) if token.trim().is_empty() => Err(Status::internal(format!(
                "the cmd-auth token {file} is empty"
            ))),
            // A token is one line of base64url and dots; a trailing newline is not part of it.
            Ok(token) => Ok(Response::new(AuthResponse {
                token: token.trim_end().to_string(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Status::unimplemented(format!(
                "this pod has no cmd-auth token ({file} does not exist)"
            ))),
            Err(e) => Err(Status::internal(format!(
                "reading the cmd-auth token {file}: {e}"
            ))),
        }
    }
}
