"""The decode replica's batch while requests join it: the real engine on the test model, its
step in a worker thread as in production, requests arriving, joining, finishing and leaving
while steps run.

Two ways the KV arrives: an in-process last stage (writes the first-token record into the
receiver's slot, as a Mooncake write would) for fast, exact control of when a request lands;
and a real prefill instance (PP stages on the Ray test cluster, KV over Mooncake tcp).
"""

from __future__ import annotations

import asyncio
import ctypes
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cluster.messages import DecodeRequest, PrefillRequest, PrefillResult
from deployments.decode import (
    DecodeConfig,
    DecodeFailed,
    DecodeInstance,
    DecodeOverloaded,
)
from deployments.prefill import PrefillInstance
from engine import LLM, EngineConfig, SamplingParams
from tests.prefill.test_ray_prefill import PAGE, LoopThread, cpu_prefill_config
from transport import FirstToken, TransportConfig

STEP_PAUSE_S = 0.01  # device time of a step: the event loop runs meanwhile, as on a GPU


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@dataclass
class BatchWatch:
    """Spies on one decode engine: what the event loop did to the batch while a step ran, and
    in which order requests joined and their streams closed."""

    llm: LLM
    loop_thread: threading.Thread
    stepping: bool = False
    joins_during_step: list[str] = field(default_factory=list)
    allocations_during_step: list[int] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("join" | "closed", rid)

    def install(self) -> None:
        step, add, allocate = self.llm.step, self.llm.add_prefilled, self.llm.allocator.allocate

        def watched_step() -> Any:
            self.stepping = True
            try:
                time.sleep(STEP_PAUSE_S)
                return step()
            finally:
                self.stepping = False

        def watched_add(rid: str, *args: Any, **kwargs: Any) -> Any:
            if self.stepping:
                self.joins_during_step.append(rid)
            self.events.append(("join", rid))
            return add(rid, *args, **kwargs)

        def watched_allocate(count: int) -> list[int]:
            # The scheduler allocates inside the step (worker thread); the loop must not then.
            if self.stepping and threading.current_thread() is self.loop_thread:
                self.allocations_during_step.append(count)
            return allocate(count)

        self.llm.step = watched_step  # type: ignore[method-assign]
        self.llm.add_prefilled = watched_add  # type: ignore[method-assign]
        self.llm.allocator.allocate = watched_allocate  # type: ignore[method-assign]

    def joined(self, rid: str) -> bool:
        return ("join", rid) in self.events

    def joined_after_close(self) -> list[str]:
        closed: set[str] = set()
        late = []
        for kind, rid in self.events:
            if kind == "closed":
                closed.add(rid)
            elif rid in closed:
                late.append(rid)
        return late


class LocalLastStage:
    """Stands in for the prefill replica: after a delay it writes the first-token record into
    the request's metadata slot (what the last stage's Mooncake write delivers) and reports
    every stage done. It can cancel its caller just as the KV lands."""

    def __init__(self, num_stages: int, first_token: int = 7) -> None:
        self.num_stages = num_stages
        self.first_token = first_token
        self.delays: dict[str, float] = {}
        self.cancel_on_landing: set[str] = set()

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        await asyncio.sleep(self.delays.get(request.rid, 0.0))
        info = request.receiver_info
        assert info is not None
        # Choice i of n starts with first_token + i.
        more = tuple((self.first_token + i, -0.5, ()) for i in range(1, request.sampling.n))
        first = FirstToken(
            request.room,
            self.first_token,
            -0.5,
            len(request.prompt_token_ids),
            more_choices=more,
        )
        ctypes.memmove(info.metadata.address, first.pack(), info.metadata.nbytes)
        if request.rid in self.cancel_on_landing:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()  # lands at the request's next await: its wait to join
        return PrefillResult(request.rid, first, ["local"] * self.num_stages)


def decode_config(model_dir: Path, num_pages: int = 512, **overrides: Any) -> DecodeConfig:
    engine = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        page_size=PAGE,
        num_pages=num_pages,
        max_num_seqs=64,
    )
    settings: dict[str, Any] = {
        "engine": engine,
        "num_prefill_stages": 2,
        "transport": TransportConfig(transfer_timeout_s=1.0),
    }
    return DecodeConfig(**(settings | overrides))


async def start_decode(config: DecodeConfig, prefill: Any, replica: str) -> DecodeInstance:
    return DecodeInstance(config, prefill, replica)


def request(
    rid: str, room: int, prompt: list[int], max_tokens: int, **sampling: Any
) -> DecodeRequest:
    params = SamplingParams(
        **({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True} | sampling)
    )
    return DecodeRequest(rid, room, prompt, params)


async def consume(
    instance: DecodeInstance, req: DecodeRequest, watch: BatchWatch, leave_after: int = 0
) -> list[Any]:
    """The caller's side of a stream: all of it, or the first `leave_after` chunks."""
    chunks: list[Any] = []
    stream = instance.generate(req)
    try:
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == leave_after:
                break
    finally:
        await stream.aclose()
        watch.events.append(("closed", req.rid))
    return chunks


def assert_idle(instance: DecodeInstance, timeout: float = 15) -> None:
    """Nothing queued, nothing running, every page and metadata slot back."""
    deadline = time.monotonic() + timeout
    while True:
        stats = instance.stats()
        idle = (
            stats["prealloc"] == stats["transfer"] == stats["joining"] == stats["running"] == 0
            and stats["pages_in_use"] == stats["pages_quarantined"] == 0
            and stats["metadata_slots_held"] == 0
            and not instance.llm.has_unfinished()
        )
        if idle:
            return
        assert time.monotonic() < deadline, f"not idle: {stats}"
        time.sleep(0.05)


def assert_whole_stream(chunks: list[Any], max_tokens: int) -> None:
    """Every token once, in order, and the end."""
    assert [len(c.token_ids) for c in chunks] == [1] * max_tokens
    assert [c.num_output_tokens for c in chunks] == list(range(1, max_tokens + 1))
    assert [c.finish_reason for c in chunks] == [None] * (max_tokens - 1) + ["length"]


@pytest.mark.parametrize("overlapped", [False, True], ids=["sync", "async_scheduling"])
def test_joins_wait_for_the_step_in_flight_and_a_request_gone_before_its_join_never_joins(
    loop: LoopThread, llama_dir: Path, overlapped: bool
) -> None:
    stage = LocalLastStage(num_stages=2)
    instance = loop.run(start_decode(decode_config(llama_dir), stage, "joins-local"))
    # On CUDA by default: `step` returns the previous step's outputs, `abort` waits for it.
    instance.llm.async_scheduling = overlapped
    watch = BatchWatch(instance.llm, loop.thread)
    watch.install()
    rng = random.Random(0)
    # A long request keeps steps running the whole time; the rest join, finish and leave.
    keeper = request("keeper", 1, [5, 6, 7], max_tokens=80)
    fates: dict[str, str] = {}
    requests = []
    for i in range(30):
        rid = f"j{i}"
        fates[rid] = ("landing", "first", "mid", "whole", "whole")[i % 5]
        prompt = [rng.randrange(5, 600) for _ in range(rng.randint(1, 40))]
        requests.append(request(rid, 100 + i, prompt, max_tokens=rng.randint(4, 20)))
        stage.delays[rid] = 0.05 + rng.random() * 0.3
        if fates[rid] == "landing":
            stage.cancel_on_landing.add(rid)

    async def run_all() -> list[Any]:
        keeping = asyncio.ensure_future(consume(instance, keeper, watch))
        leave = {"first": 1, "mid": 3}
        outcomes = await asyncio.gather(
            *(consume(instance, r, watch, leave.get(fates[r.rid], 0)) for r in requests),
            return_exceptions=True,
        )
        return [await keeping, *outcomes]

    try:
        kept, *outcomes = loop.run(run_all())
        assert watch.joins_during_step == []
        assert watch.allocations_during_step == []
        assert_whole_stream(kept, 80)
        for req, outcome in zip(requests, outcomes, strict=True):
            fate, rid = fates[req.rid], req.rid
            if fate == "landing":
                assert isinstance(outcome, asyncio.CancelledError), (rid, outcome)
                continue
            assert isinstance(outcome, list), (rid, outcome)
            assert outcome[0].token_ids == [stage.first_token]  # the prefill side's token
            if fate == "whole":
                assert_whole_stream(outcome, req.sampling.max_tokens)
            else:
                want = {"first": 1, "mid": 3}[fate]
                assert [c.num_output_tokens for c in outcome] == list(range(1, want + 1))
        assert watch.joined_after_close() == []
        landing = [rid for rid, fate in fates.items() if fate == "landing"]
        # Most of them left while a step ran, before the loop could join them.
        assert any(not watch.joined(rid) for rid in landing), watch.events
        assert_idle(instance)
    finally:
        loop.run(instance.close())


def test_a_failed_join_fails_its_request_frees_its_pages_once_and_spares_the_batch(
    loop: LoopThread, llama_dir: Path
) -> None:
    stage = LocalLastStage(num_stages=2)
    instance = loop.run(start_decode(decode_config(llama_dir), stage, "joins-failed"))
    watch = BatchWatch(instance.llm, loop.thread)
    watch.install()
    llm = instance.llm
    append = llm._append
    broken = {"half"}

    def append_failing_once(seq: Any, token: int, logprob: float, *rest: Any) -> Any:
        if seq.rid in broken:  # the request is in the batch already: a half-applied join
            broken.discard(seq.rid)
            raise RuntimeError("detokenizer exploded")
        return append(seq, token, logprob, *rest)

    llm._append = append_failing_once  # type: ignore[method-assign]
    first = request("dup", 1, [5, 6, 7, 8], max_tokens=40)
    same_rid = request("dup", 2, [9, 10], max_tokens=5)  # add_prefilled refuses it outright
    half = request("half", 3, [11, 12, 13], max_tokens=5)
    stage.delays.update({"half": 0.1})

    async def run_all() -> list[Any]:
        running = asyncio.ensure_future(consume(instance, first, watch))
        await asyncio.sleep(0.1)
        failed = await asyncio.gather(
            consume(instance, same_rid, watch),
            consume(instance, half, watch),
            return_exceptions=True,
        )
        return [await running, *failed]

    try:
        whole, dup_failure, half_failure = loop.run(run_all(), timeout=60)
        assert_whole_stream(whole, 40)
        assert isinstance(dup_failure, DecodeFailed), dup_failure
        assert "joining the batch failed" in str(dup_failure)
        assert "already running" in str(dup_failure)
        assert isinstance(half_failure, DecodeFailed), half_failure
        assert "detokenizer exploded" in str(half_failure)
        assert watch.joins_during_step == []
        assert not any(s.rid == "half" for s in llm.scheduler.running)
        assert_idle(instance)  # a second free of the same pages would have raised
    finally:
        loop.run(instance.close())


def test_a_large_request_is_not_passed_over_by_a_stream_of_small_ones(
    loop: LoopThread, llama_dir: Path
) -> None:
    """Pages go to the prealloc queue in arrival order: small requests arriving all the time
    wait behind a large one instead of taking every page freed (which made it time out), and a
    prompt larger than the whole cache is refused at once instead of holding the queue."""
    stage = LocalLastStage(num_stages=2)
    config = decode_config(llama_dir, num_pages=12, prealloc_timeout_s=1.5)
    instance = loop.run(start_decode(config, stage, "joins-fifo"))
    watch = BatchWatch(instance.llm, loop.thread)  # a step takes STEP_PAUSE_S, as on a GPU
    watch.install()
    rng = random.Random(3)
    large = request("large", 1, [rng.randrange(5, 600) for _ in range(150)], max_tokens=4)  # 10
    smalls = [request(f"s{i}", 10 + i, [5, 6, 7, 8], max_tokens=6) for i in range(40)]  # 1 each
    for r in smalls:
        stage.delays[r.rid] = 0.2
    stage.delays["large"] = 0.05

    async def run_all() -> list[Any]:
        async def small(i: int) -> Any:
            await asyncio.sleep(0.05 * i)  # 2 s of arrivals, ~5 small requests holding pages
            return await consume(instance, smalls[i], watch)

        async def big() -> Any:
            await asyncio.sleep(0.4)
            return await consume(instance, large, watch)

        return await asyncio.gather(
            big(), *(small(i) for i in range(len(smalls))), return_exceptions=True
        )

    async def too_large() -> float:
        start = time.monotonic()
        huge = request("huge", 2, [5] * 200, max_tokens=2)  # 13 pages of a 12-page cache
        with pytest.raises(DecodeOverloaded, match="whole cache has 12"):
            await consume(instance, huge, watch)
        return time.monotonic() - start

    try:
        outcomes = loop.run(run_all())
        for req, outcome in zip([large, *smalls], outcomes, strict=True):
            assert isinstance(outcome, list), (req.rid, outcome)
            assert_whole_stream(outcome, req.sampling.max_tokens)
        assert loop.run(too_large()) < 0.5
        assert_idle(instance)
    finally:
        loop.run(instance.close())


def by_choice(chunks: list[Any]) -> dict[int, list[int]]:
    """The tokens of each choice of an n > 1 stream."""
    tokens: dict[int, list[int]] = {}
    for c in chunks:
        tokens.setdefault(c.index, []).extend(c.token_ids)
    return tokens


@pytest.mark.parametrize("prompt_len", [40, 32], ids=["partial_last_page", "whole_pages"])
def test_n_choices_hold_the_prompts_full_pages_once_and_the_last_choice_frees_them(
    loop: LoopThread, llama_dir: Path, prompt_len: int
) -> None:
    """The KV arrives once; the prompt's full pages get a holder per choice, the last partial
    page is copied for each choice (each writes its own tokens there), and the pages go back
    when the last choice ends, leaves, or fails to join."""
    stage = LocalLastStage(num_stages=2)
    instance = loop.run(start_decode(decode_config(llama_dir), stage, f"joins-n{prompt_len}"))
    llm = instance.llm
    watch = BatchWatch(llm, loop.thread)
    watch.install()
    full = prompt_len // PAGE  # 2 either way; a 40-token prompt ends inside a third page
    at_join: dict[str, Any] = {}
    join_choices = instance._join_choices

    def spied_join(join: Any) -> Any:
        tails = [tail[0] for tail in join.pages.tails]
        if prompt_len % PAGE:  # what the prefill wrote into choice 0's partial page
            llm.kv_cache.layers[0][:, tails[0]] = 1.5
        outs = join_choices(join)
        at_join[join.request.rid] = {
            "in_use": llm.allocator.num_in_use,
            "holders": [llm.allocator.holders(p) for p in join.pages.shared],
            "tables": [
                s.page_table.pages[:]
                for s in llm.scheduler.running
                if s.rid.startswith(join.request.rid)
            ],
            "tails_equal": [
                bool((llm.kv_cache.layers[0][:, t] == llm.kv_cache.layers[0][:, tails[0]]).all())
                for t in tails
            ],
        }
        return outs

    instance._join_choices = spied_join  # type: ignore[method-assign]
    append, broken = llm._append, {"broken#2"}

    def append_failing_once(seq: Any, *rest: Any) -> Any:
        if seq.rid in broken:  # choices 0 and 1 joined already: a half-applied fork
            broken.discard(seq.rid)
            raise RuntimeError("detokenizer exploded")
        return append(seq, *rest)

    llm._append = append_failing_once  # type: ignore[method-assign]
    prompt = list(range(5, 5 + prompt_len))
    whole = request("whole", 1, prompt, max_tokens=6, n=4)
    leaving = request("leaving", 2, prompt, max_tokens=40, n=3)
    failing = request("broken", 3, prompt, max_tokens=6, n=3)

    async def run_all() -> list[Any]:
        return await asyncio.gather(
            consume(instance, whole, watch),
            consume(instance, leaving, watch, leave_after=5),
            consume(instance, failing, watch),
            return_exceptions=True,
        )

    try:
        done, left, failed = loop.run(run_all(), timeout=60)
        tokens = by_choice(done)
        assert sorted(tokens) == [0, 1, 2, 3]
        assert [t[0] for _, t in sorted(tokens.items())] == [7, 8, 9, 10]  # first of each
        assert all(len(t) == 6 for t in tokens.values())
        seen = at_join["whole"]
        # Each request: its full pages once, plus a page per choice; the other two requests
        # may hold theirs meanwhile. Copies would need (4 + 3 + 3) x 3 = 30.
        assert seen["in_use"] <= sum(full + n for n in (4, 3, 3))
        assert seen["holders"] == [4] * full
        tables = seen["tables"]
        assert len(tables) == 4 and all(t[:full] == tables[0][:full] for t in tables)
        assert len({t[full] for t in tables}) == 4  # a partial page of its own
        if prompt_len % PAGE:
            assert seen["tails_equal"] == [True] * 4  # the prompt's tokens in every copy
        assert isinstance(left, list) and len(left) == 5
        assert isinstance(failed, DecodeFailed) and "detokenizer exploded" in str(failed)
        assert_idle(instance)  # a page freed once too often would have raised
    finally:
        loop.run(instance.close())


# -- with a real prefill instance ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prefill(ray_cluster, llama_dir: Path, loop: LoopThread) -> Iterator[PrefillInstance]:
    config = cpu_prefill_config(
        llama_dir,
        2,
        max_batched_tokens=64,
        transport=TransportConfig(bootstrap_timeout_s=10, liveness_interval_s=0.5),
    )
    instance = PrefillInstance(config, name="joins")
    loop.run(instance.start())
    yield instance
    loop.run(instance.stop())


def test_requests_prefilled_by_pp_stages_join_while_steps_run_and_decode_the_greedy_tokens(
    loop: LoopThread, llama_dir: Path, prefill: PrefillInstance
) -> None:
    instance = loop.run(start_decode(decode_config(llama_dir), prefill, "joins-pd"))
    watch = BatchWatch(instance.llm, loop.thread)
    watch.install()
    rng = random.Random(2)
    lengths = [1, 5, 16, 17, 30, 40, 64, 65, 3, 9, 12, 100]
    prompts = [[rng.randrange(5, 600) for _ in range(n)] for n in lengths]
    max_tokens = 10
    reference = LLM(
        EngineConfig(model=str(llama_dir), dtype="float32", device="cpu", num_pages=512)
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = [c.token_ids for c in reference.generate(prompts, params)]
    cancelled = {2, 7, 10}

    async def one(i: int, prompt: list[int]) -> Any:
        await asyncio.sleep(0.02 * i)  # arrivals spread over running steps
        req = request(f"pd{i}", 1000 + i, prompt, max_tokens)
        task = asyncio.ensure_future(consume(instance, req, watch))
        if i in cancelled:
            await asyncio.sleep(rng.random() * 0.3)
            task.cancel()
        return await task

    async def run_all() -> list[Any]:
        return await asyncio.gather(
            *(one(i, p) for i, p in enumerate(prompts)), return_exceptions=True
        )

    try:
        outcomes = loop.run(run_all(), timeout=180)
        for i, (n, want, outcome) in enumerate(zip(lengths, expected, outcomes, strict=True)):
            if isinstance(outcome, asyncio.CancelledError):
                assert i in cancelled
                continue
            assert isinstance(outcome, list), (i, outcome)
            if i not in cancelled:
                assert_whole_stream(outcome, max_tokens)
            have = [t for c in outcome for t in c.token_ids]
            assert have == want[: len(have)], f"prompt of {n} tokens"
        assert watch.joins_during_step == []
        assert watch.allocations_during_step == []
        assert watch.joined_after_close() == []
        assert_idle(instance)
        deadline = time.monotonic() + 15
        while prefill.controller.has_work and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefill.controller.allocator.num_in_use == 0
        assert set(prefill.controller.queue_sizes().values()) == {0}
    finally:
        loop.run(instance.close())


def test_seeded_choices_on_shared_pages_equal_single_requests_with_their_seeds(
    loop: LoopThread, llama_dir: Path, prefill: PrefillInstance
) -> None:
    """Choice i of a seeded n > 1 request samples with seed + i on both sides, so it must equal
    a request of its own with that seed: a choice that read another's tokens from a shared
    page would not."""
    instance = loop.run(start_decode(decode_config(llama_dir), prefill, "joins-pd-n"))
    watch = BatchWatch(instance.llm, loop.thread)
    rng = random.Random(5)
    sampling = {"temperature": 1.0, "max_tokens": 12}
    try:
        for length in (37, 48):  # the last page partial, and whole pages
            prompt = [rng.randrange(5, 600) for _ in range(length)]
            n_req = request(f"n{length}", 2000 + length, prompt, seed=11, n=3, **sampling)
            choices = by_choice(loop.run(consume(instance, n_req, watch), timeout=120))
            for i in range(3):
                single = request(
                    f"s{length}-{i}", 2100 + 3 * length + i, prompt, seed=11 + i, **sampling
                )
                chunks = loop.run(consume(instance, single, watch), timeout=120)
                assert choices[i] == [t for c in chunks for t in c.token_ids], (length, i)
            assert len({tuple(t) for t in choices.values()}) == 3
        assert_idle(instance)
    finally:
        loop.run(instance.close())
