"""Registry credentials and the two auth schemes registries use: Basic, and Bearer tokens.

Credentials come from the files docker, podman and skopeo write (`{"auths": {HOST: {"auth": base64}}}`):
an explicit authfile, else `$REGISTRY_AUTH_FILE` (podman's variable), else `$DOCKER_CONFIG/config.json`,
else `~/.docker/config.json`. Credential helpers (`credsStore`, `credHelpers`) are not run.

`RegistryAuth` answers "which Authorization header goes on a request for this scope", learning the
scheme from the registry's first 401 challenge. Bearer tokens are cached per scope set until shortly
before they expire; a registry that hands out anonymous tokens works without credentials.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from dadi.errors import RegistryDenied, RegistryError, RegistryUnauthorized

# A token this close to its expiry is fetched anew, so that it does not run out in flight.
_EXPIRY_MARGIN = 10.0
# RFC 6750 / the distribution token spec: a token without expires_in is good for 60 seconds.
_DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # the file they came from, for error messages


def default_authfile() -> Path:
    """Where credentials are looked up when no authfile is given."""
    podman = os.environ.get("REGISTRY_AUTH_FILE")
    if podman:
        return Path(podman)
    docker_dir = os.environ.get("DOCKER_CONFIG")
    if docker_dir:
        return Path(docker_dir) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _normalise_key(key: str) -> str:
    # Keys appear as "host", "https://host", "http://host/v1/" (docker login's legacy Hub key) etc.
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    if key in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return "registry-1.docker.io"
    return key


def load_credentials(
    host: str, repository: str | None = None, authfile: str | os.PathLike | None = None
) -> tuple[Credentials | None, Path]:
    """Credentials for host (and repository: podman allows per-namespace keys like HOST/NS) and the file
    they were looked up in. An explicit authfile must exist; the default files may be absent."""
    path = Path(authfile) if authfile is not None else default_authfile()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if authfile is not None:
            raise RegistryError(f"authfile {path}: no such file") from None
        return None, path
    except OSError as exc:
        raise RegistryError(f"authfile {path}: cannot read: {exc.strerror}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"authfile {path}: not valid JSON: {exc}") from exc
    auths = config.get("auths") if isinstance(config, dict) else None
    if auths is None:
        return None, path
    if not isinstance(auths, dict):
        raise RegistryError(f'authfile {path}: "auths" is not an object')

    wanted = _normalise_key(host)
    candidates = [wanted]
    if repository:
        # Most specific first: HOST/a/b/c, HOST/a/b, HOST/a, then HOST.
        parts = repository.split("/")
        candidates = [f"{wanted}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + candidates
    by_key = {_normalise_key(k): v for k, v in auths.items()}
    for key in candidates:
        entry = by_key.get(key)
        if entry is not None:
            return _parse_entry(entry, key, path), path
    return None, path


def _parse_entry(entry: object, key: str, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        raise RegistryError(f"authfile {path}: entry for {key} is not an object")
    where = f"authfile {path}: entry for {key}"
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryError(f'{where}: "auth" is not base64 of USER:PASSWORD') from exc
        username, colon, password = decoded.partition(":")
        if not colon:
            raise RegistryError(f'{where}: "auth" decodes to no USER:PASSWORD pair')
        return Credentials(username, password, str(path))
    if entry.get("username") is not None:
        return Credentials(str(entry["username"]), str(entry.get("password", "")), str(path))
    return None


def basic_authorization(credentials: Credentials) -> str:
    """The Authorization header value that sends these credentials with the Basic scheme."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercase
    params: dict[str, str]


_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> Challenge | None:
    """Parse a WWW-Authenticate header (`Bearer realm="...",service="...",scope="..."` or `Basic ...`)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {}
    for match in _PARAM_RE.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    value: str
    expires_at: float


class RegistryAuth:
    """The Authorization header for requests to one registry host; thread-safe.

    Flow: a request goes out with whatever header we already have for its scope (none at first); on 401
    the client calls `handle_challenge`, which learns the scheme (and fetches a token for Bearer), and
    retries once. A second 401 means the credentials are wrong or insufficient.
    """

    def __init__(
        self,
        host: str,
        session: requests.Session,
        *,
        authfile: str | os.PathLike | None = None,
        timeout: float = 30,
        credentials: Credentials | None = None,
        anonymous: bool = False,
    ):
        if (credentials is not None) + anonymous + (authfile is not None) > 1:
            raise ValueError("RegistryAuth: give credentials, or anonymous, or an authfile, not several")
        self.host = host
        self._session = session
        self._authfile = authfile
        self._timeout = timeout
        self._lock = threading.Lock()
        # Given credentials (or anonymous=True) replace the files for every repository.
        self._fixed = credentials is not None or anonymous
        self._fixed_credentials = credentials
        self._credentials: dict[str | None, tuple[Credentials | None, Path]] = {}
        self._scheme: str | None = None  # learned from the first challenge
        self._bearer_params: dict[str, str] = {}
        self._tokens: dict[tuple[str, ...], _Token] = {}
        # What the registry's challenge asked for when a request needed scopes; used from then on.
        self._scope_alias: dict[tuple[str, ...], tuple[str, ...]] = {}

    def credentials(self, repository: str | None = None) -> tuple[Credentials | None, Path | None]:
        """The credentials for repository and the file they were looked up in (None: no file was read)."""
        if self._fixed:
            return self._fixed_credentials, None
        with self._lock:
            if repository not in self._credentials:
                self._credentials[repository] = load_credentials(self.host, repository, self._authfile)
            return self._credentials[repository]

    def describe_credentials(self, repository: str | None = None) -> str:
        """For error messages: which credentials were used, and from where."""
        creds, path = self.credentials(repository)
        if creds is None:
            return f"no credentials for {self.host} " + (f"in {path}" if path is not None else "(anonymous)")
        return f"credentials of user {creds.username!r} for {self.host} from {creds.source}"

    def header(self, scopes: tuple[str, ...], repository: str | None = None) -> str | None:
        """The Authorization header for a request needing scopes, or None before any challenge."""
        if self._scheme == "basic":
            return self._basic_header(repository)
        if self._scheme == "bearer":
            key = tuple(sorted(set(scopes)))
            return "Bearer " + self._token(self._scope_alias.get(key, key), repository)
        return None

    def handle_challenge(
        self, www_authenticate: str, scopes: tuple[str, ...], repository: str | None = None
    ) -> bool:
        """Learn from a 401's challenge; True if a retry with new credentials could succeed."""
        challenge = parse_challenge(www_authenticate or "")
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            self._scheme = "basic"
            return self._basic_header(repository) is not None
        if challenge.scheme == "bearer":
            if "realm" not in challenge.params:
                raise RegistryError(f"{self.host}: Bearer challenge without a realm: {www_authenticate!r}")
            self._scheme = "bearer"
            self._bearer_params = challenge.params
            # The challenge's scope is what the registry wants for this request; merge ours in, since
            # a cross-repository mount needs pull on the source too.
            wanted = tuple(sorted(set(scopes) | set(challenge.params.get("scope", "").split())))
            with self._lock:
                self._scope_alias[tuple(sorted(set(scopes)))] = wanted
                # The cached token (if any) was just refused: get a fresh one.
                self._tokens.pop(wanted, None)
            self._token(wanted, repository)
            return True
        raise RegistryError(
            f"{self.host}: unsupported auth scheme {challenge.scheme!r} in {www_authenticate!r}"
        )

    def _basic_header(self, repository: str | None) -> str | None:
        creds, _ = self.credentials(repository)
        return basic_authorization(creds) if creds is not None else None

    def _token(self, scopes: tuple[str, ...], repository: str | None) -> str:
        key = tuple(sorted(set(scopes)))
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at - _EXPIRY_MARGIN > time.monotonic():
                return cached.value
        token = self._fetch_token(key, repository)
        with self._lock:
            self._tokens[key] = token
        return token.value

    def _fetch_token(self, scopes: tuple[str, ...], repository: str | None) -> _Token:
        realm = self._bearer_params["realm"]
        query: list[tuple[str, str]] = []
        if "service" in self._bearer_params:
            query.append(("service", self._bearer_params["service"]))
        query.extend(("scope", s) for s in scopes)
        creds, _ = self.credentials(repository)
        auth = (creds.username, creds.password) if creds else None
        started = time.monotonic()
        try:
            resp = self._session.get(realm, params=query, auth=auth, timeout=self._timeout)
        except requests.RequestException as exc:
            raise RegistryError(f"token service {realm} for {self.host}: {exc}") from exc
        if resp.status_code in (401, 403):
            raise (RegistryUnauthorized if resp.status_code == 401 else RegistryDenied)(
                f"unauthorized: token service {realm} refused {' '.join(scopes) or 'access'} "
                f"(HTTP {resp.status_code}: {resp.text[:200].strip()}) "
                f"({self.describe_credentials(repository)})"
            )
        if resp.status_code != 200:
            raise RegistryError(
                f"token service {realm} for {self.host}: HTTP {resp.status_code}: {resp.text[:200].strip()}"
            )
        try:
            body = resp.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryError(f"token service {realm} for {self.host}: answer is not a token JSON") from exc
        if not value:
            raise RegistryError(f"token service {realm} for {self.host}: answer has no token")
        # Count the lifetime from when we asked: the clock of the token service is not ours.
        return _Token(str(value), started + lifetime)
