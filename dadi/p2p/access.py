"""Who may read what through the supernode: exactly who may read it from the registry.

The supernode caches blobs by digest, for every node. Without a check, a node could read through it any
blob some other node had fetched, from any repository, with no credentials at all. So every blob request
carries the node's registry credentials (Authorization: Basic, as in a docker config.json authfile), and
the supernode asks the registry, with those credentials, for that blob in that repository: a HEAD,
through RegistryClient, which does the Bearer token dance where the registry wants one. The registry's
answer is the supernode's: 401/403 refuses, 404 means no such blob *in that repository* (which is why
the check is per digest, not per repository: a digest cached for one repository is not thereby
readable through another), and a yes gives the blob's size, which the range arithmetic needs anyway.

Answers are cached per (credentials, repository, digest): a yes for `allow_ttl` (60 s: a revoked user
keeps reading for at most that long, as with a registry token), a no or a 404 for `deny_ttl` (5 s: long
enough to absorb a misconfigured node's retry storm, short enough that a fix or a push is seen at once).
Registry failures are not cached. Concurrent checks of one key share one HEAD (single-flight). Keys hold
a sha256 of the Authorization header, never the header itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from dadi.p2p.errors import AccessDenied, NotFound, SupernodeError
from dadi.p2p.metrics import ACCESS_DENIED, NOT_FOUND, UPSTREAM, SupernodeMetrics
from dadi.p2p.singleflight import SingleFlight
from dadi.p2p.upstream import Upstream, classify
from dadi.registry.auth import Credentials

log = logging.getLogger(__name__)

ALLOW_TTL = 60.0
DENY_TTL = 5.0
MAX_ENTRIES = 100_000  # beyond this, expired answers are purged; then, if need be, all of them
FORWARDED = "the Authorization header of the request"


def parse_authorization(header: str | None) -> Credentials | None:
    """The registry credentials a node forwarded (None: it sent none, and is anonymous)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise AccessDenied(
            f"the supernode accepts registry credentials as Authorization: Basic (user:password, as in a "
            f"docker config.json authfile), not {scheme!r}"
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise AccessDenied("Authorization: Basic is not base64 of user:password") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise AccessDenied("Authorization: Basic does not hold a user:password pair")
    return Credentials(username, password, FORWARDED)


def who(credentials: Credentials | None) -> str:
    """For logs and messages: the user, never the password."""
    return f"user {credentials.username!r}" if credentials is not None else "anonymous"


@dataclass(frozen=True)
class _Answer:
    expires: float
    size: int | None  # the blob's size when allowed
    error: SupernodeError | None  # AccessDenied or NotFound


class AccessChecker:
    def __init__(
        self,
        upstream: Upstream,
        metrics: SupernodeMetrics,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        *,
        allow_ttl: float = ALLOW_TTL,
        deny_ttl: float = DENY_TTL,
        clock: Callable[[], float] = trio.current_time,
    ):
        self._upstream = upstream
        self._metrics = metrics
        self._limiter = limiter
        self._allow_ttl = allow_ttl
        self._deny_ttl = deny_ttl
        self._clock = clock
        self._answers: dict[tuple[str, str, str], _Answer] = {}
        self._flights: SingleFlight[_Answer] = SingleFlight(nursery)

    async def check_blob(
        self, authorization: str | None, credentials: Credentials | None, repository: str, digest: str
    ) -> int:
        """The blob's size if these credentials may read it in `repository`; else AccessDenied or
        NotFound (cached), or UpstreamError when the registry could not answer."""
        key = (hashlib.sha256((authorization or "").encode()).hexdigest(), repository, digest)
        answer = self._answers.get(key)
        if answer is not None and answer.expires > self._clock():
            self._metrics.access_checks.labels("cached").inc()
        else:
            answer, _ = await self._flights.run(key, partial(self._ask, key, credentials, repository, digest))
        if answer.error is not None:
            raise answer.error
        assert answer.size is not None
        return answer.size

    async def _ask(self, key, credentials: Credentials | None, repository: str, digest: str) -> _Answer:
        client = self._upstream.client_for(credentials)
        what = f"{who(credentials)} reading {repository}@{digest}"
        started = self._clock()
        try:
            size = await trio.to_thread.run_sync(
                client.head_blob, repository, digest, limiter=self._limiter, abandon_on_cancel=True
            )
        except Exception as exc:
            error = classify(exc, what)  # UpstreamError propagates uncached; refusals are answers
            if not isinstance(error, AccessDenied | NotFound):
                self._metrics.errors.labels(UPSTREAM).inc()
                log.warning("%s", error)
                raise error from exc
            answer = _Answer(self._clock() + self._deny_ttl, None, error)
        else:
            if size is None:
                error = NotFound(f"{what}: no such blob in {self._upstream.host}/{repository}")
                answer = _Answer(self._clock() + self._deny_ttl, None, error)
            else:
                answer = _Answer(self._clock() + self._allow_ttl, size, None)
        finally:
            self._metrics.access_check_seconds.observe(self._clock() - started)
        if answer.error is None:
            self._metrics.access_checks.labels("allowed").inc()
        elif isinstance(answer.error, AccessDenied):
            self._metrics.access_checks.labels("denied").inc()
            self._metrics.errors.labels(ACCESS_DENIED).inc()
            log.info("refused: %s", answer.error)
        else:
            self._metrics.access_checks.labels("not_found").inc()
            self._metrics.errors.labels(NOT_FOUND).inc()
        self._remember(key, answer)
        return answer

    def _remember(self, key, answer: _Answer) -> None:
        if len(self._answers) >= MAX_ENTRIES:
            now = self._clock()
            self._answers = {k: a for k, a in self._answers.items() if a.expires > now}
            if len(self._answers) >= MAX_ENTRIES:
                self._answers.clear()
        self._answers[key] = answer
