"""The prefill controller: the one owner of a prefill instance's queues and decisions.

Requests move bootstrap -> waiting -> running -> inflight -> done, or end failed/aborted from
any of them; one that arrives with its receiver info starts in waiting. The controller never talks to the network itself: it builds a `StepPlan` per
scheduler step and applies what the stages report back. Every decision is made here, once,
and every stage applies it in the same call. Pure logic: no Ray, no Mooncake, so the tests
can drive it through any interleaving.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from cluster.consensus import Decision, TickIssuer
from cluster.messages import ChunkPlan, PrefillRequest, StageReport, StepPlan
from engine.page_allocator import PageAllocator, pages_needed
from transport.metadata import FirstToken
from transport.poll import KVPoll
from transport.receiver_info import ReceiverInfo

log = logging.getLogger(__name__)


class PromptRejected(ValueError):
    """A prompt the instance cannot serve (too long, empty): the caller's error, a 4xx."""


def prompt_length_problem(n: int, max_prompt_len: int) -> str | None:
    """Why a prompt of `n` tokens cannot be prefilled, or None: the one rule, which the ingress
    answers with a 400 before anything is held, and the controller enforces as its owner."""
    if n == 0:
        return "the prompt is empty"
    if n > max_prompt_len:
        return f"the prompt has {n} tokens; this deployment prefills at most {max_prompt_len}"
    return None


class Phase(StrEnum):
    BOOTSTRAP = "bootstrap"
    WAITING = "waiting"
    RUNNING = "running"
    INFLIGHT = "inflight"


@dataclass
class Tracked:
    request: PrefillRequest
    phase: Phase = Phase.BOOTSTRAP
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens whose KV is written
    first_token: FirstToken | None = None
    prompt_logprobs: list = field(default_factory=list)  # echo with logprobs: scored so far
    admitted_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    prefill_started_at: float | None = None
    inflight_at: float | None = None  # its last chunk ran: the KV is on its way
    ready_tick: int | None = None
    start_tick: int | None = None


@dataclass(frozen=True)
class Ended:
    """How a request left the controller."""

    rid: str
    ok: bool
    reason: str | None = None
    first_token: FirstToken | None = None
    ready_to_start_s: float | None = None  # ready on every stage -> first chunk scheduled
    phase: str | None = None  # where it was when it ended
    pages: tuple[int, ...] = ()  # prefill pages it used (freed by now), for diagnostics
    ready_to_start_steps: int | None = None
    failed_rank: int | None = None  # the first rank that reported the failure, if one did
    # Seconds per phase of a request that ended well (`cluster.metrics.PREFILL_PHASES`).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class ControllerConfig:
    num_pages: int
    page_size: int
    max_batched_tokens: int = 2048
    max_prompt_len: int = 4096
    max_batched_requests: int = 64


class PrefillController:
    """Queues, pages and the consensus bookkeeping of one prefill instance."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.allocator = PageAllocator(config.num_pages)
        self.requests: OrderedDict[str, Tracked] = OrderedDict()
        self.waiting: OrderedDict[str, None] = OrderedDict()  # FIFO of ready requests
        self._step = 0
        self.admitted = 0  # requests that passed validation, ever (a test of "never saw it")
        self.ticks = TickIssuer()
        self._pending_admit: list[tuple[str, int]] = []
        self._pending_infos: list[tuple[str, ReceiverInfo]] = []
        self._pending_drop: list[tuple[str, str]] = []

    # -- caller-facing ------------------------------------------------------------------------

    def add(self, request: PrefillRequest) -> None:
        """Admit a request; rejects bad prompts before any state exists.

        A request that brings its receiver info (the decode side's call always does) skips
        the bootstrap queue: the plan that admits it gives every rank the info before any
        forward, so each rank's sender is `WaitingForInput` by the time the forward's sends
        start, and the request can be scheduled in that same plan. Only one that waits for its
        info (`set_receiver_info`) waits for the consensus to call it ready. Either way the
        consensus decides how it ends."""
        n = len(request.prompt_token_ids)
        if (problem := prompt_length_problem(n, self.config.max_prompt_len)) is not None:
            raise PromptRejected(problem)
        if pages_needed(n, self.config.page_size) > self.config.num_pages:
            raise PromptRejected(f"the prompt's {n} tokens exceed the instance's KV capacity")
        if request.rid in self.requests:
            raise ValueError(f"request {request.rid} is already in flight")
        tracked = self.requests[request.rid] = Tracked(request)
        self.admitted += 1
        self._pending_admit.append((request.rid, request.room))
        if request.receiver_info is not None:
            self._pending_infos.append((request.rid, request.receiver_info))
            self._make_ready(request.rid, tracked)

    def set_receiver_info(self, rid: str, info: ReceiverInfo) -> bool:
        """Forward receiver info to every stage with the next plan; False for an unknown rid."""
        if rid not in self.requests:
            return False
        self._pending_infos.append((rid, info))
        return True

    def abort(self, rid: str, reason: str = "aborted by the caller") -> Ended | None:
        """Stop tracking `rid` now; the stages drop it with the next plan. Idempotent."""
        tracked = self.requests.pop(rid, None)
        if tracked is None:
            return None
        self._release(rid, tracked)
        admitted = [a for a in self._pending_admit if a[0] != rid]
        if len(admitted) == len(self._pending_admit):
            self._pending_drop.append((rid, reason))  # the stages hold it: tell them
        self._pending_admit = admitted
        return Ended(rid, ok=False, reason=reason, phase=tracked.phase.value)

    def fail_all(self, reason: str) -> list[Ended]:
        """End every request (a stage died); the stages are rebuilt empty afterwards."""
        ended = [Ended(rid, False, reason, phase=t.phase.value) for rid, t in self.requests.items()]
        self.requests.clear()
        self.waiting.clear()
        self.allocator = PageAllocator(self.config.num_pages)
        self._pending_admit.clear()
        self._pending_infos.clear()
        self._pending_drop.clear()
        self.ticks.clear()
        return ended

    @property
    def has_work(self) -> bool:
        return bool(self.requests or self._pending_drop or self.ticks.in_flight)

    def queue_sizes(self) -> dict[str, int]:
        counts = {phase.value: 0 for phase in Phase}
        for tracked in list(self.requests.values()):  # metrics read it from another thread
            counts[tracked.phase.value] += 1
        return counts

    # -- one scheduler step -------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """The next step for every stage: pending messages, a consensus tick, a micro-batch.

        The tick covers the bootstrap and inflight queues and the requests the batch finishes,
        in order (`cluster.consensus`).
        """
        self._step += 1
        batch = self._schedule()
        # The requests this batch finishes are polled too: each rank runs the tick after its
        # sends started, so a transfer that ends quickly is decided in this very step.
        polled = (Phase.BOOTSTRAP, Phase.INFLIGHT)
        finishing = {c.rid for c in batch if c.finishing}
        tick, rids = self.ticks.issue(
            [r for r, t in self.requests.items() if t.phase in polled or r in finishing]
        )
        tracked = self.ticks.tracked_set(self._step, tuple(self.requests))
        plan = StepPlan(
            step=self._step,
            tick=tick,
            rids=rids,
            admit=tuple(self._pending_admit),
            infos=tuple(self._pending_infos),
            drop=tuple(self._pending_drop),
            tracked=tracked,
            batch=batch,
        )
        self._pending_admit.clear()
        self._pending_infos.clear()
        self._pending_drop.clear()
        return plan

    def apply(self, plan: StepPlan, reports: list[StageReport]) -> list[Ended]:
        """Apply what every stage reported for `plan`, once; returns the requests that ended."""
        first_tokens: dict[str, FirstToken] = {}
        scored: dict[str, list] = {}
        for report in reports:
            first_tokens.update(report.first_tokens)
            scored.update(report.prompt_logprobs)
        for chunk in plan.batch:
            tracked = self.requests.get(chunk.rid)
            if tracked is None:
                continue
            tracked.computed = chunk.start + len(chunk.token_ids)
            tracked.prompt_logprobs += scored.get(chunk.rid, [])
            if chunk.finishing:
                tracked.phase = Phase.INFLIGHT
                tracked.inflight_at = time.monotonic()
                first = first_tokens.get(chunk.rid)
                if first is not None and chunk.prompt_logprobs is not None:
                    first = dataclasses.replace(first, prompt_logprobs=tracked.prompt_logprobs)
                tracked.first_token = first
        ended: list[Ended] = []
        for decision in self.ticks.collect(reports):
            ended += self._apply_decision(decision)
        # A stage that applied the same ticks as we did holds exactly what we track, plus
        # what it has yet to drop, minus what it has yet to admit.
        expected = len(self.requests) - len(self._pending_admit) + len(self._pending_drop)
        self.ticks.check_counts(reports, expected)
        return ended

    def _apply_decision(self, decision: Decision) -> list[Ended]:
        """Move each rid of a decided tick: failed ends, ready waits, delivered ends well."""
        ended: list[Ended] = []
        for rid, state in decision.states:
            tracked = self.requests.get(rid)
            if tracked is None:
                continue  # aborted after the tick went out: already ended, decided once
            if state == KVPoll.Failed:
                rank, reason = decision.reason(rid)
                ended.append(self._end(rid, False, reason, failed_rank=rank))
            elif tracked.phase is Phase.BOOTSTRAP and state >= KVPoll.WaitingForInput:
                self._make_ready(rid, tracked)
            elif tracked.phase is Phase.INFLIGHT and state == KVPoll.Success:
                ended.append(self._end(rid, True))
        return ended

    # -- internals ----------------------------------------------------------------------------

    def _make_ready(self, rid: str, tracked: Tracked) -> None:
        """Into the waiting queue: schedulable from the next plan on."""
        tracked.phase = Phase.WAITING
        tracked.ready_at = time.monotonic()
        tracked.ready_tick = self._step
        self.waiting[rid] = None

    def _schedule(self) -> tuple[ChunkPlan, ...]:
        """Chunked prefill under the token budget: running requests first, then waiting, FIFO."""
        budget = self.config.max_batched_tokens
        batch: list[ChunkPlan] = []
        running = [r for r, t in self.requests.items() if t.phase is Phase.RUNNING]
        for rid in running + list(self.waiting):
            if budget <= 0 or len(batch) >= self.config.max_batched_requests:
                break
            tracked = self.requests[rid]
            prompt = tracked.request.prompt_token_ids
            if tracked.phase is Phase.WAITING:
                need = pages_needed(len(prompt), self.config.page_size)
                if not self.allocator.can_allocate(need):
                    break  # FIFO: later requests wait behind this one
                tracked.pages = self.allocator.allocate(need)
                tracked.phase = Phase.RUNNING
                tracked.prefill_started_at = time.monotonic()
                tracked.start_tick = self._step
                del self.waiting[rid]
            start = tracked.computed
            take = min(budget, len(prompt) - start)
            budget -= take
            finishing = start + take == len(prompt)
            batch.append(
                ChunkPlan(
                    rid=rid,
                    start=start,
                    token_ids=prompt[start : start + take],
                    pages=tracked.pages,
                    finishing=finishing,
                    room=tracked.request.room,
                    sampling=tracked.request.sampling if finishing else None,
                    prompt_token_ids=(
                        tuple(prompt)
                        if finishing and tracked.request.sampling.needs_history
                        else ()
                    ),
                    prompt_logprobs=tracked.request.sampling.prompt_logprobs,
                    next_token=None if finishing else prompt[start + take],
                )
            )
        return tuple(batch)

    def _end(
        self, rid: str, ok: bool, reason: str | None = None, failed_rank: int | None = None
    ) -> Ended:
        tracked = self.requests.pop(rid)
        pages = tuple(tracked.pages)
        self._release(rid, tracked)
        wait = None
        if tracked.ready_at is not None and tracked.prefill_started_at is not None:
            wait = tracked.prefill_started_at - tracked.ready_at
        if not ok:
            log.warning("prefill request failed: %s", reason, extra={"rid": rid})
        first = tracked.first_token if ok else None
        steps = None
        if tracked.ready_tick is not None and tracked.start_tick is not None:
            steps = tracked.start_tick - tracked.ready_tick
        phases = _phases(tracked, time.monotonic()) if ok else {}
        return Ended(
            rid, ok, reason, first, wait, tracked.phase.value, pages, steps, failed_rank, phases
        )

    def _release(self, rid: str, tracked: Tracked) -> None:
        if tracked.pages:
            self.allocator.free(tracked.pages)
            tracked.pages = []
        self.waiting.pop(rid, None)


def _phases(tracked: Tracked, now: float) -> dict[str, float]:
    """Where a delivered request's time went, phase by phase."""
    t = tracked
    if t.ready_at is None or t.prefill_started_at is None or t.inflight_at is None:
        return {}
    return {
        "bootstrap": t.ready_at - t.admitted_at,
        "queue_wait": t.prefill_started_at - t.ready_at,
        "forward": t.inflight_at - t.prefill_started_at,
        "kv_transfer": now - t.inflight_at,
    }
