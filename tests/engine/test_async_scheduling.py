"""Async scheduling gives what the synchronous loop gives, token for token, and frees every page.

The overlap logic is device-agnostic, so these tests force it on for the CPU (where it is off by
default) and compare it with the synchronous loop on the same requests: greedy and seeded
sampling with logprobs, every finish condition, requests arriving mid-run, preemption, aborts
while a step is in flight, and requests joining with their KV already in pages (`add_prefilled`,
the decode side of PD). Every run must also emit nothing after a request's final output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams, SeqChunk
from engine.sampling import sample


@dataclass
class Stream:
    """What a caller sees of one request: every output, in order."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    outputs: int = 0

    def take(self, out) -> None:
        assert self.finish_reason is None, "output after the request finished"
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.text += out.text
        self.outputs += 1
        if out.finished:
            self.finish_reason = out.finish_reason


def engine(model_dir, async_scheduling: bool, **overrides) -> LLM:
    config = {"num_pages": 256, "max_num_seqs": 16} | overrides
    return LLM(EngineConfig(model=str(model_dir), async_scheduling=async_scheduling, **config))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 600) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def run(llm: LLM, batch, params, arrive_every: int = 0) -> list[Stream]:
    """Steps until done; with `arrive_every`, one request joins every that many steps."""
    params = params if isinstance(params, list) else [params] * len(batch)
    pending = list(zip(batch, params, strict=True))
    streams: dict[str, Stream] = {}
    order = []
    steps = 0
    while pending or llm.has_unfinished():
        while pending and (not arrive_every or steps % arrive_every == 0):
            prompt, p = pending.pop(0)
            order.append(llm.add_request(prompt, p))
            streams[order[-1]] = Stream()
            if arrive_every:
                break
        for out in llm.step():
            streams[out.rid].take(out)
        steps += 1
    assert llm.allocator.num_in_use == 0 and llm.scheduler.num_held_pages == 0
    assert all(s.finish_reason is not None for s in streams.values())
    return [streams[rid] for rid in order]


def both(model_dir, batch, params, arrive_every: int = 0, **overrides):
    sync = run(engine(model_dir, False, **overrides), batch, params, arrive_every)
    overlapped = run(engine(model_dir, True, **overrides), batch, params, arrive_every)
    return sync, overlapped


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(
    temperature=0.8, top_k=50, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True, logprobs=True
)


def test_async_scheduling_is_off_on_the_cpu_unless_asked(llama_dir):
    assert not LLM(EngineConfig(model=str(llama_dir), num_pages=8)).async_scheduling
    assert engine(llama_dir, True).async_scheduling


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_same_tokens_logprobs_and_text_as_the_synchronous_loop(model_dir, params):
    sync, overlapped = both(model_dir, prompts(8), params)
    assert overlapped == sync
    assert all(len(s.token_ids) == 12 for s in sync)


def test_mixed_sampling_and_lengths_in_one_batch(llama_dir):
    batch = prompts(9, seed=1)
    params = [
        SamplingParams(temperature=0, max_tokens=1 + 3 * i, ignore_eos=True)
        if i % 3 == 0
        else SamplingParams(
            temperature=1.1,
            top_k=20 * i,
            top_p=0.5 + 0.05 * i,
            seed=i,
            max_tokens=2 + 2 * i,
            ignore_eos=True,
            logprobs=i % 2 == 0,
        )
        for i in range(9)
    ]
    sync, overlapped = both(llama_dir, batch, params)
    assert overlapped == sync
    assert [len(s.token_ids) for s in sync] == [p.max_tokens for p in params]


def test_stop_tokens_and_stop_strings_stop_at_the_same_token(llama_dir):
    batch = prompts(8, seed=2)
    free = run(
        engine(llama_dir, False),
        batch,
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    )
    params = []
    for i, s in enumerate(free):
        if i % 2:  # a stop id sampled part-way through
            params.append(
                SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(s.token_ids[3 + i],))
            )
        else:  # a stop string that the text completes part-way through
            params.append(
                SamplingParams(
                    temperature=0, max_tokens=24, ignore_eos=True, stop=(s.text[4 + i : 7 + i],)
                )
            )
    sync, overlapped = both(llama_dir, batch, params)
    assert overlapped == sync
    assert all(s.finish_reason == "stop" for s in sync)
    # The row run after a request stopped (async) never reaches its output.
    assert all(len(s.token_ids) < 24 for s in overlapped)


def test_eos_stops_and_the_context_limit_stops(llama_dir):
    llm_free = engine(llama_dir, False)
    batch = prompts(6, seed=3)
    free = run(llm_free, batch, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    eos = free[0].token_ids[5]
    limit = max(len(p) for p in batch) + 8  # every request reaches it before 30 tokens
    results = []
    for flag in (False, True):
        llm = engine(llama_dir, flag, max_model_len=limit)
        llm.tokenizer.eos_token_ids = (eos,)
        results.append(run(llm, batch, SamplingParams(temperature=0, max_tokens=30)))
    sync, overlapped = results
    assert overlapped == sync
    assert sync[0].finish_reason == "stop" and sync[0].token_ids[-1] == eos
    assert {s.finish_reason for s in sync[1:]} <= {"stop", "length"}
    for prompt, s in zip(batch, sync, strict=True):
        assert len(prompt) + len(s.token_ids) <= limit


def test_requests_arriving_mid_run_decode_the_same(llama_dir):
    sync, overlapped = both(llama_dir, prompts(8, seed=4), SEEDED, arrive_every=3)
    assert overlapped == sync


def test_chunked_prefill_and_preemption_under_page_pressure(llama_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batch = prompts(5, seed=5)
    results, preempted = [], []
    for flag in (False, True):
        # 16 pages of 8 tokens cannot hold all five at full length; 16-token prefill chunks.
        llm = engine(llama_dir, flag, num_pages=16, page_size=8, max_num_batched_tokens=16)
        preempt = llm.scheduler._preempt
        llm.scheduler._preempt = lambda seq, p=preempt, f=flag: (preempted.append(f), p(seq))
        results.append(run(llm, batch, params))
    assert results[1] == results[0]
    assert False in preempted and True in preempted


def test_abort_while_a_step_is_in_flight_frees_every_page_at_once(llama_dir):
    llm = engine(llama_dir, True)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    rids = [llm.add_request(p, params) for p in prompts(4, seed=6)]
    seen: dict[str, int] = {}
    for _ in range(6):  # prefill, then decode steps: one always in flight
        for out in llm.step():
            seen[out.rid] = seen.get(out.rid, 0) + 1
    assert llm._in_flight is not None
    held = llm.allocator.num_in_use
    assert llm.abort(rids[1])
    assert llm.allocator.num_in_use < held  # freed now, not when the step is read back
    assert llm.scheduler.num_held_pages == 0
    while llm.has_unfinished():
        for out in llm.step():
            assert out.rid != rids[1]
            seen[out.rid] = seen.get(out.rid, 0) + 1
    assert seen[rids[0]] == 30 and seen[rids[1]] < 30
    for rid in rids:
        assert not llm.abort(rid)
    assert llm.allocator.num_in_use == 0 and not llm.has_unfinished()


def test_abort_of_every_request_leaves_nothing_in_flight(llama_dir):
    llm = engine(llama_dir, True, max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    chunked = llm.add_request(list(range(5, 40)), params)
    llm.step()  # a prefill chunk in flight
    assert llm.has_unfinished()
    assert llm.abort(chunked)
    assert llm.allocator.num_in_use == 0 and not llm.has_unfinished()
    running = llm.add_request([5, 6, 7], params)
    llm.step()
    llm.step()
    assert llm.abort(running)
    assert llm.allocator.num_in_use == 0 and not llm.has_unfinished()


def prefill_elsewhere(llm: LLM, prompt: list[int]) -> tuple[list[int], int, float]:
    """What a prefill replica does for the decode side: the prompt's KV into pages taken from
    the decode engine's allocator, and the first token (greedy) with its logprob."""
    pages = llm.allocator.allocate(-(-(len(prompt) + 1) // llm.config.page_size))
    logits = llm.runner.forward([SeqChunk(0, len(prompt), pages)], torch.tensor(prompt))
    params = SamplingParams(temperature=0, logprobs=True)
    [token], [logprob], _ = sample(logits.clone(), [params], [None])
    return pages, token, logprob


def decode_side(llm: LLM, batch: list[list[int]], params: SamplingParams) -> list[Stream]:
    """Requests join the running batch with their KV in pages, one every other step."""
    streams: dict[str, Stream] = {}
    for step in range(4 * len(batch) + 200):
        if step % 2 == 0 and step // 2 < len(batch):
            rid = f"pd-{step // 2}"
            prompt = batch[step // 2]
            pages, token, logprob = prefill_elsewhere(llm, prompt)
            streams[rid] = Stream()
            streams[rid].take(llm.add_prefilled(rid, prompt, params, pages, token, logprob))
        for out in llm.step():
            streams[out.rid].take(out)
        if step > 2 * len(batch) and not llm.has_unfinished():
            break
    assert llm.allocator.num_in_use == 0 and llm.scheduler.num_held_pages == 0
    return [streams[f"pd-{i}"] for i in range(len(batch))]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefilled_requests_joining_a_running_batch(llama_dir, params):
    batch = prompts(6, seed=7)
    sync = decode_side(engine(llama_dir, False), batch, params)
    overlapped = decode_side(engine(llama_dir, True), batch, params)
    assert overlapped == sync
    assert all(len(s.token_ids) == 12 for s in sync)


def test_a_prefilled_request_that_ends_on_its_first_token(llama_dir):
    llm = engine(llama_dir, True)
    other = llm.add_request(prompts(1, seed=8)[0], GREEDY)
    llm.step()
    llm.step()  # a decode step in flight
    pages, token, logprob = prefill_elsewhere(llm, [5, 6, 7, 8])
    out = llm.add_prefilled(
        "one", [5, 6, 7, 8], SamplingParams(max_tokens=1), pages, token, logprob
    )
    assert out.finished and out.finish_reason == "length"
    while llm.has_unfinished():
        assert all(o.rid == other for o in llm.step())
    assert llm.allocator.num_in_use == 0


def test_switching_the_mode_mid_run_keeps_the_tokens(llama_dir):
    batch = prompts(5, seed=9)
    sync = run(engine(llama_dir, False), batch, SEEDED)
    llm = engine(llama_dir, True)
    streams = {llm.add_request(p, SEEDED): Stream() for p in batch}
    step = 0
    while llm.has_unfinished():
        llm.async_scheduling = (step // 4) % 2 == 0  # four steps each way
        for out in llm.step():
            streams[out.rid].take(out)
        step += 1
    assert list(streams.values()) == sync
    assert llm.allocator.num_in_use == 0


def decode_batches(llm: LLM) -> list[int]:
    """Records the batch size of every decode step the engine runs from now on."""
    sizes: list[int] = []
    forward = llm.runner.forward

    def counted(chunks, inputs, all_logits=False):
        if all(c.num_new == 1 and c.start > 0 for c in chunks):
            sizes.append(len(chunks))
        return forward(chunks, inputs, all_logits)

    llm.runner.forward = counted
    return sizes


def test_length_stops_cost_no_extra_rows_and_stop_tokens_at_most_one(llama_dir):
    batch = prompts(6, seed=10)
    by_length = [
        SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)
    ]
    free = run(engine(llama_dir, False), batch, by_length)
    by_stop = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(s.token_ids[-1],))
        for s in free
    ]
    for params, extra_rows in ((by_length, 0), (by_stop, 6)):
        sizes = []
        for flag in (False, True):
            llm = engine(llama_dir, flag)
            sizes.append(decode_batches(llm))
            run(llm, batch, params)
        assert sizes[0] == sizes[1] if extra_rows == 0 else sum(sizes[0]) < sum(sizes[1])
        assert sum(sizes[1]) - sum(sizes[0]) <= extra_rows


def test_each_step_returns_the_outputs_of_the_step_before(llama_dir):
    llm = engine(llama_dir, True)
    rid = llm.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert llm.step() == []  # the prefill is in flight
    assert [o.num_output_tokens for o in llm.step()] == [
        1
    ]  # the prefill's token; decode 1 in flight
    assert [o.num_output_tokens for o in llm.step()] == [2]  # decode 2 in flight, its last
    [last] = llm.step()  # nothing left to launch: the pipeline drains
    assert last.rid == rid and last.finished and last.num_output_tokens == 3
    assert not llm.has_unfinished() and llm.allocator.num_in_use == 0


def test_chunked_prefill_under_page_pressure_does_not_deadlock(llama_dir):
    """Every page held by half-prefilled prompts while nothing runs: the scheduler restarts
    the newest of them instead of waiting forever (both modes)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = engine(llama_dir, False, num_pages=12, page_size=8, max_num_batched_tokens=8)
    for p in prompts(4, seed=5):
        llm.add_request(p, params)
    steps = 0
    while llm.has_unfinished() and steps < 1000:
        llm.step()
        steps += 1
    assert not llm.has_unfinished() and llm.allocator.num_in_use == 0
