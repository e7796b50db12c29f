"""The state of one request inside an engine: its tokens, pages, progress and output text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.page_allocator import PageTable
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDecoder


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued or part-way through its (chunked) prefill
    RUNNING = "running"  # decoding
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class Sequence:
    rid: str
    prompt_token_ids: list[int]
    params: SamplingParams
    page_table: PageTable
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # With `params.prompt_logprobs`: the prompt's tokens after the first, scored (echo).
    prompt_logprobs: list[Any] = field(default_factory=list)
    # Tokens whose K/V are in the cache; the next forward starts at this position.
    num_computed_tokens: int = 0
    # Async scheduling: tokens sampled on the device that the host has not read yet (one per
    # step in flight that sampled for this request), and the row of the newest of them in its
    # step's sampled tokens, from which the next decode step takes its input id on the device.
    num_pending: int = 0
    pending_row: int = -1
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    # EOS (unless ignored) and the request's own stop tokens, fixed when the request arrives.
    stop_token_ids: frozenset[int] = frozenset()
    grammar: Any = None  # engine.grammar.GrammarState, for structured output
    index: int = 0  # which of its request's n choices this is
    text: str = ""
    _emitted_chars: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt = len(self.prompt_token_ids)
        if end <= prompt:
            return self.prompt_token_ids[start:end]
        if start >= prompt:  # decode: no copy of the whole history per step
            return self.output_token_ids[start - prompt : end - prompt]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def take_text_delta(self) -> str:
        """Text not yet handed out, holding back a tail that could still become a stop string."""
        hold = 0
        if not self.is_finished and self.params.stop:
            hold = max(len(s) for s in self.params.stop) - 1
        end = max(self._emitted_chars, len(self.text) - hold)
        delta = self.text[self._emitted_chars : end]
        self._emitted_chars = end
        return delta
