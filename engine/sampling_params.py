"""Per-request sampling parameters, validated where requests enter.

Its own module, free of torch at import, because the ingress builds and checks these for every
request and holds no model; the sampler that applies them is `engine.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    # With `logprobs`: how many of the most likely tokens to report beside each sampled one.
    top_logprobs: int = 0
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token is in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's output count
    repetition_penalty: float = 1.0  # vLLM's: divides (or multiplies) prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # stop tokens (and EOS) are banned until this many were sampled
    # The model's end-of-sequence ids, for `min_tokens`: filled in where the tokenizer is known
    # (the ingress), so a process without one (the last prefill stage) can ban them too.
    eos_token_ids: tuple[int, ...] = ()
    # The prompt's own logprobs (echo): None, or how many top alternatives beside each.
    prompt_logprobs: int | None = None
    # Choices of one prompt: one prefill, n first tokens (choice i samples with seed + i),
    # n sequences in decode.
    n: int = 1
    # Structured output: an llguidance grammar (engine/grammar.py) every sampled token obeys.
    grammar: str | None = None
    # False: token ids only, no text (no incremental detokenizing; stop strings need text).
    detokenize: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 1 <= self.n <= 32:
            raise ValueError(f"n must be in [1, 32], got {self.n}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}]")

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters one of the n choices samples with: its own seed."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_history(self) -> bool:
        """The logits depend on the tokens so far (penalties) or their count (`min_tokens`)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or self.min_tokens > 0
            or self.grammar is not None  # the mask follows the tokens so far
        )

    @property
    def adjusts_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias)

    @property
    def plain(self) -> bool:
        """Greedy, nothing to adjust, nothing to report: one batched argmax serves it."""
        return self.greedy and not self.logprobs and not self.adjusts_logits

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        import torch  # here, not at the top: the ingress validates these without torch

        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen
