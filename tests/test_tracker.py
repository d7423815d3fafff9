"""The tracker's policy (dadi/p2p/tracker.py) and the P2P wire protocol (dadi/p2p/peerproto.py): pure
functions, no network. What a node would notice: whether it is sent to a peer, to which, and when not."""

from __future__ import annotations

import json
import random

import pytest

from dadi.p2p.errors import BadRequest
from dadi.p2p.peerproto import (
    Announce,
    check_ticket,
    format_reports,
    make_ticket,
    parse_announce,
    parse_reports,
    peer_key,
)
from dadi.p2p.tracker import (
    CORRUPT,
    FAILED,
    HOT_REQUESTS,
    HOT_WINDOW,
    PEER_FANOUT,
    SAMPLE,
    HotPieces,
    PeerState,
    RedirectPolicy,
    Seeds,
    Tracker,
    lease_seconds,
)

MiB = 1 << 20
D = "sha256:" + "ab" * 32


def test_a_piece_is_hot_only_after_several_requests_within_the_window():
    hot = HotPieces()
    counts = [hot.record(D, 0, now=1.0 + i * 0.1) for i in range(HOT_REQUESTS)]
    assert not hot.is_hot(counts[0]) and hot.is_hot(counts[-1])
    assert not hot.is_hot(hot.record(D, 0, now=1.0 + 2 * HOT_WINDOW))  # old requests no longer count
    assert not hot.is_hot(hot.record(D, 1, now=1.0))  # per piece


def test_hot_pieces_memory_is_bounded():
    hot = HotPieces(max_keys=100)
    for piece in range(1000):
        hot.record(D, piece, now=float(piece))
    assert len(hot._times) <= 100


def test_cold_pieces_are_served_by_the_supernode_hot_ones_go_to_a_holder():
    policy = RedirectPolicy()
    policy.tracker.announce("http://p1:1", 0.0, add={D: [0, 1]})
    rng = random.Random(1)
    first = policy.decide(D, 0, MiB, 1.0, rng)
    assert first.peer is None and first.reason == "cold"
    second = policy.decide(D, 100, 200, 1.1, rng)
    assert second.peer == "http://p1:1"
    # A range spanning a piece the peer does not hold is not sent there.
    policy.decide(D, 2 * MiB - 10, 2 * MiB + 10, 1.2, rng)
    assert policy.decide(D, 2 * MiB - 10, 2 * MiB + 10, 1.3, rng).reason == "no_peer"


def test_fanout_per_peer_is_bounded_and_load_spreads_over_holders():
    tracker = Tracker(fanout=2)
    rng = random.Random(7)
    for peer in ("http://a:1", "http://b:1"):
        tracker.announce(peer, 0.0, add={D: [0]})
    chosen = [tracker.choose(D, 0, MiB, 1.0, rng) for _ in range(5)]
    assert sorted(chosen[:4]) == ["http://a:1", "http://a:1", "http://b:1", "http://b:1"]  # least loaded first
    assert chosen[4] is None  # every slot taken: the supernode serves
    later = 1.0 + lease_seconds(MiB) + 0.001  # the uploads should be over: slots free again
    assert tracker.choose(D, 0, MiB, later, rng) is not None


def test_a_tree_grows_new_holders_take_load():
    tracker = Tracker(fanout=PEER_FANOUT)
    rng = random.Random(3)
    tracker.announce("http://seed:1", 0.0, add={D: [0]})
    round1 = [tracker.choose(D, 0, MiB, 1.0, rng) for _ in range(PEER_FANOUT + 1)]
    assert round1.count("http://seed:1") == PEER_FANOUT and round1[-1] is None
    for n in range(PEER_FANOUT):  # the nodes it fed announce the piece
        tracker.announce(f"http://n{n}:1", 1.01, add={D: [0]})
    round2 = [tracker.choose(D, 0, MiB, 1.02, rng) for _ in range(PEER_FANOUT * PEER_FANOUT)]
    assert None not in round2 and "http://seed:1" not in round2


def test_choice_is_deterministic_given_the_random_generator():
    def run(seed):
        tracker = Tracker(fanout=100)
        for i in range(10):
            tracker.announce(f"http://p{i}:1", 0.0, add={D: [0]})
        rng = random.Random(seed)
        return [tracker.choose(D, 0, 10, 1.0, rng) for _ in range(30)]

    assert run(5) == run(5)
    assert len(set(run(5))) == 10  # equals share the load


def test_never_redirected_to_itself():
    tracker = Tracker()
    tracker.announce("http://me:1", 0.0, add={D: [0]})
    assert tracker.choose(D, 0, 10, 1.0, random.Random(), exclude="http://me:1") is None


def test_announces_expire_and_can_be_withdrawn_or_replaced():
    tracker = Tracker(ttl=30.0)
    tracker.announce("http://p:1", 0.0, add={D: [0, 1, 2]})
    tracker.announce("http://p:1", 1.0, withdraw={D: [1]})
    assert tracker.holders(D, range(1, 2), 1.0) == []
    assert tracker.holders(D, range(0, 1), 1.0) == ["http://p:1"]
    tracker.announce("http://p:1", 2.0, add={D: [5]}, full=True)  # everything it holds: forget the rest
    assert tracker.holders(D, range(0, 1), 2.0) == [] and tracker.holders(D, range(5, 6), 2.0) == ["http://p:1"]
    assert tracker.holders(D, range(5, 6), 2.0 + 30.0) == []  # not renewed: not used
    assert tracker.expire(40.0) == ["http://p:1"] and tracker.piece_count() == 0
    tracker.announce("http://q:1", 50.0, add={D: [0]})
    tracker.leave("http://q:1")
    assert tracker.holders(D, range(0, 1), 50.0) == []


def test_expire_forgets_exactly_the_peers_that_ran_out_however_often_the_others_renewed():
    tracker = Tracker(ttl=30.0, corrupt_ban=100.0)
    for t in range(3000):  # two peers renewing every second, one that stopped at 9 s
        for peer in ("http://a:1", "http://b:1", "http://c:1")[: 3 if t < 10 else 2]:
            tracker.announce(peer, float(t), add={D: [t % 4]})
    # The announces themselves looked at the time: c, which ran out at 39 s, is forgotten already.
    assert set(tracker.peers) == {"http://a:1", "http://b:1"}
    # The queue of looks holds one per peer, however many renewals there were.
    assert len(tracker._wakes) <= 2 * len(tracker.peers)
    tracker.report("http://b:1", CORRUPT, 2999.0)  # banned: remembered until the ban is over
    assert tracker.expire(3028.0) == [] and tracker.holders(D, range(0, 1), 3028.0) == ["http://a:1"]
    assert tracker.expire(3029.0) == ["http://a:1"]
    assert tracker.expire(3098.0) == [] and "http://b:1" in tracker.peers
    assert tracker.expire(3099.0) == ["http://b:1"] and not tracker.peers and tracker.piece_count() == 0


def test_failing_peers_cool_down_and_corrupt_ones_are_banned():
    tracker = Tracker(failure_cooldown=10.0, corrupt_ban=100.0)
    tracker.announce("http://slow:1", 0.0, add={D: [0]})
    tracker.announce("http://liar:1", 0.0, add={D: [0]})
    tracker.report("http://slow:1", FAILED, 1.0)
    tracker.report("http://liar:1", CORRUPT, 1.0)
    assert tracker.holders(D, range(0, 1), 2.0) == []
    assert tracker.holders(D, range(0, 1), 12.0) == ["http://slow:1"]
    tracker.announce("http://slow:1", 49.0, add={D: [0]})
    assert not tracker.announce("http://liar:1", 50.0, add={D: [0]})  # still banned: its announce ignored
    assert tracker.holders(D, range(0, 1), 50.0) == ["http://slow:1"]
    assert tracker.announce("http://liar:1", 102.0, add={D: [0]})


def _crowd(n: int, now: float = 0.0, piece: int = 0, **tracker_args) -> tuple[Tracker, list[str]]:
    """A tracker where `n` peers announced `piece` of D at `now`."""
    tracker = Tracker(**tracker_args)
    peers = [f"http://10.0.{i // 250}.{i % 250}:1" for i in range(n)]
    for peer in peers:
        tracker.announce(peer, now, add={D: [piece]})
    return tracker, peers


def test_with_thousands_of_holders_a_choice_looks_at_a_bounded_sample(monkeypatch):
    tracker, peers = _crowd(5000)
    looked = []
    load = PeerState.load
    monkeypatch.setattr(PeerState, "load", lambda state, now: looked.append(state) or load(state, now))
    rng = random.Random(1)
    assert tracker.choose(D, 0, MiB, 1.0, rng) in peers
    assert len(looked) <= SAMPLE + 1  # the sample, and the chosen peer once more if that was its last slot
    # Drawn from all of them, the least loaded of the sample: 100 requests go to 100 different peers.
    assert len({tracker.choose(D, 0, MiB, 1.0, rng) for _ in range(100)} - {None}) == 100


def test_every_free_slot_among_thousands_of_holders_is_found_and_no_more():
    tracker, peers = _crowd(5000)
    rng = random.Random(4)
    chosen = [tracker.choose(D, 0, MiB, 1.0, rng) for _ in range(len(peers) * PEER_FANOUT)]
    # The last ones were found when a single holder (then none but one slot) was left among 5,000 busy.
    assert None not in chosen
    assert sorted(set(chosen)) == sorted(peers) and all(chosen.count(p) == PEER_FANOUT for p in peers[:50])
    assert tracker.choose(D, 0, MiB, 1.0, rng) is None  # every slot taken: the supernode serves
    assert tracker.choose(D, 0, MiB, 1.0 + lease_seconds(MiB) + 0.001, rng) in peers  # and freed again


def test_the_only_holder_with_a_free_slot_is_found_among_thousands_of_busy_ones():
    tracker, peers = _crowd(5000, fanout=1)
    rng = random.Random(5)
    free = peers[1234]
    busy = [peer for peer in peers if peer != free]
    for i, peer in enumerate(busy, 1):  # each also holds a piece of its own, and serves it
        tracker.announce(peer, 0.5, add={D: [i]})
        assert tracker.choose(D, i * MiB, (i + 1) * MiB, 1.0, rng) == peer
    assert tracker.choose(D, 0, MiB, 1.0, rng, exclude=free) is None  # the requester itself: never
    assert tracker.choose(D, 0, MiB, 1.0, rng) == free
    assert tracker.choose(D, 0, MiB, 1.0, rng) is None


def test_penalised_and_expired_holders_are_never_chosen_among_thousands():
    tracker, peers = _crowd(5000, ttl=30.0, failure_cooldown=10.0, corrupt_ban=100.0)
    live = peers[:1000]
    for peer in live:  # renewed: the other 4,000 announced at 0 and run out at 30
        tracker.announce(peer, 20.0, add={D: [0]})
    failed, corrupt, ok = live[:300], live[300:600], live[600:]
    for peer in failed:
        tracker.report(peer, FAILED, 29.0)
    for peer in corrupt:
        tracker.report(peer, CORRUPT, 29.0)
    rng = random.Random(6)
    chosen = [tracker.choose(D, 0, MiB, 31.0, rng) for _ in range(len(ok) * PEER_FANOUT + 1)]
    assert chosen[-1] is None and set(chosen[:-1]) == set(ok)
    # Once the cooldown is over (and the slots are free) the peers reported failing are chosen again.
    chosen = [tracker.choose(D, 0, MiB, 39.5, rng) for _ in range((len(ok) + len(failed)) * PEER_FANOUT + 1)]
    assert chosen[-1] is None and set(chosen[:-1]) == set(ok) | set(failed)
    # An expired peer that announces again is back; the ones that did not are forgotten.
    tracker.announce(peers[-1], 39.52, add={D: [0]})  # while every other slot is still taken
    assert tracker.choose(D, 0, MiB, 39.52, rng) == peers[-1]
    tracker.expire(40.0)
    assert set(tracker.peers) == set(live) | {peers[-1]}


def test_a_range_across_pieces_goes_to_a_holder_of_both():
    tracker, peers = _crowd(5000, piece=1)
    both = [f"http://both{i}:1" for i in range(SAMPLE // 2)]  # the rarest piece's holders: all looked at
    for peer in both:
        tracker.announce(peer, 0.0, add={D: [0, 1]})
    rng = random.Random(8)
    chosen = [tracker.choose(D, MiB - 10, MiB + 10, 1.0, rng) for _ in range(len(both) * PEER_FANOUT + 1)]
    assert sorted(chosen[:-1]) == sorted(both * PEER_FANOUT) and chosen[-1] is None


def test_choice_among_thousands_is_reproducible_with_a_seed():
    def run(seed):
        tracker, _ = _crowd(3000)
        rng = random.Random(seed)
        return [tracker.choose(D, 0, MiB, 1.0 + i * 0.01, rng) for i in range(2000)]

    assert run(9) == run(9) and run(9) != run(10)


def test_announce_body_round_trip_and_bad_bodies_are_named():
    message = Announce(8901, {D: [3, 1]}, {D: [7]}, full=False)
    parsed = parse_announce(message.to_json())
    assert parsed.port == 8901 and parsed.add == {D: [1, 3]} and parsed.withdraw == {D: [7]}
    with pytest.raises(BadRequest, match="port"):
        parse_announce(b'{"port": 0}')
    with pytest.raises(BadRequest, match=r"add\[0\].*digest"):
        parse_announce(b'{"port": 1, "add": [{"digest": "md5:x", "pieces": []}]}')
    with pytest.raises(BadRequest, match="piece numbers"):
        parse_announce(json.dumps({"port": 1, "add": [{"digest": D, "pieces": [-1]}]}).encode())
    with pytest.raises(BadRequest, match="not JSON"):
        parse_announce(b"{")


def test_reports_header_round_trip_ignores_junk():
    reports = [("failed", "http://10.0.0.1:8901"), ("corrupt", "http://[fe80::1]:8901")]
    assert parse_reports(format_reports(reports)) == reports
    assert parse_reports("bogus x, failed ftp://x:1, corrupt http://a:1/path") == []


def test_tickets_bind_peer_blob_and_time():
    secret = b"s" * 32
    key = peer_key(secret, "http://p:1")
    ticket = make_ticket(key, D, expires=1000)
    assert check_ticket([key], D, ticket, now=999)
    assert not check_ticket([key], D, ticket, now=1001)  # expired
    assert not check_ticket([peer_key(secret, "http://other:1")], D, ticket, now=999)  # another peer's
    assert not check_ticket([key], "sha256:" + "cd" * 32, ticket, now=999)  # another blob
    assert not check_ticket([key], D, "2000." + ticket.split(".")[1], now=999)  # a longer life forged
    assert not check_ticket([key], D, None, now=0) and not check_ticket([], D, ticket, now=0)


def test_a_hot_piece_nobody_holds_yet_waits_for_its_seeds_only_after_whole_piece_requests():
    policy = RedirectPolicy()
    rng = random.Random(2)
    assert policy.decide(D, 0, MiB, 1.0, rng).reason == "cold"
    policy.served(D, 0, MiB, 1.0, "http://seed:1")  # a seed: it got the whole piece
    assert policy.decide(D, 0, MiB, 1.01, rng).reason == "no_peer"  # one seed is not enough to wait for
    policy.served(D, 0, MiB, 1.01, "http://seed:2")
    assert policy.decide(D, 0, 64 << 10, 1.02, rng).reason == "hold"  # two seeds: worth a short wait
    policy.tracker.announce("http://seed:1", 1.03, add={D: [0]})
    assert policy.retry(D, 0, 64 << 10, 1.03, rng).peer == "http://seed:1"
    # Sparse reads of another piece make no seeds: their requesters are never made to wait.
    for now in (2.0, 2.01, 2.02):
        policy.served(D, 5 * MiB, 5 * MiB + (64 << 10), now, f"http://sparse:{now}")
    policy.decide(D, 5 * MiB, 5 * MiB + 10, 2.03, rng)
    assert policy.decide(D, 5 * MiB, 5 * MiB + 10, 2.04, rng).reason == "no_peer"
    assert policy.decide(D, 0, 10, 1.0 + 2 * HOT_WINDOW, rng).reason == "cold"  # all of it is forgotten


def test_a_seed_is_never_made_to_wait_for_the_rest_of_its_own_piece():
    policy = RedirectPolicy()
    rng = random.Random(4)
    a, b, c = "http://10.0.0.1:8901", "http://10.0.0.2:8901", "http://10.0.0.3:8901"
    most = (126 << 10, MiB)  # a read's run of chunks: most of the piece, the rest comes with another request
    for node, now in ((a, 1.0), (b, 1.01)):
        policy.decide(D, *most, now, rng, requester=node)
        policy.served(D, *most, now, requester=node)  # the two seeds
    assert policy.decide(D, 0, 126 << 10, 1.02, rng, requester=c).reason == "hold"  # waits for a seed
    assert policy.decide(D, 0, 126 << 10, 1.02, rng, requester=a).reason == "seed"  # would wait for itself
    # A node held before it became a seed is let go at its next look.
    assert policy.retry(D, 0, 126 << 10, 1.03, rng, requester=c).reason == "no_peer"
    policy.served(D, *most, 1.03, requester=c)
    assert policy.retry(D, 0, 126 << 10, 1.04, rng, requester=c).reason == "seed"
    assert policy.decide(D, 0, 126 << 10, 1.0 + 2 * HOT_WINDOW, rng, requester=a).reason == "cold"
    # What it remembers of seeds is bounded, in pieces and in nodes per piece.
    seeds = Seeds(max_keys=4)
    for i in range(100):
        seeds.record(D, i % 10, f"http://10.0.1.{i}:8901", float(i))
    assert len(seeds._seeds) <= 4
    for i in range(200):  # one piece served to 200 nodes, 5 a second
        seeds.record(D, 0, f"http://10.0.2.{i}:8901", 100 + i / 5)
    assert len(seeds._seeds[(D, 0)]) <= 17 and seeds.seeded(D, 0, 140.0)


# --- the supernode's side (dadi/p2p/peerredirect.py), on trio's mock clock --------------------------


def test_a_held_request_goes_to_a_seed_once_it_announces_the_piece():
    import trio
    import trio.testing

    from dadi.p2p.metrics import SupernodeMetrics
    from dadi.p2p.peerproto import PEER_PORT_HEADER
    from dadi.p2p.peerredirect import TrackerRedirector
    from dadi.p2p.piececache import PIECE_SIZE
    from dadi.p2p.tracker import HOLD_POLL

    redirector = TrackerRedirector(SupernodeMetrics(), clock=trio.current_time, rng=random.Random(1))
    node = {PEER_PORT_HEADER: "8901"}  # requests from nodes that serve peers

    async def main():
        # Nobody holds the piece: the supernode serves the first two nodes itself (its seeds)...
        for seed in ("10.0.0.1", "10.0.0.2"):
            assert await redirector.redirect("app", D, 0, PIECE_SIZE - 1, seed, node) is None
        # ...and holds the third until a seed announces the piece.
        got = {}

        async def third():
            got["location"] = await redirector.redirect("app", D, 0, PIECE_SIZE - 1, "10.0.0.3", node)
            got["at"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(HOLD_POLL / 4)
            redirector.announce("10.0.0.2", Announce(8901, {D: [0]}, {}))
            announced = trio.current_time()
        assert got["location"].startswith(f"http://10.0.0.2:8901/v2/app/blobs/{D}?")
        assert announced < got["at"] <= announced + HOLD_POLL  # at its next look, not at the end of its hold

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
