"""A TCP proxy that adds a fixed round-trip time, for benchmarks: this kernel's tc has no netem.

    with DelayProxy(("10.231.0.2", 0), ("10.231.0.2", 5000), rtt=0.020) as proxy:
        ... requests to proxy.address wait 20 ms more per round trip ...

    ip netns exec NS python tools/bench/delayproxy.py --listen 10.231.0.2:5001 \
        --upstream 127.0.0.1:5000 --rtt-ms 20

Each direction holds the bytes it reads for rtt/2 and then passes them on in order. So bandwidth is
kept (bytes pipeline as they do on a long link), while every request and its answer wait one round
trip more. A new connection also waits one round trip before its first byte moves, the TCP handshake's.
Memory is bounded per connection: at most QUEUE_DEPTH reads of READ_SIZE wait in each direction, and
a reader that falls behind slows the sender, as TCP's window would.

Plain threads and blocking sockets: two threads per direction, which is plenty for a benchmark's few
hundred connections and leaves nothing for an event loop to forget at shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import threading
import time

READ_SIZE = 64 * 1024
QUEUE_DEPTH = 256  # 16 MiB per direction: more than 1 Gbit/s x 100 ms in flight


def _forward(source: socket.socket, sink: socket.socket, delay: float) -> None:
    """Copy source to sink, each read held back until `delay` seconds after it arrived; EOF too."""
    held: queue.Queue[tuple[float, bytes]] = queue.Queue(QUEUE_DEPTH)

    def take_in() -> None:
        data = b""
        try:
            while data := source.recv(READ_SIZE):
                held.put((time.monotonic() + delay, data))
        except OSError:
            pass  # reset, or the proxy closed the socket: pass on an EOF
        held.put((time.monotonic() + delay, b""))

    intake = threading.Thread(target=take_in, daemon=True)
    intake.start()
    try:
        while True:
            due, data = held.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:  # EOF travels with the same delay, after every byte before it
                sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(data)
    except OSError:
        return  # the other end went away: the pair's other direction ends on its own EOF
    finally:
        intake.join()


class DelayProxy:
    """Listens on `listen` (port 0: any free one) and forwards every connection to `upstream`."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], rtt: float):
        if rtt < 0:
            raise ValueError(f"round-trip time must not be negative, got {rtt}")
        self.listen = listen
        self.upstream = upstream
        self.rtt = rtt
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "the proxy is not running"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._open.add(sock)
            return True

    def _serve_one(self, client: socket.socket) -> None:
        upstream = None
        try:
            time.sleep(self.rtt)  # the handshake's round trip
            upstream = socket.create_connection(self.upstream)
            if not self._track(upstream):
                return
            back = threading.Thread(target=_forward, args=(upstream, client, self.rtt / 2), daemon=True)
            back.start()
            _forward(client, upstream, self.rtt / 2)
            back.join()
        except OSError:
            pass  # the upstream refused or went away: close the client, as a router would
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._open.discard(sock)
                    sock.close()

    def serve(self) -> None:
        """Accept until stop(); each connection runs in its own threads."""
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stop() closed the listener
            if not self._track(client):
                client.close()
                return
            self.connections += 1
            worker = threading.Thread(target=self._serve_one, args=(client,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def start(self) -> None:
        self._listener = socket.create_server(self.listen)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            sockets = list(self._open)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._listener.close()
        for sock in sockets:  # wakes every recv(); the workers close them
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for worker in self._workers:
            worker.join(timeout=10)

    def __enter__(self) -> DelayProxy:
        self.start()
        self._acceptor = threading.Thread(target=self.serve, name="delayproxy", daemon=True)
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._acceptor.join(timeout=10)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description="TCP proxy adding a fixed round-trip time (tc has no netem here)")
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--upstream", type=_host_port, required=True, help="HOST:PORT to forward them to")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round-trip time to add, in milliseconds")
    args = parser.parse_args()
    proxy = DelayProxy(args.listen, args.upstream, args.rtt_ms / 1000)
    proxy.start()
    print(f"delaying {args.rtt_ms} ms: {args.listen[0]}:{proxy.address[1]} -> {args.upstream[0]}:{args.upstream[1]}",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.serve()


if __name__ == "__main__":
    main()
