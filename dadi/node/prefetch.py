"""Background prefetch: make every chunk of a view's layers local, so that it soon needs no network.

Order: the chunks of the image's trace first (if it has one: dadi.node.trace), straight away and
several requests at once, because the starting container is about to read exactly those; then, after
a short delay, the rest of every layer in blob order. Reads come first: before each batch, prefetch
waits while any on-demand fetch is in flight (`OnDemandGate`), so a read never queues behind a
background batch for more than the batch already on the wire. An optional cap (`Pacer`) keeps the
background download under a rate on the node's link.

A layer is done when every chunk is local and the whole data file hashes to the blob's digest (the
cache then needs nothing from anyone); a blob that fails has its bad chunks fetched again. "done" for a
view means that for every layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio

from dadi.format.blob import FOOTER_SIZE, HEADER_SIZE, encode_tables

log = logging.getLogger(__name__)

BATCH_CHUNKS = 32  # chunks per prefetch request: 2 MiB of 64 KiB chunks, ~17 ms at 1 Gbit/s
WORKERS = 3  # batches in flight at once, so that one round trip does not idle the link
RETRY_PAUSE = 5.0  # seconds before prefetch tries again after the sources failed
BATCH_DEADLINE = 120.0
TRACE_GAP_CHUNKS = 2  # a trace's runs are joined across up to this many chunks it does not list
TRACE_RUN_BYTES = 1 << 20  # small enough that the first runs arrive while the container starts
TRACE_WORKERS = 4  # trace requests in flight at once


class Pacer:
    """Spends at most `rate` bytes per second on average (None: unlimited); shared by all prefetch work."""

    def __init__(self, rate: int | None = None):
        self.rate = rate
        self._next = 0.0  # trio time at which the next byte may go

    async def spend(self, nbytes: int) -> None:
        if not self.rate:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        await trio.sleep_until(start)


class OnDemandGate:
    """Counts fetches that reads are waiting for; prefetch waits until there are none."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        while self.active:
            await self._idle.wait()


def batches(indexes: list[int], size: int = BATCH_CHUNKS) -> list[list[int]]:
    return [indexes[i:i + size] for i in range(0, len(indexes), size)]


async def fetch_batches(view, work: list[tuple[object, list[int]]], pacer: Pacer, gate: OnDemandGate | None,
                        workers: int = WORKERS) -> None:
    """Fetch every (layer, chunk indexes) batch of `work` through the view, `workers` at a time; a batch
    whose sources fail is retried after a pause until it succeeds (cancel the caller to stop)."""
    send, receive = trio.open_memory_channel(len(work))
    for item in work:
        send.send_nowait(item)
    send.close()

    async def worker():
        async for layer, indexes in receive:
            indexes = await trio.to_thread.run_sync(layer.cache.missing, indexes)
            while indexes:
                if gate is not None:
                    await gate.wait_idle()
                await pacer.spend(sum(layer.tables.chunks[i].length for i in indexes))
                try:
                    await view.make_local(layer, indexes, trio.current_time() + BATCH_DEADLINE)
                    break
                except Exception as e:  # the network is down: try again later, reads go on
                    log.warning("view %s: prefetch of %s paused: %s", view.name, layer.digest, e)
                    await trio.sleep(RETRY_PAUSE)
                    indexes = await trio.to_thread.run_sync(layer.cache.missing, indexes)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, min(workers, len(work)))):
            nursery.start_soon(worker)


def trace_runs(trace_order: list[int], chunks, missing: set[int], max_gap: int = TRACE_GAP_CHUNKS,
               max_bytes: int = TRACE_RUN_BYTES) -> list[list[int]]:
    """The missing chunks of a trace cut into runs that are one range request each, earliest first.

    A trace lists chunks in the order the container first read them, which jumps around the blob. Sorted
    and joined across gaps of up to `max_gap` chunks (the gap's chunks are fetched too: a few KiB more on
    a request is cheaper than another round trip, and they are part of the image anyway), ~650 chunks of
    a Python start become ~70 requests instead of ~300. The runs are ordered by the earliest trace
    position of any chunk they hold, so what the container needs first comes first."""
    position = {}
    for n, index in enumerate(trace_order):
        if index in missing:
            position.setdefault(index, n)
    runs: list[list[int]] = []
    size = 0
    for index in sorted(position):
        if runs:
            last = runs[-1][-1]
            gap = range(last + 1, index)
            extra = [i for i in gap if i in missing]
            if len(gap) <= max_gap and len(extra) == len(gap) and size + chunks[index].length <= max_bytes:
                runs[-1] += [*extra, index]
                size += sum(chunks[i].length for i in (*extra, index))
                continue
        runs.append([index])
        size = chunks[index].length
    return sorted(runs, key=lambda run: min(position.get(i, len(trace_order)) for i in run))


async def prefetch_trace(view, trace, pacer: Pacer) -> int:
    """Fetch the trace's chunks of the view's layers, several requests at once; how many of them were
    missing (the chunks fetched to fill gaps are not counted)."""
    work = []
    listed = 0
    for layer in view.layers:
        wanted = trace.chunks_of(layer.digest, len(layer.tables.chunks))
        if not wanted:
            continue
        span = range(min(wanted), max(wanted) + 1)
        missing = set(await trio.to_thread.run_sync(layer.cache.missing, span))
        listed += len(missing.intersection(wanted))
        work += [(layer, run) for run in trace_runs(wanted, layer.tables.chunks, missing)]
    await fetch_batches(view, work, pacer, gate=None, workers=TRACE_WORKERS)
    return listed


async def prefetch_layers(view, pacer: Pacer, gate: OnDemandGate, read_metadata) -> None:
    """Make every layer of the view complete and verified. `read_metadata(layer)` returns the blob's
    (header, footer) bytes; it runs in a thread and may raise (prefetch then tries again later)."""
    for layer in view.layers:
        while not layer.cache.verified:
            missing = await trio.to_thread.run_sync(layer.cache.missing, range(len(layer.tables.chunks)))
            await fetch_batches(view, [(layer, b) for b in batches(missing)], pacer, gate)
            await trio.to_thread.run_sync(layer.cache.flush)
            if await _verify(view, layer, read_metadata):
                break
            await trio.sleep(RETRY_PAUSE)


async def _verify(view, layer, read_metadata) -> bool:
    """Hash the complete cached blob against its digest; False when it is not (yet) right."""
    cache = layer.cache
    if not cache.complete:
        return False
    if not cache.has_metadata:
        try:
            header, footer = await trio.to_thread.run_sync(read_metadata, layer)
            if len(header) != HEADER_SIZE or len(footer) != FOOTER_SIZE:
                raise ValueError(f"got {len(header)} header and {len(footer)} footer bytes")
            tables = encode_tables(layer.tables)  # canonical: the same bytes the blob holds
            await trio.to_thread.run_sync(cache.put_metadata, header, tables, footer)
        except Exception as e:
            log.warning("view %s: header and footer of %s: %s", view.name, layer.digest, e)
            return False
    if await trio.to_thread.run_sync(cache.verify_complete):
        log.info("view %s: layer %s is complete and matches its digest", view.name, layer.digest)
        return True
    log.warning("view %s: cached layer %s does not match its digest; fetching its bad chunks again",
                view.name, layer.digest)
    return False
