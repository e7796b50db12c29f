"""A prefill instance without Ray: one controller, PP x TP ranks on threads, scripted senders.

Each rank runs the production `PlanExecutor` on its own thread; the all-reduce is a barrier over
those threads that takes the element-wise MIN, and it refuses vectors of different lengths
(gloo would crash or hang on those). Senders are scripted: the test decides when receiver
info lands on each rank, when a rank fails locally and when a write completes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster.messages import ChunkPlan, StageReport, StepPlan
from cluster.plan_executor import PlanExecutor, StageOutput, no_side_stream
from cluster.stage_requests import StageRequests
from deployments.prefill_controller import ControllerConfig, Ended, PrefillController
from transport.metadata import FirstToken
from transport.poll import KVPoll, PollState
from transport.receiver_info import ReceiverInfo


class ScriptedSender:
    """A `KVSender` stand-in whose progress the test scripts (real `PollState` rules)."""

    def __init__(self, rid: str, room: int) -> None:
        self.rid, self.room = rid, room
        self.state = PollState(KVPoll.Bootstrapping)
        self.sent_pages: list[int] | None = None
        self.sent_token: FirstToken | None = None
        self.aborted = False

    def poll(self) -> KVPoll:
        return self.state.state

    @property
    def failure_reason(self) -> str | None:
        return self.state.reason

    def set_receiver_info(self, info: ReceiverInfo) -> None:
        pass  # the test decides when info "lands" on this rank: `ready()`

    def ready(self) -> None:
        if self.state.state is KVPoll.Bootstrapping:
            self.state.advance(KVPoll.WaitingForInput)

    def fail(self, reason: str) -> None:
        self.state.fail(reason)

    def send(self, page_indices: list[int], first_token: FirstToken | None = None) -> None:
        if self.state.state is KVPoll.Failed:
            return
        self.state.advance(KVPoll.Transferring)
        self.sent_pages, self.sent_token = list(page_indices), first_token

    def send_first_token(self, first_token: FirstToken) -> None:
        if self.state.state is not KVPoll.Failed:
            assert self.sent_pages is not None and self.sent_token is None, "token before send"
            self.sent_token = first_token

    def complete(self) -> None:
        if self.state.state is KVPoll.Transferring:
            self.state.advance_unless_failed(KVPoll.Success)

    def wait_settled(self, timeout_s: float) -> None:
        pass  # the test completes writes itself (`complete()`)

    def abort(self, reason: str = "aborted") -> None:
        self.aborted = True
        self.state.fail(reason)


class InfoReadySender(ScriptedSender):
    """A sender whose receiver info is valid the moment it lands, as a real one's is."""

    def set_receiver_info(self, info: ReceiverInfo) -> None:
        self.ready()


class InstantSender(InfoReadySender):
    """A sender whose writes land the moment they start (a fast path to a quick peer)."""

    def send(self, page_indices: list[int], first_token: FirstToken | None = None) -> None:
        super().send(page_indices, first_token)
        self.complete()  # the step's tick runs after the last stage's token, too


class ScriptedCompute:
    """A forward with no model: the last stage "samples" each finishing chunk's length."""

    def __init__(self, is_last: bool) -> None:
        self.is_last = is_last

    def launch(self, batch: tuple[ChunkPlan, ...], upstream: object) -> tuple[ChunkPlan, ...]:
        return batch

    sends_after = staticmethod(no_side_stream)

    def finish(self, batch: tuple[ChunkPlan, ...], out: object) -> StageOutput:
        if not self.is_last:
            return StageOutput()
        return StageOutput(
            first_tokens={
                c.rid: FirstToken(
                    room=c.room,
                    token_id=len(c.token_ids),
                    logprob=0.0,
                    num_prompt_tokens=c.start + len(c.token_ids),
                )
                for c in batch
                if c.finishing
            }
        )


class ThreadAllReduce:
    """MIN all-reduce across `world` threads, like gloo's: same call order on every rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._barrier = threading.Barrier(world)
        self._inputs: list[list[int] | None] = [None] * world
        self._result: list[int] = []
        self.calls = 0

    def for_rank(self, rank: int):
        def allreduce(values: list[int]) -> list[int]:
            self._inputs[rank] = list(values)
            if self._barrier.wait() == 0:
                lengths = {len(v) for v in self._inputs if v is not None}
                if len(lengths) != 1:
                    self._barrier.abort()
                    raise AssertionError(f"all-reduce size mismatch: {lengths}")
                self._result = [min(col) for col in zip(*self._inputs, strict=True)]
                self.calls += 1
            self._barrier.wait()
            return list(self._result)

        return allreduce


@dataclass
class Rank:
    index: int
    pp_rank: int
    tp_rank: int
    requests: StageRequests
    executor: PlanExecutor | None = None
    senders: dict[str, ScriptedSender] = field(default_factory=dict)
    applied: list[tuple[int, tuple[str, ...], tuple[int, ...]]] = field(default_factory=list)


class World:
    """Controller + ranks; `step()` is one scheduler step across the whole instance."""

    def __init__(
        self,
        pp: int,
        tp: int = 1,
        background: bool = False,
        sender: type[ScriptedSender] = ScriptedSender,
        **controller: int,
    ) -> None:
        self.pp, self.tp = pp, tp
        self._sender = sender
        defaults = {"num_pages": 64, "page_size": 4, "max_batched_tokens": 32}
        self.controller = PrefillController(ControllerConfig(**{**defaults, **controller}))
        self.ranks: list[Rank] = []
        for index in range(pp * tp):
            rank = Rank(index, index // tp, index % tp, requests=None)  # type: ignore[arg-type]
            rank.requests = StageRequests(self._factory(rank), pp_rank=rank.pp_rank)
            self.ranks.append(rank)
        self.allreduce = ThreadAllReduce(len(self.ranks))
        for rank in self.ranks:
            rank.executor = PlanExecutor(
                rank.requests,
                self.allreduce.for_rank(rank.index),
                ScriptedCompute(rank.pp_rank == pp - 1),
                is_last_stage=rank.pp_rank == pp - 1,
                # Inline ticks make each step deterministic; background ticks are production's
                # mode, where a tick's result can arrive steps later than its plan.
                background=background,
            )
        self._pool = ThreadPoolExecutor(len(self.ranks))
        self.ended: list[Ended] = []
        self.tick_rids: dict[int, tuple[str, ...]] = {}

    def _factory(self, rank: Rank):
        def make(rid: str, room: int) -> ScriptedSender:
            sender = self._sender(rid, room)
            rank.senders[rid] = sender
            return sender

        return make

    def step(self) -> tuple[StepPlan, list[StageReport], list[Ended]]:
        plan = self.controller.plan()
        if plan.tick is not None:
            self.tick_rids[plan.tick] = plan.rids

        def run(rank: Rank) -> StageReport:
            report, _ = rank.executor.step(plan)
            for t in report.ticks:
                rank.applied.append((t.tick, self.tick_rids[t.tick], t.vector))
            return report

        reports = list(self._pool.map(run, self.ranks))
        ended = self.controller.apply(plan, reports)
        self.ended.extend(ended)
        return plan, reports, ended

    def sender(self, rank: int, rid: str) -> ScriptedSender | None:
        return self.ranks[rank].senders.get(rid)

    def close(self) -> None:
        for rank in self.ranks:
            rank.executor.close()
        self._pool.shutdown()
