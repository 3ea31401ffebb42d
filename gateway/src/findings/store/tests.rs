//! Store tests: every test works on a real SQLite file in a temporary directory.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, Write as _},
    path::Path,
};

use time::{macros::datetime, Duration, OffsetDateTime};

use super::*;
use crate::findings::{Action, FindingsHandle};

const T0: OffsetDateTime = datetime!(2024-05-01 12:00 UTC);

fn finding(fp: &str, exe: Option<&str>, host: &str, port: u16, at: OffsetDateTime) -> NewFinding {
    NewFinding {
        rule_id: "openai-api-key".into(),
        confidence: "high".into(),
        fingerprint: fp.into(),
        preview: "sk-ab…wxyz".into(),
        location: "header:authorization".into(),
        dest_host: host.into(),
        dest_port: port,
        process: ProcessSnapshot {
            pid: 4242,
            uid: 1000,
            exe: exe.map(Into::into),
            comm: "curl".into(),
            cgroup: Some("/ci-gateway/jobs/job-17".into()),
            container: None,
            gid: None,
            job: BTreeMap::from([("CI_JOB_ID".into(), "17".into()), ("CI_PROJECT_PATH".into(), "grp/proj".into())]),
        },
        identity: None,
        action: Action::Block,
        seen_at: at,
        session_id: None,
        command: None,
        script: None,
        allowed_by: None,
    }
}

fn simple(fp: &str) -> NewFinding {
    finding(fp, Some("/usr/bin/curl"), "api.openai.com", 443, T0)
}

fn temp_store() -> (tempfile::TempDir, FindingStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FindingStore::open(&dir.path().join("gateway.db")).unwrap();
    (dir, store)
}

#[test]
fn one_finding_per_key_and_rule_with_every_sighting() {
    let (_dir, store) = temp_store();
    let first = store.record(&simple("fp1")).unwrap();
    assert_eq!(first, Recorded { id: first.id, new: true, count: 1 });

    let mut again = simple("fp1");
    again.seen_at = T0 + Duration::minutes(5);
    again.process.pid = 999;
    again.action = Action::Flag;
    again.location = "query:key".into();
    again.dest_host = "API.OpenAI.com.".into();
    let second = store.record(&again).unwrap();
    assert_eq!(second, Recorded { id: first.id, new: false, count: 2 });

    let f = store.get(first.id).unwrap().unwrap();
    assert_eq!(f.count, 2);
    assert_eq!(f.first_seen, T0);
    assert_eq!(f.last_seen, T0 + Duration::minutes(5));
    assert_eq!(f.process.pid, 999, "latest sighting's pid");
    assert_eq!(f.action, Action::Flag, "latest sighting's action");
    assert_eq!(f.location, "query:key");
    assert_eq!(f.dest_host, "api.openai.com");
    assert_eq!(f.status, Status::Open);

    // Another executable, port or host: the same key, the same finding,
    // one more sighting. Another key or rule: another finding.
    let mut python = finding("fp1", Some("/usr/bin/python3.11"), "example.com", 8443, T0 + Duration::minutes(9));
    python.process.job.insert("CI_PROJECT_PATH".into(), "other/proj".into());
    python.identity = Some("spiffe://ci/other".into());
    python.command = Some("python3.11 tools/deploy.py".into());
    python.script = Some("/builds/other/proj/tools/deploy.py".into());
    python.session_id = Some("s-42".into());
    assert_eq!(store.record(&python).unwrap(), Recorded { id: first.id, new: false, count: 3 });
    assert!(store.record(&finding("fp1", None, "api.openai.com", 443, T0)).is_ok_and(|r| !r.new));
    assert!(store.record(&simple("fp2")).unwrap().new);
    let other_rule = NewFinding { rule_id: "generic-bearer".into(), ..simple("fp1") };
    assert!(store.record(&other_rule).unwrap().new);
    assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 3);

    let f = store.get(first.id).unwrap().unwrap();
    assert_eq!(f.count, 4);
    assert_eq!(f.sightings.len(), 4, "every sighting is kept");
    let times: Vec<_> = f.sightings.iter().map(|x| x.seen_at).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "timeline in time order: {times:?}");
    let last = f.sightings.last().unwrap();
    assert_eq!(last.process.exe.as_deref(), Some("/usr/bin/python3.11"));
    assert_eq!((last.dest_host.as_str(), last.dest_port), ("example.com", 8443));
    assert_eq!(last.project(), Some("other/proj"));
    assert_eq!(last.script.as_deref(), Some("/builds/other/proj/tools/deploy.py"));
    assert_eq!(last.command.as_deref(), Some("python3.11 tools/deploy.py"));
    assert_eq!(last.session_id.as_deref(), Some("s-42"));
    assert_eq!(store.sessions_of(first.id).unwrap(), ["s-42"]);
    assert_eq!(store.findings_of_session("s-42").unwrap(), [first.id]);
    assert!(
        f.sightings.iter().any(|x| x.action == Action::Flag && x.location == "query:key" && x.process.pid == 999),
        "{:?}",
        f.sightings
    );

    // Filters look at every sighting, not only the latest.
    let ids = |filter: ListFilter| store.list(&filter).unwrap().into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(ids(ListFilter { project: Some("grp/*".into()), ..Default::default() }).len(), 3);
    assert_eq!(ids(ListFilter { project: Some("other/*".into()), ..Default::default() }), [first.id]);
    assert_eq!(ids(ListFilter { identity: Some("spiffe://ci/*".into()), ..Default::default() }), [first.id]);
    assert_eq!(ids(ListFilter { host: Some("example.com".into()), ..Default::default() }), [first.id]);
    assert_eq!(ids(ListFilter { fingerprint: Some("fp2".into()), ..Default::default() }).len(), 1);
    assert_eq!(ids(ListFilter { fingerprint: Some("fp1".into()), ..Default::default() }).len(), 2);
}

#[test]
fn allowlist_entries_and_false_positives_become_waivers() {
    let (_dir, store) = temp_store();
    let a = store.record(&simple("fp-a")).unwrap().id;
    let b = store.record(&simple("fp-b")).unwrap().id;
    let now = OffsetDateTime::now_utc();
    assert!(store.waivers(now).unwrap().is_empty());

    let scope: crate::findings::Scope = "destination=api.openai.com".parse().unwrap();
    let entry = store.allow(a, &scope, Some(now + Duration::minutes(10)), "vendor sandbox key", "alice").unwrap();
    assert_eq!(entry.finding, a);
    assert!(store.allow(a, &scope, Some(now - Duration::minutes(1)), "r", "alice").is_err(), "past expiry");
    assert!(store.allow(a, &scope, None, " ", "alice").is_err(), "a reason is required");
    assert!(matches!(store.allow(FindingId(99), &scope, None, "r", "alice"), Err(FindingsError::NotFound(_))));
    store.set_status(b, Status::FalsePositive, "bob", "docs example").unwrap();

    let w = store.waivers(now).unwrap();
    assert_eq!(w.waiver("fp-a", "api.openai.com", None, now), Some(entry.id.to_string().as_str()));
    assert_eq!(w.waiver("fp-a", "example.com", None, now), None, "out of scope");
    assert_eq!(w.waiver("fp-a", "api.openai.com", None, now + Duration::minutes(11)), None, "expired");
    assert!(w.waiver("fp-b", "anywhere", None, now).is_some_and(|by| by.contains("false positive")));
    assert!(store.waivers(now + Duration::minutes(11)).unwrap().waiver("fp-a", "api.openai.com", None, now).is_none());

    // Audited in the finding's history; listed; revocable once.
    let history = store.get(a).unwrap().unwrap().history;
    let last = history.last().unwrap();
    assert_eq!((last.by.as_str(), last.from, last.to), ("alice", Some(Status::Open), Status::Open));
    assert!(last.comment.contains(&entry.id.to_string()) && last.comment.contains("vendor sandbox key"), "{last:?}");
    assert_eq!(store.allowlist().unwrap(), std::slice::from_ref(&entry));
    let revoked = store.revoke(entry.id, "carol", "no longer needed").unwrap();
    assert_eq!(revoked.revoked_by.as_deref(), Some("carol"));
    assert!(matches!(store.revoke(entry.id, "carol", "again"), Err(FindingsError::NoSuchAllowEntry(_))));
    assert_eq!(store.waivers(now).unwrap().waiver("fp-a", "api.openai.com", None, now), None);
    // Reopening a false positive restores blocking.
    store.set_status(b, Status::Open, "bob", "real after all").unwrap();
    assert!(store.waivers(now).unwrap().is_empty());
}

#[test]
fn a_database_with_split_findings_is_folded_per_key_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    {
        // The schema before one finding per key: (key, exe, destination) dedup.
        let conn = crate::sqlite::open_private(&path, std::time::Duration::from_secs(1)).unwrap();
        crate::sqlite::migrate(&conn, &MIGRATIONS[..2]).unwrap();
        let insert = |fp: &str, exe: &str, host: &str, first: i64, last: i64, count: i64, status: &str| {
            conn.execute(
                "INSERT INTO findings (rule_id, confidence, fingerprint, preview, location, dest_host, dest_port, \
                 pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status) \
                 VALUES ('openai-api-key', 'high', ?1, 'sk-…', 'header:authorization', ?2, 443, 7, 1000, ?3, 'c', \
                 NULL, '{\"CI_PROJECT_PATH\":\"g/p\"}', NULL, ?4, ?5, ?6, 'block', ?7)",
                rusqlite::params![fp, host, exe, first, last, count, status],
            )
            .unwrap();
            let id = conn.last_insert_rowid();
            conn.execute(
                "INSERT INTO status_history (finding_id, from_status, to_status, changed_by, changed_at, comment) \
                 VALUES (?1, NULL, 'open', 'gateway', ?2, 'first seen')",
                rusqlite::params![id, first],
            )
            .unwrap();
            id
        };
        assert_eq!(insert("fp", "/usr/bin/curl", "api.openai.com", 10, 20, 3, "acknowledged"), 1);
        assert_eq!(insert("fp", "/usr/bin/python3", "api.openai.com", 5, 30, 2, "open"), 2);
        assert_eq!(insert("fp", "/usr/bin/curl", "example.com", 15, 25, 1, "open"), 3);
        assert_eq!(insert("other", "/usr/bin/curl", "example.com", 1, 1, 1, "open"), 4);
    }
    let store = FindingStore::open(&path).unwrap();
    let listed = store.list(&ListFilter::default()).unwrap();
    assert_eq!(listed.iter().map(|f| f.id.0).collect::<Vec<_>>(), [1, 4], "one finding per key and rule");
    let f = store.get(FindingId(1)).unwrap().unwrap();
    assert_eq!((f.count, f.status), (6, Status::Acknowledged), "counts add up; the oldest id's review stands");
    assert_eq!((f.first_seen, f.last_seen), (from_nanos(5).unwrap(), from_nanos(30).unwrap()));
    let exes: BTreeSet<_> = f.sightings.iter().filter_map(|x| x.process.exe.clone()).collect();
    assert_eq!(exes.len(), 2, "the old findings' latest sightings: {:?}", f.sightings);
    assert_eq!(f.sightings.len(), 3);
    // The folded ids still answer, pointing at the finding they joined.
    let folded = store.get(FindingId(2)).unwrap().unwrap();
    assert_eq!(folded.merged_into, Some(FindingId(1)));
    assert_eq!(folded.sightings.len(), 3);
    assert!(folded.history.last().unwrap().comment.contains("merged into F-1"));
    // New sightings of the key land on the surviving finding.
    let r = store.record(&NewFinding { rule_id: "openai-api-key".into(), ..simple("fp") }).unwrap();
    assert_eq!((r.id, r.new, r.count), (FindingId(1), false, 7));
}

#[test]
fn late_sighting_does_not_rewind_latest_fields() {
    let (_dir, store) = temp_store();
    let id = store.record(&simple("fp")).unwrap().id;
    let mut late = simple("fp");
    late.seen_at = T0 - Duration::hours(1);
    late.process.pid = 1;
    store.record(&late).unwrap();
    let f = store.get(id).unwrap().unwrap();
    assert_eq!((f.count, f.first_seen, f.last_seen, f.process.pid), (2, T0 - Duration::hours(1), T0, 4242));
}

#[test]
fn status_transitions_are_recorded_with_who_when_and_why() {
    let (_dir, store) = temp_store();
    let id = store.record(&simple("fp")).unwrap().id;
    let before = OffsetDateTime::now_utc() - Duration::seconds(1);
    let f = store.set_status(id, Status::Acknowledged, "alice", "rotating with the vendor").unwrap();
    assert_eq!(f.status, Status::Acknowledged);
    let f = store.set_status(id, Status::Resolved, "  bob ", "rotated, old key revoked").unwrap();
    assert_eq!(f.status, Status::Resolved);
    let after = OffsetDateTime::now_utc() + Duration::seconds(1);

    let h = &store.get(id).unwrap().unwrap().history;
    assert_eq!(h.len(), 3);
    assert_eq!((h[0].from, h[0].to, h[0].by.as_str(), h[0].at), (None, Status::Open, "gateway", T0));
    assert_eq!((h[1].from, h[1].to, h[1].by.as_str()), (Some(Status::Open), Status::Acknowledged, "alice"));
    assert_eq!(h[1].comment, "rotating with the vendor");
    assert_eq!((h[2].from, h[2].to, h[2].by.as_str()), (Some(Status::Acknowledged), Status::Resolved, "bob"));
    assert_eq!(h[2].comment, "rotated, old key revoked");
    for change in &h[1..] {
        assert!(change.at > before && change.at < after, "{:?}", change.at);
    }

    // Closed findings can only be reopened.
    let e = store.set_status(id, Status::Acknowledged, "carol", "").unwrap_err();
    assert!(matches!(e, FindingsError::InvalidTransition { from: Status::Resolved, to: Status::Acknowledged, .. }));
    assert_eq!(e.to_string(), format!("{id} is resolved; it cannot become acknowledged (allowed from resolved: open)"));
    assert!(e.is_request_error());
    let e = store.set_status(id, Status::Resolved, "carol", "").unwrap_err();
    assert!(matches!(e, FindingsError::InvalidTransition { .. }), "no-op changes are rejected too");

    assert!(matches!(store.set_status(id, Status::Open, " ", "x"), Err(FindingsError::MissingReviewer)));
    let missing = FindingId(9999);
    assert!(
        matches!(store.set_status(missing, Status::Open, "a", "x"), Err(FindingsError::NotFound(m)) if m == missing)
    );
    assert_eq!(store.get(missing).unwrap(), None);

    let f = store.set_status(id, Status::Open, "carol", "still in a fork").unwrap();
    assert_eq!(f.status, Status::Open);
    let f = store.set_status(id, Status::FalsePositive, "dave", "fixture from the docs").unwrap();
    assert_eq!(f.status, Status::FalsePositive);
    assert_eq!(f.history.len(), 5, "rejected changes leave no trace");
}

#[test]
fn resighting_after_resolution_reopens() {
    let (_dir, store) = temp_store();
    let id = store.record(&simple("fp")).unwrap().id;
    store.set_status(id, Status::Resolved, "alice", "rotated").unwrap();

    let mut again = simple("fp");
    again.seen_at = T0 + Duration::days(1);
    let r = store.record(&again).unwrap();
    assert_eq!(r, Recorded { id, new: false, count: 2 });
    let f = store.get(id).unwrap().unwrap();
    assert_eq!(f.status, Status::Open);
    let last = f.history.last().unwrap();
    assert_eq!(
        (last.from, last.to, last.by.as_str(), last.comment.as_str(), last.at),
        (Some(Status::Resolved), Status::Open, "gateway", "seen again after resolution", T0 + Duration::days(1))
    );

    // False positives stay closed; acknowledged findings stay acknowledged.
    store.set_status(id, Status::FalsePositive, "alice", "test key").unwrap();
    let r = store.record(&again).unwrap();
    assert_eq!(r.count, 3);
    let f = store.get(id).unwrap().unwrap();
    assert_eq!((f.status, f.history.len()), (Status::FalsePositive, 4));

    let other = store.record(&simple("fp-other")).unwrap().id;
    store.set_status(other, Status::Acknowledged, "bob", "on it").unwrap();
    store.record(&simple("fp-other")).unwrap();
    assert_eq!(store.get(other).unwrap().unwrap().status, Status::Acknowledged);
}

#[test]
fn list_filters_and_order() {
    let (_dir, store) = temp_store();
    let mut a = finding("a", Some("/bin/a"), "git.internal", 443, T0);
    a.rule_id = "github-pat".into();
    let a = store.record(&a).unwrap().id;
    let b = store.record(&finding("b", Some("/bin/b"), "api.openai.com", 443, T0 + Duration::hours(2))).unwrap().id;
    let c = store.record(&finding("c", Some("/bin/c"), "ci.internal", 443, T0 + Duration::hours(1))).unwrap().id;
    store.set_status(c, Status::Acknowledged, "alice", "").unwrap();

    let ids = |filter: ListFilter| store.list(&filter).unwrap().iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(ids(ListFilter::default()), vec![b, c, a], "newest last_seen first");
    assert_eq!(ids(ListFilter { status: Some(Status::Acknowledged), ..Default::default() }), vec![c]);
    assert_eq!(ids(ListFilter { status: Some(Status::Open), ..Default::default() }), vec![b, a]);
    assert_eq!(ids(ListFilter { status: Some(Status::Resolved), ..Default::default() }), vec![]);
    assert_eq!(ids(ListFilter { rule: Some("github-*".into()), ..Default::default() }), vec![a]);
    assert_eq!(ids(ListFilter { rule: Some("openai-api-key".into()), ..Default::default() }), vec![b, c]);
    assert_eq!(ids(ListFilter { host: Some("*.INTERNAL".into()), ..Default::default() }), vec![c, a]);
    assert_eq!(ids(ListFilter { since: Some(T0 + Duration::minutes(30)), ..Default::default() }), vec![b, c]);
    assert_eq!(
        ids(ListFilter {
            status: Some(Status::Open),
            host: Some("*.internal".into()),
            since: Some(T0),
            rule: Some("*".into()),
            ..Default::default()
        }),
        vec![a]
    );
    // Each listed finding carries its history.
    assert_eq!(store.list(&ListFilter::default()).unwrap()[1].history.len(), 2);
}

/// A minimal RFC 4180 reader, independent of the writer under test.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    assert!(field.is_empty() && row.is_empty(), "last row must end with a line break");
    rows
}

fn export_to_string(store: &FindingStore, format: ExportFormat) -> String {
    let mut out = Vec::new();
    store.export(format, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn populate_for_export(store: &FindingStore) -> FindingId {
    let mut tricky = finding("fp-tricky", Some("/opt/tools, \"v2\"/run"), "api.openai.com", 443, T0);
    tricky.location = "body:$.auth[\"key\"]".into();
    tricky.process.comm = "line\nbreak".into();
    tricky.preview = "=HYPERLINK(\"x\")".into();
    let tricky = store.record(&tricky).unwrap().id;
    let fp = store.record(&finding("fp-2", Some("/usr/bin/curl"), "git.internal", 8443, T0)).unwrap().id;
    store.set_status(fp, Status::FalsePositive, "alice", "docs example").unwrap();
    let mut other = simple("fp-3");
    other.rule_id = "aws-access-key".into();
    store.record(&other).unwrap();
    tricky
}

#[test]
fn export_json() {
    let (_dir, store) = temp_store();
    populate_for_export(&store);
    let v: serde_json::Value = serde_json::from_str(&export_to_string(&store, ExportFormat::Json)).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0]["id"], "F-1");
    assert_eq!(arr[0]["process"]["exe"], "/opt/tools, \"v2\"/run");
    assert_eq!(arr[0]["process"]["job"]["CI_JOB_ID"], "17");
    assert_eq!(arr[1]["status"], "false_positive");
    assert_eq!(arr[1]["history"][1]["by"], "alice");
    assert_eq!(arr[1]["first_seen"], "2024-05-01T12:00:00Z");
    assert_eq!(arr[2]["count"], 1);
}

#[test]
fn export_sarif() {
    let (_dir, store) = temp_store();
    populate_for_export(&store);
    let v: serde_json::Value = serde_json::from_str(&export_to_string(&store, ExportFormat::Sarif)).unwrap();
    assert_eq!(v["version"], "2.1.0");
    let run = &v["runs"][0];
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    let rule_ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(rule_ids, ["aws-access-key", "openai-api-key"]);
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        let rule = r["ruleId"].as_str().unwrap();
        let index = usize::try_from(r["ruleIndex"].as_u64().unwrap()).unwrap();
        assert_eq!(rules[index]["id"], rule);
        assert!(["error", "warning", "note", "none"].contains(&r["level"].as_str().unwrap()));
        assert!(!r["message"]["text"].as_str().unwrap().is_empty());
        let logical = &r["locations"][0]["logicalLocations"][0];
        assert!(logical["fullyQualifiedName"].as_str().unwrap().contains(':'));
        assert!(r["partialFingerprints"]["staticKeyHmac/v1"].as_str().unwrap().starts_with("fp-"));
        assert!(r["properties"]["process"]["pid"].is_u64());
        assert!(r["properties"]["count"].is_u64());
    }
    assert_eq!(
        results[0]["locations"][0]["logicalLocations"][0]["fullyQualifiedName"],
        "api.openai.com:443/body:$.auth[\"key\"]"
    );
    assert_eq!(results[0]["level"], "error");
    assert_eq!(results[1]["properties"]["status"], "false_positive");
    assert_eq!(results[1]["suppressions"][0]["kind"], "external");
    assert_eq!(results[1]["suppressions"][0]["justification"], "docs example (alice)");
    assert_eq!(results[1]["level"], "note");
    assert_eq!(results[0]["properties"]["project"], "grp/proj");
    assert_eq!(results[0]["properties"]["sightings"], 1);
}

#[test]
fn sarif_places_a_finding_at_its_script_in_the_checkout() {
    let (_dir, store) = temp_store();
    let mut f = simple("fp-s");
    f.process.job.insert("CI_PROJECT_DIR".into(), "/builds/grp/proj".into());
    f.script = Some("/builds/grp/proj/tools/deploy.py".into());
    store.record(&f).unwrap();
    let mut other = simple("fp-t");
    other.script = Some("/opt/elsewhere/run.py".into());
    store.record(&other).unwrap();
    let v: serde_json::Value = serde_json::from_str(&export_to_string(&store, ExportFormat::Sarif)).unwrap();
    let results = v["runs"][0]["results"].as_array().unwrap();
    let artifact = &results[0]["locations"][0]["physicalLocation"]["artifactLocation"];
    assert_eq!((artifact["uri"].as_str(), artifact["uriBaseId"].as_str()), (Some("tools/deploy.py"), Some("SRCROOT")));
    let artifact = &results[1]["locations"][0]["physicalLocation"]["artifactLocation"];
    assert_eq!(artifact["uri"], "file:///opt/elsewhere/run.py");
    assert_eq!(results[0]["properties"]["job"]["CI_JOB_ID"], "17");
}

#[test]
fn export_csv() {
    let (_dir, store) = temp_store();
    populate_for_export(&store);
    let text = export_to_string(&store, ExportFormat::Csv);
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), 4, "header + 3 findings:\n{text}");
    assert_eq!(rows[0], crate::findings::export::CSV_HEADER);
    assert!(rows.iter().all(|r| r.len() == rows[0].len()));
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    assert_eq!(rows[1][col("exe")], "/opt/tools, \"v2\"/run");
    assert_eq!(rows[1][col("comm")], "line\nbreak");
    assert_eq!(rows[1][col("location")], "body:$.auth[\"key\"]");
    assert_eq!(rows[1][col("preview")], "'=HYPERLINK(\"x\")", "formula neutralized");
    assert_eq!(rows[2][col("status")], "false_positive");
    assert_eq!(rows[2][col("dest_port")], "8443");
    let job: BTreeMap<String, String> = serde_json::from_str(&rows[3][col("job")]).unwrap();
    assert_eq!(job["CI_PROJECT_PATH"], "grp/proj");
}

#[test]
fn empty_exports_are_valid() {
    for format in [ExportFormat::Json, ExportFormat::Sarif, ExportFormat::Csv] {
        let mut out = Vec::new();
        FindingStore::export_empty(format, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        match format {
            ExportFormat::Csv => assert_eq!(parse_csv(&text).len(), 1),
            _ => {
                serde_json::from_str::<serde_json::Value>(&text).unwrap();
            }
        }
    }
}

#[test]
fn concurrent_records_from_threads_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    const THREADS: usize = 6;
    const EACH: usize = 20;
    // Every thread opens its own connection at once: opening (WAL switch,
    // schema creation) must be safe against concurrent openers too.
    let results: Vec<Vec<Recorded>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let path = &path;
                s.spawn(move || {
                    let store = FindingStore::open(path).unwrap();
                    (0..EACH)
                        // Half the records go to a finding shared by all threads.
                        .map(|i| {
                            let fp = if i % 2 == 0 { "shared".to_owned() } else { format!("t{t}-{i}") };
                            store.record(&simple(&fp)).unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let store = FindingStore::open(&path).unwrap();
    let all = store.list(&ListFilter::default()).unwrap();
    assert_eq!(all.len(), 1 + THREADS * EACH / 2);
    assert_eq!(all.iter().map(|f| f.count).sum::<u64>(), (THREADS * EACH) as u64);
    let shared: Vec<_> = all.iter().filter(|f| f.fingerprint == "shared").collect();
    assert_eq!(shared[0].count, (THREADS * EACH / 2) as u64);
    // Counts handed back are unique per sighting of the shared finding.
    let mut counts: Vec<u64> = results.iter().flatten().filter(|r| r.id == shared[0].id).map(|r| r.count).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=(THREADS * EACH / 2) as u64).collect::<Vec<_>>());
    store.check_integrity().unwrap();
}

#[test]
fn concurrent_records_from_tasks_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let recorded: Vec<Recorded> = rt.block_on(async {
        let handle = FindingsHandle::open(&path).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.record(simple(&format!("fp-{}", i % 50))).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let store = FindingStore::open(&path).unwrap();
    let all = store.list(&ListFilter::default()).unwrap();
    assert_eq!(all.len(), 50);
    assert!(all.iter().all(|f| f.count == 4));
    assert_eq!(recorded.iter().filter(|r| r.new).count(), 50);
    for r in &recorded {
        assert!(store.get(r.id).unwrap().is_some());
    }
}

#[test]
fn handle_reports_invalid_findings_without_losing_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let handle = FindingsHandle::open(&path).unwrap();
        let good = handle.record(simple("ok")).await.unwrap();
        let bad = handle.record(simple("")).await.unwrap_err();
        assert!(matches!(bad, FindingsError::InvalidFinding(_)), "{bad}");
        let (a, b, c) =
            tokio::join!(handle.record(simple("a")), handle.record(simple("")), handle.record(simple("ok")));
        assert!(a.unwrap().new);
        assert!(b.is_err());
        assert_eq!(c.unwrap(), Recorded { id: good.id, new: false, count: 2 });
    });
    let store = FindingStore::open(&path).unwrap();
    assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 2);
}

/// Set by [`durability_under_sigkill`] for the child it spawns.
const CHILD_ENV: &str = "GATEWAY_FINDINGS_DURABILITY_CHILD_DB";

/// Not a test on its own: the body of the child process of
/// [`durability_under_sigkill`]. Records findings from several tasks until
/// killed, printing each id once `record` has returned.
#[test]
fn durability_child_helper() {
    let Ok(db) = std::env::var(CHILD_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let handle = FindingsHandle::open(Path::new(&db)).unwrap();
        // Bounded so an orphaned child cannot run forever; generous, since
        // the parent needs 300 fsynced commits first on a possibly busy disk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while std::time::Instant::now() < deadline {
                        // A mix of new findings and repeat sightings.
                        let r = handle.record(simple(&format!("fp-{t}-{}", i % 40))).await.unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "COMMITTED {} {}", r.id.0, r.count).unwrap();
                        out.flush().unwrap();
                        i += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn durability_under_sigkill() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let module = module_path!().split_once("::").map_or(module_path!(), |(_, rest)| rest);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::durability_child_helper"), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut committed: Vec<(i64, u64)> = Vec::new();
    let mut killed = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("COMMITTED ") else { continue };
        let (id, count) = rest.split_once(' ').unwrap();
        committed.push((id.parse().unwrap(), count.parse().unwrap()));
        if committed.len() == 300 && !killed {
            child.kill().unwrap(); // SIGKILL, while the other tasks are mid-write
            killed = true;
        }
        // Lines written before the kill are still drained from the pipe.
    }
    let status = child.wait().unwrap();
    assert!(killed, "the child stopped after {} commits: {status:?}", committed.len());
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");

    let store = FindingStore::open(&db).unwrap();
    store.check_integrity().unwrap();
    let mut max_count: BTreeMap<i64, u64> = BTreeMap::new();
    for (id, count) in &committed {
        let e = max_count.entry(*id).or_default();
        *e = (*e).max(*count);
    }
    for (id, count) in max_count {
        let f = store.get(FindingId(id)).unwrap().unwrap_or_else(|| panic!("F-{id} reported committed but missing"));
        assert!(f.count >= count, "F-{id}: count {} < reported {count}", f.count);
    }
    let ok: String = store.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn no_column_can_hold_a_raw_key() {
    let (_dir, store) = temp_store();
    let tables: BTreeSet<String> = store
        .conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        BTreeSet::from([
            "findings".into(),
            "status_history".into(),
            "sqlite_sequence".into(),
            "sightings".into(),
            "allowlist".into()
        ])
    );
    let columns = |table: &str| -> Vec<String> {
        store
            .conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    // Adding a column means reviewing this list: none may ever carry the
    // key itself (`preview` is the detector's redacted form, bounded to 64
    // bytes; `fingerprint` is an HMAC).
    assert_eq!(
        columns("findings"),
        [
            "id",
            "rule_id",
            "confidence",
            "fingerprint",
            "preview",
            "location",
            "dest_host",
            "dest_port",
            "pid",
            "uid",
            "exe",
            "comm",
            "cgroup",
            "job",
            "identity",
            "first_seen",
            "last_seen",
            "count",
            "action",
            "status",
            "container",
            "merged_into"
        ]
    );
    // `command` is masked (findings::origin) before it is stored.
    assert_eq!(
        columns("sightings"),
        [
            "id",
            "finding_id",
            "seen_at",
            "identity",
            "job",
            "pid",
            "uid",
            "exe",
            "comm",
            "cgroup",
            "container",
            "command",
            "script",
            "dest_host",
            "dest_port",
            "location",
            "action",
            "allowed_by",
            "session_id"
        ]
    );
    assert_eq!(
        columns("allowlist"),
        [
            "id",
            "finding_id",
            "fingerprint",
            "scope",
            "scope_value",
            "expires_at",
            "reason",
            "created_by",
            "created_at",
            "revoked_by",
            "revoked_at"
        ]
    );
    assert_eq!(
        columns("status_history"),
        ["id", "finding_id", "from_status", "to_status", "changed_by", "changed_at", "comment"]
    );
    for c in columns("findings").iter().chain(&columns("status_history")).chain(&columns("sightings")) {
        for word in ["key", "secret", "token", "raw", "value", "credential"] {
            assert!(!c.contains(word), "column {c}");
        }
    }
}

#[test]
fn caller_mistakes_cannot_leak_secrets_or_bloat_rows() {
    let (_dir, store) = temp_store();
    let mut f = simple("fp");
    let raw_key = format!("sk-proj-{}", "A".repeat(120));
    f.preview = raw_key.clone(); // a careless caller
    f.process.job.insert("CI_JOB_TOKEN".into(), "glcbt-secret".into());
    f.process.job.insert("CI_REGISTRY_PASSWORD".into(), "hunter2".into());
    f.process.job.insert("DEPLOY_KEY".into(), "ssh-ed25519 AAAA".into());
    f.process
        .job
        .insert("CI_REPOSITORY_URL".into(), "https://gitlab-ci-token:glcbt-xyz@git.example/grp/proj.git".into());
    f.location = "h".repeat(10_000);
    let id = store.record(&f).unwrap().id;
    let got = store.get(id).unwrap().unwrap();
    assert_eq!(got.preview.len(), 64);
    assert_ne!(got.preview, raw_key);
    assert_eq!(got.process.job["CI_JOB_TOKEN"], "[REDACTED]");
    assert_eq!(got.process.job["CI_REGISTRY_PASSWORD"], "[REDACTED]");
    assert_eq!(got.process.job["DEPLOY_KEY"], "[REDACTED]");
    assert_eq!(got.process.job["CI_REPOSITORY_URL"], "https://[REDACTED]@git.example/grp/proj.git");
    assert_eq!(got.process.job["CI_JOB_ID"], "17");
    assert_eq!(got.location.len(), 512);

    let mut too_long = simple(&"f".repeat(300));
    too_long.seen_at = T0;
    assert!(matches!(store.record(&too_long), Err(FindingsError::InvalidFinding(_))));
    assert!(matches!(
        store.record(&NewFinding { rule_id: " ".into(), ..simple("x") }),
        Err(FindingsError::InvalidFinding(_))
    ));
    assert!(matches!(
        store.record(&NewFinding { dest_host: ".".into(), ..simple("x") }),
        Err(FindingsError::InvalidFinding(_))
    ));
}

#[test]
fn corrupt_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    std::fs::write(&path, b"this is definitely not an SQLite database, just some text padding it out".repeat(100))
        .unwrap();
    let e = FindingStore::open(&path).unwrap_err();
    assert!(matches!(e, FindingsError::Corrupt { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");
}

#[test]
fn missing_directory_or_directory_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("gateway.db");
    let msg = FindingStore::open(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&path.display().to_string()) && msg.contains("does not exist"), "{msg}");
    let msg = FindingStore::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("is a directory"), "{msg}");
}

#[test]
fn newer_schema_is_refused_and_reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let id = {
        let store = FindingStore::open(&path).unwrap();
        store.record(&simple("fp")).unwrap().id
    };
    let store = FindingStore::open(&path).unwrap();
    assert_eq!(store.get(id).unwrap().unwrap().count, 1, "reopening keeps data and schema");
    store.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(store);
    let e = FindingStore::open(&path).unwrap_err();
    assert!(matches!(e, FindingsError::UnsupportedSchema { found: 99, supported: 4, .. }), "{e:?}");
}

#[test]
fn pragmas_are_durable() {
    let (_dir, store) = temp_store();
    let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    let sync: i64 = store.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!((mode.as_str(), sync), ("wal", 2));
}

#[test]
fn the_container_of_the_latest_sighting_is_kept_and_exported() {
    let (_dir, store) = temp_store();
    let host_job = store.record(&simple("fp-c")).unwrap();
    assert_eq!(store.get(host_job.id).unwrap().unwrap().process.container, None);

    let mut container =
        crate::identity::parse_container(&format!("/ci/jobs/{}", "ab".repeat(32))).expect("a container");
    container.runtime = crate::identity::Runtime::Docker;
    container.name = Some("runner-x-project-1-concurrent-0-build".into());
    container.image = Some(format!("registry.example/ci:{}", "t".repeat(5000)));
    container.image_id = Some("sha256:0123".into());
    let mut later = simple("fp-c");
    later.seen_at = T0 + Duration::minutes(1);
    later.process.container = Some(container.clone());
    let again = store.record(&later).unwrap();
    assert_eq!(again.id, host_job.id, "the container is no part of the dedup key");
    let got = store.get(again.id).unwrap().unwrap().process.container.expect("the container is stored");
    assert_eq!((got.id.as_str(), got.runtime), (container.id.as_str(), crate::identity::Runtime::Docker));
    assert_eq!(got.name, container.name);
    assert_eq!(got.image_id, container.image_id);
    assert_eq!(got.image.as_deref().map(str::len), Some(1024), "runtime text is capped");

    // An older sighting arriving late does not replace it.
    let mut older = simple("fp-c");
    older.seen_at = T0 - Duration::minutes(1);
    store.record(&older).unwrap();
    assert!(store.get(again.id).unwrap().unwrap().process.container.is_some());

    let mut json = Vec::new();
    store.export(ExportFormat::Json, &mut json).unwrap();
    let exported: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(exported[0]["process"]["container"]["name"], "runner-x-project-1-concurrent-0-build");
    let mut csv = Vec::new();
    store.export(ExportFormat::Csv, &mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",container_id,container_name,container_image"), "{csv}");
    assert!(csv.contains(&container.id) && csv.contains("runner-x-project-1-concurrent-0-build"), "{csv}");
}

#[test]
fn a_database_from_before_containers_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    {
        // What the previous version created: the first migration only.
        let conn = crate::sqlite::open_private(&path, std::time::Duration::from_secs(1)).unwrap();
        crate::sqlite::migrate(&conn, &MIGRATIONS[..1]).unwrap();
        conn.execute(
            "INSERT INTO findings (rule_id, confidence, fingerprint, preview, location, dest_host, dest_port, \
             pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status) \
             VALUES ('r', 'high', 'fp-old', 'p', 'l', 'h', 443, 1, 0, NULL, 'c', NULL, '{}', NULL, 0, 0, 1, 'block', 'open')",
            [],
        )
        .unwrap();
    }
    let store = FindingStore::open(&path).unwrap();
    let all = store.list(&ListFilter::default()).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].fingerprint, "fp-old");
    assert_eq!(all[0].process.container, None);
}

#[test]
fn a_redacted_key_is_recorded_after_the_schema_4_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let (id, allow) = {
        let store = FindingStore::open(&path).unwrap();
        let id = store.record(&simple("fp")).unwrap().id;
        // Back to version 3 with data in every table that refers to findings.
        store.conn.pragma_update(None, "user_version", 3).unwrap();
        store
            .conn
            .execute(
                "INSERT INTO allowlist (finding_id, fingerprint, scope, reason, created_by, created_at) \
                 VALUES (?1, 'fp', 'everywhere', 'test', 't', 1)",
                rusqlite::params![id.0],
            )
            .unwrap();
        (id, store.conn.last_insert_rowid())
    };
    let store = FindingStore::open(&path).unwrap();
    let mut redacted = simple("fp");
    redacted.action = Action::Redact;
    assert_eq!(store.record(&redacted).unwrap().id, id, "the same finding, its id kept");
    let f = store.get(id).unwrap().unwrap();
    assert_eq!(f.action, Action::Redact);
    assert_eq!(f.sightings.len(), 2, "the old sighting survived the rebuild");
    let refs: i64 = store
        .conn
        .query_row(
            "SELECT count(*) FROM allowlist WHERE id = ?1 AND finding_id = ?2",
            rusqlite::params![allow, id.0],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(refs, 1, "references to the rebuilt table still hold");
    let broken: Vec<String> = store
        .conn
        .prepare("PRAGMA foreign_key_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(broken.is_empty(), "{broken:?}");
}
