"""What the supernode answers when it cannot serve: each error carries its HTTP status."""

from __future__ import annotations

from dadi.errors import DadiError


class SupernodeError(DadiError):
    """An error a client sees as an HTTP status and a JSON body {"error": message}."""

    status = 500


class BadRequest(SupernodeError):
    status = 400


class AccessDenied(SupernodeError):
    """The registry refused the node's credentials (401) or refused them this repository (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


class NotFound(SupernodeError):
    status = 404


class RangeNotSatisfiable(SupernodeError):
    status = 416

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


class UpstreamError(SupernodeError):
    """The registry (or the proxy in front of it) failed, timed out or sent a short read."""

    status = 502


class Unavailable(SupernodeError):
    """The supernode is stopping."""

    status = 503
