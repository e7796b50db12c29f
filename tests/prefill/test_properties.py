"""Random interleavings of arrivals, per-rank receiver info, local failures, aborts, timeouts
and completions, for PP 1-4 and TP 1-2: the invariants hold after every one of them."""

from __future__ import annotations

import time
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.messages import PrefillRequest
from tests.prefill.test_consensus import assert_idle
from tests.prefill.world import World
from transport.poll import KVPoll

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "ready", "fail", "abort", "complete", "step", "step"]),
        st.integers(0, 7),  # request
        st.integers(0, 7),  # rank (mod world size)
        st.integers(1, 40),  # prompt length
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pp=st.integers(1, 4), tp=st.integers(1, 2), background=st.booleans(), events=EVENTS)
def test_every_request_ends_once_and_ranks_agree(
    pp: int, tp: int, background: bool, events
) -> None:
    world = World(
        pp=pp, tp=tp, background=background, num_pages=24, page_size=4, max_batched_tokens=16
    )
    arrived: set[str] = set()
    aborted: Counter[str] = Counter()
    try:
        for kind, r, rank, length in events:
            rid = f"r{r}"
            rank %= len(world.ranks)
            sender = world.sender(rank, rid)
            if kind == "arrive" and rid not in arrived:
                arrived.add(rid)
                world.controller.add(PrefillRequest(rid, r, list(range(1, length + 1))))
            elif kind == "ready" and sender is not None:
                sender.ready()
            elif kind == "fail" and sender is not None:
                sender.fail("timeout" if length % 2 else "peer unreachable")
            elif kind == "complete" and sender is not None:
                sender.complete()
            elif kind == "abort" and world.controller.abort(rid) is not None:
                aborted[rid] += 1
            elif kind == "step":
                world.step()
            check_invariants(world)

        # Drain: every rank's info lands and every write completes; the system must go idle.
        for _ in range(400):
            if not world.controller.has_work:
                break
            if background:
                time.sleep(0.001)  # let the consensus threads finish their tick
            for r in world.ranks:
                for s in r.senders.values():
                    s.ready()
                    s.complete()
            world.step()
            check_invariants(world)
        world.step()
        if background:
            while world.controller.has_work:
                time.sleep(0.001)
                world.step()
        assert_idle(world)
        assert all(r.applied == world.ranks[0].applied for r in world.ranks)

        ended = Counter(e.rid for e in world.ended) + aborted
        assert all(count == 1 for count in ended.values()), ended  # exactly once
        assert set(ended) == arrived  # and every arrival ends
        succeeded = {e.rid for e in world.ended if e.ok}
        failed = {e.rid for e in world.ended if not e.ok} | set(aborted)
        assert not succeeded & failed
        for e in world.ended:
            if e.ok:  # prefilled, sent by every rank, first token from the last stage
                assert e.first_token is not None
    finally:
        world.close()


def check_invariants(world: World) -> None:
    # Same decisions in the same order; with background ticks a rank may be one report behind.
    histories = sorted((rank.applied for rank in world.ranks), key=len)
    longest = histories[-1]
    assert all(h == longest[: len(h)] for h in histories), "ranks applied different decisions"
    assert [t for t, _, _ in longest] == sorted({t for t, _, _ in longest})  # tick order, once
    for _tick, rids, vector in longest:
        assert len(rids) == len(vector)
    # A rank never holds KV pages for a request the controller has ended, unless the tick that
    # ended it is yet to be applied there (decided from another rank's copy of the same
    # all-reduce, with background ticks: this rank's thread applies it next).
    for rank in world.ranks:
        lagging = rank.requests.last_tick < world.controller.ticks.applied_tick
        for rid in rank.requests.pages:
            assert (
                lagging
                or rid in world.controller.requests
                or any(d[0] == rid for d in world.controller._pending_drop)
            )
    # No success is reported for a sender that never transferred.
    for rank in world.ranks:
        for s in rank.senders.values():
            if s.poll() is KVPoll.Success:
                assert s.sent_pages is not None
