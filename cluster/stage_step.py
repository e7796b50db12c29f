"""What every stage does with each `StepPlan`, shared by the Ray actor and the pure tests.

A step applies the plan's admissions, receiver info, drops and reconcile, hands the plan's
consensus tick to the tick runner, queues the forward of the micro-batch, starts the KV sends
of requests whose prompt is complete before waiting for the forward (the last stage adds each
first token once sampled), then reports.

Consensus ticks run on their own thread (`background=True`, the actor's mode): poll, gloo
all-reduce MIN and apply, in tick order on every rank, while the step's forward goes on. A
scheduler step therefore never waits for the all-reduce (measured on 2 cores: a MIN all-reduce
of 1,000 int32 across 4 ranks costs ~5 ms, more than the step's own fan-out). The controller
issues a new tick only once every rank has reported the previous one, so at most one tick is
in flight and every rank sees the same sequence. `background=False` runs the tick inline,
for deterministic tests and for PP 1.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from cluster.plan import ChunkPlan, StageReport, StepPlan, TickResult
from cluster.stage_requests import StageRequests
from transport.metadata import FirstToken
from transport.poll import KVPoll

log = logging.getLogger(__name__)

AllReduceMin = Callable[[list[int]], list[int]]
# A stage's forward over a micro-batch; it calls `start_sends` (the second argument) once the
# forward is queued and before it waits for the result, and returns the last stage's tokens.
Forward = Callable[[tuple[ChunkPlan, ...], Callable[[], None]], dict[str, FirstToken]]


class StageLoop:
    """One rank's executor of plans and consensus ticks."""

    def __init__(
        self,
        requests: StageRequests,
        allreduce_min: AllReduceMin,
        forward: Forward,
        is_last_stage: bool,
        background: bool = True,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.requests = requests
        self._on_tick = on_tick
        self._allreduce_min = allreduce_min
        self._forward = forward
        self._is_last = is_last_stage
        self._lock = threading.RLock()
        self._done: list[TickResult] = []
        self._queue_sizes = {"bootstrap": 0, "waiting": 0, "inflight": 0}
        self._consensus_s = 0.0
        self.error: BaseException | None = None
        self._ticks: queue.Queue[tuple[int, tuple[str, ...]] | None] | None = None
        if background:
            self._ticks = queue.Queue()
            self._thread = threading.Thread(target=self._tick_loop, name="consensus", daemon=True)
            self._thread.start()

    def step(self, plan: StepPlan) -> StageReport:
        """Apply `plan` on this rank and report; every rank runs this for every plan, in order."""
        if self.error is not None:
            raise RuntimeError(f"consensus thread failed: {self.error!r}") from self.error
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
        if plan.tick is not None:
            if self._ticks is None:
                self._run_tick(plan.tick, plan.rids)
            else:
                self._ticks.put((plan.tick, plan.rids))

        first_tokens: dict[str, FirstToken] = {}
        start = time.perf_counter()
        if plan.batch:
            finishing = [chunk.rid for chunk in plan.batch if chunk.finishing]
            started = False

            def start_sends() -> None:
                # Each stage ships its layers right after its own forward is queued, not after
                # the last stage's; the last stage's first tokens follow once sampled.
                nonlocal started
                if started:
                    return
                started = True
                for rid in finishing:  # the lock per request: a send may wait for a free slot
                    with self._lock:
                        self.requests.send(rid)

            first_tokens = self._forward(plan.batch, start_sends)
            start_sends()  # a forward that did not start them
            if self._is_last:
                with self._lock:
                    for rid in finishing:
                        self.requests.send_first_token(rid, first_tokens.get(rid))
        forward_s = time.perf_counter() - start

        with self._lock:
            ticks, self._done = self._done, []
            return StageReport(
                pp_rank=self.requests.pp_rank,
                ticks=ticks,
                last_tick=self.requests.last_tick,
                num_requests=len(self.requests.senders),
                pages_in_use=self.requests.pages_in_use,
                queue_sizes=dict(self._queue_sizes),
                first_tokens=first_tokens if self._is_last else {},
                forward_seconds=forward_s,
                consensus_seconds=self._consensus_s,
            )

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
        if self._ticks is not None:
            self._ticks.put(None)

    def _tick_loop(self) -> None:
        assert self._ticks is not None
        while (item := self._ticks.get()) is not None:
            try:
                self._run_tick(*item)
            except BaseException as exc:  # a broken collective: surface it on the next step
                log.exception("consensus tick failed", extra={"pp_rank": self.requests.pp_rank})
                self.error = exc
                return

    def _run_tick(self, tick: int, rids: tuple[str, ...]) -> None:
        """Poll, all-reduce MIN, apply: one tick, the same on every rank."""
        start = time.perf_counter()
        with self._lock:
            local = self.requests.local_vector(rids)
            failed = [r for r, s in zip(rids, local, strict=True) if s == KVPoll.Failed]
            rank = self.requests.pp_rank
            reasons = {
                rid: f"pp_rank {rank}: {reason}"
                for rid, reason in self.requests.failure_reasons(failed).items()
            }
        # The lock is not held across the all-reduce: steps (admissions, forwards) go on.
        agreed = self._allreduce_min(local) if rids else []
        with self._lock:
            self.requests.apply(tick, rids, agreed)
            self._done.append(TickResult(tick, tuple(agreed), reasons))
            self._queue_sizes = self._sizes(rids, local)
            self._consensus_s = time.perf_counter() - start
        if self._on_tick is not None:
            self._on_tick(self._consensus_s)

    def _sizes(self, rids: tuple[str, ...], local: list[int]) -> dict[str, int]:
        """Per-rank queue gauges from the tick just run (no second pass over the senders)."""
        held = self.requests.senders
        bootstrap = inflight = 0
        for rid, state in zip(rids, local, strict=True):
            if rid not in held:
                continue
            if state == KVPoll.Transferring:
                inflight += 1
            elif rid not in self.requests.ready:
                bootstrap += 1
        return {
            "bootstrap": bootstrap,
            "waiting": len(held) - bootstrap - inflight,
            "inflight": inflight,
        }
