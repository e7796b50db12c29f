"""A prefill instance on a real multi-node Ray cluster, stages on simulated GPU nodes, KV over
real Mooncake tcp into a decode-side receiver process."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import torch

from cluster.messages import PrefillRequest
from deployments.prefill import PrefillConfig, PrefillFailed, PrefillInstance
from engine import LLM, EngineConfig, SamplingParams
from engine.config import ModelConfig
from tests.transport.peer import CacheShape, DecodePeer
from transport import KVPoll, TransportConfig

os.environ.setdefault("GLOG_minloglevel", "1")

PAGE = 16


class LoopThread:
    """An asyncio loop on its own thread, where the instance runs as it does in a replica."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def decode_shape(model_dir) -> CacheShape:
    cfg = ModelConfig.from_dir(model_dir)
    return CacheShape(
        num_layers=cfg.num_hidden_layers,
        num_pages=1024,
        page_size=PAGE,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        dtype="float32",
    )


def cpu_prefill_config(model_dir: Any, pp_size: int, **overrides: Any) -> PrefillConfig:
    """A prefill instance of the test model on the test cluster's CPU nodes, its stages spread
    over them (half a CPU each)."""
    engine = EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", page_size=PAGE, num_pages=512
    )
    settings: dict[str, Any] = {
        "engine": engine,
        "pp_size": pp_size,
        "placement_strategy": "SPREAD",
        "num_cpus_per_stage": 0.5,
        "max_batched_tokens": 256,
        "transport": TransportConfig(bootstrap_timeout_s=4, liveness_interval_s=0.5),
    }
    return PrefillConfig(**(settings | overrides))


@pytest.fixture(
    scope="module",
    params=[(2, "auto"), (4, "auto"), (2, "mooncake")],
    ids=["pp2", "pp4", "pp2-mooncake"],
)
def setup(request, ray_cluster, llama_dir, loop) -> Iterator[tuple[PrefillInstance, DecodePeer]]:
    """An instance per PP size; `pp2-mooncake` moves hidden states between its stages with
    Mooncake writes into the next stage's slots (cluster/hidden_channel.py), the others through
    the host as CPU stages do by default. Every test must pass the same on each."""
    pp_size, hidden_channel = request.param
    transport = TransportConfig(
        bootstrap_timeout_s=4, liveness_interval_s=0.5, hidden_channel=hidden_channel
    )
    config = cpu_prefill_config(llama_dir, pp_size, transport=transport)
    instance = PrefillInstance(config, name=f"test{pp_size}{hidden_channel}")
    loop.run(instance.start())
    want = "host" if hidden_channel == "auto" else hidden_channel
    assert [link.path for link in instance.group.hidden_links] == [want] * (pp_size - 1)
    decode = DecodePeer(decode_shape(llama_dir))
    yield instance, decode
    decode.stop()
    loop.run(instance.stop())


class DecodePages:
    """Hands out distinct decode pages per request, like the decode replica's allocator."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        if self.next + n > 1024:
            self.next = 0
        pages = list(range(self.next, self.next + n))
        self.next += n
        return pages


PAGES = DecodePages()


async def _prefill_with_info(instance, decode, rid, room, prompt, pages, delay=0.0):
    info = decode.receive(rid, room, pages, num_stages=instance.config.pp_size)
    task = asyncio.ensure_future(
        instance.prefill(PrefillRequest(rid, room, prompt, SamplingParams(temperature=0)))
    )
    await asyncio.sleep(delay)
    instance.set_receiver_info(rid, info)
    return await task


def reference(model_dir, prompt: list[int]) -> tuple[list[torch.Tensor], int]:
    """Whole-model KV of `prompt` ([layers] of [2, T, H, D]) and its greedy first token."""
    llm = LLM(
        EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu", num_pages=64, page_size=PAGE
        )
    )
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    # The prompt's pages are the allocator's first ones, in order.
    n = len(prompt)
    kv = []
    for layer in llm.runner.kv_cache.layers:
        flat = layer.reshape(2, -1, *layer.shape[3:])
        kv.append(flat[:, :n].clone())
    return kv, out.token_ids[0]


def test_kv_arrives_byte_exact_and_matches_the_whole_model(setup, loop, llama_dir) -> None:
    instance, decode = setup
    rng = random.Random(0)
    for i, n in enumerate([5, 16, 37, 100]):
        prompt = [rng.randrange(5, 600) for _ in range(n)]
        pages = PAGES.take(-(-n // PAGE))
        result = loop.run(
            _prefill_with_info(instance, decode, f"exact{i}", 1000 + i, prompt, pages)
        )
        for stage in range(instance.config.pp_size):
            decode.result(f"exact{i}", stage, True)
        state, reason, first = decode.poll(f"exact{i}")
        assert KVPoll(state) is KVPoll.Success, reason
        assert first == result.first_token

        got = decode.layers()
        # Byte-exact: every stage's pages equal the decode pages they were written to.
        (ended,) = [e for e in instance.ended_log if e.rid == f"exact{i}"]
        stage_pages = loop.run(instance.group.call_all("read_pages", list(ended.pages)))
        layer = 0
        for per_stage in stage_pages:
            for kv in per_stage:
                dst = got[layer].view(torch.float32)[:, pages]
                assert torch.equal(dst.view(torch.uint8), kv.view(torch.uint8)), (i, layer)
                layer += 1
        # And the PP-split KV is the whole model's KV; the first token is its greedy token.
        ref_kv, ref_token = reference(llama_dir, prompt)
        for layer, ref in enumerate(ref_kv):
            dst = got[layer].view(torch.float32)[:, pages].reshape(2, -1, *ref.shape[2:])[:, :n]
            torch.testing.assert_close(dst, ref, rtol=1e-4, atol=1e-5)
        assert result.first_token.token_id == ref_token
    # Every step's hidden states went the way the stages chose (none through the host instead).
    want = instance.config.transport.hidden_channel.replace("auto", "host")
    for stats in loop.run(instance.group.call_all("stats"))[1:]:
        assert set(stats["hidden_received"]) == {want}, stats["hidden_received"]
    assert_idle(instance, loop, decode)


def assert_idle(instance: PrefillInstance, loop: LoopThread, decode: DecodePeer) -> None:
    deadline = time.monotonic() + 10
    while instance.controller.has_work and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not instance.controller.has_work
    assert instance.controller.allocator.num_in_use == 0
    assert set(instance.controller.queue_sizes().values()) == {0}
    for stats in loop.run(instance.group.call_all("stats")):
        assert stats["num_requests"] == 0
        assert stats["pages_in_use"] == 0
        assert set(stats["queue_sizes"].values()) == {0}
        assert stats["metadata_slots_held"] == 0


def test_abort_storm_ends_with_every_rank_at_zero(setup, loop) -> None:
    instance, decode = setup
    rng = random.Random(1)
    n = 200

    async def one(i: int) -> str:
        rid = f"storm{i}"
        prompt = [rng.randrange(5, 600) for _ in range(rng.randint(3, 60))]
        pages = PAGES.take(-(-len(prompt) // PAGE))
        info = decode.receive(rid, i, pages, num_stages=instance.config.pp_size)
        task = asyncio.ensure_future(instance.prefill(PrefillRequest(rid, i, prompt)))
        fate = rng.random()
        await asyncio.sleep(rng.random() * 0.3)
        if fate < 0.9:  # a tenth never gets receiver info: bootstrap timeout
            instance.set_receiver_info(rid, info)
        if fate < 1 / 3:  # a third aborted at a random phase
            await asyncio.sleep(rng.random() * 0.2)
            task.cancel()
        try:
            await task
            return "ok"
        except asyncio.CancelledError:
            return "aborted"
        except PrefillFailed as exc:
            return "timeout" if "bootstrap timeout" in str(exc) else f"failed: {exc}"
        finally:
            decode.abort(rid)

    async def storm() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    outcomes = loop.run(storm(), timeout=180)
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert counts.get("ok", 0) > n / 3, counts
    assert counts.get("aborted", 0) > 0 and counts.get("timeout", 0) > 0, counts
    assert set(counts) <= {"ok", "aborted", "timeout"}, counts
    assert_idle(instance, loop, decode)
    assert decode.slots_held() == 0


def test_killed_stage_fails_inflight_requests_and_the_instance_recovers(setup, loop) -> None:
    import ray

    instance, decode = setup
    never = loop.submit(instance.prefill(PrefillRequest("victim", 1, [5, 6, 7])))
    time.sleep(0.3)
    ray.kill(instance.group.actors[-1], no_restart=True)
    with pytest.raises(PrefillFailed, match="stage"):
        never.result(60)
    deadline = time.monotonic() + 60
    while not instance.healthy and time.monotonic() < deadline:
        time.sleep(0.2)
    assert instance.healthy
    paths = {link.path for link in instance.group.hidden_links}
    assert paths == {instance.config.transport.hidden_channel.replace("auto", "host")}
    pages = PAGES.take(1)
    result = loop.run(_prefill_with_info(instance, decode, "after", 2, [9, 8, 7, 6], pages))
    assert result.first_token.num_prompt_tokens == 4
    decode.abort("after")
    assert_idle(instance, loop, decode)
