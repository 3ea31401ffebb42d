//! `gateway run`: the daemon's start-up (state directory, services,
//! listeners, eBPF programs), its background tasks (DNS refresh, key
//! rotation, policy watch, memory release), SIGHUP reloads and the clean
//! shutdown on SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{require_root, resolve_cgroups};
use crate::{
    config::{self, Config},
    intercept::{self, destinations, Cgroup, InterceptSet, Interceptor, RedirectTarget},
    proxy::{self, Proxy},
};

/// `gateway run`: runs until SIGINT/SIGTERM.
pub fn run(config: &Config) -> anyhow::Result<ExitCode> {
    require_root("gateway run")?;
    // Before any thread exists: threads started later inherit it.
    join_host_cgroup_namespace(config.intercept.cgroup_namespace.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(config.clone()))?;
    Ok(ExitCode::SUCCESS)
}

/// Joins the host's cgroup namespace when the gateway starts in another one.
/// Container runtimes give each container a private cgroup namespace on
/// cgroup-v2 hosts (containerd, CRI-O, Docker's default there), in which
/// `/proc/PID/cgroup` shows paths relative to the container's own cgroup:
/// a job's cgroup would not match the configured (host) paths, and jobs
/// would be neither attributed nor served. The host's init (`/proc/1`,
/// with the host's PID namespace: `hostPID` in Kubernetes) names the host's
/// namespace unless `intercept.cgroup_namespace` names another; joining it
/// needs CAP_SYS_ADMIN, which the gateway has.
fn join_host_cgroup_namespace(configured: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let reference = configured.unwrap_or(std::path::Path::new("/proc/1/ns/cgroup"));
    let ns = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.ino());
    let own = ns(std::path::Path::new("/proc/self/ns/cgroup")).context("reading /proc/self/ns/cgroup")?;
    let target = match ns(reference) {
        Ok(ino) => ino,
        // Init's namespace is unreadable where the gateway does not see the
        // host's init (no host PID namespace) or may not trace it: nothing
        // to compare with, so nothing to join.
        Err(e) if configured.is_none() => {
            tracing::info!(error = %e, "cannot read /proc/1/ns/cgroup; staying in this cgroup namespace (set intercept.cgroup_namespace if the gateway runs in a container's private one)");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading intercept.cgroup_namespace {}", reference.display())),
    };
    if own == target {
        return Ok(());
    }
    let host = std::fs::File::open(reference).with_context(|| format!("opening {}", reference.display()))?;
    nix::sched::setns(host, nix::sched::CloneFlags::CLONE_NEWCGROUP).with_context(|| {
        format!(
            "joining the cgroup namespace {} (the gateway runs in another, where jobs' cgroup paths do not match the \
             configuration; it needs CAP_SYS_ADMIN)",
            reference.display()
        )
    })?;
    tracing::info!(namespace = %reference.display(), "joined the host's cgroup namespace (the gateway was started in another)");
    Ok(())
}

async fn run_async(mut config: Config) -> anyhow::Result<()> {
    if config.proxy.upstream_mark == 0 {
        // A fresh mark per start: a job cannot know it in advance (and the
        // programs only honour it on the gateway's own sockets anyway).
        config.proxy.upstream_mark = rand::random_range(1..=u32::MAX);
    }
    create_private_dir(&config.state_dir)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let cgroups = resolve_cgroups(&config, true)?;
    // Everything that can fail on bad state or configuration comes before
    // the programs are attached.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let services = build_services(&config, &metrics)?;

    // Listen before attaching: from the moment the programs are attached,
    // redirected connections need someone to accept them.
    let listeners = proxy::bind_listeners(&config.proxy).context("binding the proxy listeners")?;
    let admin_listener = match &config.api.admin_socket {
        Some(path) => Some(crate::api::bind_admin(path, config.api.admin_group.as_deref())?),
        None => None,
    };
    let review_listener = match &config.findings.review_socket {
        Some(path) => Some(crate::api::bind_admin(path, Some(config.findings.reviewers_group()))?),
        None => None,
    };
    let target = RedirectTarget {
        v4: config.proxy.listen_v4,
        v6: config.proxy.listen_v6,
        port: config.proxy.port,
        upstream_mark: config.proxy.upstream_mark,
        capture_ports: config.intercept.capture_ports.clone(),
    };
    let mut interceptor = Interceptor::load(&config.intercept.bpffs_dir, target)?;
    if let Err(e) = interceptor.watch_tasks() {
        tracing::warn!(
            error = %format!("{:#}", anyhow::Error::new(e)),
            "cannot watch cgroup moves and namespace changes: jobs leaving the intercepted cgroups are not reported, and new namespaces (containers) are found by scans and refused connects only, so a container's first connects may be refused"
        );
    }

    let hosts = destinations::hosts(&config.intercept.destinations);
    let dns_timeout = std::time::Duration::from_secs(2);
    let resolved = destinations::resolve_all(&hosts, &Default::default(), dns_timeout).await;
    let set = InterceptSet::build(&config.intercept.destinations, &resolved);
    interceptor.set_destinations(&set)?;
    services.gate.destinations.update(&resolved);
    interceptor.attach(&cgroups)?;
    let interceptor = Arc::new(interceptor);
    let shutdown = CancellationToken::new();
    // A configured cgroup removed and created again starts without programs:
    // the watcher puts them back on it.
    let watched = config.intercept.cgroups.iter().cloned().zip(cgroups.iter().cloned()).collect();
    let cgroup_watch = intercept::cgroup_watch::spawn(
        interceptor.clone(),
        intercept::cgroup::cgroup2_mount()?,
        watched,
        shutdown.clone(),
    )
    .context("starting the cgroup watcher")?;
    let counters: std::sync::Weak<dyn crate::metrics::EbpfCounters> =
        Arc::downgrade(&interceptor) as std::sync::Weak<_>;
    metrics.observe_ebpf(counters);
    metrics.observe_runtime(tokio::runtime::Handle::current());
    if config.fleet.enabled() {
        // The shipper keeps its backlog in a counter: a load per scrape.
        metrics.observe_outbox(|| crate::metrics::OutboxBacklog {
            records: crate::fleet::outbox::current_backlog().unwrap_or(0),
            oldest: Some(crate::fleet::outbox::current_oldest_unshipped().map_or(std::time::Duration::ZERO, |t| {
                (time::OffsetDateTime::now_utc() - t).try_into().unwrap_or(std::time::Duration::ZERO)
            })),
        });
    }
    // Before the gateway says it runs: a SIGTERM or SIGHUP sent from then on
    // must reach these handlers, not kill the process with the default
    // action (skipping the clean shutdown and leaving the programs redirecting).
    let signals = Signals::install()?;
    let destinations_count = set.len();

    let refresher = tokio::spawn(refresh_dns(
        interceptor.clone(),
        services.gate.destinations.clone(),
        config.intercept.destinations.clone(),
        hosts,
        resolved,
        config.intercept.dns_refresh,
        shutdown.clone(),
    ));
    let services_identities = services.identities.clone();
    let services_credentials = services.gate.credentials.clone();
    let services_policy = services.gate.policy.clone();
    let minter = services.gate.minter.clone();
    let mut api_task = None;
    if let (Some(addr), Some(minter)) = (config.api.listen, minter.clone()) {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the public API on {addr}"))?;
        tracing::info!(%addr, "public API listening");
        api_task = Some(tokio::spawn(crate::api::serve(listener, minter, metrics.clone(), shutdown.clone())));
    }
    let mut jwks_task = None;
    if let (Some(jwks), Some(minter)) = (config.api.jwks.clone(), minter.clone()) {
        let addr = jwks.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the JWKS listener on {addr}"))?;
        tracing::info!(%addr, tls = jwks.cert_file.is_some(), "JWKS listener serving");
        let server = crate::api::JwksServer::new(listener, &jwks, minter).context("starting the JWKS listener")?;
        jwks_task = Some(tokio::spawn(server.serve(shutdown.clone())));
    }
    if let Some(minter) = minter {
        tokio::spawn(rotate_keys(minter, shutdown.clone()));
    }
    // Always running: a reload (SIGHUP) may bring expiring sources in.
    tokio::spawn(refresh_credentials(services_credentials.clone(), shutdown.clone()));
    let mut admin_task = None;
    if let Some(listener) = admin_listener {
        let lookup = job_identity_lookup(&services, &cgroups);
        let approvals = services.gate.approvals.clone();
        admin_task = Some(tokio::spawn(crate::api::serve_admin(listener, approvals, lookup, shutdown.clone())));
    }
    let mut review_task = None;
    if let Some(listener) = review_listener {
        let store = crate::findings::FindingStore::open(&config.findings.database_path(&config.state_dir))?;
        let group = Some(config.findings.reviewers_group().to_owned());
        let desk = crate::api::ReviewDesk::new(store, services.gate.waivers.clone(), services.gate.notifier.clone());
        review_task = Some(tokio::spawn(crate::api::serve_review(listener, desk, group, shutdown.clone())));
    }
    let console_task = if config.console.listen.is_some() {
        let desk = crate::api::ReviewDesk::new(
            crate::findings::FindingStore::open(&config.findings.database_path(&config.state_dir))?,
            services.gate.waivers.clone(),
            services.gate.notifier.clone(),
        );
        let console = crate::console::ConsoleServices {
            desk,
            approvals: services.gate.approvals.clone(),
            sessions_db: config.record.database_path(&config.state_dir),
            fleet: if config.fleet.enabled() {
                Some(std::sync::Arc::new(crate::console::FleetDesk {
                    config: config.fleet.clone(),
                    host_id: config.fleet.host_id().context("fleet.host_id")?,
                    groups: config.approvals.groups.clone(),
                }))
            } else {
                None
            },
        };
        crate::console::serve_console(&config.console, console, shutdown.clone()).await.context("review console")?
    } else {
        None
    };
    let policy_watch = config.policy.watch.then(|| {
        let handle = services.gate.policy.clone();
        tokio::spawn(crate::policy::watch(handle, config.policy.watch_interval, shutdown.clone()))
    });
    // The outbox to the fleet's central store: its own thread, reading the
    // local stores' committed rows (never on the request path).
    let shipper = if config.fleet.enabled() {
        let shipper = crate::fleet::Shipper::new(&config).context("preparing the fleet shipper")?;
        tracing::info!(host_id = shipper.host_id(), "shipping to the fleet's central store");
        let shipper = shipper.spawn(shutdown.clone()).context("starting the fleet shipper")?;
        // A request held for approval (and every decision) ships at once,
        // not at the next ship_interval: approvers on other hosts see it there.
        let mut events = services.gate.approvals.subscribe();
        let wake_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = wake_shutdown.cancelled() => return,
                    event = events.recv() => match event {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => crate::fleet::outbox::wake(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        if config.fleet.central_approvals {
            // Decisions taken on other hosts' CLIs, through the store.
            let applier = crate::fleet::approvals::Applier::new(&config, services.gate.approvals.clone())
                .context("preparing central approvals")?;
            tokio::spawn(applier.run(shutdown.clone()));
        }
        Some(shipper)
    } else {
        None
    };
    let recorder = services.gate.recorder.clone();
    let fds = proxy::Descriptors::raise().context("raising the descriptor limit")?;
    let proxy = Proxy::new(interceptor.clone(), config.proxy.clone(), services, fds);
    let serving = tokio::spawn(proxy.clone().serve(listeners, shutdown.clone()));
    // Namespaces of jobs that run in their own network namespace (containers,
    // `ip netns`, `unshare -n`): a listener in each, accepted by the same proxy.
    let namespaces = intercept::netns::NamespaceServer::new(
        interceptor.clone(),
        cgroups.clone(),
        intercept::netns::ListenSpec {
            v4: config.proxy.listen_v4,
            v6: config.proxy.listen_v6,
            port: config.proxy.port,
        },
        config.intercept.bring_up_loopback,
        proxy,
    )?;
    let alerts_task = interceptor
        .take_alerts()
        .map(|ring| tokio::spawn(intercept::alerts::run(ring, namespaces.clone(), shutdown.clone())));
    let namespaces_task = tokio::spawn(namespaces.clone().run(config.intercept.netns_scan_interval, shutdown.clone()));
    tokio::spawn(release_freed_memory(shutdown.clone()));
    tokio::spawn(crate::watchdog::run(metrics.clone(), shutdown.clone()));
    tokio::spawn(crate::logging::watch_dropped(shutdown.clone()));
    tracing::info!(
        cgroups = ?cgroups.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        destinations = destinations_count,
        listen_v4 = %config.proxy.listen_v4,
        listen_v6 = ?config.proxy.listen_v6,
        port = config.proxy.port,
        "gateway running"
    );
    // Only now, with the programs attached and every listener bound, may
    // systemd (Type=notify) start the units ordered after this one: a runner
    // started earlier could open connections nobody inspects.
    notify_systemd(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("attached; proxy listening")]);

    let reloadable = Reloadable {
        identities: services_identities,
        credentials: services_credentials,
        mappings: config.identity.mappings.clone(),
        policy: services_policy,
    };
    wait_for_signal(signals, &reloadable).await;
    tracing::info!(mode = ?config.intercept.on_shutdown, "shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let _ = serving.await;
    let _ = namespaces_task.await;
    if let Some(alerts) = alerts_task {
        let _ = alerts.await;
    }
    drop(namespaces);
    let _ = refresher.await;
    if let Some(api) = api_task {
        let _ = api.await;
    }
    if let Some(admin) = admin_task {
        let _ = admin.await;
    }
    if let Some(jwks) = jwks_task {
        let _ = jwks.await;
    }
    if let Some(review) = review_task {
        let _ = review.await;
    }
    if let Some(console) = console_task {
        let _ = console.await;
    }
    if let Some(watch) = policy_watch {
        let _ = watch.await;
    }
    // Connections have drained, so their per-session credentials are being
    // revoked: give the revoke commands a bounded time to finish.
    let unrevoked = tokio::task::spawn_blocking(|| crate::credentials::lease::wait_for_revocations(REVOKE_GRACE))
        .await
        .unwrap_or(0);
    if unrevoked > 0 {
        tracing::error!(unrevoked, "shutting down with per-session credentials still being revoked");
    }
    // Connections have drained: every session record is queued; commit them.
    tokio::task::spawn_blocking(move || recorder.shutdown()).await.context("closing the session recorder")?;
    // It holds the interceptor; it notices the shutdown within 250ms.
    if !matches!(tokio::task::spawn_blocking(move || cgroup_watch.join()).await, Ok(Ok(()))) {
        tracing::error!("the cgroup watcher panicked");
    }
    // What the shipper has not shipped stays behind its cursor for the next start.
    if let Some(shipper) = shipper {
        let _ = tokio::task::spawn_blocking(move || shipper.join()).await;
    }
    let interceptor = Arc::try_unwrap(interceptor)
        .map_err(|_| anyhow::anyhow!("internal error: interceptor still shared at shutdown"))?;
    interceptor.shutdown(config.intercept.on_shutdown)?;
    Ok(())
}

/// How long shutdown waits for revoke commands still running.
const REVOKE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Tells the service manager (`$NOTIFY_SOCKET`, set by systemd for
/// `Type=notify` units) about a state change; without one this does nothing.
/// A failure is logged, not fatal: the gateway works, only systemd's view of
/// it is late (and a unit with `Type=notify` then times out visibly).
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// What SIGHUP reloads: identity mappings, policy and held credentials. A broken
/// new version is reported and the old one stays in force.
#[derive(Clone)]
struct Reloadable {
    identities: Arc<crate::identity::IdentityResolver>,
    credentials: Arc<crate::credentials::CredentialStore>,
    mappings: Option<PathBuf>,
    policy: crate::policy::PolicyHandle,
}

impl Reloadable {
    fn reload(&self) {
        if let Some(path) = &self.mappings {
            match self.identities.reload(path) {
                Ok(()) => tracing::info!(path = %path.display(), "identity mappings reloaded"),
                Err(errors) => {
                    for e in errors {
                        tracing::error!(error = %e, "identity mappings rejected; the previous mappings stay in force");
                    }
                }
            }
        }
        // The policy handle logs its own outcome (and keeps the old policy
        // when the new one is invalid).
        let _ = self.policy.reload();
        match self.credentials.reload() {
            Ok(()) => tracing::info!(entries = self.credentials.len(), "credentials reloaded"),
            Err(e) => tracing::error!(error = %e, "credentials reload failed; the previous credentials stay in force"),
        }
    }
}

/// The signals `gateway run` handles: SIGTERM and SIGINT stop it, SIGHUP reloads.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

async fn wait_for_signal(signals: Signals, reloadable: &Reloadable) {
    let Signals { mut term, mut int, mut hup } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                // Reading files and running credential commands blocks.
                let r = reloadable.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
        }
    }
}

/// Rotates the JWT signing key when due and prunes expired public keys.
/// Reads expiring credentials again ahead of their expiry (each entry's
/// `refresh_before`); checked every second, which costs nothing when no
/// source expires.
async fn refresh_credentials(credentials: Arc<crate::credentials::CredentialStore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        if !credentials.has_expiring() {
            continue;
        }
        let store = credentials.clone();
        // Commands block: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || store.refresh_due(std::time::SystemTime::now())).await;
    }
}

async fn rotate_keys(minter: Arc<crate::credentials::Minter>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
        match minter.rotate_if_due() {
            Ok(Some(kid)) => tracing::info!(kid, "JWT signing key rotated"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "JWT key rotation failed; the current key stays in use"),
        }
    }
}

async fn refresh_dns(
    interceptor: Arc<Interceptor>,
    names: Arc<crate::enforce::DestinationNames>,
    specs: Vec<config::DestinationSpec>,
    hosts: Vec<String>,
    mut resolved: std::collections::HashMap<String, Vec<std::net::IpAddr>>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    if hosts.is_empty() {
        return;
    }
    let mut current = InterceptSet::build(&specs, &resolved);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        resolved = destinations::resolve_all(&hosts, &resolved, std::time::Duration::from_secs(5)).await;
        let next = InterceptSet::build(&specs, &resolved);
        names.update(&resolved);
        if next != current {
            match interceptor.set_destinations(&next) {
                Ok(()) => {
                    tracing::info!(entries = next.len(), "intercept set updated after DNS refresh");
                    current = next;
                }
                Err(e) => tracing::error!(error = %e, "updating the intercept set failed; keeping the previous one"),
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))
}

/// TLS interception, upstream TLS, detector and findings store.
fn build_services(config: &Config, metrics: &Arc<crate::metrics::Metrics>) -> anyhow::Result<proxy::Services> {
    let ca = crate::tls::CertificateAuthority::load_or_create(&config.state_dir)?;
    let leaf_cache = crate::tls::LeafCache::new(ca, config.tls.leaf_validity, config.tls.leaf_cache_size);
    let upstream_tls = Arc::new(crate::tls::UpstreamTls::new(&config.tls)?);
    let detector = Arc::new(crate::detect::Detector::new(&config.detect)?);
    let fingerprint_key = Arc::new(crate::detect::FingerprintKey::load_or_create(&config.state_dir)?);
    let db = config.findings.database_path(&config.state_dir);
    let findings = crate::findings::FindingsHandle::open(&db)?;
    let waivers = crate::findings::WaiverSet::default();
    let notifier = crate::findings::Notifier::start(
        config.findings.webhook.as_ref(),
        Some(crate::tls::UpstreamTls::new(&config.tls)?),
    )
    .map_err(|e| anyhow::anyhow!("findings.webhook: {e}"))?;
    crate::findings::allowlist::start_refresher(crate::findings::FindingStore::open(&db)?, waivers.clone())?;
    tracing::info!(rules = detector.rule_count(), findings = %db.display(), "detector and findings store ready");
    let identities = Arc::new(crate::identity::IdentityResolver::new(&config.identity));
    if let Some(path) = &config.identity.mappings {
        identities.reload(path).map_err(|errors| {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("identity mappings:\n  {}", text.join("\n  "))
        })?;
    }
    let credentials = Arc::new(
        crate::credentials::CredentialStore::load(config.credentials.credentials.clone())
            .map_err(|e| anyhow::anyhow!("credentials: {e}"))?,
    );
    let minter = crate::credentials::Minter::open(
        &config.credentials.jwt,
        &config.credentials.jwt.key_dir(&config.state_dir),
        Arc::new(crate::credentials::SystemClock),
    )?;
    let oidc = if config.credentials.oidc.is_empty() {
        None
    } else {
        let validator = crate::credentials::OidcValidator::new(
            config.credentials.oidc.clone(),
            Arc::new(crate::credentials::SystemClock),
            Some(crate::tls::UpstreamTls::new(&config.tls)?),
        )?;
        Some(Arc::new(validator))
    };
    let policy = crate::policy::PolicyHandle::load_in(&config.policy, config.policy_context()).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("policy:\n  {}", text.join("\n  "))
    })?;
    let approvals = crate::approval::Approvals::open(
        &config.approvals,
        &config.state_dir,
        Some(crate::tls::UpstreamTls::new(&config.tls)?),
    )?;
    // With a central store the outbox owns local session retention, and
    // prunes only what it shipped (fleet::outbox): the recorder's own pruner,
    // which knows nothing of shipping, must never delete a session whose
    // records have not reached the store (an outage longer than the
    // retention would lose them). Its cutoff (now - MAX) is before 1970:
    // it deletes nothing.
    let record_config = if config.fleet.enabled() {
        crate::record::RecordConfig { retention: std::time::Duration::MAX, ..config.record.clone() }
    } else {
        config.record.clone()
    };
    let recorder = crate::record::Recorder::open(&record_config, &config.state_dir)?;
    metrics.observe_recorder(recorder.clone());
    tracing::info!(
        policy = %policy.current().short_digest(),
        rules = policy.current().len(),
        sessions = ?recorder.path(),
        "policy, approvals and session recording ready"
    );
    let masks = crate::enforce::MaskCache::new(detector.clone()).context("building the recording masker")?;
    // From here on the log holds traffic: it is masked like a recording.
    crate::mask::log::install(masks.recording().clone());
    // A mask naming an unknown detector rule would refuse every response it
    // covers: better not to start. (After a reload the same error is
    // logged and those responses are refused.)
    let current = policy.current();
    for (id, rule) in current.masks().iter().enumerate() {
        masks.get(&current, id, rule).map_err(|e| anyhow::anyhow!("policy: mask #{id}: {e}"))?;
    }
    drop(current);
    let protected = crate::enforce::ProtectedNames::new(
        config
            .tls
            .intercept
            .iter()
            .cloned()
            .chain(crate::intercept::destinations::hosts(&config.intercept.destinations)),
    );
    let gate = crate::enforce::Gate {
        protected,
        destinations: Default::default(),
        metrics: metrics.clone(),
        masks,
        policy,
        approvals,
        recorder,
        record_body_cap: config.record.max_body_bytes,
        detector,
        fingerprint_key,
        findings,
        actions: config.findings.clone(),
        waivers,
        notifier,
        body_limits: crate::detect::http_scan::BodyLimits::from_config(&config.detect),
        credentials,
        minter: Some(Arc::new(minter)),
        oidc,
        oidc_header: http::HeaderName::from_bytes(config.credentials.oidc_header.as_bytes())
            .context("credentials.oidc_header")?,
    };
    let attestations = if config.identity.attestation_cache {
        match intercept::ExecWatch::load() {
            Ok(watch) => Some(Arc::new(crate::identity::AttestationCache::new(Arc::new(watch)))),
            Err(e) => {
                tracing::warn!(
                    error = %format!("{:#}", anyhow::Error::new(e)),
                    "cannot track process exec/exit: every connection is attested in full"
                );
                None
            }
        }
    } else {
        None
    };
    Ok(proxy::Services {
        tls: config.tls.clone(),
        leaf_cache,
        upstream_tls,
        gate: Arc::new(gate),
        attestor: Arc::new(crate::identity::Attestor::new(&config.identity.attest_config())),
        attestations,
        identities,
        containers: Arc::new(config.identity.container_runtimes()),
        http_limits: config.proxy.limits.http(config.proxy.connect_timeout),
    })
}

/// For the admin API's self-approval check: the identity of a process that
/// runs inside an intercepted cgroup (a CI job), `None` for anything else
/// (an operator's shell), so that an unmapped operator is not mistaken for
/// an unmapped job.
fn job_identity_lookup(services: &proxy::Services, cgroups: &[Cgroup]) -> crate::api::IdentityLookup {
    let attestor = services.attestor.clone();
    let identities = services.identities.clone();
    let containers = services.containers.clone();
    let intercepted: Vec<String> = cgroups.iter().map(|c| c.name.clone()).collect();
    Arc::new(move |pid: u32| {
        let cgroup = intercept::cgroup::cgroup_of(pid)?;
        let inside = intercepted.iter().any(|c| cgroup == *c || cgroup.starts_with(&format!("{c}/")));
        if !inside {
            return None;
        }
        let record = crate::identity::record_for_live_pid(pid).ok()?;
        let mut attestation = attestor.attest(&record);
        // The same identity the proxy would give: rules may select on the
        // container's name and image. Called on the blocking pool.
        if let (crate::identity::Attestation::Attested(a), Ok(runtime)) =
            (&mut attestation, tokio::runtime::Handle::try_current())
        {
            runtime.block_on(containers.enrich(a));
        }
        Some(identities.resolve(&attestation).uri)
    })
}

/// One gateway per state directory: a second one would fight over the pins.
fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("gateway.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!("{}: another gateway is running with this state directory ({e})", path.display())
    })
}

/// Hands memory freed after a burst (a hostile job's thousand connections,
/// large bodies) back to the system. glibc keeps freed memory in its
/// per-thread arenas, so without this the gateway's RSS stays at its peak
/// long after the load is gone; `malloc_trim` walks the arenas, which takes
/// well under a millisecond at idle.
async fn release_freed_memory(shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only touches the allocator's own state and is
        // thread-safe in glibc.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
