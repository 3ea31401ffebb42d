//! `Policy::evaluate` must not allocate: it runs for every request on every
//! proxy thread. A counting global allocator proves it, over policies of up
//! to 1,000 rules exercising every selector kind.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use gateway::policy::{normalize, HttpRequestFacts, Policy, PolicyHandle, RequestFacts};
use http::{HeaderMap, HeaderValue};

struct Counting;

thread_local! {
    // Const-initialised and without destructor: usable inside the allocator.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made on this thread by `f`.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(|n| n.get())
}

/// `n` rules cycling through every selector kind, none matching the
/// facts below except the last.
fn policy_text(n: usize) -> String {
    let mut s = String::from("version: 1\nrules:\n");
    for i in 0..n.saturating_sub(1) {
        let m = match i % 8 {
            0 => format!("identity: {{ uri: \"spiffe://ci.example/repo/team{i}/*\" }}"),
            1 => format!(
                "destination: {{ host: [\"*.svc{i}.internal\", \"api{i}.example.com\"], port: [443, 8443], cidr: [\"fd00:{i:x}::/32\", \"10.0.0.0/8\"] }}"
            ),
            2 => format!("request: {{ path: \"/v{i}/admin/**\", method: [POST, PUT] }}"),
            3 => format!("identity: {{ labels: {{ team: \"team{i}*\" }}, claims: {{ repository: \"org{i}/*\" }} }}"),
            4 => format!("destination: {{ protocol: grpc }}\n      request: {{ rpc: \"acme.svc{i}.v1.*/Get*\" }}"),
            5 => format!("request: {{ headers: {{ present: [x-debug-{i}] }} }}"),
            6 => format!("destination: {{ port: {} }}", 1000 + i),
            _ => format!("identity: {{ unmapped: true }}\n      destination: {{ host: \"*.{i}.example.com\" }}"),
        };
        s.push_str(&format!("  - name: r{i}\n    match:\n      {m}\n    action: deny\n"));
    }
    if n > 0 {
        s.push_str(
            "  - name: target\n    match:\n      identity: { uri: \"spiffe://ci.example/repo/acme/*\", labels: { team: web } }\n      destination: { host: \"*.target.example.com\", port: 443 }\n      request: { path: \"/v1/items/*\", method: POST }\n    action: require_approval\n    approval: { group: sec }\n    mask: { rules: all }\n",
        );
    }
    s.push_str("defaults:\n  action: allow\n");
    s
}

#[test]
fn evaluation_never_allocates() {
    let labels = BTreeMap::from([("team".to_owned(), "web".to_owned())]);
    let claims = BTreeMap::from([("repository".to_owned(), "acme/web".to_owned())]);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("x-debug-5", HeaderValue::from_static("1"));
    let empty = HeaderMap::new();
    // Normalised as the gate does it, outside the counted section; the
    // already-canonical ones borrow (checked below).
    let raw = [
        "/v1/items/42",
        "/v1/items/42?x=1",
        "/acme.svc4.v1.Billing/GetInvoice",
        "/",
        "/v2//admin/./users",
        "/v1/%69tems/x/../42",
    ];
    let paths: Vec<_> = raw.iter().map(|p| normalize(p).unwrap()).collect();
    let request = |method, i: usize, headers| Some(HttpRequestFacts { method, path: &paths[i], headers });
    let facts = |host, port, tls, request| RequestFacts {
        identity_uri: "spiffe://ci.example/repo/acme/web",
        labels: &labels,
        claims: &claims,
        unmapped: false,
        host,
        addr: std::net::IpAddr::from([10, 0, 0, 7]),
        port,
        tls,
        request,
    };
    let cases = [
        facts("api.target.example.com", 443, true, request("POST", 0, &empty)),
        facts("API.Target.Example.COM.", 443, true, request("POST", 1, &empty)),
        facts("billing.internal", 443, true, request("POST", 2, &headers)),
        facts("db.internal", 5432, false, None),
        facts("[::1]", 8443, false, request("GET", 3, &empty)),
        facts("x.svc1.internal", 8443, true, request("PUT", 4, &headers)),
        facts("api.target.example.com", 443, true, request("POST", 5, &empty)),
    ];

    for n in [1, 10, 100, 1000] {
        let policy = Policy::parse(Path::new("bench.yaml"), &policy_text(n)).unwrap();
        assert_eq!(policy.len(), n);
        let target = policy.evaluate(&cases[0]);
        assert_eq!(target.rule, "target", "{n} rules");
        // Not every case falls through: some hit the generated rules.
        let decided: Vec<&str> = cases.iter().map(|f| policy.evaluate(f).rule).collect();
        if n == 1000 {
            assert_eq!(decided, ["target", "target", "r4", "default", "default", "r1", "target"]);
        }
        let count = allocations(|| {
            for _ in 0..200 {
                for f in &cases {
                    std::hint::black_box(policy.evaluate(std::hint::black_box(f)));
                }
            }
        });
        assert_eq!(count, 0, "{n} rules: evaluate allocated {count} times");
    }

    // Normalising a canonical path does not allocate either; the gate
    // normalises every request.
    let count = allocations(|| {
        for p in &raw[..4] {
            let n = std::hint::black_box(normalize(std::hint::black_box(p)).unwrap());
            assert!(n.is_unchanged());
        }
    });
    assert_eq!(count, 0, "normalizing canonical paths allocated {count} times");

    // Through the shared handle: the first load registers this thread with
    // arc-swap; after that, taking the current policy is allocation-free too.
    let handle = PolicyHandle::new(Policy::parse(Path::new("p.yaml"), &policy_text(100)).unwrap(), None);
    drop(handle.current());
    let count = allocations(|| {
        for f in cases.iter().cycle().take(1000) {
            std::hint::black_box(handle.current().evaluate(f));
        }
    });
    assert_eq!(count, 0, "handle.current().evaluate allocated {count} times");

    // The counter works: explaining does allocate.
    let policy = Policy::parse(Path::new("p.yaml"), &policy_text(10)).unwrap();
    assert!(allocations(|| drop(std::hint::black_box(policy.explain(&cases[0])))) > 0);
}

#[test]
fn postgres_evaluation_never_allocates() {
    use gateway::policy::PostgresFacts;
    use gateway::postgres::sql::classify;
    let text = r#"
version: 1
rules:
  - name: no-unfiltered-writes
    match:
      postgres: { kind: [update, delete], where: false }
    action: deny
  - name: secrets
    match:
      postgres: { database: "app*", relations: ["vault.keys", secrets] }
    action: deny
  - name: reads
    match:
      destination: { protocol: postgres }
      postgres: { kind: [select, explain], only_relations: ["public.*", "*.reports"] }
    action: allow
    mask: { columns: [ssn, "*_token"] }
  - name: migrations
    match:
      postgres: { user: "migrator", kind: ddl }
    action: require_approval
    approval: { group: dba }
  - name: unknown
    match:
      postgres: { user: "legacy", kind: unknown }
    action: allow
defaults:
  action: deny
"#;
    let policy = Policy::parse(Path::new("pg.yaml"), text).unwrap();
    let labels = BTreeMap::new();
    let facts = RequestFacts {
        identity_uri: "spiffe://ci.example/repo/acme/web",
        labels: &labels,
        claims: &labels,
        unmapped: false,
        host: "db.internal",
        addr: std::net::IpAddr::from([10, 0, 0, 9]),
        port: 5432,
        tls: true,
        request: None,
    };
    let queries = [
        "DELETE FROM t",
        "SELECT * FROM vault.keys",
        "SELECT * FROM public.a JOIN x.reports ON true",
        "CREATE TABLE t (a int)",
        "UPDATE t SET a = 1 WHERE b",
        "SELECT * FROM users",
    ];
    let statements: Vec<_> = queries.iter().map(|q| classify(q).unwrap().remove(0)).collect();
    let users = ["ci", "ci", "ci", "migrator", "ci", "legacy"];
    let pg: Vec<PostgresFacts<'_>> = statements
        .iter()
        .zip(users)
        .map(|(s, user)| PostgresFacts { database: "app_prod", user, statement: Some(s) })
        .collect();
    let decided: Vec<&str> = pg.iter().map(|f| policy.evaluate_postgres(&facts, f).rule).collect();
    assert_eq!(decided, ["no-unfiltered-writes", "secrets", "reads", "migrations", "default", "default"]);
    let session = PostgresFacts { database: "app_prod", user: "ci", statement: None };
    let count = allocations(|| {
        for _ in 0..200 {
            for f in pg.iter().chain([&session]) {
                std::hint::black_box(policy.evaluate_postgres(&facts, std::hint::black_box(f)));
            }
        }
    });
    assert_eq!(count, 0, "evaluate_postgres allocated {count} times");
}
