"""Sizes and rates as people write them on command lines and in config files."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str | int) -> int:
    """'64G', '64GiB', '65536', '64k' -> bytes (binary units); ValueError says what was wrong."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text} is not a size: negative")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 64KiB, 64G)")
    return int(match.group(1)) << _SHIFT[match.group(2).lower()]


def parse_rate(text: str | int) -> int:
    """'100M', '100MiB/s', '1G/s' -> bytes per second."""
    value = text.strip() if isinstance(text, str) else text
    if isinstance(value, str) and value.lower().endswith("/s"):
        value = value[:-2]
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (e.g. 100MiB/s, 1G)") from None
