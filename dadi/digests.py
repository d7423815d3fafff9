"""sha256 digests in OCI form ("sha256:<hex>"), chain ids, and a stream reader that verifies as it reads."""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from dadi.errors import ImageError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str) -> str:
    """Return digest if it is a well-formed sha256 digest; refuse others (they become file names)."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageError(f"{what}: not a sha256 digest: {digest!r}")
    return digest


def digest_hex(digest: str) -> str:
    return check_digest(digest, "digest")[len("sha256:") :]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainIDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append(sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains


class VerifyingReader:
    """Wraps a stream; hashes what passes through and raises at EOF when the digest or size is wrong.

    The caller must read to the end (read() returning b"") for the check to run: the converter does,
    because a layer tar is consumed whole.
    """

    def __init__(self, stream: BinaryIO, digest: str, size: int | None, what: str):
        self._stream = stream
        self._expected = check_digest(digest, what)
        self._size = size
        self._what = what
        self._hash = hashlib.sha256()
        self.bytes_read = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._hash.update(data)
            self.bytes_read += len(data)
            if self._size is not None and self.bytes_read > self._size:
                raise ImageError(f"{self._what}: longer than the {self._size} bytes its descriptor says")
        elif n != 0:
            self.verify()
        return data

    def verify(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._size is not None and self.bytes_read != self._size:
            raise ImageError(
                f"{self._what}: {self.bytes_read} bytes, but its descriptor says {self._size} (truncated?)"
            )
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._expected:
            raise ImageError(f"{self._what}: digest mismatch: expected {self._expected}, got {actual}")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
