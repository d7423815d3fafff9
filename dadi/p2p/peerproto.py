"""The P2P wire protocol between nodes, peers and the supernode (docs/P2P.md is its reference): the
announce body, the headers a node adds to its blob requests, and the tickets a redirect carries.

Tickets: a supernode redirects only a node that passed its access check, and the peer must not serve
anyone else (it cannot check registry credentials: the node does not send them to peers). So the
redirect's URL carries a ticket, an HMAC over (digest, expiry) under a key that only the supernode and
that peer know: the supernode derives each peer's key from a secret of its own and the peer's address,
and hands it to the peer in the answer to its announce. A ticket lets its bearer read one blob from one
peer for TICKET_SECONDS. Expiry is wall-clock time (seconds since the epoch): machines of a data centre
agree on it to well within a minute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass

from dadi.p2p.errors import BadRequest

ANNOUNCE_PATH = "/p2p/announce"
TICKET_PARAM = "dadi-ticket"
TICKET_SECONDS = 60.0
MAX_ANNOUNCE_BODY = 8 << 20  # bytes: about a million piece numbers

# Headers of a node's blob requests to a supernode
PEER_PORT_HEADER = "x-dadi-peer-port"  # the requester's own peer port: never redirect it to itself
NO_REDIRECT_HEADER = "x-dadi-no-redirect"  # "1": serve it yourself (the node already tried a peer)
PEER_REPORT_HEADER = "x-dadi-peer-report"  # "failed URL, corrupt URL": peers that let the node down

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PEER_URL = re.compile(r"^http://[0-9A-Za-z.:\[\]-]+:\d{1,5}$")


@dataclass(frozen=True)
class Announce:
    """What a peer says: the port it serves on, pieces it can now serve (`add`) and no longer can
    (`withdraw`), per blob digest; `full`: `add` is everything (forget earlier announces); `leave`: the
    peer stops serving."""

    port: int
    add: dict[str, list[int]]
    withdraw: dict[str, list[int]]
    full: bool = False
    leave: bool = False

    def to_json(self) -> bytes:
        def blobs(pieces: dict[str, list[int]]) -> list[dict]:
            return [{"digest": d, "pieces": sorted(p)} for d, p in sorted(pieces.items())]

        body = {"port": self.port, "full": self.full, "leave": self.leave, "add": blobs(self.add),
                "withdraw": blobs(self.withdraw)}
        return json.dumps(body, separators=(",", ":")).encode()


def parse_announce(body: bytes) -> Announce:
    """The announce in a request body; BadRequest naming what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"announce: the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("announce: the body must be a JSON object")
    port = data.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise BadRequest(f"announce: port must be a TCP port number, not {port!r}")
    for flag in ("full", "leave"):
        if not isinstance(data.get(flag, False), bool):
            raise BadRequest(f"announce: {flag} must be true or false")
    return Announce(port, _blobs(data, "add"), _blobs(data, "withdraw"), data.get("full", False),
                    data.get("leave", False))


def _blobs(data: dict, key: str) -> dict[str, list[int]]:
    items = data.get(key, [])
    if not isinstance(items, list):
        raise BadRequest(f"announce: {key} must be a list of {{digest, pieces}}")
    out: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        where = f"announce: {key}[{n}]"
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str) or not _DIGEST.match(item["digest"]):
            raise BadRequest(f"{where}: needs a digest sha256:<64 hex>")
        pieces = item.get("pieces")
        if not isinstance(pieces, list) or not all(type(p) is int and p >= 0 for p in pieces):
            raise BadRequest(f"{where}: pieces must be a list of piece numbers (integers >= 0)")
        out.setdefault(item["digest"], []).extend(pieces)
    return out


def peer_url(host: str, port: int) -> str:
    """The URL a peer serves on, from the address its announce came from and the port it named."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_reports(header: str | None) -> list[tuple[str, str]]:
    """(reason, peer URL) pairs of an X-Dadi-Peer-Report header; malformed entries are skipped (a report
    is advice, and a node must not fail its request over one)."""
    out = []
    for entry in (header or "").split(","):
        reason, _, url = entry.strip().partition(" ")
        if reason in ("failed", "corrupt") and _PEER_URL.match(url.strip()):
            out.append((reason, url.strip()))
    return out


def format_reports(reports: list[tuple[str, str]]) -> str:
    return ", ".join(f"{reason} {url}" for reason, url in reports)


# --- tickets -----------------------------------------------------------------------------------------


def peer_key(secret: bytes, peer: str) -> bytes:
    """The key a supernode with `secret` shares with the peer at URL `peer`."""
    return hmac.new(secret, b"dadi peer key\0" + peer.encode(), hashlib.sha256).digest()


def make_ticket(key: bytes, digest: str, expires: float) -> str:
    stamp = str(int(expires))
    mac = hmac.new(key, f"{digest}\n{stamp}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{stamp}.{mac}"


def check_ticket(keys: list[bytes], digest: str, ticket: str | None, now: float) -> bool:
    """True when `ticket` was made under one of `keys` for `digest` and has not expired."""
    stamp, _, mac = (ticket or "").partition(".")
    if not stamp.isdigit() or int(stamp) < now or len(mac) != 32:
        return False
    return any(hmac.compare_digest(make_ticket(key, digest, int(stamp)), ticket) for key in keys)
