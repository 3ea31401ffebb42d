//! A minimal Pingora TLS reverse proxy, the HTTPS benchmark's third peer
//! (issue 13): terminates TLS with its own leaf, re-encrypts to one origin
//! verified against a CA file and the origin's DNS name (also sent as SNI),
//! with Pingora's pool of kept-alive upstream connections. Nothing else:
//! no filters, no logging. It does what the nginx and HAProxy peers do.
//!
//! Usage: `pingora-bench-proxy LISTEN CERT KEY ORIGIN ORIGIN_NAME CA THREADS DIR`
//! (`DIR` holds Pingora's pid file and upgrade socket). Started and stopped
//! by `benches/benches/https.rs`.

use async_trait::async_trait;
use pingora::{prelude::*, server::configuration::ServerConf, upstreams::peer::HttpPeer};

/// Forwards every request to the one origin.
struct Forward {
    origin: String,
    name: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // TLS to the origin; the certificate is verified (chain against the
        // server's `ca_file`, name against the SNI): PeerOptions' defaults.
        let peer = HttpPeer::new(self.origin.as_str(), true, self.name.clone());
        debug_assert!(peer.options.verify_cert && peer.options.verify_hostname);
        Ok(Box::new(peer))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cert, key, origin, name, ca, threads, dir] = args.as_slice() else {
        eprintln!("usage: pingora-bench-proxy LISTEN CERT KEY ORIGIN ORIGIN_NAME CA THREADS DIR");
        std::process::exit(2);
    };
    let threads: usize = match threads.parse() {
        Ok(n) if n >= 1 => n,
        _ => {
            eprintln!("THREADS must be a positive integer, not {threads}");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads,
        // The only trust anchor for upstream connections.
        ca_file: Some(ca.clone()),
        pid_file: format!("{dir}/pingora.pid"),
        upgrade_sock: format!("{dir}/pingora-upgrade.sock"),
        // SIGTERM stops it at once: there is nothing to drain in a benchmark.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Forward { origin: origin.clone(), name: name.clone() });
    if let Err(e) = service.add_tls(listen, cert, key) {
        eprintln!("listening with TLS on {listen}: {e}");
        std::process::exit(1);
    }
    server.add_service(service);
    server.run_forever();
}
