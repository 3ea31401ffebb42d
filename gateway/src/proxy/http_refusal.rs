//! Refusals in the form each HTTP client displays.
//!
//! A refusal only helps if the job's log shows it. Clients print very
//! different parts of an error response: git prints a `text/plain` body as
//! `remote:` lines and nothing of a JSON one; the OpenAI and Anthropic SDKs
//! print their provider's `{"error": {"message": …}}`; gRPC clients read
//! only `grpc-status`/`grpc-message` (an HTTP 403 becomes "Received http2
//! header with status: 403"); Connect clients read their own JSON error;
//! npm prints the body's `error` string; pip prints the status line's reason
//! phrase. So the shape is chosen from the request itself (what it is, not
//! a configuration string that could disagree with it): [`ClientKind::of`],
//! then [`render`]. Whatever the shape, the message is
//! [`Refusal::message`]: it names the finding or rule and what to do.

use bytes::{BufMut as _, Bytes, BytesMut};
use http::{header, HeaderValue, StatusCode};
use serde_json::json;

use crate::enforce::{Reason, Refusal, Uninspectable};

/// The kind of client a request comes from, as far as its error display
/// goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientKind {
    /// git's smart HTTP (`text/plain`, printed as `remote:` lines).
    Git,
    /// An OpenAI-style API (`{"error": {"message", "type", "code"}}`).
    OpenAi,
    /// An Anthropic-style API (`{"type": "error", "error": {…}}`).
    Anthropic,
    /// gRPC or gRPC-Web: trailers-only, `grpc-status` and `grpc-message`.
    Grpc,
    /// A Connect unary call: HTTP error status, Connect's JSON error.
    ConnectUnary,
    /// A Connect streaming call: HTTP 200 and an end-of-stream message,
    /// in the content type of the request (`json`: `connect+json`).
    ConnectStream {
        /// The request was `application/connect+json` (else `+proto`).
        json: bool,
    },
    /// npm, pnpm, yarn: the JSON body's `error` string is printed.
    Npm,
    /// pip: the status line's reason phrase is printed.
    Pip,
    /// Anything else: the gateway's JSON.
    Generic,
}

/// Request paths of OpenAI- and Anthropic-style APIs (also below a prefix,
/// as Azure's `/openai/deployments/<name>/chat/completions`).
const AI_PATHS: &[&str] =
    &["/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/moderations"];

impl ClientKind {
    /// Which client sent this request head.
    pub(crate) fn of(parts: &http::request::Parts) -> ClientKind {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        let content_type = header("content-type").to_ascii_lowercase();
        let agent = header("user-agent");
        let path = parts.uri.path();
        if content_type.starts_with("application/grpc") {
            return ClientKind::Grpc;
        }
        if content_type.starts_with("application/connect+") {
            return ClientKind::ConnectStream { json: content_type.starts_with("application/connect+json") };
        }
        if parts.headers.contains_key("connect-protocol-version") {
            return ClientKind::ConnectUnary;
        }
        let git_path =
            path.ends_with("/info/refs") || path.ends_with("/git-upload-pack") || path.ends_with("/git-receive-pack");
        if agent.starts_with("git/") || git_path {
            return ClientKind::Git;
        }
        let anthropic = parts.headers.contains_key("anthropic-version")
            || agent.starts_with("Anthropic/")
            || agent.starts_with("AsyncAnthropic/")
            || path.ends_with("/v1/messages");
        if anthropic {
            return ClientKind::Anthropic;
        }
        let openai = agent.starts_with("OpenAI/")
            || agent.starts_with("AsyncOpenAI/")
            || parts.headers.contains_key("openai-organization")
            || parts.headers.contains_key("openai-project")
            || AI_PATHS.iter().any(|p| path.ends_with(p));
        if openai {
            return ClientKind::OpenAi;
        }
        if ["npm/", "pnpm/", "yarn/"].iter().any(|p| agent.starts_with(p)) {
            return ClientKind::Npm;
        }
        if agent.starts_with("pip/") {
            return ClientKind::Pip;
        }
        ClientKind::Generic
    }
}

/// The HTTP status saying what kind of refusal it is.
fn status_of(reason: &Reason) -> StatusCode {
    match reason {
        Reason::InvalidToken { .. } => StatusCode::UNAUTHORIZED,
        Reason::AmbiguousPath { .. } | Reason::AmbiguousHost { .. } => StatusCode::BAD_REQUEST,
        Reason::Uninspectable(Uninspectable::Body { .. }) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        // Not the job's fault, and temporary: clients that retry should.
        Reason::RecordingUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    }
}

/// The gRPC status code (and Connect's name for it) of a refusal.
fn rpc_code(reason: &Reason) -> (u16, &'static str) {
    match status_of(reason) {
        StatusCode::UNAUTHORIZED => (16, "unauthenticated"),
        StatusCode::BAD_REQUEST => (3, "invalid_argument"),
        StatusCode::SERVICE_UNAVAILABLE => (14, "unavailable"),
        _ => (7, "permission_denied"),
    }
}

/// The error `type` of the AI providers' shapes.
fn ai_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::SERVICE_UNAVAILABLE => "api_error",
        _ => "invalid_request_error",
    }
}

/// gRPC's `grpc-message` encoding: every byte outside printable ASCII, and
/// `%`, percent-encoded (gRPC over HTTP/2, "Responses").
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Renders `refusal` as the response `client` displays.
pub(crate) fn render(refusal: &Refusal, client: ClientKind) -> http::Response<Bytes> {
    let status = status_of(&refusal.reason);
    let message = refusal.message();
    let code = refusal.reason.code();
    let mut response = match client {
        ClientKind::Grpc => {
            // Trailers-only: the status travels in the only HEADERS frame.
            let mut r = http::Response::new(Bytes::new());
            let grpc_message = percent_encoding::utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(rpc_code(&refusal.reason).0));
            if let Ok(v) = HeaderValue::from_str(&grpc_message) {
                h.insert("grpc-message", v);
            }
            return r;
        }
        ClientKind::ConnectStream { json } => {
            // An end-of-stream message (flag 0x02) carrying the error.
            let end = json!({ "error": { "code": rpc_code(&refusal.reason).1, "message": message } }).to_string();
            let mut body = BytesMut::with_capacity(5 + end.len());
            body.put_u8(0x02);
            body.put_u32(u32::try_from(end.len()).unwrap_or(u32::MAX));
            body.put_slice(end.as_bytes());
            let mut r = http::Response::new(body.freeze());
            // The client checks that the response keeps its codec; the
            // end-of-stream message is JSON whatever the codec.
            let codec = if json { "application/connect+json" } else { "application/connect+proto" };
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(codec));
            return r;
        }
        ClientKind::ConnectUnary => {
            let body = json!({ "code": rpc_code(&refusal.reason).1, "message": message });
            crate::enforce::json_response(status, &body)
        }
        ClientKind::Git => {
            let mut r = http::Response::new(Bytes::from(wrap(&message, 76)));
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        }
        ClientKind::OpenAi | ClientKind::Anthropic => {
            let mut error = json!({ "message": message, "type": ai_type(status), "code": code, "param": null });
            merge_detail(&mut error, refusal);
            let body = match client {
                ClientKind::Anthropic => json!({ "type": "error", "error": error }),
                _ => json!({ "error": error }),
            };
            crate::enforce::json_response(status, &body)
        }
        ClientKind::Npm | ClientKind::Pip | ClientKind::Generic => {
            // npm prints `error` when it is a string: the message, then.
            let mut body = match client {
                ClientKind::Npm => json!({ "error": message, "code": code, "conn_id": refusal.conn_id }),
                _ => json!({ "error": code, "message": message, "conn_id": refusal.conn_id }),
            };
            merge_detail(&mut body, refusal);
            crate::enforce::json_response(status, &body)
        }
    };
    if client == ClientKind::Pip {
        // pip shows "403 Client Error: <reason phrase> for url: …" (HTTP/1 only).
        let phrase: String = message.chars().map(|c| if c.is_ascii_graphic() { c } else { ' ' }).collect();
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase.into_bytes()) {
            response.extensions_mut().insert(phrase);
        }
    }
    response
}

/// Adds the refusal's details (finding ids, rule, approval) beside the
/// fields a shape requires, without replacing them.
fn merge_detail(body: &mut serde_json::Value, refusal: &Refusal) {
    if let (Some(body), serde_json::Value::Object(detail)) = (body.as_object_mut(), refusal.detail()) {
        for (k, v) in detail {
            body.entry(k).or_insert(v);
        }
    }
}

/// `text` in lines of at most `width` characters (longer words alone on
/// theirs), ending with a newline: git prints each line after `remote: `.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.chars().count() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.chars().count();
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::BlockedFinding;

    fn head(path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method("POST").uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn blocked() -> Refusal {
        let finding = BlockedFinding {
            id: Some("F-7".into()),
            rule: "openai-project-key".into(),
            location: "header:authorization".into(),
            fingerprint: "fp".into(),
            preview: "sk-p…".into(),
        };
        Refusal { conn_id: 3, reason: Reason::StaticCredential { findings: vec![finding], more: 0 } }
    }

    #[test]
    fn the_shape_follows_the_request() {
        use ClientKind::*;
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], ClientKind);
        let cases: &[Case<'_>] = &[
            ("/repo.git/info/refs?service=git-upload-pack", &[], Git),
            ("/repo.git/git-receive-pack", &[("user-agent", "git/2.47.3")], Git),
            ("/x", &[("user-agent", "git/2.47.3")], Git),
            ("/v1/chat/completions", &[], OpenAi),
            ("/openai/deployments/d/chat/completions", &[], OpenAi),
            ("/v1/models", &[("user-agent", "OpenAI/Python 1.99.0")], OpenAi),
            ("/v1/messages", &[], Anthropic),
            ("/v1/complete", &[("anthropic-version", "2023-06-01")], Anthropic),
            ("/pkg.Svc/Call", &[("content-type", "application/grpc+proto")], Grpc),
            ("/pkg.Svc/Call", &[("content-type", "application/grpc-web+proto")], Grpc),
            ("/pkg.Svc/Call", &[("content-type", "application/connect+proto")], ConnectStream { json: false }),
            ("/pkg.Svc/Call", &[("content-type", "application/connect+json")], ConnectStream { json: true }),
            ("/pkg.Svc/Call", &[("content-type", "application/json"), ("connect-protocol-version", "1")], ConnectUnary),
            ("/left-pad", &[("user-agent", "npm/11.1.0 node/v20.0.0 linux x64")], Npm),
            ("/simple/requests/", &[("user-agent", "pip/23.2.1 {\"ci\":null}")], Pip),
            ("/v1/search", &[("user-agent", "curl/8.0")], Generic),
        ];
        for (path, headers, want) in cases {
            assert_eq!(ClientKind::of(&head(path, headers)), *want, "{path} {headers:?}");
        }
    }

    #[test]
    fn grpc_is_trailers_only_with_a_percent_encoded_message() {
        let r = render(&blocked(), ClientKind::Grpc);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.body().is_empty(), "trailers-only: no body");
        assert_eq!(r.headers()["grpc-status"], "7");
        let message = r.headers()["grpc-message"].to_str().expect("ascii");
        assert!(message.contains("F-7"), "{message}");
        let decoded = percent_encoding::percent_decode_str(message).decode_utf8().expect("utf8");
        assert_eq!(decoded, blocked().message());
    }

    #[test]
    fn every_shape_carries_the_finding_id() {
        for kind in [
            ClientKind::Git,
            ClientKind::OpenAi,
            ClientKind::Anthropic,
            ClientKind::ConnectUnary,
            ClientKind::ConnectStream { json: false },
            ClientKind::Npm,
            ClientKind::Pip,
            ClientKind::Generic,
        ] {
            let r = render(&blocked(), kind);
            let body = String::from_utf8_lossy(r.body());
            assert!(body.contains("F-7"), "{kind:?}: {body}");
        }
        let openai: serde_json::Value = serde_json::from_slice(render(&blocked(), ClientKind::OpenAi).body()).unwrap();
        assert_eq!(openai["error"]["type"], "permission_error");
        assert!(openai["error"]["message"].as_str().unwrap().contains("F-7"));
        let anthropic: serde_json::Value =
            serde_json::from_slice(render(&blocked(), ClientKind::Anthropic).body()).unwrap();
        assert_eq!(anthropic["type"], "error");
        let npm: serde_json::Value = serde_json::from_slice(render(&blocked(), ClientKind::Npm).body()).unwrap();
        assert!(npm["error"].as_str().unwrap().contains("F-7"));
        let connect = render(&blocked(), ClientKind::ConnectStream { json: false });
        assert_eq!(connect.headers()[header::CONTENT_TYPE], "application/connect+proto");
        assert_eq!(connect.body()[0], 0x02, "end-of-stream flag");
        let end: serde_json::Value = serde_json::from_slice(&connect.body()[5..]).unwrap();
        assert_eq!(end["error"]["code"], "permission_denied");
        let pip = render(&blocked(), ClientKind::Pip);
        let phrase = pip.extensions().get::<hyper::ext::ReasonPhrase>().expect("reason phrase");
        assert!(String::from_utf8_lossy(phrase.as_bytes()).contains("F-7"));
        let git = render(&blocked(), ClientKind::Git);
        assert!(git.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
        assert!(String::from_utf8_lossy(git.body()).lines().all(|l| l.len() <= 76));
    }
}
