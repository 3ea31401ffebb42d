//! Announces approval events to an HTTP(S) endpoint (chat bot, paging...).
//!
//! Deliveries run on one background task, in event order, each attempt
//! bounded by the configured timeout; a slow or failing endpoint only delays
//! other deliveries and is logged, never felt by held requests or approvers.
//! A failed delivery (no answer, connection error, 429, 5xx) is retried
//! `retries` times with doubling pauses, so a chat bridge restarting does
//! not lose announcements; the database stays the record of truth.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::mpsc};

use super::{service::TARGET, ApprovalError, ApprovalEvent, WebhookConfig};
use crate::tls::UpstreamTls;

/// Events waiting for delivery before new ones are dropped (and logged).
const QUEUE: usize = 1024;

/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Checks `approvals.webhook`; errors are (field, reason).
pub(crate) fn validate(hook: &WebhookConfig) -> Result<(), (String, String)> {
    Target::parse(hook, None).map(drop)
}

/// Sends events to the webhook from a background task.
#[derive(Debug)]
pub(crate) struct Webhook {
    tx: mpsc::Sender<Bytes>,
}

impl Webhook {
    /// Starts the delivery task on the current tokio runtime.
    pub(crate) fn start(hook: &WebhookConfig, tls: Option<UpstreamTls>) -> Result<Webhook, ApprovalError> {
        let target =
            Target::parse(hook, tls).map_err(|(field, reason)| ApprovalError::Webhook(format!("{field}: {reason}")))?;
        if target.https && target.tls.is_none() {
            return Err(ApprovalError::Webhook("an https URL needs the gateway's upstream TLS settings".into()));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ApprovalError::Webhook("the webhook sender needs a tokio runtime".into()))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        runtime.spawn(deliver_all(target, rx));
        Ok(Webhook { tx })
    }

    /// Queues an already encoded JSON body for delivery; `what` names it in
    /// the log if the backlog is full.
    pub(crate) fn send_body(&self, body: Bytes, what: &str) {
        if self.tx.try_send(body).is_err() {
            tracing::warn!(target: TARGET, what, "webhook backlog full (or sender stopped); event not delivered");
        }
    }

    /// Queues `event` for delivery.
    pub(crate) fn send(&self, event: &ApprovalEvent) {
        let body = match serde_json::to_vec(event) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(target: TARGET, error = %e, "cannot encode an approval event for the webhook");
                return;
            }
        };
        if self.tx.try_send(body).is_err() {
            tracing::warn!(
                target: TARGET,
                id = %event.approval.id, event = ?event.kind,
                "approval webhook backlog full (or sender stopped); event not delivered"
            );
        }
    }
}

struct Target {
    uri: Uri,
    host: String,
    port: u16,
    https: bool,
    headers: HeaderMap,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    tls: Option<UpstreamTls>,
}

impl Target {
    fn parse(hook: &WebhookConfig, tls: Option<UpstreamTls>) -> Result<Target, (String, String)> {
        let url_err = |reason: String| ("url".to_owned(), reason);
        let uri: Uri = hook.url.parse().map_err(|e| url_err(format!("`{}` is not a URL: {e}", hook.url)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(url_err(format!("`{}`: only http:// and https:// URLs are supported", hook.url))),
        };
        let host =
            uri.host().filter(|h| !h.is_empty()).ok_or_else(|| url_err(format!("`{}` has no host", hook.url)))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(url_err("put credentials in `headers`, not in the URL (it is logged)".into()));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if hook.timeout.is_zero() {
            return Err(("timeout".into(), "must be more than 0s".into()));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &hook.headers {
            let field = format!("headers.{name}");
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (field.clone(), "not a valid header name".to_owned()))?;
            let mut value =
                HeaderValue::from_str(value).map_err(|_| (field.clone(), "not a valid header value".to_owned()))?;
            value.set_sensitive(true);
            if matches!(name, header::HOST | header::CONTENT_LENGTH | header::CONTENT_TYPE | header::TRANSFER_ENCODING)
            {
                return Err((field, "is set by the gateway".to_owned()));
            }
            headers.insert(name, value);
        }
        Ok(Target {
            uri,
            host,
            port,
            https,
            headers,
            timeout: hook.timeout,
            retries: hook.retries,
            backoff: hook.retry_backoff.min(MAX_BACKOFF),
            tls,
        })
    }
}

async fn deliver_all(target: Target, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(body) = rx.recv().await {
        let mut pause = target.backoff;
        for attempt in 0..=target.retries {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            let failure = match tokio::time::timeout(target.timeout, post(&target, body.clone())).await {
                Ok(Ok(status)) if status.is_success() => {
                    tracing::debug!(target: TARGET, %status, attempt, "approval webhook delivered");
                    break;
                }
                Ok(Ok(status)) if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() => {
                    tracing::warn!(target: TARGET, url = %target.uri, %status, "approval webhook refused the event");
                    break;
                }
                Ok(Ok(status)) => format!("answered {status}"),
                Ok(Err(reason)) => reason,
                Err(_) => format!("no answer within {:?}", target.timeout),
            };
            let last = attempt == target.retries;
            tracing::warn!(
                target: TARGET, url = %target.uri, reason = %failure, attempt, retries = target.retries,
                "approval webhook delivery failed{}", if last { "; giving up on this event" } else { "; will retry" }
            );
        }
    }
}

async fn post(target: &Target, body: Bytes) -> Result<StatusCode, String> {
    let authority = target.uri.authority().map_or_else(|| target.host.clone(), |a| a.as_str().to_owned());
    let path = target.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, concat!("ci-gateway/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    request.headers_mut().extend(target.headers.clone());
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(|e| format!("connect: {e}"))?;
    if target.https {
        let tls = target.tls.as_ref().ok_or("no TLS configuration for https")?;
        let stream = tls.connect(tcp, &target.host, Vec::new()).await.map_err(|e| e.to_string())?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Result<StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    // The connection task ends when the response is read and `sender` dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Drain (bounded by the caller's timeout) so the server sees a clean end.
    let _ = response.into_body().collect().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn hook(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            timeout: Duration::from_secs(2),
            headers: BTreeMap::new(),
            retries: 0,
            retry_backoff: Duration::from_millis(10),
        }
    }

    #[test]
    fn urls_and_headers_are_checked() {
        assert!(validate(&hook("https://hooks.example.com/approvals?x=1")).is_ok());
        assert!(validate(&hook("http://[::1]:8080/")).is_ok());
        assert_eq!(validate(&hook("ftp://x/")).unwrap_err().0, "url");
        assert_eq!(validate(&hook("not a url")).unwrap_err().0, "url");
        assert_eq!(validate(&hook("https://user:pw@x/")).unwrap_err().0, "url");
        let mut h = hook("https://x/");
        h.headers.insert("Authorization".into(), "Bearer abc".into());
        assert!(validate(&h).is_ok());
        h.headers.insert("bad header".into(), "v".into());
        assert_eq!(validate(&h).unwrap_err().0, "headers.bad header");
        let mut h = hook("https://x/");
        h.headers.insert("Content-Type".into(), "text/plain".into());
        assert_eq!(validate(&h).unwrap_err().0, "headers.Content-Type");
        let mut h = hook("https://x/");
        h.timeout = Duration::ZERO;
        assert_eq!(validate(&h).unwrap_err().0, "timeout");
    }

    #[test]
    fn debug_output_hides_header_values() {
        let mut h = hook("https://x/");
        h.headers.insert("Authorization".into(), "Bearer s3cr3t-token".into());
        let text = format!("{h:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("Authorization"), "{text}");
    }

    #[tokio::test]
    async fn https_without_tls_settings_is_refused() {
        let err = Webhook::start(&hook("https://x/"), None).unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }
}
