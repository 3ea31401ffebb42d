//! Client of the admin API over its unix socket (the `gateway approvals`
//! commands use it): generic JSON calls and the approval requests.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use crate::approval::{ApprovalId, ApprovalView, ListFilter, Verdict};

/// Largest response accepted (a long approval list).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// A local server answers at once; anything slower is a hung gateway.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is absent, refused, or not accessible.
    #[error("{}: {reason}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What is wrong, with a hint.
        reason: String,
    },
    /// The exchange failed midway.
    #[error("admin API at {}: {reason}", path.display())]
    Exchange {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The API refused the call.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The API's `error` text.
        message: String,
    },
}

impl ClientError {
    /// True when the API understood and refused the request (403, 404,
    /// 409...), as opposed to not being reachable.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if status.is_client_error())
    }
}

/// A client of the admin API at one socket path.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> AdminClient {
        AdminClient { socket: socket.to_owned() }
    }

    /// `GET path` and decode the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body and decode the JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| self.exchange(format!("encoding the request: {e}")))?;
        self.call(Method::POST, path, Some(Bytes::from(body))).await
    }

    /// Approval requests matching `filter` (`GET /v1/approvals`).
    pub async fn approvals(&self, filter: &ListFilter) -> Result<Vec<ApprovalView>, ClientError> {
        /// `GET /v1/approvals` answer.
        #[derive(serde::Deserialize)]
        struct ListAnswer {
            approvals: Vec<ApprovalView>,
        }
        let mut path = format!("/v1/approvals?limit={}", filter.limit);
        if let Some(state) = filter.state {
            path.push_str("&state=");
            path.push_str(state.as_str());
        }
        Ok(self.get::<ListAnswer>(&path).await?.approvals)
    }

    /// One approval request.
    pub async fn approval(&self, id: ApprovalId) -> Result<ApprovalView, ClientError> {
        self.get(&format!("/v1/approvals/{id}")).await
    }

    /// Approves or denies request `id` as `by`; the gateway checks that the
    /// caller may.
    pub async fn decide(
        &self,
        id: ApprovalId,
        verdict: Verdict,
        by: &str,
        comment: Option<&str>,
    ) -> Result<ApprovalView, ClientError> {
        let body = serde_json::json!({ "by": by, "comment": comment });
        self.post(&format!("/v1/approvals/{id}/{}", verdict.as_str()), &body).await
    }

    fn exchange(&self, reason: String) -> ClientError {
        ClientError::Exchange { path: self.socket.clone(), reason }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| self.exchange(format!("no answer within {TIMEOUT:?}")))?
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| self.connect_error(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.exchange(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, "localhost");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| self.exchange(format!("bad request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| self.exchange(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| self.exchange(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| format!("the admin API answered {status}"));
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| self.exchange(format!("unexpected answer: {e}")))
    }

    fn connect_error(&self, e: &std::io::Error) -> ClientError {
        use std::io::ErrorKind;
        let reason = match e.kind() {
            ErrorKind::NotFound => {
                "no admin socket here: is the gateway running (`gateway run`), and is api.admin_socket the same in this configuration?".to_owned()
            }
            ErrorKind::ConnectionRefused => {
                "nothing is listening (a stale socket): the gateway is not running".to_owned()
            }
            ErrorKind::PermissionDenied => format!(
                "permission denied: approvers must be in the socket's group (api.admin_group) or use sudo (uid {})",
                nix::unistd::getuid()
            ),
            _ => format!("cannot connect: {e}"),
        };
        ClientError::Connect { path: self.socket.clone(), reason }
    }
}
