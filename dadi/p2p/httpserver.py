"""The HTTP/1.1 server of the supernode and of the node daemon's peer server: their ASGI applications
on trio, with h11 for the protocol.

Why not hypercorn, which served both before: a P2P start is hundreds of 1 MiB responses, and hypercorn's
layers (a task, an event queue and an idle timer per request, the body copied into one buffer with its
head) cost 1.3-1.6 ms of server CPU per 1 MiB response on loopback, against 0.9-1.1 ms for the same
app behind a bare h11 loop (a one-off experiment on the 2-core benchmark machine: 500 responses, the
client in another process). In an 8-node start (tools/bench/p2p.py's setup) the supernode's CPU went from
0.84-0.95 to 0.60-0.64 CPU-s with this server. h11 is the HTTP/1.1 state machine hypercorn itself runs on: it
parses and frames; this module only moves bytes and runs the app.

What it implements of ASGI 3, which is what the two applications use:
- "http" scopes: method, path (percent-decoded), raw_path, query_string, headers (names lowercased),
  client, server, scheme, http_version. No lifespan, websockets or HTTP/2.
- receive(): the request body as http.request messages; after it, http.disconnect once the client has
  hung up (the apps race a response against it, to stop work nobody will read).
- send(): http.response.start, then http.response.body until more_body is false. A body without a
  Content-Length goes out chunked. The head goes out with the first body message, in one write when
  the body is small. Sends after the client went away are dropped.
- An app that ends before its body did gets its connection closed, so the client sees a short body, never
  a complete-looking wrong one; an app that raises before its response started gets a 500.

Connections: HTTP/1.1 keep-alive, at most `keep_alive` seconds idle (which is also how long a request's
head may take to arrive). At shutdown the listeners close, idle connections close at once, and busy
ones get `graceful` seconds to finish the response they are sending.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

import h11
import trio

log = logging.getLogger("dadi.p2p.http")

MAX_RECV = 64 * 1024
MAX_HEAD = 16 * 1024  # bytes of a request line and headers; more is a 431
ONE_WRITE = 64 * 1024  # a head and a body up to this size go out in one send (one packet, no copy to speak of)

App = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def serve(app: App, listen: str, *, keep_alive: float, graceful: float,
                shutdown: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on HOST:PORT until `shutdown()` returns (default: until cancelled); task_status gets
    the bound addresses as http://HOST:PORT (the port is known with port 0)."""
    host, port = split_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _Server(app, keep_alive)
    async with trio.open_nursery() as nursery:
        connections = nursery.cancel_scope
        async with trio.open_nursery() as accepting:
            accepting.start_soon(partial(trio.serve_listeners, server.connection, listeners, handler_nursery=nursery))
            task_status.started([_url(listener.socket.getsockname()) for listener in listeners])
            await (shutdown or trio.sleep_forever)()
            accepting.cancel_scope.cancel()  # serve_listeners closes the listeners as it ends
        server.stop()
        with trio.move_on_after(graceful):
            await server.idle.wait()
        connections.cancel()


def split_listen(listen: str) -> tuple[str | None, int]:
    """HOST:PORT (or [V6]:PORT, or :PORT) as (host or None for every interface, port)."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"listen address {listen!r}: HOST:PORT expected")
    host = host.strip("[]")  # [::1]:8900
    return host or None, int(port)


def _url(sockname: tuple) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server:
    def __init__(self, app: App, keep_alive: float):
        self.app = app
        self.keep_alive = keep_alive
        self.stopping = False
        self.open: set[_Connection] = set()
        self.idle = trio.Event()  # set once stopping and no connection is left

    async def connection(self, stream: trio.SocketStream) -> None:
        connection = _Connection(self, stream)
        self.open.add(connection)
        try:
            with connection.scope:
                await connection.run()
        finally:
            self.open.discard(connection)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if self.stopping and not self.open:
                self.idle.set()

    def stop(self) -> None:
        self.stopping = True
        for connection in list(self.open):
            if connection.waiting:  # between requests: nothing to finish
                connection.scope.cancel()
        if not self.open:
            self.idle.set()


class _Connection:
    """One client connection: requests one after another (keep-alive), each answered by the app."""

    def __init__(self, server: _Server, stream: trio.SocketStream):
        self.server = server
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.scope = trio.CancelScope()
        self.waiting = True  # for the next request's head
        self.gone = False  # the client hung up, or writing to it failed

    async def run(self) -> None:
        try:
            while not self.server.stopping:
                self.waiting = True
                with trio.move_on_after(self.server.keep_alive):
                    event = await self._next_event()
                self.waiting = False
                if not isinstance(event, h11.Request):
                    return  # closed by the client, or idle for keep_alive seconds
                complete = await _Exchange(self, event).run()
                if not complete or self.gone or self.conn.our_state is not h11.DONE:
                    return
                if self.conn.their_state is not h11.DONE and not await self._skip_body():
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc)

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self.write([self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))])
            await self._receive()

    async def _receive(self) -> int:
        try:
            data = await self.stream.receive_some(MAX_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.gone = True
        self.conn.receive_data(data)
        return len(data)

    async def _skip_body(self) -> bool:
        """Read past a request body the app did not read, so the connection can take the next request."""
        with trio.move_on_after(self.server.keep_alive):
            while True:
                event = await self._next_event()
                if isinstance(event, h11.EndOfMessage):
                    return True
                if not isinstance(event, h11.Data):
                    return False
        return False

    async def wait_for_hangup(self) -> None:
        """Returns when the client closes its end. Bytes it sends meanwhile (a pipelined request) are
        kept for the next cycle, up to MAX_HEAD: past that it is not read until the response is done."""
        kept = 0
        while not self.gone:
            if kept > MAX_HEAD:
                await trio.sleep_forever()
            kept += await self._receive()

    async def write(self, parts: list[bytes]) -> None:
        if self.gone:
            return
        try:
            if sum(map(len, parts)) <= ONE_WRITE:
                await self.stream.send_all(b"".join(parts))
            else:
                for part in parts:
                    if part:
                        await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone = True

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """A request h11 could not parse: answer with the status it suggests, then close."""
        log.info("bad request from %s: %s", _peer(self.stream), exc)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f'{{"error": "bad request: {exc}"}}\n'.encode()
        try:
            await self.write([self.conn.send(h11.Response(
                status_code=exc.error_status_hint,
                headers=[("content-type", "application/json"), ("content-length", str(len(body))),
                         ("connection", "close")])), body])
        except h11.LocalProtocolError:
            pass


class _Exchange:
    """One request and the app's response to it: the ASGI receive and send callables."""

    def __init__(self, connection: _Connection, request: h11.Request):
        self.connection = connection
        self.conn = connection.conn
        self.request = request
        self.head_only = request.method == b"HEAD"
        self.body_done = False
        self.response: h11.Response | None = None  # started, not yet written
        self.started = False
        self.complete = False

    async def run(self) -> bool:
        """Run the app on the request; True when its response went out whole."""
        try:
            await self.connection.server.app(self._scope(), self.receive, self.send)
        except Exception:
            log.exception("%s %s: the application failed", self.request.method.decode(), self._target())
            if not self.started:
                body = b'{"error": "internal error"}\n'
                await self.send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await self.send({"type": "http.response.body", "body": body})
        if self.response is not None and not self.connection.gone:  # started, but never sent a body
            with contextlib.suppress(h11.LocalProtocolError):
                await self.connection.write([self.conn.send(self.response)])
        return self.complete

    def _target(self) -> str:
        return self.request.target.decode("latin-1")

    def _scope(self) -> dict:
        raw_path, _, query = self.request.target.partition(b"?")
        stream = self.connection.stream
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": self.request.http_version.decode(),
            "method": self.request.method.decode("latin-1"), "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": query,
            "root_path": "", "headers": list(self.request.headers),
            "client": _address(stream.socket.getpeername), "server": _address(stream.socket.getsockname),
        }  # fmt: skip

    async def receive(self) -> dict:
        if not self.body_done:
            event = await self.connection._next_event()
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            self.body_done = True
            if isinstance(event, h11.EndOfMessage):
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}  # the connection closed mid-body
        await self.connection.wait_for_hangup()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.response = h11.Response(status_code=message["status"], headers=message.get("headers", []))
            return
        if kind != "http.response.body" or self.complete:
            return
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        try:
            parts = []
            if self.response is not None:
                parts.append(self.conn.send(self.response))
                self.response = None
            if body and not self.head_only:
                parts += self.conn.send_with_data_passthrough(h11.Data(data=body))
            if not more:
                parts.append(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:  # e.g. fewer bytes than its Content-Length: cut it off
            log.warning("%s %s: response cut short: %s", self.request.method.decode(), self._target(), exc)
            self.connection.gone = True
            return
        await self.connection.write(parts)
        self.complete = not more and not self.connection.gone


def _address(get: Callable[[], Any]) -> tuple[str, int] | None:
    try:
        name = get()
    except OSError:
        return None
    return (name[0], name[1]) if isinstance(name, tuple) else None


def _peer(stream: trio.SocketStream) -> str:
    address = _address(stream.socket.getpeername)
    return f"{address[0]}:{address[1]}" if address else "?"
