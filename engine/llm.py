"""The whole-model engine: scheduler, stage runner and sampler in one loop.

Decode replicas run this; `make serve` before the deployments existed and the benchmarks use
`generate`. Requests come in as token ids; outputs go out per step as `RequestOutput`s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field, PositiveInt

from engine.config import ModelConfig
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.linear import CpuLinear
from engine.loader import load_stage
from engine.page_allocator import PageAllocator, PageTable
from engine.runner import StageRunner, page_bytes, resolve_device, resolve_dtype
from engine.sampling import SamplingParams, sample
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """How one engine runs a model: where, in what precision, and with how much KV."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    page_size: PositiveInt = 16
    num_pages: PositiveInt | None = Field(
        None, description="KV pages; derived from kv_cache_gib if unset"
    )
    kv_cache_gib: float = Field(0.5, gt=0)
    max_num_seqs: PositiveInt = 64
    max_num_batched_tokens: PositiveInt = 2048
    max_model_len: PositiveInt | None = None
    cpu_linear: CpuLinear = Field(
        "onednn",
        description="CPU linears: oneDNN on weights packed at load (faster decode), or plain "
        "F.linear (MKL, the kernel transformers uses; no second copy of the weights)",
    )


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


@dataclass
class Completion:
    rid: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


class LLM:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = tokenizer or Tokenizer.from_dir(
            Path(config.model), extra_eos_token_ids=self.model_config.eos_token_ids
        )
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        stage = load_stage(
            config.model,
            dtype=self.dtype,
            device=self.device,
            config=self.model_config,
            cpu_linear=config.cpu_linear,
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
            self.allocator, config.max_num_seqs, config.max_num_batched_tokens
        )
        self._seqs: dict[str, Sequence] = {}
        self._next_rid = 0

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, rid: str | None = None
    ) -> str:
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
    ) -> RequestOutput:
        """Join the running batch with a prompt whose KV another process wrote into `pages`.

        The decode side of PD: a prefill replica computed the prompt's KV and sampled the first
        token; decoding goes on from there. The pages (allocated by the caller from
        `self.allocator`) become the request's and are freed when it ends.
        """
        seq = self._new_sequence(rid, prompt_token_ids, params, pages)
        seq.num_computed_tokens = len(prompt_token_ids)
        self.scheduler.add_running(seq)
        self._seqs[rid] = seq
        return self._append(seq, first_token, first_logprob)

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
            decoder=self.tokenizer.decode_stream(),
            stop_token_ids=frozenset(params.stop_token_ids)
            | (frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)),
        )

    def abort(self, rid: str) -> bool:
        seq = self.scheduler.abort(rid)
        self._seqs.pop(rid, None)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        if step is None:
            return []
        ids = torch.tensor(step.input_token_ids(), dtype=torch.int64)
        logits = self.runner.forward(step.chunks, ids)
        self.scheduler.postprocess(step)
        sampled = [s for s, c in zip(step.seqs, step.chunks, strict=True) if c.wants_logits]
        if not sampled:
            return []
        tokens, logprobs = sample(
            logits, [s.params for s in sampled], [s.generator for s in sampled]
        )
        return [
            self._append(seq, tok, lp)
            for seq, tok, lp in zip(sampled, tokens, logprobs, strict=True)
        ]

    def _append(self, seq: Sequence, token: int, logprob: float) -> RequestOutput:
        # Runs once per request per step: kept to plain attribute and list work.
        outputs = seq.output_token_ids
        outputs.append(token)
        seq.output_logprobs.append(logprob)
        params = seq.params
        if token in seq.stop_token_ids:
            reason: FinishReason | None = FinishReason.STOP
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
        )

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.stop_token_ids:
            return FinishReason.STOP
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
                c.text += out.text
                c.finish_reason = out.finish_reason
        return list(completions.values())
