"""Consensus cost per scheduler step, and how soon a ready request starts its prefill.

On a simulated 2-node Ray cluster (2 GPUs a node), PP 1, 2 and 4 stage actors hold N queued
requests (1, 100, 1,000, 10,000). Each step fans the same plan out to every stage, either as a
no-op (the round trip a scheduler step pays anyway) or through the production `PlanExecutor`
(poll N senders, one gloo MIN all-reduce of N int32, apply). Ratio = consensus step / no-op
step, alternating rounds in one run. Target: <= 1.5x at 1,000 requests and PP 4.

The second table runs real prefill instances (generated model) and reports how many steps and
milliseconds pass between a request becoming ready on every stage and its first chunk being
scheduled. Target: one step, whatever the PP size.

A third table compares the two ways to chain stage calls: Ray actor calls passing object
references (what pdserve uses) and a Ray compiled graph of the same chain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

import ray
import torch

from benchmarks.report import write_report
from cluster.consensus import gloo_allreduce_min
from cluster.messages import PrefillRequest, StepPlan
from cluster.plan_executor import PlanExecutor
from cluster.stage_requests import StageRequests
from engine import EngineConfig
from engine.testmodel import make_test_model


class _IdleSender:
    """A sender waiting for receiver info: what most of a long bootstrap queue looks like."""

    failure_reason = None

    def poll(self) -> Any:
        from transport.poll import KVPoll

        return KVPoll.Bootstrapping

    def abort(self, reason: str = "") -> None:
        pass


@ray.remote(num_gpus=1, num_cpus=0.5)
class BenchStage:
    def __init__(self, rank: int, world: int, group: str) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.requests = StageRequests(lambda rid, room: _IdleSender(), pp_rank=rank)
        # Plans here carry no batch: no forward runs, so no compute is needed.
        self.executor = PlanExecutor(self.requests, self._allreduce, None, rank == world - 1)  # type: ignore[arg-type]

    def join(self) -> None:
        if self.world > 1:
            from ray.util import collective

            collective.init_collective_group(self.world, self.rank, "gloo", self.group)

    def hold(self, rids: list[str]) -> None:
        self.requests.senders = {rid: _IdleSender() for rid in rids}

    def noop(self, plan: StepPlan) -> list[int]:
        return []

    def step(self, plan: StepPlan) -> list[int]:
        report, _ = self.executor.step(plan)
        return [t.tick for t in report.ticks]

    def relay(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _allreduce(self, values: list[int]) -> list[int]:
        return gloo_allreduce_min(self.group if self.world > 1 else None)(values)


def consensus_rows(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for pp in (1, 2, 4):
        group = f"bench{pp}"
        stages = [BenchStage.remote(r, pp, group) for r in range(pp)]
        ray.get([s.join.remote() for s in stages])
        step = 0
        tick = 0
        for n in (1, 100, 1000, 10000):
            rids = tuple(f"req-{i:06d}" for i in range(n))
            ray.get([s.hold.remote(list(rids)) for s in stages])
            noop, cons, tick_latency = [], [], []
            outstanding, issued_at = False, 0.0
            seen: list[set[int]] = [set() for _ in stages]  # ticks each stage has reported
            for _ in range(rounds):
                step += 1
                plan = StepPlan(step=step, tick=None, rids=rids)
                start = time.perf_counter()
                ray.get([s.noop.remote(plan) for s in stages])
                noop.append(time.perf_counter() - start)
                # The production step: a tick goes out once the previous one came back.
                step += 1
                new_tick = None if outstanding else tick + 1
                plan = StepPlan(step=step, tick=new_tick, rids=rids)
                start = time.perf_counter()
                done = ray.get([s.step.remote(plan) for s in stages])
                cons.append(time.perf_counter() - start)
                for have, new in zip(seen, done, strict=True):
                    have.update(new)
                if new_tick is not None:
                    tick, outstanding, issued_at = new_tick, True, start
                if outstanding and all(tick in have for have in seen):
                    tick_latency.append(time.perf_counter() - issued_at)
                    outstanding = False
                time.sleep(0.005)  # the controller's idle pause between steps
            while outstanding:  # drain the last tick so the next size starts clean
                step += 1
                done = ray.get([s.step.remote(StepPlan(step=step, tick=None)) for s in stages])
                for have, new in zip(seen, done, strict=True):
                    have.update(new)
                outstanding = not all(tick in have for have in seen)
            rows.append(
                {
                    "pp": pp,
                    "queued": n,
                    "noop_fanout_ms": 1e3 * statistics.median(noop),
                    "consensus_step_ms": 1e3 * statistics.median(cons),
                    "ratio": statistics.median(cons) / statistics.median(noop),
                    "tick_result_ms": 1e3 * statistics.median(tick_latency)
                    if tick_latency
                    else None,
                    "target": 1.5 if (pp, n) == (4, 1000) else None,
                }
            )
        for s in stages:
            ray.kill(s)
    return rows


def chain_rows(rounds: int) -> list[dict[str, Any]]:
    """Hidden states of a 256-token chunk (256 x 576 float32) through 4 stages, both ways."""
    from ray.dag import InputNode

    stages = [BenchStage.remote(r, 1, "chain") for r in range(4)]
    hidden = torch.randn(256, 576)
    chained = []
    for _ in range(rounds):
        start = time.perf_counter()
        ref = hidden
        for s in stages:
            ref = s.relay.remote(ref)
        ray.get(ref)
        chained.append(time.perf_counter() - start)
    with InputNode() as inp:
        node = inp
        for s in stages:
            node = s.relay.bind(node)
    compiled = node.experimental_compile()
    try:
        graph = []
        for _ in range(rounds):
            start = time.perf_counter()
            ray.get(compiled.execute(hidden))
            graph.append(time.perf_counter() - start)
    finally:
        compiled.teardown()
    for s in stages:
        ray.kill(s)
    c, g = statistics.median(chained), statistics.median(graph)
    return [
        {
            "pp": 4,
            "chained_calls_ms": 1e3 * c,
            "compiled_graph_ms": 1e3 * g,
            "compiled_vs_chained": g / c,
        }
    ]


async def _ready_to_start(config: Any, decode: Any, requests: int) -> list[Any]:
    """Requests through a real instance, one at a time; returns how each one ended."""
    from deployments.prefill import PrefillInstance

    instance = PrefillInstance(config, name=f"bench{config.pp_size}")
    await instance.start()
    try:
        for i in range(requests):
            rid = f"p{config.pp_size}-{i}"
            info = decode.receive(rid, i, [i % 64], config.pp_size)
            task = asyncio.ensure_future(
                instance.prefill(PrefillRequest(rid, i, list(range(5, 17))))
            )
            await asyncio.sleep(0.01)
            instance.set_receiver_info(rid, info)
            await task
            decode.abort(rid)
        return list(instance.ended_log)
    finally:
        await instance.stop()


def ready_to_start_rows(model_dir: Path, requests: int) -> list[dict[str, Any]]:
    from deployments.prefill import PrefillConfig
    from tests.prefill.test_ray_prefill import decode_shape
    from tests.transport.peer import DecodePeer

    rows = []
    decode = DecodePeer(decode_shape(model_dir))
    try:
        for pp in (1, 2, 4):
            engine = EngineConfig(
                model=str(model_dir), dtype="float32", device="cpu", num_pages=256
            )
            config = PrefillConfig(engine=engine, pp_size=pp, num_cpus_per_stage=0.5)
            ended = asyncio.run(_ready_to_start(config, decode, requests))
            done = [e for e in ended if e.ready_to_start_steps is not None]
            rows.append(
                {
                    "pp": pp,
                    "requests": len(done),
                    "ready_to_start_steps_max": max(e.ready_to_start_steps for e in done),
                    "ready_to_start_ms_p50": 1e3
                    * statistics.median(e.ready_to_start_s for e in done),
                    "target_steps": 1,
                }
            )
    finally:
        decode.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for i in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, resources={f"gpu_node_{i}": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        rows = consensus_rows(args.rounds)
        write_report("consensus", rows, list(rows[0]))
        chain = chain_rows(args.rounds * 4)
        write_report("stage_chain", chain, list(chain[0]))
        with tempfile.TemporaryDirectory() as tmp:
            model = make_test_model(Path(tmp) / "model", family="llama", seed=0)
            ready = ready_to_start_rows(model, args.requests)
        write_report("ready_to_start", ready, list(ready[0]))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
