"""The supernode's Prometheus metrics, on a registry of its own (not prometheus_client's global one, so
that several supernodes can live in one process, as in tests, and nothing else leaks into /metrics).

What an operator asks, and the metric that answers:
- how much did it serve?                 dadi_supernode_sent_bytes_total
- how much did the cache save?           dadi_supernode_bytes_total{source="cache"|"registry"},
                                         dadi_supernode_piece_hits_total, ..._piece_misses_total
- did the stampede collapse?             dadi_supernode_singleflight_waits_total
- is the registry slow?                  dadi_supernode_registry_fetch_seconds (one piece),
                                         dadi_supernode_access_check_seconds (one credential check)
- what went wrong?                       dadi_supernode_errors_total{kind}
- is the cache big enough?               dadi_supernode_cache_bytes, ..._cache_quota_bytes,
                                         dadi_supernode_evicted_blobs_total{reason}
- do peers take load off it?             dadi_supernode_redirects_total{result} (result="peer": sent
                                         to a peer), dadi_supernode_peers, ..._tracked_pieces,
                                         dadi_supernode_announces_total{kind},
                                         dadi_supernode_peer_reports_total{reason} (failed, corrupt)
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series (a timestamp per counter) double /metrics and tell an operator nothing here.
disable_created_metrics()

# Latency buckets from a LAN round trip to a slow registry under load.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# errors_total kinds
UPSTREAM = "upstream"  # the registry failed, timed out or sent a short read: 502 to the node
ACCESS_DENIED = "access_denied"  # a node's credentials were refused: 401/403
NOT_FOUND = "not_found"  # no such blob in that repository: 404
BAD_REQUEST = "bad_request"  # a request the supernode does not understand: 400/405/416
CACHE_IO = "cache_io"  # the cache disk failed; the piece was served from memory anyway
CORRUPT_PIECE = "corrupt_piece"  # a cached piece failed its xxh3 re-check: its blob was dropped
BLOB_DIGEST = "blob_digest"  # a completely cached blob did not hash to its digest: dropped


class SupernodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sent_bytes = Counter(
            "dadi_supernode_sent_bytes", "Body bytes sent to nodes (blob ranges)", registry=r
        )
        self.bytes = Counter(
            "dadi_supernode_bytes",
            "Piece bytes the supernode obtained, by source: cache (its disk) or registry (fetched)",
            ["source"], registry=r,
        )  # fmt: skip
        self.piece_hits = Counter(
            "dadi_supernode_piece_hits", "Pieces a request or prewarm found in the disk cache", registry=r
        )
        self.piece_misses = Counter(
            "dadi_supernode_piece_misses", "Pieces a request or prewarm did not find in the disk cache",
            registry=r,
        )  # fmt: skip
        self.singleflight_waits = Counter(
            "dadi_supernode_singleflight_waits",
            "Misses that waited for a registry fetch another request had started, instead of fetching",
            registry=r,
        )
        self.registry_fetches = Counter(
            "dadi_supernode_registry_fetches", "Piece fetches sent to the registry", registry=r
        )
        self.uncached_pieces = Counter(
            "dadi_supernode_uncached_pieces",
            "Fetched pieces not kept on disk (no room within the quota, or the blob was evicted)",
            registry=r,
        )
        self.registry_fetch_seconds = Histogram(
            "dadi_supernode_registry_fetch_seconds", "Time to fetch one piece from the registry",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.access_check_seconds = Histogram(
            "dadi_supernode_access_check_seconds",
            "Time to check one node's credentials for one blob against the registry",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.first_byte_seconds = Histogram(
            "dadi_supernode_first_byte_seconds",
            "Time from a blob request to its response headers (access check and first pieces included)",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.access_checks = Counter(
            "dadi_supernode_access_checks",
            "Credential checks by result: allowed, denied, not_found (asked the registry) or cached",
            ["result"], registry=r,
        )  # fmt: skip
        self.errors = Counter("dadi_supernode_errors", "Errors by kind", ["kind"], registry=r)
        self.evicted_blobs = Counter(
            "dadi_supernode_evicted_blobs", "Blobs removed from the cache, by reason", ["reason"], registry=r
        )
        self.verified_blobs = Counter(
            "dadi_supernode_verified_blobs", "Completely cached blobs that hashed to their digest", registry=r
        )
        self.cache_bytes = Gauge("dadi_supernode_cache_bytes", "Disk the piece cache takes", registry=r)
        self.cache_quota_bytes = Gauge(
            "dadi_supernode_cache_quota_bytes", "The piece cache's quota (0: none)", registry=r
        )
        self.prewarms = Counter("dadi_supernode_prewarms", "Prewarms, by result", ["result"], registry=r)
        self.redirects = Counter(
            "dadi_supernode_redirects",
            "Blob requests by where the tracker sent them: peer (307), cold (piece not hot), no_peer (hot, "
            "no holder with a free slot), seed (hot, no holder yet, the node asking is one of its seeds), "
            "declined (the node asked to be served here)",
            ["result"], registry=r,
        )  # fmt: skip
        self.announces = Counter(
            "dadi_supernode_announces", "Peer announces by kind: full, delta, leave, refused (banned peer)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.peer_reports = Counter(
            "dadi_supernode_peer_reports", "Nodes' reports of peers that failed or sent corrupt bytes",
            ["reason"], registry=r,
        )  # fmt: skip
        self.held = Counter(
            "dadi_supernode_held_requests",
            "Requests for a hot piece no peer held yet that waited for a seed to announce it, by outcome: "
            "peer (redirected), seed (the node became one of its seeds meanwhile: served here), timeout "
            "(served here)", ["outcome"], registry=r,
        )  # fmt: skip
        self.peers = Gauge("dadi_supernode_peers", "Peers the tracker knows (announced, not expired)", registry=r)
        self.tracked_pieces = Gauge(
            "dadi_supernode_tracked_pieces", "(blob, piece) pairs at least one peer announced", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
