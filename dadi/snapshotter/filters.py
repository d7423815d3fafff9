"""containerd's filter syntax for List, the part snapshots need.

A filter is selectors joined by `,` (all must hold); several filters: any may hold. A selector is
`FIELD`, `FIELD==VALUE`, `FIELD!=VALUE` or `FIELD~=REGEXP`; FIELD is `name`, `parent`, `kind` or
`labels.KEY` (KEY may be quoted, `labels."containerd.io/snapshot.ref"`); VALUE may be quoted. containerd
sends `labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT` when it looks for a remote snapshot
(and checks the answer itself, so a filter we cannot parse matches everything rather than nothing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_SELECTOR = re.compile(r"""
    \s*(?P<field>(?:[A-Za-z0-9_]+|"(?:[^"\\]|\\.)*")(?:\.(?:[A-Za-z0-9_./-]+|"(?:[^"\\]|\\.)*"))*)\s*
    (?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,"]*?))?\s*(?:,|$)""", re.VERBOSE)


def _unquote(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


def _split_field(field: str) -> list[str]:
    parts = re.findall(r'"(?:[^"\\]|\\.)*"|[^."]+', field)
    # labels.KEY with an unquoted dotted KEY: the key is everything after the first dot.
    if len(parts) > 2 and parts[0] == "labels" and not any(p.startswith('"') for p in parts[1:]):
        return ["labels", ".".join(parts[1:])]
    return [_unquote(p) for p in parts]


def parse(text: str) -> list[tuple[list[str], str | None, str | None]] | None:
    """[(field path, op, value)], or None when the filter is beyond this parser."""
    selectors = []
    pos = 0
    while pos < len(text):
        match = _SELECTOR.match(text, pos)
        if not match or match.end() == pos:
            return None
        value = match["value"]
        selectors.append((_split_field(match["field"]), match["op"],
                          _unquote(value.strip()) if value is not None else None))
        pos = match.end()
    return selectors


def matcher(filters: list[str], fields: Callable[[object], dict]) -> Callable[[object], bool]:
    """A predicate over items; `fields(item)` gives {"name", "parent", "kind", "labels": {...}}."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed or any(p is None for p in parsed):
        return lambda item: True

    def holds(item) -> bool:
        values = fields(item)
        return any(all(_selector_holds(values, *sel) for sel in selectors) for selectors in parsed)

    return holds


def _selector_holds(values: dict, path: list[str], op: str | None, value: str | None) -> bool:
    if path[0] == "labels" and len(path) == 2:
        actual = values.get("labels", {}).get(path[1])
    elif len(path) == 1:
        actual = values.get(path[0])
    else:
        actual = None
    if op is None:
        return actual is not None and actual != ""
    if op == "==":
        return actual == value
    if op == "!=":
        return actual != value
    try:
        return actual is not None and re.search(value, actual) is not None
    except re.error:
        return False
