#!/usr/bin/env python3
"""The quick start's stand-in identity provider, and a scripted sign-in.

The review console signs people in with OpenID Connect only (docs/console.md).
A runner host uses the organisation's provider (Keycloak, Okta, Entra ID,
GitLab...); the quick start has none, so this file plays one, with just
what the console uses: discovery, the authorization code flow with PKCE
(S256 required), an RS256-signed ID token carrying the nonce, and a JWKS.
It knows one user, reviewer@demo.example in group `security-team`, and one
client, the console (its secret is the `pki` volume's console-oidc-secret).
A stand-in for a demo: never put it in front of a real console.

    idp.py serve            listen on 127.0.0.1:15390 (host network)
    idp.py sign-in URL      sign in to the console as a browser would (the
                            consent form submitted), then print the text of
                            the console page at URL
    idp.py session URL      the same, then print the signed-in session as
                            JSON: {"cookie": "name=value", "csrf": token}
                            (tests drive the console with it)

The environment can change the provider (the tests run one per console):
IDP_PORT, IDP_CLIENT_ID, IDP_REDIRECT_URI, IDP_SECRET_FILE, IDP_KEY_FILE,
IDP_EMAIL and IDP_GROUPS (comma-separated).

Signing uses the openssl command (in the demo image), so nothing but
Python's standard library is needed.
"""

import base64
import hashlib
import html
import http.cookiejar
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser

PORT = int(os.environ.get("IDP_PORT", "15390"))
ISSUER = "http://127.0.0.1:%d" % PORT
CLIENT_ID = os.environ.get("IDP_CLIENT_ID", "ci-gateway-demo-console")
REDIRECT_URI = os.environ.get("IDP_REDIRECT_URI", "http://127.0.0.1:15343/auth/callback")
SECRET_FILE = os.environ.get("IDP_SECRET_FILE", "/pki/console-oidc-secret")
KEY_FILE = os.environ.get("IDP_KEY_FILE", "/pki/idp.key")
EMAIL = os.environ.get("IDP_EMAIL", "reviewer@demo.example")
USER = {
    "sub": "demo-" + EMAIL.split("@")[0],
    "email": EMAIL,
    "email_verified": True,
    "preferred_username": EMAIL.split("@")[0],
    "groups": os.environ.get("IDP_GROUPS", "security-team").split(","),
}
CODE_TTL = 60


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks():
    """The public key as a JWK set, from `openssl rsa -modulus`."""
    out = subprocess.run(
        ["openssl", "rsa", "-in", KEY_FILE, "-noout", "-modulus"],
        check=True, capture_output=True, text=True,
    ).stdout
    modulus = bytes.fromhex(out.strip().split("=", 1)[1])
    key = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "demo", "n": b64url(modulus), "e": "AQAB"}
    return {"keys": [key]}


def sign(claims):
    """An RS256 JWT (RSASSA-PKCS1-v1_5 with SHA-256, as `openssl dgst -sign`)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "demo"}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", KEY_FILE],
        input=signing_input.encode(), check=True, capture_output=True,
    ).stdout
    return signing_input + "." + b64url(signature)


class Provider(http.server.BaseHTTPRequestHandler):
    codes = {}
    lock = threading.Lock()
    keys = None
    secret = None

    def log_message(self, fmt, *args):
        # Paths only: queries carry codes and states.
        sys.stdout.write("idp: %s %s\n" % (self.command, self.path.split("?", 1)[0]))

    def reply(self, status, body, content_type="application/json", headers=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, code, description):
        self.reply(status, json.dumps({"error": code, "error_description": description}))

    def form(self):
        length = int(self.headers.get("Content-Length") or 0)
        return dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))

    def authorization_request(self, params):
        """The request's parameters, or why it is refused."""
        if params.get("client_id") != CLIENT_ID:
            return None, "unknown client_id"
        if params.get("redirect_uri") != REDIRECT_URI:
            return None, "redirect_uri is not the console's"
        if params.get("response_type") != "code":
            return None, "only the authorization code flow"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return None, "PKCE with S256 is required"
        if "openid" not in params.get("scope", "").split():
            return None, "scope openid is required"
        return params, None

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/.well-known/openid-configuration":
            self.reply(200, json.dumps({
                "issuer": ISSUER,
                "authorization_endpoint": ISSUER + "/authorize",
                "token_endpoint": ISSUER + "/token",
                "jwks_uri": ISSUER + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email", "profile"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "code_challenge_methods_supported": ["S256"],
                "claims_supported": ["sub", "email", "email_verified", "preferred_username", "groups"],
            }))
        elif url.path == "/jwks":
            self.reply(200, json.dumps(Provider.keys))
        elif url.path == "/authorize":
            params, refused = self.authorization_request(dict(urllib.parse.parse_qsl(url.query)))
            if refused:
                self.reply(400, "<p>%s</p>" % html.escape(refused), "text/html; charset=utf-8")
                return
            hidden = "".join(
                '<input type="hidden" name="%s" value="%s">' % (html.escape(k), html.escape(v))
                for k, v in params.items()
            )
            page = (
                "<!doctype html><title>Demo sign-in</title>"
                "<h1>ci-gateway quick start: stand-in identity provider</h1>"
                "<p>This is not a real identity provider. The review console asks who you are;"
                " sign in as <b>%s</b> (group <code>security-team</code>, console role reviewer).</p>"
                '<form method="post" action="/authorize">%s<button type="submit">Sign in</button></form>'
                % (html.escape(USER["email"]), hidden)
            )
            self.reply(200, page, "text/html; charset=utf-8")
        else:
            self.reply(404, "not found", "text/plain")

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/authorize":
            params, refused = self.authorization_request(self.form())
            if refused:
                self.reply(400, "<p>%s</p>" % html.escape(refused), "text/html; charset=utf-8")
                return
            code = secrets.token_urlsafe(24)
            with Provider.lock:
                Provider.codes[code] = (params, time.time() + CODE_TTL)
            query = {"code": code}
            if "state" in params:
                query["state"] = params["state"]
            self.reply(302, "", "text/plain", [("Location", REDIRECT_URI + "?" + urllib.parse.urlencode(query))])
        elif url.path == "/token":
            self.token()
        else:
            self.reply(404, "not found", "text/plain")

    def token(self):
        form = self.form()
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, client_secret = urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)
        if client_id != CLIENT_ID or not secrets.compare_digest(client_secret or "", Provider.secret):
            self.error(401, "invalid_client", "client authentication failed")
            return
        if form.get("grant_type") != "authorization_code":
            self.error(400, "unsupported_grant_type", "authorization_code only")
            return
        with Provider.lock:
            params, expires = Provider.codes.pop(form.get("code", ""), (None, 0))
        if params is None or expires < time.time():
            self.error(400, "invalid_grant", "unknown or expired code")
            return
        if form.get("redirect_uri") != params["redirect_uri"]:
            self.error(400, "invalid_grant", "redirect_uri differs from the authorization request's")
            return
        verifier = form.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode()).digest()) != params["code_challenge"]:
            self.error(400, "invalid_grant", "PKCE verification failed")
            return
        now = int(time.time())
        claims = dict(USER, iss=ISSUER, aud=CLIENT_ID, iat=now, exp=now + 300)
        if "nonce" in params:
            claims["nonce"] = params["nonce"]
        self.reply(200, json.dumps({
            "access_token": secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": sign(claims),
        }))


def serve():
    Provider.keys = jwks()
    with open(SECRET_FILE) as f:
        Provider.secret = f.read().strip()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Provider)
    print("idp: stand-in identity provider at %s (one user: %s)" % (ISSUER, USER["email"]), flush=True)
    server.serve_forever()


class Text(HTMLParser):
    """A page's visible text (the console's tables, one row per line)."""

    def __init__(self):
        super().__init__()
        self.lines, self.cells, self.skip = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip -= 1
        elif tag in ("tr", "h1", "h2", "p", "li") and self.cells:
            self.lines.append("  ".join(self.cells))
            self.cells = []

    def handle_data(self, data):
        if not self.skip and data.strip():
            self.cells.append(" ".join(data.split()))


class ConsentForm(HTMLParser):
    """The consent form's action and fields, as a browser submits them."""

    def __init__(self):
        super().__init__()
        self.action, self.fields = None, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.action = attrs.get("action")
        elif tag == "input" and attrs.get("name"):
            self.fields[attrs["name"]] = attrs.get("value", "")


class Csrf(HTMLParser):
    """The CSRF token the console puts in every signed-in page's head."""

    def __init__(self):
        super().__init__()
        self.token = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "meta" and attrs.get("name") == "csrf-token":
            self.token = attrs.get("content")


def sign_in(page, session=False):
    """Signs in to the console as a browser does and prints `page`'s text
    (or, with `session`, the session cookie and CSRF token as JSON)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    # The console sends the browser to the provider; the provider shows
    # its consent form.
    with opener.open(page, timeout=30) as response:
        consent = ConsentForm()
        consent.feed(response.read().decode())
        landed = response.geturl()
    if not landed.startswith(ISSUER + "/authorize") or consent.action is None:
        sys.exit("sign-in: the console did not send the browser to the provider (at %s)" % landed)
    # Submitting it sends the browser back to the console's callback,
    # which signs it in and redirects to the console.
    data = urllib.parse.urlencode(consent.fields).encode()
    with opener.open(urllib.parse.urljoin(ISSUER, consent.action), data=data, timeout=30) as response:
        response.read()
    with opener.open(page, timeout=30) as response:
        html_text = response.read().decode()
        if not response.geturl().startswith(page):
            sys.exit("sign-in: not signed in (at %s)" % response.geturl())
    if session:
        csrf = Csrf()
        csrf.feed(html_text)
        cookies = ["%s=%s" % (c.name, c.value) for c in jar if "session" in c.name]
        print(json.dumps({"cookie": "; ".join(cookies), "csrf": csrf.token}))
        return
    text = Text()
    text.feed(html_text)
    print("\n".join(text.lines))


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "serve":
        serve()
    elif len(sys.argv) == 3 and sys.argv[1] in ("sign-in", "session"):
        sign_in(sys.argv[2], session=sys.argv[1] == "session")
    else:
        sys.exit(__doc__)
