//! A real HTTPS upstream for end-to-end tests: its own CA (trusted by
//! nothing but the test), HTTP/1.1 and HTTP/2 via ALPN, and a log of every
//! request it received so tests can prove what did (not) reach it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// HTTP version (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
    /// Headers, lowercase names, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

/// A test CA and a server certificate it issued.
pub struct TestPki {
    /// PEM file of the CA certificate.
    pub ca_path: PathBuf,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl TestPki {
    /// A fresh CA and a leaf for `names`, the CA written to `dir/upstream-ca.pem`.
    pub fn new(dir: &Path, names: &[&str]) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Upstream Test CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let ca_path = dir.join("upstream-ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("write ca");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names).expect("leaf params");
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = params.signed_by(&leaf_key, &issuer).expect("leaf cert");
        TestPki {
            ca_path,
            cert: leaf.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        }
    }
}

impl TestPki {
    /// Writes the leaf certificate and its key as PEM files into `dir`, for
    /// servers the tests do not write in Rust: (certificate, key).
    pub fn write_leaf(&self, dir: &Path) -> (PathBuf, PathBuf) {
        use base64::Engine as _;
        let pem = |label: &str, der: &[u8]| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> =
                b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
            format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
        };
        let (cert, key) = (dir.join("leaf.pem"), dir.join("leaf-key.pem"));
        std::fs::write(&cert, pem("CERTIFICATE", self.cert.as_ref())).expect("write the leaf");
        std::fs::write(&key, pem("PRIVATE KEY", self.key.secret_der())).expect("write the leaf key");
        (cert, key)
    }
}

/// The running upstream.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Everything it received.
    pub received: Arc<Mutex<Vec<Received>>>,
    /// What `/leak/...` routes put into their responses.
    pub leak: Arc<Mutex<String>>,
    /// When each chunk of `/stream` responses was handed to the connection.
    pub stream_sent: Arc<Mutex<Vec<SystemTime>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Upstream {
    /// Starts an HTTPS server on `addr` with the PKI's leaf.
    ///
    /// Routes: `/stream` sends five chunks 300 ms apart; `/git/...` answers
    /// 401 with a Basic challenge unless credentials are present; `/big`
    /// consumes the body and answers with its length; anything else answers
    /// 200 with a small JSON body. `/leak/stream` streams `leak` split
    /// across two chunks 200 ms apart; `/leak/gzip` answers a gzip JSON
    /// document holding `leak` and a `password` field. `/echo/...` answers
    /// with the request's body and content type.
    pub fn start(addr: SocketAddr, pki: &TestPki) -> Upstream {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let received = Arc::new(Mutex::new(Vec::new()));
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let log = received.clone();
        let leak = Arc::new(Mutex::new(String::new()));
        let leaked = leak.clone();
        let stream_sent = Arc::new(Mutex::new(Vec::new()));
        let sent = stream_sent.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                let log = log.clone();
                let leaked = leaked.clone();
                let sent = sent.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service =
                        hyper::service::service_fn(move |req| handle(req, log.clone(), leaked.clone(), sent.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Upstream { addr, received, leak, stream_sent, _runtime: runtime }
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
    leak: Arc<Mutex<String>>,
    stream_sent: Arc<Mutex<Vec<SystemTime>>>,
) -> Result<hyper::Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect::<Vec<_>>();
    let has_auth = parts.headers.contains_key(hyper::header::AUTHORIZATION);
    let path = parts.uri.path().to_owned();
    // /big counts instead of keeping a gigabyte in memory.
    let mut body_bytes = Vec::new();
    let mut len = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if path != "/big" {
                body_bytes.extend_from_slice(&data);
            }
        }
    }
    let echo = path.starts_with("/echo/").then(|| body_bytes.clone());
    log.lock().expect("log").push(Received {
        method: parts.method.to_string(),
        target,
        version: format!("{:?}", parts.version),
        headers,
        body: body_bytes,
    });
    let leak = leak.lock().expect("leak").clone();
    let response = if let Some(body) = echo {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
        if let Some(ct) = parts.headers.get(hyper::header::CONTENT_TYPE) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, ct.clone());
        }
        r
    } else if path == "/leak/stream" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
        let (a, b) = leak.split_at(leak.len() / 2);
        let chunks = [format!("{{\"token\": \"{a}"), format!("{b}\", \"n\": 1}}\n")];
        tokio::spawn(async move {
            for c in chunks {
                if tx.send(Ok(Frame::data(Bytes::from(c)))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        hyper::Response::new(StreamBody::new(tokio_stream_from(rx)).boxed())
    } else if path == "/leak/gzip" {
        use std::io::Write as _;
        let doc = format!("{{\"user\": \"ci\", \"password\": \"hunter2-letmein\", \"token\": \"{leak}\"}}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let body = gz.write_all(doc.as_bytes()).and_then(|()| gz.finish()).expect("gzip");
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
        r.headers_mut().insert("content-encoding", hyper::header::HeaderValue::from_static("gzip"));
        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
        r
    } else if path == "/stream" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
        tokio::spawn(async move {
            for i in 0..5 {
                if tx.send(Ok(Frame::data(Bytes::from(format!("chunk {i}\n"))))).await.is_err() {
                    return;
                }
                stream_sent.lock().expect("stream_sent").push(SystemTime::now());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let stream = tokio_stream_from(rx);
        hyper::Response::new(StreamBody::new(stream).boxed())
    } else if path.starts_with("/git/") && !has_auth {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"auth required")).boxed());
        *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        r.headers_mut().insert("www-authenticate", hyper::header::HeaderValue::from_static("Basic realm=\"git\""));
        r
    } else if path == "/big" {
        hyper::Response::new(Full::new(Bytes::from(format!("{{\"received\":{len}}}"))).boxed())
    } else {
        hyper::Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
    };
    Ok(response)
}

/// A `Stream` over an mpsc receiver (avoids a tokio-stream dependency).
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
