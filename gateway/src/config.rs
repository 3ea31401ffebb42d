//! The gateway's configuration file (YAML) and its embedded defaults.
//!
//! Every field is documented in `docs/configuration.md`; keep the two in step.
//! Unknown fields are errors, so a typo never silently falls back to a default.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where `gateway` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ci-gateway/gateway.yaml";

/// A configuration that could not be loaded: names the file, the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// A file named explicitly (`--config`, `GATEWAY_CONFIG`, `config check
    /// FILE`) does not exist. Only the default path may be absent: running
    /// the embedded defaults because of a typo would mean another state
    /// directory, another CA and another policy than the operator meant.
    #[error("{path}: no such configuration file (the embedded defaults apply only when no file is named and {DEFAULT_CONFIG_PATH} does not exist)")]
    Missing {
        /// The file that was named.
        path: PathBuf,
    },
    /// The YAML did not parse or did not fit the schema.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// Dotted path of the offending field (`.` for the document itself).
        field: String,
        /// What is wrong, with line and column where the parser knows them.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the gateway's durable state (CA, findings database, secrets).
    pub state_dir: PathBuf,
    /// Which connections are intercepted, from which cgroups.
    pub intercept: InterceptConfig,
    /// The local proxy that intercepted connections are redirected to.
    pub proxy: ProxyConfig,
    /// Logging and connection events.
    pub log: LogConfig,
    /// TLS interception: which hosts are terminated, which passed through.
    pub tls: crate::tls::TlsConfig,
    /// Static-key detection.
    pub detect: crate::detect::DetectConfig,
    /// Findings storage and enforcement actions.
    pub findings: crate::findings::FindingsConfig,
    /// Attestation and the mapping from processes to identities.
    pub identity: crate::identity::IdentityConfig,
    /// Credentials the gateway holds, JWT minting, OIDC validation.
    pub credentials: crate::credentials::CredentialsConfig,
    /// The admin APIs: public (JWKS, discovery, health) on loopback TCP,
    /// privileged (approvals) on a unix socket.
    pub api: crate::api::ApiConfig,
    /// The policy file: who may do what where.
    pub policy: crate::policy::PolicyConfig,
    /// Just-in-time approval: approver groups, database, webhook.
    pub approvals: crate::approval::ApprovalConfig,
    /// Session recording.
    pub record: crate::record::RecordConfig,
    /// The fleet's central store and the outbox that ships to it.
    pub fleet: crate::fleet::FleetConfig,
    /// The review console (web, OIDC sign-in); off unless `listen` is set.
    pub console: crate::console::ConsoleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/ci-gateway"),
            intercept: InterceptConfig::default(),
            proxy: ProxyConfig::default(),
            log: LogConfig::default(),
            tls: Default::default(),
            detect: Default::default(),
            findings: Default::default(),
            identity: Default::default(),
            credentials: Default::default(),
            api: Default::default(),
            policy: Default::default(),
            approvals: Default::default(),
            record: Default::default(),
            fleet: Default::default(),
            console: Default::default(),
        }
    }
}

/// Which connections are intercepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterceptConfig {
    /// cgroups (v2) whose processes are intercepted, relative to the cgroup2
    /// mount or absolute below it.
    pub cgroups: Vec<CgroupSpec>,
    /// Destinations that are redirected into the proxy.
    pub destinations: Vec<DestinationSpec>,
    /// Ports captured whatever the address (port capture): every outbound
    /// TCP connect to them goes to the proxy, where the TLS server name or
    /// HTTP Host decides between inspection and passthrough; UDP to them is
    /// refused. Loopback and link-local addresses are left alone. Empty
    /// turns port capture off (only `destinations` are captured).
    pub capture_ports: Vec<u16>,
    /// How often the intercepted cgroups are walked for processes in other
    /// network namespaces (besides the kernel's events).
    #[serde(with = "humantime_serde")]
    pub netns_scan_interval: Duration,
    /// Whether the gateway may bring up the loopback interface of a job's
    /// namespace that has it down (a fresh `unshare -n`) to listen there;
    /// when false such a namespace's captured connects are refused.
    pub bring_up_loopback: bool,
    /// How often host-name destinations are resolved again.
    #[serde(with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// bpffs directory where the gateway pins its programs and maps.
    pub bpffs_dir: PathBuf,
    /// What a clean shutdown leaves behind.
    pub on_shutdown: ShutdownMode,
    /// The cgroup namespace whose paths the configuration uses, joined at
    /// start when the gateway runs in another (a container's private one).
    /// `None`: the host init's, `/proc/1/ns/cgroup`, when it can be read.
    pub cgroup_namespace: Option<PathBuf>,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            cgroups: vec![CgroupSpec { path: PathBuf::from("ci-gateway/jobs"), create: true }],
            destinations: ["api2.cursor.sh", "api3.cursor.sh", "api4.cursor.sh", "api.cursor.com"]
                .into_iter()
                .map(|host| DestinationSpec { target: Target::Host(host.to_owned()), ports: vec![443, 80] })
                .collect(),
            capture_ports: vec![443, 80],
            netns_scan_interval: Duration::from_secs(2),
            bring_up_loopback: true,
            dns_refresh: Duration::from_secs(30),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/ci-gateway"),
            on_shutdown: ShutdownMode::Enforce,
            cgroup_namespace: None,
        }
    }
}

/// One intercepted cgroup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CgroupSpec {
    /// Path of the cgroup, relative to the cgroup2 mount (or absolute below it).
    pub path: PathBuf,
    /// Create the cgroup when it does not exist (otherwise that is an error).
    #[serde(default)]
    pub create: bool,
}

/// One intercept-set entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// The addresses.
    #[serde(flatten)]
    pub target: Target,
    /// Ports to intercept; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// Addresses of an intercept-set entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`, or a bare address).
    Cidr(#[serde(deserialize_with = "de_net", serialize_with = "ser_display")] IpNet),
    /// A host name, resolved at start and every `dns_refresh`.
    Host(String),
}

fn ser_display<S: serde::Serializer>(value: &IpNet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn de_net<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let s = String::deserialize(d)?;
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is not an IP network (a.b.c.d/n or x::y/n)")))
}

/// What a clean shutdown leaves behind.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Keep the programs attached in refusing mode: while the gateway is
    /// down, intercepted connections fail instead of bypassing it.
    #[default]
    Enforce,
    /// Detach everything the gateway attached (development hosts).
    Detach,
}

/// The local proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// IPv4 listener address (a loopback address).
    pub listen_v4: Ipv4Addr,
    /// IPv6 listener address; `null` disables IPv6 interception (such connects are refused).
    pub listen_v6: Option<Ipv6Addr>,
    /// Listener port, shared by both addresses.
    pub port: u16,
    /// `SO_MARK` set on the gateway's upstream sockets; 0 (the default)
    /// picks a random one at every start. The programs only honour it on
    /// the gateway's own sockets.
    pub upstream_mark: u32,
    /// Timeout for connecting to the original destination.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an accepted connection may wait for its eBPF record.
    #[serde(with = "humantime_serde")]
    pub attribution_timeout: Duration,
    /// How long the proxy waits for a client's first bytes (which pick TLS,
    /// HTTP or another protocol) before it considers that the server may
    /// speak first (SSH, SMTP, MySQL): only where the policy lets traffic
    /// the gateway cannot inspect through (`uninspectable: pass|scan_raw`).
    #[serde(with = "humantime_serde")]
    pub client_first_timeout: Duration,
    /// A connection on which nobody (neither the client nor, where the
    /// policy allows opaque traffic, the server) says anything for this long
    /// is closed, with a `refused` event (`silent_client`).
    #[serde(with = "humantime_serde")]
    pub client_silence_timeout: Duration,
    /// Resource limits that hold against a hostile job.
    pub limits: ProxyLimits,
}

/// `proxy.limits`: what one job (one cgroup) and the gateway as a whole may
/// hold. Each limit and what the job sees when it hits it is described in
/// `docs/configuration.md` and `docs/limits.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyLimits {
    /// Concurrent connections one cgroup may hold.
    pub max_connections_per_cgroup: usize,
    /// The most of the gateway's connection capacity (its descriptor table)
    /// one cgroup may hold, in percent.
    pub cgroup_fd_share_percent: u8,
    /// Descriptors kept out of connection admission: for extra upstream
    /// connections, stores, the admin API, logs.
    pub fd_reserve: u64,
    /// Request bodies up to this size are inspected whole before upstream
    /// is contacted; larger ones stream, inspected with hold-back.
    pub max_buffered_body_bytes: usize,
    /// Buffered request body bytes of one connection (all its streams); past
    /// it that connection's further bodies stream early.
    pub max_buffered_per_connection_bytes: usize,
    /// Buffered request body bytes of one cgroup's connections together.
    pub max_buffered_per_cgroup_bytes: usize,
    /// Buffered request body bytes of the whole gateway.
    pub max_buffered_total_bytes: usize,
    /// How long a request waits (not reading its body) for room in the
    /// cgroup's or the gateway's pool before it is refused.
    #[serde(with = "humantime_serde")]
    pub buffer_wait: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Upstream HTTP/1.1 connections open at once per client connection.
    pub max_upstream_per_connection: usize,
    /// An HTTP/1.1 request head must arrive within this (also between
    /// requests of a kept-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// HTTP/1.1 read and write buffer per connection (also the largest
    /// request head).
    pub h1_buffer_bytes: usize,
    /// An HTTP connection without an exchange in progress this long is
    /// closed gracefully (HTTP/2: GOAWAY).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request body that sends nothing this long is aborted (408).
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// A client connection with no exchange in progress this long closes
    /// its idle upstream connections (they are reopened on its next request).
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Longest wait for upstream's response head after a request is sent
    /// (its upload included); past it the job gets 504.
    #[serde(with = "humantime_serde")]
    pub upstream_response_timeout: Duration,
    /// HTTP/2 PING interval towards clients.
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_timeout: Duration,
    /// HTTP/2 receive window per stream granted to clients.
    pub h2_stream_window_bytes: u32,
    /// HTTP/2 receive window per connection granted to clients.
    pub h2_connection_window_bytes: u32,
    /// Response bytes queued per HTTP/2 stream for a client that is not reading.
    pub h2_send_buffer_bytes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        let http = crate::http::Limits::default();
        Self {
            max_connections_per_cgroup: 512,
            cgroup_fd_share_percent: 50,
            fd_reserve: 256,
            max_buffered_body_bytes: http.max_buffered_body,
            max_buffered_per_connection_bytes: http.max_buffered_per_connection,
            max_buffered_per_cgroup_bytes: 64 * 1024 * 1024,
            max_buffered_total_bytes: 256 * 1024 * 1024,
            buffer_wait: http.buffer_wait,
            max_concurrent_streams: http.max_concurrent_streams,
            max_upstream_per_connection: http.max_upstream_per_connection,
            header_read_timeout: http.header_read_timeout,
            h1_buffer_bytes: http.h1_max_buffer,
            idle_timeout: http.idle_timeout.unwrap_or(Duration::from_secs(20)),
            body_idle_timeout: http.body_idle_timeout,
            upstream_idle_timeout: http.upstream_idle_timeout.unwrap_or(Duration::from_secs(5)),
            upstream_response_timeout: http.response_timeout,
            h2_keep_alive_interval: http.h2_keep_alive_interval.unwrap_or(Duration::from_secs(30)),
            h2_keep_alive_timeout: http.h2_keep_alive_timeout,
            h2_stream_window_bytes: http.h2_stream_window,
            h2_connection_window_bytes: http.h2_connection_window,
            h2_send_buffer_bytes: http.h2_send_buffer,
        }
    }
}

impl ProxyLimits {
    /// The HTTP engine's limits. Bodies are counted in one pool of
    /// `max_buffered_total_bytes` here; the proxy swaps in per-cgroup pools
    /// nested in it.
    pub fn http(&self, connect_timeout: Duration) -> crate::http::Limits {
        crate::http::Limits {
            max_buffered_body: self.max_buffered_body_bytes,
            max_buffered_per_connection: self.max_buffered_per_connection_bytes,
            body_pool: crate::http::BodyPool::Shared(crate::limits::Budget::new(
                crate::limits::Limit::BufferedTotal,
                self.max_buffered_total_bytes,
            )),
            buffer_wait: self.buffer_wait,
            header_read_timeout: self.header_read_timeout,
            h1_max_buffer: self.h1_buffer_bytes,
            idle_timeout: Some(self.idle_timeout),
            body_idle_timeout: self.body_idle_timeout,
            upstream_idle_timeout: Some(self.upstream_idle_timeout),
            response_timeout: self.upstream_response_timeout,
            h2_keep_alive_interval: Some(self.h2_keep_alive_interval),
            h2_keep_alive_timeout: self.h2_keep_alive_timeout,
            h2_stream_window: self.h2_stream_window_bytes,
            h2_connection_window: self.h2_connection_window_bytes,
            h2_send_buffer: self.h2_send_buffer_bytes,
            connect_timeout,
            max_upstream_per_connection: self.max_upstream_per_connection,
            max_concurrent_streams: self.max_concurrent_streams,
            ..crate::http::Limits::default()
        }
    }

    /// Checks what the schema cannot express.
    fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str| format!("proxy.limits.{name}");
        let positive = [
            ("max_connections_per_cgroup", self.max_connections_per_cgroup),
            ("max_buffered_body_bytes", self.max_buffered_body_bytes),
            ("max_buffered_per_connection_bytes", self.max_buffered_per_connection_bytes),
            ("max_buffered_per_cgroup_bytes", self.max_buffered_per_cgroup_bytes),
            ("max_buffered_total_bytes", self.max_buffered_total_bytes),
            ("max_concurrent_streams", self.max_concurrent_streams as usize),
            ("max_upstream_per_connection", self.max_upstream_per_connection),
            ("h2_send_buffer_bytes", self.h2_send_buffer_bytes),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err((field(name), "must be at least 1".into()));
            }
        }
        if self.h1_buffer_bytes < 8192 {
            return Err((field("h1_buffer_bytes"), "must be at least 8192".into()));
        }
        if !(1..=100).contains(&self.cgroup_fd_share_percent) {
            return Err((field("cgroup_fd_share_percent"), "must be between 1 and 100".into()));
        }
        if self.max_buffered_per_cgroup_bytes > self.max_buffered_total_bytes {
            return Err((field("max_buffered_per_cgroup_bytes"), "must not exceed max_buffered_total_bytes".into()));
        }
        // A window below the protocol's default would stall clients that
        // do not wait for the SETTINGS frame; above 2^31-1 is invalid.
        for (name, value) in [
            ("h2_stream_window_bytes", self.h2_stream_window_bytes),
            ("h2_connection_window_bytes", self.h2_connection_window_bytes),
        ] {
            if !(65_535..=0x7fff_ffff).contains(&value) {
                return Err((field(name), "must be between 65535 and 2147483647".into()));
            }
        }
        for (name, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_idle_timeout", self.body_idle_timeout),
            ("upstream_response_timeout", self.upstream_response_timeout),
            ("h2_keep_alive_interval", self.h2_keep_alive_interval),
            ("h2_keep_alive_timeout", self.h2_keep_alive_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err((field(name), "must be at least 100ms".into()));
            }
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen_v4: Ipv4Addr::LOCALHOST,
            listen_v6: Some(Ipv6Addr::LOCALHOST),
            port: 15001,
            upstream_mark: 0,
            connect_timeout: Duration::from_secs(10),
            attribution_timeout: Duration::from_millis(500),
            client_first_timeout: Duration::from_millis(500),
            client_silence_timeout: Duration::from_secs(30),
            limits: ProxyLimits::default(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines (one object per line).
    pub format: LogFormat,
    /// A tracing filter (`info`, `gateway=debug`...). `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".to_owned() }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Read from this file.
    File(PathBuf),
    /// The file did not exist: embedded defaults.
    Defaults(PathBuf),
}

impl Config {
    /// What the policy is checked against: the approver groups and the
    /// held credentials' entries.
    pub fn policy_context(&self) -> crate::policy::PolicyContext {
        crate::policy::PolicyContext {
            credentials: Some(self.credentials.credentials.clone().into()),
            ..self.approvals.policy_context()
        }
    }

    /// Loads the file named on the command line, which must exist, or, when
    /// none was named, [`DEFAULT_CONFIG_PATH`], whose absence means the
    /// embedded defaults.
    pub fn load_chosen(explicit: Option<&Path>) -> Result<(Config, Source), ConfigError> {
        match explicit {
            Some(path) => match Self::load(path)? {
                (_, Source::Defaults(path)) => Err(ConfigError::Missing { path }),
                loaded => Ok(loaded),
            },
            None => Self::load(Path::new(DEFAULT_CONFIG_PATH)),
        }
    }

    /// The effective configuration as YAML, in the file's own schema (every
    /// field, defaults filled in). Secrets never appear: credentials are
    /// configured as references (`file`, `env`, `command`), and the one
    /// inline secret, webhook header values, is written as `[redacted]`.
    pub fn to_yaml(&self) -> Result<String, serde_yaml_ng::Error> {
        serde_yaml_ng::to_string(self)
    }

    /// Loads `path`; a missing file yields the embedded defaults.
    pub fn load(path: &Path) -> Result<(Config, Source), ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse(path, &text)?, Source::File(path.to_owned()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Config::default(), Source::Defaults(path.to_owned())))
            }
            Err(source) => Err(ConfigError::Read { path: path.to_owned(), source }),
        }
    }

    /// Parses and validates a configuration document; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid { path: path.to_owned(), field, reason };
        // An empty document is a valid "all defaults" file.
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            invalid(field, e.into_inner().to_string())
        })?;
        config.validate().map_err(|(field, reason)| invalid(field, reason))?;
        Ok(config)
    }

    /// Checks what the schema cannot express.
    fn validate(&self) -> Result<(), (String, String)> {
        if self.intercept.cgroups.is_empty() {
            return Err(("intercept.cgroups".into(), "at least one cgroup is required".into()));
        }
        for (i, cg) in self.intercept.cgroups.iter().enumerate() {
            let field = format!("intercept.cgroups[{i}].path");
            if cg.path.as_os_str().is_empty() {
                return Err((field, "empty path".into()));
            }
            let rel = cg.path.strip_prefix("/").unwrap_or(&cg.path);
            if rel.as_os_str().is_empty() {
                return Err((
                    field,
                    "the root cgroup is never intercepted: it would capture every process on the host".into(),
                ));
            }
            if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err((field, format!("`{}` must not contain `..` or `.`", cg.path.display())));
            }
        }
        for (i, d) in self.intercept.destinations.iter().enumerate() {
            if d.ports.len() > gateway_common::MAX_PORTS {
                return Err((
                    format!("intercept.destinations[{i}].ports"),
                    format!("at most {} ports per entry", gateway_common::MAX_PORTS),
                ));
            }
            if d.ports.contains(&0) {
                return Err((format!("intercept.destinations[{i}].ports"), "port 0 is not a port".into()));
            }
            if let Target::Host(h) = &d.target {
                if h.is_empty() || h.contains(char::is_whitespace) || h.contains('/') {
                    return Err((format!("intercept.destinations[{i}].host"), format!("`{h}` is not a host name")));
                }
            }
        }
        if self.intercept.capture_ports.len() > gateway_common::MAX_PORTS {
            return Err(("intercept.capture_ports".into(), format!("at most {} ports", gateway_common::MAX_PORTS)));
        }
        if self.intercept.capture_ports.contains(&0) {
            return Err(("intercept.capture_ports".into(), "port 0 is not a port".into()));
        }
        if self.intercept.capture_ports.contains(&self.proxy.port) {
            return Err(("intercept.capture_ports".into(), "must not contain the proxy's own port".into()));
        }
        if self.intercept.netns_scan_interval < Duration::from_millis(100) {
            return Err(("intercept.netns_scan_interval".into(), "must be at least 100ms".into()));
        }
        if self.intercept.dns_refresh < Duration::from_secs(1) {
            return Err(("intercept.dns_refresh".into(), "must be at least 1s".into()));
        }
        if !self.intercept.bpffs_dir.is_absolute() {
            return Err(("intercept.bpffs_dir".into(), "must be an absolute path".into()));
        }
        if self.proxy.port == 0 {
            return Err(("proxy.port".into(), "port 0 is not a port".into()));
        }
        if !self.proxy.listen_v4.is_loopback() {
            return Err((
                "proxy.listen_v4".into(),
                "must be a loopback address: jobs must not reach the proxy from outside".into(),
            ));
        }
        if let Some(v6) = self.proxy.listen_v6 {
            if !v6.is_loopback() {
                return Err(("proxy.listen_v6".into(), "must be the loopback address ::1".into()));
            }
        }
        self.proxy.limits.validate()?;
        if !self.state_dir.is_absolute() {
            return Err(("state_dir".into(), "must be an absolute path".into()));
        }
        self.tls.validate()?;
        self.findings.validate()?;
        self.credentials.validate()?;
        if let Some(addr) = self.api.listen {
            if !addr.ip().is_loopback() {
                return Err(("api.listen".into(), "must be a loopback address".into()));
            }
        }
        self.api.validate()?;
        if let Some(jwks) = &self.api.jwks {
            jwks.validate(&self.credentials.jwt.issuer)?;
        }
        self.approvals.validate()?;
        self.record.validate()?;
        self.fleet.validate()?;
        self.console.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/gw.yaml"), text)
    }

    #[test]
    fn empty_document_is_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.proxy.port, 15001);
        assert_eq!(c.intercept.cgroups[0].path, PathBuf::from("ci-gateway/jobs"));
    }

    #[test]
    fn port_capture_is_on_by_default_and_can_be_turned_off() {
        assert_eq!(parse("").unwrap().intercept.capture_ports, vec![443, 80]);
        assert_eq!(parse("proxy:\n  port: 15002\n").unwrap().intercept.capture_ports, vec![443, 80]);
        assert!(parse("intercept:\n  capture_ports: []\n").unwrap().intercept.capture_ports.is_empty());
        let e = parse("intercept:\n  capture_ports: [443, 15001]\n").unwrap_err().to_string();
        assert!(e.contains("intercept.capture_ports: must not contain the proxy's own port"), "{e}");
        assert_eq!(parse("").unwrap().proxy.upstream_mark, 0, "random at start unless configured");
    }

    #[test]
    fn destinations_parse() {
        let c = parse(
            "intercept:\n  destinations:\n    - cidr: 10.0.0.0/8\n      ports: [443]\n    - cidr: ::1\n    - host: git.internal\n      ports: [22, 443]\n",
        )
        .unwrap();
        assert_eq!(c.intercept.destinations.len(), 3);
        assert_eq!(c.intercept.destinations[1].target, Target::Cidr("::1/128".parse().unwrap()));
        assert_eq!(c.intercept.destinations[2].target, Target::Host("git.internal".into()));
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = parse("proxy:\n  port: 70000\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/gw.yaml: proxy.port: "), "{e}");
        let e = parse("intercept:\n  destinations:\n    - cidr: 10.0.0.0/33\n").unwrap_err().to_string();
        assert!(e.contains("intercept.destinations[0]"), "{e}");
        assert!(e.contains("not an IP network"), "{e}");
        let e = parse("proxy:\n  prot: 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `prot`"), "{e}");
        let e = parse("intercept:\n  cgroups: [{path: /}]\n").unwrap_err().to_string();
        assert!(e.contains("intercept.cgroups[0].path: the root cgroup"), "{e}");
        let e = parse("proxy:\n  listen_v4: 10.1.2.3\n").unwrap_err().to_string();
        assert!(e.contains("proxy.listen_v4: must be a loopback"), "{e}");
        let e =
            parse("proxy:\n  limits:\n    max_buffered_per_cgroup_bytes: 2000\n    max_buffered_total_bytes: 1000\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("proxy.limits.max_buffered_per_cgroup_bytes: must not exceed"), "{e}");
        let e = parse("proxy:\n  limits:\n    cgroup_fd_share_percent: 0\n").unwrap_err().to_string();
        assert!(e.contains("proxy.limits.cgroup_fd_share_percent"), "{e}");
    }

    #[test]
    fn the_packaged_configuration_is_the_embedded_defaults() {
        // deploy/debian/gateway.yaml is what the package installs as
        // /etc/ci-gateway/gateway.yaml: spelling the defaults out must not
        // change them.
        let shipped = parse(include_str!("../../deploy/debian/gateway.yaml")).unwrap();
        assert_eq!(shipped.to_yaml().unwrap(), Config::default().to_yaml().unwrap());
        assert_eq!(shipped.intercept.on_shutdown, ShutdownMode::Enforce);
    }

    #[test]
    fn effective_yaml_loads_back_to_itself() {
        let c =
            parse("proxy:\n  port: 15002\nintercept:\n  destinations:\n    - cidr: 10.0.0.0/8\n      ports: [443]\n")
                .unwrap();
        let yaml = c.to_yaml().unwrap();
        assert_eq!(parse(&yaml).unwrap().to_yaml().unwrap(), yaml);
        assert!(yaml.contains("cidr: 10.0.0.0/8"), "{yaml}");
    }

    #[test]
    fn an_explicit_path_must_exist_the_default_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("typo.yaml");
        let e = Config::load_chosen(Some(&missing)).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { .. }), "{e}");
        let file = dir.path().join("gw.yaml");
        std::fs::write(&file, "proxy:\n  port: 15009\n").unwrap();
        let (c, source) = Config::load_chosen(Some(&file)).unwrap();
        assert_eq!((c.proxy.port, source), (15009, Source::File(file)));
    }

    #[test]
    fn limits_parse_and_reach_the_http_engine() {
        let c = parse("proxy:\n  connect_timeout: 3s\n  limits:\n    idle_timeout: 7s\n    max_buffered_body_bytes: 4096\n    h2_stream_window_bytes: 70000\n")
            .unwrap();
        let http = c.proxy.limits.http(c.proxy.connect_timeout);
        assert_eq!(http.idle_timeout, Some(Duration::from_secs(7)));
        assert_eq!(http.max_buffered_body, 4096);
        assert_eq!(http.h2_stream_window, 70_000);
        assert_eq!(http.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.proxy.limits.max_connections_per_cgroup, 512, "the rest keep their defaults");
    }
}
