"""An HTTP proxy in front of a real registry that can lie: it flips bytes in blob range responses.

Test support for "a source that returns wrong bytes". Every request is forwarded to the registry as it
came (method, path, headers); the answer goes back with the same status and headers, but a 206 answer
to `GET /v2/<repo>/blobs/<digest>` may first have bytes flipped, where `policy` says:

    proxy.policy = lambda digest, start, end, seen: [blob offsets to flip]

`start`/`end` are the blob byte range the answer holds (end exclusive, from Content-Range), and `seen`
how many answers for exactly this range the proxy sent before (0 the first time). Every flip is kept in
`flips` as (digest, blob offset), so a test knows precisely which bytes were wrong.

It runs in threads of the test process (`with CorruptingProxy(registry.host) as proxy:`), on a port of
its own on 127.0.0.1.

Every request is logged in `requests` as (method, path, Range header or None, status, body bytes sent),
so that a test can also tell what a client asked of the registry (the default policy changes nothing).
"""

from __future__ import annotations

import collections
import http.client
import http.server
import re
import threading
from collections.abc import Callable

Policy = Callable[[str, int, int, int], list[int]]

_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business; the body is re-sent with a length.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
UPSTREAM_TIMEOUT = 30.0


def never(digest: str, start: int, end: int, seen: int) -> list[int]:
    return []


class CorruptingProxy:
    def __init__(self, upstream: str, policy: Policy = never):
        self.upstream = upstream  # "host:port" of the registry (plain HTTP)
        self.policy = policy
        self.flips: list[tuple[str, int]] = []
        self.range_answers = 0  # 206 answers for blobs sent, changed or not
        self.requests: list[tuple[str, str, str | None, int, int]] = []
        self._seen: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CorruptingProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="corrupting-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def _tamper(self, path: str, headers: http.client.HTTPMessage, body: bytes) -> bytes:
        match = _BLOB_PATH.match(path.split("?", 1)[0])
        content_range = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if match is None or content_range is None:
            return body
        digest, start = match.group(1), int(content_range.group(1))
        end = start + len(body)
        with self._lock:
            seen = self._seen[(digest, start, end)]
            self._seen[(digest, start, end)] += 1
            self.range_answers += 1
            offsets = [o for o in self.policy(digest, start, end, seen) if start <= o < end]
            self.flips += [(digest, o) for o in offsets]
        if not offsets:
            return body
        changed = bytearray(body)
        for offset in offsets:
            changed[offset - start] ^= 0xFF
        return bytes(changed)

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as e:
                    self.send_error(502, f"upstream {proxy.upstream}: {e}")
                    return
                finally:
                    upstream.close()
                if self.command == "GET" and response.status == 206:
                    data = proxy._tamper(self.path, response.headers, data)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range"), response.status,
                                           0 if self.command == "HEAD" else len(data)))
                self.send_response(response.status, response.reason)  # adds Server and Date
                for key, value in response.headers.items():
                    if key.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                        self.send_header(key, value)
                # A HEAD answer states the length of the body it does not send.
                self.send_header("Content-Length", response.headers.get("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
                pass  # a test's output is no place for an access log

        return Handler
