"""A fault-injecting HTTP proxy in front of the real Label Studio (127.0.0.1 only).

Requests pass through unchanged until a fault is set for a method and path prefix: answer 500 or 401
instead, forward and then answer 500 anyway (Label Studio stored it, the caller thinks it failed), or
refuse connections altogether.
"""

from __future__ import annotations

import http.server
import socket
import threading

import requests

PASS, FAIL_500, FAIL_401, STORE_THEN_500 = "pass", "500", "401", "store-then-500"


class FaultyProxy:
    """Forward to `upstream`; `fault(mode, method, prefix)` changes how matching requests are answered."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.mode, self.method, self.prefix = PASS, "", ""
        self.hits = 0
        self.upstream_statuses = []
        self.generation = 0
        """Bumped by each fault(): a request started under an earlier fault is not counted under the new one."""
        self.paths: list[str] = []
        """Every request's method and path, in order."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: http.server.ThreadingHTTPServer | None = None
        self.accept()

    def fault(self, mode: str, method: str = "", prefix: str = "") -> None:
        """Answer requests of `method` (any if "") whose path starts with `prefix` according to `mode`."""
        self.mode, self.method, self.prefix, self.hits = mode, method, prefix, 0
        self.upstream_statuses: list[int] = []
        self.generation += 1

    def refuse(self) -> None:
        """Stop listening: connections are refused until accept()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accept(self) -> None:
        """Listen again on the same port, passing requests through."""
        self.fault(PASS)
        if self._server is None:
            self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.refuse()

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self):
                proxy.paths.append(f"{self.command} {self.path}")
                generation = proxy.generation
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                matched = (not proxy.method or self.command == proxy.method) and self.path.startswith(proxy.prefix)
                mode = proxy.mode if matched else PASS
                if matched and mode != PASS:
                    proxy.hits += 1
                if mode in (FAIL_500, FAIL_401):
                    return self._answer(int(mode), b'{"detail": "injected fault"}', "application/json")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = requests.request(self.command, proxy.upstream + self.path, headers=headers, data=body,
                                            allow_redirects=False, timeout=60)
                if matched and generation == proxy.generation:  # a slow request from before fault() is not this one's
                    proxy.upstream_statuses.append(upstream.status_code)
                if mode == STORE_THEN_500 and upstream.ok:
                    return self._answer(500, b'{"detail": "injected fault after storing"}', "application/json")
                self._answer(upstream.status_code, upstream.content, upstream.headers.get("Content-Type", ""),
                             upstream.headers.get("Location"))

            def _answer(self, status: int, body: bytes, content_type: str, location: str | None = None):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _relay

            def log_message(self, *args):
                pass

        return Handler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
