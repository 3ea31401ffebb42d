//! The reviewers' API, on a unix socket of its own (`findings.review_socket`),
//! where the kernel tells who is calling (peer credentials).
//!
//! Who can connect is the socket's file mode (0660) and group
//! (`findings.reviewers_group`, `reviewers` by default), so reviewers need
//! neither root nor access to the database file. Every decision (status
//! change, allowlist entry, revocation) is recorded under the caller's user
//! name as the kernel reports its uid; only root may record one under
//! another name. Decisions take effect in the gate at once: the waivers are
//! reloaded before the answer is sent.

use std::sync::{Arc, Mutex};

use axum::{
    extract::{rejection::JsonRejection, ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::admin::{error, AdminListener, Peer};
use crate::findings::{
    AllowEntry, AllowId, Finding, FindingEvent, FindingId, FindingStore, FindingsError, ListFilter, Notifier, Scope,
    Status, WaiverSet,
};

/// Decisions are a few short strings.
const MAX_BODY: usize = 16 * 1024;

#[derive(Clone)]
struct Review {
    desk: ReviewDesk,
    group: Option<String>,
}

/// The reviewers' operations on the findings store, shared by the review
/// socket and the web console (`crate::console`): each runs on the blocking
/// pool, announces its decision through the notifier, and after a decision
/// reloads the gate's waivers before returning, so the caller's answer is
/// already in force. Who decides (`by`) is settled by the caller.
#[derive(Clone)]
pub struct ReviewDesk {
    store: Arc<Mutex<FindingStore>>,
    waivers: WaiverSet,
    notifier: Notifier,
}

impl ReviewDesk {
    /// A desk over `store`, refreshing `waivers` and announcing through `notifier`.
    pub fn new(store: FindingStore, waivers: WaiverSet, notifier: Notifier) -> ReviewDesk {
        ReviewDesk { store: Arc::new(Mutex::new(store)), waivers, notifier }
    }

    /// Runs `work` on the store on the blocking pool; after a decision
    /// (`refresh`), reloads the gate's waivers.
    async fn run<T: Send + 'static>(
        &self,
        refresh: bool,
        work: impl FnOnce(&FindingStore, &Notifier) -> Result<T, FindingsError> + Send + 'static,
    ) -> Result<T, FindingsError> {
        let store = self.store.clone();
        let waivers = self.waivers.clone();
        let notifier = self.notifier.clone();
        tokio::task::spawn_blocking(move || {
            let store = store.lock().map_err(|_| FindingsError::WriterStopped)?;
            let answer = work(&store, &notifier)?;
            if refresh {
                waivers.replace(store.waivers(OffsetDateTime::now_utc())?);
            }
            Ok(answer)
        })
        .await
        .map_err(|_| FindingsError::WriterStopped)?
    }

    /// Findings matching `filter`.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<Finding>, FindingsError> {
        self.run(false, move |store, _| store.list(&filter)).await
    }

    /// One finding with its sightings and history.
    pub async fn get(&self, id: FindingId) -> Result<Finding, FindingsError> {
        self.run(false, move |store, _| store.get(id)?.ok_or(FindingsError::NotFound(id))).await
    }

    /// Moves finding `id` to `status`, recorded as `by`.
    pub async fn set_status(
        &self,
        id: FindingId,
        status: Status,
        by: String,
        comment: String,
    ) -> Result<Finding, FindingsError> {
        self.run(true, move |store, notifier| {
            let finding = store.set_status(id, status, &by, &comment)?;
            notifier.status(&finding);
            Ok(finding)
        })
        .await
    }

    /// Allows finding `id`'s key in `scope` until `expires_at`, recorded as `by`.
    pub async fn allow(
        &self,
        id: FindingId,
        scope: Scope,
        expires_at: Option<OffsetDateTime>,
        reason: String,
        by: String,
    ) -> Result<AllowEntry, FindingsError> {
        self.run(true, move |store, notifier| {
            let entry = store.allow(id, &scope, expires_at, &reason, &by)?;
            notifier.allowlist(FindingEvent::Allowed, &entry);
            Ok(entry)
        })
        .await
    }

    /// Every allowlist entry, revoked and expired ones included.
    pub async fn allowlist(&self) -> Result<Vec<AllowEntry>, FindingsError> {
        self.run(false, |store, _| store.allowlist()).await
    }

    /// Revokes allowlist entry `id`, recorded as `by`.
    pub async fn revoke(&self, id: AllowId, by: String, comment: String) -> Result<AllowEntry, FindingsError> {
        self.run(true, move |store, notifier| {
            let entry = store.revoke(id, &by, &comment)?;
            notifier.allowlist(FindingEvent::Revoked, &entry);
            Ok(entry)
        })
        .await
    }
}

/// Serves the reviewers' API on `listener` (bound with [`super::bind_admin`]
/// and group `group`) until `shutdown` fires, then removes the socket file.
/// Decisions go through `desk`.
pub async fn serve_review(
    listener: AdminListener,
    desk: ReviewDesk,
    group: Option<String>,
    shutdown: CancellationToken,
) {
    let path = listener.path().to_owned();
    let app = router(Review { desk, group });
    tracing::info!(path = %path.display(), "reviewers' API listening");
    let served = axum::serve(listener.into_inner(), app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, path = %path.display(), "reviewers' API stopped");
    }
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(error = %e, path = %path.display(), "review socket not removed");
    }
}

fn router(review: Review) -> Router {
    Router::new()
        .route("/v1/findings", get(list))
        .route("/v1/findings/{id}", get(show))
        .route("/v1/findings/{id}/status", post(set_status))
        .route("/v1/findings/{id}/allow", post(allow))
        .route("/v1/allowlist", get(allowlist))
        .route("/v1/allowlist/{id}/revoke", post(revoke))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(review)
}

/// The caller's user name, if it is root or a member of the reviewers'
/// group (the socket's mode already keeps others out; this holds if the
/// file's mode or group is ever changed by hand).
fn reviewer(review: &Review, peer: Peer) -> Result<(u32, String), Refused> {
    let Some(uid) = peer.uid else {
        return Err((StatusCode::FORBIDDEN, "the caller's credentials are unknown".into()));
    };
    let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
    let name = user.as_ref().map_or_else(|| format!("uid {uid}"), |u| u.name.clone());
    if uid == 0 {
        return Ok((uid, name));
    }
    let member = review.group.as_deref().is_some_and(|g| {
        nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .is_some_and(|group| group.mem.contains(&name) || user.as_ref().is_some_and(|u| u.gid == group.gid))
    });
    if member {
        Ok((uid, name))
    } else {
        Err((StatusCode::FORBIDDEN, format!("{name} is not root nor in the reviewers' group")))
    }
}

/// A refusal: its status and message.
type Refused = (StatusCode, String);

/// The name a decision is recorded under: the caller's, or `by` for root.
fn decided_by(uid: u32, name: String, by: Option<String>) -> Result<String, Refused> {
    match by.map(|b| b.trim().to_owned()) {
        None => Ok(name),
        Some(b) if b == name => Ok(name),
        Some(b) if uid == 0 && !b.is_empty() => Ok(b),
        Some(b) => Err((StatusCode::FORBIDDEN, format!("you are {name}; only root may decide as {b}"))),
    }
}

/// A reviewer's decision, ready to apply: the caller (kernel-checked), the
/// name it is recorded under, and the request body.
struct Decision<B> {
    uid: u32,
    by: String,
    body: B,
}

/// Checks the caller, reads the body and settles whom the decision is
/// recorded as (`by`: the body's `by` field).
fn decision<B>(
    review: &Review,
    peer: Peer,
    body: Result<Json<B>, JsonRejection>,
    by: impl FnOnce(&mut B) -> Option<String>,
) -> Result<Decision<B>, Refused> {
    let (uid, name) = reviewer(review, peer)?;
    let Json(mut body) = body.map_err(|e| (StatusCode::BAD_REQUEST, e.body_text()))?;
    let by = decided_by(uid, name, by(&mut body))?;
    Ok(Decision { uid, by, body })
}

fn findings_error(e: &FindingsError) -> Response {
    let status = match e {
        FindingsError::NotFound(_) | FindingsError::NoSuchAllowEntry(_) => StatusCode::NOT_FOUND,
        FindingsError::InvalidTransition { .. } => StatusCode::CONFLICT,
        FindingsError::InvalidFinding(_) | FindingsError::MissingReviewer => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// The JSON answer for a desk's result.
fn answer<T: serde::Serialize>(result: Result<T, FindingsError>) -> Response {
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => findings_error(&e),
    }
}

/// `GET /v1/findings` query: the filters of `gateway findings list`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    rule: Option<String>,
    host: Option<String>,
    fingerprint: Option<String>,
    identity: Option<String>,
    project: Option<String>,
    /// RFC 3339.
    since: Option<String>,
}

async fn list(
    State(review): State<Review>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err((status, message)) = reviewer(&review, peer) {
        return error(status, message);
    }
    let status = match q.status.as_deref().map(str::parse::<Status>).transpose() {
        Ok(s) => s,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let since = match q.since.as_deref().map(|s| {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| format!("since: {e}"))
    }) {
        Some(Err(reason)) => return error(StatusCode::BAD_REQUEST, reason),
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let filter = ListFilter {
        status,
        rule: q.rule,
        host: q.host,
        since,
        fingerprint: q.fingerprint,
        identity: q.identity,
        project: q.project,
    };
    answer(review.desk.list(filter).await)
}

async fn show(
    State(review): State<Review>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
) -> Response {
    if let Err((status, message)) = reviewer(&review, peer) {
        return error(status, message);
    }
    let id = match raw.parse::<FindingId>() {
        Ok(id) => id,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    answer(review.desk.get(id).await)
}

/// Body of `POST /v1/findings/{id}/status`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: String,
    comment: String,
    #[serde(default)]
    by: Option<String>,
}

async fn set_status(
    State(review): State<Review>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
    body: Result<Json<StatusBody>, JsonRejection>,
) -> Response {
    let Decision { uid, by, body } = match decision(&review, peer, body, |b| b.by.take()) {
        Ok(d) => d,
        Err((status, message)) => return error(status, message),
    };
    let (id, status) = match (raw.parse::<FindingId>(), body.status.parse::<Status>()) {
        (Ok(id), Ok(status)) => (id, status),
        (Err(reason), _) | (_, Err(reason)) => return error(StatusCode::BAD_REQUEST, reason),
    };
    tracing::info!(target: "gateway::finding", finding = %id, %status, by, uid, "review decision");
    answer(review.desk.set_status(id, status, by, body.comment).await)
}

/// Body of `POST /v1/findings/{id}/allow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowBody {
    scope: String,
    /// RFC 3339; absent: until revoked.
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

async fn allow(
    State(review): State<Review>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
    body: Result<Json<AllowBody>, JsonRejection>,
) -> Response {
    let Decision { uid, by, body } = match decision(&review, peer, body, |b| b.by.take()) {
        Ok(d) => d,
        Err((status, message)) => return error(status, message),
    };
    let (id, scope) = match (raw.parse::<FindingId>(), body.scope.parse::<Scope>()) {
        (Ok(id), Ok(scope)) => (id, scope),
        (Err(reason), _) | (_, Err(reason)) => return error(StatusCode::BAD_REQUEST, reason),
    };
    tracing::info!(target: "gateway::finding", finding = %id, %scope, by, uid, "allowlist entry");
    answer(review.desk.allow(id, scope, body.expires_at, body.reason, by).await)
}

async fn allowlist(State(review): State<Review>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    if let Err((status, message)) = reviewer(&review, peer) {
        return error(status, message);
    }
    answer(review.desk.allowlist().await)
}

/// Body of `POST /v1/allowlist/{id}/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    comment: String,
    #[serde(default)]
    by: Option<String>,
}

async fn revoke(
    State(review): State<Review>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(raw): UrlPath<String>,
    body: Result<Json<RevokeBody>, JsonRejection>,
) -> Response {
    let Decision { by, body, .. } = match decision(&review, peer, body, |b| b.by.take()) {
        Ok(d) => d,
        Err((status, message)) => return error(status, message),
    };
    let id = match raw.parse::<AllowId>() {
        Ok(id) => id,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    answer(review.desk.revoke(id, by, body.comment).await)
}
