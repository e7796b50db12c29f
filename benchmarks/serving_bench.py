"""Serving under load: PD (PP 1 and 2) against a colocated single-process engine.

Each system runs on the same local multi-node Ray cluster behind the same OpenAI ingress, one
after the other in one run. A load generator sends Poisson arrivals at several rates with mixed
prompt and output lengths through the `openai` client (streaming) and records time to first
token, inter-token latency, end-to-end latency and output throughput. Reported per rate:
percentiles per system and PD / colocated ratios; the resident memory of every process by
role once each system is warm (serving_memory.json); and how long each system takes, after the
load stops, to bring every queue gauge and page count back to 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

from benchmarks.process_memory import by_role, ray_processes
from benchmarks.report import write_report
from engine.testmodel import make_test_model


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_request(client: Any, rng: random.Random, out: dict[str, list[float]]) -> None:
    words = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
        for _ in range(rng.choice([8, 32, 96, 160]))
    )
    max_tokens = rng.choice([8, 32, 64])
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    stream = await client.completions.create(
        model="bench",
        prompt=words,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            if first is None:
                first = now
            elif last is not None:
                gaps.append(now - last)
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    out["ttft"].append((first or end) - start)
    out["itl"].extend(gaps)
    out["e2e"].append(end - start)
    out["tokens"].append(tokens)


async def load(base: str, rate: float, duration: float, seed: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"ttft": [], "itl": [], "e2e": [], "tokens": []}
    tasks = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        tasks.append(asyncio.ensure_future(one_request(client, rng, out)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await client.close()
    return {**out, "elapsed": elapsed, "requests": len(tasks)}


def wait_idle(app: str, engine: str, timeout: float = 120) -> float:
    """Seconds until every gauge of the system reads 0 (after the load stopped)."""
    from ray import serve

    start = time.perf_counter()
    handles = [serve.get_deployment_handle(engine, app_name=app)]
    if engine == "decode":
        handles.append(serve.get_deployment_handle("prefill", app_name=app))
    while time.perf_counter() - start < timeout:
        busy = False
        for h in handles:
            s = h.stats.remote().result()
            if "queues" in s:  # prefill
                busy |= any(s["queues"].values()) or s["pages_in_use"] > 0
                busy |= any(st["num_requests"] or st["pages_in_use"] for st in s["stages"])
            else:
                busy |= bool(s["running"] or s["prealloc"] or s["transfer"] or s["pages_in_use"])
        if not busy:
            return time.perf_counter() - start
        time.sleep(0.05)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1,3,6", help="requests per second, comma-separated")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per rate")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    import ray
    from ray import serve

    from deployments.app import AppConfig, build_app
    from deployments.colocated import build_colocated_app
    from deployments.serve_cli import start_local_cluster
    from tests.e2e.conftest import free_port

    cluster = start_local_cluster(gpu_nodes=2, gpus_per_node=2)  # as `make serve` runs
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, dict[float, dict[str, Any]]] = {}
    drain: dict[str, float] = {}
    memory: list[dict[str, Any]] = []
    cores = len(os.sched_getaffinity(0))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_test_model(Path(tmp) / "bench", family="llama", seed=0)
            systems = [("colocated", 1), ("pd_pp1", 1), ("pd_pp2", 2)]
            for name, pp in systems:
                config = AppConfig(
                    model=str(model),
                    served_model_name="bench",
                    pp_size=pp,
                    dtype="float32",
                    device="cpu",
                    decode_num_gpus=1,
                ).sharing_cores(cores, "colocated" if name == "colocated" else "pd")
                app = build_colocated_app(config) if name == "colocated" else build_app(config)
                serve.run(app, name=name, route_prefix=f"/{name}")
                base = f"http://127.0.0.1:{port}/{name}"
                asyncio.run(load(base, 2.0, 2.0, seed=99))  # warm-up
                memory += memory_rows(name)
                results[name] = {}
                for rate in rates:
                    results[name][rate] = asyncio.run(
                        load(base, rate, args.duration, seed=int(rate))
                    )
                drain[name] = wait_idle(name, "colocated" if name == "colocated" else "decode")
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    rows = []
    for rate in rates:
        base = results["colocated"][rate]
        for name in ("colocated", "pd_pp1", "pd_pp2"):
            r = results[name][rate]
            tput = sum(r["tokens"]) / r["elapsed"]
            row = {
                "rate": rate,
                "system": name,
                "requests": r["requests"],
                "ttft_p50_ms": 1e3 * pct(r["ttft"], 0.5),
                "ttft_p99_ms": 1e3 * pct(r["ttft"], 0.99),
                "itl_p50_ms": 1e3 * pct(r["itl"], 0.5),
                "itl_p99_ms": 1e3 * pct(r["itl"], 0.99),
                "e2e_p50_s": pct(r["e2e"], 0.5),
                "tok_s": tput,
                "ttft_p50_vs_coloc": pct(r["ttft"], 0.5) / pct(base["ttft"], 0.5),
                "itl_p50_vs_coloc": pct(r["itl"], 0.5) / pct(base["itl"], 0.5),
                "tok_s_vs_coloc": tput / (sum(base["tokens"]) / base["elapsed"]),
                "drain_to_zero_s": drain[name],
            }
            rows.append(row)
    write_report("serving", rows, list(rows[0]))
    write_report("serving_memory", memory, list(memory[0]))


def memory_rows(system: str) -> list[dict[str, Any]]:
    """RSS per role of the Ray processes while `system` is deployed and warm (the replicas of
    systems measured before it are gone; Ray's daemons and Serve's actors are shared)."""
    table = by_role(ray_processes())
    rows = [{"system": system, "role": role, **row} for role, row in sorted(table.items())]
    total = sum(row["sum_mb"] for row in table.values())
    return [
        *rows,
        {"system": system, "role": "all", "processes": 0, "max_mb": 0.0, "sum_mb": total},
    ]


if __name__ == "__main__":
    main()
