"""The client side of a supernode's own endpoints (blob ranges are dadi.node.fetch.HttpChunkSource's):
which registry it serves, and prewarming an image with progress."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import requests

from dadi.errors import DadiError
from dadi.registry.auth import basic_authorization, load_credentials

TIMEOUT = 30.0  # seconds to connect, and between two lines of a prewarm's progress (sent every 0.5 s)


class SupernodeClientError(DadiError):
    """The supernode could not be reached, refused the request, or a prewarm failed."""


def _error_text(resp: requests.Response) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return resp.text.strip()[:300] or resp.reason


def registry_of(supernode: str) -> str:
    """The registry host the supernode serves (from its /healthz)."""
    url = supernode.rstrip("/") + "/healthz"
    try:
        resp = requests.get(url, timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise SupernodeClientError(f"supernode {supernode}: {exc}") from exc
    if resp.status_code != 200:
        raise SupernodeClientError(f"supernode {url}: HTTP {resp.status_code}: {_error_text(resp)}")
    return str(resp.json()["registry"])


def authorization_for(registry: str, repository: str, authfile: str | None) -> str | None:
    """The Authorization header that forwards our credentials for `registry` (None: we have none)."""
    credentials, _ = load_credentials(registry, repository, authfile)
    return basic_authorization(credentials) if credentials is not None else None


def prewarm(
    supernode: str,
    image: str,
    *,
    trace_only: bool = False,
    authorization: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """POST /prewarm and follow its JSON lines; returns the final "done" line, raises on "error"."""
    url = supernode.rstrip("/") + "/prewarm"
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    body = json.dumps({"image": image, "trace_only": trace_only})
    final: dict[str, Any] | None = None
    try:
        with requests.post(url, data=body, headers=headers, stream=True, timeout=TIMEOUT) as resp:
            if resp.status_code != 200:
                raise SupernodeClientError(f"prewarm {image}: HTTP {resp.status_code}: {_error_text(resp)}")
            for line in resp.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if on_event is not None:
                    on_event(event)
                if event.get("event") in ("done", "error"):
                    final = event
    except requests.RequestException as exc:
        raise SupernodeClientError(f"prewarm {image} at {supernode}: {exc}") from exc
    except ValueError as exc:
        raise SupernodeClientError(f"prewarm {image}: the supernode sent a line that is not JSON: {exc}") from exc
    if final is None:
        raise SupernodeClientError(f"prewarm {image}: the supernode's answer ended before the prewarm did")
    if final["event"] == "error":
        raise SupernodeClientError(f"prewarm {image}: {final.get('error')}")
    return final
