//! `gateway doctor`: run inside a job's environment (a shell of the runner,
//! a job container), it tells, per TLS runtime installed there, whether that
//! runtime trusts the gateway, and how to fix it when it does not.
//!
//! Each runtime is asked for real: it opens an HTTPS connection to a host the
//! gateway intercepts (so the certificate it sees is one the gateway minted)
//! with its own trust settings and environment. A runtime that gets an HTTP
//! answer trusts the gateway; one that fails certificate verification does
//! not; anything else (no network, a timeout) is reported as unknown.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Output, Stdio},
};

use serde::Serialize;

use crate::{config::Config, tls::ca::CaPaths};

/// Arguments of `gateway doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// An HTTPS URL the gateway intercepts (default: https://HOST/ for the
    /// first exact host name in tls.intercept).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// One JSON object per runtime instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The TLS runtimes jobs commonly use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// curl (OpenSSL or GnuTLS).
    Curl,
    /// git over HTTPS.
    Git,
    /// Python's requests.
    PythonRequests,
    /// Node.js's https module.
    Node,
    /// npm.
    Npm,
    /// pip.
    Pip,
    /// gRPC (the Python binding; the C core every binding but Go and Java share).
    Grpc,
    /// The JDK (HttpsURLConnection, with the JDK's trust store).
    Java,
}

/// Every runtime, in the order they are reported.
pub const RUNTIMES: [Runtime; 8] = [
    Runtime::Curl,
    Runtime::Git,
    Runtime::PythonRequests,
    Runtime::Node,
    Runtime::Npm,
    Runtime::Pip,
    Runtime::Grpc,
    Runtime::Java,
];

/// What asking a runtime showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// It completed the TLS handshake with the gateway's certificate.
    Trusts,
    /// It refused the gateway's certificate.
    DoesNotTrust {
        /// What it said (last lines).
        said: String,
    },
    /// It is not installed here.
    NotInstalled,
    /// It failed for another reason (network, timeout): trust is unknown.
    Unknown {
        /// What it said (last lines).
        said: String,
    },
}

/// Python: any HTTP answer is trust; SSLError is not.
const PY_REQUESTS: &str = "import sys\ntry:\n    import requests\nexcept ImportError:\n    sys.exit(5)\ntry:\n    requests.get(sys.argv[1], timeout=20)\nexcept requests.exceptions.SSLError as e:\n    print(e, file=sys.stderr); sys.exit(3)\nexcept Exception as e:\n    print(e, file=sys.stderr); sys.exit(4)\n";

/// Node: an answer is trust; a certificate error code is not.
const NODE_HTTPS: &str = "const req = require('https').get(process.argv[1], (r) => { r.resume(); process.exit(0); });\nreq.setTimeout(20000, () => { console.error('timeout'); process.exit(4); });\nreq.on('error', (e) => { console.error(e.code || '', e.message); process.exit(/CERT|SELF_SIGNED|UNABLE_TO|ISSUER/.test(e.code || '') ? 3 : 4); });\n";

/// gRPC: any status the server sent means the handshake passed.
const PY_GRPC: &str = "import sys\ntry:\n    import grpc\nexcept ImportError:\n    sys.exit(5)\nfrom urllib.parse import urlsplit\nu = urlsplit(sys.argv[1])\nch = grpc.secure_channel('%s:%d' % (u.hostname, u.port or 443), grpc.ssl_channel_credentials())\ntry:\n    ch.unary_unary('/ci.gateway.Doctor/Probe')(b'', timeout=20)\nexcept grpc.RpcError as e:\n    said = '%s %s %s' % (e.code(), e.details(), e.debug_error_string() if hasattr(e, 'debug_error_string') else '')\n    print(said, file=sys.stderr)\n    low = said.lower()\n    if 'certificate' in low or 'handshake' in low or 'ssl' in low:\n        sys.exit(3)\n    if e.code() == grpc.StatusCode.UNAVAILABLE or e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:\n        sys.exit(4)\nsys.exit(0)\n";

/// Java: HttpsURLConnection with the JDK's default trust store.
const JAVA_PROBE: &str = "public class Probe {\n  public static void main(String[] a) throws Exception {\n    try {\n      var c = (javax.net.ssl.HttpsURLConnection) new java.net.URL(a[0]).openConnection();\n      c.setConnectTimeout(20000); c.setReadTimeout(20000);\n      c.getResponseCode();\n    } catch (javax.net.ssl.SSLException e) { System.err.println(e); System.exit(3); }\n    catch (java.io.IOException e) { System.err.println(e); System.exit(4); }\n  }\n}\n";

/// What the runtimes print when they refuse a certificate.
const CERT_MARKERS: [&str; 9] = [
    "certificate",
    "self-signed",
    "self signed",
    "self_signed",
    "unable_to_get_issuer",
    "unable_to_verify",
    "unable to get local issuer",
    "pkix path",
    "sslhandshake",
];

impl Runtime {
    /// The name shown to people.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Curl => "curl",
            Runtime::Git => "git",
            Runtime::PythonRequests => "python requests",
            Runtime::Node => "node",
            Runtime::Npm => "npm",
            Runtime::Pip => "pip",
            Runtime::Grpc => "grpc (python)",
            Runtime::Java => "java",
        }
    }

    /// The environment variable this runtime takes its roots from (`None`:
    /// Java, which reads its own trust store).
    pub fn variable(self) -> Option<&'static str> {
        match self {
            Runtime::Curl => Some("CURL_CA_BUNDLE"),
            Runtime::Git => Some("GIT_SSL_CAINFO"),
            Runtime::PythonRequests => Some("REQUESTS_CA_BUNDLE"),
            Runtime::Node => Some("NODE_EXTRA_CA_CERTS"),
            Runtime::Npm => Some("NPM_CONFIG_CAFILE"),
            Runtime::Pip => Some("PIP_CERT"),
            Runtime::Grpc => Some("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"),
            Runtime::Java => None,
        }
    }

    /// How to make this runtime trust the gateway.
    pub fn fix(self, ca: &CaPaths, env_file: &Path) -> String {
        let bundle = ca.dir.join("bundle.pem");
        match self.variable() {
            Some(var) => {
                let file = if self == Runtime::Node { &ca.cert } else { &bundle };
                format!(
                    "set {var}={} in the job's environment: `gateway trust install` writes it to {} (load that file: EnvironmentFile= in the runner's unit, `docker run --env-file`, or `set -a; . {}`)",
                    file.display(),
                    env_file.display(),
                    env_file.display()
                )
            }
            None => format!(
                "`gateway trust install` on the host imports the CA into every JDK's trust store; in a job image: keytool -importcert -cacerts -storepass changeit -noprompt -alias ci-gateway -file {}",
                ca.cert.display()
            ),
        }
    }

    /// Asks the runtime to fetch `url`; `scratch` is a private directory for
    /// its files.
    fn probe(self, url: &str, scratch: &Path) -> Verdict {
        let (mut cmd, trusted_failure): (Command, &[&str]) = match self {
            Runtime::Curl => {
                let mut c = Command::new("curl");
                c.args(["-sS", "-o", "/dev/null", "--max-time", "20", url]);
                (c, &[])
            }
            Runtime::Git => {
                let mut c = Command::new("git");
                c.args(["-c", "credential.helper=", "ls-remote", url]).env("GIT_TERMINAL_PROMPT", "0");
                (c, &["not found", "returned error", "http 4", "http 5", "not valid", "authentication failed"])
            }
            Runtime::PythonRequests => {
                let mut c = Command::new("python3");
                c.args(["-c", PY_REQUESTS, url]);
                (c, &[])
            }
            Runtime::Node => {
                let mut c = Command::new("node");
                c.args(["-e", NODE_HTTPS, url]);
                (c, &[])
            }
            Runtime::Npm => {
                let mut c = Command::new("npm");
                c.args(["ping", "--fetch-retries=0", "--fetch-timeout=20000", "--registry", url])
                    .env("npm_config_cache", scratch.join("npm-cache"))
                    .env("npm_config_update_notifier", "false");
                (c, &["code e4", "code e5", "404 not found"])
            }
            Runtime::Pip => {
                let mut c = Command::new("python3");
                c.args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"])
                    .args(["--retries", "0", "--timeout", "20", "-d"])
                    .arg(scratch.join("pip"))
                    .args(["--index-url", url, "ci-gateway-doctor-probe"]);
                (c, &["could not find a version", "no matching distribution"])
            }
            Runtime::Grpc => {
                let mut c = Command::new("python3");
                c.args(["-c", PY_GRPC, url]);
                (c, &[])
            }
            Runtime::Java => {
                let source = scratch.join("Probe.java");
                if let Err(e) = std::fs::write(&source, JAVA_PROBE) {
                    return Verdict::Unknown { said: format!("writing {}: {e}", source.display()) };
                }
                let mut c = Command::new("java");
                c.arg(&source).arg(url);
                (c, &[])
            }
        };
        cmd.stdin(Stdio::null());
        let out = match cmd.output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Verdict::NotInstalled,
            Err(e) => return Verdict::Unknown { said: e.to_string() },
        };
        classify(self, &out, trusted_failure)
    }
}

/// The last lines of what a runtime printed, for the report.
fn tail(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

fn classify(runtime: Runtime, out: &Output, trusted_failure: &[&str]) -> Verdict {
    let said = tail(out);
    let low =
        format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout)).to_lowercase();
    match out.status.code() {
        Some(0) => return Verdict::Trusts,
        // The probe scripts' own codes: 3 refused the certificate, 4 other, 5 module missing.
        Some(3) if matches!(runtime, Runtime::PythonRequests | Runtime::Node | Runtime::Grpc | Runtime::Java) => {
            return Verdict::DoesNotTrust { said }
        }
        Some(5) if matches!(runtime, Runtime::PythonRequests | Runtime::Grpc) => return Verdict::NotInstalled,
        // curl: 22 is an HTTP error status (after the handshake), 60 and 77 certificate problems.
        Some(22) if runtime == Runtime::Curl => return Verdict::Trusts,
        Some(60 | 77) if runtime == Runtime::Curl => return Verdict::DoesNotTrust { said },
        _ => {}
    }
    if runtime == Runtime::Pip && low.contains("no module named pip") {
        return Verdict::NotInstalled;
    }
    if CERT_MARKERS.iter().any(|m| low.contains(m)) {
        return Verdict::DoesNotTrust { said };
    }
    if trusted_failure.iter().any(|m| low.contains(m)) {
        return Verdict::Trusts;
    }
    Verdict::Unknown { said }
}

/// One runtime's line of the report.
#[derive(Debug, Serialize)]
struct Report {
    runtime: Runtime,
    #[serde(flatten)]
    verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

/// The URL asked for: `--url`, or the first exact host name the gateway
/// terminates TLS for.
fn probe_url(config: &Config, args: &DoctorArgs) -> anyhow::Result<String> {
    if let Some(url) = &args.url {
        anyhow::ensure!(url.starts_with("https://"), "--url must be an https:// URL the gateway intercepts");
        return Ok(url.clone());
    }
    let host = config
        .tls
        .intercept
        .iter()
        .find(|p| !p.contains('*'))
        .ok_or_else(|| anyhow::anyhow!("tls.intercept names no exact host: give --url https://HOST/"))?;
    Ok(format!("https://{host}/"))
}

/// Runs `gateway doctor`: exit 0 when every installed runtime trusts the
/// gateway, 1 when one does not or could not be checked.
pub fn run(config: &Config, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let url = probe_url(config, args)?;
    let ca = CaPaths::new(&config.state_dir);
    let scratch = tempfile_dir()?;
    let reports: Vec<Report> = std::thread::scope(|s| {
        let handles: Vec<_> = RUNTIMES
            .iter()
            .map(|&runtime| {
                let (url, scratch) = (&url, &scratch);
                s.spawn(move || {
                    let dir = scratch.join(format!("{runtime:?}"));
                    let _ = std::fs::create_dir_all(&dir);
                    runtime.probe(url, &dir)
                })
            })
            .collect();
        RUNTIMES
            .iter()
            .zip(handles)
            .map(|(&runtime, h)| {
                let verdict = h.join().unwrap_or_else(|_| Verdict::Unknown { said: "the probe panicked".into() });
                let fix =
                    matches!(verdict, Verdict::DoesNotTrust { .. }).then(|| runtime.fix(&ca, &config.tls.env_file));
                Report { runtime, verdict, fix }
            })
            .collect()
    });
    let _ = std::fs::remove_dir_all(&scratch);
    if args.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!("TLS runtimes against {url} (through the gateway):");
        for r in &reports {
            let name = r.runtime.name();
            match &r.verdict {
                Verdict::Trusts => println!("  {name:<16} trusts the gateway"),
                Verdict::NotInstalled => println!("  {name:<16} not installed"),
                Verdict::DoesNotTrust { said } => {
                    println!("  {name:<16} DOES NOT trust the gateway: {said}");
                    if let Some(fix) = &r.fix {
                        println!("  {:<16} fix: {fix}", "");
                    }
                }
                Verdict::Unknown { said } => println!("  {name:<16} could not be checked: {said}"),
            }
        }
    }
    let bad = reports.iter().any(|r| matches!(r.verdict, Verdict::DoesNotTrust { .. } | Verdict::Unknown { .. }));
    Ok(if bad { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// A private scratch directory for the probes (npm's cache, pip's download
/// directory, Java's source file).
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gateway-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}
