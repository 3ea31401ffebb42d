//! The privileged admin API, on a unix socket.
//!
//! Approvers are authenticated by the kernel, not by what they send: every
//! connection carries the peer's uid and pid (`SO_PEERCRED`), and a decision
//! is taken by that uid (see `docs/approvals.md`). Who can connect at all is
//! the socket's file mode (0660) and group (`api.admin_group`).

use std::{
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    extract::{
        connect_info::Connected,
        rejection::{JsonRejection, QueryRejection},
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State,
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::IncomingStream,
    Json, Router,
};
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::approval::{
    ApprovalError, ApprovalId, Approvals, Approver, ListFilter, State as ApprovalState, Verdict, Vouched,
};

/// Resolves a pid to the identity URI of that process (the proxy's identity
/// resolver), or `None` when it has none.
pub type IdentityLookup = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// Decisions are a name and a comment; nothing bigger is ever needed.
const MAX_BODY: usize = 16 * 1024;
/// Most requests one list call returns.
const MAX_LIST: usize = 1000;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A bound admin socket, ready for [`serve_admin`].
#[derive(Debug)]
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminListener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn into_inner(self) -> UnixListener {
        self.listener
    }
}

/// Checks that `path` can name a unix socket.
pub(super) fn check_socket_path(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("`{}` must be an absolute path", path.display()));
    }
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "`{}` is longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have",
            path.display()
        ));
    }
    if path.file_name().is_none() {
        return Err(format!("`{}` does not name a file", path.display()));
    }
    Ok(())
}

/// Binds the admin socket at `path`: creates the parent directory (0755)
/// if needed, replaces a stale socket left by a crashed gateway, and gives
/// the socket mode 0660 and group `group`. Must run inside the tokio
/// runtime.
pub fn bind_admin(path: &Path, group: Option<&str>) -> Result<AdminListener, ApiError> {
    let fail = |reason: String| ApiError::Socket { path: path.to_owned(), reason };
    check_socket_path(path).map_err(&fail)?;
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| fail(format!("looking up group {name}: {e}")))?
                .ok_or_else(|| fail(format!("no unix group named {name}")))?
                .gid,
        ),
        None => None,
    };
    if let Some(dir) = path.parent() {
        // 0755: approvers in the socket's group must be able to reach it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("binding: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| fail(format!("setting mode 0660: {e}")))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| fail(format!("giving it to group {gid}: {e}")))?;
    }
    Ok(AdminListener { listener, path: path.to_owned() })
}

/// Removes a socket nobody serves any more; refuses to touch anything else.
fn remove_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ApiError::Socket { path: path.to_owned(), reason: e.to_string() }),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::Socket {
            path: path.to_owned(),
            reason: "exists and is not a socket; remove it or choose another api.admin_socket".into(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse { path: path.to_owned() }),
        Err(_) => std::fs::remove_file(path)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|e| ApiError::Socket { path: path.to_owned(), reason: format!("removing the stale socket: {e}") }),
    }
}

/// The caller at the other end of a connection, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Peer {
    pub(super) uid: Option<u32>,
    pub(super) pid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Peer { uid: Some(cred.uid()), pid: cred.pid().and_then(|p| u32::try_from(p).ok()) },
            Err(e) => {
                tracing::warn!(error = %e, "admin API: cannot read the peer credentials; the connection may only read");
                Peer { uid: None, pid: None }
            }
        }
    }
}

#[derive(Clone)]
struct Admin {
    approvals: Approvals,
    resolve_identity: IdentityLookup,
}

/// Serves the admin API on `listener` until `shutdown` fires, then removes
/// the socket file.
pub async fn serve_admin(
    listener: AdminListener,
    approvals: Approvals,
    resolve_identity: IdentityLookup,
    shutdown: CancellationToken,
) {
    let AdminListener { listener, path } = listener;
    let app = router(Admin { approvals, resolve_identity });
    tracing::info!(path = %path.display(), "admin API listening");
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, path = %path.display(), "admin API stopped");
    }
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(error = %e, path = %path.display(), "admin socket not removed");
    }
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}", get(show))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

pub(super) fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn approval_error(e: &ApprovalError) -> Response {
    error(e.http_status(), e.to_string())
}

fn parse_id(raw: &str) -> Result<ApprovalId, String> {
    raw.parse()
}

/// `GET /v1/approvals` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

async fn list(State(admin): State<Admin>, query: Result<Query<ListQuery>, QueryRejection>) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let state = match query.state.as_deref().map(str::parse::<ApprovalState>).transpose() {
        Ok(s) => s,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let filter = ListFilter { state, limit: query.limit.unwrap_or(ListFilter::default().limit).min(MAX_LIST) };
    match admin.approvals.list(filter).await {
        Ok(views) => Json(serde_json::json!({ "approvals": views })).into_response(),
        Err(e) => approval_error(&e),
    }
}

async fn show(State(admin): State<Admin>, UrlPath(raw): UrlPath<String>) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match admin.approvals.get(id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => approval_error(&ApprovalError::NotFound(id)),
        Err(e) => approval_error(&e),
    }
}

/// Body of `POST /v1/approvals/{id}/approve` and `/deny`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    by: String,
    #[serde(default)]
    comment: Option<String>,
}

async fn approve(
    State(admin): State<Admin>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
    body: Result<Json<DecideBody>, JsonRejection>,
) -> Response {
    decide(admin, peer, &raw, body, Verdict::Approve).await
}

async fn deny(
    State(admin): State<Admin>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
    body: Result<Json<DecideBody>, JsonRejection>,
) -> Response {
    decide(admin, peer, &raw, body, Verdict::Deny).await
}

async fn decide(
    admin: Admin,
    peer: Peer,
    raw: &str,
    body: Result<Json<DecideBody>, JsonRejection>,
    verdict: Verdict,
) -> Response {
    let id = match parse_id(raw) {
        Ok(id) => id,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let (Some(uid), Some(pid)) = (peer.uid, peer.pid) else {
        return error(StatusCode::FORBIDDEN, "the caller's credentials are unknown; decisions are refused".into());
    };
    // Reading /proc for the identity blocks.
    let resolve = admin.resolve_identity.clone();
    let identity = tokio::task::spawn_blocking(move || resolve(pid)).await.ok().flatten();
    let approver = Approver { name: body.by, uid, pid, identity, vouched: Vouched::Kernel };
    let by = approver.name.clone();
    match admin.approvals.decide(id, verdict, approver, body.comment).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => {
            tracing::warn!(
                target: "gateway::approval",
                id = %id, %verdict, by = ?by, uid, pid, error = %e,
                "approval decision refused"
            );
            approval_error(&e)
        }
    }
}
