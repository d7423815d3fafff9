"""The supernode's small parts without a server: Range parsing, forwarded credentials, image names,
registry errors as HTTP statuses, single-flight."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dadi.errors import RegistryDenied, RegistryError, RegistryNotFound, RegistryUnauthorized
from dadi.p2p.access import parse_authorization
from dadi.p2p.errors import AccessDenied, BadRequest, NotFound, RangeNotSatisfiable, UpstreamError
from dadi.p2p.prewarm import resolve_image
from dadi.p2p.singleflight import SingleFlight
from dadi.p2p.supernode import parse_range
from dadi.p2p.upstream import classify
from dadi.registry import basic_authorization
from dadi.registry.auth import Credentials


@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-0", (0, 1)),
    ("bytes=10-19", (10, 20)),
    ("bytes=90-", (90, 100)),
    ("bytes=90-500", (90, 100)),
    ("bytes=-10", (90, 100)),
    ("bytes=-1000", (0, 100)),
    (" bytes=1-2 ", (1, 3)),
])
def test_ranges_are_parsed_as_rfc_9110_says(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header, error", [
    ("bytes=100-", RangeNotSatisfiable),
    ("bytes=-0", RangeNotSatisfiable),
    ("bytes=5-4", BadRequest),
    ("bytes=0-1,3-4", BadRequest),
    ("items=0-1", BadRequest),
    ("bytes=-", BadRequest),
])
def test_bad_ranges_are_refused_with_the_right_status(header, error):
    with pytest.raises(error):
        parse_range(header, 100)


def test_forwarded_credentials():
    assert parse_authorization(None) is None
    creds = parse_authorization(basic_authorization(Credentials("alice", "pa:ss", "x")))
    assert (creds.username, creds.password) == ("alice", "pa:ss")
    for header in ("Bearer abc", "Basic !!!", "Basic " + "bm9jb2xvbg=="):  # the last is "nocolon"
        with pytest.raises(AccessDenied) as info:
            parse_authorization(header)
        assert info.value.status == 401


def test_image_names_resolve_to_the_supernodes_registry():
    ref = resolve_image("dadi/app:v1", "reg.example:5000")
    assert (ref.host, ref.repository, ref.reference) == ("reg.example:5000", "dadi/app", "v1")
    assert resolve_image("docker://reg.example:5000/app:v2", "reg.example:5000").repository == "app"
    assert resolve_image("app", "reg.example:5000").reference == "latest"
    with pytest.raises(BadRequest, match="serves the registry reg.example:5000"):
        resolve_image("other.example/app:v1", "reg.example:5000")


def test_registry_errors_become_http_statuses():
    assert classify(RegistryUnauthorized("x"), "w").status == 401
    assert classify(RegistryDenied("x"), "w").status == 403
    assert isinstance(classify(RegistryNotFound("x"), "w"), NotFound)
    assert isinstance(classify(RegistryError("x"), "w"), UpstreamError)
    assert isinstance(classify(OSError("x"), "w"), UpstreamError)


def test_single_flight_runs_the_work_once_for_every_concurrent_caller_and_survives_their_leaving():
    runs = []
    waits = []

    async def main():
        release = trio.Event()

        async def work():
            runs.append(1)
            await release.wait()
            return b"piece"

        async with trio.open_nursery() as server:
            flights = SingleFlight(server, on_wait=lambda: waits.append(1))
            got = []

            async def caller(scope: trio.CancelScope):
                with scope:
                    got.append(await flights.run("key", work))

            leaving = trio.CancelScope()
            async with trio.open_nursery() as callers:
                callers.start_soon(caller, trio.CancelScope())  # the first caller starts the work
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(3):
                    callers.start_soon(caller, trio.CancelScope())
                callers.start_soon(caller, leaving)
                await trio.testing.wait_all_tasks_blocked()
                assert flights.waiters("key") == 4
                leaving.cancel()  # one caller leaves: the work goes on for the others
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            assert sorted(got) == [(b"piece", False)] + [(b"piece", True)] * 3
            assert len(flights) == 0

            # Errors are shared, and the next call runs the work anew.
            async def failing():
                raise UpstreamError("registry down")

            with pytest.raises(UpstreamError):
                await flights.run("other", failing)
            assert await flights.run("key", work) == (b"piece", False)

    trio.run(main)
    assert len(runs) == 2 and len(waits) == 4
