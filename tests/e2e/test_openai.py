"""pdserve end to end through the real `openai` client: ingress -> decode -> prefill (PP
stages on simulated GPU nodes) -> Mooncake -> decode, on a multi-node local Ray cluster."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from cluster.messages import Accepted, DecodeRequest
from engine import LLM, EngineConfig, SamplingParams
from tests.e2e.conftest import API_KEY, app_config

MODEL = "pdserve-test"


def engine_greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    llm = LLM(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", num_pages=512))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [c.token_ids for c in llm.generate(prompts, params)]


async def pd_tokens(app: str, prompt: list[int], max_tokens: int) -> list[int]:
    from ray import serve

    decode = serve.get_deployment_handle("decode", app_name=app)
    request = DecodeRequest(
        f"eq-{random.getrandbits(32)}",
        random.getrandbits(63),
        prompt,
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    tokens: list[int] = []
    stream = decode.generate.options(stream=True).remote(request)
    assert isinstance(await anext(stream), Accepted)  # the replica took it
    async for chunk in stream:
        tokens.extend(chunk.token_ids)
    return tokens


def stats(app: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from ray import serve

    decode = serve.get_deployment_handle("decode", app_name=app).stats.remote().result()
    prefill = serve.get_deployment_handle("prefill", app_name=app).stats.remote().result()
    return decode, prefill


def assert_idle(app: str, timeout: float = 30) -> None:
    """Every queue on every rank and the pages in use on both sides return to 0."""
    deadline = time.monotonic() + timeout
    while True:
        decode, prefill = stats(app)
        idle = (
            decode["prealloc"] == decode["transfer"] == decode["running"] == 0
            and decode["pages_in_use"] == 0
            and decode["metadata_slots_held"] == 0
            and set(prefill["queues"].values()) == {0}
            and prefill["pages_in_use"] == 0
            and all(s["num_requests"] == 0 and s["pages_in_use"] == 0 for s in prefill["stages"])
            and all(set(s["queue_sizes"].values()) == {0} for s in prefill["stages"])
        )
        if idle:
            return
        assert time.monotonic() < deadline, f"not idle: decode={decode} prefill={prefill}"
        time.sleep(0.25)


def test_greedy_through_pd_equals_the_single_process_engine(deploy, llama_dir) -> None:
    from ray import serve

    rng = random.Random(0)
    # Short, exactly one page, several pages, several prefill chunks (budget 64 tokens).
    lengths = [1, 5, 16, 17, 40, 64, 65, 150]
    prompts = [[rng.randrange(5, 600) for _ in range(n)] for n in lengths]
    expected = engine_greedy(llama_dir, prompts, max_tokens=12)
    for pp in (1, 2, 4):
        base = deploy(app_config(llama_dir, pp=pp, decode_num_gpus=0))
        app = base.rsplit("/", 1)[1]

        async def run_all(app: str = app) -> list[list[int]]:
            return await asyncio.gather(*(pd_tokens(app, p, 12) for p in prompts))

        got = asyncio.run(run_all())
        for n, want, have in zip(lengths, expected, got, strict=True):
            assert have == want, f"pp={pp} prompt of {n} tokens"
        assert_idle(app)
        serve.delete(app)


@pytest.fixture(scope="module")
def served(deploy, llama_dir) -> str:
    return deploy(
        app_config(
            llama_dir,
            pp=2,
            decode_num_gpus=0,
            max_prompt_len=200,
            transport={"transfer_timeout_s": 2.0, "bootstrap_timeout_s": 10.0},
        )
    )


def app_of(base: str) -> str:
    return base.rsplit("/", 1)[1]


def test_completions_and_chat_streaming_and_not(served) -> None:
    client = OpenAI(base_url=f"{served}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=MODEL,
        prompt="Hello there",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    assert_idle(app_of(served))


def phase_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pdserve_request_phase_seconds_count":
                phase = sample.labels["phase"]
                counts[phase] = counts.get(phase, 0) + sample.value
    return counts


def test_every_phase_of_the_time_to_first_token_is_measured(served) -> None:
    """Where TTFT goes: each request adds one sample to every prefill and decode phase."""
    from cluster.metrics import DECODE_PHASES, PREFILL_PHASES

    before = phase_counts(served)
    assert set(before) == set(PREFILL_PHASES) | set(DECODE_PHASES)  # series before any use
    client = OpenAI(base_url=f"{served}/v1", api_key=API_KEY)
    for prompt in ("one", "two"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = phase_counts(served)
    assert {p: after[p] - before[p] for p in after} == {p: 2 for p in after}


def test_sixty_four_concurrent_clients(served) -> None:
    async def main() -> list[Any]:
        client = AsyncOpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        rng = random.Random(1)

        async def one(i: int) -> Any:
            words = " ".join(
                rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(i % 30 + 1)
            )
            if i % 2:
                return await client.completions.create(
                    model=MODEL, prompt=words, max_tokens=8, temperature=0.7, seed=i
                )
            return await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": words}],
                max_tokens=8,
                temperature=0.7,
                seed=i,
            )

        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(r.usage.completion_tokens >= 1 for r in results)
    assert_idle(app_of(served))


def _stream_then_disconnect(base: str, body: dict[str, Any], events: int) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen >= events:
                    break  # leaving the block closes the connection mid-stream


def test_disconnects_and_aborts_at_every_phase_leave_nothing_behind(served) -> None:
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True}
    _stream_then_disconnect(served, body, events=3)  # mid-decode
    _stream_then_disconnect(served, body, events=1)  # right after the first token

    async def cancel_after(delay: float, prompt_len: int) -> None:
        client = AsyncOpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0)
        task = asyncio.ensure_future(
            client.completions.create(
                model=MODEL,
                prompt=[7] * prompt_len,
                max_tokens=1000,  # still decoding at the last cancel, however fast decode gets
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        )
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()

    async def storm() -> None:
        # Cancelled while preallocating/bootstrapping, mid-prefill (long prompt), mid-decode.
        await asyncio.gather(
            *(cancel_after(d, n) for d in (0.0, 0.01, 0.05, 0.2, 0.5) for n in (3, 190))
        )

    asyncio.run(storm())
    assert_idle(app_of(served))
    client = OpenAI(base_url=f"{served}/v1", api_key=API_KEY)
    out = client.completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    assert_idle(app_of(served))


@pytest.mark.parametrize(
    ("payload", "headers", "status", "needle"),
    [
        ({"prompt": [5] * 201, "max_tokens": 4}, None, 400, "at most 200"),
        ({"prompt": "hi", "max_tokens": 5000}, None, 400, "maximum context length"),
        ({"prompt": "hi", "temperature": 7}, None, 400, "temperature"),
        ({"prompt": "hi", "n": 0}, None, 400, "n"),
        ({"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
        ({"prompt": [10**6]}, None, 400, "token ids"),
        ("{not json", None, 400, "not valid JSON"),
        ({"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
        ({"prompt": "hi"}, {}, 401, "API key"),
        ({"prompt": "hi", "model": "gpt-4"}, None, 404, "does not exist"),
    ],
)
def test_bad_requests_get_4xx_and_create_no_state(served, payload, headers, status, needle) -> None:
    _, before = stats(app_of(served))
    if headers is None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
    content = json.dumps({"model": MODEL, **payload}) if isinstance(payload, dict) else payload
    response = httpx.post(
        f"{served}/v1/completions",
        content=content,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    decode, after = stats(app_of(served))
    assert after["requests_admitted"] == before["requests_admitted"]  # prefill never saw it
    assert decode["prealloc"] == decode["transfer"] == decode["running"] == 0
    assert decode["pages_in_use"] == 0
