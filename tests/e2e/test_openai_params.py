"""The OpenAI parameters beyond the basics, through the real `openai` client against PD (PP=2):
n, logprobs and top logprobs, penalties, logit_bias, min_tokens, lists of prompts, echo; and
the fields not built yet answered with a 400 that names them, never ignored.

The first token of every request is sampled on the last prefill stage and the rest on decode,
so each parameter is checked on the first token too, against the single-process engine (the
colocated path)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from engine import LLM, EngineConfig, SamplingParams
from tests.e2e.conftest import API_KEY, app_config
from tests.e2e.test_openai import MODEL, _stream_then_disconnect, app_of, assert_idle, stats

PROMPT = [11, 200, 37, 5, 91, 14, 300, 8]


@pytest.fixture(scope="module")
def served(deploy, llama_dir) -> str:
    return deploy(app_config(llama_dir, pp=2, decode_num_gpus=0, max_prompt_len=200))


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(llama_dir) -> LLM:
    return LLM(EngineConfig(model=str(llama_dir), dtype="float32", device="cpu", num_pages=256))


def in_process(engine: LLM, prompt: list[int], **kwargs: Any) -> Any:
    params = SamplingParams(temperature=0, ignore_eos=True, **kwargs)
    [completion] = engine.generate([prompt], params)
    return completion


def test_n_choices_differ_when_sampled_and_agree_when_greedy(client, served) -> None:
    _, before = stats(app_of(served))
    sampled = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) > 1
    assert all(c.finish_reason == "length" for c in sampled.choices)
    assert sampled.usage.completion_tokens == 24 and sampled.usage.prompt_tokens == len(PROMPT)
    _, after = stats(app_of(served))
    assert after["requests_admitted"] == before["requests_admitted"] + 1  # one prefill for n=3
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded
    greedy = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        n=2,
    )  # fmt: skip
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, n=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts, finished = {0: "", 1: "", 2: ""}, {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert finished == {0: "length", 1: "length", 2: "length"} and all(texts.values())
    assert usage.completion_tokens == 15
    assert_idle(app_of(served))


def test_a_list_of_prompts_gets_n_choices_each_in_order(client, engine) -> None:
    prompts = [PROMPT, [4, 4, 4, 4], [9, 310, 2]]
    out = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in out.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        want = engine.tokenizer.decode(in_process(engine, prompt, max_tokens=4).token_ids)
        assert out.choices[2 * i].text == out.choices[2 * i + 1].text == want
    assert out.usage.prompt_tokens == sum(map(len, prompts))
    texts = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=2)
    assert len(texts.choices) == 2


def test_logprobs_and_top_logprobs_equal_the_engines_first_token_included(client, engine) -> None:
    want = in_process(engine, PROMPT, max_tokens=5, logprobs=True, top_logprobs=3)
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert lp.tokens == [engine.tokenizer.token_text(t) for t in want.token_ids]
    for got, alternatives in zip(lp.top_logprobs, want.top_logprobs, strict=True):
        expected = {engine.tokenizer.token_text(t): v for t, v in alternatives}
        assert got == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)  # greedy
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, stream=True,
    )  # fmt: skip
    streamed = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)


def test_logit_bias_forces_and_bans_tokens_the_first_one_too(client, engine) -> None:
    forced = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.7, seed=3,
        logit_bias={"77": 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert forced.choices[0].text == engine.tokenizer.decode([77] * 4)
    first = in_process(engine, PROMPT, max_tokens=1).token_ids[0]
    banned = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0,
        logit_bias={str(first): -100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert banned.choices[0].logprobs.tokens[0] != engine.tokenizer.token_text(first)


def test_penalties_and_min_tokens_equal_the_engines_on_both_sides(client, engine) -> None:
    def pd(prompt: list[int], max_tokens: int, **kwargs: Any) -> list[str]:
        rep = {"repetition_penalty": kwargs.pop("repetition_penalty", 1.0)}
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, **rep}, **kwargs,
        )  # fmt: skip
        return out.choices[0].logprobs.tokens

    def texts(completion: Any) -> list[str]:
        return [engine.tokenizer.token_text(t) for t in completion.token_ids]

    # Frequency and presence act once the output repeats (here from its 15th token).
    kwargs = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    want = in_process(engine, PROMPT, max_tokens=24, **kwargs)
    assert want.token_ids != in_process(engine, PROMPT, max_tokens=24).token_ids
    assert pd(PROMPT, 24, **kwargs) == texts(want)
    # The repetition penalty counts the prompt: it changes the first token, which the last
    # prefill stage samples, where the prompt repeats the model's favourite next token.
    prompt = PROMPT + in_process(engine, PROMPT, max_tokens=14).token_ids
    kwargs = {"presence_penalty": 0.8, "frequency_penalty": 1.2, "repetition_penalty": 1.3}
    want = in_process(engine, prompt, max_tokens=12, **kwargs)
    assert want.token_ids[0] != in_process(engine, prompt, max_tokens=1).token_ids[0]
    assert pd(prompt, 12, **kwargs) == texts(want)

    eos = engine.tokenizer.eos_token_ids[0]
    bias = {str(eos): 60}  # EOS first, unless min_tokens bans it
    ends = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logit_bias=bias)
    assert ends.usage.completion_tokens == 1 and ends.choices[0].finish_reason == "stop"
    held = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, logit_bias=bias, extra_body={"min_tokens": 3}
    )
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"


def test_echo_puts_the_prompt_before_the_completion(client) -> None:
    out = client.completions.create(model=MODEL, prompt="abc def", max_tokens=3, echo=True)
    assert out.choices[0].text.startswith("abc def")
    only = client.completions.create(model=MODEL, prompt="abc def", max_tokens=0, echo=True)
    assert only.choices[0].text == "abc def" and only.usage.completion_tokens == 0
    stream = client.completions.create(
        model=MODEL, prompt="abc def", max_tokens=3, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices).startswith("abc def")


def test_echo_with_logprobs_scores_the_prompt_on_the_prefill_side(client, engine) -> None:
    prompt = [(7 * i + 3) % 500 + 5 for i in range(150)]  # three prefill chunks of 64
    want = engine.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=2,
            prompt_logprobs=2,
        ),
    )[0]  # fmt: skip
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = [p for _, p, _ in want.prompt_logprobs] + want.logprobs
    assert lp.token_logprobs[1:] == pytest.approx(scored, abs=1e-4)
    assert lp.tokens[: len(prompt)] == [engine.tokenizer.token_text(t) for t in prompt]
    scored_top = lp.top_logprobs[1 : len(prompt)]
    for got, (_, _, alternatives) in zip(scored_top, want.prompt_logprobs, strict=True):
        expected = {engine.tokenizer.token_text(t): v for t, v in alternatives}
        assert got == pytest.approx(expected, abs=1e-4)
    assert out.choices[0].text.startswith(engine.tokenizer.decode(prompt))
    # max_tokens 0: what evaluation harnesses send, the prompt's logprobs alone
    only = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    assert only.usage.completion_tokens == 0 and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(scored[:-3], abs=1e-4)
    assert only.choices[0].logprobs.top_logprobs is None
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    values = [v for part in streamed for v in part.token_logprobs]
    assert values[0] is None and values[1:] == pytest.approx(scored, abs=1e-4)


def test_aborting_an_n_4_stream_frees_everything_on_both_sides(served) -> None:
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 300, "n": 4, "ignore_eos": True}
    _stream_then_disconnect(served, body, events=6)
    _stream_then_disconnect(served, body, events=1)
    assert_idle(app_of(served))


@pytest.mark.parametrize(
    ("route", "payload", "needle"),
    [
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"n": 33}, "n"),
        ("completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
        ("completions", {"logit_bias": {"5": 200}}, "logit_bias"),
        ("completions", {"presence_penalty": 3}, "presence_penalty"),
        ("completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function"}]}, "tools"),
        (
            "chat",
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("completions", {"guided_regex": "(unclosed"}, "guided_regex"),
        ("completions", {"guided_choice": []}, "guided_choice"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
            "json_schema",
        ),
        (
            "completions",
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "one structured-output constraint",
        ),
    ],
)
def test_fields_not_honoured_are_refused_by_name(served, route, payload, needle) -> None:
    _, before = stats(app_of(served))
    body = {"model": MODEL, **payload}
    if route == "chat":
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        path = "chat/completions"
    else:
        body.setdefault("prompt", "hi")
        path = "completions"
    response = httpx.post(
        f"{served}/v1/{path}",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error
    _, after = stats(app_of(served))
    assert after["requests_admitted"] == before["requests_admitted"]


def test_tool_choice_none_is_honoured_by_answering_without_tools(client) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="none",
    )  # fmt: skip
    assert out.choices[0].message.tool_calls is None and out.usage.completion_tokens >= 1


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON schema of nested objects, arrays, enums and bounded scalars: every answer that
    follows it ends well inside the token budget, whatever the (random) model prefers."""
    kinds = ["string", "integer", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 7, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": 3}
    return object_schema(rng, depth)


def object_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(["id", "name", "tags", "size", "ok", "kind", "where"], rng.randint(1, 3))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth + 1) for n in names},
        "required": names,
        "additionalProperties": False,
    }


def test_json_schema_answers_validate_for_twenty_random_schemas(served) -> None:
    rng = random.Random(0)
    schemas = [object_schema(rng) for _ in range(20)]

    async def ask(client: AsyncOpenAI, i: int, schema: dict[str, Any]) -> tuple[Any, str]:
        out = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"json {i}"}], max_tokens=300,
            temperature=1.0, seed=i,
            response_format={
                "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
            },
        )  # fmt: skip
        return out.choices[0].finish_reason, out.choices[0].message.content

    async def run_all() -> list[tuple[Any, str]]:
        client = AsyncOpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0)
        try:
            return await asyncio.gather(*(ask(client, i, s) for i, s in enumerate(schemas)))
        finally:
            await client.close()

    for schema, (finish, text) in zip(schemas, asyncio.run(run_all()), strict=True):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
    assert_idle(app_of(served))


def test_choice_regex_and_json_object_constrain_the_first_token_too(client) -> None:
    for seed in range(3):
        out = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
            extra_body={"guided_choice": ["alpha", "beta gamma"]},
        )  # fmt: skip
        assert out.choices[0].text in ("alpha", "beta gamma")
        assert out.choices[0].finish_reason == "stop"
        regex = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
            extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"},
        )  # fmt: skip
        assert re.fullmatch("[0-9]{3}-[a-c]{2}", regex.choices[0].text)
    obj = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40,
        temperature=0, response_format={"type": "json_object"},
    )  # fmt: skip
    assert obj.choices[0].message.content.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


def test_required_and_named_tool_calls_follow_the_tools_parameters(client) -> None:
    ask = [{"role": "user", "content": "weather in Paris?"}]
    # One call each: with parallel calls allowed, a random model may add calls until
    # max_tokens (a trained one closes the array when it is done).
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL, messages=ask, tools=[WEATHER, CLOCK], tool_choice="required",
            parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed,
        )  # fmt: skip
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    named = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER, CLOCK], max_tokens=100, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_time"])
    assert len(out.choices[0].message.tool_calls) == 1
    stream = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=200,
        temperature=0, stream=True, parallel_tool_calls=False,
    )  # fmt: skip
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [t for d in deltas if d.delta.tool_calls for t in d.delta.tool_calls]
    # The call's header first, once; then its arguments as the model writes them.
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(t.id is None and t.function.name is None for t in calls[1:])
    assert len(calls) > 3 and deltas[-1].finish_reason == "tool_calls"
    arguments = "".join(t.function.arguments or "" for t in calls)
    jsonschema.validate(json.loads(arguments), PARAMETERS["get_weather"])
    whole = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=200,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    [call] = whole.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == json.loads(arguments)  # greedy: the same


def test_auto_tools_render_and_a_tool_result_continues_the_chat(client) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
        tool_choice="auto", max_tokens=5, temperature=0,
    )  # fmt: skip
    choice = out.choices[0]
    # The random model writes no call: its text comes back as content.
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    again = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=4, temperature=0
    )
    assert again.usage.prompt_tokens > out.usage.prompt_tokens
