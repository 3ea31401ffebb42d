"""The quick start's stand-in for Cursor's backend: HTTPS on port 443 as
api2.cursor.sh, answering every POST with a small JSON body. Whatever
reaches it was let through by the gateway; it logs the size, never the
body (a key that got here must not land in a log either)."""

import http.server
import json
import ssl


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"ok": True, "received_bytes": length}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, fmt, *args):
        print("backend: %s %s" % (self.address_string(), fmt % args), flush=True)


server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/pki/server.pem", "/pki/server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
print("backend: api2.cursor.sh listening on 443", flush=True)
server.serve_forever()
