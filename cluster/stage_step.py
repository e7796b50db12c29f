"""What every stage does with one `StepPlan`, in a fixed order, shared by the Ray actor and the
pure-logic tests: admissions, receiver info, drops, reconcile, consensus, forward, KV sends."""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.plan import ChunkPlan, StageReport, StepPlan
from cluster.stage_requests import StageRequests, poll_and_apply
from transport.metadata import FirstToken

AllReduceMin = Callable[[list[int]], list[int]]
Forward = Callable[[tuple[ChunkPlan, ...]], dict[str, FirstToken]]


def run_plan(
    requests: StageRequests,
    plan: StepPlan,
    allreduce_min: AllReduceMin,
    forward: Forward,
    is_last_stage: bool,
) -> StageReport:
    """Apply `plan` on this rank and report; every rank runs this for every plan, in order."""
    for rid, room in plan.admit:
        requests.admit(rid, room)
    for rid, info in plan.infos:
        requests.set_receiver_info(rid, info)
    for rid, reason in plan.drop:
        requests.drop(rid, reason)
    if plan.tracked is not None:
        requests.reconcile(plan.tracked)

    start = time.perf_counter()
    vector, reasons = poll_and_apply(requests, plan.tick, plan.rids, allreduce_min)
    consensus_s = time.perf_counter() - start

    first_tokens: dict[str, FirstToken] = {}
    start = time.perf_counter()
    if plan.batch:
        for chunk in plan.batch:
            requests.assign_pages(chunk.rid, chunk.pages)
        first_tokens = forward(plan.batch)
        # Each stage ships its layers right after its own forward, not after the last stage's.
        for chunk in plan.batch:
            if chunk.finishing:
                requests.send(chunk.rid, first_tokens.get(chunk.rid) if is_last_stage else None)
    forward_s = time.perf_counter() - start

    return StageReport(
        pp_rank=requests.pp_rank,
        vector=vector,
        failure_reasons=reasons,
        num_requests=len(requests.senders),
        pages_in_use=requests.pages_in_use,
        queue_sizes=requests.queue_sizes(),
        first_tokens=first_tokens if is_last_stage else {},
        forward_seconds=forward_s,
        consensus_seconds=consensus_s,
    )
