"""The one registry a supernode serves, and the RegistryClients that talk to it on whose behalf.

Two kinds of client, because two kinds of question go upstream:

- "May this node read this?" is asked with the node's own credentials (forwarded in its Authorization
  header), never with the supernode's: `client_for(credentials)`. One client per credentials, each with
  its own session, so that Bearer tokens (which the registry scopes to a user) are never shared.
- "Give me these bytes" is asked with the supernode's own credentials (--authfile) when it has some for
  the repository, else with the node's, which were just checked: `fetch_client`. The bytes of a digest
  are the same whoever fetches them, so the cache serves them to every node allowed to read them.

With --upstream-proxy every request (registry and token service alike) goes through that HTTP proxy, a
Dragonfly dfdaemon say; environment proxy settings are then ignored, so the option is what counts.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import requests

from dadi.errors import RegistryDenied, RegistryError, RegistryNotFound, RegistryUnauthorized
from dadi.p2p.errors import AccessDenied, NotFound, SupernodeError, UpstreamError
from dadi.registry.auth import Credentials
from dadi.registry.client import RegistryClient, RegistrySession

MAX_CLIENTS = 256  # distinct node credentials kept with a warm session; more are rebuilt when needed
REQUEST_TIMEOUT = 30.0  # seconds per connect and per socket read (the registry client's `timeout`)
RETRIES = 2  # the registry client's own retries of 5xx and broken connections


class Upstream:
    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        authfile: str | None = None,
        proxy: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        retries: int = RETRIES,
    ):
        self.host = host
        self.plain_http = plain_http
        self.proxy = proxy
        self._timeout = timeout
        self._retries = retries
        self._lock = threading.Lock()
        self._clients: OrderedDict[tuple[str, str] | None, RegistryClient] = OrderedDict()
        self.own = RegistryClient(
            host, plain_http=plain_http, authfile=authfile, timeout=timeout, retries=retries,
            session=self._session(),
        )  # fmt: skip

    def _session(self) -> requests.Session:
        session = RegistrySession()
        if self.proxy:
            session.proxies = {"http": self.proxy, "https": self.proxy}
            # Environment proxies would win over the session's (requests merges them first).
            session.trust_env = False
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        return session

    def has_own_credentials(self, repository: str) -> bool:
        return self.own.auth.credentials(repository)[0] is not None

    def client_for(self, credentials: Credentials | None) -> RegistryClient:
        """A client that uses exactly these credentials (None: anonymous), and no file."""
        key = (credentials.username, credentials.password) if credentials is not None else None
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
        client = RegistryClient(
            self.host, plain_http=self.plain_http, timeout=self._timeout, retries=self._retries,
            session=self._session(), credentials=credentials, anonymous=credentials is None,
        )  # fmt: skip
        with self._lock:
            client = self._clients.setdefault(key, client)
            self._clients.move_to_end(key)
            while len(self._clients) > MAX_CLIENTS:
                # Not closed: a worker thread may still be using it; its sockets go with the object.
                self._clients.popitem(last=False)
        return client

    def fetch_client(self, repository: str, credentials: Credentials | None) -> RegistryClient:
        """The client to fetch blob bytes of `repository` with (see the module docstring)."""
        return self.own if self.has_own_credentials(repository) else self.client_for(credentials)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in [self.own, *clients]:
            client.session.close()


def classify(exc: BaseException, what: str) -> SupernodeError:
    """The HTTP-facing error for what the registry client raised while doing `what`."""
    if isinstance(exc, SupernodeError):
        return exc
    if isinstance(exc, RegistryUnauthorized):
        return AccessDenied(f"{what}: the registry refused the credentials: {exc}", 401)
    if isinstance(exc, RegistryDenied):
        return AccessDenied(f"{what}: the registry denied access: {exc}", 403)
    if isinstance(exc, RegistryNotFound):
        return NotFound(f"{what}: {exc}")
    if isinstance(exc, RegistryError | requests.RequestException | OSError):
        return UpstreamError(f"{what}: {exc}")
    raise exc
