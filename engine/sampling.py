"""The batched sampler of `SamplingParams` (engine/sampling_params.py).

Greedy rows are one batched argmax. Seeded requests own a `torch.Generator`, so the same seed
gives the same tokens whatever else shares the batch. Penalties, `logit_bias` and `min_tokens`
adjust a row's logits before it is sampled (greedy too), from the row's `TokenHistory`; the
last prefill stage samples a prompt's first token with the same code, from the prompt alone.
Logprobs, and the top alternatives beside them, are those of the model's raw distribution
(log-softmax of the logits before any adjustment, temperature, top-k or top-p), as vLLM
reports by default.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.grammar import mask_rows
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.grammar import GrammarState

TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
PromptLogprob = tuple[int, float, TopLogprobs]  # a prompt token, its logprob, the alternatives


@dataclass(frozen=True)
class TokenHistory:
    """What a row's penalties, `min_tokens` and grammar read: the prompt, the tokens sampled so
    far, the ids that would end the request (banned while `min_tokens` is not reached), and
    the request's place in its grammar."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = ()
    stop_token_ids: Collection[int] = ()
    grammar: GrammarState | None = None


class Sampled(NamedTuple):
    """One token per row, its logprob (0.0 where not asked) and its top alternatives (empty
    where not asked)."""

    tokens: list[int]
    logprobs: list[float]
    top: list[TopLogprobs]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[TokenHistory | None] | None = None,
) -> Sampled:
    """Pick one token per row of `logits` [B, V]."""
    if all(p.plain for p in params):
        # All greedy, nothing asked beside the token (the common serving case): one argmax.
        return Sampled(logits.argmax(dim=-1).tolist(), [0.0] * len(params), [()] * len(params))
    return SampledTokens(logits, params, generators, histories).to_host()


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[TokenHistory | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`sample` without the host copy: token ids [B] (int64), and when a request asks for them
    their logprobs [B] and the top alternatives (ids and logprobs, [B, k]), on the logits'
    device. Nothing here waits for the device, so async scheduling can feed the tokens to the
    next step before the host has seen them."""
    if all(p.plain for p in params):
        return logits.argmax(dim=-1), None, None, None
    raw = logits.float()
    adjusted = raw
    if any(p.adjusts_logits for p in params):
        adjusted = raw.clone()
        for i, p in enumerate(params):
            if p.adjusts_logits:
                adjust_logits(adjusted[i], p, histories[i] if histories else None)
        # The grammar masks last (nothing may lift them), every constrained row at once.
        if histories:
            grammars = [(i, h.grammar) for i, h in enumerate(histories) if h and h.grammar]
            mask_rows(adjusted, grammars)
    tokens = adjusted.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(adjusted[i], p, generators[i])
    if not any(p.logprobs for p in params):
        return tokens, None, None, None
    logprobs = torch.log_softmax(raw, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    k = max(p.top_logprobs if p.logprobs else 0 for p in params)
    if not k:
        return tokens, chosen, None, None
    top = logprobs.topk(k, dim=-1)
    return tokens, chosen, top.indices, top.values


def adjust_logits(row: torch.Tensor, p: SamplingParams, history: TokenHistory | None) -> None:
    """Apply `p`'s penalties, logit bias and `min_tokens` ban to one row of float32 logits, in
    place, in vLLM's order: repetition, then frequency and presence, then the bias; the ban
    last, so nothing lifts it (the grammar's mask comes after, for the batch: `mask_rows`)."""
    output = list(history.output_token_ids) if history is not None else []
    if p.repetition_penalty != 1.0 and history is not None:
        seen = torch.tensor(sorted({*history.prompt_token_ids, *output}), dtype=torch.long)
        seen = seen.to(row.device)
        values = row[seen]
        row[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if output and (p.frequency_penalty or p.presence_penalty):
        ids = torch.tensor(output, dtype=torch.long, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[-1])[: row.shape[-1]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token, bias in p.logit_bias:
        if 0 <= token < row.shape[-1]:
            row[token] += bias
    if len(output) < p.min_tokens:
        stops = set(p.stop_token_ids)
        if not p.ignore_eos:
            stops |= {*p.eos_token_ids, *(history.stop_token_ids if history else ())}
        banned = [t for t in stops if 0 <= t < row.shape[-1]]
        if banned:
            row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[PromptLogprob]:
    """Each of `targets` (the prompt's tokens after the first) scored by the logits row
    before it: its logprob and the `k` most likely tokens there."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    if not k:
        return [(t, lp, ()) for t, lp in zip(targets, chosen, strict=True)]
    top = logprobs.topk(k, dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return [
        (t, lp, tuple(zip(i, v, strict=True)))
        for t, lp, i, v in zip(targets, chosen, ids, values, strict=True)
    ]


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
        histories: list[TokenHistory | None] | None = None,
    ) -> None:
        self._top_k = [p.top_logprobs if p.logprobs else 0 for p in params]
        self.tokens, *extras = sample_on_device(logits, params, generators, histories)
        self._host = [self.tokens, *extras]
        if self.tokens.is_cuda:
            self._host = [None if t is None else _to_pinned(t) for t in self._host]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to_host(self) -> Sampled:
        """The step's tokens, logprobs and top alternatives as lists; call once the step's
        device work has ended."""
        tokens_t, logprobs_t, top_ids_t, top_values_t = self._host
        tokens = tokens_t.tolist()
        logprobs = [0.0] * len(tokens) if logprobs_t is None else logprobs_t.tolist()
        if top_ids_t is None:
            return Sampled(tokens, logprobs, [()] * len(tokens))
        ids, values = top_ids_t.tolist(), top_values_t.tolist()
        top = [
            tuple(zip(ids[i][:k], values[i][:k], strict=True)) for i, k in enumerate(self._top_k)
        ]
        return Sampled(tokens, logprobs, top)


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
