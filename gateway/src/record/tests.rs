//! Recording tests against real SQLite databases in temporary directories.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use rusqlite::params;

use super::{
    DecisionFacts, EventData, EventKind, ExchangeData, ExchangeRecord, RecordConfig, RecordError, RecordLevel,
    Recorder, SessionFilter, SessionId, SessionMeta, SessionOutcome, SessionRecorder, SessionStart, SessionState,
    SessionStore, TlsFacts, Verdict,
};
use crate::{cli::sessions::tests::run_captured, process::ProcessSnapshot};

const SECRET: &str = "sk-live-9f8e7d6c5b4a39281706";

fn config(dir: &Path, flush: Duration) -> RecordConfig {
    RecordConfig { database: Some(dir.join("sessions.db")), flush_interval: flush, ..RecordConfig::default() }
}

fn open(dir: &Path) -> Recorder {
    Recorder::open(&config(dir, Duration::from_millis(20)), dir).unwrap()
}

fn db(dir: &Path) -> PathBuf {
    dir.join("sessions.db")
}

fn start_facts() -> SessionStart {
    let mut job = BTreeMap::new();
    job.insert("CI_JOB_ID".to_owned(), "4242".to_owned());
    job.insert("CI_JOB_TOKEN".to_owned(), SECRET.to_owned());
    job.insert("CI_REPOSITORY_URL".to_owned(), format!("https://gitlab-ci-token:{SECRET}@git.example.com/a/b.git"));
    SessionStart {
        conn_id: 7,
        identity: "spiffe://ci.example/project/42".into(),
        identity_labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
        process: ProcessSnapshot {
            pid: 4321,
            uid: 1000,
            gid: Some(1000),
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            cgroup: Some("/ci/job-4242".into()),
            container: None,
            job,
        },
        host: "api.example.com".into(),
        orig_dst: "203.0.113.7:443".parse().unwrap(),
        sni: Some("api.example.com".into()),
        tls: Some(TlsFacts {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            alpn: Some("h2".into()),
        }),
        protocol: crate::event::Protocol::Https,
    }
}

fn exchange(stream: u64) -> ExchangeRecord {
    ExchangeRecord {
        level: RecordLevel::Full,
        stream,
        started: SystemTime::now() - Duration::from_millis(5),
        duration: Duration::from_millis(5),
        method: "POST".into(),
        url: format!("/v1/items/{stream}?page=2"),
        status: 201,
        outcome: crate::http::ExchangeOutcome::Forwarded,
        rpc: None,
        request_headers: vec![
            ("content-type".into(), "application/json".into()),
            ("authorization".into(), format!("Bearer {SECRET}")),
        ],
        request_body: Bytes::from_static(b"{\"name\":\"widget\"}"),
        request_body_size: 17,
        response_headers: vec![("content-type".into(), "application/json".into())],
        response_body: Bytes::from_static(b"{\"id\":1}"),
        response_body_size: 8,
        decision: Some(DecisionFacts { rule: "allow-api".into(), action: "allow".into() }),
        findings: vec!["F-3".into()],
    }
}

/// An exchange as the writer stores it, read back.
fn exchange_data(e: &ExchangeRecord, max_body_bytes: usize) -> ExchangeData {
    serde_json::from_str(&super::encode::exchange(e, max_body_bytes, &Default::default())).unwrap()
}

/// Ends `session` as a connection that closed after 1234 bytes up, 5678 down.
fn end(session: &SessionRecorder) {
    session.end(SessionOutcome::Closed, 1234, 5678)
}

/// Records one complete session (start, two exchanges, an event, the end)
/// and returns its id.
fn complete_session(recorder: &Recorder) -> SessionId {
    let session = recorder.start(start_facts());
    let id = session.id().clone();
    session.exchange(exchange(1));
    session.exchange(exchange(3));
    session.event(EventKind::Refused, serde_json::json!({ "rule": "no-delete", "stream": 5 }));
    end(&session);
    id
}

fn verdict(dir: &Path, id: &SessionId) -> Verdict {
    SessionStore::open(&db(dir)).unwrap().verify(id).unwrap()
}

fn sql(dir: &Path, statement: &str, id: &SessionId) -> usize {
    let store = SessionStore::open(&db(dir)).unwrap();
    store.connection().execute(statement, params![id.as_str()]).unwrap()
}

/// Rewrites a session's stored records as someone with write access to the
/// file could: `edit` gets each stored row's records (first seq, records)
/// and changes, removes or splits them; each row is then stored again with
/// its records' own hashes and the hash before its first record.
fn tamper(dir: &Path, id: &SessionId, edit: impl FnOnce(&mut Vec<(u64, Vec<super::Record>)>)) {
    let store = SessionStore::open(&db(dir)).unwrap();
    let conn = store.connection();
    let mut rows: Vec<(u64, Vec<super::Record>)> = conn
        .prepare("SELECT first_seq, n, prev_hash, body FROM chunks WHERE session = ?1 ORDER BY first_seq")
        .unwrap()
        .query_map([id.as_str()], |r| {
            let (first_seq, n, prev, body) = super::store::chunk_row(r)?;
            Ok((first_seq, super::chunk::decode(id, first_seq, prev, n, body).unwrap()))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let first_id: i64 =
        conn.query_row("SELECT min(id) FROM chunks WHERE session = ?1", [id.as_str()], |r| r.get(0)).unwrap();
    edit(&mut rows);
    conn.execute("DELETE FROM chunks WHERE session = ?1", [id.as_str()]).unwrap();
    let mut local = first_id;
    for (first_seq, records) in rows.into_iter().filter(|(_, records)| !records.is_empty()) {
        let mut c = super::chunk::Chunk::new(id.clone(), first_seq, records[0].prev_hash.clone());
        for r in &records {
            c.push(r.ts, &r.kind, &r.hash, &r.data);
        }
        conn.execute(
            "INSERT INTO chunks (id, session, first_seq, n, exchanges, prev_hash, ts, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![local, id.as_str(), first_seq as i64, c.records, c.exchanges, c.prev_hash, c.ts, c.body],
        )
        .unwrap();
        local += i64::from(c.records);
    }
}

/// [`tamper`] with one record, wherever it is stored.
fn tamper_record(dir: &Path, id: &SessionId, seq: u64, edit: impl FnOnce(&mut super::Record)) {
    tamper(dir, id, |rows| {
        let record = rows.iter_mut().flat_map(|(_, records)| records.iter_mut()).find(|r| r.seq == seq);
        edit(record.expect("the record to edit"));
    });
}

/// [`tamper`]: removes the records with seqs in `seqs`; `split` stores what
/// follows them as a row of its own (from its own seq), else they close up.
fn remove_records(dir: &Path, id: &SessionId, seqs: std::ops::RangeInclusive<u64>, split: bool) {
    tamper(dir, id, |rows| {
        let mut out = Vec::new();
        for (first_seq, records) in rows.drain(..) {
            let (mut before, mut after) = (Vec::new(), Vec::new());
            for r in records {
                if r.seq < *seqs.start() {
                    before.push(r);
                } else if r.seq > *seqs.end() {
                    after.push(r);
                }
            }
            match after.first() {
                Some(next) if split => {
                    let next_seq = next.seq;
                    out.push((first_seq, before));
                    out.push((next_seq, after));
                }
                _ => {
                    before.extend(after);
                    out.push((first_seq, before));
                }
            }
        }
        *rows = out;
    });
}

#[test]
fn a_complete_session_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();

    let store = SessionStore::open(&db(dir.path())).unwrap();
    let sessions = store.list(&SessionFilter::default()).unwrap();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.id, id);
    assert_eq!(s.state, SessionState::Ended);
    assert_eq!((s.exchanges, s.records), (2, 5));
    assert_eq!((s.bytes_up, s.bytes_down, s.outcome.as_deref()), (Some(1234), Some(5678), Some("closed")));
    assert_eq!(
        (s.identity.as_str(), s.host.as_str(), s.orig_dst.as_str()),
        ("spiffe://ci.example/project/42", "api.example.com", "203.0.113.7:443")
    );
    assert_eq!((s.pid, s.comm.as_str(), s.conn_id), (4321, "curl", 7));

    let records = store.records(&id).unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["start", "exchange", "exchange", "event", "end"]);
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);

    let meta: SessionMeta = serde_json::from_str(&records[0].data).unwrap();
    assert_eq!(meta.session, id);
    assert_eq!(meta.identity_labels["env"], "prod");
    assert_eq!(meta.process.gid, Some(1000));
    assert_eq!(meta.process.cgroup.as_deref(), Some("/ci/job-4242"));
    assert_eq!(meta.sni.as_deref(), Some("api.example.com"));
    assert_eq!(meta.tls.as_ref().unwrap().alpn.as_deref(), Some("h2"));
    assert_eq!(meta.process.job["CI_JOB_ID"], "4242");
    assert_eq!(meta.process.job["CI_JOB_TOKEN"], "[REDACTED]");
    assert_eq!(meta.process.job["CI_REPOSITORY_URL"], "https://[REDACTED]@git.example.com/a/b.git");

    let ex: ExchangeData = serde_json::from_str(&records[2].data).unwrap();
    assert_eq!((ex.stream, ex.method.as_str(), ex.url.as_str(), ex.status), (3, "POST", "/v1/items/3?page=2", 201));
    assert_eq!(ex.duration_ns, 5_000_000);
    assert_eq!(ex.decision.as_ref().unwrap().rule, "allow-api");
    assert_eq!(ex.findings, ["F-3"]);
    let headers = ex.request.headers.as_ref().unwrap();
    assert!(headers.contains(&("authorization".into(), "Bearer [REDACTED]".into())), "{headers:?}");
    let body = ex.request.body.as_ref().unwrap();
    assert_eq!((body.content.as_str(), body.truncated, ex.request.body_size), ("{\"name\":\"widget\"}", false, 17));
    assert_eq!(ex.response.body.as_ref().unwrap().content, "{\"id\":1}");

    let ev: EventData = serde_json::from_str(&records[3].data).unwrap();
    assert_eq!((ev.name.as_str(), ev.detail["rule"].as_str()), ("refused", Some("no-delete")));
    assert_eq!(store.verify(&id).unwrap(), Verdict::Intact { records: 5 });

    // Nothing secret anywhere in the file, the WAL included.
    drop(store);
    for suffix in ["", "-wal"] {
        let path = PathBuf::from(format!("{}{suffix}", db(dir.path()).display()));
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "secret in {}", path.display());
        }
    }
}

#[test]
fn cli_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let database = db(dir.path());
    let (code, out) = run_captured(&database, &["list"]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.starts_with("no sessions (no database"), "{out}");
    let (code, _) = run_captured(&database, &["show", "0193"]);
    assert_eq!(code, ExitCode::from(1));

    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    let short = &id.as_str()[..16];

    let (code, out) = run_captured(&database, &["list", "--identity", "spiffe://ci.example/*", "--since", "1h"]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.contains(id.as_str()) && out.contains("ended") && out.contains("curl[4321]"), "{out}");
    let (_, out) = run_captured(&database, &["list", "--identity", "spiffe://other/*"]);
    assert!(out.starts_with("no sessions"), "{out}");
    let (_, out) = run_captured(&database, &["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["state"], "ended");

    let (code, out) = run_captured(&database, &["show", short]);
    assert_eq!(code, ExitCode::SUCCESS);
    for expected in
        ["TLSv1.3", "/usr/bin/curl", "CI_JOB_TOKEN=[REDACTED]", "POST /v1/items/1?page=2 -> 201", "refused", "#4"]
    {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    let (_, out) = run_captured(&database, &["show", short, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["records"][1]["data"]["request"]["body"]["content"], "{\"name\":\"widget\"}");

    let (code, out) = run_captured(&database, &["replay", short]);
    assert_eq!(code, ExitCode::SUCCESS);
    for expected in [
        "+0.",
        "stream 1  POST /v1/items/1?page=2",
        "> authorization: Bearer [REDACTED]",
        "<   {\"id\":1}",
        "< 201 in 5.0ms",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    assert!(!out.contains(SECRET));

    let (code, out) = run_captured(&database, &["export", short]);
    assert_eq!(code, ExitCode::SUCCESS);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    // Offline verification needs nothing but the export.
    let mut prev = super::GENESIS_HASH.to_owned();
    for l in &lines {
        let data = l["data"].as_str().unwrap();
        let hash = super::hash_record(
            id.as_str(),
            &prev,
            l["seq"].as_u64().unwrap(),
            l["ts"].as_i64().unwrap(),
            l["kind"].as_str().unwrap(),
            data,
        );
        assert_eq!(l["hash"].as_str(), Some(hash.as_str()));
        prev = hash;
    }

    let (code, out) = run_captured(&database, &["verify", short]);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    let (code, out) = run_captured(&database, &["verify", "--all"]);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("1 sessions verified, 0 broken"), "{out}");

    tamper_record(dir.path(), &id, 1, |r| r.data = r.data.replace("widget", "gadget"));
    let (code, out) = run_captured(&database, &["verify", short]);
    assert_eq!(code, ExitCode::from(1));
    assert!(out.contains("BROKEN at record 1"), "{out}");
    let (code, out) = run_captured(&database, &["verify", "--all"]);
    assert_eq!(code, ExitCode::from(1));
    assert!(out.contains("1 broken"), "{out}");

    // A deleted sessions row leaves records nobody lists: --all says so.
    sql(dir.path(), "DELETE FROM sessions WHERE id = ?1", &id);
    let (code, out) = run_captured(&database, &["verify", "--all"]);
    assert_eq!(code, ExitCode::from(1));
    assert!(out.contains("records without a sessions row"), "{out}");
}

#[test]
fn edited_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    tamper_record(dir.path(), &id, 2, |r| {
        assert!(r.data.contains("201"));
        r.data = r.data.replace("201", "200");
    });
    match verdict(dir.path(), &id) {
        Verdict::Broken { seq: Some(2), problem } => assert!(problem.contains("hash mismatch"), "{problem}"),
        other => panic!("{other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    tamper_record(dir.path(), &id, 3, |r| r.ts += 1);
    assert!(matches!(verdict(dir.path(), &id), Verdict::Broken { seq: Some(3), .. }));
}

#[test]
fn removed_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let middle = complete_session(&recorder);
    let split = complete_session(&recorder);
    let tail = complete_session(&recorder);
    let whole_tail = complete_session(&recorder);
    recorder.shutdown();

    // Cut out of its row, the records after it close up: the next one no
    // longer chains where it now stands.
    remove_records(dir.path(), &middle, 2..=2, false);
    match verdict(dir.path(), &middle) {
        Verdict::Broken { seq: Some(2), problem } => assert!(problem.contains("hash mismatch"), "{problem}"),
        other => panic!("{other:?}"),
    }
    // Cut out with the rest stored as a row from its own seq: a gap.
    remove_records(dir.path(), &split, 2..=2, true);
    match verdict(dir.path(), &split) {
        Verdict::Broken { seq: Some(2), problem } => assert!(problem.contains("missing"), "{problem}"),
        other => panic!("{other:?}"),
    }

    remove_records(dir.path(), &tail, 3..=u64::MAX, false);
    match verdict(dir.path(), &tail) {
        Verdict::Broken { seq: Some(3), problem } => assert!(problem.contains("tail"), "{problem}"),
        other => panic!("{other:?}"),
    }

    // Removing the tail and rewinding the row's tail pointer still leaves
    // the recorded end without its end record.
    remove_records(dir.path(), &whole_tail, 4..=4, false);
    let store = SessionStore::open(&db(dir.path())).unwrap();
    let last = store.records(&whole_tail).unwrap().pop().unwrap();
    store
        .connection()
        .execute(
            "UPDATE sessions SET last_seq = 3, last_hash = ?2, last_ts = ?3 WHERE id = ?1",
            params![whole_tail.as_str(), last.hash, last.ts],
        )
        .unwrap();
    assert!(matches!(store.verify(&whole_tail).unwrap(), Verdict::Broken { seq: None, .. }));
}

#[test]
fn metadata_edits_are_detected() {
    let edits = [
        "UPDATE sessions SET identity = 'spiffe://ci.example/project/1' WHERE id = ?1",
        "UPDATE sessions SET meta = replace(meta, 'curl', 'wget') WHERE id = ?1",
        "UPDATE sessions SET pid = 1 WHERE id = ?1",
        "UPDATE sessions SET outcome = 'denied' WHERE id = ?1",
        "UPDATE sessions SET bytes_up = 1 WHERE id = ?1",
        "UPDATE sessions SET exchanges = 1 WHERE id = ?1",
    ];
    for edit in edits {
        let dir = tempfile::tempdir().unwrap();
        let recorder = open(dir.path());
        let id = complete_session(&recorder);
        recorder.shutdown();
        assert_eq!(verdict(dir.path(), &id), Verdict::Intact { records: 5 });
        assert_eq!(sql(dir.path(), edit, &id), 1, "{edit}");
        assert!(matches!(verdict(dir.path(), &id), Verdict::Broken { seq: None, .. }), "{edit}");
    }
    // Editing the start record itself (and its copy in the row) breaks seq 0.
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    tamper_record(dir.path(), &id, 0, |r| r.data = r.data.replace("curl", "wget"));
    sql(dir.path(), "UPDATE sessions SET meta = replace(meta, 'curl', 'wget'), comm = 'wget' WHERE id = ?1", &id);
    assert!(matches!(verdict(dir.path(), &id), Verdict::Broken { seq: Some(0), .. }));
}

fn committed_records(database: &Path) -> i64 {
    let conn = rusqlite::Connection::open(database).unwrap();
    conn.query_row("SELECT coalesce(sum(n), 0) FROM chunks", [], |r| r.get(0)).unwrap()
}

#[test]
fn records_are_committed_within_the_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::open(&config(dir.path(), Duration::from_millis(50)), dir.path()).unwrap();
    let session = recorder.start(start_facts());
    session.exchange(exchange(1));
    let sent = Instant::now();
    // No flush, no end: the writer commits on its own.
    // The bound only tells "commits on its own" from "never": a loaded
    // machine may run the writer thread late.
    while committed_records(&db(dir.path())) < 2 {
        assert!(sent.elapsed() < Duration::from_secs(60), "not committed within 60s of a 50ms flush interval");
        std::thread::sleep(Duration::from_millis(5));
    }
    let state = SessionStore::open(&db(dir.path())).unwrap().list(&SessionFilter::default()).unwrap()[0].state;
    assert_eq!(state, SessionState::Open, "live session of the running recorder");
    drop(session);
    recorder.shutdown();

    // With a long interval (the longest accepted, so that a stalled test
    // thread does not outlast it), records wait (batched) until the
    // interval or a flush.
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::open(&config(dir.path(), Duration::from_secs(10)), dir.path()).unwrap();
    let session = recorder.start(start_facts());
    session.exchange(exchange(1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(committed_records(&db(dir.path())), 0, "committed before the flush interval");
    recorder.flush().unwrap();
    assert_eq!(committed_records(&db(dir.path())), 2);
    end(&session);
    recorder.shutdown();
    assert_eq!(committed_records(&db(dir.path())), 3, "shutdown commits what is queued");
}

#[test]
fn the_writer_wakes_per_batch_not_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::open(&config(dir.path(), Duration::from_secs(2)), dir.path()).unwrap();
    let session = recorder.start(start_facts());
    let id = session.id().clone();
    // Records trickle in, each sent after the writer could have gone back to sleep.
    for stream in 1..=200 {
        session.exchange(exchange(stream));
        std::thread::sleep(Duration::from_micros(500));
    }
    end(&session);
    recorder.flush().unwrap();
    // The first record, the deadline (or a spurious wake-up or two) and the flush.
    let wakeups = recorder.writer_wakeups();
    assert!(wakeups <= 8, "the writer woke {wakeups} times for 202 records");
    recorder.shutdown();
    let store = SessionStore::open(&db(dir.path())).unwrap();
    assert_eq!(store.verify(&id).unwrap(), Verdict::Intact { records: 202 });

    // A full batch does not wait for the deadline.
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::open(&config(dir.path(), Duration::from_secs(10)), dir.path()).unwrap();
    let session = recorder.start(start_facts());
    for stream in 1..=2_500 {
        session.exchange(exchange(stream));
    }
    let sent = Instant::now();
    while committed_records(&db(dir.path())) < 2_000 {
        assert!(sent.elapsed() < Duration::from_secs(5), "a full batch waited for the 10s flush interval");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(session);
    recorder.shutdown();
    assert_eq!(committed_records(&db(dir.path())), 2_502, "shutdown commits the rest");
}

#[test]
fn dropped_and_interrupted_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let dropped = recorder.start(start_facts());
    let dropped_id = dropped.id().clone();
    drop(dropped);
    // Ended once only, whoever ends it (streams share it through an Arc).
    let shared = std::sync::Arc::new(recorder.start(start_facts()));
    let shared_id = shared.id().clone();
    let stream = std::sync::Arc::clone(&shared);
    std::thread::spawn(move || stream.exchange(exchange(1))).join().unwrap();
    end(&shared);
    shared.end(SessionOutcome::Error, 1, 2);
    drop(shared);
    let interrupted = recorder.start(start_facts());
    let interrupted_id = interrupted.id().clone();
    interrupted.exchange(exchange(1));
    recorder.flush().unwrap();
    // Never ended, and the recorder goes away (as if the gateway died).
    std::mem::forget(interrupted);
    recorder.shutdown();

    let store = SessionStore::open(&db(dir.path())).unwrap();
    let d = store.summary(&dropped_id).unwrap();
    assert_eq!((d.state, d.outcome.as_deref()), (SessionState::Ended, Some("dropped")));
    let s = store.summary(&shared_id).unwrap();
    assert_eq!((s.outcome.as_deref(), s.exchanges, s.records), (Some("closed"), 1, 3));
    assert_eq!(store.verify(&shared_id).unwrap(), Verdict::Intact { records: 3 });
    let i = store.summary(&interrupted_id).unwrap();
    assert_eq!((i.state, i.ended, i.records), (SessionState::Interrupted, None, 2));
    assert_eq!(store.verify(&interrupted_id).unwrap(), Verdict::Intact { records: 2 });
}

#[test]
fn levels_and_body_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Duration::from_millis(20));
    config.max_body_bytes = 8;
    let recorder = Recorder::open(&config, dir.path()).unwrap();
    let session = recorder.start(start_facts());
    let id = session.id().clone();
    session.exchange(exchange(1));
    session.exchange(ExchangeRecord { level: RecordLevel::Metadata, ..exchange(3) });
    session.exchange(ExchangeRecord { level: RecordLevel::None, ..exchange(5) });
    end(&session);
    recorder.shutdown();

    let store = SessionStore::open(&db(dir.path())).unwrap();
    let records = store.records(&id).unwrap();
    assert_eq!(records.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["start", "exchange", "exchange", "end"]);
    let full: ExchangeData = serde_json::from_str(&records[1].data).unwrap();
    let body = full.request.body.unwrap();
    assert_eq!(
        (body.content.as_str(), body.stored, body.truncated, full.request.body_size),
        ("{\"name\":", 8, true, 17)
    );
    assert!(!full.response.body.unwrap().truncated, "8 bytes fit");
    let meta: ExchangeData = serde_json::from_str(&records[2].data).unwrap();
    assert_eq!((meta.level, meta.stream, meta.status), (RecordLevel::Metadata, 3, 201));
    assert_eq!(
        (meta.request.headers, meta.request.body, meta.response.headers, meta.response.body),
        (None, None, None, None)
    );
    assert_eq!((meta.request.body_size, meta.response.body_size), (17, 8));
    assert!(!records[2].data.contains("authorization") && !records[2].data.contains("widget"));
    assert_eq!(store.summary(&id).unwrap().exchanges, 2);
    assert_eq!(store.verify(&id).unwrap(), Verdict::Intact { records: 4 });
}

#[test]
fn bodies_are_cut_and_encoded() {
    let with_body = |body: &'static [u8], size: u64| ExchangeRecord {
        request_body: Bytes::from_static(body),
        request_body_size: size,
        ..exchange(1)
    };
    let body_of = |e: &ExchangeRecord, max: usize| exchange_data(e, max).request.body.unwrap();

    let b = body_of(&with_body(b"hello world", 11), 64);
    assert_eq!((b.content.as_str(), b.stored, b.truncated, b.encoding.as_str()), ("hello world", 11, false, "utf8"));
    let b = body_of(&with_body(b"hello world", 11), 5);
    assert_eq!((b.content.as_str(), b.stored, b.truncated), ("hello", 5, true));
    // The proxy may hand over a prefix of a larger body.
    let b = body_of(&with_body(b"hello", 1_000_000), 64);
    assert_eq!((b.stored, b.truncated), (5, true));
    assert_eq!(exchange_data(&with_body(b"hello", 1_000_000), 64).request.body_size, 1_000_000);
    // A cap inside a multi-byte character keeps the text before it.
    let b = body_of(&with_body("aé€".as_bytes(), 6), 4);
    assert_eq!((b.content.as_str(), b.stored, b.truncated, b.encoding.as_str()), ("aé", 3, true, "utf8"));
    // Binary stays binary, exactly.
    let bin: &'static [u8] = &[0xff, 0x00, 0xfe, 0x10, 0x80];
    let b = body_of(&with_body(bin, 5), 64);
    assert_eq!(b.encoding, "base64");
    assert_eq!(b.bytes().unwrap(), bin);
    let b = body_of(&with_body(bin, 5), 2);
    assert_eq!((b.bytes().unwrap(), b.truncated), (vec![0xff, 0x00], true));
    let b = body_of(&with_body(b"", 0), 64);
    assert_eq!((b.content.as_str(), b.truncated), ("", false));
}

#[test]
fn headers_never_leak() {
    use http::{HeaderMap, HeaderName, HeaderValue};
    let secrets = [
        ("authorization", format!("Bearer {SECRET}")),
        ("authorization", format!("Basic {SECRET}")),
        ("proxy-authorization", format!("Negotiate {SECRET}")),
        ("cookie", format!("session={SECRET}; theme=dark")),
        ("set-cookie", format!("sid={SECRET}; HttpOnly")),
        ("x-api-key", SECRET.to_owned()),
        ("api-key", SECRET.to_owned()),
        ("private-token", SECRET.to_owned()),
        ("x-auth-token", SECRET.to_owned()),
        ("x-amz-security-token", SECRET.to_owned()),
        ("x-goog-api-key", SECRET.to_owned()),
        ("x-custom-secret", SECRET.to_owned()),
        ("x-vault-token", SECRET.to_owned()),
        ("x-hub-signature-256", format!("sha256={SECRET}")),
        ("ocp-apim-subscription-key", SECRET.to_owned()),
        // Not a known scheme: the first word may be the secret itself.
        ("x-access-token", format!("{SECRET} extra")),
        ("authorization", format!("{SECRET} {SECRET}")),
        ("authorization", format!("   {SECRET}")),
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in &secrets {
        headers.append(HeaderName::from_static(name), HeaderValue::from_str(value).unwrap());
    }
    headers.append("content-type", HeaderValue::from_static("application/json"));
    headers.append("user-agent", HeaderValue::from_static("curl/8.5"));
    headers.append("x-api-key", HeaderValue::from_bytes(b"\xffbinary-secret").unwrap());

    let redacted = super::redact_headers(&headers);
    assert_eq!(redacted.len(), secrets.len() + 3);
    for (name, value) in &redacted {
        assert!(!value.contains(SECRET) && !value.contains("binary-secret"), "{name}: {value}");
    }
    assert!(redacted.contains(&("authorization".into(), "Bearer [REDACTED]".into())));
    assert!(redacted.contains(&("authorization".into(), "Basic [REDACTED]".into())));
    assert!(redacted.contains(&("proxy-authorization".into(), "Negotiate [REDACTED]".into())));
    assert!(redacted.contains(&("cookie".into(), "[REDACTED]".into())));
    assert!(redacted.contains(&("x-access-token".into(), "[REDACTED]".into())));
    assert!(redacted.contains(&("content-type".into(), "application/json".into())));
    assert!(redacted.contains(&("user-agent".into(), "curl/8.5".into())));
    assert_eq!(super::redact_header_pairs(&redacted), redacted, "idempotent");

    // Pairs from the proxy are redacted again before storage, whatever the case.
    let pairs =
        vec![("Authorization".to_owned(), format!("token {SECRET}")), ("X-Api-Key".to_owned(), SECRET.to_owned())];
    assert_eq!(
        super::redact_header_pairs(&pairs),
        vec![
            ("Authorization".to_owned(), "token [REDACTED]".to_owned()),
            ("X-Api-Key".to_owned(), "[REDACTED]".to_owned())
        ]
    );
}

fn backdate(dir: &Path, id: &SessionId, age: Duration) {
    let shift = i64::try_from(age.as_nanos()).unwrap();
    let store = SessionStore::open(&db(dir)).unwrap();
    store
        .connection()
        .execute(
            "UPDATE sessions SET last_ts = last_ts - ?2, ended = ended - ?2 WHERE id = ?1",
            params![id.as_str(), shift],
        )
        .unwrap();
}

fn count(dir: &Path, table_sql: &str, id: &SessionId) -> i64 {
    let store = SessionStore::open(&db(dir)).unwrap();
    store.connection().query_row(table_sql, [id.as_str()], |r| r.get(0)).unwrap()
}

#[test]
fn retention_prunes_only_old_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let old: Vec<SessionId> = (0..3).map(|_| complete_session(&recorder)).collect();
    let recent = complete_session(&recorder);
    let old_unended = recorder.start(start_facts());
    let old_unended_id = old_unended.id().clone();
    recorder.flush().unwrap();
    std::mem::forget(old_unended);
    recorder.shutdown();
    for id in old.iter().chain([&old_unended_id]) {
        backdate(dir.path(), id, Duration::from_secs(40 * 24 * 3600));
    }

    let store = SessionStore::open(&db(dir.path())).unwrap();
    let now = super::model::nanos(SystemTime::now());
    let cutoff = now - 30 * 24 * 3600 * 1_000_000_000;
    // Unended sessions of a live writer that started before them are kept.
    assert_eq!(store.prune(cutoff, i64::MIN, 1).unwrap(), 3, "one session per transaction, three batches");
    assert_eq!(store.session_ids().unwrap().len(), 2);
    assert!(store.summary(&old_unended_id).is_ok());
    for id in &old {
        assert_eq!(count(dir.path(), "SELECT count(*) FROM chunks WHERE session = ?1", id), 0);
        assert!(matches!(store.summary(id), Err(RecordError::NotFound(_))));
    }
    // Interrupted by an earlier run: pruned like an ended session.
    assert_eq!(super::prune(&db(dir.path()), Duration::from_secs(30 * 24 * 3600), SystemTime::now()).unwrap(), 1);
    assert_eq!(store.session_ids().unwrap(), vec![recent.clone()]);
    assert_eq!(store.verify(&recent).unwrap(), Verdict::Intact { records: 5 });
    assert_eq!(store.prune(cutoff, now, 500).unwrap(), 0);
}

#[test]
fn the_pruner_thread_runs_and_spares_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let expired = complete_session(&recorder);
    recorder.shutdown();

    let config = RecordConfig {
        retention: Duration::from_millis(200),
        prune_interval: Duration::from_millis(20),
        ..config(dir.path(), Duration::from_millis(20))
    };
    let recorder = Recorder::open(&config, dir.path()).unwrap();
    let live = recorder.start(start_facts());
    let live_id = live.id().clone();
    let store = SessionStore::open(&db(dir.path())).unwrap();
    let begun = Instant::now();
    while store.summary(&expired).is_ok() || store.summary(&live_id).is_err() {
        assert!(begun.elapsed() < Duration::from_secs(60), "expired session never pruned, or live one never committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle for longer than the retention, but live: kept, whole.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(store.summary(&live_id).unwrap().state, SessionState::Open);
    assert_eq!(store.verify(&live_id).unwrap(), Verdict::Intact { records: 1 });
    let ending = Instant::now();
    end(&live);
    recorder.shutdown();
    // Once ended, it expires in its turn: if this thread was held up for the
    // retention before the shutdown stopped the pruner, it is rightly gone.
    match store.verify(&live_id) {
        Ok(verdict) => assert_eq!(verdict, Verdict::Intact { records: 2 }),
        Err(RecordError::NotFound(_)) => {
            assert!(ending.elapsed() >= Duration::from_millis(200), "pruned before its end was past the retention")
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn one_writer_per_database() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    match Recorder::open(&config(dir.path(), Duration::from_millis(20)), dir.path()) {
        Err(RecordError::Locked { holder, .. }) => {
            assert!(holder.contains(&std::process::id().to_string()), "{holder}")
        }
        other => panic!("{other:?}"),
    }
    first.shutdown();
    open(dir.path()).shutdown();
}

#[test]
fn disabled_recorder_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = RecordConfig { enabled: false, ..config(dir.path(), Duration::from_millis(20)) };
    let recorder = Recorder::open(&config, dir.path()).unwrap();
    assert_eq!(recorder.path(), None);
    let session = recorder.start(start_facts());
    assert!(!session.is_recording());
    session.exchange(exchange(1));
    end(&session);
    recorder.flush().unwrap();
    recorder.shutdown();
    assert!(!db(dir.path()).exists());
}

#[test]
fn session_ids() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(0x0193_a1b2_c3d4);
    let a = SessionId::generate(t);
    let b = SessionId::generate(t + Duration::from_millis(1));
    assert_eq!(a.as_str().len(), 25);
    assert!(a.as_str().starts_with("0193a1b2c3d4-"), "{a}");
    assert!(a < b, "time-ordered");
    assert_ne!(SessionId::generate(t), SessionId::generate(t), "random part");

    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let one = complete_session(&recorder);
    let two = complete_session(&recorder);
    recorder.shutdown();
    let store = SessionStore::open(&db(dir.path())).unwrap();
    assert_eq!(store.resolve(one.as_str()).unwrap(), one);
    assert_eq!(store.resolve(&one.as_str()[..16]).unwrap(), one);
    assert_eq!(store.resolve(&one.as_str().replace('-', "")[..20]).unwrap(), one, "dash optional");
    assert_eq!(store.resolve(&two.as_str().to_uppercase()).unwrap(), two);
    match store.resolve(&one.as_str()[..4]) {
        Err(RecordError::Ambiguous { matches, .. }) => {
            assert!(matches.contains(one.as_str()) && matches.contains(two.as_str()))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(store.resolve("ffffffffffff"), Err(RecordError::NotFound(_))));
    assert!(matches!(store.resolve("01*"), Err(RecordError::BadId(_))));
    assert!(matches!(store.resolve(""), Err(RecordError::BadId(_))));
}

#[test]
fn config_parses_and_validates() {
    let c: RecordConfig = serde_yaml_ng::from_str(
        "enabled: true\ndatabase: rec.db\nmax_body_bytes: 1024\nretention: 7d\nprune_interval: 5m\nflush_interval: 250ms\n",
    )
    .unwrap();
    assert_eq!(c.retention, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(c.flush_interval, Duration::from_millis(250));
    assert_eq!(c.database_path(Path::new("/var/lib/gw")), PathBuf::from("/var/lib/gw/rec.db"));
    assert_eq!(c.validate(), Ok(()));
    let d = RecordConfig::default();
    assert_eq!((d.enabled, d.max_body_bytes, d.flush_interval), (true, 65536, Duration::from_millis(100)));
    assert_eq!(d.database_path(Path::new("/s")), PathBuf::from("/s/sessions.db"));
    assert!(serde_yaml_ng::from_str::<RecordConfig>("retention: forever\n").is_err());
    assert!(serde_yaml_ng::from_str::<RecordConfig>("bodies: 3\n").is_err());
    let field = |c: RecordConfig| c.validate().unwrap_err().0;
    assert_eq!(field(RecordConfig { flush_interval: Duration::ZERO, ..d.clone() }), "record.flush_interval");
    assert_eq!(field(RecordConfig { flush_interval: Duration::from_secs(60), ..d.clone() }), "record.flush_interval");
    assert_eq!(field(RecordConfig { retention: Duration::ZERO, ..d.clone() }), "record.retention");
    assert_eq!(field(RecordConfig { max_body_bytes: 1 << 30, ..d.clone() }), "record.max_body_bytes");
    assert_eq!(field(RecordConfig { database: Some(PathBuf::new()), ..d }), "record.database");
}

#[test]
fn hash_encoding_is_pinned() {
    // Computed independently with the Python snippet in docs/recording.md.
    let h = super::hash_record(
        "0193a1b2c3d4-000000000001",
        super::GENESIS_HASH,
        0,
        1_700_000_000_000_000_000,
        "start",
        "{\"a\":1}",
    );
    assert_eq!(h, "95a21cb88749217618a6f7b134a2d0c2fd4df5bf78e10a21c60a8b78f609ed2a");
    // Extreme numbers are written in full decimal, as `to_string` does.
    for (seq, ts) in [(u64::MAX, i64::MIN), (0, -1), (7, i64::MAX)] {
        let reference = {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            h.update(b"ci-gateway session record v1\0");
            for field in ["s", super::GENESIS_HASH, &seq.to_string(), &ts.to_string(), "end", "{}"] {
                h.update((field.len() as u64).to_be_bytes());
                h.update(field.as_bytes());
            }
            hex::encode(h.finalize())
        };
        assert_eq!(super::hash_record("s", super::GENESIS_HASH, seq, ts, "end", "{}"), reference);
    }
    assert_eq!(
        super::chain::canonical_json(&serde_json::json!({"b": [1, {"d": null, "c": "x\n"}], "a": true})),
        r#"{"a":true,"b":[1,{"c":"x\n","d":null}]}"#
    );
}

const CHILD_ENV: &str = "GATEWAY_RECORD_SIGKILL_CHILD_DB";

/// The child side of `sigkill_keeps_every_committed_record` (the same test
/// re-run in a child process with `CHILD_ENV` set): records exchanges until
/// killed, reporting each flushed (committed) stream number.
fn sigkill_child(database: String) {
    let config = RecordConfig {
        database: Some(database.into()),
        flush_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let recorder = Recorder::open(&config, Path::new("/")).unwrap();
    let session = recorder.start(start_facts());
    let mut stdout = std::io::stdout();
    for stream in 1u64.. {
        session.exchange(exchange(stream));
        if stream.is_multiple_of(10) {
            recorder.flush().unwrap();
            writeln!(stdout, "FLUSHED {stream}").unwrap();
            stdout.flush().unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigkill_keeps_every_committed_record() {
    use std::os::unix::process::ExitStatusExt as _;
    if let Ok(database) = std::env::var(CHILD_ENV) {
        return sigkill_child(database);
    }
    let dir = tempfile::tempdir().unwrap();
    let database = db(dir.path());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["record::tests::sigkill_keeps_every_committed_record", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &database)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut flushed = 0u64;
    while flushed < 100 {
        match reported.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(n) = line.strip_prefix("FLUSHED ") {
                    flushed = n.parse().unwrap();
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the child reported no progress: {e}");
            }
        }
    }
    // Mid-session, the child still recording: std's kill is SIGKILL.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    let store = SessionStore::open(&database).unwrap();
    let sessions = store.list(&SessionFilter::default()).unwrap();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.state, SessionState::Interrupted, "the lock died with the child");
    let Verdict::Intact { records } = store.verify(&s.id).unwrap() else { panic!("chain broken after SIGKILL") };
    assert!(records > flushed, "{records} records, {flushed} exchanges were reported committed");
    let streams: Vec<u64> = store.records(&s.id).unwrap()[1..]
        .iter()
        .map(|r| serde_json::from_str::<ExchangeData>(&r.data).unwrap().stream)
        .collect();
    assert_eq!(streams, (1..records).collect::<Vec<_>>(), "every committed exchange, in order, none missing");
    // The next gateway records into the same file.
    let recorder = open(dir.path());
    complete_session(&recorder);
    recorder.shutdown();
}

#[test]
fn recorders_can_be_shared_across_tasks() {
    fn shareable<T: Send + Sync + Clone>() {}
    fn sendable<T: Send + Sync>() {}
    shareable::<Recorder>();
    sendable::<super::SessionRecorder>();
}

/// A PostgreSQL session as earlier versions recorded it (an event per
/// statement, parameters, command tag and error) and as this one does (one
/// `exchange` per round trip): both verify and replay like psql.
#[test]
fn postgres_recordings_of_both_formats_replay() {
    use super::{PostgresExchange, PostgresMessage, PostgresOutcome, PostgresResult};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let database = db(dir.path());
    let recorder = open(dir.path());
    let pg_start = || SessionStart { protocol: crate::event::Protocol::Postgres, ..start_facts() };

    // The earlier format, exactly as that handler wrote it.
    let old = recorder.start(pg_start());
    let old_id = old.id().clone();
    old.event(EventKind::PostgresStartup, json!({ "database": "app", "user": "ci", "rule": "db", "action": "allow" }));
    old.event(
        EventKind::PostgresStatement,
        json!({ "kind": "query", "sql": "select 41 + 1", "decision": "allow", "rule": "db", "keys": 0, "masked": false }),
    );
    old.event(EventKind::PostgresResult, json!({ "tag": "SELECT 1" }));
    old.event(
        EventKind::PostgresStatement,
        json!({ "kind": "parse", "sql": "select * from missing where id = $1", "decision": "allow", "rule": "db" }),
    );
    old.event(EventKind::PostgresParams, json!({ "kind": "bind", "params": ["7", null] }));
    old.event(
        EventKind::PostgresError,
        json!({ "sqlstate": "42P01", "message": "relation \"missing\" does not exist" }),
    );
    end(&old);

    // This format: one record per round trip.
    let new = recorder.start(pg_start());
    let new_id = new.id().clone();
    let started = SystemTime::now() - Duration::from_millis(3);
    let round = |stream, messages, results, outcome| PostgresExchange {
        stream,
        started,
        duration: Duration::from_millis(2),
        messages,
        results,
        outcome,
    };
    let query = |sql: &str| PostgresMessage {
        decision: Some("allow".into()),
        keys: Some(0),
        kind: "query".into(),
        masked: Some(false),
        rule: Some("db".into()),
        sql: Some(sql.into()),
        ..PostgresMessage::default()
    };
    let tag = |t: &str| crate::postgres::rounds::tag_result(t.into());
    new.postgres(round(1, vec![query("select 41 + 1")], vec![tag("SELECT 1")], PostgresOutcome::Ready));
    let parse = PostgresMessage { kind: "parse".into(), ..query("update t set v = $1") };
    let bind =
        PostgresMessage { kind: "bind".into(), params: Some(vec![Some("7".into()), None]), ..Default::default() };
    new.postgres(round(2, vec![parse, bind], Vec::new(), PostgresOutcome::Running));
    let error = PostgresResult { sqlstate: Some("42P01".into()), message: Some("no t".into()), ..Default::default() };
    new.postgres(round(2, Vec::new(), vec![tag("UPDATE 3"), error], PostgresOutcome::Ready));
    new.postgres(round(3, vec![query("select pg_sleep(9)")], Vec::new(), PostgresOutcome::Incomplete));
    end(&new);
    recorder.shutdown();

    for id in [&old_id, &new_id] {
        assert!(matches!(verdict(dir.path(), id), Verdict::Intact { .. }), "{id} verifies");
    }
    let (code, out) = run_captured(&database, &["replay", old_id.as_str()]);
    assert_eq!(code, ExitCode::SUCCESS);
    for expected in
        ["=> select 41 + 1", "   SELECT 1", "parse select * from missing", "params [\"7\",null]", "ERROR 42P01"]
    {
        assert!(out.contains(expected), "old format: missing {expected:?} in\n{out}");
    }
    let (code, out) = run_captured(&database, &["replay", new_id.as_str()]);
    assert_eq!(code, ExitCode::SUCCESS);
    for expected in [
        "=> select 41 + 1\n",
        "   SELECT 1\n",
        "parse update t set v = $1\n",
        "   bind [\"7\",null]\n",
        "   (still running when recorded; its answers follow)\n",
        "   UPDATE 3\n",
        "   ERROR 42P01: no t\n",
        "=> select pg_sleep(9)\n",
        "   (no answer: the session ended first)\n",
    ] {
        assert!(out.contains(expected), "new format: missing {expected:?} in\n{out}");
    }
    let (_, out) = run_captured(&database, &["show", new_id.as_str()]);
    assert!(out.contains("exchanges:    4") && out.contains("postgres #2"), "{out}");
    let (_, out) = run_captured(&database, &["show", new_id.as_str(), "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let data = &shown["records"][1]["data"];
    assert_eq!((data["protocol"].as_str(), data["results"][0]["rows"].as_u64()), (Some("postgres"), Some(1)));
}

fn page_size(database: &Path) -> i64 {
    let conn = rusqlite::Connection::open(database).unwrap();
    conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap()
}

#[test]
fn new_databases_get_large_pages_and_old_ones_keep_theirs() {
    // New: the writer's pages are 16 KiB (a quarter of the WAL writes).
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    assert_eq!(page_size(&db(dir.path())), i64::from(super::store::PAGE_SIZE));
    assert_eq!(verdict(dir.path(), &id), Verdict::Intact { records: 5 });

    // A database created by an earlier version (SQLite's 4 KiB pages, WAL)
    // keeps its size: recording goes on in it and verifies.
    let old = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(db(old.path())).unwrap();
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
    assert_eq!(page_size(&db(old.path())), 4096);
    let recorder = open(old.path());
    let first = complete_session(&recorder);
    recorder.shutdown();
    let recorder = open(old.path());
    let second = complete_session(&recorder);
    recorder.shutdown();
    assert_eq!(page_size(&db(old.path())), 4096);
    for id in [&first, &second] {
        assert_eq!(verdict(old.path(), id), Verdict::Intact { records: 5 });
    }
}

#[test]
fn a_damaged_row_of_records_is_reported_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let id = complete_session(&recorder);
    recorder.shutdown();
    // Cut short inside record 0.
    assert_eq!(sql(dir.path(), "UPDATE chunks SET body = substr(body, 1, 20) WHERE session = ?1", &id), 1);
    match verdict(dir.path(), &id) {
        Verdict::Broken { seq: Some(0), problem } => assert!(problem.contains("does not decode"), "{problem}"),
        other => panic!("{other:?}"),
    }
    let store = SessionStore::open(&db(dir.path())).unwrap();
    let err = store.records(&id).unwrap_err();
    assert!(matches!(err, RecordError::BadRow { field: "records", .. }), "{err}");
    let (code, out) = run_captured(&db(dir.path()), &["verify", "--all"]);
    assert_eq!(code, ExitCode::from(1), "{out}");
    assert!(out.contains("1 broken"), "{out}");
}

#[test]
fn a_version_1_database_is_migrated_keeping_every_record_its_id_and_its_damage() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = open(dir.path());
    let (a, b, c) = (complete_session(&recorder), complete_session(&recorder), complete_session(&recorder));
    recorder.shutdown();
    let store = SessionStore::open(&db(dir.path())).unwrap();
    let before: Vec<Vec<super::Record>> = [&a, &b, &c].map(|id| store.records(id).unwrap()).into();
    // Back to version 1 as its writer stored them: a row per record, a's
    // and b's interleaved (ids 1..=10), then c's (11..=15); b's record 3
    // linked to a wrong hash.
    let conn = store.connection();
    conn.execute_batch(
        "DROP TABLE chunks;
         CREATE TABLE records (
             id INTEGER PRIMARY KEY, session TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
             kind TEXT NOT NULL, data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
             UNIQUE (session, seq)
         ) STRICT;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    let interleaved = before[0].iter().zip(&before[1]).flat_map(|(x, y)| [x, y]);
    for (local, r) in (1i64..).zip(interleaved.chain(&before[2])) {
        let prev = if r.session == b && r.seq == 3 { "0".repeat(63) + "1" } else { r.prev_hash.clone() };
        conn.execute(
            "INSERT INTO records (id, session, seq, ts, kind, data, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![local, r.session.as_str(), r.seq as i64, r.ts, r.kind, r.data, prev, r.hash],
        )
        .unwrap();
    }
    drop(store);

    let store = SessionStore::open(&db(dir.path())).unwrap();
    let conn = store.connection();
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, 2);
    assert_eq!(store.records(&a).unwrap(), before[0]);
    assert_eq!(store.records(&c).unwrap(), before[2]);
    assert_eq!(store.verify(&a).unwrap(), Verdict::Intact { records: 5 });
    assert_eq!(store.verify(&c).unwrap(), Verdict::Intact { records: 5 });
    match store.verify(&b).unwrap() {
        Verdict::Broken { seq: Some(3), problem } => assert!(problem.contains("prev_hash"), "{problem}"),
        other => panic!("{other:?}"),
    }
    // Every record keeps its local id (the fleet outbox's cursor); c's run
    // of consecutive ids became one row.
    let shipped = super::records_after(conn, 0, 100).unwrap();
    let ids: Vec<(i64, String, u64)> =
        shipped.records.iter().map(|(local, r)| (*local, r.session.to_string(), r.seq)).collect();
    let expected: Vec<(i64, String, u64)> = (1i64..)
        .zip(
            (0..5)
                .flat_map(|seq| [(a.to_string(), seq), (b.to_string(), seq)])
                .chain((0..5).map(|seq| (c.to_string(), seq))),
        )
        .map(|(local, (session, seq))| (local, session, seq))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(shipped.last_id, Some(15));
    let rows = |id: &SessionId| -> i64 {
        conn.query_row("SELECT count(*) FROM chunks WHERE session = ?1", [id.as_str()], |r| r.get(0)).unwrap()
    };
    assert_eq!((rows(&a), rows(&c)), (5, 1));
    // And the writer numbers after them.
    drop(store);
    let recorder = open(dir.path());
    let d = complete_session(&recorder);
    recorder.shutdown();
    let store = SessionStore::open(&db(dir.path())).unwrap();
    let first: i64 = store
        .connection()
        .query_row("SELECT min(id) FROM chunks WHERE session = ?1", [d.as_str()], |r| r.get(0))
        .unwrap();
    assert_eq!(first, 16);
}
