"""One rank's step: apply a `StepPlan`, run its forward, start its KV sends, report.

Every rank runs every plan, in order: admissions, receiver info, drops and reconcile; the
plan's consensus tick goes to the rank's `RankConsensus` (on its own thread, so no forward
waits on an all-reduce); then the micro-batch's forward; the report carries the tick's result
when it is in by then (it normally is: every rank got the plan at once). The sends of requests
whose prompt is complete start as soon as the forward is queued and before it is waited for
(on a GPU they run on a side stream behind it), so each stage ships its layers without waiting
for the last stage; the last stage hands each first token to its sender once sampled.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.consensus import AllReduceMin, RankConsensus
from cluster.messages import ChunkPlan, StageReport, StepPlan
from cluster.stage_requests import StageRequests
from transport.metadata import FirstToken

# A tick that polls writes this rank has running waits this long for them to end first (in a
# step with no forward, or after the sends of the requests the step finishes), so a transfer
# that ends quickly is decided in that step rather than a step and an idle pause later.
SETTLE_S = 0.02
# A step reports its own tick's result when it comes within this long: every rank got the plan
# at once (`StageGroup.step`), so the all-reduce is normally done by the end of the forward.
# Bounded: a slow rank only moves the result to a later report.
TICK_REPORT_WAIT_S = 0.05


@dataclass
class StageOutput:
    """What a stage's forward over a micro-batch gives: hidden states for the next stage, or
    on the last stage the first tokens of the requests it finished and the scores of the
    prompt chunks that asked for them (echo with logprobs)."""

    hidden: Any = None
    first_tokens: dict[str, FirstToken] = field(default_factory=dict)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)


class StageCompute(Protocol):
    """A stage's forward in three moves, so the caller can start the sends in between."""

    def launch(self, batch: tuple[ChunkPlan, ...], upstream: Any) -> Any:
        """Queue this stage's layers over the micro-batch; returns the pending output."""
        ...

    def sends_after(self, out: Any) -> AbstractContextManager[None]:
        """Where sends started inside it run: behind the queued forward."""
        ...

    def finish(self, batch: tuple[ChunkPlan, ...], out: Any) -> StageOutput:
        """Wait for the forward: what it gives the next stage, or the last stage's answers."""
        ...


class PlanExecutor:
    """Applies each plan the controller sends on one rank and reports what the rank did."""

    def __init__(
        self,
        requests: StageRequests,
        allreduce_min: AllReduceMin,
        compute: StageCompute,
        is_last_stage: bool,
        background: bool = True,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.requests = requests
        self._compute = compute
        self._is_last = is_last_stage
        self._lock = threading.RLock()
        self.consensus = RankConsensus(requests, allreduce_min, self._lock, background, on_tick)

    def step(
        self, plan: StepPlan, upstream: Callable[[], Any] | None = None
    ) -> tuple[StageReport, Any]:
        """Apply `plan` on this rank; returns its report and the hidden states for the next.

        `upstream` fetches the previous stage's hidden states; it is called only when the plan
        has a forward, after the plan's state changes and its tick are in, so a rank applies a
        plan while the ranks before it still compute."""
        self.consensus.raise_if_failed()
        with self._lock:
            for rid, room in plan.admit:
                self.requests.admit(rid, room)
            for rid, info in plan.infos:
                self.requests.set_receiver_info(rid, info)
            for rid, reason in plan.drop:
                self.requests.drop(rid, reason)
            if plan.tracked is not None:
                self.requests.reconcile(plan.tracked)
            for chunk in plan.batch:
                self.requests.assign_pages(chunk.rid, chunk.pages)
        finishing = [chunk.rid for chunk in plan.batch if chunk.finishing]
        # A tick that polls requests this step finishes runs once their sends started, and
        # waits briefly for them; one over other requests runs beside the forward.
        tick_after_sends = plan.tick is not None and not set(finishing).isdisjoint(plan.rids)
        if plan.tick is not None and not tick_after_sends:
            settle_s = 0.0 if plan.batch else SETTLE_S
            self.consensus.submit(plan.tick, plan.rids, settle_s)

        output = StageOutput()
        start = time.perf_counter()
        if plan.batch:
            out = self._compute.launch(plan.batch, upstream() if upstream is not None else None)
            with self._compute.sends_after(out):
                for rid in finishing:  # the lock per request: a send may wait for a free slot
                    with self._lock:
                        self.requests.send(rid)
            output = self._compute.finish(plan.batch, out)
            if self._is_last:
                with self._lock:
                    for rid in finishing:
                        self.requests.send_first_token(rid, output.first_tokens.get(rid))
        forward_s = time.perf_counter() - start
        if tick_after_sends:
            assert plan.tick is not None
            self.consensus.submit(plan.tick, plan.rids, SETTLE_S)

        with self._lock:
            # Not a stage before the last whose tick runs after its sends: that tick's
            # all-reduce waits for the next stage, which waits for this step's hidden states.
            if plan.tick is not None and (self._is_last or not tick_after_sends):
                self.consensus.wait_done(plan.tick, TICK_REPORT_WAIT_S)
            report = StageReport(
                pp_rank=self.requests.pp_rank,
                ticks=self.consensus.take_done(),
                last_tick=self.requests.last_tick,
                num_requests=len(self.requests.senders),
                pages_in_use=self.requests.pages_in_use,
                first_tokens=output.first_tokens if self._is_last else {},
                prompt_logprobs=output.prompt_logprobs if self._is_last else {},
                forward_seconds=forward_s,
                consensus_seconds=self.consensus.seconds,
            )
        return report, output.hidden

    def queue_sizes(self) -> dict[str, int]:
        """This rank's bootstrap / waiting / inflight counts now (read when scraped). Not the
        last tick's: a drop applied after the last tick of a quiet spell would leave a
        request counted for good."""
        with self._lock:
            return self.requests.queue_sizes()

    def admit_untracked(self, rid: str, room: int = 0) -> None:
        """Test hook: hold a request the controller never admitted, as SGLang's per-rank queues
        could after an abort. It stays in this rank's bootstrap queue until the controller's
        next reconcile drops it (the next time the instance has work)."""
        with self._lock:
            self.requests.admit(rid, room)

    def close(self) -> None:
        self.consensus.close()


def no_side_stream(out: Any) -> AbstractContextManager[None]:
    """`StageCompute.sends_after` where nothing runs asynchronously (the CPU, scripted tests)."""
    return contextlib.nullcontext()
