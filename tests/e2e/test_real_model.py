"""The real default model (SmolLM2-135M-Instruct from its GGUF) through PD with PP=2."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from engine import LLM, EngineConfig, SamplingParams
from tests.e2e.conftest import API_KEY, app_config

QUESTION = "What is the capital of France?"


def engine_chat(model: Path, question: str, max_tokens: int) -> str:
    llm = LLM(EngineConfig(model=str(model), dtype="float32", device="cpu", num_pages=256))
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
    return out.text


def test_pd_pp2_answers_paris_like_the_single_process_engine(deploy, smollm_gguf) -> None:
    base = deploy(app_config(smollm_gguf, pp=2, decode_num_gpus=0))
    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model="pdserve-test",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    answer = reply.choices[0].message.content
    assert "Paris" in answer, answer
    assert answer == engine_chat(smollm_gguf, QUESTION, 24)
