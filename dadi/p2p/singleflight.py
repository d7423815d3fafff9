"""Single-flight: however many tasks ask for the same key at once, the work for it runs once.

The supernode's promise is that each piece leaves the registry once, however many nodes ask for it at
the same moment (a rollout starts hundreds of containers of one image at once); the access check of a
node's credentials is shared the same way.

Unlike the node's Fetcher (dadi/node/fetch.py), where the first caller leads the fetch in its own task,
here the work runs in a task of the server's own nursery: a node that hangs up (or times out) must not
cancel a fetch that other nodes are waiting for, and a fetch that completes after everyone left still
fills the cache. Callers only wait. The work's own timeouts bound it (the registry client's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from dadi.p2p.errors import Unavailable

V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("done", "value", "error", "waiters")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: BaseException | None = None
        self.waiters = 0


class SingleFlight(Generic[V]):
    """`await flights.run(key, work)`: the result of one run of `work` shared by every concurrent caller
    with the same key. Errors (Exception subclasses) are shared too; a later call runs the work anew."""

    def __init__(self, nursery: trio.Nursery, on_wait: Callable[[], None] | None = None):
        self._nursery = nursery
        self._on_wait = on_wait
        self._inflight: dict[Hashable, _Flight[V]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def waiters(self, key: Hashable) -> int:
        """Callers waiting on the flight of `key` besides the one that started it (for tests and logs)."""
        flight = self._inflight.get(key)
        return flight.waiters if flight is not None else 0

    async def run(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """(value, shared): shared is True when this caller waited on a flight another caller started."""
        flight = self._inflight.get(key)
        shared = flight is not None
        if flight is None:
            flight = self._inflight[key] = _Flight()
            self._nursery.start_soon(self._fly, key, flight, work)
        else:
            flight.waiters += 1
            if self._on_wait is not None:
                self._on_wait()
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value, shared  # type: ignore[return-value]

    async def _fly(self, key: Hashable, flight: _Flight[V], work: Callable[[], Awaitable[V]]) -> None:
        try:
            flight.value = await work()
        except Exception as exc:
            flight.error = exc
        except BaseException:
            # Cancelled (the server is stopping): waiters must not hang on an event nobody sets.
            flight.error = Unavailable("the supernode is stopping")
            raise
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            flight.done.set()
