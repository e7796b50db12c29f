"""`pdserve serve --mode colocated|pd`: the same API in front of either, so users can compare.

Both modes are deployed side by side on the test cluster; greedy decoding must give the same
text through the openai client, streamed or not.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from deployments.app import build_service
from tests.e2e.conftest import API_KEY, app_config

PROMPTS = ["The quick brown fox", "pdserve serves", "1 2 3 4"]


@pytest.fixture(scope="module")
def urls(serve_port, llama_dir) -> Iterator[dict[str, str]]:
    """Both modes under names of their own (the metrics directory remembers an app's processes
    for a while after it is deleted: a later module must not reuse the name)."""
    from ray import serve

    config = app_config(llama_dir, pp=2)
    names = {mode: f"modes-{mode}" for mode in ("pd", "colocated")}
    try:
        for mode, name in names.items():
            serve.run(build_service(config, mode), name=name, route_prefix=f"/{name}")
        yield {mode: f"http://127.0.0.1:{serve_port}/{name}" for mode, name in names.items()}
    finally:
        for name in names.values():
            serve.delete(name)


def complete(url: str, prompt: str, stream: bool) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    kwargs = dict(model="pdserve-test", prompt=prompt, max_tokens=12, temperature=0)
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))


def test_colocated_and_pd_answer_the_same_greedy_text(urls: dict[str, str]) -> None:
    for prompt in PROMPTS:
        pd = complete(urls["pd"], prompt, stream=False)
        assert pd, prompt
        assert complete(urls["colocated"], prompt, stream=False) == pd, prompt
        assert complete(urls["colocated"], prompt, stream=True) == pd, prompt


def test_colocated_mode_serves_chat_and_lists_the_model(urls: dict[str, str]) -> None:
    client = OpenAI(base_url=f"{urls['colocated']}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["pdserve-test"]
    answer = client.chat.completions.create(
        model="pdserve-test", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode is one of"):
        build_service(None, "both")  # type: ignore[arg-type]


def test_n_seeded_choices_are_the_same_in_pd_and_colocated(urls: dict[str, str]) -> None:
    """PD samples a prompt's n first tokens on the last prefill stage and the rest on decode,
    on the prompt's shared pages; colocated runs n sequences in one engine. Each choice
    has its own seed (seed + i) on both, so the choices agree choice by choice; greedy
    choices are all the same text."""
    answers: dict[tuple[str, float], list[str]] = {}
    for mode, url in urls.items():
        client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        for temperature in (0.0, 1.0):
            out = client.completions.create(
                model="pdserve-test", prompt=PROMPTS[0], max_tokens=6, n=3,
                temperature=temperature, seed=7, extra_body={"ignore_eos": True},
            )  # fmt: skip
            texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
            answers[mode, temperature] = texts
    assert answers["pd", 0.0] == answers["colocated", 0.0]
    assert len(set(answers["pd", 0.0])) == 1
    # Sampled: the first token on the last prefill stage, the rest on decode, each from the
    # choice's seed, make the same stream as one engine drawing them all.
    assert answers["pd", 1.0] == answers["colocated", 1.0]
    assert len(set(answers["pd", 1.0])) == 3
