"""Sampling per request: greedy, temperature, top-k, top-p, seeds, stops and logprobs."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.sampling import sample
from tests.engine.helpers import full_logits


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(EngineConfig(model=str(llama_dir), num_pages=128))


PROMPT = [0, 401, 399, 300, 513]


def run(llm, params, prompt=PROMPT):
    [c] = llm.generate([prompt], params)
    return c


def test_same_seed_same_tokens_whatever_shares_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    alone = run(llm, p).token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    batch = llm.generate([PROMPT, [5, 6, 7], PROMPT, [9]], [p, *others])
    assert batch[0].token_ids == alone
    assert (
        run(llm, SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True)).token_ids
        != alone
    )


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).token_ids
    assert (
        run(llm, SamplingParams(top_k=1, max_tokens=12, ignore_eos=True, seed=1)).token_ids
        == greedy
    )
    assert (
        run(llm, SamplingParams(top_p=1e-6, max_tokens=12, ignore_eos=True, seed=2)).token_ids
        == greedy
    )


def test_top_k_restricts_to_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    seen = set()
    for seed in range(200):
        p = SamplingParams(temperature=2.0, top_k=2, seed=seed)
        tokens, _ = sample(logits, [p], [p.make_generator()])
        seen.add(tokens[0])
    assert seen == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(300):
        p = SamplingParams(temperature=1.0, top_p=0.7, seed=seed)
        tokens, _ = sample(logits, [p], [p.make_generator()])
        seen.add(tokens[0])
    assert seen == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0, seed=0)
    gen = p.make_generator()
    counts = torch.zeros(3)
    for _ in range(3000):
        tokens, _ = sample(torch.log(probs)[None], [p], [gen])
        counts[tokens[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_logprobs_are_those_of_the_chosen_tokens(llm, llama_dir):
    c = run(llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True))
    seq = torch.tensor(PROMPT + c.token_ids)
    ref = torch.log_softmax(full_logits([llm.runner.stage], seq), dim=-1)
    expected = [ref[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(expected, abs=1e-4)


def test_max_tokens_finishes_with_length(llm):
    c = run(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(c.token_ids) == 5 and c.finish_reason == "length"


def test_stop_token_ids_finish_with_stop_and_keep_their_text_out(llm):
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stop_at = greedy.token_ids[3]
    c = run(llm, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,)))
    first = greedy.token_ids.index(stop_at)
    assert c.token_ids == greedy.token_ids[: first + 1]
    assert c.finish_reason == "stop"
    assert c.text == llm.tokenizer.decode(greedy.token_ids[:first])


def test_eos_finishes_unless_ignored(llm):
    eos = llm.tokenizer.eos_token_ids[0]
    # Bias the model toward EOS by making it the only allowed stop, then check the engine
    # treats a model's EOS as a stop: we feed EOS as a stop id set by the tokenizer.
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert eos not in greedy.token_ids or greedy.finish_reason == "length"
    llm.tokenizer.eos_token_ids = (greedy.token_ids[2],)
    try:
        c = run(llm, SamplingParams(temperature=0, max_tokens=30))
        assert c.finish_reason == "stop" and c.token_ids[-1] == greedy.token_ids[2]
        c = run(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        assert c.finish_reason == "length"
    finally:
        llm.tokenizer.eos_token_ids = (eos,)


def test_stop_strings_cut_the_text_before_the_stop(llm):
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = greedy.text
    stop = text[5:8]
    c = run(llm, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=(stop,)))
    assert c.finish_reason == "stop"
    assert c.text == text[: text.index(stop)]
    assert len(c.token_ids) < 20
    assert llm.allocator.num_in_use == 0


def test_without_detokenizing_the_same_tokens_come_without_text(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_text = run(llm, params)
    ids_only = run(
        llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    )
    assert with_text.text and ids_only.text == ""
    assert ids_only.token_ids == with_text.token_ids
    assert ids_only.finish_reason == "length"
    assert llm.allocator.num_in_use == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_tokens": 0},
        {"stop": ("",)},
        {"stop": ("x",), "detokenize": False},
    ],
)
def test_bad_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_prompts_the_engine_cannot_run_are_rejected_before_scheduling(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="context limit"):
        llm.add_request([5] * llm.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([llm.model_config.vocab_size], SamplingParams())
    assert not llm.has_unfinished()
