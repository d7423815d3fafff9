"""dadi/p2p/httpserver.py, the HTTP/1.1 server of the supernode and the peer server, over real sockets on
loopback with a plain client (http.client, raw sockets): keep-alive, streamed and HEAD responses, bad
requests, failing and short apps, a client hanging up mid-response, and shutdown."""

from __future__ import annotations

import http.client
import socket

import trio

from dadi.p2p import httpserver


async def _app(scope, receive, send):
    """/big: 1 MiB; /stream: chunked lines; /boom: raises; /short: claims 10 bytes, sends 3;
    /wait: streams until the client hangs up, then records it; /echo: the request body."""
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/echo":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"line {i}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/short":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
    elif path == "/wait":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started\n", "more_body": True})
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        HANGUPS.append(scope["path"])
    else:
        body = b"x" * (1 << 20) if path == "/big" else b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


HANGUPS: list[str] = []


def _serve(client, **options):
    """Run the server on a free port; client(url) in a thread; returns what it returned."""
    result = {}

    async def main():
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(lambda task_status: httpserver.serve(
                _app, "127.0.0.1:0", keep_alive=options.get("keep_alive", 5.0), graceful=1.0,
                shutdown=stop.wait, task_status=task_status))
            result["value"] = await trio.to_thread.run_sync(client, urls[0])
            stop.set()

    trio.run(main)
    return result["value"]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_keep_alive_carries_requests_of_every_kind_over_one_connection():
    def client(url):
        conn = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
        out = []
        for method, path, body in [("GET", "/big", None), ("GET", "/stream", None), ("HEAD", "/big", None),
                                   ("POST", "/echo", b"hello"), ("GET", "/small", None)]:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            out.append((resp.status, resp.getheader("transfer-encoding"), resp.read()))
        sock = conn.sock
        conn.close()
        return out, sock is not None

    out, reused = _serve(client)
    assert out[0] == (200, None, b"x" * (1 << 20))
    assert out[1] == (200, "chunked", b"line 0\nline 1\nline 2\n")
    assert out[2] == (200, None, b"")  # HEAD: the head only
    assert out[3] == (200, None, b"hello")
    assert out[4] == (200, None, b"ok")
    assert reused  # http.client kept one connection: no response closed it


def test_a_failing_app_gets_a_500_and_a_short_one_a_cut_connection():
    def client(url):
        conn = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
        conn.request("GET", "/boom")
        resp = conn.getresponse()
        boom = (resp.status, resp.read())
        conn.request("GET", "/short")
        resp = conn.getresponse()
        try:
            resp.read()
            short = "complete"
        except http.client.IncompleteRead as e:
            short = e.partial
        conn.close()
        return boom, short

    boom, short = _serve(client)
    assert boom[0] == 500 and b"internal error" in boom[1]
    assert short == b"abc"  # 3 of its 10 bytes, then the connection closed: never a complete-looking body


def test_a_request_that_is_not_http_gets_a_400_and_the_connection_closes():
    def client(url):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    data = _serve(client)
    assert data.startswith(b"HTTP/1.1 400 ") and b"bad request" in data


def test_the_app_hears_when_the_client_hangs_up_mid_response():
    HANGUPS.clear()

    def client(url):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
            s.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"started" in s.recv(65536)

    _serve(client)
    assert HANGUPS == ["/wait"]


def test_an_idle_connection_is_closed_after_keep_alive_seconds():
    def client(url):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
            s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # the response, then the server's close after 0.2 s idle
                data += chunk
        return data

    data = _serve(client, keep_alive=0.2)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok")
