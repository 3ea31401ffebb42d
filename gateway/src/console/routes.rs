//! The console's routes: sign-in, the security headers, session and CSRF
//! checks, and the pages and decisions (each a thin call into the review
//! desk, the approval service or the session store).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, Form, Path as UrlPath, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
    Json, Router,
};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    auth::Provider,
    pages,
    session::{same_token, Role, Session, Sessions},
    ConsoleServices,
};
use crate::{
    approval::{
        ApprovalError, ApprovalId, Approver, ListFilter as ApprovalFilter, State as ApprovalState, Verdict, Vouched,
    },
    findings::{AllowId, FindingId, FindingsError, ListFilter, Scope, Status},
    record::{SessionFilter, SessionStore},
};

/// Forms carry a comment or a reason; nothing bigger.
const MAX_BODY: usize = 16 * 1024;
/// Sessions listed per page.
const SESSION_LIST: usize = 200;
/// Log target of sign-ins and console decisions.
const TARGET: &str = "gateway::console";

/// The CSP: nothing but this origin's own script, style and images; no
/// inline code, no framing, forms only back here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The router's state.
#[derive(Clone)]
pub struct Console {
    pub(super) services: ConsoleServices,
    pub(super) provider: Arc<Provider>,
    pub(super) sessions: Arc<Sessions>,
    /// Served over TLS: cookies are `Secure` and `__Host-` prefixed.
    pub(super) tls: bool,
    /// The console's own origin (from the redirect URL), which a POST's
    /// `Origin` header must name when the browser sends one.
    pub(super) origin: String,
    /// Path of the OIDC callback.
    pub(super) callback: String,
}

impl Console {
    fn session_cookie(&self) -> &'static str {
        if self.tls {
            "__Host-cgw-session"
        } else {
            "cgw-session"
        }
    }

    fn login_cookie(&self) -> &'static str {
        if self.tls {
            "__Host-cgw-login"
        } else {
            "cgw-login"
        }
    }

    fn cookie(&self, name: &'static str, value: String, max_age: Duration) -> HeaderValue {
        let cookie = Cookie::build((name, value))
            .path("/")
            .secure(self.tls)
            .http_only(true)
            .same_site(SameSite::Lax)
            .max_age(cookie::time::Duration::seconds(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX)))
            .build();
        // Names and values are hex and fixed names: always a valid header.
        HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The session the request's cookie names, if live.
    fn session_of(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie_value(headers, self.session_cookie())?;
        self.sessions.get(&id).map(|s| (id, s))
    }

    /// A page request: the session, or a redirect to sign in; a 403 when
    /// the role is short of `need`.
    pub(super) fn page(&self, headers: &HeaderMap, need: Role) -> Result<Session, Box<Response>> {
        let Some((_, session)) = self.session_of(headers) else {
            return Err(Box::new(Redirect::to("/auth/login").into_response()));
        };
        if session.user.role < need {
            return Err(Box::new(forbidden(&session, need)));
        }
        Ok(session)
    }

    /// A POST: a live session, the request's own origin, the session's
    /// CSRF token, and at least role `need`.
    pub(super) fn post(&self, headers: &HeaderMap, csrf: &str, need: Role) -> Result<Session, Box<Response>> {
        let Some((_, session)) = self.session_of(headers) else {
            return Err(Box::new(pages::error(StatusCode::UNAUTHORIZED, "sign in first", None)));
        };
        // Defence in depth before the token: browsers say where a request
        // comes from. With `Referrer-Policy: no-referrer` a form's Origin
        // is `null`, which tells nothing; Sec-Fetch-Site still does.
        let origin = headers.get(header::ORIGIN).map(HeaderValue::as_bytes).filter(|o| *o != b"null");
        let site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
        if origin.is_some_and(|o| o != self.origin.as_bytes()) || site.is_some_and(|s| s != b"same-origin") {
            tracing::warn!(target: TARGET, user = %session.user.audit_name(), "cross-origin POST refused");
            return Err(Box::new(pages::error(StatusCode::FORBIDDEN, "cross-origin request refused", Some(&session))));
        }
        if !same_token(csrf, &session.csrf) {
            tracing::warn!(target: TARGET, user = %session.user.audit_name(), "POST with a wrong CSRF token refused");
            return Err(Box::new(pages::error(
                StatusCode::FORBIDDEN,
                "invalid CSRF token: reload the page",
                Some(&session),
            )));
        }
        if session.user.role < need {
            return Err(Box::new(forbidden(&session, need)));
        }
        Ok(session)
    }
}

fn forbidden(session: &Session, need: Role) -> Response {
    pages::error(
        StatusCode::FORBIDDEN,
        &format!("this needs the {} role; you are {}", need.as_str(), session.user.role.as_str()),
        Some(session),
    )
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// The console's routes.
pub fn router(console: Console) -> Router {
    let tls = console.tls;
    Router::new()
        .route("/", get(|| async { Redirect::to("/findings") }))
        .route("/auth/login", get(login))
        .route(&console.callback, get(callback))
        .route("/auth/logout", post(logout))
        .route("/findings", get(findings))
        .route("/findings/{id}", get(finding))
        .route("/findings/{id}/status", post(set_status))
        .route("/findings/{id}/allow", post(allow))
        .route("/allowlist", get(allowlist))
        .route("/allowlist/{id}/revoke", post(revoke))
        .route("/approvals", get(approvals))
        .route("/approvals.json", get(approvals_json))
        .route("/approvals/{id}/decide", post(decide))
        .route("/sessions", get(sessions))
        .route("/sessions/{id}", get(session))
        .merge(super::fleet::routes())
        .route("/assets/console.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS) }))
        .route("/assets/console.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], JS) }))
        // Browsers ask for it on every site; nothing to show.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { pages::error(StatusCode::NOT_FOUND, "no such page", None) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(move |response: Response| security_headers(response, tls)))
        .with_state(console)
}

/// Headers on every response, errors included.
async fn security_headers(mut response: Response, tls: bool) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if tls {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    response
}

async fn login(State(console): State<Console>) -> Response {
    let (url, state, verifier, nonce) = match console.provider.begin().await {
        Ok(begun) => begun,
        Err(e) => {
            tracing::warn!(target: TARGET, error = %e, "console sign-in could not start");
            return pages::error(StatusCode::BAD_GATEWAY, &format!("sign-in is unavailable: {e}"), None);
        }
    };
    if !console.sessions.start_sign_in(state.clone(), verifier, nonce) {
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, "too many sign-ins under way; retry shortly", None);
    }
    // The state also goes into a cookie: the callback must come back to the
    // browser that started the sign-in (no login CSRF).
    let cookie = console.cookie(console.login_cookie(), state, Duration::from_secs(600));
    ([(header::SET_COOKIE, cookie)], Redirect::to(&url)).into_response()
}

/// The provider's redirect back.
#[derive(Debug, Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(State(console): State<Console>, headers: HeaderMap, Query(q): Query<CallbackQuery>) -> Response {
    if let Some(error) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return pages::error(StatusCode::FORBIDDEN, &format!("the identity provider said: {error} {detail}"), None);
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return pages::error(StatusCode::BAD_REQUEST, "the callback has no code or state", None);
    };
    let from_this_browser =
        cookie_value(&headers, console.login_cookie()).is_some_and(|cookie| same_token(&cookie, &state));
    let pending = console.sessions.finish_sign_in(&state);
    let Some(pending) = pending.filter(|_| from_this_browser) else {
        tracing::warn!(target: TARGET, "console sign-in callback with an unknown state or from another browser");
        return pages::error(
            StatusCode::FORBIDDEN,
            "this sign-in was not started here (or expired); sign in again",
            None,
        );
    };
    let user = match console.provider.finish(code, pending).await {
        Ok(user) => user,
        Err(e) => {
            tracing::warn!(target: TARGET, error = %e, "console sign-in refused");
            return pages::error(StatusCode::FORBIDDEN, &format!("sign-in refused: {e}"), None);
        }
    };
    let audit = user.audit_name();
    let role = user.role;
    let Some(id) = console.sessions.open(user) else {
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, "too many sessions; retry later", None);
    };
    tracing::info!(target: TARGET, user = %audit, role = role.as_str(), "console sign-in");
    let mut response = Redirect::to("/").into_response();
    let h = response.headers_mut();
    h.append(header::SET_COOKIE, console.cookie(console.session_cookie(), id, console.sessions_ttl()));
    h.append(header::SET_COOKIE, console.cookie(console.login_cookie(), String::new(), Duration::ZERO));
    response
}

impl Console {
    fn sessions_ttl(&self) -> Duration {
        self.sessions.ttl()
    }
}

/// A form with only the CSRF token.
#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(console): State<Console>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Viewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    if let Some((id, _)) = console.session_of(&headers) {
        console.sessions.close(&id);
    }
    tracing::info!(target: TARGET, user = %session.user.audit_name(), "console sign-out");
    let cookie = console.cookie(console.session_cookie(), String::new(), Duration::ZERO);
    ([(header::SET_COOKIE, cookie)], pages::signed_out()).into_response()
}

/// `GET /findings` filters.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FindingsQuery {
    pub(super) status: Option<String>,
    pub(super) rule: Option<String>,
    pub(super) identity: Option<String>,
    pub(super) host: Option<String>,
    pub(super) fingerprint: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<String> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn findings_error(e: &FindingsError, session: &Session) -> Response {
    let status = match e {
        FindingsError::NotFound(_) | FindingsError::NoSuchAllowEntry(_) => StatusCode::NOT_FOUND,
        FindingsError::InvalidTransition { .. } => StatusCode::CONFLICT,
        FindingsError::InvalidFinding(_) | FindingsError::MissingReviewer => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    pages::error(status, &e.to_string(), Some(session))
}

async fn findings(State(console): State<Console>, headers: HeaderMap, Query(q): Query<FindingsQuery>) -> Response {
    let session = match console.page(&headers, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let status = match nonempty(&q.status).map(|s| s.parse::<Status>()).transpose() {
        Ok(s) => s,
        Err(reason) => return pages::error(StatusCode::BAD_REQUEST, &reason, Some(&session)),
    };
    let filter = ListFilter {
        status,
        rule: nonempty(&q.rule),
        host: nonempty(&q.host),
        fingerprint: nonempty(&q.fingerprint),
        identity: nonempty(&q.identity),
        ..ListFilter::default()
    };
    match console.services.desk.list(filter).await {
        Ok(list) => pages::findings(&session, &q, &list).into_response(),
        Err(e) => findings_error(&e, &session),
    }
}

async fn finding(State(console): State<Console>, headers: HeaderMap, UrlPath(raw): UrlPath<String>) -> Response {
    let session = match console.page(&headers, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let id = match raw.parse::<FindingId>() {
        Ok(id) => id,
        Err(reason) => return pages::error(StatusCode::BAD_REQUEST, &reason, Some(&session)),
    };
    let desk = &console.services.desk;
    let (finding, allowlist) = match tokio::join!(desk.get(id), desk.allowlist()) {
        (Ok(f), Ok(a)) => (f, a),
        (Err(e), _) | (_, Err(e)) => return findings_error(&e, &session),
    };
    let entries: Vec<_> = allowlist.into_iter().filter(|e| e.finding == id).collect();
    pages::finding(&session, &finding, &entries).into_response()
}

/// A status transition.
#[derive(Debug, Deserialize)]
struct StatusForm {
    csrf: String,
    status: String,
    comment: String,
}

async fn set_status(
    State(console): State<Console>,
    headers: HeaderMap,
    UrlPath(raw): UrlPath<String>,
    Form(form): Form<StatusForm>,
) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (id, status) = match (raw.parse::<FindingId>(), form.status.parse::<Status>()) {
        (Ok(id), Ok(status)) => (id, status),
        (Err(reason), _) | (_, Err(reason)) => return pages::error(StatusCode::BAD_REQUEST, &reason, Some(&session)),
    };
    let by = session.user.audit_name();
    tracing::info!(target: "gateway::finding", finding = %id, %status, by, via = "console", "review decision");
    match console.services.desk.set_status(id, status, by, form.comment).await {
        Ok(_) => Redirect::to(&format!("/findings/{id}")).into_response(),
        Err(e) => findings_error(&e, &session),
    }
}

/// An allowlist entry.
#[derive(Debug, Deserialize)]
struct AllowForm {
    csrf: String,
    scope: String,
    /// `1h`, `7d`... or `never`.
    expires: String,
    reason: String,
}

async fn allow(
    State(console): State<Console>,
    headers: HeaderMap,
    UrlPath(raw): UrlPath<String>,
    Form(form): Form<AllowForm>,
) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (id, scope) = match (raw.parse::<FindingId>(), form.scope.parse::<Scope>()) {
        (Ok(id), Ok(scope)) => (id, scope),
        (Err(reason), _) | (_, Err(reason)) => return pages::error(StatusCode::BAD_REQUEST, &reason, Some(&session)),
    };
    let expires_at = match form.expires.trim() {
        "never" => None,
        text => match humantime::parse_duration(text) {
            Ok(d) => Some(OffsetDateTime::now_utc() + d),
            Err(e) => return pages::error(StatusCode::BAD_REQUEST, &format!("expires: {e}"), Some(&session)),
        },
    };
    let by = session.user.audit_name();
    tracing::info!(target: "gateway::finding", finding = %id, %scope, by, via = "console", "allowlist entry");
    match console.services.desk.allow(id, scope, expires_at, form.reason, by).await {
        Ok(_) => Redirect::to(&format!("/findings/{id}")).into_response(),
        Err(e) => findings_error(&e, &session),
    }
}

async fn allowlist(State(console): State<Console>, headers: HeaderMap) -> Response {
    let session = match console.page(&headers, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match console.services.desk.allowlist().await {
        Ok(entries) => pages::allowlist(&session, &entries).into_response(),
        Err(e) => findings_error(&e, &session),
    }
}

/// A revocation.
#[derive(Debug, Deserialize)]
struct RevokeForm {
    csrf: String,
    comment: String,
}

async fn revoke(
    State(console): State<Console>,
    headers: HeaderMap,
    UrlPath(raw): UrlPath<String>,
    Form(form): Form<RevokeForm>,
) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Reviewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let id = match raw.parse::<AllowId>() {
        Ok(id) => id,
        Err(reason) => return pages::error(StatusCode::BAD_REQUEST, &reason, Some(&session)),
    };
    let by = session.user.audit_name();
    tracing::info!(target: "gateway::finding", entry = %id, by, via = "console", "allowlist entry revoked");
    match console.services.desk.revoke(id, by, form.comment).await {
        Ok(_) => Redirect::to("/allowlist").into_response(),
        Err(e) => findings_error(&e, &session),
    }
}

fn approval_error(e: &ApprovalError, session: &Session) -> Response {
    pages::error(e.http_status(), &e.to_string(), Some(session))
}

async fn pending_approvals(console: &Console) -> Result<Vec<crate::approval::ApprovalView>, ApprovalError> {
    console
        .services
        .approvals
        .list(ApprovalFilter { state: Some(ApprovalState::Pending), ..ApprovalFilter::default() })
        .await
}

async fn approvals(State(console): State<Console>, headers: HeaderMap) -> Response {
    let session = match console.page(&headers, Role::Viewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let recent = console.services.approvals.list(ApprovalFilter { state: None, limit: 50 }).await;
    match (pending_approvals(&console).await, recent) {
        (Ok(pending), Ok(recent)) => {
            let finished: Vec<_> = recent.into_iter().filter(|a| a.state.is_finished()).collect();
            pages::approvals(&session, &pending, &finished).into_response()
        }
        (Err(e), _) | (_, Err(e)) => approval_error(&e, &session),
    }
}

/// The pending queue for the page's live update.
async fn approvals_json(State(console): State<Console>, headers: HeaderMap) -> Response {
    let Some((_, session)) = console.session_of(&headers) else {
        return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "sign in first"}))).into_response();
    };
    match pending_approvals(&console).await {
        Ok(pending) => {
            let rows: Vec<_> = pending.iter().map(pages::approval_json).collect();
            Json(serde_json::json!({
                "pending": rows,
                "can_decide": session.user.role >= Role::Approver,
            }))
            .into_response()
        }
        Err(e) => (e.http_status(), Json(serde_json::json!({"error": e.to_string()}))).into_response(),
    }
}

/// An approval decision (the local queue's form and the fleet's).
#[derive(Debug, Deserialize)]
pub(super) struct DecideForm {
    pub(super) csrf: String,
    verdict: String,
    #[serde(default)]
    comment: String,
}

impl DecideForm {
    /// The verdict and the request (`raw`, from the path) it is for, or
    /// the error page for anything else.
    pub(super) fn decision(&self, raw: &str, session: &Session) -> Result<(Verdict, ApprovalId), Box<Response>> {
        let bad = |reason: &str| Box::new(pages::error(StatusCode::BAD_REQUEST, reason, Some(session)));
        let verdict = match self.verdict.as_str() {
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            other => return Err(bad(&format!("`{other}` is not a verdict"))),
        };
        let id = raw.parse::<ApprovalId>().map_err(|reason| bad(&reason))?;
        Ok((verdict, id))
    }

    /// The comment, trimmed; `None` when empty.
    pub(super) fn comment(&self) -> Option<&str> {
        Some(self.comment.trim()).filter(|c| !c.is_empty())
    }
}

async fn decide(
    State(console): State<Console>,
    headers: HeaderMap,
    UrlPath(raw): UrlPath<String>,
    Form(form): Form<DecideForm>,
) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Approver) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (verdict, id) = match form.decision(&raw, &session) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    // The gateway process takes the decision on the user's behalf; the
    // record names the user (`oidc:<name>`) and the approval rules check
    // the user's names, not the daemon's uid.
    let approver = Approver {
        name: session.user.name.clone(),
        uid: nix::unistd::getuid().as_raw(),
        pid: std::process::id(),
        identity: None,
        vouched: Vouched::Oidc { aliases: session.user.aliases.clone() },
    };
    let comment = form.comment().map(str::to_owned);
    match console.services.approvals.decide(id, verdict, approver, comment).await {
        Ok(_) => Redirect::to("/approvals").into_response(),
        Err(e) => {
            tracing::warn!(
                target: "gateway::approval",
                id = %id, %verdict, by = %session.user.audit_name(), via = "console", error = %e,
                "approval decision refused"
            );
            approval_error(&e, &session)
        }
    }
}

/// `GET /sessions` filters.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SessionsQuery {
    pub(super) identity: Option<String>,
    pub(super) host: Option<String>,
}

/// Runs `work` on the sessions database on the blocking pool; `None`
/// when there is no database yet.
async fn with_sessions<T: Send + 'static>(
    console: &Console,
    work: impl FnOnce(&SessionStore) -> Result<T, crate::record::RecordError> + Send + 'static,
) -> Result<Option<T>, String> {
    let path = console.services.sessions_db.clone();
    tokio::task::spawn_blocking(move || {
        if !path.exists() {
            return Ok(None);
        }
        let store = SessionStore::open(&path).map_err(|e| e.to_string())?;
        work(&store).map(Some).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the sessions task failed: {e}"))?
}

async fn sessions(State(console): State<Console>, headers: HeaderMap, Query(q): Query<SessionsQuery>) -> Response {
    let session = match console.page(&headers, Role::Viewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let filter = SessionFilter {
        identity: nonempty(&q.identity),
        host: nonempty(&q.host),
        limit: Some(SESSION_LIST),
        ..SessionFilter::default()
    };
    match with_sessions(&console, move |store| store.list(&filter)).await {
        Ok(list) => pages::sessions(&session, &q, &list.unwrap_or_default()).into_response(),
        Err(e) => pages::error(StatusCode::INTERNAL_SERVER_ERROR, &e, Some(&session)),
    }
}

async fn session(State(console): State<Console>, headers: HeaderMap, UrlPath(raw): UrlPath<String>) -> Response {
    let session = match console.page(&headers, Role::Viewer) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let shown = with_sessions(&console, move |store| {
        let id = store.resolve(&raw)?;
        let summary = store.summary(&id)?;
        let records = store.records(&id)?;
        let verdict = store.verify(&id)?;
        let replay = crate::cli::sessions::replay_text(&summary, &records);
        Ok((summary, verdict, replay))
    })
    .await;
    match shown {
        Ok(Some((summary, verdict, replay))) => pages::session(&session, &summary, &verdict, &replay).into_response(),
        Ok(None) => pages::error(StatusCode::NOT_FOUND, "no sessions have been recorded", Some(&session)),
        Err(e) => pages::error(StatusCode::NOT_FOUND, &e, Some(&session)),
    }
}

/// Labels shown for a map of CI variables.
pub(super) fn job_line(job: &BTreeMap<String, String>) -> String {
    job.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}
