"""Chaos soak: a `make serve`-like deployment under load while faults are thrown at it.

Phases run in a fixed order, over and over until the time is up, while a steady trickle of
short requests arrives throughout: an abort storm (streams cut by the client at random
moments), a max-length prompt, short requests, a stage actor killed with requests queued, KV
writes made to fail, a decode replica killed mid-stream. After every phase the soak waits for
every queue, page and in-flight gauge of every rank to read 0 and records how long that took;
after every fault, how long until a request succeeds again. At the end `/health` must say ok
and a final batch must all succeed.

What counts as a failure of pdserve: any request that failed without having streamed a token,
unless it was in flight while a decode replica died (its stream died with it); a gauge that
stays above 0 once idle for longer than `transfer_timeout_s` plus a margin; any failure after
the faults stopped. `python -m benchmarks.soak --minutes 10` (`make soak`); the test suite runs
a two-minute version of the same scenario list on the generated model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

import httpx
from openai import APIError, AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.report import write_report

WORDS = [
    "the",
    "red",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "runs",
    "far",
    "into",
    "green",
    "hills",
    "under",
    "blue",
    "sky",
]
IDLE_GAUGES = ("pdserve_queue_size", "pdserve_kv_pages_in_use", "pdserve_requests_in_flight")
IDLE_MARGIN_S = 10.0  # beyond transfer_timeout_s (decode quarantines pages that long)


@dataclass(frozen=True)
class Scale:
    """How big each phase is: `full` for `make soak` on the real model, `small` for tests."""

    storm_requests: int = 240
    storm_concurrency: int = 48
    storm_max_words: int = 300
    kill_requests: int = 30
    short_requests: int = 8
    steady_clients: int = 2


FULL = Scale()
SMALL = Scale(storm_requests=60, storm_concurrency=16, storm_max_words=120, kill_requests=12)


@dataclass
class Outcome:
    phase: str
    started: float
    ended: float = 0.0
    ok: bool = False
    cancelled: bool = False
    streamed: bool = False  # a token reached the client before the end
    status: int | None = None
    reason: str = ""


@dataclass
class PhaseRow:
    phase: str
    start: float = 0.0
    seconds: float = 0.0
    time_to_serve_s: float | None = None  # fault -> first success afterwards
    idle_to_zero_s: float | None = None  # load over -> every gauge at 0
    last_busy: list[str] = field(default_factory=list)  # the gauges that took longest
    rss: dict[str, int] = field(default_factory=dict)  # every process once the phase is over


@dataclass
class SoakTarget:
    """A deployed pdserve application and what the soak needs to know about it."""

    base_url: str  # http://host:port/<route prefix>
    app_name: str
    model: str  # served model name
    api_key: str
    max_model_len: int
    vocab_size: int
    transfer_timeout_s: float
    pp_size: int


@dataclass
class Soak:
    target: SoakTarget
    scale: Scale
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    rows: list[PhaseRow] = field(default_factory=list)
    decode_deaths: list[tuple[float, float]] = field(default_factory=list)  # (killed, serving)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.client = AsyncOpenAI(
            base_url=f"{self.target.base_url}/v1",
            api_key=self.target.api_key,
            max_retries=0,
            timeout=300,
        )
        self.http = httpx.AsyncClient(timeout=30)

    # -- requests -----------------------------------------------------------------------------

    def words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(low, high)))

    async def request(
        self,
        phase: str,
        prompt: str | list[int],
        max_tokens: int,
        stream: bool = True,
        cut_after: float | None = None,
    ) -> Outcome:
        """One completion; `cut_after` seconds into it the client walks away."""
        out = Outcome(phase, time.monotonic())
        self.outcomes.append(out)

        async def run() -> None:
            kwargs: dict[str, Any] = {
                "model": self.target.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "extra_body": {"ignore_eos": True},
            }
            if not stream:
                await self.client.completions.create(**kwargs)
                out.streamed = True
                return
            response = await self.client.completions.create(stream=True, **kwargs)
            try:
                async for chunk in response:
                    if chunk.choices and chunk.choices[0].text:
                        out.streamed = True
            finally:
                await response.close()

        try:
            if cut_after is None:
                await run()
            else:
                await asyncio.wait_for(run(), cut_after)
            out.ok = True
        except TimeoutError:
            out.cancelled = True
        except APIError as exc:
            out.status = getattr(exc, "status_code", None)
            out.reason = str(exc).strip().splitlines()[-1][:300] if str(exc) else repr(exc)
        except Exception as exc:  # a connection reset is a failure too
            out.reason = repr(exc)[:300]
        out.ended = time.monotonic()
        return out

    async def short(self, phase: str) -> Outcome:
        return await self.request(phase, self.words(3, 12), self.rng.randint(1, 6))

    async def until_serving(self, since: float) -> float:
        """Seconds from `since` to the first short request that succeeds."""
        while True:
            out = await self.request("probe", self.words(2, 6), 2, stream=False)
            if out.ok:
                return time.monotonic() - since
            await asyncio.sleep(0.2)

    # -- observations -------------------------------------------------------------------------

    async def gauges(self) -> dict[str, float]:
        """Every queue, page and in-flight series of every process, by its labels."""
        text = (await self.http.get(f"{self.target.base_url}/metrics")).text
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text)
            if family.name in IDLE_GAUGES
            for s in family.samples
        }

    async def until_idle(self, row: PhaseRow | None = None) -> float:
        """Seconds until every gauge reads 0 (raises past transfer_timeout_s + margin); the
        row learns which gauges were the last above 0."""
        start = time.monotonic()
        bound = self.target.transfer_timeout_s + IDLE_MARGIN_S
        while True:
            values = await self.gauges()
            busy = {k: v for k, v in values.items() if v != 0}
            if row is not None and busy:
                row.last_busy = sorted(busy)
            if values and not busy:
                return time.monotonic() - start
            if time.monotonic() - start > bound:
                raise AssertionError(f"gauges above 0 after {bound:.0f}s idle: {busy}")
            await asyncio.sleep(0.25)

    async def rss(self) -> dict[str, int]:
        """Resident bytes of every pdserve process ("roles pid" -> bytes), from /proc."""
        groups = (await self.http.get(f"{self.target.base_url}/metrics/targets")).json()
        out = {}
        for group in groups:
            labels = group["labels"]
            pid = labels["__meta_pdserve_pid"]
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                kb = next(int(line.split()[1]) for line in status.splitlines() if "VmRSS" in line)
                out[f"{labels['__meta_pdserve_roles']} {pid}"] = kb * 1024
        return out

    # -- faults -------------------------------------------------------------------------------

    def prefill(self) -> Any:
        from ray import serve

        return serve.get_deployment_handle("prefill", app_name=self.target.app_name)

    def kill_decode(self) -> None:
        import ray

        prefix = f"SERVE_REPLICA::{self.target.app_name}#decode#"
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)
        ]
        ray.kill(ray.get_actor(self.rng.choice(names), namespace="serve"), no_restart=True)

    # -- phases -------------------------------------------------------------------------------

    async def storm(self, row: PhaseRow) -> None:
        """Streamed completions of every size, a third cut by the client in 0-0.5 s."""
        gate = asyncio.Semaphore(self.scale.storm_concurrency)

        async def one() -> None:
            async with gate:
                cut = self.rng.uniform(0, 0.5) if self.rng.random() < 1 / 3 else None
                prompt = self.words(4, self.scale.storm_max_words)
                await self.request("storm", prompt, self.rng.randint(1, 40), cut_after=cut)

        await asyncio.gather(*(one() for _ in range(self.scale.storm_requests)))

    async def max_length(self, row: PhaseRow) -> None:
        """A token-id prompt just under the model's context, after whatever came before."""
        n = self.target.max_model_len - 12
        ids = [self.rng.randrange(100, self.target.vocab_size) for _ in range(n)]
        await self.request("max_length", ids, 4, stream=False)
        await asyncio.gather(*(self.short("max_length") for _ in range(self.scale.short_requests)))

    async def stage_kill(self, row: PhaseRow) -> None:
        """A stage actor killed with requests queued and in flight: those that streamed
        nothing are retried and succeed."""
        load = [
            asyncio.create_task(self.request("stage_kill", self.words(4, 200), 8))
            for _ in range(self.scale.kill_requests)
        ]
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        await self.prefill().debug_kill_stage.remote(self.rng.randrange(self.target.pp_size))
        await asyncio.gather(*load)
        row.time_to_serve_s = await self.until_serving(killed)

    async def transfer_faults(self, row: PhaseRow) -> None:
        """Two KV writes of one stage fail; the requests are retried, the peer repaired."""
        rank = self.rng.randrange(self.target.pp_size)
        injected = time.monotonic()
        await self.prefill().debug_inject_fault.remote(rank, "fail_next_writes", 2)
        await asyncio.gather(
            *(self.short("transfer_faults") for _ in range(self.scale.short_requests))
        )
        row.time_to_serve_s = await self.until_serving(injected)

    async def decode_kill(self, row: PhaseRow) -> None:
        """The decode replica dies mid-stream: its streams end with an error, requests that
        had streamed nothing wait for the replacement."""
        load = [
            asyncio.create_task(self.request("decode_kill", self.words(4, 40), 40))
            for _ in range(self.scale.short_requests)
        ]
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        self.kill_decode()
        await asyncio.gather(*load)
        row.time_to_serve_s = await self.until_serving(killed)
        self.decode_deaths.append((killed, killed + row.time_to_serve_s))

    async def steady(self, stop: asyncio.Event) -> None:
        """Requests arriving throughout, some cut by the client."""
        while not stop.is_set():
            cut = self.rng.uniform(0, 1.0) if self.rng.random() < 0.2 else None
            await self.request("steady", self.words(3, 40), self.rng.randint(1, 16), cut_after=cut)
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))

    # -- the whole soak -----------------------------------------------------------------------

    async def run(self, minutes: float) -> dict[str, Any]:
        phases: list[tuple[str, Callable[[PhaseRow], Awaitable[None]]]] = [
            ("storm", self.storm),
            ("max_length", self.max_length),
            ("stage_kill", self.stage_kill),
            ("transfer_faults", self.transfer_faults),
            ("decode_kill", self.decode_kill),
        ]
        rss_start = await self.rss()
        deadline = time.monotonic() + 60 * minutes
        cycles = 0
        while cycles == 0 or time.monotonic() < deadline:
            for name, phase in phases:
                row = PhaseRow(name, time.monotonic())
                stop = asyncio.Event()
                steady = [
                    asyncio.create_task(self.steady(stop)) for _ in range(self.scale.steady_clients)
                ]
                try:
                    await phase(row)
                finally:
                    stop.set()
                    await asyncio.gather(*steady)
                row.seconds = time.monotonic() - row.start
                row.idle_to_zero_s = await self.until_idle(row)
                row.rss = await self.rss()
                self.rows.append(row)
                _progress(self.phase_rows()[-1])
                if cycles and time.monotonic() > deadline:
                    break
            cycles += 1
        faults_over = time.monotonic()
        final = await asyncio.gather(*(self.short("final") for _ in range(16)))
        health = await self.http.get(f"{self.target.base_url}/health")
        idle = await self.until_idle()
        rss_end = await self.rss()
        await self.client.close()
        await self.http.aclose()
        return self.summary(cycles, final, health, idle, rss_start, rss_end, faults_over)

    def excused(self, out: Outcome) -> bool:
        """In flight while a decode replica died (or until a replacement served)."""
        return any(
            out.started <= serving and out.ended >= killed for killed, serving in self.decode_deaths
        )

    def summary(
        self,
        cycles: int,
        final: list[Outcome],
        health: httpx.Response,
        idle: float,
        rss_start: dict[str, int],
        rss_end: dict[str, int],
        faults_over: float,
    ) -> dict[str, Any]:
        failed = [o for o in self.outcomes if not o.ok and not o.cancelled]
        unexcused = [o for o in failed if not o.streamed and not self.excused(o)]
        after_faults = [o for o in failed if o.started >= faults_over]
        longest_idle = max([r.idle_to_zero_s or 0.0 for r in self.rows] + [idle])
        checks = {
            "no_failure_without_a_token": not unexcused,
            "final_batch_ok": all(o.ok for o in final) and not after_faults,
            "health_ok": health.status_code == 200,
            "gauges_back_to_zero": True,  # until_idle raised otherwise
        }
        return {
            "minutes_run": (max(o.ended for o in self.outcomes) - self.outcomes[0].started) / 60,
            "cycles": cycles,
            "requests": len([o for o in self.outcomes if o.phase != "probe"]),
            "succeeded": sum(o.ok for o in self.outcomes),
            "cancelled_by_client": sum(o.cancelled for o in self.outcomes),
            "failed": len(failed),
            "failed_by_reason": dict(
                Counter(f"{o.status} {_without_ids(o.reason)}" for o in failed)
            ),
            "failed_without_a_token": len([o for o in failed if not o.streamed]),
            "failed_without_a_token_outside_decode_death": len(unexcused),
            "unexcused_failures": [vars(o) for o in unexcused[:20]],
            "longest_idle_gauge_s": longest_idle,
            "health": health.json(),
            "rss_start": rss_start,
            "rss_end": rss_end,
            "checks": checks,
            "passed": all(checks.values()),
        }

    def phase_rows(self) -> list[dict[str, Any]]:
        """One row per phase run: its requests (the steady trickle's included) by outcome."""
        rows = []
        for row in self.rows:
            mine = [
                o
                for o in self.outcomes
                if row.start <= o.started < row.start + row.seconds and o.phase != "probe"
            ]
            failed = [o for o in mine if not o.ok and not o.cancelled]
            rows.append(
                {
                    "phase": row.phase,
                    "seconds": row.seconds,
                    "requests": len(mine),
                    "ok": sum(o.ok for o in mine),
                    "cut_by_client": sum(o.cancelled for o in mine),
                    "failed": len(failed),
                    "failed_no_token": sum(not o.streamed for o in failed),
                    "excused": sum(not o.streamed and self.excused(o) for o in failed),
                    "time_to_serve_s": row.time_to_serve_s,
                    "idle_to_zero_s": row.idle_to_zero_s,
                    "last_above_zero": ", ".join(row.last_busy),
                    "rss_MB": _rss_by_role(row.rss),
                }
            )
        return rows


async def retries(base_url: str) -> float:
    """Requests the ingress sent again (pdserve_request_retries_total, all reasons)."""
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(f"{base_url}/metrics")).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "pdserve_request_retries"
        for s in family.samples
    )


def run_soak(target: SoakTarget, minutes: float, scale: Scale, seed: int = 0) -> dict[str, Any]:
    """Run the soak against a deployed target; print the table, write JSON, return the summary."""

    async def main() -> dict[str, Any]:
        soak = Soak(target, scale, seed)
        summary = await soak.run(minutes)
        summary["retried"] = await retries(target.base_url)
        summary["phases"] = soak.phase_rows()
        return summary

    summary = asyncio.run(main())
    rows = summary["phases"]
    totals = {
        "phase": "total",
        "seconds": sum(r["seconds"] for r in rows),
        "idle_to_zero_s": summary["longest_idle_gauge_s"],
    }
    write_report("soak", [*rows, totals], list(rows[0]), summary)
    for key in (
        "requests",
        "succeeded",
        "cancelled_by_client",
        "failed",
        "failed_without_a_token",
        "failed_without_a_token_outside_decode_death",
        "retried",
        "longest_idle_gauge_s",
        "checks",
        "passed",
    ):
        print(f"{key}: {summary[key]}")
    print("failed by reason:")
    for reason, count in sorted(summary["failed_by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {reason}")
    print("RSS (MB) start -> end:")
    for name in sorted(set(summary["rss_start"]) | set(summary["rss_end"])):
        start, end = summary["rss_start"].get(name), summary["rss_end"].get(name)
        print(f"  {name:40s} {_mb(start):>8s} -> {_mb(end):>8s}")
    return summary


def _progress(row: dict[str, Any]) -> None:
    """One line per phase on stderr: a soak runs for minutes."""
    sys.stderr.write(
        f"soak: {row['phase']:16s} {row['seconds']:6.1f}s  requests {row['requests']:4d}  "
        f"ok {row['ok']:4d}  cut {row['cut_by_client']:4d}  failed {row['failed']:3d} "
        f"(no token {row['failed_no_token']}, excused {row['excused']})  "
        f"idle->0 {row['idle_to_zero_s']:.1f}s  RSS MB {row['rss_MB']}\n"
    )
    sys.stderr.flush()


def _rss_by_role(rss: dict[str, int]) -> str:
    """ "decode 3800 prefill 570 prefill-stage 1650,1700 ...": MB per process, by role."""
    roles: dict[str, list[str]] = {}
    for name in sorted(rss):
        roles.setdefault(name.split()[0], []).append(_mb(rss[name]))
    return " ".join(f"{role} {','.join(mbs)}" for role, mbs in sorted(roles.items()))


def _without_ids(reason: str) -> str:
    """A failure reason with request ids taken out, so equal failures count together."""
    return re.sub(r"\b(chatcmpl|cmpl)-[0-9a-f]+(-retry)?\b", "<rid>", reason)[:160]


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pp-size", type=int, default=2)
    parser.add_argument("--scale", choices=["full", "small"], default="full")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import AppConfig, build_app
    from deployments.model_store import KNOWN_MODELS, resolve_model
    from deployments.serve_cli import start_local_cluster
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer
    from tests.e2e.conftest import free_port

    model = resolve_model(args.model)
    name = args.model if args.model in KNOWN_MODELS else Path(model).name
    config = AppConfig(model=model, served_model_name=name, pp_size=args.pp_size)
    cluster = start_local_cluster(2, 2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="soak", route_prefix="/soak")
        vocab = Tokenizer.from_dir(
            model, extra_eos_token_ids=ModelConfig.from_dir(model).eos_token_ids
        ).vocab_size
        target = SoakTarget(
            base_url=f"http://127.0.0.1:{port}/soak",
            app_name="soak",
            model=name,
            api_key="none",
            max_model_len=config.resolved_max_model_len(),
            vocab_size=vocab,
            transfer_timeout_s=config.transport.transfer_timeout_s,
            pp_size=args.pp_size,
        )
        summary = run_soak(target, args.minutes, FULL if args.scale == "full" else SMALL, args.seed)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    raise SystemExit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
