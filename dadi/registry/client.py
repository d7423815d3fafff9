"""A client of the OCI distribution API (v2) for one registry host: manifests and blobs, down and up.

Everything fetched is checked against its digest before it is handed out: a manifest against the
digest asked for and the registry's Docker-Content-Digest header, a whole blob against its digest, a
streamed blob at its end. Idempotent requests (GET, HEAD, PUT of a manifest) are retried with
exponential backoff on 5xx, 429 and connection errors; a blob upload that fails part-way restarts its
upload session from the beginning, a bounded number of times.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from dadi.digests import check_digest
from dadi.errors import ImageError, RegistryDenied, RegistryError, RegistryNotFound, RegistryUnauthorized
from dadi.image.manifest import is_index
from dadi.image.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, INDEX_TYPES, OCI_INDEX, OCI_MANIFEST
from dadi.registry.auth import Credentials, RegistryAuth
from dadi.registry.platform import select_platform

MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
_SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
_MAX_BACKOFF = 10.0
_MAX_RETRY_AFTER = 30.0
_MAX_INDEX_DEPTH = 4  # an index may point at an index; a loop must not recurse forever
_STREAM_BLOCK = 1 << 20
# Network failures worth another try; ChunkedEncodingError is a body cut short mid-transfer.
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class Manifest:
    """A manifest (or index) exactly as the registry stored it; `digest` is sha256 of `body`."""

    body: bytes
    media_type: str
    digest: str

    def json(self) -> Any:
        return json.loads(self.body)


class RegistrySession(requests.Session):
    """A requests.Session that looks the environment's proxy and CA-bundle settings up once per scheme and
    host, not on every request: requests scans os.environ for them twice per request, 0.7 ms of the 1.6 ms
    of CPU a 1 MiB range GET from a local registry cost. What the environment says is still what counts;
    it is only read once (no dadi process changes its proxy variables while it runs)."""

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple, dict[str, Any]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if not self.trust_env or not isinstance(proxies, dict) or not _hashable(verify, cert, self.verify, self.cert):
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(url)
        # Everything the answer depends on but the environment (and the session's own settings with it).
        key = (parts.scheme, parts.netloc, tuple(sorted(proxies.items())), stream, verify, cert,
               tuple(sorted(self.proxies.items())), self.stream, self.verify, self.cert)
        settings = self._environment.get(key)
        if settings is None:
            settings = self._environment[key] = super().merge_environment_settings(
                url, dict(proxies), stream, verify, cert)
        return {**settings, "proxies": dict(settings["proxies"])}  # requests may change what it gets


def _hashable(*values: object) -> bool:
    try:
        hash(values)
    except TypeError:
        return False
    return True


class _TransientError(RegistryError):
    """Network trouble that outlasted the retries; an upload restarts its session on it."""


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_digest(digest: str, what: str) -> str:
    """dadi.digests.check_digest, raising the registry's own error type."""
    try:
        return check_digest(digest, what)
    except ImageError as e:
        raise RegistryError(str(e)) from None


def _network_error_text(exc: Exception) -> str:
    # requests wraps urllib3's MaxRetryError around the cause; the cause is what a user can act on.
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    text = str(reason if reason is not None else exc)
    if text.startswith("HTTPConnection(") or text.startswith("HTTPSConnection("):
        text = text.partition(": ")[2] or text
    return text


def _read_body(resp: requests.Response) -> bytes:
    """`resp.content`, read in one go. requests' own `.content` reads a body in 10 KiB pieces, each through
    urllib3's buffering: 100 Python round trips per MiB. A 1 MiB get_blob from a local registry took
    2.9-3.1 ms of CPU, 1.6-1.7 ms read in one go (1.1-1.3 ms with RegistrySession too). Errors are requests'
    own, as `.content` raises them."""
    if resp._content is False:  # not read yet; requests keeps the body there once read (see Response.content)
        resp._content = b"".join(resp.iter_content(None))  # None: whatever the socket has, all of it
    return resp.content


def registry_error_text(resp: requests.Response) -> str:
    """The registry's own words: the `errors` list of its JSON body, else the start of the body."""
    try:
        raw = resp.content
    except (requests.RequestException, urllib3.exceptions.HTTPError):
        return resp.reason or ""
    try:
        body = json.loads(raw)
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            parts = []
            for err in errors:
                text = f"{err.get('code', '?')}: {err.get('message', '')}".strip()
                detail = err.get("detail")
                if isinstance(detail, str) and detail:
                    text += f" ({detail})"
                parts.append(text)
            return "; ".join(parts)
    except (ValueError, AttributeError):
        pass
    return raw.decode(errors="replace").strip()[:300] or resp.reason or ""


class RegistryClient:
    """Talks to one registry host. Thread-safe as far as requests.Session is (the daemon shares one).

    Credentials come from `authfile` (or the default files, see dadi.registry.auth), unless `credentials`
    gives them or `anonymous` says there are none: then no file is read. A server acting for someone
    else (the supernode, with a node's credentials) must not fall back to its own files.
    """

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        authfile: str | None = None,
        timeout: float = 30,
        retries: int = 4,
        session: requests.Session | None = None,
        backoff: float = 0.25,
        credentials: Credentials | None = None,
        anonymous: bool = False,
    ):
        self.host = host
        self.plain_http = plain_http
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.base_url = f"{'http' if plain_http else 'https'}://{host}/v2/"
        self._own_session = session is None
        self.session = session if session is not None else RegistrySession()
        self.auth = RegistryAuth(
            host, self.session, authfile=authfile, timeout=timeout, credentials=credentials, anonymous=anonymous
        )

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _sleep_before_retry(self, attempt: int, resp: requests.Response | None = None) -> None:
        delay = min(self.backoff * (2**attempt), _MAX_BACKOFF)
        retry_after = resp.headers.get("Retry-After") if resp is not None else None
        if retry_after and retry_after.isdigit():
            delay = min(max(delay, float(retry_after)), _MAX_RETRY_AFTER)
        time.sleep(delay)

    def _connection_hint(self, exc: Exception) -> str:
        if isinstance(exc, requests.exceptions.SSLError) and not self.plain_http:
            return " (is it a plain-HTTP registry? then use --plain-http)"
        return ""

    def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        scopes: tuple[str, ...],
        repository: str,
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | bytes | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
    ) -> requests.Response:
        """One API request with auth and (when retry) backoff. Returns any final response but a 401."""
        attempts = self.retries + 1 if retry else 1
        attempt = 0
        challenged = False
        while True:
            send_headers = dict(headers or {})
            authorization = self.auth.header(scopes, repository)
            if authorization:
                send_headers["Authorization"] = authorization
            data = body() if callable(body) else body
            resp = None
            try:
                # Always streamed at first: an error response's body is read only if wanted, and may be
                # broken (docker-registry 2.8 answers 416 with the blob's Content-Length and a short text).
                resp = self.session.request(
                    method,
                    url,
                    headers=send_headers,
                    data=data,
                    params=params,
                    stream=True,
                    timeout=self.timeout,
                )
                if not stream and resp.status_code < 300:
                    _read_body(resp)  # read now, so that a body cut short is retried
            except _TRANSIENT as exc:
                if resp is not None:
                    resp.close()
                attempt += 1
                if attempt < attempts:
                    self._sleep_before_retry(attempt - 1)
                    continue
                raise _TransientError(
                    f"{what}: {method} {url} failed after {attempt} attempt(s): "
                    f"{_network_error_text(exc)}{self._connection_hint(exc)}"
                ) from exc
            if resp.status_code == 401:
                text = registry_error_text(resp)
                resp.close()
                if not challenged:
                    challenged = True
                    if self.auth.handle_challenge(
                        resp.headers.get("WWW-Authenticate", ""), scopes, repository
                    ):
                        continue
                raise RegistryUnauthorized(
                    f"unauthorized: {what}: {method} {url}: HTTP 401: {text} "
                    f"({self.auth.describe_credentials(repository)})"
                )
            if (resp.status_code >= 500 or resp.status_code == 429) and attempt + 1 < attempts:
                attempt += 1
                resp.close()
                self._sleep_before_retry(attempt - 1, resp)
                continue
            return resp

    def _fail(self, resp: requests.Response, what: str) -> RegistryError:
        text = registry_error_text(resp)
        resp.close()
        if resp.status_code == 403:
            return RegistryDenied(
                f"denied: {what}: {resp.request.method} {resp.url}: HTTP 403: {text} "
                f"({self.auth.describe_credentials()})"
            )
        return RegistryError(f"{what}: {resp.request.method} {resp.url}: HTTP {resp.status_code}: {text}")

    @staticmethod
    def _pull(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull",)

    @staticmethod
    def _push(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull,push",)

    # ---- manifests -----------------------------------------------------------------------------

    def get_manifest(
        self, repository: str, reference: str, *, platform: str | None = "linux/amd64"
    ) -> Manifest:
        """The manifest for reference (tag or digest). An index / manifest list is resolved to the
        manifest of platform ("os/arch[/variant]"); platform=None returns the index itself."""
        manifest = self._fetch_manifest(repository, reference)
        where = (
            f"{self.host}/{repository}:{reference}"
            if ":" not in reference
            else f"{self.host}/{repository}@{reference}"
        )
        for _ in range(_MAX_INDEX_DEPTH):
            if platform is None or not self._is_index(manifest):
                return manifest
            entry = select_platform(manifest.json(), platform, f"index {where} ({manifest.digest})")
            digest = _check_digest(entry.get("digest", ""), f"index {where}: entry for {platform}")
            manifest = self._fetch_manifest(repository, digest)
            size = entry.get("size")
            if isinstance(size, int) and size != len(manifest.body):
                raise RegistryError(
                    f"manifest {self.host}/{repository}@{digest}: {len(manifest.body)} bytes, "
                    f"but the index says {size}"
                )
        raise ImageError(f"{where}: indexes nested deeper than {_MAX_INDEX_DEPTH} levels")

    @staticmethod
    def _is_index(manifest: Manifest) -> bool:
        if manifest.media_type in INDEX_TYPES:
            return True
        if manifest.media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
            return False
        # An index stored without a specific content type still says what it is by its shape.
        try:
            body = manifest.json()
        except ValueError:
            return False
        return isinstance(body, dict) and is_index(body, None)

    def _fetch_manifest(self, repository: str, reference: str) -> Manifest:
        by_digest = ":" in reference
        if by_digest:
            _check_digest(reference, f"manifest {self.host}/{repository}")
        what = f"manifest {self.host}/{repository}{'@' if by_digest else ':'}{reference}"
        resp = self._request(
            "GET",
            self._url(f"{repository}/manifests/{reference}"),
            what=what,
            scopes=self._pull(repository),
            repository=repository,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status_code == 404:
            raise RegistryNotFound(
                f"{what}: not found (HTTP 404: {registry_error_text(resp)}); "
                f"no such repository or {'digest' if by_digest else 'tag'} in it"
            )
        if resp.status_code != 200:
            raise self._fail(resp, what)
        body = resp.content
        actual = _sha256(body)
        if by_digest and actual != reference:
            raise RegistryError(
                f"{what}: registry sent bytes whose digest is wrong: expected {reference}, got {actual}"
            )
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:") and claimed != actual:
            raise RegistryError(
                f"{what}: registry's Docker-Content-Digest does not match the bytes it sent: "
                f"expected {claimed}, got {actual}"
            )
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
            try:
                declared = json.loads(body).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            media_type = declared or media_type
        if media_type in _SCHEMA1_TYPES:
            raise ImageError(
                f"{what}: Docker schema 1 manifests are not supported (push it again with a current tool)"
            )
        return Manifest(body=body, media_type=media_type, digest=actual)

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest under reference (a tag, or its own digest); returns its digest."""
        digest = _sha256(body)
        what = f"put manifest {self.host}/{repository}:{reference}"
        if ":" in reference and reference != digest:
            raise RegistryError(f"{what}: the manifest's digest is {digest}, not the reference {reference}")
        resp = self._request(
            "PUT",
            self._url(f"{repository}/manifests/{reference}"),
            what=what,
            scopes=self._push(repository),
            repository=repository,
            headers={"Content-Type": media_type},
            body=bytes(body),
        )
        if resp.status_code not in (200, 201):
            raise self._fail(resp, what)
        claimed = resp.headers.get("Docker-Content-Digest")
        resp.close()
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise RegistryError(f"{what}: registry stored it as {claimed}, expected {digest}")
        return digest

    # ---- blobs down ----------------------------------------------------------------------------

    def head_blob(self, repository: str, digest: str) -> int | None:
        """The blob's size if the repository has it, else None."""
        _check_digest(digest, f"blob in {self.host}/{repository}")
        what = f"blob {self.host}/{repository}@{digest}"
        resp = self._request(
            "HEAD",
            self._url(f"{repository}/blobs/{digest}"),
            what=what,
            scopes=self._pull(repository),
            repository=repository,
        )
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, what)
        length = resp.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RegistryError(f"{what}: HEAD answered without a Content-Length")
        return int(length)

    def get_blob(self, repository: str, digest: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of a blob (to its end when length is None).

        The whole blob is checked against its digest. A range cannot be (the chunk tables carry the
        hashes that check ranges), but its position and length are.
        """
        _check_digest(digest, f"blob in {self.host}/{repository}")
        if offset < 0 or (length is not None and length < 0):
            raise RegistryError(f"blob {digest}: bad range offset={offset} length={length}")
        if length == 0:
            return b""
        what = f"blob {self.host}/{repository}@{digest}"
        whole = offset == 0 and length is None
        headers = {"Accept-Encoding": "identity"}
        if not whole:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
            what += f" bytes {offset}-{last}"
        resp = self._request(
            "GET",
            self._url(f"{repository}/blobs/{digest}"),
            what=what,
            scopes=self._pull(repository),
            repository=repository,
            headers=headers,
        )
        if resp.status_code == 404:
            raise RegistryNotFound(
                f"{what}: not found (HTTP 404: {registry_error_text(resp)}); no such blob in {repository}"
            )
        if resp.status_code == 416:
            resp.close()
            raise RegistryError(
                f"{what}: range beyond the blob's end (HTTP 416, {resp.headers.get('Content-Range', '')})"
            )
        if resp.status_code == 200:
            # Whole blob: either asked for, or a server that ignores Range. Either way it can be checked.
            data = resp.content
            actual = _sha256(data)
            if actual != digest:
                raise RegistryError(
                    f"{what}: registry sent bytes whose digest is wrong: expected {digest}, got {actual}"
                )
            if whole:
                return data
            data = data[offset:] if length is None else data[offset : offset + length]
        elif resp.status_code == 206 and not whole:
            data = resp.content
            self._check_content_range(resp.headers.get("Content-Range", ""), offset, len(data), what)
        else:
            raise self._fail(resp, what)
        if length is not None and len(data) != length:
            raise RegistryError(
                f"{what}: asked for {length} bytes at offset {offset}, got {len(data)} (past the blob's end?)"
            )
        return data

    @staticmethod
    def _check_content_range(header: str, offset: int, received: int, what: str) -> None:
        # "bytes START-END/TOTAL": a proxy that shifts or truncates a range must not go unnoticed.
        try:
            unit, _, spec = header.partition(" ")
            span, _, _total = spec.partition("/")
            start, _, end = span.partition("-")
            start_i, end_i = int(start), int(end)
        except ValueError:
            if header:
                raise RegistryError(f"{what}: malformed Content-Range {header!r}") from None
            return
        if unit != "bytes" or start_i != offset or end_i - start_i + 1 != received:
            raise RegistryError(
                f"{what}: registry answered range {header!r} with {received} bytes; expected start {offset}"
            )

    def open_blob(self, repository: str, digest: str) -> BlobStream:
        """A stream of a whole blob, hashed as it is read; RegistryError at EOF on a wrong digest or size.
        A connection that breaks mid-way is resumed with a Range request (bounded)."""
        _check_digest(digest, f"blob in {self.host}/{repository}")
        return BlobStream(self, repository, digest)

    def _open_blob_response(self, repository: str, digest: str, offset: int) -> requests.Response:
        what = f"blob {self.host}/{repository}@{digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self._request(
            "GET",
            self._url(f"{repository}/blobs/{digest}"),
            what=what,
            scopes=self._pull(repository),
            repository=repository,
            headers=headers,
            stream=True,
        )
        if resp.status_code == 404:
            raise RegistryNotFound(
                f"{what}: not found (HTTP 404: {registry_error_text(resp)}); no such blob in {repository}"
            )
        if resp.status_code == (206 if offset else 200):
            return resp
        raise self._fail(resp, what)

    # ---- blobs up ------------------------------------------------------------------------------

    def put_blob(
        self,
        repository: str,
        digest: str,
        source: bytes | str | os.PathLike | BinaryIO,
        size: int,
        *,
        chunk_size: int | None = None,
        mount_from: str | None = None,
    ) -> str:
        """Make the repository hold the blob: "exists" (it did), "mounted" (linked from mount_from,
        no bytes sent) or "uploaded" (monolithic, or chunked PATCHes when chunk_size is given)."""
        _check_digest(digest, f"blob for {self.host}/{repository}")
        what = f"upload of blob {digest} to {self.host}/{repository}"
        if chunk_size is not None and chunk_size <= 0:
            raise RegistryError(f"{what}: chunk_size must be positive, not {chunk_size}")
        body = _UploadSource(source, size, what)
        if self.head_blob(repository, digest) is not None:
            return "exists"
        scopes = self._push(repository)
        if mount_from:
            scopes += self._pull(mount_from)
        failures = 0
        while True:
            try:
                return self._upload_once(repository, digest, body, size, chunk_size, mount_from, scopes, what)
            except _TransientError as exc:
                failures += 1
                if failures > self.retries or not body.restartable:
                    raise RegistryError(
                        f"{what}: gave up after {failures} failed upload session(s): {exc}"
                    ) from exc
                self._sleep_before_retry(failures - 1)

    def _upload_once(self, repository, digest, body, size, chunk_size, mount_from, scopes, what) -> str:
        def call(method: str, url: str, *, expect: tuple[int, ...], **kwargs: Any) -> requests.Response:
            resp = self._request(
                method, url, what=what, scopes=scopes, repository=repository, retry=False, **kwargs
            )
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _TransientError(
                    f"{method} {resp.url}: HTTP {resp.status_code}: {registry_error_text(resp)}"
                )
            if resp.status_code not in expect:
                raise self._fail(resp, what)
            resp.close()
            return resp

        start_url = self._url(f"{repository}/blobs/uploads/")
        if mount_from:
            resp = call("POST", start_url, expect=(201, 202), params={"mount": digest, "from": mount_from})
            if resp.status_code == 201:
                return "mounted"
        else:
            resp = call("POST", start_url, expect=(202,))
        location = self._location(resp, what)

        octet = {"Content-Type": "application/octet-stream"}
        if chunk_size:
            for start in range(0, size, chunk_size):
                end = min(size, start + chunk_size)
                resp = call(
                    "PATCH",
                    location,
                    expect=(202,),
                    body=lambda s=start, e=end: body.segment(s, e),
                    headers={
                        **octet,
                        "Content-Range": f"{start}-{end - 1}",
                        "Content-Length": str(end - start),
                    },
                )
                location = self._location(resp, what)
            resp = call(
                "PUT", _with_query(location, digest=digest), expect=(201,), headers={"Content-Length": "0"}
            )
        else:
            resp = call(
                "PUT",
                _with_query(location, digest=digest),
                expect=(201,),
                body=lambda: body.segment(0, size),
                headers={**octet, "Content-Length": str(size)},
            )
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed != digest:
            raise RegistryError(f"{what}: registry stored it as {claimed}")
        return "uploaded"

    @staticmethod
    def _location(resp: requests.Response, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(
                f"{what}: {resp.request.method} {resp.url}: HTTP {resp.status_code} without a Location"
            )
        # Registries answer with absolute URLs or with paths; a path is relative to the request's URL.
        return urljoin(resp.url, location)


def _with_query(url: str, **params: str) -> str:
    # Upload URLs carry the registry's own state in their query (_state=...); keep it and add ours.
    return url + ("&" if "?" in url else "?") + urlencode(params)


class _LimitedReader:
    """The next `length` bytes of a file, as a request body with a known length (no chunked encoding)."""

    def __init__(self, file: BinaryIO, length: int, close: bool):
        self._file = file
        self._left = length
        self._length = length
        self._close = close

    def __len__(self) -> int:
        return self._length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            if self._close:
                self._file.close()
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._file.read(n)
        if not data:
            raise RegistryError(f"upload source ended {self._left} bytes early")
        self._left -= len(data)
        return data

    def __iter__(self):
        while True:
            block = self.read(_STREAM_BLOCK)
            if not block:
                return
            yield block


class _UploadSource:
    """bytes, a path or a stream, handed out as (re-readable where possible) body segments."""

    def __init__(self, source: bytes | str | os.PathLike | BinaryIO, size: int, what: str):
        self._bytes: memoryview | None = None
        self._path: Path | None = None
        self._stream: BinaryIO | None = None
        if size < 0:
            raise RegistryError(f"{what}: negative size {size}")
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._bytes = memoryview(source)
            if len(self._bytes) != size:
                raise RegistryError(f"{what}: {len(self._bytes)} bytes given, but size says {size}")
        elif isinstance(source, (str, os.PathLike)):
            self._path = Path(source)
            try:
                actual = self._path.stat().st_size
            except OSError as exc:
                raise RegistryError(f"{what}: cannot read {self._path}: {exc.strerror}") from exc
            if actual != size:
                raise RegistryError(f"{what}: {self._path} has {actual} bytes, but size says {size}")
        else:
            self._stream = source
            self._start = source.tell() if _seekable(source) else None
            self._next = 0  # a non-seekable stream can only be read forward
        self.restartable = self._stream is None or self._start is not None

    def segment(self, start: int, end: int) -> Any:
        if self._bytes is not None:
            return self._bytes[start:end].tobytes()
        if self._path is not None:
            file = self._path.open("rb")
            file.seek(start)
            return _LimitedReader(file, end - start, close=True)
        assert self._stream is not None
        if self._start is not None:
            self._stream.seek(self._start + start)
        elif start != self._next:
            raise RegistryError(
                "upload source is a stream that cannot seek, and the upload had to start over"
            )
        else:
            self._next = end
        return _LimitedReader(self._stream, end - start, close=False)


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class BlobStream(io.RawIOBase):
    """A blob read from the registry as a stream, verified as it goes.

    read() returning b"" means every byte arrived and hashed to the digest; anything else raises
    RegistryError there. A broken connection resumes where it broke with a Range request.
    """

    def __init__(self, client: RegistryClient, repository: str, digest: str):
        super().__init__()
        self._client = client
        self._repository = repository
        self.digest = digest
        self._what = f"blob {client.host}/{repository}@{digest}"
        self._hash = hashlib.sha256()
        self.bytes_read = 0
        self._resumes = 0
        self._verified = False
        self._resp = client._open_blob_response(repository, digest, 0)
        self.size = self._size_of(self._resp)

    @staticmethod
    def _size_of(resp: requests.Response) -> int | None:
        length = resp.headers.get("Content-Length")
        if resp.headers.get("Content-Encoding") or not length or not length.isdigit():
            return None
        return int(length)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._verified or len(buffer) == 0:
            return 0
        data = self._read_some(len(buffer))
        if not data:
            self._verify()
            return 0
        self._hash.update(data)
        self.bytes_read += len(data)
        if self.size is not None and self.bytes_read > self.size:
            raise RegistryError(f"{self._what}: registry sent more than the {self.size} bytes it announced")
        buffer[: len(data)] = data
        return len(data)

    def _read_some(self, n: int) -> bytes:
        while True:
            try:
                # read1: whatever has arrived (up to n), so bytes before a break are kept, not lost.
                return self._resp.raw.read1(n, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                self._resp.close()
                self._resumes += 1
                if self._resumes > self._client.retries:
                    raise RegistryError(
                        f"{self._what}: connection broke after {self.bytes_read} bytes, "
                        f"{self._resumes} times: {exc}"
                    ) from exc
                self._client._sleep_before_retry(self._resumes - 1)
                self._resp = self._client._open_blob_response(self._repository, self.digest, self.bytes_read)
                content_range = self._resp.headers.get("Content-Range", "")
                if self.bytes_read and not content_range.startswith(f"bytes {self.bytes_read}-"):
                    self._resp.close()
                    raise RegistryError(
                        f"{self._what}: resuming at byte {self.bytes_read}, the registry answered "
                        f"Content-Range {content_range!r}"
                    ) from exc

    def _verify(self) -> None:
        self._verified = True
        self._resp.close()
        if self.size is not None and self.bytes_read != self.size:
            raise RegistryError(f"{self._what}: stream ended after {self.bytes_read} of {self.size} bytes")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise RegistryError(
                f"{self._what}: registry sent bytes whose digest is wrong: "
                f"expected {self.digest}, got {actual}"
            )

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
        super().close()
