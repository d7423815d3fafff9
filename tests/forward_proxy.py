"""A tiny forwarding HTTP proxy for tests: what a supernode's --upstream-proxy points at.

It takes requests in absolute form (`GET http://HOST:PORT/v2/... HTTP/1.1`, as requests sends them to an
http:// proxy), forwards them to HOST:PORT, and sends the answer back. It records every request it
forwarded (`requests`, `blob_gets()`), so a test can count what reached the registry; `hold` (an Event)
makes blob GETs wait until it is set, and `cut_next` blob GETs are cut short (headers with the full
Content-Length, then half the body, then the connection closes).

It runs in threads of the test process: `with ForwardProxy() as proxy: ... proxy.url`.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import re
import socket
import threading
from urllib.parse import urlsplit

_BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding", "te",
               "trailer", "upgrade"}  # fmt: skip
UPSTREAM_TIMEOUT = 30.0
HOLD_TIMEOUT = 60.0  # a held GET gives up after this (a test that forgot to release it still ends)


class ForwardProxy:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request forwarded
        self.hold: threading.Event | None = None
        self.cut_next = 0
        self.held = threading.Semaphore(0)  # released once per blob GET that starts waiting on `hold`
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._closed = False
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def blob_gets(self) -> list[str]:
        with self._lock:
            return [path for method, path in self.requests if method == "GET" and _BLOB_PATH.match(path)]

    def __enter__(self) -> ForwardProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="forward-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._closed:
            return
        self._closed = True
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:  # kept-alive connections would go on being served: the proxy is gone for them too
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real proxy would

            def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
                pass

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def do_GET(self):
                self._forward()

            def do_HEAD(self):
                self._forward()

            def _forward(self):
                target = urlsplit(self.path)
                if target.scheme != "http" or not target.netloc:
                    self.send_error(400, "absolute http:// URLs only: this is a forwarding proxy")
                    return
                path = target.path + (f"?{target.query}" if target.query else "")
                is_blob_get = self.command == "GET" and _BLOB_PATH.match(target.path) is not None
                with proxy._lock:
                    proxy.requests.append((self.command, target.path))
                    cut = is_blob_get and proxy.cut_next > 0
                    if cut:
                        proxy.cut_next -= 1
                if is_blob_get and proxy.hold is not None:
                    proxy.held.release()
                    proxy.hold.wait(HOLD_TIMEOUT)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(target.netloc, timeout=UPSTREAM_TIMEOUT)
                try:
                    conn.request(self.command, path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for name, value in resp.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(body))
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if cut:
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(body)
                finally:
                    conn.close()

        return Handler
