"""The consensus tick, whole: how the ranks of a prefill instance agree on each request's state.

One tick, in the order it happens:

1. **Issue** (controller, `TickIssuer.issue`): the controller snapshots its bootstrap and
   inflight rids, in order, and puts `(tick, rids)` in the next `StepPlan`. A tick goes out
   only when every rank has reported the previous one: at most one is in flight, and every rank
   sees the same ticks in the same order.
2. **Local vector** (each rank, `RankConsensus`): the rank polls exactly those rids, in that
   order; a rid it does not hold polls `Failed`.
3. **MIN all-reduce** (`gloo_allreduce_min`): one collective call with the other ranks, so any
   local failure wins and "ready" needs every rank ready. The vectors have the same length on
   every rank because the rids came from one owner.
4. **Apply on the rank** (`apply_vector`): `Failed` drops the rank's sender and pages,
   `Success` drops them as delivered, `WaitingForInput` marks the rid ready; exactly once, in
   tick order. The rank reports the agreed vector with its own failure reasons.
5. **Apply once on the controller** (`TickIssuer.collect`): when every rank has reported a
   tick, the vectors must be identical (they came out of one all-reduce); the controller gets
   one `Decision` per tick, in order, and moves its queues by it.
6. **Reconcile** (`TickIssuer.check_counts`, `tracked_set`): a rank whose request count
   disagrees with the controller's is sent the tracked set with the next plan and drops anything else
   (`StageRequests.reconcile`), so nothing outlives the controller's interest in it.

Ticks run on each rank's own thread (`background=True`, the actor's mode) while the step's
forward goes on; `background=False` runs them inline, for deterministic tests and PP 1.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.messages import StagePlanError, StageReport, TickResult
from cluster.stage_requests import StageRequests
from transport.poll import KVPoll

log = logging.getLogger(__name__)

AllReduceMin = Callable[[list[int]], list[int]]
# A rank whose request count disagrees with the controller's gets the tracked set at once; the
# set also goes out every this many steps as a safety net.
RECONCILE_EVERY = 256


# -- the controller's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One tick as every rank agreed on it: the state of each rid, and why failures failed."""

    tick: int
    states: tuple[tuple[str, KVPoll], ...]
    reasons: dict[str, tuple[int, str]]  # rid -> (first rank that reported it, its reason)

    def reason(self, rid: str) -> tuple[int | None, str]:
        return self.reasons.get(rid, (None, "failed on another rank"))


class TickIssuer:
    """Issues ticks, collects what the ranks report, and hands back each decided tick once."""

    def __init__(self) -> None:
        self._tick = 0
        self._outstanding: dict[int, tuple[str, ...]] = {}  # issued, not yet decided
        self._reports: dict[int, list[tuple[int, TickResult]]] = {}
        # Ticks decided before every rank reported them: their states and how many reports
        # are still to come (each checked against the decision).
        self._decided: dict[int, tuple[tuple[tuple[str, KVPoll], ...], int]] = {}
        self.applied_tick = 0
        self._reconcile_next = False

    @property
    def in_flight(self) -> bool:
        """A tick is undecided, or decided with copies still to check, or a rank must be
        reconciled: the controller has a step to run for it."""
        return bool(self._outstanding or self._decided or self._reconcile_next)

    def issue(self, rids: Sequence[str]) -> tuple[int | None, tuple[str, ...]]:
        """A new tick over `rids`, or `(None, ())` while the last one is undecided."""
        if self._outstanding:
            return None, ()
        self._tick += 1
        self._outstanding[self._tick] = tuple(rids)
        return self._tick, tuple(rids)

    def tracked_set(self, step: int, tracked: Sequence[str]) -> tuple[str, ...] | None:
        """The tracked set for this step's plan when a rank must reconcile, else None."""
        if self._reconcile_next or step % RECONCILE_EVERY == 0:
            self._reconcile_next = False
            return tuple(tracked)
        return None

    def collect(self, reports: list[StageReport]) -> list[Decision]:
        """Record the ranks' tick results; return every tick now decided, in order.

        A tick is decided once every rank reported it, or earlier from one rank's result
        when it failed nothing: every rank computed the same vector in one all-reduce, so one
        copy is the decision, and a failure waits only for the reasons the other ranks hold.
        (A stage before the last reports a tick that ran after its sends a step later.) Later
        copies of a decided tick are still checked against it."""
        for report in reports:
            for result in report.ticks:
                decided_vector = self._decided.get(result.tick)
                if decided_vector is not None:
                    self._check_late(result.tick, decided_vector, report.pp_rank, result)
                else:
                    self._reports.setdefault(result.tick, []).append((report.pp_rank, result))
        decided: list[Decision] = []
        for tick in sorted(self._outstanding):
            results = self._reports.get(tick, [])
            complete = len(results) >= len(reports)
            early = bool(results) and all(s != KVPoll.Failed for s in results[0][1].vector)
            if not (complete or early):
                break
            del self._reports[tick]
            decision = self._decide(tick, self._outstanding.pop(tick), results)
            if not complete:
                self._decided[tick] = (decision.states, len(reports) - len(results))
            decided.append(decision)
        return decided

    def _check_late(
        self,
        tick: int,
        decided: tuple[tuple[tuple[str, KVPoll], ...], int],
        rank: int,
        result: TickResult,
    ) -> None:
        states, missing = decided
        if tuple(result.vector) != tuple(int(s) for _, s in states):
            raise StagePlanError(f"pp_rank {rank} disagrees on tick {tick}, decided earlier")
        if missing <= 1:
            del self._decided[tick]
        else:
            self._decided[tick] = (states, missing - 1)

    def check_counts(self, reports: list[StageReport], expected_requests: int) -> None:
        """After the controller applied the decided ticks: a rank that applied the same ticks
        must hold `expected_requests`; one that holds another count reconciles next step."""
        if any(
            r.last_tick == self.applied_tick and r.num_requests != expected_requests
            for r in reports
        ):
            self._reconcile_next = True

    def clear(self) -> None:
        """Forget every undecided tick (the ranks were rebuilt empty)."""
        self._outstanding.clear()
        self._reports.clear()
        self._decided.clear()

    def _decide(
        self, tick: int, rids: tuple[str, ...], results: list[tuple[int, TickResult]]
    ) -> Decision:
        vectors = {r.vector for _, r in results}
        if len(vectors) != 1:
            raise StagePlanError(f"stages disagree on tick {tick}: {vectors}")
        vector = results[0][1].vector
        if len(vector) != len(rids):
            raise StagePlanError(f"tick {tick}: {len(vector)} states for {len(rids)} rids")
        reasons: dict[str, tuple[int, str]] = {}
        for rank, result in sorted(results, key=lambda item: item[0]):
            for rid, reason in result.failure_reasons.items():
                reasons.setdefault(rid, (rank, reason))
        self.applied_tick = tick
        states = tuple((rid, KVPoll(s)) for rid, s in zip(rids, vector, strict=True))
        return Decision(tick, states, reasons)


# -- each rank's side -----------------------------------------------------------------------


def local_vector(requests: StageRequests, rids: Sequence[str]) -> list[int]:
    """This rank's poll of exactly `rids`, in order; a rid it does not hold is `Failed`."""
    out = []
    for rid in rids:
        sender = requests.senders.get(rid)
        out.append(int(sender.poll()) if sender is not None else int(KVPoll.Failed))
    return out


def failure_reasons(requests: StageRequests, rids: Sequence[str]) -> dict[str, str]:
    """Local reasons for rids that failed on this rank, for the controller's error message."""
    out = {}
    for rid in rids:
        sender = requests.senders.get(rid)
        if sender is not None and sender.poll() is KVPoll.Failed:
            out[rid] = f"pp_rank {requests.pp_rank}: {sender.failure_reason or 'failed'}"
    return out


def apply_vector(
    requests: StageRequests, tick: int, rids: Sequence[str], vector: Sequence[int]
) -> None:
    """Apply the agreed vector of tick `tick` on this rank, exactly once and in tick order."""
    if tick <= requests.last_tick:
        raise RuntimeError(f"tick {tick} applied after tick {requests.last_tick}")
    if len(rids) != len(vector):
        raise RuntimeError(f"{len(rids)} rids but a vector of {len(vector)}")
    requests.last_tick = tick
    for rid, state in zip(rids, vector, strict=True):
        if state == KVPoll.Failed:
            requests.drop(rid, "failed by consensus")
        elif state == KVPoll.Success:
            requests.delivered(rid)
        elif state == KVPoll.WaitingForInput and rid in requests.senders:
            requests.ready.add(rid)


def gloo_allreduce_min(group: str | None) -> AllReduceMin:
    """The MIN all-reduce over the instance's Ray collective group (gloo, CPU tensors); the
    identity for a group of one."""

    def allreduce_min(values: list[int]) -> list[int]:
        if group is None:
            return values
        import torch
        from ray.util import collective
        from ray.util.collective.types import ReduceOp

        tensor = torch.tensor(values, dtype=torch.int32)
        collective.allreduce(tensor, group_name=group, op=ReduceOp.MIN)
        return tensor.tolist()

    return allreduce_min


class RankConsensus:
    """One rank's ticks: run each (inline or on its own thread), in order, and keep the results
    for the rank's next report. `lock` is the rank's state lock, shared with its steps."""

    def __init__(
        self,
        requests: StageRequests,
        allreduce_min: AllReduceMin,
        lock: threading.RLock,
        background: bool = True,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.requests = requests
        self._allreduce_min = allreduce_min
        self._lock = lock
        self._on_tick = on_tick
        self._done: list[TickResult] = []
        self._finished = threading.Condition(lock)  # a tick's result joined `_done`
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._ticks: queue.Queue[tuple[int, tuple[str, ...], float] | None] | None = None
        if background:
            self._ticks = queue.Queue()
            self._thread = threading.Thread(target=self._tick_loop, name="consensus", daemon=True)
            self._thread.start()

    def raise_if_failed(self) -> None:
        """A broken collective on the tick thread fails the rank's next step."""
        if self.error is not None:
            raise RuntimeError(f"consensus thread failed: {self.error!r}") from self.error

    def submit(self, tick: int, rids: tuple[str, ...], settle_s: float = 0.0) -> None:
        """Run tick `tick` over `rids`; first wait up to `settle_s` for this rank's writes of
        those rids that are still running (a step with no forward has nothing better to do)."""
        if self._ticks is None:
            self._run_tick(tick, rids, settle_s)
        else:
            self._ticks.put((tick, rids, settle_s))

    def wait_done(self, tick: int, timeout_s: float) -> None:
        """Block (under the rank's lock, which the wait releases) until tick `tick` has run
        here or `timeout_s` passed, so the step that carried it can report its result."""
        self._finished.wait_for(
            lambda: self.requests.last_tick >= tick or self.error is not None, timeout_s
        )

    def take_done(self) -> list[TickResult]:
        """Ticks finished since the last call (call under the rank's lock)."""
        done, self._done = self._done, []
        return done

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
                with self._lock:
                    self.error = exc
                    self._finished.notify_all()
                return

    def _run_tick(self, tick: int, rids: tuple[str, ...], settle_s: float = 0.0) -> None:
        """Local vector, MIN all-reduce, apply: one tick, the same on every rank."""
        start = time.perf_counter()
        if settle_s > 0:
            self.requests.wait_transfers(rids, settle_s)
        with self._lock:
            local = local_vector(self.requests, rids)
            failed = [r for r, s in zip(rids, local, strict=True) if s == KVPoll.Failed]
            reasons = failure_reasons(self.requests, failed)
        # The lock is not held across the all-reduce: steps (admissions, forwards) go on.
        agreed = self._allreduce_min(local) if rids else []
        with self._lock:
            apply_vector(self.requests, tick, rids, agreed)
            self._done.append(TickResult(tick, tuple(agreed), reasons))
            self.seconds = time.perf_counter() - start
            self._finished.notify_all()
        if self._on_tick is not None:
            self._on_tick(self.seconds)
