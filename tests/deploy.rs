//! What operators deploy, checked as they would use it:
//!
//! * the Docker Compose quick start (deploy/compose/), run as an operator
//!   runs it: `cargo xtask demo` builds the gateway image (the package of
//!   the binary under test installed into a debootstrapped Debian root) and
//!   the demo image, brings the compose project up on this test process's
//!   private dockerd, and must show the job's hard-coded key blocked, the
//!   finding and the session, and the finding in the review console signed
//!   in at the demo's stand-in identity provider, then leave no container, network, volume,
//!   cgroup or pinned program behind;
//! * the Kubernetes manifests (deploy/kubernetes/), validated offline
//!   against the vendored Kubernetes API schemas with Python's `jsonschema`,
//!   their gateway configuration and policy with `gateway config check` and
//!   `gateway policy check`;
//! * every gateway configuration shown in docs/runners/ and
//!   docs/kubernetes.md, with `gateway config check`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use gateway_tests::{docker::docker, gateway_bin, require_root};

/// Names the quick start uses (deploy/compose/, xtask/src/image.rs).
const PROJECT: &str = "cigwdemo";
const CGROUP: &str = "cigwdemo.slice";
const BPFFS: &str = "/sys/fs/bpf/ci-gateway-demo";

/// A Cursor-style key in clear (`key_` and 64 hex digits) anywhere in `text`.
fn has_key_in_clear(text: &str) -> bool {
    text.match_indices("key_").any(|(i, _)| {
        let rest = &text.as_bytes()[i + 4..];
        rest.len() >= 64 && rest[..64].iter().all(u8::is_ascii_hexdigit)
    })
}

/// Every cgroup hierarchy mounted here that holds `name` at its top.
fn cgroups_named(name: &str) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            matches!(post.split(' ').next()?, "cgroup" | "cgroup2").then(|| pre.split(' ').nth(4).map(str::to_owned))?
        })
        .map(|point| format!("{point}/{name}"))
        .filter(|p| Path::new(p).exists())
        .collect()
}

#[test]
fn the_quick_start_shows_a_hard_coded_key_blocked_found_and_recorded() {
    require_root();
    let xtask = gateway_bin().parent().expect("target dir").join("xtask");
    assert!(xtask.is_file(), "{} missing: `cargo build --workspace --bins` builds it", xtask.display());
    let docker = docker();
    let cli_config = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let out = Command::new(&xtask)
        .args(["demo", "--fast", "--binary"])
        .arg(gateway_bin())
        .env("DOCKER_HOST", format!("unix://{}", docker.socket().display()))
        .env("DOCKER_CONFIG", cli_config.path())
        .output()
        .expect("run xtask demo");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo xtask demo failed ({}):\n{stdout}\n{stderr}", out.status);

    // The job's two calls: without a key it reaches the stand-in backend,
    // with one it is blocked before anything is sent.
    assert!(stdout.contains("job: HTTP 200") && stdout.contains("\"ok\": true"), "{stdout}");
    assert!(stdout.contains("job: HTTP 403") && stdout.contains("static_credential_blocked"), "{stdout}");
    // The finding and the blocked session, as the operator sees them.
    let findings = stdout.split("=== gateway findings list ===").nth(1).expect("findings section");
    assert!(findings.contains("F-1") && findings.contains("cursor-api-key"), "{stdout}");
    assert!(findings.contains("api2.cursor.sh:443") && findings.contains("/usr/bin/curl"), "{stdout}");
    let sessions = stdout.split("=== gateway sessions list ===").nth(1).expect("sessions section");
    assert!(sessions.lines().any(|l| l.contains("api2.cursor.sh") && l.ends_with("blocked")), "{stdout}");
    assert!(sessions.contains("findings F-1"), "the blocked session names the finding: {stdout}");
    // The reviewer's view: signed in to the console at the stand-in
    // identity provider, the findings page lists the finding.
    let console = stdout.split("=== the review console,").nth(1).expect("console section");
    assert!(console.contains("signed in as reviewer@demo.example"), "{stdout}");
    assert!(console.contains("F-1") && console.contains("cursor-api-key"), "{stdout}");
    assert!(stdout.contains("xtask: the key was blocked (HTTP 403), found, and the session recorded"));
    assert!(!has_key_in_clear(&stdout) && !has_key_in_clear(&stderr), "a key is printed in clear:\n{stdout}");
    println!("the quick start took {took:.0?} (images included)");
    for line in stdout.lines().filter(|l| l.starts_with("xtask: ci-gateway")) {
        println!("{line}");
    }

    // Nothing left behind.
    let leftover = |args: &[&str]| {
        let out = docker.cmd().args(args).output().expect("docker");
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let label = format!("label=com.docker.compose.project={PROJECT}");
    assert_eq!(leftover(&["ps", "-aq", "--filter", &label]), "", "containers left behind");
    assert_eq!(leftover(&["network", "ls", "-q", "--filter", &label]), "", "networks left behind");
    assert_eq!(leftover(&["volume", "ls", "-q", "--filter", &label]), "", "volumes left behind");
    assert_eq!(cgroups_named(CGROUP), Vec::<String>::new(), "cgroups left behind");
    assert!(!Path::new(BPFFS).exists(), "{BPFFS} left behind: the demo's gateway did not detach");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The documents of the Kubernetes manifest file, as JSON.
fn manifests() -> Vec<serde_json::Value> {
    let path = repo().join("deploy/kubernetes/ci-gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("read the manifests");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let value: serde_json::Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            value
        })
        .collect()
}

/// The vendored schema of a manifest's kind (deploy/kubernetes/schemas/).
fn schema_for(doc: &serde_json::Value) -> PathBuf {
    let kind = doc["kind"].as_str().expect("a kind").to_lowercase();
    let group = doc["apiVersion"].as_str().expect("an apiVersion").split_once('/').map(|(g, v)| (g.to_owned(), v));
    let name = match group {
        Some((group, version)) => format!("{kind}-{}-{version}.json", group.split('.').next().unwrap_or(&group)),
        None => format!("{kind}-{}.json", doc["apiVersion"].as_str().expect("apiVersion")),
    };
    let path = repo().join("deploy/kubernetes/schemas").join(name);
    assert!(path.is_file(), "no vendored schema {} (deploy/kubernetes/schemas/vendor.py makes it)", path.display());
    path
}

/// Validates `doc` against `schema` with Python's jsonschema (the draft the
/// schema names); the errors, one per line, or `None` when it is valid.
fn validate(schema: &Path, doc: &serde_json::Value) -> Option<String> {
    const CHECK: &str = "import json, sys, jsonschema\n\
schema = json.load(open(sys.argv[1]))\n\
doc = json.load(sys.stdin)\n\
cls = jsonschema.validators.validator_for(schema)\n\
cls.check_schema(schema)\n\
errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))\n\
for e in errors: print('/'.join(map(str, e.absolute_path)) + ': ' + e.message[:300])\n\
sys.exit(3 if errors else 0)\n";
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .args(["-c", CHECK])
        .arg(schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs it and jsonschema)");
    child.stdin.take().expect("stdin").write_all(doc.to_string().as_bytes()).expect("write");
    let out = child.wait_with_output().expect("python3");
    match out.status.code() {
        Some(0) => None,
        Some(3) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => panic!(
            "the validator did not run ({}): {} (`cargo xtask setup` installs jsonschema)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn the_kubernetes_manifests_match_the_api_schemas() {
    let docs = manifests();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"]);
    for doc in &docs {
        let schema = schema_for(doc);
        if let Some(errors) = validate(&schema, doc) {
            panic!("{} does not match {}:\n{errors}", doc["kind"], schema.display());
        }
    }
    // The validator is not vacuous: a misspelled field, a wrong type and a
    // missing required field are each rejected.
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    let schema = schema_for(daemonset);
    let pod = "/spec/template/spec";
    for (what, path, value) in [
        ("misspelled field", format!("{pod}/hostPid"), serde_json::json!(true)),
        ("wrong type", format!("{pod}/hostNetwork"), serde_json::json!("yes")),
        (
            "unknown capability field",
            format!("{pod}/containers/0/securityContext/capabilities/added"),
            serde_json::json!(["BPF"]),
        ),
    ] {
        let mut broken = daemonset.clone();
        let (parent, field) = path.rsplit_once('/').expect("a path");
        broken.pointer_mut(parent).expect("parent").as_object_mut().expect("object").insert(field.into(), value);
        assert!(validate(&schema, &broken).is_some(), "the schema accepted a {what} at {path}");
    }
    let mut broken = daemonset.clone();
    broken
        .pointer_mut(&format!("{pod}/containers/0"))
        .expect("container")
        .as_object_mut()
        .expect("object")
        .remove("name");
    assert!(validate(&schema, &broken).is_some(), "the schema accepted a container without a name");
}

#[test]
fn the_kubernetes_daemonset_has_least_privileges_and_the_host_mounts() {
    let docs = manifests();
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // The systemd unit's capability bounding set, exactly.
    let unit = std::fs::read_to_string(repo().join("deploy/ci-gateway.service")).expect("unit");
    let mut unit_caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let mut caps: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|c| c.as_str().expect("a name").to_owned())
        .collect();
    unit_caps.sort();
    caps.sort();
    assert_eq!(caps, unit_caps, "the DaemonSet's capabilities differ from the systemd unit's");
    let mounts: Vec<&str> =
        container["volumeMounts"].as_array().expect("mounts").iter().filter_map(|m| m["mountPath"].as_str()).collect();
    for needed in ["/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/ci-gateway", "/etc/ci-gateway"] {
        assert!(mounts.contains(&needed), "{needed} is not mounted: {mounts:?}");
    }
}

/// `gateway config check FILE`'s output, failing the test unless it loads.
fn config_check(yaml: &str, what: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = run(Command::new(gateway_bin()).args(["config", "check"]).arg(&path));
    assert!(
        out.status.success(),
        "{what} is not a valid gateway configuration:\n{}\n---\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_configuration_and_policy() {
    let docs = manifests();
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("ConfigMap");
    let gateway_yaml = config_map["data"]["gateway.yaml"].as_str().expect("gateway.yaml");
    config_check(gateway_yaml, "the ConfigMap's gateway.yaml");
    assert!(
        gateway_yaml.contains("file: /etc/ci-gateway/policy.yaml"),
        "the configuration names the ConfigMap's policy"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, config_map["data"]["policy.yaml"].as_str().expect("policy.yaml")).expect("write");
    let out = run(Command::new(gateway_bin()).args(["policy", "check"]).arg(&policy));
    assert!(out.status.success(), "the ConfigMap's policy: {}", String::from_utf8_lossy(&out.stdout));
}

/// Top-level fields of the gateway's configuration (docs/configuration.md).
const CONFIG_FIELDS: &[&str] = &[
    "state_dir",
    "intercept",
    "proxy",
    "log",
    "tls",
    "detect",
    "findings",
    "identity",
    "credentials",
    "api",
    "policy",
    "approvals",
    "record",
];

/// The ```yaml blocks of a markdown file whose top-level keys are all
/// gateway configuration fields.
fn gateway_configs_in(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml") => current = Some(String::new()),
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
        .into_iter()
        .filter(|b| {
            let keys: Vec<&str> = b
                .lines()
                .filter(|l| !l.starts_with([' ', '#', '-']) && !l.trim().is_empty())
                .filter_map(|l| l.split(':').next())
                .collect();
            !keys.is_empty() && keys.iter().all(|k| CONFIG_FIELDS.contains(k))
        })
        .collect()
}

#[test]
fn every_gateway_configuration_in_the_runner_guides_is_valid() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/runners"))
        .expect("docs/runners")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let names: Vec<String> =
        files.iter().filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned)).collect();
    assert_eq!(names, ["buildkite.md", "github-actions.md", "gitlab.md", "jenkins.md"]);
    files.push(repo().join("docs/kubernetes.md"));
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let configs = gateway_configs_in(&text);
        let is_kubernetes = file.ends_with("kubernetes.md");
        // The Kubernetes guide's configuration is the ConfigMap's (checked above).
        assert!(is_kubernetes || !configs.is_empty(), "{} shows no gateway configuration", file.display());
        for (i, yaml) in configs.iter().enumerate() {
            config_check(yaml, &format!("{} block {}", file.display(), i + 1));
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} configurations found");
    // Not every ```yaml block is a configuration: a CI file is not taken for one.
    assert!(gateway_configs_in("```yaml\ngateway-check:\n  script: [true]\n```\n").is_empty());
}

#[test]
fn key_in_clear_is_recognised() {
    assert!(has_key_in_clear(&format!("a key_{} b", "0a".repeat(32))));
    assert!(!has_key_in_clear("preview key_…1d46"));
}
