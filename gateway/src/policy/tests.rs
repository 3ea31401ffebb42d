use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::*;

fn parse(text: &str) -> Policy {
    match Policy::parse(Path::new("p.yaml"), text) {
        Ok(p) => p,
        Err(e) => panic!("{}", e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")),
    }
}

fn errs(text: &str) -> Vec<PolicyError> {
    match Policy::parse(Path::new("p.yaml"), text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e,
    }
}

/// Owned inputs for [`RequestFacts`].
struct F {
    uri: String,
    labels: BTreeMap<String, String>,
    claims: BTreeMap<String, String>,
    unmapped: bool,
    host: String,
    addr: IpAddr,
    port: u16,
    tls: bool,
    http: bool,
    method: String,
    path: NormalizedPath<'static>,
    headers: HeaderMap,
}

/// `raw` normalised, as the gate does before it asks the policy; leaked so
/// that test facts can own it.
fn normalized(raw: &str) -> NormalizedPath<'static> {
    let raw: &'static str = Box::leak(raw.to_owned().into_boxed_str());
    match path::normalize(raw) {
        Ok(p) => p,
        Err(e) => panic!("{raw}: {e}"),
    }
}

impl F {
    fn https(host: &str, path: &str) -> F {
        F {
            uri: "spiffe://ci.example/repo/acme/web".into(),
            labels: BTreeMap::new(),
            claims: BTreeMap::new(),
            unmapped: false,
            host: host.into(),
            addr: host.parse().unwrap_or(IpAddr::from([192, 0, 2, 1])),
            port: 443,
            tls: true,
            http: true,
            method: "GET".into(),
            path: normalized(path),
            headers: HeaderMap::new(),
        }
    }

    fn addr(mut self, a: &str) -> F {
        self.addr = a.parse().unwrap();
        self
    }

    fn tcp(host: &str, port: u16) -> F {
        F { http: false, tls: false, port, ..F::https(host, "/") }
    }

    fn method(mut self, m: &str) -> F {
        self.method = m.into();
        self
    }

    fn uri(mut self, u: &str) -> F {
        self.uri = u.into();
        self
    }

    fn label(mut self, k: &str, v: &str) -> F {
        self.labels.insert(k.into(), v.into());
        self
    }

    fn claim(mut self, k: &str, v: &str) -> F {
        self.claims.insert(k.into(), v.into());
        self
    }

    fn header(mut self, k: &'static str, v: &'static str) -> F {
        self.headers.insert(k, HeaderValue::from_static(v));
        self
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            identity_uri: &self.uri,
            labels: &self.labels,
            claims: &self.claims,
            unmapped: self.unmapped,
            host: &self.host,
            addr: self.addr,
            port: self.port,
            tls: self.tls,
            request: self.http.then_some(HttpRequestFacts {
                method: &self.method,
                path: &self.path,
                headers: &self.headers,
            }),
        }
    }
}

fn rule_for(p: &Policy, f: &F) -> String {
    p.evaluate(&f.facts()).rule.to_owned()
}

const FULL: &str = r#"
version: 1
rules:
  - name: deny-prod-db-writes
    match:
      identity:
        uri: "spiffe://ci.example/repo/acme/*"
        labels: { team: payments }
      destination:
        host: ["*.cursor.sh", "api.internal"]
        port: [443, 8443]
        protocol: https
      request:
        method: [POST, PUT]
        path: "/v1/admin/**"
    action: deny
    reason: "writes to prod need a change ticket"
  - name: billing-approval
    match:
      request:
        rpc: "acme.billing.v1.BillingService/*"
    action: require_approval
    approval: { group: security, min_approvals: 2, timeout: 10m }
    static_keys: block
    mask:
      rules: all
      patterns: [{ name: internal-token, regex: "itk_[A-Za-z0-9]{32}" }]
      json_fields: [password, client_secret]
    record: metadata
  - match:
      identity: { claims: { repository: "acme/*" } }
    action: allow
    mask: false
defaults:
  action: allow
  record: full
  static_keys: flag
  mask: { json_fields: [token] }
"#;

#[test]
fn parses_the_reference_example() {
    let p = parse(FULL);
    assert_eq!(p.len(), 3);
    assert_eq!(p.rule_names().collect::<Vec<_>>(), ["deny-prod-db-writes", "billing-approval", "#2"]);
    assert_eq!(p.masks().len(), 2);
    assert_eq!(p.digest().len(), 64);
    assert!(p.warnings().is_empty());
    let d = p.default_decision();
    assert_eq!((d.rule, d.index, d.action), (DEFAULT_RULE, None, &Action::Allow));
    assert_eq!(d.static_keys, Some(StaticKeyAction::Flag));
    assert_eq!(d.mask.map(|m| m.json_fields.clone()), Some(vec!["token".to_owned()]));
}

#[test]
fn first_match_wins_and_outcomes_inherit_defaults() {
    let p = parse(FULL);
    let write = F::https("api.internal", "/v1/admin/users/7").method("POST").label("team", "payments");
    let d = p.evaluate(&write.facts());
    assert_eq!((d.rule, d.index), ("deny-prod-db-writes", Some(0)));
    assert_eq!(d.action, &Action::Deny { reason: "writes to prod need a change ticket".into() });
    // Inherited from defaults.
    assert_eq!(d.static_keys, Some(StaticKeyAction::Flag));
    assert_eq!(d.record, RecordLevel::Full);
    assert_eq!(d.mask_id, p.default_decision().mask_id);

    let rpc = F::https("billing.internal", "/acme.billing.v1.BillingService/Refund")
        .method("POST")
        .header("content-type", "application/grpc")
        .claim("repository", "acme/web");
    let d = p.evaluate(&rpc.facts());
    assert_eq!(d.rule, "billing-approval");
    let Action::RequireApproval(a) = d.action else { panic!("{d:?}") };
    assert_eq!((a.group.as_str(), a.min_approvals, a.timeout), ("security", 2, Duration::from_secs(600)));
    assert_eq!(d.static_keys, Some(StaticKeyAction::Block));
    assert_eq!(d.record, RecordLevel::Metadata);
    assert_eq!(d.mask.map(|m| &m.rules), Some(&MaskRules::All));

    // Same request without gRPC: falls to the claims rule, which drops the mask.
    let plain = F::https("billing.internal", "/acme.billing.v1.BillingService/Refund").claim("repository", "acme/web");
    let d = p.evaluate(&plain.facts());
    assert_eq!((d.rule, d.index, d.mask, d.mask_id), ("#2", Some(2), None, None));

    let other = F::https("example.com", "/");
    assert_eq!(p.evaluate(&other.facts()).index, None);
}

#[test]
fn identity_selectors() {
    let p = parse(
        r#"
version: 1
rules:
  - name: uri
    match: { identity: { uri: ["spiffe://td/a/*", "spiffe://td/b"] } }
    action: allow
  - name: labels
    match: { identity: { labels: { team: [pay*, billing], env: prod } } }
    action: allow
  - name: claims
    match: { identity: { claims: { repository: "acme/*", ref: refs/heads/main } } }
    action: allow
  - name: unmapped
    match: { identity: { unmapped: true } }
    action: deny
defaults: { action: deny }
"#,
    );
    let base = || F::https("h", "/").uri("spiffe://td/other");
    assert_eq!(rule_for(&p, &base().uri("spiffe://td/a/x")), "uri");
    assert_eq!(rule_for(&p, &base().uri("spiffe://td/a/x/y")), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &base().uri("spiffe://td/b")), "uri");
    assert_eq!(rule_for(&p, &base().label("team", "payments").label("env", "prod")), "labels");
    assert_eq!(rule_for(&p, &base().label("team", "billing").label("env", "prod")), "labels");
    assert_eq!(rule_for(&p, &base().label("team", "payments")), DEFAULT_RULE, "all labels must match");
    assert_eq!(rule_for(&p, &base().label("team", "infra").label("env", "prod")), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &base().claim("repository", "acme/x").claim("ref", "refs/heads/main")), "claims");
    assert_eq!(rule_for(&p, &base().claim("repository", "acme/x").claim("ref", "refs/heads/dev")), DEFAULT_RULE);
    let mut unmapped = base();
    unmapped.unmapped = true;
    assert_eq!(rule_for(&p, &unmapped), "unmapped");
}

#[test]
fn destination_selectors_and_case_insensitive_hosts() {
    let p = parse(
        r#"
version: 1
rules:
  - name: cursor
    match: { destination: { host: "*.Cursor.SH" } }
    action: allow
  - name: ports
    match: { destination: { host: db.internal, port: [5432, 3306] } }
    action: allow
  - name: grpc
    match: { destination: { protocol: grpc } }
    action: allow
  - name: plain
    match: { destination: { protocol: [http, tcp] } }
    action: allow
defaults: { action: deny }
"#,
    );
    assert_eq!(rule_for(&p, &F::https("api2.cursor.sh", "/")), "cursor");
    assert_eq!(rule_for(&p, &F::https("API2.CURSOR.SH.", "/")), "cursor", "case and trailing dot ignored");
    assert_eq!(rule_for(&p, &F::https("cursor.sh", "/")), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &F::tcp("db.internal", 5432)), "ports");
    assert_eq!(rule_for(&p, &F::tcp("db.internal", 5433)), "plain");
    assert_eq!(rule_for(&p, &F::https("x", "/").header("content-type", "application/grpc+proto")), "grpc");
    let mut h = F::https("x", "/");
    h.tls = false;
    assert_eq!(rule_for(&p, &h), "plain");
    assert_eq!(rule_for(&p, &F::https("x", "/")), DEFAULT_RULE);
}

#[test]
fn grpc_over_tls_is_both_https_and_grpc() {
    let p = parse("version: 1\nrules:\n  - match: { destination: { protocol: https } }\n    action: deny\ndefaults: { action: allow }\n");
    let f = F::https("x", "/a.B/C").method("POST").header("content-type", "application/grpc");
    assert_eq!(f.facts().protocol(), Protocol::Grpc);
    assert_eq!(p.evaluate(&f.facts()).index, Some(0));
}

#[test]
fn request_selectors() {
    let p = parse(
        r#"
version: 1
rules:
  - name: admin
    match: { request: { path: "/v1/admin/**", method: [post, DELETE] } }
    action: deny
  - name: rpc
    match: { request: { rpc: "acme.billing.v1.*/Get*" } }
    action: allow
  - name: debug
    match: { request: { headers: { present: [X-Debug], absent: authorization } } }
    action: deny
defaults: { action: allow }
"#,
    );
    assert_eq!(rule_for(&p, &F::https("h", "/v1/admin/users?x=1").method("POST")), "admin");
    assert_eq!(rule_for(&p, &F::https("h", "/v1/admin/users").method("delete")), "admin");
    assert_eq!(rule_for(&p, &F::https("h", "/v1/admin/users").method("GET")), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &F::https("h", "/v1/public").method("POST")), DEFAULT_RULE);
    let grpc = |path: &str| F::https("h", path).method("POST").header("content-type", "application/grpc");
    assert_eq!(rule_for(&p, &grpc("/acme.billing.v1.Invoices/GetInvoice")), "rpc");
    assert_eq!(rule_for(&p, &grpc("/acme.billing.v1.Invoices/Refund")), DEFAULT_RULE);
    let connect =
        F::https("h", "/acme.billing.v1.Invoices/GetInvoice").method("POST").header("content-type", "application/json");
    assert_eq!(rule_for(&p, &connect), "rpc");
    assert_eq!(
        rule_for(&p, &F::https("h", "/acme.billing.v1.Invoices/GetInvoice")),
        DEFAULT_RULE,
        "plain GET is no RPC"
    );
    assert_eq!(rule_for(&p, &F::https("h", "/").header("x-debug", "1")), "debug");
    assert_eq!(rule_for(&p, &F::https("h", "/").header("x-debug", "1").header("authorization", "x")), DEFAULT_RULE);
}

#[test]
fn tcp_facts_never_match_request_selectors() {
    let p = parse(
        r#"
version: 1
rules:
  - name: needs-request
    match: { destination: { host: db }, request: { method: GET } }
    action: deny
  - name: host-only
    match: { destination: { host: db } }
    action: allow
defaults: { action: deny }
"#,
    );
    let f = F::tcp("db", 5432);
    assert_eq!(rule_for(&p, &f), "host-only");
    let e = p.explain(&f.facts());
    assert_eq!(e.skipped[0].selector, "request");
    assert_eq!(e.protocol, Protocol::Tcp);
}

#[test]
fn rpc_method_detection() {
    let g = Some("application/grpc");
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/Get", g), Some("acme.v1.Svc/Get"));
    assert_eq!(rpc_method("POST", "/Svc/Get", Some("application/grpc-web+proto")), Some("Svc/Get"));
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/Get", Some("application/connect+json")), Some("acme.v1.Svc/Get"));
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/Get", Some("application/proto")), Some("acme.v1.Svc/Get"));
    assert_eq!(
        rpc_method("POST", "/acme.v1.Svc/Get", Some("Application/JSON; charset=utf-8")),
        Some("acme.v1.Svc/Get")
    );
    assert_eq!(rpc_method("GET", "/acme.v1.Svc/Get?connect=v1&encoding=json", None), Some("acme.v1.Svc/Get"));
    // Ordinary JSON APIs are not Connect.
    assert_eq!(rpc_method("POST", "/api/users", Some("application/json")), None);
    assert_eq!(rpc_method("GET", "/acme.v1.Svc/Get", Some("application/json")), None);
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/Get", Some("text/plain")), None);
    // Shape.
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/Get/extra", g), None);
    assert_eq!(rpc_method("POST", "/acme.v1.Svc", g), None);
    assert_eq!(rpc_method("POST", "//Get", g), None);
    assert_eq!(rpc_method("POST", "/acme.v1.Svc/", g), None);
}

#[test]
fn explain_names_the_first_failing_selector_of_each_earlier_rule() {
    let p = parse(FULL);
    let f = F::https("example.com", "/x").claim("repository", "acme/web");
    let e = p.explain(&f.facts());
    assert_eq!(e.decision, p.evaluate(&f.facts()));
    assert_eq!(e.decision.rule, "#2");
    let misses: Vec<(&str, &str)> = e.skipped.iter().map(|m| (m.rule, m.selector.as_str())).collect();
    assert_eq!(misses, [("deny-prod-db-writes", "request.method"), ("billing-approval", "request.rpc")]);
    assert_eq!(e.skipped[0].detail, "`GET` is not any of `POST`, `PUT`");
    assert_eq!(e.skipped[1].detail, "not a gRPC or Connect request");

    let f = F::https("example.com", "/v1/admin/x").method("POST").label("team", "infra");
    let e = p.explain(&f.facts());
    assert_eq!(e.skipped[0].selector, "destination.host");
    assert_eq!(e.skipped[0].detail, "`example.com` matches none of `*.cursor.sh`, `api.internal`");
    let f = F::https("api.internal", "/v1/admin/x").method("POST").label("team", "infra");
    let e = p.explain(&f.facts());
    assert_eq!(e.skipped[0].selector, "identity.labels.team");
    assert_eq!(e.skipped[0].detail, "label `team` is `infra`, which matches none of `payments`");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["rule"], "default");
    assert_eq!(json["decision"]["action"]["action"], "allow");
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = errs("version: 1\nrules:\n  - name: a\n    action: [unclosed\ndefaults: { action: allow }\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].line, 5, "{}", e[0]);
    assert!(e[0].to_string().starts_with("p.yaml:5:"), "{}", e[0]);
}

#[test]
fn unknown_fields_in_several_rules_are_all_reported_at_the_key() {
    let text = "\
version: 1
rules:
  - name: a
    action: allow
    colour: red
  - name: b
    match:
      destination: { hots: x }
    action: deny
defaults: { action: allow }
";
    let e = errs(text);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_eq!((e[0].rule, e[0].line, e[0].column), (Some(0), 5, 5), "{}", e[0]);
    assert!(e[0].message.contains("unknown field `colour`"), "{}", e[0].message);
    assert_eq!((e[1].rule, e[1].line, e[1].column), (Some(1), 8, 22), "{}", e[1]);
    assert!(e[1].message.contains("hots"), "{}", e[1].message);
    let e = errs("version: 1\nextra: 1\ndefaults: { action: allow }\n");
    assert_eq!((e[0].line, e[0].column), (2, 1), "{}", e[0]);
}

#[test]
fn semantic_errors_are_all_reported_with_positions() {
    let text = r#"version: 1
rules:
  - name: bad-glob
    match:
      destination:
        host: ["ok.com", "[bad"]
    action: deny
  - name: bad-port
    match: { destination: { port: [443, 70000] } }
    action: deny
  - name: bad-protocol
    match: { destination: { protocol: quic } }
    action: deny
  - name: approval-missing
    action: require_approval
  - name: approval-wrong
    action: allow
    approval: { group: sec }
  - name: zero
    action: require_approval
    approval:
      group: sec
      min_approvals: 0
  - name: bad-regex
    action: allow
    mask:
      patterns:
        - name: x
          regex: "itk_[A-Z"
  - name: bad-glob
    action: allow
defaults:
  action: require_approval
"#;
    let e = errs(text);
    let got: Vec<(Option<usize>, usize, usize)> = e.iter().map(|e| (e.rule, e.line, e.column)).collect();
    assert_eq!(
        got,
        [
            (Some(0), 6, 26),
            (Some(1), 9, 41),
            (Some(2), 12, 39),
            (Some(3), 15, 13),
            (Some(4), 18, 5),
            (Some(5), 23, 22),
            (Some(6), 29, 18),
            (Some(7), 30, 11),
            (None, 33, 11),
        ],
        "{e:#?}"
    );
    let messages: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
    assert!(messages[0].contains("bad glob `[bad`"), "{messages:?}");
    assert!(messages[1].contains("port 70000 is out of range"), "{messages:?}");
    assert!(messages[2].contains("unknown variant `quic`"), "{messages:?}");
    assert!(messages[3].contains("needs an `approval` section"), "{messages:?}");
    assert!(messages[4].contains("only used with `action: require_approval`"), "{messages:?}");
    assert!(messages[5].contains("min_approvals must be at least 1"), "{messages:?}");
    assert!(messages[6].starts_with("bad regex"), "{messages:?}");
    assert!(messages[7].contains("duplicate rule name `bad-glob`"), "{messages:?}");
    assert!(messages[8].contains("default action must be `allow` or `deny`"), "{messages:?}");
    assert!(e[8].to_string().starts_with("p.yaml:33:11: "), "{}", e[8]);
}

#[test]
fn more_invalid_combinations() {
    let cases: &[(&str, &str)] = &[
        (
            "  - match: { destination: { protocol: tcp }, request: { method: GET } }\n    action: deny\n",
            "never match `protocol: tcp`",
        ),
        ("  - match: { destination: { host: \"a.com:443\" } }\n    action: deny\n", "put it in `port`"),
        ("  - match: { destination: { host: \"https://a.com\" } }\n    action: deny\n", "without scheme"),
        ("  - match: { destination: { port: 0 } }\n    action: deny\n", "out of range"),
        ("  - match: { destination: { host: [] } }\n    action: deny\n", "empty list"),
        ("  - match: { request: { path: v1/x } }\n    action: deny\n", "must start with `/`"),
        ("  - match: { request: { rpc: /a.B/C } }\n    action: deny\n", "without the leading `/`"),
        ("  - match: { request: { method: \"GE T\" } }\n    action: deny\n", "not an HTTP method"),
        ("  - match: { request: { headers: { present: [\"bad header\"] } } }\n    action: deny\n", "not a header name"),
        ("  - action: allow\n    reason: why\n", "`reason` is only used"),
        ("  - action: allow\n    mask: {}\n", "masks nothing"),
        ("  - action: allow\n    mask: { patterns: [{ name: e, regex: \"a*\" }] }\n", "matches the empty string"),
        ("  - action: allow\n    mask: true\n", "`mask: true` is not meaningful"),
        ("  - action: allow\n    mask: { rules: some }\n", "`all` or a list"),
        ("  - action: require_approval\n    approval: { group: s, timeout: 0s }\n", "longer than 0s"),
        ("  - action: require_approval\n    approval: { group: \"\" }\n", "empty approval group"),
        ("  - name: \"#1\"\n    action: allow\n", "may not start with `#`"),
        ("  - name: default\n    action: allow\n", "reserved"),
        ("  - action: permit\n", "unknown variant `permit`"),
        ("  - action: deny\n    record: everything\n", "unknown variant `everything`"),
        ("  - action: deny\n    static_keys: maybe\n", "unknown variant `maybe`"),
        ("  - action: deny\n    match: { destination: { port: abc } }\n", "invalid type"),
    ];
    for (rule, want) in cases {
        let text = format!("version: 1\nrules:\n{rule}defaults: {{ action: allow }}\n");
        let e = errs(&text);
        assert_eq!(e.len(), 1, "{text}\n{e:#?}");
        assert!(e[0].message.contains(want), "{text}\nwant {want:?} in {:?}", e[0].message);
        assert!(e[0].line >= 3, "{}", e[0]);
        assert_eq!(e[0].rule, Some(0), "{}", e[0]);
    }
    let e = errs("version: 2\ndefaults: { action: allow }\n");
    assert_eq!((e[0].line, e[0].column), (1, 10), "{}", e[0]);
    let e = errs("version: 1\nrules: []\n");
    assert!(e[0].message.contains("missing field `defaults`"), "{}", e[0]);
    let e = errs("");
    assert_eq!(e.len(), 1);
    assert!(parse("version: 1\nrules:\ndefaults: { action: deny }\n").is_empty());
}

#[test]
fn unreachable_rules_are_warned_about() {
    let p =
        parse("version: 1\nrules:\n  - action: allow\n  - name: never\n    action: deny\ndefaults: { action: deny }\n");
    assert_eq!(p.warnings().len(), 1);
    assert_eq!((p.warnings()[0].rule, p.warnings()[0].line), (Some(1), 4));
}

#[test]
fn identical_masks_share_an_id() {
    let p = parse(
        "version: 1\nrules:\n  - match: { destination: { port: 1 } }\n    action: allow\n    mask: { rules: [a, b] }\n  - action: allow\n    mask: { rules: [a, b] }\ndefaults: { action: allow }\n",
    );
    assert_eq!(p.masks().len(), 1);
    assert_eq!(p.masks()[0].rules, MaskRules::Only(vec!["a".into(), "b".into()]));
}

#[test]
fn builtin_policy_allows_everything_and_matches_its_text() {
    let b = Policy::builtin();
    let parsed = parse(BUILTIN_POLICY);
    assert_eq!(b.digest(), parsed.digest());
    assert!(parsed.is_empty());
    let f = F::https("anything", "/");
    for p in [&b, &parsed] {
        let d = p.evaluate(&f.facts());
        assert_eq!((d.action, d.static_keys, d.mask, d.record), (&Action::Allow, None, None, RecordLevel::Full));
    }
    assert_eq!(*b.source(), PolicySource::Builtin);
}

#[test]
fn every_example_policy_parses() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    // The example policies' approval groups exist in the example configuration.
    let (config, _) = crate::config::Config::load(&deploy.join("gateway.yaml")).unwrap();
    let context = config.approvals.policy_context();
    let dir = deploy.join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("policy-") && name.ends_with(".yaml") {
            let p = Policy::load_in(&path, &context).unwrap_or_else(|e| panic!("{e:#?}"));
            assert!(p.warnings().is_empty(), "{:?}", p.warnings());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected policy examples in {}", dir.display());
}

#[test]
fn config_section_defaults_and_rejects_unknown_fields() {
    let c: PolicyConfig = serde_yaml_ng::from_str("file: /etc/p.yaml\n").unwrap();
    assert_eq!(c.file, Some(PathBuf::from("/etc/p.yaml")));
    assert!(c.watch);
    assert_eq!(c.watch_interval, Duration::from_secs(1));
    let c: PolicyConfig = serde_yaml_ng::from_str("watch: false\nwatch_interval: 5s\n").unwrap();
    assert_eq!((c.watch, c.watch_interval), (false, Duration::from_secs(5)));
    assert!(serde_yaml_ng::from_str::<PolicyConfig>("fille: x\n").is_err());
}

const ALLOW: &str = "version: 1\ndefaults: { action: allow }\n";
const DENY: &str = "version: 1\ndefaults: { action: deny, reason: closed }\n";

#[test]
fn reload_swaps_valid_files_and_keeps_the_old_policy_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, ALLOW).unwrap();
    let config = PolicyConfig { file: Some(file.clone()), ..Default::default() };
    let h = PolicyHandle::load(&config).unwrap();
    let before = h.current().digest().to_owned();
    let reader = h.clone();
    assert_eq!(h.reload().unwrap(), ReloadOutcome::Unchanged { digest: before.clone() });

    std::fs::write(&file, "version: 1\ndefaults: { action: maybe }\n").unwrap();
    let e = h.reload().unwrap_err();
    assert_eq!((e[0].line, e[0].column), (2, 21), "{}", e[0]);
    assert_eq!(reader.current().digest(), before);
    assert_eq!(h.generation(), 0);

    std::fs::write(&file, DENY).unwrap();
    let ReloadOutcome::Replaced { previous, rules, .. } = h.reload().unwrap() else { panic!() };
    assert_eq!((previous.as_str(), rules), (before.as_str(), 0));
    let f = F::https("x", "/");
    assert_eq!(reader.current().evaluate(&f.facts()).action, &Action::Deny { reason: "closed".into() });
    assert_eq!(h.generation(), 1);

    std::fs::remove_file(&file).unwrap();
    assert!(h.reload().is_err());
    assert_eq!(reader.current().evaluate(&f.facts()).action.name(), "deny");

    assert_eq!(PolicyHandle::builtin().reload().unwrap(), ReloadOutcome::NoFile);
    let missing = PolicyConfig { file: Some(dir.path().join("nope.yaml")), ..Default::default() };
    assert!(PolicyHandle::load(&missing).is_err());
}

#[tokio::test]
async fn watcher_reloads_on_change_and_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, ALLOW).unwrap();
    let h = PolicyHandle::load(&PolicyConfig { file: Some(file.clone()), ..Default::default() }).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch(h.clone(), Duration::from_millis(20), cancel.clone()));
    let f = F::https("x", "/");

    let wait_for = |want: &'static str| {
        let h = h.clone();
        async move {
            // Generous: a loaded machine runs the watcher late, not never.
            for _ in 0..3000 {
                let f = F::https("x", "/");
                if h.current().evaluate(&f.facts()).action.name() == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    std::fs::write(&file, DENY).unwrap();
    assert!(wait_for("deny").await, "watcher did not pick up the change");
    // An invalid file is ignored...
    std::fs::write(&file, "version: 1\ndefaults: [\n").unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(h.current().evaluate(&f.facts()).action.name(), "deny");
    assert_eq!(h.generation(), 1);
    // ...and the next valid one is taken.
    std::fs::write(&file, ALLOW).unwrap();
    assert!(wait_for("allow").await);
    assert_eq!(h.generation(), 2);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap();
}

#[test]
fn explain_cli_parses_urls_and_runs() {
    use crate::cli::policy::{run_with as run, PolicyArgs};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, FULL).unwrap();
    let args = |extra: &[&str]| {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: PolicyArgs,
        }
        let mut argv = vec!["gateway"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).a
    };
    let none = PolicyContext::default();
    let ok = args(&[
        "explain",
        "--identity",
        "spiffe://ci.example/repo/acme/web",
        "--label",
        "team=payments",
        "--url",
        "https://API.internal/v1/admin/x",
        "--method",
        "POST",
        "--json",
    ]);
    assert_eq!(run(&ok, Some(&file), &none).unwrap(), std::process::ExitCode::SUCCESS);
    let tcp = args(&["explain", "--identity", "spiffe://x/y", "--url", "tcp://db.internal:5432"]);
    assert_eq!(run(&tcp, Some(&file), &none).unwrap(), std::process::ExitCode::SUCCESS);
    let bad = args(&["explain", "--identity", "spiffe://x/y", "--url", "ftp://x"]);
    assert!(run(&bad, Some(&file), &none).is_err());
    let bad = args(&["explain", "--identity", "spiffe://x/y", "--url", "tcp://x"]);
    assert!(run(&bad, Some(&file), &none).is_err());
    let bad = args(&["explain", "--identity", "spiffe://x/y", "--label", "nokey", "--url", "https://x"]);
    assert!(run(&bad, Some(&file), &none).is_err());
    let check = args(&["check"]);
    assert_eq!(run(&check, Some(&file), &none).unwrap(), std::process::ExitCode::SUCCESS);
    assert!(run(&check, None, &none).is_err());
    // `check` judges approval rules by the configuration's groups.
    assert_eq!(run(&check, Some(&file), &release_group_context()).unwrap(), std::process::ExitCode::FAILURE);
    std::fs::write(&file, "version: 1\n").unwrap();
    assert_eq!(run(&check, Some(&file), &none).unwrap(), std::process::ExitCode::FAILURE);
}

/// A context knowing one group, `release`, with two members.
fn release_group_context() -> PolicyContext {
    PolicyContext {
        approval_check: Some(std::sync::Arc::new(|spec: &ApprovalSpec| match spec.group.as_str() {
            "release" if spec.min_approvals <= 2 => Ok(()),
            "release" => {
                Err(format!("min_approvals is {} but group `release` has only 2 member(s)", spec.min_approvals))
            }
            other => Err(format!("approver group `{other}` is not defined in approvals.groups (defined: release)")),
        })),
        credentials: None,
    }
}

fn approval_rule(group: &str, min: u32) -> String {
    format!(
        "version: 1\nrules:\n  - name: ok\n    action: allow\n  - name: held\n    action: require_approval\n    \
         approval:\n      group: {group}\n      min_approvals: {min}\ndefaults: {{ action: deny }}\n"
    )
}

#[test]
fn approval_rules_are_checked_against_the_configuration_at_load_and_reload() {
    let ctx = release_group_context();
    let file = Path::new("p.yaml");
    assert!(Policy::parse_in(file, &approval_rule("release", 2), &ctx).is_ok());
    // Without a context (no configuration at hand) the group is not judged.
    assert!(Policy::parse(file, &approval_rule("nobody", 1)).is_ok());

    let e = Policy::parse_in(file, &approval_rule("nobody", 1), &ctx).unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].rule), (7, Some(1)), "points at the rule's approval section: {}", e[0]);
    assert!(e[0].message.contains("approver group `nobody` is not defined"), "{}", e[0]);
    let e = Policy::parse_in(file, &approval_rule("release", 3), &ctx).unwrap_err();
    assert!(e[0].message.contains("has only 2 member(s)"), "{}", e[0]);

    // A reload that names an unknown group is refused; the old policy stays.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, approval_rule("release", 1)).unwrap();
    let config = PolicyConfig { file: Some(path.clone()), ..Default::default() };
    assert!(PolicyHandle::load_in(&config, ctx.clone()).is_ok());
    std::fs::write(&path, approval_rule("nobody", 1)).unwrap();
    assert!(PolicyHandle::load_in(&config, ctx.clone()).is_err(), "the gateway does not start with it");
    std::fs::write(&path, approval_rule("release", 1)).unwrap();
    let h = PolicyHandle::load_in(&config, ctx).unwrap();
    let before = h.current().digest().to_owned();
    std::fs::write(&path, approval_rule("release", 5)).unwrap();
    assert!(h.reload().is_err());
    assert_eq!(h.current().digest(), before);
    assert_eq!(h.generation(), 0);
}

const ADMIN: &str = r#"
version: 1
rules:
  - name: deny-admin
    match: { request: { path: "/v1/admin/**" } }
    action: deny
  - name: approve-deploy
    match: { request: { path: ["/deploy", "/deploy/**"] } }
    action: require_approval
    approval: { group: release }
  - name: exact-case
    match: { request: { path: "/Exact/**", case_sensitive: true } }
    action: deny
  - name: billing-rpc
    match: { request: { rpc: "acme.billing.v1.BillingService/Refund" } }
    action: deny
defaults: { action: allow }
"#;

#[test]
fn path_rules_judge_every_spelling_of_the_path() {
    let p = parse(ADMIN);
    let bypasses = [
        "/v1/admin/users",
        "/v1//admin/users",
        "//v1/admin//users",
        "/v1/%61dmin/users",
        "/%76%31/admin/users",
        "/v1/./admin/users",
        "/./v1/admin/users",
        "/v1/y/../admin/users",
        "/v1/%2e%2e/v1/admin/users",
        "/v1/x/%2E%2E/admin/users",
        "/v1/x/.%2e/admin/users",
        "/x/../../v1/admin/users",
        "/V1/Admin/users",
        "/v1/ADMIN/users?x=1",
        "/v1/AdMiN/%55sers",
    ];
    for raw in bypasses {
        assert_eq!(rule_for(&p, &F::https("h", raw)), "deny-admin", "{raw}");
    }
    for raw in ["/deploy", "/deploy/", "/DEPLOY/prod", "/x/../deploy", "//deploy//prod", "/%64eploy"] {
        assert_eq!(rule_for(&p, &F::https("h", raw)), "approve-deploy", "{raw}");
    }
    // Near misses stay allowed.
    for raw in ["/v1/administrator", "/v1/admin", "/v2/admin/x", "/v1/public/../admins/x", "/deployment"] {
        assert_eq!(rule_for(&p, &F::https("h", raw)), DEFAULT_RULE, "{raw}");
    }
    // Case-sensitive by opt-in: the other case is another resource.
    assert_eq!(rule_for(&p, &F::https("h", "/Exact/x")), "exact-case");
    assert_eq!(rule_for(&p, &F::https("h", "/Ex%61ct/./x")), "exact-case");
    assert_eq!(rule_for(&p, &F::https("h", "/exact/x")), DEFAULT_RULE);
    // Explain shows the path as judged.
    let f = F::https("h", "/v1//x/../public");
    let e = p.explain(&f.facts());
    assert_eq!(e.skipped[0].detail, "`/v1/public` matches none of `/v1/admin/**`");
}

#[test]
fn ambiguous_paths_never_reach_the_rules() {
    for raw in [
        "/v1/admin%2Fusers",
        "/v1%2fadmin/users",
        "/v1/admin%5Cusers",
        "/v1\\admin/users",
        "/v1/admin%00/users",
        "/v1/admin;x=1/users",
        "/v1/%2561dmin/users",
        "/v1/%C0%AFadmin",
        "/v1/%zz",
        "/x//../v1/admin/users",
    ] {
        assert!(path::normalize(raw).is_err(), "{raw}");
    }
}

#[test]
fn rpc_rules_match_the_normalised_path() {
    let p = parse(ADMIN);
    let grpc = |path: &str| F::https("h", path).method("POST").header("content-type", "application/grpc");
    for raw in [
        "/acme.billing.v1.BillingService/Refund",
        "//acme.billing.v1.BillingService//Refund",
        "/acme.billing.v1.BillingService/./Refund",
        "/x/../acme.billing.v1.BillingService/Refund",
        "/acme.billing.v1.BillingService/%52efund",
        "/ACME.Billing.v1.BillingService/refund",
    ] {
        let f = grpc(raw);
        assert_eq!(f.path.rpc("POST", Some("application/grpc")), Some(f.path.as_str()).map(|s| &s[1..]));
        assert_eq!(rule_for(&p, &f), "billing-rpc", "{raw}");
    }
    assert_eq!(rule_for(&p, &grpc("/acme.billing.v1.BillingService/Refunds")), DEFAULT_RULE);
}

#[test]
fn path_globs_that_could_never_match_are_errors() {
    let cases: &[(&str, &str)] = &[
        ("/v1//admin", "`//` is merged"),
        ("/v1/./admin", "dot segments"),
        ("/v1/../admin/**", "dot segments"),
        ("/v1/%61dmin", "write `a`"),
        ("/v1/%2Fx", "encoded slashes"),
        ("/v1/%c3%a9", "upper-case hex"),
        ("/v1/%zz", "must start an escape"),
        ("/v1/a;b", "`;`"),
    ];
    for (glob, want) in cases {
        let text = format!("version: 1\nrules:\n  - match: {{ request: {{ path: \"{glob}\" }} }}\n    action: deny\ndefaults: {{ action: allow }}\n");
        let e = errs(&text);
        assert_eq!(e.len(), 1, "{glob}: {e:#?}");
        assert!(e[0].message.contains(want), "{glob}: want {want:?} in {:?}", e[0].message);
        assert_eq!((e[0].line, e[0].column), (3, 31), "{}", e[0]);
    }
    parse("version: 1\nrules:\n  - match: { request: { path: [\"/a%C3%A9/**\", \"/x/**/y\", \"/100%25\"] } }\n    action: deny\ndefaults: { action: allow }\n");
    let e = errs("version: 1\nrules:\n  - match: { request: { method: GET, case_sensitive: true } }\n    action: deny\ndefaults: { action: allow }\n");
    assert!(e[0].message.contains("applies to `path` and `rpc`"), "{}", e[0]);
}

const OPAQUE: &str = r#"
version: 1
rules:
  - name: git-ssh-is-opaque
    match: { destination: { cidr: 10.20.0.0/16, port: 22 } }
    action: allow
    uninspectable: pass
  - name: v6-and-list
    match: { destination: { cidr: ["fd00:1::/32", "192.168.7.0/24", "::ffff:172.16.0.0/108", 198.51.100.9] } }
    action: allow
    uninspectable: scan_raw
  - name: uploads-scanned
    match: { request: { path: "/upload/**" } }
    action: allow
    uninspectable: scan_raw
  - name: internal
    match: { destination: { host: "*.internal" } }
    action: allow
defaults:
  action: allow
"#;

#[test]
fn uninspectable_defaults_to_refuse_and_is_set_per_destination() {
    let p = parse(OPAQUE);
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    let conn = |addr: &str, port| F::tcp("git.example", port).addr(addr);
    let d = p.evaluate(&conn("10.20.1.5", 22).facts());
    assert_eq!((d.rule, d.uninspectable), ("git-ssh-is-opaque", Uninspectable::Pass));
    // The same network on another port, or another network: refused.
    let d = p.evaluate(&conn("10.20.1.5", 2222).facts());
    assert_eq!((d.rule, d.uninspectable), (DEFAULT_RULE, Uninspectable::Refuse));
    let d = p.evaluate(&conn("10.21.0.1", 22).facts());
    assert_eq!((d.rule, d.uninspectable), (DEFAULT_RULE, Uninspectable::Refuse));
    // IPv4-mapped IPv6 addresses are judged as IPv4, both ways round.
    assert_eq!(rule_for(&p, &conn("::ffff:10.20.9.9", 22)), "git-ssh-is-opaque");
    assert_eq!(rule_for(&p, &conn("172.16.0.7", 1)), "v6-and-list");
    assert_eq!(rule_for(&p, &conn("172.31.255.255", 1)), "v6-and-list");
    assert_eq!(rule_for(&p, &conn("172.32.0.0", 1)), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &conn("fd00:1:2::3", 1)), "v6-and-list");
    assert_eq!(rule_for(&p, &conn("fd00:2::3", 1)), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &conn("::ffff:192.168.7.200", 1)), "v6-and-list");
    assert_eq!(rule_for(&p, &conn("198.51.100.9", 1)), "v6-and-list");
    assert_eq!(rule_for(&p, &conn("198.51.100.10", 1)), DEFAULT_RULE);
    // A request-level rule never decides a connection; rules without
    // request selectors inherit `refuse`.
    let d = p.evaluate(&F::tcp("db.internal", 5432).addr("10.1.1.1").facts());
    assert_eq!((d.rule, d.uninspectable), ("internal", Uninspectable::Refuse));
    let d = p.evaluate(&F::https("x.example", "/upload/a").addr("10.1.1.1").facts());
    assert_eq!((d.rule, d.uninspectable), ("uploads-scanned", Uninspectable::ScanRaw));

    // Explain says which address missed which networks, and the outcome.
    let f = conn("10.21.0.1", 22);
    let e = p.explain(&f.facts());
    assert_eq!(
        (e.skipped[0].selector.as_str(), e.skipped[0].detail.as_str()),
        ("destination.cidr", "address 10.21.0.1 is in none of `10.20.0.0/16`")
    );
    assert_eq!(
        e.skipped[1].detail,
        "address 10.21.0.1 is in none of `fd00:1::/32`, `192.168.7.0/24`, `172.16.0.0/12`, `198.51.100.9/32`"
    );
    assert_eq!(e.skipped[2].selector, "request");
    let json = serde_json::to_value(p.explain(&conn("10.20.0.1", 22).facts())).unwrap();
    assert_eq!(json["decision"]["uninspectable"], "pass");
    assert_eq!(Policy::builtin().default_decision().uninspectable, Uninspectable::Refuse);
}

#[test]
fn uninspectable_is_inherited_from_defaults() {
    let p = parse(
        "version: 1\nrules:\n  - name: a\n    match: { destination: { port: 1 } }\n    action: allow\n  - name: b\n    match: { destination: { port: 2 } }\n    action: allow\n    uninspectable: refuse\ndefaults:\n  action: deny\n  uninspectable: scan_raw\n",
    );
    let tcp = |port| F::tcp("h", port);
    assert_eq!(p.evaluate(&tcp(1).facts()).uninspectable, Uninspectable::ScanRaw);
    assert_eq!(p.evaluate(&tcp(2).facts()).uninspectable, Uninspectable::Refuse);
    assert_eq!(p.evaluate(&tcp(3).facts()).uninspectable, Uninspectable::ScanRaw);
    assert!(p.warnings().is_empty());
    // A blanket `pass` is allowed, but `check` warns about it.
    let p = parse("version: 1\nrules: []\ndefaults:\n  action: allow\n  uninspectable: pass\n");
    assert_eq!(p.warnings().len(), 1, "{:?}", p.warnings());
    assert_eq!((p.warnings()[0].line, p.warnings()[0].column), (5, 18), "{}", p.warnings()[0]);
    assert!(p.warnings()[0].message.contains("every intercepted destination"), "{}", p.warnings()[0]);
}

#[test]
fn uninspectable_and_cidr_errors_name_their_position() {
    let cases: &[(&str, &str, (usize, usize))] = &[
        (
            "  - match: { destination: { cidr: 10.0.0.0/8 } }\n    action: deny\n    uninspectable: pass\n",
            "no effect with `action: deny`",
            (5, 20),
        ),
        (
            "  - match: { destination: { port: 22 } }\n    action: deny\n    uninspectable: refuse\n",
            "no effect with `action: deny`",
            (5, 20),
        ),
        (
            "  - match: { destination: { cidr: 10.0.0.0/8 }, request: { path: /x } }\n    action: allow\n    uninspectable: pass\n",
            "`uninspectable: pass` can never apply",
            (5, 20),
        ),
        (
            "  - match: { request: { method: GET } }\n    action: require_approval\n    approval: { group: g }\n    uninspectable: pass\n",
            "can never apply",
            (6, 20),
        ),
        ("  - action: allow\n    uninspectable: maybe\n", "unknown variant `maybe`", (4, 20)),
        ("  - match: { destination: { cidr: 10.0.0.1/8 } }\n    action: allow\n", "write `10.0.0.0/8`", (3, 35)),
        ("  - match: { destination: { cidr: [10.0.0.0/8, nope] } }\n    action: allow\n", "is not a network", (3, 48)),
        ("  - match: { destination: { cidr: \"10.0.0.0/33\" } }\n    action: allow\n", "is not a network", (3, 35)),
        ("  - match: { destination: { cidr: [] } }\n    action: allow\n", "empty list", (3, 35)),
    ];
    for (rule, want, at) in cases {
        let text = format!("version: 1\nrules:\n{rule}defaults: {{ action: allow }}\n");
        let e = errs(&text);
        assert_eq!(e.len(), 1, "{text}\n{e:#?}");
        assert!(e[0].message.contains(want), "{text}\nwant {want:?} in {:?}", e[0].message);
        assert_eq!((e[0].line, e[0].column), *at, "{text}\n{}", e[0]);
        assert_eq!(e[0].rule, Some(0), "{}", e[0]);
    }
    // `scan_raw` behind request selectors is fine: bodies are judged per request.
    parse("version: 1\nrules:\n  - match: { request: { path: /x } }\n    action: allow\n    uninspectable: scan_raw\ndefaults: { action: allow }\n");
}

#[test]
fn explain_cli_judges_connections_by_host_and_port() {
    use crate::cli::policy::{run_with as run, PolicyArgs};
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: PolicyArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, OPAQUE).unwrap();
    let none = PolicyContext::default();
    let run_with = |extra: &[&str]| {
        let mut argv = vec!["gateway", "explain"];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))?.a;
        run(&args, Some(&file), &none)
    };
    let ok = std::process::ExitCode::SUCCESS;
    assert_eq!(run_with(&["--host", "10.20.1.5", "--port", "22", "--protocol", "tcp"]).unwrap(), ok);
    assert_eq!(run_with(&["--host", "git.example", "--port", "22", "--addr", "10.20.1.5", "--json"]).unwrap(), ok);
    assert_eq!(run_with(&["--host", "[fd00:1::5]", "--port", "443", "--protocol", "tls"]).unwrap(), ok);
    // A host name without --addr is judged as 0.0.0.0 (with a note).
    assert_eq!(run_with(&["--host", "git.example", "--port", "22"]).unwrap(), ok);
    // Refused paths are explained, not errors.
    assert_eq!(run_with(&["--url", "https://10.1.1.1/a%2Fb"]).unwrap(), ok);
    assert_eq!(run_with(&["--url", "https://10.1.1.1/a%2Fb", "--json"]).unwrap(), ok);
    assert!(run_with(&["--host", "h", "--port", "1", "--url", "https://h/"]).is_err());
    assert!(run_with(&["--host", "h"]).is_err());
    assert!(run_with(&[]).is_err());
    assert!(run_with(&["--host", "a b", "--port", "1"]).is_err());
}

mod postgres;

#[test]
fn credential_inject_is_inherited_and_checked_against_the_held_credentials() {
    use crate::credentials::CredentialEntry;
    let text = "version: 1\nrules:\n  - name: api\n    match:\n      destination:\n        host: [api.example.com, other.example.com, '*.wild.example']\n    action: allow\n    credential: inject\n  - name: plain\n    match:\n      destination:\n        host: plain.example.com\n    action: allow\n    credential: as_sent\ndefaults:\n  action: allow\n  static_keys: swap\n";
    let p = parse(text);
    assert_eq!(p.evaluate(&F::https("api.example.com", "/").facts()).credential, CredentialUse::Inject);
    assert_eq!(p.evaluate(&F::https("plain.example.com", "/").facts()).credential, CredentialUse::AsSent);
    let d = p.evaluate(&F::https("elsewhere.example.com", "/").facts());
    assert_eq!((d.credential, d.static_keys), (CredentialUse::AsSent, Some(StaticKeyAction::Swap)));
    assert!(p.warnings().is_empty(), "unchecked without the credentials: {:?}", p.warnings());

    let held = |hosts: &[&str]| PolicyContext {
        credentials: Some(
            hosts
                .iter()
                .map(|h| CredentialEntry { identity: "**".into(), host: (*h).into(), ..CredentialEntry::default() })
                .collect::<Vec<_>>()
                .into(),
        ),
        ..PolicyContext::default()
    };
    let path = std::path::Path::new("p.yaml");
    let warned = |context: &PolicyContext| -> Vec<String> {
        Policy::parse_in(path, text, context).unwrap().warnings().iter().map(|w| w.to_string()).collect()
    };
    // Nothing held: every rule that swaps or injects, and the default.
    let none = warned(&held(&[]));
    assert_eq!(none.len(), 3, "{none:?}");
    assert!(none.iter().all(|w| w.contains("no credential held for this identity and destination")), "{none:?}");
    // One host held: the literal host without an entry is named; globs are not guessed at.
    let some = warned(&held(&["api.example.com"]));
    assert_eq!(some.len(), 2, "{some:?}");
    let api = some.iter().find(|w| w.contains("rule `api` injects")).expect("api warned about");
    assert!(api.contains("`other.example.com`") && !api.contains("`api.example.com`"), "{api}");
    assert!(some.iter().any(|w| w.contains("rule `plain` swaps in") && w.contains("`plain.example.com`")), "{some:?}");
    assert!(warned(&held(&["*.example.com"])).is_empty());
}
