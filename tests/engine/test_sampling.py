"""Sampling per request: greedy, temperature, top-k, top-p, seeds, stops and logprobs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.sampling import TokenHistory, adjust_logits, sample
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
        tokens, _, _ = sample(logits, [p], [p.make_generator()])
        seen.add(tokens[0])
    assert seen == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(300):
        p = SamplingParams(temperature=1.0, top_p=0.7, seed=seed)
        tokens, _, _ = sample(logits, [p], [p.make_generator()])
        seen.add(tokens[0])
    assert seen == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0, seed=0)
    gen = p.make_generator()
    counts = torch.zeros(3)
    for _ in range(3000):
        tokens, _, _ = sample(torch.log(probs)[None], [p], [gen])
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
        {"top_logprobs": 21},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"logit_bias": ((5, 101.0),)},
        {"min_tokens": 17, "max_tokens": 16},
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


# -- logit adjustments and top logprobs (OpenAI's penalties, logit_bias; vLLM's extensions) -----


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_it(llm):
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).token_ids
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias=((77, 100),))
    assert run(llm, forced).token_ids == [77] * 6
    banned = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logit_bias=((greedy[0], -100),)
    )
    assert run(llm, banned).token_ids[0] != greedy[0]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias=((77, 100),))
    assert run(llm, sampled).token_ids == [77] * 6


def test_penalties_follow_openai_and_vllm_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    history = TokenHistory(prompt_token_ids=[4], output_token_ids=[3, 3, 2])
    p = SamplingParams(
        temperature=0, frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0
    )
    row = logits[0].clone()
    adjust_logits(row, p, history)
    # repetition first (prompt and output: 4, 3, 2), then frequency x count and presence.
    want = torch.tensor([2.0, -1.0, 0.25 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, 0.5])
    torch.testing.assert_close(row, want)
    assert sample(logits, [p], [None], [history]).tokens == [0]


def test_min_tokens_bans_eos_and_stop_ids_until_reached(llm):
    eos = sorted(llm.tokenizer.eos_token_ids)[0]
    ends_at_once = SamplingParams(temperature=0, max_tokens=8, logit_bias=((eos, 50),))
    assert run(llm, ends_at_once).token_ids == [eos]
    at_least = SamplingParams(temperature=0, max_tokens=8, logit_bias=((eos, 50),), min_tokens=3)
    out = run(llm, at_least)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:3]


def test_penalised_requests_decode_the_same_with_and_without_async_scheduling(llama_dir):
    p = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5
    )
    outs = []
    for overlap in (False, True):
        engine = LLM(EngineConfig(model=str(llama_dir), num_pages=64, async_scheduling=overlap))
        outs.append(engine.generate([PROMPT, [5, 6, 7]], p))
    assert [c.token_ids for c in outs[0]] == [c.token_ids for c in outs[1]]
    unpenalised = replace(p, frequency_penalty=0, presence_penalty=0)
    plain = run(LLM(EngineConfig(model=str(llama_dir), num_pages=64)), unpenalised)
    assert outs[0][0].token_ids != plain.token_ids  # the penalties changed something
    # a penalised output repeats no token more often than the unpenalised one does
    assert max(map(outs[0][0].token_ids.count, set(outs[0][0].token_ids))) <= max(
        map(plain.token_ids.count, set(plain.token_ids))
    )


def test_top_logprobs_are_the_raw_distributions_most_likely_tokens(llm):
    p = SamplingParams(temperature=0.8, seed=5, max_tokens=5, logprobs=True, top_logprobs=4)
    c = run(llm, p)
    assert len(c.top_logprobs) == 5 and all(len(t) == 4 for t in c.top_logprobs)
    ids = PROMPT + c.token_ids
    logits = full_logits([llm.runner.stage], torch.tensor(ids)).double()
    want = torch.log_softmax(logits, -1)[len(PROMPT) - 1 : -1]
    for step, top in enumerate(c.top_logprobs):
        values, order = want[step].topk(4)
        assert [t for t, _ in top] == order.tolist()
        torch.testing.assert_close(
            torch.tensor([v for _, v in top], dtype=torch.double), values, atol=1e-3, rtol=0
        )
    assert all(t[0][1] >= lp - 1e-6 for t, lp in zip(c.top_logprobs, c.logprobs, strict=True))


@pytest.mark.parametrize("budget", [512, 7])  # one prefill step, and a chunk every 7 tokens
def test_prompt_logprobs_score_each_prompt_token_by_the_row_before_it(llama_dir, budget):
    llm = LLM(EngineConfig(model=str(llama_dir), num_pages=64, max_num_batched_tokens=budget))
    prompt = PROMPT * 4
    p = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, logprobs=True)
    [c] = llm.generate([prompt], p)
    ref = torch.log_softmax(full_logits([llm.runner.stage], torch.tensor(prompt)).double(), -1)
    assert [t for t, _, _ in c.prompt_logprobs] == prompt[1:]
    for i, (token, logprob, top) in enumerate(c.prompt_logprobs):
        assert logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        order = ref[i].topk(3).indices
        assert [t for t, _ in top] == order.tolist()
    assert c.logprobs[0] == pytest.approx(ref[-1, c.token_ids[0]].item(), abs=1e-4)
