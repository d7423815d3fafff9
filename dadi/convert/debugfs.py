"""Writing and running one `debugfs -w` command batch, and finding every error in its output.

debugfs is e2fsprogs' user-space file system editor: it changes an ext4 image through libext2fs, with no
kernel mount and no root privileges. In batch mode (`-f FILE`) it never stops at an error and exits 0,
so the output is the only record of what failed: it echoes each command as `debugfs: CMD` and prints
errors after it. Run with line-buffered stdout and stderr on one pipe (`stdbuf -oL -eL`), every line
after an echo belongs to that command.

Quoting (lib/ss/parse.c, measured with e2fsprogs 1.47.0): arguments split at spaces and tabs; inside
double quotes everything is literal except `""`, which stands for one quote character; there is no
backslash escape. So `"..."` with doubled quotes expresses every byte except NUL, LF and CR: the batch
file is read line by line (and debugfs cuts a line at CR). Names holding LF or CR cannot be expressed.
Lines are read into a BUFSIZ (8192) buffer, so a line must stay shorter than that.

Commands that parse options with getopt (`ea_set`, `ea_rm`) take a name starting with `-` as an option:
the caller passes `./NAME` to them. Creation commands (`write`, `mkdir`, `symlink`, `mknod`, `ln`) take
the bare name of an entry in the current directory; `mknod` only ever works that way (a path argument
creates one entry whose name contains slashes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from dadi.errors import DadiError

# debugfs reads its batch file with fgets(buf, BUFSIZ): a longer line would be cut into two commands.
MAX_LINE = 8000

# Lines debugfs prints that are not errors.
_BENIGN = re.compile(rb"^(Allocated inode: \d+|Setting current time to .*|debugfs \d[\d.]* \(.*\)|)$")
_ECHO = b"debugfs: "


class UnquotableName(ValueError):
    """A name holds a byte (LF, CR, NUL) that a debugfs batch line cannot carry."""


def quote(name: bytes) -> bytes:
    """One debugfs argument that stands for exactly these bytes."""
    if b"\n" in name or b"\r" in name or b"\0" in name:
        raise UnquotableName(f"a debugfs batch cannot express a name containing LF, CR or NUL: {name!r}")
    return b'"' + name.replace(b'"', b'""') + b'"'


class DebugfsBatch:
    """An ordered list of debugfs commands, each remembering the tar entry it was written for."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._origins: list[str | None] = []

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, line: bytes, origin: str | None) -> None:
        if len(line) >= MAX_LINE:
            raise UnquotableName(f"debugfs command longer than {MAX_LINE} bytes: {line[:80]!r}...")
        self._lines.append(line)
        self._origins.append(origin)

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(b"\n".join(self._lines))
            f.write(b"\n")

    def run(self, disk: Path, cmdfile: Path, *, env: dict[str, str]) -> None:
        """Run the batch against `disk`; raises BatchError naming every command that printed an error."""
        self.write(cmdfile)
        argv = ["debugfs", "-w", "-f", str(cmdfile), str(disk)]
        # Line buffering on both streams keeps each error right after the echo of its command.
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
            argv = [stdbuf, "-oL", "-eL", *argv]
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        failures = self._failures(result.stdout)
        if result.returncode != 0 or failures:
            raise BatchError(disk, result.returncode, failures, result.stdout)

    def _failures(self, output: bytes) -> list[tuple[int, bytes, str | None, bytes]]:
        """(command index, command, origin, error text) for every command that printed something odd."""
        failures: dict[int, list[bytes]] = {}
        index = -1
        for line in output.split(b"\n"):
            if line.startswith(_ECHO) and index + 1 < len(self._lines) and line[len(_ECHO):] == self._lines[
                index + 1
            ]:
                index += 1
                continue
            if _BENIGN.match(line):
                continue
            failures.setdefault(index, []).append(line)
        out = []
        for i, lines in failures.items():
            if i < 0:
                out.append((i, b"", None, b"\n".join(lines)))
            else:
                out.append((i, self._lines[i], self._origins[i], b"\n".join(lines)))
        return out


class BatchError(DadiError):
    """debugfs reported errors; `failures` lists (index, command, tar entry, message)."""

    def __init__(self, disk: Path, returncode: int, failures: list, output: bytes):
        self.failures = failures
        self.returncode = returncode
        if failures:
            first = failures[0]
            what = (
                f"command {first[0] + 1} {first[1].decode(errors='replace')!r}"
                + (f" (for tar entry {first[2]!r})" if first[2] is not None else "")
                + f" failed: {first[3].decode(errors='replace').strip()}"
            )
            if len(failures) > 1:
                what += f" (and {len(failures) - 1} more failed commands)"
        else:
            tail = output[-2000:].decode(errors="replace")
            what = f"exit status {returncode}: {tail}"
        super().__init__(f"debugfs on {disk}: {what}")

    @property
    def first_origin(self) -> str | None:
        return self.failures[0][2] if self.failures else None
