"""KVPoll order and transitions, page-run coalescing and first-token records, without Mooncake."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.metadata import FirstToken, MetadataSlots, MetadataSlotsExhausted
from transport.poll import IllegalTransition, KVPoll, PollState, is_legal
from transport.segments import page_runs


def test_poll_values_order_failure_lowest_so_min_consensus_lets_failure_win() -> None:
    assert [int(p) for p in KVPoll] == [0, 1, 2, 3, 4]
    assert min(KVPoll.Success, KVPoll.Failed, KVPoll.WaitingForInput) is KVPoll.Failed
    assert min(KVPoll.Success, KVPoll.WaitingForInput) is KVPoll.WaitingForInput


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (KVPoll.Bootstrapping, KVPoll.Transferring),
        (KVPoll.Bootstrapping, KVPoll.Success),
        (KVPoll.WaitingForInput, KVPoll.Bootstrapping),
        (KVPoll.WaitingForInput, KVPoll.Success),
        (KVPoll.Transferring, KVPoll.WaitingForInput),
        (KVPoll.Success, KVPoll.Transferring),
        (KVPoll.Failed, KVPoll.WaitingForInput),
    ],
)
def test_illegal_moves_raise(current: KVPoll, new: KVPoll) -> None:
    assert not is_legal(current, new)
    state = PollState(current)
    with pytest.raises(IllegalTransition):
        state.advance(new)
    assert state.state is current


def test_forward_path_and_failure_from_any_live_state() -> None:
    state = PollState()
    for new in (KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success):
        state.advance(new)
    assert not state.fail("late")  # success is final
    assert state.state is KVPoll.Success and state.reason is None
    for live in (KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring):
        s = PollState(live)
        assert s.fail("boom") and s.state is KVPoll.Failed and s.reason == "boom"
        assert not s.fail("again") and s.reason == "boom"  # the first reason stays
        assert not s.advance_unless_failed(KVPoll.Success)
    with pytest.raises(IllegalTransition):
        PollState().advance(KVPoll.Failed)  # failing needs a reason


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=40))
def test_page_runs_cover_every_page_in_order_and_are_maximal(pairs: list[tuple[int, int]]) -> None:
    local = [a for a, _ in pairs]
    remote = [b for _, b in pairs]
    runs = page_runs(local, remote)
    expanded = [(r.local + k, r.remote + k) for r in runs for k in range(r.length)]
    assert expanded == list(zip(local, remote, strict=True))
    for a, b in itertools.pairwise(runs):  # no two neighbours could have merged
        assert not (a.local + a.length == b.local and a.remote + a.length == b.remote)


def test_page_runs_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 local pages but 1 remote"):
        page_runs([1, 2], [3])


def test_first_token_record_belongs_to_its_room_only() -> None:
    slots = MetadataSlots(2)
    a = slots.acquire()
    record = FirstToken(room=2**63 - 1, token_id=42, logprob=-1.25, num_prompt_tokens=17)
    slots.write(a, record)
    assert slots.read(a, 2**63 - 1) == record
    assert slots.read(a, 5) is None  # a stale record of another request is not ours
    b = slots.acquire()
    assert slots.read(b, 0) is None  # an unwritten slot has no magic
    with pytest.raises(MetadataSlotsExhausted, match="metadata_slots"):
        slots.acquire()
    slots.release(a)
    slots.release(a)  # idempotent
    assert slots.num_held == 1
    slots.release(b)
    assert slots.num_held == 0
