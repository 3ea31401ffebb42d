//! Trust for every common runtime, end to end: `gateway trust install`
//! writes the environment file, and `gateway doctor`, run in the intercepted
//! cgroup like a job, asks the real runtimes (curl, git, python requests,
//! node, npm, pip, grpc, java) to fetch from a real intercepted TLS
//! destination: none trusts the gateway's certificate in a bare environment,
//! every one does with the environment file loaded (Java with a trust store
//! holding the CA), and a public host still verifies through the bundle.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use gateway_tests::{
    unique_port,
    upstream::{TestPki, Upstream},
    GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "doctor.test.internal";
const UPSTREAM_IP: &str = "127.0.0.8";

/// Every runtime `gateway doctor` knows; each must be installed here
/// (`cargo xtask setup` installs them), so no verdict is "not installed".
const RUNTIMES: [&str; 8] = ["curl", "git", "python_requests", "node", "npm", "pip", "grpc", "java"];

struct Scene {
    gw: TestGateway,
    _upstream: Upstream,
    url: String,
    hosts: PathBuf,
    _pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Scene {
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new("trust", &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.extra_yaml =
            format!("tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{}]\n", pki.ca_path.display());
        let gw = TestGateway::start(opts);
        // The runtimes resolve the name through /etc/hosts: a private copy
        // bind-mounted in the doctor's own mount namespace.
        let hosts = pki_dir.path().join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{UPSTREAM_IP} {HOST}\n")).expect("hosts");
        Scene { gw, _upstream: upstream, url: format!("https://{HOST}:{port}/"), hosts, _pki_dir: pki_dir }
    }

    /// `gateway doctor --json` in the intercepted cgroup with exactly `env`
    /// (plus PATH and HOME); verdict per runtime.
    fn doctor(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, Value> {
        let home = self.gw.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let script = format!(
            "mount --bind {} /etc/hosts && exec {} --config {} doctor --json --url {}",
            self.hosts.display(),
            gateway_tests::gateway_bin().display(),
            self.gw.config_path.display(),
            self.url
        );
        let out = self
            .gw
            .command_in_cgroup("unshare")
            .args(["-m", "sh", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .envs(env)
            .output()
            .expect("gateway doctor");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let verdicts: BTreeMap<String, Value> = stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}\n{stdout}")))
            .map(|v| (v["runtime"].as_str().expect("runtime").to_owned(), v))
            .collect();
        assert_eq!(
            verdicts.keys().map(String::as_str).collect::<Vec<_>>().len(),
            RUNTIMES.len(),
            "one verdict per runtime: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        verdicts
    }
}

fn verdicts_of(v: &BTreeMap<String, Value>) -> BTreeMap<&str, &str> {
    v.iter().map(|(k, v)| (k.as_str(), v["verdict"].as_str().unwrap_or("?"))).collect()
}

/// The env file as KEY=value pairs.
fn read_env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn every_runtime_trusts_the_gateway_once_the_trust_environment_is_loaded() {
    let scene = Scene::start();

    // A bare job environment: nobody trusts the gateway's leaf, and each
    // refusal comes with its fix.
    let bare = scene.doctor(&BTreeMap::new());
    for runtime in RUNTIMES {
        let v = &bare[runtime];
        assert_eq!(v["verdict"], "does_not_trust", "{runtime}: {v}");
        assert!(v["fix"].as_str().is_some_and(|f| !f.is_empty()), "{runtime}: a fix is given: {v}");
    }

    // trust install (the system store and the host's JDKs are left alone
    // here: this host is shared), then the env file loaded.
    let env_file = scene.gw.dir.path().join("ca.env");
    let out =
        scene.gw.cli(&["trust", "install", "--no-system", "--no-java", "--env-file", env_file.to_str().expect("utf8")]);
    assert!(out.status.success(), "trust install: {}", String::from_utf8_lossy(&out.stderr));
    let mut env = read_env_file(&env_file);
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "NODE_EXTRA_CA_CERTS",
        "PIP_CERT",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "AWS_CA_BUNDLE",
        "NPM_CONFIG_CAFILE",
    ] {
        assert!(env.contains_key(var), "{var} missing from the env file: {env:?}");
    }
    // Java reads its trust store, not the environment: a copy of the JDK's
    // with the gateway CA, as `trust install` makes on a host.
    let store = scene.gw.dir.path().join("cacerts");
    std::fs::copy("/etc/ssl/certs/java/cacerts", &store).expect("the JDK's trust store (default-jdk-headless)");
    let ca = scene.gw.dir.path().join("state/ca/ca.crt");
    let import = Command::new("keytool")
        .args(["-importcert", "-noprompt", "-storepass", "changeit", "-alias", "ci-gateway", "-file"])
        .arg(&ca)
        .arg("-keystore")
        .arg(&store)
        .output()
        .expect("keytool");
    assert!(import.status.success(), "keytool: {}", String::from_utf8_lossy(&import.stderr));
    env.insert("JAVA_TOOL_OPTIONS".into(), format!("-Djavax.net.ssl.trustStore={}", store.display()));

    let trusted = scene.doctor(&env);
    assert!(
        trusted.values().all(|v| v["verdict"] == "trusts"),
        "with the env file every runtime trusts the gateway: {:?}\n{trusted:?}",
        verdicts_of(&trusted)
    );

    // The bundle still holds the system roots: public hosts keep verifying.
    let bundle = std::fs::read_to_string(&env["SSL_CERT_FILE"]).expect("bundle");
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").expect("system bundle");
    assert!(bundle.starts_with(system.trim_end()), "the bundle starts with the system roots");
    assert!(bundle.contains(std::fs::read_to_string(&ca).expect("ca").trim()), "the bundle holds the gateway CA");
}
