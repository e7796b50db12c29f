"""One rank's step: its KV sends start while its forward is still running, exactly once.

A stage queues its forward, starts the sends of the requests whose prompt is complete, and
only then waits for the forward's result (hidden states to the host, or sampling); the last
stage hands each first token to its sender after sampling. Scripted senders and a scripted
compute record the order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from cluster.messages import ChunkPlan, StepPlan
from cluster.plan_executor import PlanExecutor, StageOutput
from cluster.stage_requests import StageRequests
from tests.prefill.world import ScriptedSender
from transport.metadata import FirstToken
from transport.poll import KVPoll

Events = list[object]


class RecordingSender(ScriptedSender):
    def __init__(self, rid: str, room: int, events: Events) -> None:
        super().__init__(rid, room)
        self.events = events

    def send(self, page_indices: list[int], first_token: FirstToken | None = None) -> None:
        self.events.append(("send", self.rid, first_token))
        super().send(page_indices, first_token)

    def send_first_token(self, first_token: FirstToken) -> None:
        self.events.append(("token", self.rid))
        super().send_first_token(first_token)


def token_for(chunk: ChunkPlan) -> FirstToken:
    return FirstToken(chunk.room, 5, -0.5, chunk.start + len(chunk.token_ids))


class RecordingCompute:
    """A forward that records when it is queued, when sends may start, and when it is waited
    for; `sample` gives the last stage's first tokens."""

    def __init__(
        self, events: Events, sample: Callable[[tuple[ChunkPlan, ...]], dict[str, FirstToken]]
    ) -> None:
        self.events, self.sample = events, sample

    def launch(self, batch: tuple[ChunkPlan, ...], upstream: object) -> str:
        self.events.append("forward queued")
        return "out"

    @contextlib.contextmanager
    def sends_after(self, out: object) -> Iterator[None]:
        assert out == "out"
        yield

    def finish(self, batch: tuple[ChunkPlan, ...], out: object) -> StageOutput:
        self.events.append("waited for the forward")
        return StageOutput("hidden", self.sample(batch))


def make_executor(
    events: Events, is_last: bool, sample: Callable[..., dict[str, FirstToken]]
) -> PlanExecutor:
    requests = StageRequests(lambda rid, room: RecordingSender(rid, room, events))
    compute = RecordingCompute(events, sample)
    executor = PlanExecutor(requests, lambda v: v, compute, is_last_stage=is_last, background=False)
    executor.step(StepPlan(step=0, tick=None, admit=(("a", 1), ("b", 2))))
    for sender in requests.senders.values():
        sender.ready()
    return executor


def batch() -> tuple[ChunkPlan, ...]:
    return (
        ChunkPlan("a", 0, [1, 2, 3], [0], finishing=True, room=1),
        ChunkPlan("b", 0, [4, 5], [1], finishing=False, room=2),  # more chunks to come
    )


@pytest.mark.parametrize("is_last", [True, False])
def test_sends_start_while_the_forward_runs_and_the_token_follows_sampling(is_last: bool) -> None:
    events: Events = []

    def sample(chunks: tuple[ChunkPlan, ...]) -> dict[str, FirstToken]:
        return {c.rid: token_for(c) for c in chunks if c.finishing} if is_last else {}

    executor = make_executor(events, is_last, sample)
    report, hidden = executor.step(StepPlan(step=1, tick=None, batch=batch()))
    expected: Events = ["forward queued", ("send", "a", None), "waited for the forward"]
    if is_last:
        expected.append(("token", "a"))
    assert events == expected  # each finishing request sent once
    assert hidden == "hidden"  # returned, for the next stage's step
    sender = executor.requests.senders["a"]
    assert sender.poll() is KVPoll.Transferring and sender.sent_pages == [0]
    assert sender.sent_token == (token_for(batch()[0]) if is_last else None)
    assert set(report.first_tokens) == ({"a"} if is_last else set())
    assert executor.requests.senders["b"].poll() is KVPoll.WaitingForInput  # not finishing


def test_a_finishing_request_the_last_stage_sampled_nothing_for_fails_at_once() -> None:
    events: Events = []
    executor = make_executor(events, True, lambda chunks: {})
    executor.step(StepPlan(step=1, tick=None, batch=batch()))
    sender = executor.requests.senders["a"]
    assert sender.poll() is KVPoll.Failed  # not left Transferring until a timeout
    assert executor.requests.senders["b"].poll() is KVPoll.WaitingForInput


def test_a_drop_after_the_last_tick_of_a_quiet_spell_leaves_every_gauge_at_zero() -> None:
    """Named regression (the 2-minute soak caught it): a request became ready at a tick, the
    caller aborted it, and the drop reached the rank in a step without a tick; the instance
    then had no work, so no tick came again. Gauges computed at the last tick still counted
    the request as waiting, on every rank, for good."""
    events: Events = []
    executor = make_executor(events, True, lambda chunks: {})
    executor.step(StepPlan(step=1, tick=1, rids=("a", "b")))  # both ready (made so above)
    assert executor.queue_sizes() == {"bootstrap": 0, "waiting": 2, "inflight": 0}
    executor.step(StepPlan(step=2, tick=None, drop=(("a", "aborted"), ("b", "aborted"))))
    assert executor.queue_sizes() == {"bootstrap": 0, "waiting": 0, "inflight": 0}
