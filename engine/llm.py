"""The whole-model engine: scheduler, stage runner and sampler in one loop.

Decode and colocated replicas run this; `pdserve generate` and the benchmarks use `generate`. Requests come in as token ids; outputs go out per step as `RequestOutput`s.

Async scheduling (`EngineConfig.async_scheduling`, on by default on CUDA) overlaps the host's
work with the device's, as SGLang's overlap scheduler and vLLM's async scheduling do: a `step`
plans and launches decode step i+1 while step i still runs, feeding it step i's sampled tokens
straight from device memory, and only then reads step i's tokens back (queued as an async copy
into pinned memory) for stop checks, detokenizing and outputs. So each `step` returns the
previous step's outputs, and a request that stops on a sampled token (EOS, stop ids or strings)
has run one extra row whose token is dropped; stops by length are known in advance and cost
nothing. Steps that admit prompts or preempt drain the pipeline first and run as the
synchronous loop does. Sampling uses the same ops on the same per-request generators either
way, so the tokens are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from engine.attention import logits_rows
from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.grammar import GrammarState
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.loader import load_stage
from engine.model import DecoderStage
from engine.page_allocator import PageAllocator, PageTable
from engine.runner import (
    StageRunner,
    freeze_loaded_objects,
    page_bytes,
    resolve_device,
    resolve_dtype,
)
from engine.sampling import (
    PromptLogprob,
    SampledTokens,
    SamplingParams,
    TokenHistory,
    TopLogprobs,
    prompt_logprobs,
    sample,
)
from engine.scheduler import ScheduledStep, Scheduler
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    rid: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when asked
    prompt_logprobs: list[PromptLogprob] | None = None  # on a request's first output, if asked
    index: int = 0  # the choice (of n) this output belongs to


@dataclass
class Completion:
    rid: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob] | None = None
    text: str = ""
    finish_reason: FinishReason | None = None


class _InFlight(NamedTuple):
    """A launched step whose sampled tokens the host has not read yet (async scheduling)."""

    step_id: int  # the scheduler's id: pages freed while it runs are held until it ends
    seqs: list[Sequence]  # the requests it samples for, in row order
    sampled: SampledTokens | None  # None: a prefill step of chunks that want no logits
    done: torch.cuda.Event | None  # recorded after its last device work (None on the CPU)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class LLM:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        stage: DecoderStage | None = None,
    ) -> None:
        """`stage`: a whole-model stage already built (the GPU benchmarks draw random weights
        of realistic shapes on the device) instead of loading `config.model`; requests then get
        no text unless a tokenizer is given."""
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = (
            stage.config if stage is not None else ModelConfig.from_dir(config.model)
        )
        if tokenizer is None and stage is None:
            tokenizer = Tokenizer.from_dir(
                Path(config.model), extra_eos_token_ids=self.model_config.eos_token_ids
            )
        self.tokenizer = tokenizer
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        if stage is None:
            stage = load_stage(
                config.model,
                dtype=self.dtype,
                device=self.device,
                config=self.model_config,
                cpu_linear=config.cpu_linear,
                role=config.role,
            )
        spec = KVCacheSpec(
            num_pages=config.num_pages or 1,
            page_size=config.page_size,
            num_kv_heads=self.model_config.num_key_value_heads,
            head_dim=self.model_config.head_dim,
            dtype=self.dtype,
        )
        num_layers = self.model_config.num_hidden_layers
        if config.num_pages is None:
            num_pages = max(1, int(config.kv_cache_gib * 2**30) // page_bytes(spec, num_layers))
            spec = KVCacheSpec(
                num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim, spec.dtype
            )
        self.kv_cache = PagedKVCache(spec, 0, num_layers, device=self.device)
        self.allocator = PageAllocator(spec.num_pages)
        self.runner = StageRunner(stage, self.kv_cache, max_decode_batch=config.max_num_seqs)
        self.scheduler = Scheduler(
            self.allocator, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self.async_scheduling = (
            self.device.type == "cuda"
            if config.async_scheduling is None
            else config.async_scheduling
        )
        self._seqs: dict[str, Sequence] = {}
        self._next_rid = 0
        self._in_flight: _InFlight | None = None
        freeze_loaded_objects()
        log.info(
            "engine ready",
            extra={
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "kv_pages": spec.num_pages,
                "async_scheduling": self.async_scheduling,
            },
        )

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        rid: str | None = None,
        index: int = 0,
    ) -> str:
        """Queue a prompt; `index`: which choice of its client request it is (outputs say)."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context limit is {self.max_model_len}"
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if rid is None:
            rid, self._next_rid = f"req-{self._next_rid}", self._next_rid + 1
        seq = self._new_sequence(rid, prompt_token_ids, params, [])
        seq.index = index
        self.scheduler.add(seq)
        self._seqs[rid] = seq
        return rid

    def add_prefilled(
        self,
        rid: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        pages: list[int],
        first_token: int,
        first_logprob: float,
        first_top_logprobs: TopLogprobs = (),
        prompt_logprobs: list[PromptLogprob] | None = None,
        index: int = 0,
    ) -> RequestOutput:
        """Join the running batch with a prompt whose KV another process wrote into `pages`.

        The decode side of PD: a prefill replica computed the prompt's KV and sampled the first
        token; decoding goes on from there. The pages (allocated by the caller from
        `self.allocator`) become the request's and are freed when it ends.
        """
        seq = self._new_sequence(rid, prompt_token_ids, params, pages)
        if seq.generator is not None:
            # The prefill side drew the first token from a generator of the same seed: draw
            # once here too, so the rest of a seeded request's stream is the one the colocated
            # engine draws (a draw's use of the generator depends on the vocabulary alone).
            vocab = self.model_config.vocab_size
            uniform = torch.ones(vocab, device=seq.generator.device)
            torch.multinomial(uniform, 1, generator=seq.generator)
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.prompt_logprobs = list(prompt_logprobs or [])  # scored by the prefill side
        seq.index = index
        self.scheduler.add_running(seq)
        self._seqs[rid] = seq
        return self._append(seq, first_token, first_logprob, first_top_logprobs)

    def _new_sequence(
        self, rid: str, prompt_token_ids: list[int], params: SamplingParams, pages: list[int]
    ) -> Sequence:
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already running")
        return Sequence(
            rid=rid,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            page_table=PageTable(self.config.page_size, list(pages)),
            generator=params.make_generator(self.device),
            decoder=(
                self.tokenizer.decode_stream()
                if self.tokenizer is not None and params.detokenize
                else None
            ),
            grammar=self._grammar(params),
            stop_token_ids=frozenset(params.stop_token_ids)
            | (
                frozenset()
                if params.ignore_eos or self.tokenizer is None
                else frozenset(self.tokenizer.eos_token_ids)
            ),
        )

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        if params.grammar is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        return GrammarState(self.tokenizer, self.model_config.vocab_size, params.grammar)

    def abort(self, rid: str) -> bool:
        flight = self._in_flight
        if flight is not None:
            # The step in flight may still write the request's KV: let it end (at most one
            # step's device time), so the pages are free when this returns.
            flight.wait()
            self.scheduler.step_done(flight.step_id)
        seq = self.scheduler.abort(rid)
        self._seqs.pop(rid, None)
        if flight is not None and all(s.is_finished for s in flight.seqs):
            self._in_flight = None  # nothing left in it to deliver
        return seq is not None

    def has_unfinished(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the tokens read back in it: this step's
        (synchronous), or the previous step's (async scheduling: this one is in flight)."""
        if self.async_scheduling:
            return self._step_overlapped()
        if self._in_flight is not None:  # switched off mid-run: deliver what is in flight
            return self._drain()
        step = self.scheduler.schedule()
        if step is None:
            return []
        ids = torch.tensor(step.input_token_ids(), dtype=torch.int64)
        logits = self._score_prompts(step, self.runner.forward(step.chunks, ids))
        self.scheduler.postprocess(step)
        sampled = [s for s, c in zip(step.seqs, step.chunks, strict=True) if c.wants_logits]
        if not sampled:
            return []
        tokens, logprobs, top = sample(
            logits,
            [s.params for s in sampled],
            [s.generator for s in sampled],
            [_history(s) for s in sampled],
        )
        return [
            self._append(seq, tok, lp, alternatives)
            for seq, tok, lp, alternatives in zip(sampled, tokens, logprobs, top, strict=True)
        ]

    def _step_overlapped(self) -> list[RequestOutput]:
        prev = self._in_flight
        outputs: list[RequestOutput] = []
        if prev is not None and any(s.params.needs_history for s in prev.seqs):
            # Penalties and min_tokens read the tokens so far: the step in flight's tokens
            # must reach the host before the next step samples (synchronous while such
            # requests run).
            outputs, prev = self._drain(), None
        step = self.scheduler.schedule(overlapped=prev is not None)
        if step is None and prev is not None:
            # Admitting prompts, preempting or nothing to decode: drain, then plan as the
            # synchronous loop would (prompt ids are on the host; nothing is pending).
            outputs, prev = self._drain(), None
            step = self.scheduler.schedule()
        if step is not None:
            self._in_flight = self._launch(step, prev)
        if prev is not None:
            outputs = self._resolve(prev)
        return outputs

    def _launch(self, step: ScheduledStep, prev: _InFlight | None) -> _InFlight:
        """Queue a step's forward and sampling on the device; nothing here waits for it."""
        logits = self.runner.forward(step.chunks, self._input_ids(step, prev))
        logits = self._score_prompts(step, logits)
        self.scheduler.postprocess(step)
        seqs = [s for s, c in zip(step.seqs, step.chunks, strict=True) if c.wants_logits]
        sampled = None
        if seqs:
            gens = [s.generator for s in seqs]
            histories = [_history(s) for s in seqs]
            sampled = SampledTokens(logits, [s.params for s in seqs], gens, histories)
            for row, seq in enumerate(seqs):
                seq.num_pending += 1
                seq.pending_row = row
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return _InFlight(self.scheduler.step_launched(), seqs, sampled, done)

    def _score_prompts(self, step: ScheduledStep, logits: torch.Tensor) -> torch.Tensor:
        """Takes the prompt logprobs of chunks that scored every token (echo with logprobs)
        into their sequences; returns the rows the sampler reads, one per sampled chunk."""
        if not any(c.all_logits for c in step.chunks):
            return logits
        rows = logits_rows(step.chunks)
        for seq, chunk, span in zip(step.seqs, step.chunks, rows, strict=True):
            if chunk.all_logits:
                score_prompt_chunk(seq, chunk.start, logits[span.start : span.stop])
        wanted = [span[-1] for c, span in zip(step.chunks, rows, strict=True) if c.wants_logits]
        return logits[wanted]

    def _input_ids(self, step: ScheduledStep, prev: _InFlight | None) -> torch.Tensor:
        """The step's token ids: on the host, or gathered on the device from the tokens the
        previous step sampled, for requests whose newest token is still pending."""
        if prev is None or prev.sampled is None or step.is_prefill:
            return torch.tensor(step.input_token_ids(), dtype=torch.int64)
        seqs = step.seqs
        rows = [s.pending_row if s.num_pending else -1 for s in seqs]
        tokens = prev.sampled.tokens
        if len(rows) == len(tokens) and rows == list(range(len(rows))):
            return tokens  # the steady state: the same requests, in the same order
        # Requests joined (`add_prefilled`) or left: one upload of the host ids and of an index
        # into [previous step's tokens | host ids].
        host = [0 if r >= 0 else s.last_token_id for s, r in zip(seqs, rows, strict=True)]
        index = [r if r >= 0 else len(tokens) + j for j, r in enumerate(rows)]
        packed = torch.tensor(host + index, dtype=torch.int64)
        if tokens.is_cuda:
            packed = packed.pin_memory().to(tokens.device, non_blocking=True)
        return torch.cat([tokens, packed[: len(seqs)]])[packed[len(seqs) :]]

    def _resolve(self, flight: _InFlight) -> list[RequestOutput]:
        """Wait for a step in flight, read its tokens and process them as `step` would."""
        flight.wait()
        self.scheduler.step_done(flight.step_id)
        if flight.sampled is None:
            return []
        tokens, logprobs, top = flight.sampled.to_host()
        outputs = []
        for seq, token, logprob, alternatives in zip(
            flight.seqs, tokens, logprobs, top, strict=True
        ):
            seq.num_pending -= 1
            if not seq.is_finished:  # else: it stopped (or was aborted) after this step began
                outputs.append(self._append(seq, token, logprob, alternatives))
        return outputs

    def _drain(self) -> list[RequestOutput]:
        flight, self._in_flight = self._in_flight, None
        return self._resolve(flight) if flight is not None else []

    def _append(
        self, seq: Sequence, token: int, logprob: float, top: TopLogprobs = ()
    ) -> RequestOutput:
        # Runs once per request per step: kept to plain attribute and list work.
        outputs = seq.output_token_ids
        outputs.append(token)
        seq.output_logprobs.append(logprob)
        params = seq.params
        if seq.grammar is not None:
            seq.grammar.advance(token)
        if token in seq.stop_token_ids:
            reason: FinishReason | None = FinishReason.STOP
        elif seq.grammar is not None and seq.grammar.finished:
            reason = FinishReason.STOP  # the grammar is complete: nothing but EOS may follow
            if seq.decoder is not None:
                seq.text += seq.decoder.step(token)
        else:
            reason = self._stop_reason(seq, token)
            if seq.decoder is not None and (piece := seq.decoder.step(token)):
                before = len(seq.text)
                seq.text += piece
                if params.stop:
                    reason = self._check_stop_strings(seq, before) or reason
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.rid, None)
        return RequestOutput(
            rid=seq.rid,
            token_ids=[token],
            logprobs=[logprob],
            text=seq.take_text_delta(),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(outputs),
            top_logprobs=[top] if top else [],
            prompt_logprobs=(
                seq.prompt_logprobs
                if len(outputs) == 1 and params.prompt_logprobs is not None
                else None
            ),
            index=seq.index,
        )

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """LENGTH once the request or the context is full (`_append` checks stop tokens)."""
        if (
            len(seq.output_token_ids) >= seq.params.max_tokens
            or seq.num_tokens >= self.max_model_len
        ):
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_text_from: int) -> FinishReason | None:
        """Finds a stop string that the newest text completes; cuts the text before it."""
        start = max(0, new_text_from - max(len(s) for s in seq.params.stop) + 1)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        if not hits:
            return None
        cut = min(i for i, _ in hits)
        seq.text = seq.text[:cut]
        return FinishReason.STOP

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        completions = {}
        for prompt, p in zip(prompts, plist, strict=True):
            rid = self.add_request(prompt, p)
            completions[rid] = Completion(rid, list(prompt))
        while self.has_unfinished():
            for out in self.step():
                c = completions[out.rid]
                c.token_ids += out.token_ids
                c.logprobs += out.logprobs
                c.top_logprobs += out.top_logprobs
                c.prompt_logprobs = out.prompt_logprobs or c.prompt_logprobs
                c.text += out.text
                c.finish_reason = out.finish_reason
        return list(completions.values())


def _history(seq: Sequence) -> TokenHistory | None:
    """What the sampler's penalties and `min_tokens` read for `seq` (None: it reads nothing)."""
    if not seq.params.needs_history:
        return None
    return TokenHistory(seq.prompt_token_ids, seq.output_token_ids, seq.stop_token_ids, seq.grammar)


def score_prompt_chunk(seq: Sequence, start: int, logits: torch.Tensor) -> None:
    """Appends to `seq.prompt_logprobs` the prompt tokens that a chunk's logits (one row per
    token from position `start`) score and that are not scored yet (a preempted request
    computes its prompt again)."""
    prompt = seq.prompt_token_ids
    first = max(start, len(seq.prompt_logprobs))
    last = min(start + int(logits.shape[0]), len(prompt) - 1)  # the last row scores a token
    if first >= last:
        return
    rows = logits[first - start : last - start]
    seq.prompt_logprobs += prompt_logprobs(
        rows, prompt[first + 1 : last + 1], seq.params.prompt_logprobs or 0
    )
