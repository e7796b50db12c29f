"""The prefill controller and its ranks, without Ray: named regressions and properties.

Every test drives the production controller and the production per-rank `PlanExecutor` through
a written-out event sequence, with scripted senders in place of Mooncake.
"""

from __future__ import annotations

import pytest

from cluster.consensus import TickIssuer
from cluster.messages import PrefillRequest, StagePlanError, StageReport, TickResult
from deployments.prefill_controller import PromptRejected
from tests.prefill.world import InfoReadySender, InstantSender, World
from transport.poll import KVPoll


def prompt(n: int = 6) -> list[int]:
    return list(range(1, n + 1))


def assert_idle(world: World) -> None:
    """Nothing held anywhere: the gauges that must read 0 when the system is idle."""
    assert not world.controller.requests
    assert world.controller.allocator.num_in_use == 0
    assert world.controller.queue_sizes() == {
        "bootstrap": 0,
        "waiting": 0,
        "running": 0,
        "inflight": 0,
    }
    for rank in world.ranks:
        assert rank.requests.senders == {}, f"rank {rank.index} holds {list(rank.requests.senders)}"
        assert rank.requests.pages_in_use == 0
        assert rank.executor.queue_sizes() == {"bootstrap": 0, "waiting": 0, "inflight": 0}


def everyone(world: World, rid: str, action: str) -> None:
    for rank in range(len(world.ranks)):
        sender = world.sender(rank, rid)
        if sender is not None:
            getattr(sender, action)()


@pytest.fixture
def world2():
    world = World(pp=2)
    yield world
    world.close()


def test_request_flows_bootstrap_to_success_and_frees_every_page(world2: World) -> None:
    world2.controller.add(PrefillRequest("a", 7, prompt(10)))
    world2.step()  # admitted everywhere, bootstrapping
    everyone(world2, "a", "ready")
    world2.step()  # consensus: ready
    plan, _, _ = world2.step()  # prefilled, KV sent
    assert [c.rid for c in plan.batch] == ["a"] and plan.batch[0].finishing
    assert all(world2.sender(r, "a").poll() is KVPoll.Transferring for r in range(2))
    assert world2.sender(1, "a").sent_token.room == 7  # the last stage ships the first token
    assert world2.sender(0, "a").sent_token is None
    everyone(world2, "a", "complete")
    _, _, ended = world2.step()
    assert [(e.rid, e.ok) for e in ended] == [("a", True)]
    assert ended[0].first_token.num_prompt_tokens == 10
    assert_idle(world2)


def test_local_failure_on_rank_1_drains_on_every_rank(world2: World) -> None:
    world2.controller.add(PrefillRequest("a", 1, prompt()))
    world2.step()
    world2.sender(0, "a").ready()
    world2.sender(1, "a").fail("invalid receiver info: KV layout mismatch")
    _, _, ended = world2.step()
    assert [(e.rid, e.ok) for e in ended] == [("a", False)]
    assert "pp_rank 1" in ended[0].reason and "layout mismatch" in ended[0].reason
    assert world2.sender(0, "a").aborted  # rank 0 dropped its healthy sender in the same call
    assert_idle(world2)


def test_failure_on_a_non_first_rank_for_a_rid_the_first_rank_already_removed(
    world2: World,
) -> None:
    """The orphan: SGLang's first rank removed a rid, rank 1 failed it later, nobody drained it,
    and the bootstrap-queue gauge never returned to 0."""
    world2.controller.add(PrefillRequest("a", 1, prompt()))
    world2.step()
    world2.ranks[0].requests.drop("a", "removed on rank 0 alone")  # rank 0 forgot it
    world2.sender(1, "a").fail("peer unreachable")
    _, _, ended = world2.step()  # unknown on rank 0 polls Failed; MIN is Failed everywhere
    assert [(e.rid, e.ok) for e in ended] == [("a", False)]
    assert_idle(world2)


def test_abort_landing_between_consensus_and_queue_processing(world2: World) -> None:
    world2.controller.add(PrefillRequest("a", 1, prompt()))
    world2.step()
    everyone(world2, "a", "ready")
    plan = world2.controller.plan()  # consensus list contains "a"
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        reports = [r for r, _ in pool.map(lambda r: r.executor.step(plan), world2.ranks)]
    # The caller aborts after the stages voted "ready" but before the controller applied it.
    assert world2.controller.abort("a") is not None
    assert world2.controller.apply(plan, reports) == []  # already ended: nothing decided twice
    world2.step()  # the drop reaches every rank
    assert_idle(world2)


def test_ranks_seeing_different_failure_sets_during_an_abort_storm() -> None:
    world = World(pp=4)
    try:
        rids = [f"r{i}" for i in range(12)]
        for i, rid in enumerate(rids):
            world.controller.add(PrefillRequest(rid, i, prompt(3)))
        world.step()
        # Each rank fails a different subset; the caller aborts yet another.
        for i, rid in enumerate(rids):
            for rank in range(4):
                if i % 4 == rank and i % 3 == 0:
                    world.sender(rank, rid).fail(f"timeout on {rank}")
                else:
                    world.sender(rank, rid).ready()
        for rid in rids[1::5]:
            world.controller.abort(rid)
        _, reports, ended = world.step()
        assert len({t.vector for r in reports for t in r.ticks}) == 1
        failed = {e.rid for e in ended if not e.ok}
        assert failed == {rid for i, rid in enumerate(rids) if i % 3 == 0 and rid not in rids[1::5]}
        decided = [rank.applied for rank in world.ranks]
        assert all(d == decided[0] for d in decided)
        for _ in range(10):
            for rid in list(world.controller.requests):
                everyone(world, rid, "complete")
            world.step()
        assert_idle(world)
    finally:
        world.close()


def test_bootstrap_queues_of_different_lengths_on_ranks_never_reach_the_all_reduce() -> None:
    """SGLang's gloo size mismatch: ranks built vectors from their own queues. Ours come from
    the controller's one list, whatever each rank holds."""
    world = World(pp=2, tp=2)
    try:
        for i in range(5):
            world.controller.add(PrefillRequest(f"r{i}", i, prompt()))
        world.step()
        world.ranks[3].requests.drop("r2", "rank 3 lost it")  # rank 3 now holds fewer
        world.ranks[1].requests.admit("stray", 99)  # and rank 1 more
        _, reports, ended = world.step()
        assert {len(t.vector) for r in reports for t in r.ticks} == {5}
        assert [e.rid for e in ended] == ["r2"]
        world.step()  # rank 1's count disagrees: the controller reconciles next step
        assert "stray" not in world.ranks[1].requests.senders
    finally:
        world.close()


def test_prompt_rejected_for_length_never_enters_the_bootstrap_queue(world2: World) -> None:
    world2.controller.config.max_prompt_len = 8
    with pytest.raises(PromptRejected, match="9 tokens"):
        world2.controller.add(PrefillRequest("long", 1, prompt(9)))
    with pytest.raises(PromptRejected, match="empty"):
        world2.controller.add(PrefillRequest("empty", 2, []))
    plan, _, _ = world2.step()
    assert plan.rids == () and plan.admit == ()
    assert_idle(world2)


def test_bootstrap_timeout_on_one_rank_fails_the_request_everywhere(world2: World) -> None:
    world2.controller.add(PrefillRequest("a", 1, prompt()))
    world2.step()
    world2.sender(0, "a").ready()
    world2.sender(1, "a").fail("bootstrap timeout: no receiver info after 30.0s")
    _, _, ended = world2.step()
    assert "bootstrap timeout" in ended[0].reason
    assert_idle(world2)


def test_ready_request_starts_prefill_on_the_next_step_whatever_the_pp_size() -> None:
    for pp in (1, 2, 4):
        world = World(pp=pp)
        try:
            world.controller.add(PrefillRequest("a", 1, prompt()))
            world.step()
            everyone(world, "a", "ready")
            world.step()  # ready by consensus at this step's end
            plan, _, _ = world.step()
            assert [c.rid for c in plan.batch] == ["a"], pp
            everyone(world, "a", "complete")
            _, _, ended = world.step()
            assert ended[0].ready_to_start_steps == 1
        finally:
            world.close()


def test_chunked_prefill_and_page_shortage_keep_fifo_order() -> None:
    world = World(pp=2, num_pages=6, page_size=4, max_batched_tokens=8)
    try:
        world.controller.add(PrefillRequest("big", 1, prompt(20)))  # 5 pages, 3 chunks
        world.controller.add(PrefillRequest("next", 2, prompt(8)))  # 2 pages: must wait
        world.step()
        everyone(world, "big", "ready")
        everyone(world, "next", "ready")
        world.step()
        starts = []
        for _ in range(4):
            plan, _, _ = world.step()
            starts.append([(c.rid, c.start, len(c.token_ids)) for c in plan.batch])
        assert starts[0] == [("big", 0, 8)]
        assert starts[1] == [("big", 8, 8)]
        assert starts[2] == [("big", 16, 4)]  # "next" cannot get 2 pages while big holds 5
        everyone(world, "big", "complete")
        world.step()
        plan, _, _ = world.step()
        assert [c.rid for c in plan.batch] == ["next"]
        everyone(world, "next", "complete")
        world.step()
        assert_idle(world)
    finally:
        world.close()


INFO = object()  # scripted senders never read the receiver info itself


def test_request_with_its_receiver_info_prefills_in_the_plan_that_admits_it() -> None:
    """#22: no bootstrap round trip for a request whose info came with the call. The plan that
    admits it carries the info before the forward, so the sends find every sender ready; the
    consensus still decides the end."""
    world = World(pp=2, sender=InfoReadySender)
    try:
        world.controller.add(PrefillRequest("a", 7, prompt(10), receiver_info=INFO))
        plan, _, _ = world.step()
        assert plan.admit == (("a", 7),) and [i[0] for i in plan.infos] == ["a"]
        assert [c.rid for c in plan.batch] == ["a"] and plan.batch[0].finishing
        assert all(world.sender(r, "a").poll() is KVPoll.Transferring for r in range(2))
        assert world.controller.queue_sizes()["inflight"] == 1
        assert "a" in plan.rids  # its tick ran after the sends (scripted writes never end alone)
        everyone(world, "a", "complete")
        _, _, ended = world.step()
        assert [(e.rid, e.ok) for e in ended] == [("a", True)]
        assert ended[0].first_token is not None and ended[0].ready_to_start_steps == 1
        assert_idle(world)
    finally:
        world.close()


def test_kv_computed_before_the_info_landed_fails_the_request_not_the_stage() -> None:
    """A rank whose sender is still bootstrapping when the forward's sends start (never by
    construction) fails that request with a reason; the stage and the others go on."""
    world = World(pp=2)  # scripted: info never makes these senders ready by itself
    try:
        world.controller.add(PrefillRequest("a", 1, prompt(), receiver_info=INFO))
        _, _, ended = world.step()  # decided by the tick that ran after the sends
        assert [(e.rid, e.ok) for e in ended] == [("a", False)]
        assert "before this rank had the receiver info" in (ended[0].reason or "")
        assert_idle(world)
        world.controller.add(PrefillRequest("b", 2, prompt()))
        world.step()
        everyone(world, "b", "ready")
        world.step()
        world.step()
        everyone(world, "b", "complete")
        _, _, ended = world.step()
        assert [(e.rid, e.ok) for e in ended] == [("b", True)]
    finally:
        world.close()


def _report(rank: int, *ticks: TickResult) -> StageReport:
    return StageReport(pp_rank=rank, ticks=list(ticks), last_tick=0, num_requests=0, pages_in_use=0)


def test_a_tick_that_failed_nothing_is_decided_from_the_first_rank_that_reports_it() -> None:
    """#22: a stage before the last reports a tick that ran after its sends one step later;
    the decision does not wait for it. Its late copy is still checked."""
    ticks = TickIssuer()
    tick, _ = ticks.issue(["a", "b"])
    ok = TickResult(tick, (int(KVPoll.Success), int(KVPoll.Transferring)), {})
    [decision] = ticks.collect([_report(0), _report(1, ok)])
    assert decision.states == (("a", KVPoll.Success), ("b", KVPoll.Transferring))
    assert ticks.in_flight  # a copy is still to be checked: the controller steps once more
    next_tick, _ = ticks.issue(["b"])  # but the next tick may go out
    assert ticks.collect([_report(0, ok), _report(1)]) == []  # the late copy agrees
    both = TickResult(next_tick, (3,), {})
    ticks.collect([_report(0, both), _report(1, both)])
    assert not ticks.in_flight
    late_wrong = TickResult(tick, (int(KVPoll.Failed), int(KVPoll.Transferring)), {})
    fresh = TickIssuer()
    t, _ = fresh.issue(["a", "b"])
    fresh.collect([_report(0), _report(1, ok)])
    with pytest.raises(StagePlanError):
        fresh.collect([_report(0, late_wrong), _report(1)])
    assert next_tick == tick + 1 and t == tick


def test_a_tick_with_a_failure_waits_for_every_rank_and_its_reason() -> None:
    ticks = TickIssuer()
    tick, _ = ticks.issue(["a"])
    failed = (int(KVPoll.Failed),)
    assert ticks.collect([_report(0), _report(1, TickResult(tick, failed, {}))]) == []
    [decision] = ticks.collect(
        [_report(0, TickResult(tick, failed, {"a": "pp_rank 0: write failed"})), _report(1)]
    )
    assert decision.reason("a") == (0, "pp_rank 0: write failed")


def test_an_orphan_on_a_later_rank_is_dropped_after_one_request_decided_early() -> None:
    """The regression the queue alert's e2e test caught: a request prefilled, shipped and
    decided in one step (from the last rank's copy) left the controller no step in which to
    compare counts and reconcile, so an orphan on rank 1 outlived it."""
    import time

    world = World(pp=2, background=True, sender=InstantSender)
    try:
        world.ranks[1].executor.admit_untracked("stuck")
        world.controller.add(PrefillRequest("a", 1, prompt(), receiver_info=INFO))
        _, _, ended = world.step()
        assert [(e.rid, e.ok) for e in ended] == [("a", True)]  # in one step
        deadline = time.monotonic() + 10
        while world.controller.has_work and time.monotonic() < deadline:
            time.sleep(0.002)  # the ranks' tick threads
            world.step()
        assert [(e.rid, e.ok) for e in world.ended] == [("a", True)]
        assert_idle(world)
    finally:
        world.close()
