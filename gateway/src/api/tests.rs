//! Both APIs served for real: the public one on loopback TCP, the admin one
//! on a unix socket in a temporary directory, driven by the CLI's client
//! functions. Tests run as root, so the peer credentials say uid 0.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use http::StatusCode;
use tokio_util::sync::CancellationToken;

use super::{bind_admin, serve_admin, AdminClient, ApiConfig, ApiError, ClientError, IdentityLookup};
use crate::approval::{
    ApprovalConfig, ApprovalId, ApprovalSpec, Approvals, EventKind, ListFilter, NewApproval, Outcome, State, Verdict,
};

const JOB_IDENTITY: &str = "spiffe://ci.test/job";

struct Admin {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    approvals: Approvals,
    client: AdminClient,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

/// A gateway's admin side: approvals in a temporary state directory and the
/// admin API on `<tmp>/run/admin.sock`. `resolve` stands in for the
/// identity resolver.
async fn admin(resolve: IdentityLookup) -> Admin {
    let dir = tempfile::tempdir().unwrap();
    let config = ApprovalConfig {
        groups: BTreeMap::from([("release".to_owned(), vec!["alice".to_owned(), "bob".to_owned()])]),
        ..Default::default()
    };
    let approvals = Approvals::open(&config, dir.path(), None).unwrap();
    // The parent directory does not exist yet: binding creates it.
    let socket = dir.path().join("run/admin.sock");
    let listener = bind_admin(&socket, None).unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_admin(listener, approvals.clone(), resolve, shutdown.clone()));
    let client = AdminClient::new(&socket);
    Admin { _dir: dir, socket, approvals, client, shutdown, server }
}

fn no_identity() -> IdentityLookup {
    Arc::new(|_| None)
}

fn request() -> NewApproval {
    NewApproval {
        identity: JOB_IDENTITY.into(),
        method: "POST".into(),
        url: "https://deploy.internal/release".into(),
        destination: "deploy.internal:443".into(),
        rule: "deploys".into(),
        ..Default::default()
    }
}

async fn hold(approvals: &Approvals, min: u32) -> (ApprovalId, tokio::task::JoinHandle<Outcome>) {
    let mut events = approvals.subscribe();
    let a = approvals.clone();
    let spec = ApprovalSpec { group: "release".into(), min_approvals: min, timeout: Duration::from_secs(60) };
    let task = tokio::spawn(async move { a.request(request(), &spec).await });
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.unwrap().unwrap();
        if event.kind == EventKind::ApprovalRequested {
            return (event.approval.id, task);
        }
    }
}

fn refused_with(e: &ClientError) -> StatusCode {
    match e {
        ClientError::Refused { status, .. } => *status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn approvers_decide_over_the_unix_socket() {
    let a = admin(no_identity()).await;
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let (id, task) = hold(&a.approvals, 2).await;
    let pending = a.client.approvals(&ListFilter { state: Some(State::Pending), limit: 10 }).await.unwrap();
    assert_eq!(pending.iter().map(|v| v.id).collect::<Vec<_>>(), [id]);
    let shown = a.client.approval(id).await.unwrap();
    assert_eq!((shown.state, shown.url.as_str()), (State::Pending, "https://deploy.internal/release"));

    // Root (the test) acting for a named approver is recorded as such.
    let view = a.client.decide(id, Verdict::Approve, "alice", Some("looks fine")).await.unwrap();
    assert_eq!(view.state, State::Pending);
    assert_eq!(view.decisions[0].recorded_as, "alice (via uid 0)");
    assert_eq!(view.decisions[0].uid, 0);
    assert_eq!(view.decisions[0].pid, std::process::id());

    // Not in the group: 403, and nothing recorded.
    let err = a.client.decide(id, Verdict::Approve, "mallory", None).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::FORBIDDEN);
    assert!(err.is_refusal());
    assert!(err.to_string().contains("not a member"), "{err}");
    // The same approver twice: 409.
    let err = a.client.decide(id, Verdict::Approve, "alice", None).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::CONFLICT);

    let view = a.client.decide(id, Verdict::Approve, "bob", None).await.unwrap();
    assert_eq!(view.state, State::Approved);
    assert!(matches!(task.await.unwrap(), Outcome::Approved { by, .. } if by.len() == 2));

    // Finished: 409 with the state in the message.
    let err = a.client.decide(id, Verdict::Deny, "bob", None).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::CONFLICT);
    assert!(err.to_string().contains("already approved"), "{err}");
    // Unknown id: 404.
    let err = a.client.approval(ApprovalId(4040)).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::NOT_FOUND);
    let err = a.client.decide(ApprovalId(4040), Verdict::Deny, "bob", None).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::NOT_FOUND);

    let all = a.client.approvals(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(a.client.approvals(&ListFilter { state: Some(State::Pending), limit: 10 }).await.unwrap().is_empty());

    a.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), a.server).await.unwrap().unwrap();
    assert!(!a.socket.exists(), "the socket is removed at shutdown");
}

#[tokio::test]
async fn deny_over_the_socket_refuses_the_held_request() {
    let a = admin(no_identity()).await;
    let (id, task) = hold(&a.approvals, 1).await;
    let view = a.client.decide(id, Verdict::Deny, "bob", Some("no")).await.unwrap();
    assert_eq!(view.state, State::Denied);
    assert_eq!(task.await.unwrap(), Outcome::Denied { id, by: "bob (via uid 0)".into(), comment: Some("no".into()) });
}

#[tokio::test]
async fn the_callers_identity_comes_from_its_pid() {
    // The resolver says the calling process (this test) is the job itself.
    let me = std::process::id();
    let resolve: IdentityLookup = Arc::new(move |pid| (pid == me).then(|| JOB_IDENTITY.to_owned()));
    let a = admin(resolve).await;
    let (id, task) = hold(&a.approvals, 1).await;
    let err = a.client.decide(id, Verdict::Approve, "alice", None).await.unwrap_err();
    assert_eq!(refused_with(&err), StatusCode::FORBIDDEN);
    assert!(err.to_string().contains("own request"), "{err}");
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn malformed_calls_get_json_errors() {
    let a = admin(no_identity()).await;
    let bad_state = a.client.get::<serde_json::Value>("/v1/approvals?state=maybe").await.unwrap_err();
    assert_eq!(refused_with(&bad_state), StatusCode::BAD_REQUEST);
    assert!(bad_state.to_string().contains("not a state"), "{bad_state}");
    let bad_id = a.client.get::<serde_json::Value>("/v1/approvals/F-1").await.unwrap_err();
    assert_eq!(refused_with(&bad_id), StatusCode::BAD_REQUEST);
    let unknown = a.client.get::<serde_json::Value>("/v2/nothing").await.unwrap_err();
    assert_eq!(refused_with(&unknown), StatusCode::NOT_FOUND);
    let no_by = a.client.post::<_, serde_json::Value>("/v1/approvals/1/approve", &serde_json::json!({})).await;
    assert_eq!(refused_with(&no_by.unwrap_err()), StatusCode::BAD_REQUEST);
    let extra = serde_json::json!({"by": "alice", "as_root": true});
    let extra = a.client.post::<_, serde_json::Value>("/v1/approvals/1/approve", &extra).await;
    assert_eq!(refused_with(&extra.unwrap_err()), StatusCode::BAD_REQUEST);
    let get_on_post = a.client.get::<serde_json::Value>("/v1/approvals/1/approve").await.unwrap_err();
    assert_eq!(refused_with(&get_on_post), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let a = admin(no_identity()).await;
    assert!(matches!(bind_admin(&a.socket, None), Err(ApiError::InUse { .. })));
    // Still served.
    assert!(a.client.approvals(&ListFilter::default()).await.is_ok());

    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(std::fs::symlink_metadata(&stale).unwrap().file_type().is_socket());
    let listener = bind_admin(&stale, None).unwrap();
    assert_eq!(listener.path(), stale);

    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(bind_admin(&file, None), Err(ApiError::Socket { .. })));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(matches!(bind_admin(Path::new("relative.sock"), None), Err(ApiError::Socket { .. })));
    assert!(matches!(bind_admin(&dir.path().join("x.sock"), Some("no-such-group-here")), Err(ApiError::Socket { .. })));
}

#[tokio::test]
async fn the_socket_can_be_given_to_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0)).unwrap().unwrap();
    let _listener = bind_admin(&socket, Some(&group.name)).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), 0);
}

#[tokio::test]
async fn the_client_says_when_the_gateway_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let missing = AdminClient::new(&dir.path().join("admin.sock"));
    let err = missing.approvals(&ListFilter::default()).await.unwrap_err();
    assert!(!err.is_refusal());
    assert!(err.to_string().contains("is the gateway running"), "{err}");

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = AdminClient::new(&stale).approvals(&ListFilter::default()).await.unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
}

#[tokio::test]
async fn the_cli_command_exits_by_outcome() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Top {
        #[command(flatten)]
        args: crate::cli::approvals::ApprovalsArgs,
    }
    let parse = |args: &[&str]| Top::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().args;
    let a = admin(no_identity()).await;
    let (id, task) = hold(&a.approvals, 1).await;
    assert_eq!(id, ApprovalId(1));
    let socket = a.socket.clone();
    let run = |args: &'static [&'static str]| {
        let socket = socket.clone();
        async move {
            let mut out = Vec::new();
            let code = crate::cli::approvals::run_to(&parse(args), &socket, &mut out).await.unwrap();
            (code, String::from_utf8(out).unwrap())
        }
    };
    let (code, out) = run(&["list", "--json"]).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["id"], id.to_string());
    let (code, out) = run(&["list"]).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert!(out.starts_with("ID") && out.contains(&format!("{id}")) && out.contains("pending"), "{out}");
    // A refusal: exit 1, nothing on standard output.
    let (code, out) = run(&["deny", "A-1", "--by", "nobody"]).await;
    assert_eq!((code, out.as_str()), (std::process::ExitCode::from(1), ""));
    let (code, out) = run(&["approve", "A-1", "--by", "bob", "--comment", "ok"]).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert_eq!(out, format!("{id} approved by bob; approved: the request is released\n"));
    assert!(matches!(task.await.unwrap(), Outcome::Approved { .. }));
    let (code, out) = run(&["show", "A-1"]).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert!(out.contains("bob (via uid 0) (uid 0"), "{out}");
    assert!(out.contains("state:         approved"), "{out}");
    let (code, _) = run(&["list", "--all"]).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert_eq!(run(&["show", "A-999"]).await.0, std::process::ExitCode::from(1));
    // Not reachable: an error for the caller (exit 2).
    let err = crate::cli::approvals::run_to(&parse(&["list"]), &socket.with_file_name("gone.sock"), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("is the gateway running"), "{err:#}");
}

#[test]
fn api_configuration() {
    let c = ApiConfig::default();
    assert_eq!(c.admin_socket.as_deref(), Some(Path::new(super::DEFAULT_ADMIN_SOCKET)));
    assert_eq!(c.validate(), Ok(()));
    let c: ApiConfig =
        serde_yaml_ng::from_str("listen: null\nadmin_socket: /run/gw/a.sock\nadmin_group: ci-approvers\n").unwrap();
    assert_eq!((c.listen, c.admin_group.as_deref()), (None, Some("ci-approvers")));
    assert_eq!(c.validate(), Ok(()));
    let c: ApiConfig = serde_yaml_ng::from_str("admin_socket: null\n").unwrap();
    assert_eq!((c.admin_socket.clone(), c.validate()), (None, Ok(())));
    let c: ApiConfig = serde_yaml_ng::from_str("admin_socket: run/a.sock\n").unwrap();
    assert_eq!(c.validate().unwrap_err().0, "api.admin_socket");
    let long = format!("admin_socket: /{}\n", "x".repeat(120));
    let c: ApiConfig = serde_yaml_ng::from_str(&long).unwrap();
    assert_eq!(c.validate().unwrap_err().0, "api.admin_socket");
    assert!(serde_yaml_ng::from_str::<ApiConfig>("admin: {}\n").is_err());
}

mod public {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::credentials::{JwtConfig, Minter, SystemClock};

    async fn get(addr: std::net::SocketAddr, method: http::Method, path: &str) -> (StatusCode, serde_json::Value) {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn public_routes_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let minter = Arc::new(Minter::open(&JwtConfig::default(), dir.path(), Arc::new(SystemClock)).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let server = tokio::spawn(super::super::serve(listener, minter, metrics, shutdown.clone()));

        let (status, jwks) = get(addr, http::Method::GET, super::super::JWKS_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!jwks["keys"].as_array().unwrap().is_empty());
        let (status, _) = get(addr, http::Method::POST, super::super::JWKS_PATH).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, discovery) = get(addr, http::Method::GET, super::super::DISCOVERY_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(discovery["jwks_uri"], format!("http://{addr}/.well-known/jwks.json"));
        let (status, health) = get(addr, http::Method::GET, "/healthz").await;
        assert_eq!((status, health), (StatusCode::OK, serde_json::json!({"status": "ok"})));
        // The metrics are OpenMetrics text, not JSON (tests/metrics.rs parses them).
        let (status, _) = get(addr, http::Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let (status, missing) = get(addr, http::Method::GET, "/v1/approvals").await;
        assert_eq!((status, missing), (StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found"})));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), server).await.unwrap().unwrap();
    }
}
