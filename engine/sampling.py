"""The batched sampler of `SamplingParams` (engine/sampling_params.py).

Greedy rows are one batched argmax. Seeded requests own a `torch.Generator`, so the same seed
gives the same tokens whatever else shares the batch. Logprobs are those of the model's raw
distribution (log-softmax of the logits before temperature, top-k and top-p), as vLLM reports.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [B, V]; returns (tokens, logprobs of those tokens)."""
    if not any(not p.greedy or p.logprobs for p in params):
        # All greedy, no logprobs (the common serving case): one argmax, one host copy.
        return logits.argmax(dim=-1).tolist(), [0.0] * len(params)
    tokens, logprobs = sample_on_device(logits, params, generators)
    return tokens.tolist(), [0.0] * len(params) if logprobs is None else logprobs.tolist()


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample` without the host copy: token ids [B] (int64) and, when a request asks for them,
    their logprobs [B] (float32), on the logits' device. Nothing here waits for the device, so
    async scheduling can feed the tokens to the next step before the host has seen them; the
    ops are `sample`'s own, so both give the same tokens for the same generator states."""
    if not any(not p.greedy or p.logprobs for p in params):
        return logits.argmax(dim=-1), None
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, generators[i])
    if not any(p.logprobs for p in params):
        return tokens, None
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)


class SampledTokens:
    """A step's sampled tokens on their way to the host.

    The device tensor stays where it is: the next step reads its input ids from it. A copy into
    pinned host memory is queued behind the sampling, so the host reads the values (`to_host`)
    only once the step has ended, without a sync of its own. On the CPU the tensors are the
    host values already.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> None:
        self.tokens, logprobs = sample_on_device(logits, params, generators)
        self._host_tokens, self._host_logprobs = self.tokens, logprobs
        if self.tokens.is_cuda:
            self._host_tokens = _to_pinned(self.tokens)
            self._host_logprobs = None if logprobs is None else _to_pinned(logprobs)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to_host(self) -> tuple[list[int], list[float]]:
        """(tokens, logprobs) as lists; call once the step's device work has ended."""
        tokens = self._host_tokens.tolist()
        if self._host_logprobs is None:
            return tokens, [0.0] * len(tokens)
        return tokens, self._host_logprobs.tolist()


def _to_pinned(values: torch.Tensor) -> torch.Tensor:
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(row, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(0)
