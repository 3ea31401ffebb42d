//! The console's fleet pages: every host's approval requests, findings and
//! sessions as the central store holds them (`fleet.store`), each with the
//! host it came from, and approval decisions taken through the store.
//!
//! Nothing here decides on its own: a decision goes through
//! [`crate::fleet::approvals::decide`], exactly as `gateway approvals
//! approve --store` does (the rules checked against the store's copy of
//! the request, with the signed-in user vouched for by the identity
//! provider), and the holding host checks every rule again before it
//! releases anything. The pages open a connection to the store per
//! request: a console is read by people, a few requests a minute, and a
//! store that is down shows as an error on the page, never as a stale list.

use std::time::Duration;

use axum::{
    extract::{Form, Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use maud::{html, Markup};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    pages::{self, csrf, layout, when},
    routes::{Console, DecideForm},
    session::{Role, Session},
    FleetDesk,
};
use crate::{
    approval::{ApprovalId, State as ApprovalState, Verdict, Vouched},
    fleet::{
        approvals::{self as central, Applied, CentralApproval, CentralDecision, DecideError},
        read::{self, CentralFinding, CentralSession},
    },
};

/// Rows listed per page.
const LIST: usize = 200;
/// How long a decision waits for the holding host to say what it did
/// before the page answers (the host applies it later if it is slow).
const APPLIED_WAIT: Duration = Duration::from_secs(3);
/// Log target of console decisions.
const TARGET: &str = "gateway::console";

/// The fleet routes (merged into the console's router).
pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/fleet/approvals", get(approvals))
        .route("/fleet/approvals/{host}/{id}/decide", post(decide))
        .route("/fleet/findings", get(findings))
        .route("/fleet/sessions", get(sessions))
}

/// The store's connection for one page, or the error page to show.
async fn store(desk: &FleetDesk, session: &Session) -> Result<tokio_postgres::Client, Box<Response>> {
    let unavailable = |e: crate::fleet::FleetError| {
        Box::new(pages::error(
            StatusCode::BAD_GATEWAY,
            &format!("the fleet's central store cannot be read: {e}"),
            Some(session),
        ))
    };
    let client = crate::fleet::central::connect(&desk.config, None).await.map_err(unavailable)?;
    crate::fleet::central::check_schema(&client).await.map_err(unavailable)?;
    Ok(client)
}

/// The fleet desk, or a 404 page on a console without a fleet store.
fn desk<'a>(console: &'a Console, session: &Session) -> Result<&'a FleetDesk, Box<Response>> {
    console.services.fleet.as_deref().ok_or_else(|| {
        Box::new(pages::error(
            StatusCode::NOT_FOUND,
            "this gateway ships to no central store (fleet.store is not configured)",
            Some(session),
        ))
    })
}

/// A page of the fleet: the session (at least `need`) and a store
/// connection, or the response that says why not.
async fn open(
    console: &Console,
    headers: &HeaderMap,
    need: Role,
) -> Result<(Session, tokio_postgres::Client), Box<Response>> {
    let session = console.page(headers, need)?;
    let desk = desk(console, &session)?;
    let client = store(desk, &session).await?;
    Ok((session, client))
}

fn nanos(n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

async fn approvals(State(console): State<Console>, headers: HeaderMap) -> Response {
    let (session, client) = match open(&console, &headers, Role::Viewer).await {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let listed =
        tokio::try_join!(central::list(&client, Some(ApprovalState::Pending), LIST), central::list(&client, None, 50),);
    match listed {
        Ok((pending, recent)) => {
            let now = OffsetDateTime::now_utc();
            let finished: Vec<_> = recent.into_iter().filter(|a| a.state != "pending").collect();
            approvals_page(&session, &pending, &finished, now).into_response()
        }
        Err(e) => pages::error(StatusCode::BAD_GATEWAY, &e.to_string(), Some(&session)),
    }
}

async fn decide(
    State(console): State<Console>,
    headers: HeaderMap,
    UrlPath((host, raw)): UrlPath<(String, String)>,
    Form(form): Form<DecideForm>,
) -> Response {
    let session = match console.post(&headers, &form.csrf, Role::Approver) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let desk = match desk(&console, &session) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let (verdict, id) = match form.decision(&raw, &session) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let mut client = match store(desk, &session).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // The gateway takes the decision on the user's behalf; the rules check
    // the user's names (every alias the provider gave), not the daemon's uid.
    let vouched = Vouched::Oidc { aliases: session.user.aliases.clone() };
    let comment = form.comment();
    let decision = CentralDecision {
        host_id: Some(&host),
        id,
        verdict,
        by: &session.user.name,
        vouched: &vouched,
        uid: nix::unistd::getuid().as_raw(),
        caller_user: None,
        comment,
        decided_on: &desk.host_id,
    };
    let decided = match central::decide(&mut client, &desk.groups, &decision).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                target: TARGET,
                host = %host, id = %id, %verdict, by = %session.user.audit_name(), via = "console (fleet)", error = %e,
                "central approval decision refused"
            );
            let status = match &e {
                DecideError::Refused(e) => e.http_status(),
                DecideError::Store(_) => StatusCode::BAD_GATEWAY,
            };
            return pages::error(status, &e.to_string(), Some(&session));
        }
    };
    tracing::info!(
        target: TARGET,
        host = %decided.host_id, id = %id, %verdict, by = %session.user.audit_name(), via = "console (fleet)",
        decision = decided.decision_id, "central approval decision recorded"
    );
    let applied = central::wait_applied(&client, decided.decision_id, APPLIED_WAIT).await;
    decided_page(&session, &decided.host_id, id, verdict, &applied).into_response()
}

async fn findings(State(console): State<Console>, headers: HeaderMap) -> Response {
    let (session, client) = match open(&console, &headers, Role::Reviewer).await {
        Ok(o) => o,
        Err(r) => return *r,
    };
    match read::findings(&client).await {
        Ok(list) => findings_page(&session, &list).into_response(),
        Err(e) => pages::error(StatusCode::BAD_GATEWAY, &e.to_string(), Some(&session)),
    }
}

/// `GET /fleet/sessions` filter.
#[derive(Debug, Default, Deserialize)]
struct SessionsQuery {
    host_id: Option<String>,
}

async fn sessions(State(console): State<Console>, headers: HeaderMap, Query(q): Query<SessionsQuery>) -> Response {
    let (session, client) = match open(&console, &headers, Role::Viewer).await {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let host = q.host_id.as_deref().map(str::trim).filter(|h| !h.is_empty());
    match read::sessions(&client, host, LIST as i64).await {
        Ok(list) => sessions_page(&session, host, &list).into_response(),
        Err(e) => pages::error(StatusCode::BAD_GATEWAY, &e.to_string(), Some(&session)),
    }
}

/// The fleet section's own navigation.
fn fleet_nav() -> Markup {
    html! {
        p.fleet-nav {
            "Every host's records in the central store: "
            a href="/fleet/approvals" { "approvals" } " · "
            a href="/fleet/findings" { "findings" } " · "
            a href="/fleet/sessions" { "sessions" }
        }
    }
}

fn approvals_page(
    session: &Session,
    pending: &[CentralApproval],
    finished: &[CentralApproval],
    now: OffsetDateTime,
) -> Markup {
    let can_decide = session.user.role >= Role::Approver;
    let body = html! {
        (fleet_nav())
        p.note { "A decision here is recorded in the central store; the host holding the request checks the rules again (approver group, nobody approves a request they are behind, distinct approvers) before it releases anything." }
        @if pending.is_empty() {
            p #fleet-pending-empty.empty { "Nothing is waiting on any host." }
        } @else {
            table #fleet-pending {
                thead { tr { th { "Host" } th { "Id" } th { "Rule" } th { "Identity" } th { "Request" } th { "Approvals needed" } th { "Requested" } th {} } }
                tbody {
                    @for a in pending {
                        tr data-host=(a.host_id) data-id=(a.id.to_string()) {
                            td { (a.host_id) }
                            td { (a.id) }
                            td { (a.rule) " (" (a.group) ")" }
                            td { (a.identity) }
                            td { code { (a.method) " " (a.url) } }
                            td.num { (a.min_approvals) }
                            td { (when(a.created_at)) }
                            td {
                                @if can_decide {
                                    form.decide method="post" action={ "/fleet/approvals/" (a.host_id) "/" (a.id) "/decide" } {
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
        }
        h2 { "Recently finished" }
        table #fleet-decided {
            thead { tr { th { "Host" } th { "Id" } th { "State" } th { "Identity" } th { "Request" } th { "Requested" } } }
            tbody {
                @for a in finished {
                    tr {
                        td { (a.host_id) }
                        td { (a.id) }
                        td { (a.state) }
                        td { (a.identity) }
                        td { code { (a.method) " " (a.url) } }
                        td { (when(a.created_at)) }
                    }
                }
            }
        }
        p.note { "As of " (when(now)) "." }
    };
    layout("Fleet approvals", Some(session), body)
}

fn decided_page(
    session: &Session,
    host: &str,
    id: ApprovalId,
    verdict: Verdict,
    applied: &Result<Option<(Applied, Option<String>)>, crate::fleet::FleetError>,
) -> Markup {
    let outcome = match applied {
        Ok(Some((Applied::Applied, _))) => format!("{host} applied it."),
        Ok(Some((Applied::Rejected, reason))) => {
            format!("{host} rejected it: {}", reason.as_deref().unwrap_or("its rules refused it"))
        }
        Ok(Some((Applied::Stale, _))) => format!("{host} had already finished the request: nothing to apply."),
        Ok(None) => {
            format!("{host} has not applied it yet (it does as soon as it reads the store; it may be offline).")
        }
        Err(e) => format!("recorded, but what {host} did cannot be read: {e}"),
    };
    let body = html! {
        (fleet_nav())
        p #fleet-decision { (verdict.as_str()) " of " (host) "/" (id) " recorded in the central store. " span #fleet-outcome { (outcome) } }
        p { a href="/fleet/approvals" { "Back to the fleet's approvals" } }
    };
    layout("Decision recorded", Some(session), body)
}

fn findings_page(session: &Session, list: &[CentralFinding]) -> Markup {
    let body = html! {
        (fleet_nav())
        p.note { "One finding per key and rule across the fleet; each host reviews its own (status per host)." }
        @if list.is_empty() {
            p.empty { "No findings in the central store." }
        } @else {
            table #fleet-findings {
                thead { tr { th { "Central id" } th { "Rule" } th { "Preview" } th { "Fingerprint" } th { "Hosts (local id, status)" } th { "Seen" } th { "First seen" } th { "Last seen" } } }
                tbody {
                    @for f in list {
                        tr {
                            td { (f.id) }
                            td { (f.rule_id) }
                            td { code { (f.preview) } }
                            td { code { (f.fingerprint.get(..16).unwrap_or(&f.fingerprint)) } }
                            td {
                                @for h in &f.hosts {
                                    (h.host_id) ": F-" (h.local_id) " (" (h.status) ")" br;
                                }
                            }
                            td.num { (f.sightings) }
                            td { (when(nanos(f.first_seen))) }
                            td { (when(nanos(f.last_seen))) }
                        }
                    }
                }
            }
        }
    };
    layout("Fleet findings", Some(session), body)
}

fn sessions_page(session: &Session, host: Option<&str>, list: &[CentralSession]) -> Markup {
    let body = html! {
        (fleet_nav())
        form.filters method="get" action="/fleet/sessions" {
            label { "Host id " input type="text" name="host_id" value=(host.unwrap_or_default()); }
            button type="submit" { "Filter" }
        }
        p.note { "Replay and verify a session on its host (`gateway sessions replay`), or every chain here with `gateway sessions verify --store`." }
        @if list.is_empty() {
            p.empty { "No sessions match." }
        } @else {
            table #fleet-sessions {
                thead { tr { th { "Host" } th { "Session" } th { "Started" } th { "Identity" } th { "Destination" } th { "Protocol" } th { "Outcome" } th { "Records" } } }
                tbody {
                    @for s in list {
                        tr {
                            td { (s.host_id) }
                            td { (s.id) }
                            td { (when(nanos(s.started))) }
                            td { (s.identity) }
                            td { (s.host) }
                            td { (s.protocol) }
                            td { (s.outcome.as_deref().unwrap_or("-")) }
                            td.num { (s.records) }
                        }
                    }
                }
            }
        }
    };
    layout("Fleet sessions", Some(session), body)
}
