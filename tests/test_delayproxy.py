"""tools/bench/delayproxy.py: the benchmarks' stand-in for netem (this kernel has none).

A real TCP echo server on loopback behind the proxy. What a benchmark relies on: every byte arrives,
in order; each request-answer exchange waits at least the round trip it was given. Only lower bounds
on time are asserted: a slow machine can make the proxy slower, never faster than its delay.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from delayproxy import DelayProxy  # noqa: E402 - tools/bench is not a package


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionError:
            pass  # the proxy went away first


@pytest.fixture
def echo_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = False  # server_close() waits for every connection's thread: no socket outlives the test
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()


def _receive(sock: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = sock.recv(min(1 << 20, size - got))
        assert data, f"connection closed after {got} of {size} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def test_every_byte_arrives_in_order(echo_server):
    payload = os.urandom(4 << 20)
    with DelayProxy(("127.0.0.1", 0), echo_server, rtt=0.005) as proxy:
        with socket.create_connection(proxy.address) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = _receive(sock, len(payload))
            sender.join()
    assert echoed == payload


def test_each_exchange_waits_the_round_trip(echo_server):
    rtt = 0.05
    with DelayProxy(("127.0.0.1", 0), echo_server, rtt=rtt) as proxy:
        started = time.monotonic()
        with socket.create_connection(proxy.address) as sock:
            sock.sendall(b"ping")
            assert _receive(sock, 4) == b"ping"
            first = time.monotonic() - started
            exchanges = []
            for _ in range(3):
                begin = time.monotonic()
                sock.sendall(b"again")
                assert _receive(sock, 5) == b"again"
                exchanges.append(time.monotonic() - begin)
    assert first >= 2 * rtt  # the handshake's round trip, then the request's
    assert min(exchanges) >= rtt
    assert proxy.connections == 1


def test_a_closing_client_ends_the_upstream_connection_too(echo_server):
    with DelayProxy(("127.0.0.1", 0), echo_server, rtt=0.001) as proxy:
        with socket.create_connection(proxy.address) as sock:
            sock.sendall(b"bye")
            assert _receive(sock, 3) == b"bye"
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # the echo server saw EOF and closed; the proxy passed it back


def test_a_negative_round_trip_is_refused():
    with pytest.raises(ValueError, match="must not be negative"):
        DelayProxy(("127.0.0.1", 0), ("127.0.0.1", 1), rtt=-1)
