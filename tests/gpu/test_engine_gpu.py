"""The engine on CUDA computes what the CPU float32 path computes.

Skipped without CUDA (CI has none). Covers the CUDA-only code: the Triton kernels (paged decode
attention, rotary + KV write, residual RMSNorm, SwiGLU), SDPA and variable-length flash
prefill, chunked prefill over a cached prefix, and decode replayed from CUDA graphs with padded
batches. In float32 the CUDA path must agree closely (tf32 in the attention dots); in bfloat16
it must be about as close as bfloat16 arithmetic allows, which with the test models' sharp
attention is far from exact: the CPU path itself run in bfloat16 lands ~0.1-0.2 away. A wrong
page, position or mask lands near 1.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from engine import LLM, EngineConfig, SamplingParams, SeqChunk, load_stage  # noqa: E402
from engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from engine.runner import StageRunner  # noqa: E402

PAGE = 16
FLOAT32_TOLERANCE = 1e-2  # relative (Frobenius) error of logits against the CPU float32 path


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm())


def reference_attention(q, keys, values):
    """float64 grouped-query attention of one query row: q [H, D], keys/values [S, Hkv, D]."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.double()[:, None, :] @ k.transpose(1, 2)).squeeze(1) * q.shape[-1] ** -0.5
    return (torch.softmax(scores, dim=-1)[:, None, :] @ v).squeeze(1)


@pytest.mark.parametrize("splits", [None, 1, 7])
def test_paged_decode_kernel_matches_float64_at_serving_shape(splits):
    from engine import kernels

    heads, kv_heads, dim, num_pages = 12, 2, 128, 1024
    gen = torch.Generator("cuda").manual_seed(0)
    k_cache = torch.randn(num_pages * PAGE, kv_heads, dim, device="cuda", generator=gen)
    v_cache = torch.randn(num_pages * PAGE, kv_heads, dim, device="cuda", generator=gen)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    lens = [1, 15, 16, 17, 1000, 3001]
    order = random.Random(0).sample(range(num_pages), num_pages)  # scattered pages
    tables, used = [], 0
    for n in lens:
        pages = -(-n // PAGE)
        tables.append(order[used : used + pages])
        used += pages
    table = torch.zeros(len(lens), max(map(len, tables)) + 5, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    q = torch.randn(len(lens), heads, dim, device="cuda", generator=gen).bfloat16()
    out = kernels.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        table.cuda(),
        torch.tensor(lens, dtype=torch.int32, device="cuda"),
        PAGE,
        num_splits=splits,
    )
    for i, (n, pages) in enumerate(zip(lens, tables, strict=True)):
        slots = torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in range(n)], device="cuda")
        ref = reference_attention(q[i], k_cache[slots], v_cache[slots])
        assert rel_err(out[i], ref) < 1e-2, (n, rel_err(out[i], ref))


def runner_for(model_dir, device: str, dtype: torch.dtype, graphs: bool = True) -> StageRunner:
    stage = load_stage(model_dir, dtype=dtype, device=device)
    cfg = stage.config
    spec = KVCacheSpec(256, PAGE, cfg.num_key_value_heads, cfg.head_dim, dtype)
    cache = PagedKVCache(spec, 0, cfg.num_hidden_layers, device=device)
    return StageRunner(stage, cache, max_decode_batch=16, cuda_graphs=graphs)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 600) for _ in range(rng.randrange(20, 150))] for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_prefill_chunked_prefill_and_graph_decode_match_cpu(model_dir, dtype):
    reference = runner_for(model_dir, "cpu", torch.float32)
    runners = [
        runner_for(model_dir, "cuda", dtype),
        runner_for(model_dir, "cuda", dtype, graphs=False),
    ]
    if dtype != torch.float32:  # what bf16 itself costs: the CPU path in bf16
        runners.append(runner_for(model_dir, "cpu", dtype))
    seqs = prompts(5, seed=0)
    pages = random.Random(1).sample(range(256), 5 * 12)
    tables = [pages[i * 12 : (i + 1) * 12] for i in range(5)]  # 192 tokens of room each
    errors = []

    def step(chunks, ids):
        ids = torch.tensor(ids)
        ref = reference.forward(chunks, ids).double()
        outs = [r.forward(chunks, ids).double().cpu() for r in runners]
        errors.append([rel_err(o, ref) for o in outs])
        return ref

    # Prefill in two chunks per prompt: the first several fresh prompts in one step (varlen
    # flash in bf16), the second continuing each over its cached prefix.
    cut = [len(s) // 3 for s in seqs]
    first = [SeqChunk(0, c, t, wants_logits=False) for c, t in zip(cut, tables, strict=True)]
    step(first, [x for s, c in zip(seqs, cut, strict=True) for x in s[:c]])
    errors.clear()  # no logits yet
    rest = [SeqChunk(c, len(s) - c, t) for s, c, t in zip(seqs, cut, tables, strict=True)]
    tokens = step(rest, [x for s, c in zip(seqs, cut, strict=True) for x in s[c:]]).argmax(-1)
    tokens = tokens.tolist()

    # Decode: batches of 5 (a graph of 8 rows), then 3 (a graph of 4) as requests finish.
    for i in range(12):
        live = range(5) if i < 6 else range(3)
        ref = step([SeqChunk(len(seqs[j]), 1, tables[j]) for j in live], [tokens[j] for j in live])
        for row, j in enumerate(live):
            seqs[j].append(tokens[j])
            tokens[j] = int(ref[row].argmax())
    print(f"{dtype} rel errors per step (graphs, eager[, cpu]):", errors)
    graph_err = max(e[0] for e in errors)
    eager_err = max(e[1] for e in errors)
    if dtype == torch.float32:
        assert graph_err < FLOAT32_TOLERANCE and eager_err < FLOAT32_TOLERANCE
    else:
        bf16_err = max(e[2] for e in errors)
        assert graph_err < max(2 * bf16_err, 0.05) and eager_err < max(2 * bf16_err, 0.05)


@pytest.mark.parametrize("length", [100, 128, 300])
def test_single_prompt_prefill_graph_matches_cpu(model_dir, length):
    """One fresh prompt replays a prefill graph that attends with SDPA over its whole token
    bucket (100 and 300 tokens: padding rows after the prompt; 128: none), then decodes."""
    reference = runner_for(model_dir, "cpu", torch.float32)
    graphs = runner_for(model_dir, "cuda", torch.bfloat16)
    own_bf16 = runner_for(model_dir, "cpu", torch.bfloat16)
    prompt = prompts(1, seed=length)[0] * 3
    prompt = (prompt * (length // len(prompt) + 1))[:length]
    table = random.Random(length).sample(range(256), -(-(length + 4) // PAGE))
    errors, bf16_errors = [], []
    chunks, ids = [SeqChunk(0, length, table)], torch.tensor(prompt)
    for step in range(4):
        ref = reference.forward(chunks, ids).double()
        errors.append(rel_err(graphs.forward(chunks, ids), ref))
        bf16_errors.append(rel_err(own_bf16.forward(chunks, ids), ref))
        token = int(ref[-1].argmax())
        chunks, ids = [SeqChunk(length + step, 1, table)], torch.tensor([token])
    assert graphs.cuda_graphs is not None
    assert any(key[0] == "prefill" and key[2] == 1 for key in graphs.cuda_graphs._graphs)
    print(f"single prompt of {length}: graphs {errors}, cpu bf16 {bf16_errors}")
    assert max(errors) < max(2 * max(bf16_errors), 0.05)


def test_llm_on_cuda_generates_and_returns_every_page(model_dir):
    llm = LLM(EngineConfig(model=str(model_dir), device="cuda", num_pages=128, max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batch = prompts(11, seed=2)  # more requests than max_num_seqs: joins and leaves mid-run
    first = [c.token_ids for c in llm.generate(batch, params)]
    again = [c.token_ids for c in llm.generate(batch, params)]
    assert all(len(t) == 24 for t in first)
    assert first == again
    assert llm.allocator.num_in_use == 0
    assert llm.runner.cuda_graphs is not None and llm.runner.cuda_graphs._graphs


def test_async_scheduling_on_cuda_gives_the_synchronous_tokens(model_dir):
    """Greedy and seeded requests of different lengths through 8 slots (joins and leaves), in
    bf16: async scheduling is on by default on CUDA and emits what the synchronous loop does,
    logprobs included. Stops by length cost no extra rows, so every step of either loop lands
    on the same graph bucket and the same kernels: the outputs are bitwise equal."""
    from tests.engine.test_async_scheduling import run

    batch = prompts(11, seed=3)
    params = [
        SamplingParams(
            temperature=0 if i % 2 else 0.9,
            top_k=0 if i % 2 else 40,
            top_p=1.0 if i % 2 else 0.92,
            seed=i,
            max_tokens=8 + 3 * i,
            ignore_eos=True,
            logprobs=True,
        )
        for i in range(11)
    ]
    results = []
    for flag in (False, None):
        llm = LLM(
            EngineConfig(
                model=str(model_dir),
                device="cuda",
                num_pages=128,
                max_num_seqs=8,
                async_scheduling=flag,
            )
        )
        assert llm.async_scheduling is (flag is None)
        results.append(run(llm, batch, params))
    assert results[1] == results[0]
    assert [len(s.token_ids) for s in results[0]] == [p.max_tokens for p in params]


def test_async_scheduling_on_cuda_stops_aborts_and_joins_prefilled_requests(model_dir):
    """float32 (kernels of neighbouring batch buckets then round alike): stop tokens that end
    requests part-way (one wasted row each, never emitted), requests joining with their KV in
    pages (the decode side of PD), and an abort while a step is in flight; every page back."""
    from tests.engine.test_async_scheduling import decode_side, run

    def engine(flag: bool) -> LLM:
        config = EngineConfig(
            model=str(model_dir), device="cuda", dtype="float32", num_pages=128, max_num_seqs=8
        )
        return LLM(config.model_copy(update={"async_scheduling": flag}))

    batch = prompts(6, seed=4)
    free = run(engine(False), batch, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stops = [
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(s.token_ids[4 + i],))
        for i, s in enumerate(free)
    ]
    assert run(engine(True), batch, stops) == run(engine(False), batch, stops)

    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    assert decode_side(engine(True), batch, seeded) == decode_side(engine(False), batch, seeded)

    llm = engine(True)
    rids = [llm.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in batch]
    for _ in range(5):
        llm.step()
    assert llm._in_flight is not None
    assert llm.abort(rids[2])
    while llm.has_unfinished():
        assert all(o.rid != rids[2] for o in llm.step())
    assert llm.allocator.num_in_use == 0
