"""The node daemon's Prometheus metrics (`dadi daemon --metrics ADDR`).

Most figures already live in the daemon as plain counters (views' ViewStats, fetchers' FetchStats,
caches' bitmaps). A collector reads them when Prometheus scrapes, so there is one set of books and the
read path pays nothing for metrics. Only the fetch latency needs observing as it happens: the fetchers
report each request to `observe_request`, which feeds a histogram.

What an operator asks, and the metric that answers:
- where do the bytes come from?         dadi_node_fetched_bytes_total{source}, ...{purpose}
- how good is the cache?                dadi_node_chunk_hits_total, dadi_node_chunk_misses_total
- did concurrent reads share fetches?   dadi_node_singleflight_waits_total
- is the network slow?                  dadi_node_fetch_seconds{source}
- what went wrong?                      dadi_node_fetch_errors_total{source}, dadi_node_corrupt_chunks_total,
                                        dadi_node_io_timeouts_total, dadi_node_read_errors_total
- how far is prefetch?                  dadi_node_chunks_local / dadi_node_chunks_total{view},
                                        dadi_node_prefetch_done{view}
- what did peers give us?               dadi_node_peer_redirects_total, dadi_node_peer_received_bytes_total,
                                        dadi_node_peer_failures_total, dadi_node_peer_corrupt_chunks_total
                                        (fetched bytes from peers count as source="supernode" above:
                                        the supernode sent the node there)
- what did we give peers?               dadi_node_peer_sent_bytes_total, dadi_node_peer_uploads_total,
                                        dadi_node_peer_refused_total{reason}, dadi_node_peer_announces_total,
                                        dadi_node_peer_pieces_announced
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetrics:
    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        self.fetch_seconds = Histogram("dadi_node_fetch_seconds", "One range request to a chunk source",
                                       ["source", "outcome"], buckets=_SECONDS, registry=self.registry)
        self.registry.register(_Collector(daemon))

    def observe_request(self, source: str, seconds: float, ok: bool) -> None:
        self.fetch_seconds.labels(source, "ok" if ok else "error").observe(seconds)

    def serve(self, address: str) -> None:
        """Serve /metrics on HOST:PORT in a thread of its own (scrapes never wait for the trio loop)."""
        from dadi.p2p.httpserver import split_listen

        host, port = split_listen(address)
        start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)


class _Collector:
    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def describe(self):
        return []  # metrics depend on the views: describe nothing, collect at scrape time

    def collect(self):
        views = list(self.daemon.views.values())
        fetchers = list(self.daemon._fetchers.values())

        by_source = CounterMetricFamily("dadi_node_fetched_bytes", "Verified stored bytes fetched, by source",
                                        labels=["source"])
        by_purpose = CounterMetricFamily("dadi_node_fetched_purpose_bytes",
                                         "Verified stored bytes fetched, by why (on_demand, read_ahead, prefetch)",
                                         labels=["purpose"])
        errors = CounterMetricFamily("dadi_node_fetch_errors", "Failed range requests, by source", labels=["source"])
        totals = {"source": {}, "purpose": {}, "errors": {}}
        waits = corrupt = 0
        for fetcher in fetchers:
            s = fetcher.stats
            for name, value in s.bytes_by_source.items():
                totals["source"][name] = totals["source"].get(name, 0) + value
            for name, value in s.bytes_by_purpose.items():
                totals["purpose"][name] = totals["purpose"].get(name, 0) + value
            for name, value in s.errors_by_source.items():
                totals["errors"][name] = totals["errors"].get(name, 0) + value
            waits += s.singleflight_waits
            corrupt += s.corrupt_chunks
        for name, value in totals["source"].items():
            by_source.add_metric([name], value)
        for name, value in totals["purpose"].items():
            by_purpose.add_metric([name], value)
        for name, value in totals["errors"].items():
            errors.add_metric([name], value)
        yield by_source
        yield by_purpose
        yield errors
        yield CounterMetricFamily("dadi_node_singleflight_waits", "Chunks a read waited for instead of fetching",
                                  value=waits)
        yield CounterMetricFamily("dadi_node_corrupt_chunks",
                                  "Chunks that failed sha256 from a source or xxh3 in the cache",
                                  value=corrupt + sum(layer.cache.corrupt for v in views for layer in v.view.layers))

        hits = CounterMetricFamily("dadi_node_chunk_hits", "Chunk lookups by reads served locally (memory, cache)",
                                   labels=["view"])
        misses = CounterMetricFamily("dadi_node_chunk_misses", "Chunk lookups by reads that went to the network",
                                     labels=["view"])
        io_timeouts = CounterMetricFamily("dadi_node_io_timeouts", "Reads failed at their deadline", labels=["view"])
        read_errors = CounterMetricFamily("dadi_node_read_errors", "Reads answered with EIO", labels=["view"])
        local = GaugeMetricFamily("dadi_node_chunks_local", "Chunks of the view's layers held locally",
                                  labels=["view"])
        total = GaugeMetricFamily("dadi_node_chunks_total", "Chunks of the view's layers", labels=["view"])
        done = GaugeMetricFamily("dadi_node_prefetch_done", "1 when every layer is local and verified",
                                 labels=["view"])
        for state in views:
            view, name = state.view, state.view.name
            hits.add_metric([name], view.stats.chunk_hits)
            misses.add_metric([name], view.stats.chunk_misses)
            io_timeouts.add_metric([name], view.stats.io_timeouts)
            read_errors.add_metric([name], view.stats.read_errors)
            local.add_metric([name], sum(layer.cache.present_count for layer in view.layers))
            total.add_metric([name], sum(len(layer.tables.chunks) for layer in view.layers))
            done.add_metric([name], 1 if state.prefetch_state == "done" else 0)
        yield from (hits, misses, io_timeouts, read_errors, local, total, done)
        yield from _peer_metrics(self.daemon, fetchers)


def _peer_metrics(daemon, fetchers):
    got = {"redirects": 0, "received_bytes": 0, "failures": 0, "corrupt_chunks": 0}
    for fetcher in fetchers:
        for source in fetcher.sources:
            stats = getattr(source, "peer_stats", None)
            for key in got if stats is not None else ():
                got[key] += getattr(stats, key)
    yield CounterMetricFamily("dadi_node_peer_redirects", "Supernode redirects to peers followed",
                              value=got["redirects"])
    yield CounterMetricFamily("dadi_node_peer_received_bytes", "Bytes peers sent (each chunk then checked)",
                              value=got["received_bytes"])
    yield CounterMetricFamily("dadi_node_peer_failures",
                              "Redirects where the peer failed, timed out, was busy or sent a short read",
                              value=got["failures"])
    yield CounterMetricFamily("dadi_node_peer_corrupt_chunks", "Chunks from peers that failed their sha256",
                              value=got["corrupt_chunks"])
    served = daemon.peers.stats() if getattr(daemon, "peers", None) is not None else {}
    yield CounterMetricFamily("dadi_node_peer_sent_bytes", "Bytes this node served to peers",
                              value=served.get("sent_bytes", 0))
    yield CounterMetricFamily("dadi_node_peer_uploads", "Ranges this node served to peers",
                              value=served.get("uploads", 0))
    refused = CounterMetricFamily("dadi_node_peer_refused", "Peer requests refused: busy (503), forbidden "
                                  "(403, no valid ticket), not_held (404)", labels=["reason"])
    for reason in ("busy", "forbidden", "not_held"):
        refused.add_metric([reason], served.get(reason, 0))
    yield refused
    yield CounterMetricFamily("dadi_node_peer_announces", "Announces the supernodes accepted",
                              value=served.get("announces", 0))
    yield GaugeMetricFamily("dadi_node_peer_pieces_announced", "Pieces announced as held, over all supernodes",
                            value=served.get("pieces_announced", 0))


def start_metrics(daemon, address: str) -> NodeMetrics:
    metrics = NodeMetrics(daemon)
    metrics.serve(address)
    return metrics
