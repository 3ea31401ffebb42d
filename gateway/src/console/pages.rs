//! The console's pages, rendered on the server with maud: the templates are
//! Rust, checked when the gateway is compiled, and every interpolated value
//! is HTML-escaped unless marked otherwise (nothing here is). No page holds
//! inline script or style (the CSP forbids both); the one script and the
//! stylesheet are embedded files served from `/assets/`.
//!
//! Nothing rendered is secret: findings carry fingerprints and redacted
//! previews only, approvals their masked URL and body preview, sessions the
//! masked recording as `gateway sessions replay` prints it.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::{html, Markup, DOCTYPE};
use time::OffsetDateTime;

use super::{
    routes::{job_line, FindingsQuery, SessionsQuery},
    session::{Role, Session},
};
use crate::{
    approval::ApprovalView,
    findings::{AllowEntry, Finding, Status},
    record::{SessionSummary, Verdict},
};

/// UTC to the second: what a reviewer reads.
pub(super) fn when(t: OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    t.to_offset(time::UtcOffset::UTC).format(&format).unwrap_or_else(|_| t.to_string())
}

/// The frame of every page: navigation, the signed-in user, sign-out.
pub(super) fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = session {
                    meta name="csrf-token" content=(s.csrf);
                }
                title { (title) " · CI gateway console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    span.brand { "CI gateway" }
                    @if let Some(s) = session {
                        nav {
                            @if s.user.role >= Role::Reviewer {
                                a href="/findings" { "Findings" }
                                a href="/allowlist" { "Allowlist" }
                            }
                            a href="/approvals" { "Approvals" }
                            a href="/sessions" { "Sessions" }
                            @if s.fleet {
                                a href="/fleet/approvals" { "Fleet" }
                            }
                        }
                        span.user {
                            span #user-name { (s.user.name) }
                            " (" span #user-role { (s.user.role.as_str()) } ")"
                            form.inline method="post" action="/auth/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// An error page with `status`.
pub fn error(status: StatusCode, message: &str, session: Option<&Session>) -> Response {
    let body = html! {
        p.error #error { (message) }
        @if session.is_none() {
            p { a href="/auth/login" { "Sign in" } }
        }
    };
    (status, layout(&format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")), session, body))
        .into_response()
}

/// After sign-out.
pub fn signed_out() -> Markup {
    layout("Signed out", None, html! { p { a href="/auth/login" { "Sign in again" } } })
}

pub(super) fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// The findings list with its filters.
pub fn findings(session: &Session, q: &FindingsQuery, list: &[Finding]) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let body = html! {
        form.filters method="get" action="/findings" {
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in Status::ALL {
                        option value=(s.as_str()) selected[q.status.as_deref() == Some(s.as_str())] { (s.as_str()) }
                    }
                }
            }
            label { "Rule " input type="text" name="rule" value=(value(&q.rule)) placeholder="glob"; }
            label { "Identity " input type="text" name="identity" value=(value(&q.identity)) placeholder="glob"; }
            label { "Destination " input type="text" name="host" value=(value(&q.host)) placeholder="host glob"; }
            label { "Fingerprint " input type="text" name="fingerprint" value=(value(&q.fingerprint)); }
            button type="submit" { "Filter" }
        }
        @if list.is_empty() {
            p.empty { "No findings match." }
        } @else {
            table #findings {
                thead { tr { th { "Id" } th { "Rule" } th { "Status" } th { "Preview" } th { "Destination" } th { "Identity" } th { "Seen" } th { "Last seen" } } }
                tbody {
                    @for f in list {
                        tr {
                            td { a.finding-link href={ "/findings/" (f.id) } { (f.id) } }
                            td { (f.rule_id) }
                            td { span class={ "status status-" (f.status.as_str()) } { (f.status.as_str()) } }
                            td { code { (f.preview) } }
                            td { (f.destination()) }
                            td { (f.identity.as_deref().unwrap_or("-")) }
                            td.num { (f.count) }
                            td { (when(f.last_seen)) }
                        }
                    }
                }
            }
        }
    };
    layout("Findings", Some(session), body)
}

/// One finding: its key, the sighting timeline, the review history, the
/// allowlist entries made for it, and the forms to act on it.
pub fn finding(session: &Session, f: &Finding, entries: &[AllowEntry]) -> Markup {
    let now = OffsetDateTime::now_utc();
    let identities: Vec<&str> = {
        let mut ids: Vec<&str> = f.sightings.iter().filter_map(|s| s.identity.as_deref()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let hosts: Vec<&str> = {
        let mut hosts: Vec<&str> = f.sightings.iter().map(|s| s.dest_host.as_str()).collect();
        hosts.push(&f.dest_host);
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    };
    let body = html! {
        dl.facts {
            dt { "Rule" } dd { (f.rule_id) " (" (f.confidence) ")" }
            dt { "Status" } dd { span #finding-status class={ "status status-" (f.status.as_str()) } { (f.status.as_str()) } }
            dt { "Fingerprint" } dd { code { (f.fingerprint) } " " a href={ "/findings?fingerprint=" (f.fingerprint) } { "all findings of this key" } }
            dt { "Preview" } dd { code { (f.preview) } }
            dt { "Seen" } dd { (f.count) " times, " (when(f.first_seen)) " to " (when(f.last_seen)) }
        }
        h2 { "Sightings" }
        table #sightings {
            thead { tr { th { "When" } th { "Identity" } th { "Process" } th { "Job" } th { "Destination" } th { "Where" } th { "Action" } th { "Session" } } }
            tbody {
                @for s in &f.sightings {
                    tr {
                        td { (when(s.seen_at)) }
                        td { (s.identity.as_deref().unwrap_or("-")) }
                        td {
                            (s.process.exe.as_deref().unwrap_or(&s.process.comm))
                            @if let Some(c) = &s.command { br; code.command { (c) } }
                            @if let Some(script) = &s.script { br; "script " code { (script) } }
                            @if let Some(c) = &s.process.container { br; "container " (format!("{c:?}")) }
                        }
                        td { (job_line(&s.process.job)) }
                        td { (s.dest_host) ":" (s.dest_port) }
                        td { (s.location) }
                        td { (s.action.as_str()) @if let Some(by) = &s.allowed_by { " (allowed by " (by) ")" } }
                        td { @if let Some(id) = &s.session_id { a href={ "/sessions/" (id) } { (id) } } @else { "-" } }
                    }
                }
            }
        }
        h2 { "History" }
        table #history {
            thead { tr { th { "When" } th { "Change" } th { "By" } th { "Comment" } } }
            tbody {
                @for h in &f.history {
                    tr {
                        td { (when(h.at)) }
                        td { (h.from.map_or("-", Status::as_str)) " → " (h.to.as_str()) }
                        td { (h.by) }
                        td { (h.comment) }
                    }
                }
            }
        }
        h2 { "Allowlist entries for this key" }
        (allow_table(session, entries, now))
        div.actions {
            form #status-form method="post" action={ "/findings/" (f.id) "/status" } {
                h3 { "Change status" }
                (csrf(session))
                label { "New status "
                    select name="status" {
                        @for s in f.status.allowed_next() { option value=(s.as_str()) { (s.as_str()) } }
                    }
                }
                label { "Comment " input type="text" name="comment" required; }
                button type="submit" { "Apply" }
            }
            form #allow-form method="post" action={ "/findings/" (f.id) "/allow" } {
                h3 { "Allow this key (accepted risk)" }
                (csrf(session))
                label { "Scope "
                    select name="scope" {
                        @for h in &hosts { option value={ "destination=" (h) } { "destination " (h) } }
                        @for i in &identities { option value={ "identity=" (i) } { "identity " (i) } }
                        option value="everywhere" { "everywhere" }
                    }
                }
                label { "Expires in "
                    select name="expires" {
                        option value="1h" { "1 hour" }
                        option value="1d" { "1 day" }
                        option value="7d" selected { "7 days" }
                        option value="30d" { "30 days" }
                        option value="90d" { "90 days" }
                        option value="never" { "never (until revoked)" }
                    }
                }
                label { "Reason " input type="text" name="reason" required; }
                button type="submit" { "Allow" }
            }
        }
    };
    layout(&format!("Finding {}", f.id), Some(session), body)
}

fn allow_table(session: &Session, entries: &[AllowEntry], now: OffsetDateTime) -> Markup {
    html! {
        @if entries.is_empty() {
            p.empty { "None." }
        } @else {
            table.allowlist {
                thead { tr { th { "Id" } th { "Finding" } th { "Scope" } th { "Expires" } th { "Reason" } th { "By" } th { "State" } th {} } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (e.id) }
                            td { a href={ "/findings/" (e.finding) } { (e.finding) } }
                            td { (e.scope) }
                            td { (e.expires_at.map_or_else(|| "never".to_owned(), when)) }
                            td { (e.reason) }
                            td { (e.created_by) }
                            td {
                                @if let Some(by) = &e.revoked_by { "revoked by " (by) }
                                @else if e.active(now) { "active" }
                                @else { "expired" }
                            }
                            td {
                                @if e.active(now) {
                                    form.inline method="post" action={ "/allowlist/" (e.id) "/revoke" } {
                                        (csrf(session))
                                        input type="text" name="comment" placeholder="why" required;
                                        button type="submit" { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every allowlist entry.
pub fn allowlist(session: &Session, entries: &[AllowEntry]) -> Markup {
    layout("Allowlist", Some(session), allow_table(session, entries, OffsetDateTime::now_utc()))
}

/// One pending approval as the page's script renders it (the same fields
/// as the server-rendered row; all masked by the proxy before storage).
pub fn approval_json(a: &ApprovalView) -> serde_json::Value {
    serde_json::json!({
        "id": a.id.to_string(),
        "rule": a.rule,
        "group": a.group,
        "identity": a.identity,
        "request": format!("{} {}", a.method, a.url),
        "destination": a.destination,
        "job": job_line(&a.job),
        "approvals": format!("{}/{}", a.approved_by().len(), a.min_approvals),
        "expires_at": when(a.expires_at),
    })
}

/// The approval queue: pending requests (kept current by the script) and
/// recently decided ones.
pub fn approvals(session: &Session, pending: &[ApprovalView], finished: &[ApprovalView]) -> Markup {
    let can_decide = session.user.role >= Role::Approver;
    let body = html! {
        p.note { "Pending requests refresh every two seconds. Approving needs the approver role and membership of the request's approver group; nobody approves a request they are behind." }
        table #pending data-can-decide=(can_decide) {
            thead { tr { th { "Id" } th { "Rule" } th { "Identity" } th { "Request" } th { "Job" } th { "Approvals" } th { "Expires" } th {} } }
            tbody {
                @for a in pending {
                    @let row = approval_json(a);
                    tr data-id=(row["id"].as_str().unwrap_or_default()) {
                        td { (a.id) }
                        td { (a.rule) " (" (a.group) ")" }
                        td { (a.identity) }
                        td { code { (a.method) " " (a.url) } }
                        td { (job_line(&a.job)) }
                        td { (row["approvals"].as_str().unwrap_or_default()) }
                        td { (when(a.expires_at)) }
                        td {
                            @if can_decide {
                                form.decide method="post" action={ "/approvals/" (a.id) "/decide" } {
                                    (csrf(session))
                                    input type="text" name="comment" placeholder="comment";
                                    button type="submit" name="verdict" value="approve" { "Approve" }
                                    button type="submit" name="verdict" value="deny" { "Deny" }
                                }
                            }
                        }
                    }
                }
            }
        }
        p #pending-empty.empty hidden[!pending.is_empty()] { "Nothing is waiting." }
        h2 { "Recently decided" }
        table #decided {
            thead { tr { th { "Id" } th { "State" } th { "Identity" } th { "Request" } th { "Decisions" } } }
            tbody {
                @for a in finished {
                    tr {
                        td { (a.id) }
                        td { (a.state.as_str()) }
                        td { (a.identity) }
                        td { code { (a.method) " " (a.url) } }
                        td {
                            @for d in &a.decisions {
                                (d.verdict.as_str()) " by " (d.recorded_as)
                                @if let Some(c) = &d.comment { ": " (c) }
                                br;
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Approvals", Some(session), body)
}

/// Recorded sessions.
pub fn sessions(session: &Session, q: &SessionsQuery, list: &[SessionSummary]) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let body = html! {
        form.filters method="get" action="/sessions" {
            label { "Identity " input type="text" name="identity" value=(value(&q.identity)) placeholder="glob"; }
            label { "Host " input type="text" name="host" value=(value(&q.host)) placeholder="glob"; }
            button type="submit" { "Filter" }
        }
        @if list.is_empty() {
            p.empty { "No sessions match." }
        } @else {
            table #sessions {
                thead { tr { th { "Session" } th { "Started" } th { "Identity" } th { "Destination" } th { "Protocol" } th { "Process" } th { "State" } th { "Outcome" } th { "Exchanges" } } }
                tbody {
                    @for s in list {
                        tr {
                            td { a.session-link href={ "/sessions/" (s.id.as_str()) } { (s.id.as_str()) } }
                            td { (when(s.started)) }
                            td { (s.identity) }
                            td { (s.host) " (" (s.orig_dst) ")" }
                            td { (s.protocol) }
                            td { (s.comm) " [" (s.pid) "]" }
                            td { (s.state.as_str()) }
                            td { (s.outcome.as_deref().unwrap_or("-")) }
                            td.num { (s.exchanges) }
                        }
                    }
                }
            }
        }
    };
    layout("Sessions", Some(session), body)
}

/// One session: its chain's verification and its replay.
pub fn session(session: &Session, s: &SessionSummary, verdict: &Verdict, replay: &str) -> Markup {
    let body = html! {
        dl.facts {
            dt { "Identity" } dd { (s.identity) }
            dt { "Destination" } dd { (s.host) " (" (s.orig_dst) ")" }
            dt { "Process" } dd { (s.comm) " [" (s.pid) "]" }
            dt { "State" } dd { (s.state.as_str()) }
            dt { "Hash chain" } dd {
                span #chain class={ "chain " (if verdict.is_intact() { "intact" } else { "broken" }) } { (verdict.to_string()) }
            }
        }
        h2 { "Replay" }
        pre #replay { (replay) }
    };
    layout(&format!("Session {}", s.id.as_str()), Some(session), body)
}
