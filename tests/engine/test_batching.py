"""Batched, paged, chunked prefill and interleaved batched decode give the same tokens as one
request at a time, and every test ends with no KV page in use."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams, SeqChunk, load_stage
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.runner import StageRunner
from tests.engine.helpers import full_logits


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 600) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def one_at_a_time(model_dir, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    llm = LLM(EngineConfig(model=str(model_dir), num_pages=64, max_num_seqs=1))
    return [llm.generate([p], params)[0].token_ids for p in batch]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=0.8, top_k=50, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True
)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_equals_one_at_a_time(model_dir, params):
    batch = prompts(12)
    expected = one_at_a_time(model_dir, batch, params)
    llm = LLM(EngineConfig(model=str(model_dir), num_pages=256, max_num_seqs=16))
    got = [c.token_ids for c in llm.generate(batch, params)]
    assert got == expected
    assert llm.allocator.num_in_use == 0


def test_chunked_prefill_with_small_token_budget_equals_one_at_a_time(llama_dir):
    batch = prompts(6, seed=1)
    expected = one_at_a_time(llama_dir, batch, GREEDY)
    # 7-token budget: every prompt is split into chunks that append to pages it already holds,
    # and chunks of different requests share a step.
    llm = LLM(
        EngineConfig(model=str(llama_dir), num_pages=128, max_num_batched_tokens=7, page_size=4)
    )
    assert [c.token_ids for c in llm.generate(batch, GREEDY)] == expected
    assert llm.allocator.num_in_use == 0


def test_requests_joining_a_running_batch_decode_the_same(llama_dir):
    batch = prompts(8, seed=2)
    expected = one_at_a_time(llama_dir, batch, GREEDY)
    llm = LLM(EngineConfig(model=str(llama_dir), num_pages=256, max_num_batched_tokens=64))
    tokens: dict[str, list[int]] = {}
    order = []
    pending = list(batch)
    steps = 0
    while pending or llm.has_unfinished():
        if pending and steps % 3 == 0:  # a new request arrives every third step
            order.append(llm.add_request(pending.pop(0), GREEDY))
        for out in llm.step():
            tokens.setdefault(out.rid, []).extend(out.token_ids)
        steps += 1
    assert [tokens[r] for r in order] == expected
    assert llm.allocator.num_in_use == 0


def test_preemption_under_page_pressure_recomputes_to_the_same_tokens(llama_dir):
    batch = prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = one_at_a_time(llama_dir, batch, params)
    # 24 pages of 8 tokens cannot hold all six requests at full length at once.
    llm = LLM(EngineConfig(model=str(llama_dir), num_pages=24, page_size=8))
    assert [c.token_ids for c in llm.generate(batch, params)] == expected
    assert llm.allocator.num_in_use == 0


def test_decode_step_logits_equal_full_recompute(llama_dir):
    """One batched paged decode step against recomputing each sequence from scratch."""
    stage = load_stage(llama_dir)
    cfg = stage.config
    spec = KVCacheSpec(160, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    runner = StageRunner(stage, PagedKVCache(spec, 0, cfg.num_hidden_layers))
    seqs = prompts(5, seed=4)
    page_lists, next_page = [], 0
    for s in seqs:
        n = -(-(len(s) + 1) // 4)
        page_lists.append(list(range(next_page, next_page + n))[::-1])
        next_page += n
    runner.forward(
        [SeqChunk(0, len(s) - 1, p) for s, p in zip(seqs, page_lists, strict=True)],
        torch.tensor([t for s in seqs for t in s[:-1]]),
    )
    logits = runner.forward(
        [SeqChunk(len(s) - 1, 1, p) for s, p in zip(seqs, page_lists, strict=True)],
        torch.tensor([s[-1] for s in seqs]),
    )
    for i, s in enumerate(seqs):
        ref = full_logits([stage], torch.tensor(s))[-1]
        # Not bitwise: decode attends with baddbmm/softmax/bmm, the recompute with SDPA's
        # blocked kernel (the linears round a row the same at any batch size, see test_linear).
        # Their float32 difference compounds over the 4 layers: measured up to 4.8e-5 (MKL
        # linears) and 3.2e-5 (oneDNN) max abs over 40 sequences at logit scale ~5, hence 1e-4.
        torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-4)
        assert logits[i].argmax() == ref.argmax()


def test_abort_frees_pages_at_every_phase(llama_dir):
    llm = LLM(EngineConfig(model=str(llama_dir), num_pages=64, max_num_batched_tokens=8))
    queued = llm.add_request(prompts(1)[0], GREEDY)
    assert llm.abort(queued)
    partial = llm.add_request(list(range(5, 40)), GREEDY)
    llm.step()  # part-way through a chunked prefill
    assert llm.allocator.num_in_use > 0
    assert llm.abort(partial)
    running = llm.add_request([5, 6, 7], GREEDY)
    llm.step()
    llm.step()
    assert llm.abort(running)
    assert not llm.abort(running)  # idempotent
    assert llm.allocator.num_in_use == 0 and not llm.has_unfinished()
