//! The approval service against a real SQLite database in a temporary
//! directory.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use tokio::sync::broadcast;

use super::{
    store::ApprovalStore, ApprovalConfig, ApprovalError, ApprovalEvent, ApprovalId, ApprovalSpec, Approvals, Approver,
    EventKind, ListFilter, NewApproval, Outcome, State, Verdict, Vouched, WebhookConfig,
};
use crate::limits::{Limit, LimitExceeded};

const IDENTITY: &str = "spiffe://ci.test/deployer";

fn config() -> ApprovalConfig {
    ApprovalConfig {
        groups: BTreeMap::from([
            ("release".to_owned(), vec!["alice".to_owned(), "bob".to_owned(), "carol".to_owned()]),
            ("ops".to_owned(), vec!["dave".to_owned()]),
        ]),
        ..Default::default()
    }
}

fn users() -> super::UserLookup {
    Arc::new(|uid| match uid {
        0 => Some("root".to_owned()),
        1000 => Some("alice".to_owned()),
        1001 => Some("eve".to_owned()),
        1500 => Some("runner".to_owned()),
        _ => None,
    })
}

fn open_with(dir: &Path, config: &ApprovalConfig) -> Approvals {
    let store = ApprovalStore::open(&config.database_path(dir)).unwrap();
    Approvals::with_store(config, store, None, users()).unwrap()
}

fn open(dir: &Path) -> Approvals {
    open_with(dir, &config())
}

fn spec(min: u32, timeout: Duration) -> ApprovalSpec {
    ApprovalSpec { group: "release".into(), min_approvals: min, timeout }
}

fn new_request() -> NewApproval {
    NewApproval {
        identity: IDENTITY.into(),
        identity_labels: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
        process: crate::process::ProcessSnapshot { pid: 4242, uid: 1500, comm: "curl".into(), ..Default::default() },
        job: BTreeMap::from([
            ("CI_JOB_ID".to_owned(), "77".to_owned()),
            ("GITHUB_ACTOR".to_owned(), "carol".to_owned()),
        ]),
        session_id: Some("S-9".into()),
        method: "POST".into(),
        url: "https://deploy.internal/v1/release?token=[masked]".into(),
        destination: "deploy.internal:443".into(),
        body_preview: "{\"version\":\"1.2.3\"}".into(),
        rule: "prod-deploys".into(),
        requesters: Vec::new(),
        cgroup_id: 1,
    }
}

fn root_for(name: &str) -> Approver {
    Approver { name: name.into(), uid: 0, pid: 1, identity: None, vouched: Vouched::Kernel }
}

/// Starts a request on a task and returns its id once it is stored.
async fn held(
    approvals: &Approvals,
    events: &mut broadcast::Receiver<ApprovalEvent>,
    spec: ApprovalSpec,
) -> (ApprovalId, tokio::task::JoinHandle<Outcome>) {
    let a = approvals.clone();
    let task = tokio::spawn(async move { a.request(new_request(), &spec).await });
    let event = next_event(events).await;
    assert_eq!(event.kind, EventKind::ApprovalRequested);
    assert_eq!(event.approval.state, State::Pending);
    (event.approval.id, task)
}

async fn next_event(events: &mut broadcast::Receiver<ApprovalEvent>) -> ApprovalEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("an event in time").unwrap()
}

async fn outcome(task: tokio::task::JoinHandle<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(60), task).await.expect("an outcome in time").unwrap()
}

#[tokio::test]
async fn an_approval_releases_the_held_request_and_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
    assert_eq!(approvals.waiting(), 1);

    let stored = approvals.get(id).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Pending);
    assert_eq!(stored.rule, "prod-deploys");
    assert_eq!(stored.group, "release");
    assert_eq!(stored.session_id.as_deref(), Some("S-9"));
    assert_eq!(stored.process.comm, "curl");
    assert_eq!(stored.identity_labels["team"], "payments");
    assert_eq!(stored.requesters, [IDENTITY, "carol", "runner"]);
    assert!(stored.expires_at > stored.created_at);

    let view = approvals.decide(id, Verdict::Approve, root_for("alice"), Some("ship it".into())).await.unwrap();
    assert_eq!(view.state, State::Approved);
    assert_eq!(outcome(task).await, Outcome::Approved { id, by: vec!["alice (via uid 0)".into()] });
    assert_eq!(approvals.waiting(), 0);

    let decided = next_event(&mut events).await;
    assert_eq!(decided.kind, EventKind::ApprovalDecided);
    assert_eq!(decided.decision.as_ref().unwrap().comment.as_deref(), Some("ship it"));
    let stored = approvals.get(id).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Approved);
    assert!(stored.finished_at.is_some());
    assert_eq!(stored.decisions.len(), 1);
    assert_eq!(stored.decisions[0].approver, "alice");
    assert_eq!(stored.decisions[0].recorded_as, "alice (via uid 0)");
    assert_eq!((stored.decisions[0].uid, stored.decisions[0].pid), (0, 1));
}

#[tokio::test]
async fn min_approvals_counts_distinct_approvers() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(2, Duration::from_secs(60))).await;

    let view = approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap();
    assert_eq!(view.state, State::Pending);
    // Root acting for alice again, or alice herself, is still alice.
    let again = Approver { name: "alice".into(), uid: 1000, pid: 9, identity: None, vouched: Vouched::Kernel };
    let err = approvals.decide(id, Verdict::Approve, again, None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::AlreadyDecided { ref approver, .. } if approver == "alice"), "{err}");
    assert_eq!(err.http_status(), http::StatusCode::CONFLICT);
    assert!(!task.is_finished());

    let view = approvals.decide(id, Verdict::Approve, root_for("bob"), None).await.unwrap();
    assert_eq!(view.state, State::Approved);
    assert_eq!(
        outcome(task).await,
        Outcome::Approved { id, by: vec!["alice (via uid 0)".into(), "bob (via uid 0)".into()] }
    );
}

#[tokio::test]
async fn one_deny_denies_at_once_and_later_decisions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(2, Duration::from_secs(60))).await;

    approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap();
    let view = approvals.decide(id, Verdict::Deny, root_for("bob"), Some("not on a Friday".into())).await.unwrap();
    assert_eq!(view.state, State::Denied);
    assert_eq!(
        outcome(task).await,
        Outcome::Denied { id, by: "bob (via uid 0)".into(), comment: Some("not on a Friday".into()) }
    );
    for verdict in [Verdict::Approve, Verdict::Deny] {
        let err = approvals.decide(id, verdict, root_for("alice"), None).await.unwrap_err();
        assert!(matches!(err, ApprovalError::AlreadyFinished { state: State::Denied, .. }), "{err}");
    }
    assert_eq!(approvals.get(id).await.unwrap().unwrap().decisions.len(), 2);
}

#[tokio::test]
async fn approvers_outside_the_group_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;

    let err = approvals.decide(id, Verdict::Approve, root_for("dave"), None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("not a member")), "{err}");
    assert_eq!(err.http_status(), http::StatusCode::FORBIDDEN);
    let stored = approvals.get(id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.decisions.len()), (State::Pending, 0));
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn a_non_root_approver_decides_only_under_their_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;

    // uid 1001 is eve: she cannot type her way into being alice.
    let eve_as_alice = Approver { name: "alice".into(), uid: 1001, pid: 5, identity: None, vouched: Vouched::Kernel };
    let err = approvals.decide(id, Verdict::Approve, eve_as_alice, None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("you are eve")), "{err}");
    // A uid without a user name matches nobody.
    let nameless = Approver { name: "alice".into(), uid: 4321, pid: 5, identity: None, vouched: Vouched::Kernel };
    assert!(matches!(
        approvals.decide(id, Verdict::Deny, nameless, None).await.unwrap_err(),
        ApprovalError::NotAllowed(_)
    ));

    let alice = Approver {
        name: "alice".into(),
        uid: 1000,
        pid: 5,
        identity: Some("spiffe://ci.test/laptop".into()),
        vouched: Vouched::Kernel,
    };
    approvals.decide(id, Verdict::Approve, alice, None).await.unwrap();
    assert_eq!(outcome(task).await, Outcome::Approved { id, by: vec!["alice".into()] });
    let stored = approvals.get(id).await.unwrap().unwrap();
    assert_eq!(stored.decisions[0].identity.as_deref(), Some("spiffe://ci.test/laptop"));
}

#[tokio::test]
async fn the_requester_cannot_approve_its_own_request() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;

    // The approving process has the requesting identity.
    let same_identity =
        Approver { name: "alice".into(), uid: 0, pid: 7, identity: Some(IDENTITY.into()), vouched: Vouched::Kernel };
    let err = approvals.decide(id, Verdict::Approve, same_identity, None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("own request")), "{err}");
    // carol triggered the job (GITHUB_ACTOR) and is in the group.
    let err = approvals.decide(id, Verdict::Approve, root_for("carol"), None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("requester")), "{err}");
    assert!(!task.is_finished());

    approvals.decide(id, Verdict::Approve, root_for("bob"), None).await.unwrap();
    assert!(matches!(outcome(task).await, Outcome::Approved { .. }));
}

#[tokio::test]
async fn a_timeout_refuses_the_request_and_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let started = std::time::Instant::now();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_millis(300))).await;
    assert_eq!(outcome(task).await, Outcome::TimedOut { id });
    assert!(started.elapsed() >= Duration::from_millis(300));
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.approval.state), (EventKind::ApprovalTimedOut, State::TimedOut));

    let stored = approvals.get(id).await.unwrap().unwrap();
    assert_eq!(stored.state, State::TimedOut);
    assert!(stored.finished_at.is_some());
    assert_eq!(approvals.waiting(), 0);
    let err = approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::AlreadyFinished { state: State::TimedOut, .. }), "{err}");
}

#[tokio::test]
async fn a_request_whose_client_goes_away_is_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
    task.abort();
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.approval.id), (EventKind::ApprovalAbandoned, id));
    assert_eq!(approvals.get(id).await.unwrap().unwrap().state, State::Abandoned);
    assert_eq!(approvals.waiting(), 0);
    let err = approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::AlreadyFinished { state: State::Abandoned, .. }), "{err}");
}

#[tokio::test]
async fn a_client_gone_while_the_request_is_being_stored_leaves_nothing_pending() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let spec = spec(1, Duration::from_secs(60));
    for _ in 0..5 {
        let held = approvals.request(new_request(), &spec);
        // One poll starts storing; then the client is gone.
        let polled = tokio::time::timeout(Duration::from_millis(1), held).await;
        assert!(polled.is_err());
    }
    // Storing and abandoning run on blocking tasks: poll until they are
    // done (a generous bound; a loaded machine runs them late, not never).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut all = Vec::new();
    while std::time::Instant::now() < deadline {
        all = approvals.list(ListFilter::default()).await.unwrap();
        if all.len() == 5 && all.iter().all(|v| v.state == State::Abandoned) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(all.iter().map(|v| v.state).collect::<Vec<_>>(), [State::Abandoned; 5]);
    assert_eq!(approvals.waiting(), 0);
}

#[tokio::test]
async fn pending_requests_of_a_previous_run_are_abandoned_and_decisions_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (decided, left_pending) = {
        let approvals = open(dir.path());
        let mut events = approvals.subscribe();
        let (decided, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
        approvals.decide(decided, Verdict::Approve, root_for("bob"), Some("ok".into())).await.unwrap();
        outcome(task).await;
        assert_eq!(next_event(&mut events).await.kind, EventKind::ApprovalDecided);
        // A request still held when the gateway dies: the future is never
        // dropped (as when the process is killed).
        let (left_pending, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
        std::mem::forget(task);
        (decided, left_pending)
    };
    let approvals = open(dir.path());
    let old = approvals.get(left_pending).await.unwrap().unwrap();
    assert_eq!(old.state, State::Abandoned);
    assert!(old.finished_at.is_some());
    let kept = approvals.get(decided).await.unwrap().unwrap();
    assert_eq!(kept.state, State::Approved);
    assert_eq!(kept.decisions[0].recorded_as, "bob (via uid 0)");
    assert_eq!(kept.decisions[0].comment.as_deref(), Some("ok"));
    // New ids never reuse old ones.
    let mut events = approvals.subscribe();
    let (next, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
    assert!(next > left_pending);
    // Listed before the new request goes away: aborting it abandons it too,
    // on a blocking task that would race this query.
    let abandoned = approvals.list(ListFilter { state: Some(State::Abandoned), limit: 10 }).await.unwrap();
    assert_eq!(abandoned.iter().map(|v| v.id).collect::<Vec<_>>(), [left_pending]);
    task.abort();
    assert_eq!(next_event(&mut events).await.kind, EventKind::ApprovalAbandoned);
    let abandoned = approvals.list(ListFilter { state: Some(State::Abandoned), limit: 10 }).await.unwrap();
    assert_eq!(abandoned.iter().map(|v| v.id).collect::<Vec<_>>(), [next, left_pending]);
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_decision() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let mut held_requests = Vec::new();
    for job in 0..16 {
        let a = approvals.clone();
        // One request per job: a single job may hold only
        // `max_pending_per_cgroup` open at once.
        let new = NewApproval { cgroup_id: job, ..new_request() };
        held_requests.push(tokio::spawn(async move { a.request(new, &spec(1, Duration::from_secs(60))).await }));
    }
    let mut ids = Vec::new();
    while ids.len() < 16 {
        let event = next_event(&mut events).await;
        if event.kind == EventKind::ApprovalRequested {
            ids.push(event.approval.id);
        }
    }
    assert_eq!(approvals.waiting(), 16);
    // Decide concurrently too.
    let decisions: Vec<_> = ids
        .iter()
        .map(|&id| {
            let a = approvals.clone();
            let verdict = if id.0 % 2 == 0 { Verdict::Deny } else { Verdict::Approve };
            tokio::spawn(async move { a.decide(id, verdict, root_for("alice"), None).await })
        })
        .collect();
    for d in decisions {
        d.await.unwrap().unwrap();
    }
    for task in held_requests {
        match outcome(task).await {
            Outcome::Approved { id, .. } => assert_eq!(id.0 % 2, 1),
            Outcome::Denied { id, .. } => assert_eq!(id.0 % 2, 0),
            other => panic!("unexpected {other:?}"),
        }
    }
    let all = approvals.list(ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 16);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(approvals.list(ListFilter { state: Some(State::Pending), limit: 100 }).await.unwrap().is_empty());
}

#[tokio::test]
async fn one_job_cannot_open_more_requests_than_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let config = ApprovalConfig { max_pending_per_cgroup: 3, max_pending: 5, ..config() };
    let approvals = open_with(dir.path(), &config);
    let mut events = approvals.subscribe();
    let hostile = |a: &Approvals| {
        let a = a.clone();
        tokio::spawn(async move {
            a.request(NewApproval { cgroup_id: 66, ..new_request() }, &spec(1, Duration::from_secs(60))).await
        })
    };
    // One connection's worth of requests: three are held, the rest refused
    // at once, never stored or announced.
    let held: Vec<_> = (0..3).map(|_| hostile(&approvals)).collect();
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let event = next_event(&mut events).await;
        if event.kind == EventKind::ApprovalRequested {
            ids.push(event.approval.id);
        }
    }
    for _ in 0..100 {
        match hostile(&approvals).await.unwrap() {
            Outcome::Limited(limit) => {
                assert_eq!(limit, LimitExceeded::new(Limit::PendingApprovalsPerCgroup, 3u64));
            }
            other => panic!("the 4th request of one job must be refused, got {other:?}"),
        }
    }
    assert_eq!(approvals.list(ListFilter::default()).await.unwrap().len(), 3, "nothing more was stored");
    // Another job is not affected, up to the gateway's total.
    let other = |cgroup_id| {
        let a = approvals.clone();
        tokio::spawn(async move {
            a.request(NewApproval { cgroup_id, ..new_request() }, &spec(1, Duration::from_secs(60))).await
        })
    };
    let _o1 = other(67);
    let _o2 = other(68);
    while approvals.waiting() < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match other(69).await.unwrap() {
        Outcome::Limited(limit) => assert_eq!(limit.limit, Limit::PendingApprovals),
        other => panic!("the gateway's total is reached, got {other:?}"),
    }
    // Decisions give the job its places back.
    for id in ids {
        approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap();
    }
    for task in held {
        assert!(matches!(outcome(task).await, Outcome::Approved { .. }));
    }
    let again = hostile(&approvals);
    let next = loop {
        // The other jobs' two requests are pending too: the newest is ours.
        let pending = approvals.list(ListFilter { state: Some(State::Pending), limit: 10 }).await.unwrap();
        if pending.len() == 3 {
            break pending[0].id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    approvals.decide(next, Verdict::Deny, root_for("alice"), None).await.unwrap();
    assert!(matches!(outcome(again).await, Outcome::Denied { .. }));
}

#[tokio::test]
async fn a_rule_that_does_not_fit_the_configuration_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    for bad in [
        ApprovalSpec { group: "nobody".into(), min_approvals: 1, timeout: Duration::from_secs(5) },
        ApprovalSpec { group: "ops".into(), min_approvals: 2, timeout: Duration::from_secs(5) },
        ApprovalSpec { group: "ops".into(), min_approvals: 0, timeout: Duration::from_secs(5) },
    ] {
        assert!(matches!(approvals.request(new_request(), &bad).await, Outcome::Failed { .. }), "{bad:?}");
    }
    assert!(approvals.list(ListFilter::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn decisions_are_checked_for_size_and_existence() {
    let dir = tempfile::tempdir().unwrap();
    let approvals = open(dir.path());
    let mut events = approvals.subscribe();
    let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
    let err = approvals.decide(id, Verdict::Approve, root_for("alice"), Some("x".repeat(1001))).await.unwrap_err();
    assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST);
    let err = approvals.decide(ApprovalId(999), Verdict::Approve, root_for("alice"), None).await.unwrap_err();
    assert!(matches!(err, ApprovalError::NotFound(ApprovalId(999))));
    assert_eq!(err.http_status(), http::StatusCode::NOT_FOUND);
    assert!(approvals.get(ApprovalId(999)).await.unwrap().is_none());
    task.abort();
}

#[test]
fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("approvals.db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let err = ApprovalStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("approvals.db"), "{err}");
    let err = ApprovalStore::open(&dir.path().join("missing/approvals.db")).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn configuration_parses_and_checks_rules() {
    let c: ApprovalConfig = serde_yaml_ng::from_str(
        "groups:\n  release: [alice, bob]\ndatabase: a.db\nwebhook:\n  url: https://hooks.example.com/x\n  headers: {Authorization: Bearer t}\n",
    )
    .unwrap();
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.database_path(Path::new("/s")), Path::new("/s/a.db"));
    assert_eq!(ApprovalConfig::default().database_path(Path::new("/s")), Path::new("/s/approvals.db"));
    let hook: &WebhookConfig = c.webhook.as_ref().unwrap();
    assert_eq!(hook.timeout, Duration::from_secs(5));
    assert!(serde_yaml_ng::from_str::<ApprovalConfig>("groups: {a: [x]}\nsocket: /x\n").is_err());

    let spec: ApprovalSpec = serde_yaml_ng::from_str("group: release\n").unwrap();
    assert_eq!((spec.min_approvals, spec.timeout), (1, Duration::from_secs(900)));
    assert_eq!(c.check_spec(&spec), Ok(()));
    let spec: ApprovalSpec = serde_yaml_ng::from_str("group: release\nmin_approvals: 3\ntimeout: 10m\n").unwrap();
    assert!(c.check_spec(&spec).unwrap_err().contains("only 2 member"));
    let spec = ApprovalSpec { group: "x".into(), min_approvals: 1, timeout: Duration::from_secs(1) };
    assert!(c.check_spec(&spec).unwrap_err().contains("not defined"));
    let spec = ApprovalSpec { group: "release".into(), min_approvals: 1, timeout: Duration::from_secs(2 * 86400) };
    assert!(c.check_spec(&spec).is_err());

    let bad: ApprovalConfig = serde_yaml_ng::from_str("groups: {release: []}\n").unwrap();
    assert_eq!(bad.validate().unwrap_err().0, "approvals.groups.release");
    let bad: ApprovalConfig = serde_yaml_ng::from_str("groups: {release: ['alice smith']}\n").unwrap();
    assert_eq!(bad.validate().unwrap_err().0, "approvals.groups.release[0]");
    let bad: ApprovalConfig = serde_yaml_ng::from_str("webhook: {url: 'ftp://x'}\n").unwrap();
    assert_eq!(bad.validate().unwrap_err().0, "approvals.webhook.url");
}

mod webhook {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper::{body::Incoming, Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::sync::mpsc;

    use super::*;

    /// A webhook receiver: forwards (header, JSON body) of every POST.
    async fn receiver() -> (SocketAddr, mpsc::UnboundedReceiver<(Option<String>, serde_json::Value)>) {
        receiver_answering(Vec::new()).await
    }

    /// A webhook receiver answering the statuses of `script` in turn, then
    /// 200s; every POST is forwarded, whatever the answer.
    async fn receiver_answering(
        script: Vec<http::StatusCode>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<(Option<String>, serde_json::Value)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let script = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(script)));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        let status = script.lock().unwrap().pop_front().unwrap_or(http::StatusCode::OK);
                        async move {
                            assert_eq!(req.method(), http::Method::POST);
                            assert_eq!(req.uri().path(), "/hook");
                            assert_eq!(req.headers()[http::header::CONTENT_TYPE], "application/json");
                            let token = req.headers().get("x-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send((token, serde_json::from_slice(&body).unwrap()));
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, rx)
    }

    async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("a webhook call in time").unwrap()
    }

    fn with_hook(url: String) -> ApprovalConfig {
        ApprovalConfig {
            webhook: Some(WebhookConfig {
                url,
                timeout: Duration::from_secs(2),
                headers: BTreeMap::from([("X-Token".to_owned(), "hook-secret".to_owned())]),
                retries: 2,
                retry_backoff: Duration::from_millis(20),
            }),
            ..config()
        }
    }

    #[tokio::test]
    async fn requested_and_decided_events_are_posted() {
        let (addr, mut received) = receiver().await;
        let dir = tempfile::tempdir().unwrap();
        let approvals = open_with(dir.path(), &with_hook(format!("http://{addr}/hook")));
        let mut events = approvals.subscribe();
        let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
        approvals.decide(id, Verdict::Deny, root_for("alice"), Some("no".into())).await.unwrap();
        assert!(matches!(outcome(task).await, Outcome::Denied { .. }));

        let (token, requested) = recv(&mut received).await;
        assert_eq!(token.as_deref(), Some("hook-secret"));
        assert_eq!(requested["event"], "approval_requested");
        assert_eq!(requested["approval"]["id"], id.to_string());
        assert_eq!(requested["approval"]["state"], "pending");
        assert_eq!(requested["approval"]["body_preview"], "{\"version\":\"1.2.3\"}");
        assert!(requested.get("decision").is_none());
        let (_, decided) = recv(&mut received).await;
        assert_eq!(decided["event"], "approval_decided");
        assert_eq!(decided["approval"]["state"], "denied");
        assert_eq!(decided["decision"]["verdict"], "deny");
        assert_eq!(decided["decision"]["recorded_as"], "alice (via uid 0)");
        assert_eq!(decided["decision"]["comment"], "no");
    }

    #[tokio::test]
    async fn timeouts_are_posted_too() {
        let (addr, mut received) = receiver().await;
        let dir = tempfile::tempdir().unwrap();
        let approvals = open_with(dir.path(), &with_hook(format!("http://{addr}/hook")));
        let mut events = approvals.subscribe();
        let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_millis(200))).await;
        assert_eq!(outcome(task).await, Outcome::TimedOut { id });
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (_, event) = recv(&mut received).await;
            kinds.push(event["event"].as_str().unwrap().to_owned());
        }
        assert_eq!(kinds, ["approval_requested", "approval_timed_out"]);
    }

    #[tokio::test]
    async fn failed_deliveries_are_retried_and_refusals_are_not() {
        use http::StatusCode;
        // The first event meets a restarting bridge (503, then 429), the
        // second a final refusal (400), the third a bridge that is down
        // for longer than the retries last.
        let script = vec![
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
        ];
        let (addr, mut received) = receiver_answering(script).await;
        let dir = tempfile::tempdir().unwrap();
        let approvals = open_with(dir.path(), &with_hook(format!("http://{addr}/hook")));
        let mut events = approvals.subscribe();
        let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
        approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap();
        assert!(matches!(outcome(task).await, Outcome::Approved { .. }));
        assert_eq!(next_event(&mut events).await.kind, EventKind::ApprovalDecided);
        let (second, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
        task.abort();
        assert_eq!(next_event(&mut events).await.kind, EventKind::ApprovalAbandoned);

        let mut calls = Vec::new();
        for _ in 0..7 {
            let (_, event) = recv(&mut received).await;
            calls.push((
                event["event"].as_str().unwrap().to_owned(),
                event["approval"]["id"].as_str().unwrap().to_owned(),
            ));
        }
        let call = |kind: &str, id: ApprovalId| (kind.to_owned(), id.to_string());
        assert_eq!(
            calls,
            [
                // 503 and 429 are retried until the 200.
                call("approval_requested", id),
                call("approval_requested", id),
                call("approval_requested", id),
                // 400 is final.
                call("approval_decided", id),
                // 502 three times: the first attempt and both retries.
                call("approval_requested", second),
                call("approval_requested", second),
                call("approval_requested", second),
            ]
        );
        // Then the next event, delivered at once: nothing more of the third.
        let (_, next) = recv(&mut received).await;
        assert_eq!(
            (next["event"].as_str(), next["approval"]["id"].as_str()),
            (Some("approval_abandoned"), Some(second.to_string().as_str()))
        );
    }

    #[tokio::test]
    async fn a_dead_or_hanging_webhook_never_delays_the_request() {
        // Accepts connections and never answers.
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_addr = hanging.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = hanging.accept().await {
                open.push(s);
            }
        });
        // Nothing listens here.
        let dead_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // A request that waited for the hanging delivery would take the
        // whole webhook timeout; the bound below is far from both that and
        // the few milliseconds the request really takes.
        let webhook_timeout = Duration::from_secs(120);
        for addr in [hanging_addr, dead_addr] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = with_hook(format!("http://{addr}/hook"));
            if let Some(h) = cfg.webhook.as_mut() {
                h.timeout = webhook_timeout;
            }
            let approvals = open_with(dir.path(), &cfg);
            let mut events = approvals.subscribe();
            let started = std::time::Instant::now();
            let (id, task) = held(&approvals, &mut events, spec(1, Duration::from_secs(60))).await;
            approvals.decide(id, Verdict::Approve, root_for("alice"), None).await.unwrap();
            assert!(matches!(outcome(task).await, Outcome::Approved { .. }));
            assert!(started.elapsed() < webhook_timeout / 4, "{addr}: {:?}", started.elapsed());
        }
    }
}
