"""A stage actor's forward over a micro-batch, as `PlanExecutor` drives it: queue the layers,
let the KV sends start behind them, then wait for the hidden states or sample first tokens."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager

import torch

from cluster.messages import ChunkPlan
from cluster.plan_executor import StageOutput
from engine.attention import SeqChunk, logits_rows
from engine.grammar import GrammarState
from engine.runner import StageRunner
from engine.sampling import PromptLogprob, SamplingParams, TokenHistory, prompt_logprobs, sample
from engine.tokenizer import Tokenizer
from transport.metadata import FirstToken
from transport.streams import after_sends, behind_current_stream


class LayerCompute:
    """Layers `[start, end)` of the model on this stage's device (`StageCompute`)."""

    def __init__(
        self,
        runner: StageRunner,
        pp_rank: int,
        is_first: bool,
        is_last: bool,
        model: str | None = None,
    ) -> None:
        """`model`: the model's directory, where the last stage finds the tokenizer that
        structured output's grammars need (loaded on the first such request)."""
        self.runner = runner
        self.pp_rank = pp_rank
        self.is_first = is_first
        self.is_last = is_last
        self._model = model
        self._tokenizer: Tokenizer | None = None

    def launch(self, batch: tuple[ChunkPlan, ...], upstream: torch.Tensor | None) -> torch.Tensor:
        """Queue the forward. It waits (on the GPU) for the sends queued before it, which may
        still read pages it is about to write."""
        inputs = self._inputs(batch, upstream)
        chunks = [_seq_chunk(c) for c in batch]
        after_sends(self.runner.device)
        return self.runner.forward(chunks, inputs)

    def sends_after(self, out: torch.Tensor) -> AbstractContextManager[None]:
        """Sends started inside run on a side stream behind the forward: their copies overlap
        with handing the hidden states on, or with sampling."""
        return behind_current_stream(out.device)

    def finish(self, batch: tuple[ChunkPlan, ...], out: torch.Tensor) -> StageOutput:
        if not self.is_last:  # on its device: the stage's hidden channel hands it on
            return StageOutput(hidden=out)
        scored: dict[str, list[PromptLogprob]] = {}
        if any(c.prompt_logprobs is not None for c in batch):
            out = self._score_prompts(batch, out, scored)
        return StageOutput(first_tokens=self._first_tokens(batch, out), prompt_logprobs=scored)

    def _score_prompts(
        self,
        batch: tuple[ChunkPlan, ...],
        logits: torch.Tensor,
        scored: dict[str, list[PromptLogprob]],
    ) -> torch.Tensor:
        """Scores the prompt tokens of chunks that asked (each row the token after it: the
        chunk's next one, or the next chunk's first) into `scored`; returns the rows to sample
        from."""
        rows = logits_rows([_seq_chunk(c) for c in batch])
        sample_rows = []
        for c, span in zip(batch, rows, strict=True):
            if c.finishing:
                sample_rows.append(span[-1])
            if c.prompt_logprobs is None:
                continue
            targets = list(c.token_ids[1:]) + ([] if c.finishing else [c.next_token])
            scored[c.rid] = prompt_logprobs(
                logits[span.start : span.start + len(targets)], targets, c.prompt_logprobs
            )
        return logits[sample_rows]

    def _grammar(self, params: SamplingParams | None) -> GrammarState | None:
        """A fresh grammar state for a first token (decode rebuilds its own from it)."""
        if params is None or params.grammar is None:
            return None
        if self._tokenizer is None:
            if self._model is None:
                raise ValueError("structured output needs the model's tokenizer")
            config = self.runner.stage.config
            self._tokenizer = Tokenizer.from_dir(
                self._model, extra_eos_token_ids=config.eos_token_ids
            )
        vocab = self.runner.stage.config.vocab_size
        return GrammarState(self._tokenizer, vocab, params.grammar)

    def _inputs(self, batch: tuple[ChunkPlan, ...], upstream: torch.Tensor | None) -> torch.Tensor:
        if self.is_first:
            ids = [t for c in batch for t in c.token_ids]
            return torch.tensor(ids, dtype=torch.long)
        if upstream is None:
            raise RuntimeError(f"stage {self.pp_rank - 1} produced no hidden states")
        return upstream

    def _first_tokens(
        self, batch: tuple[ChunkPlan, ...], logits: torch.Tensor
    ) -> dict[str, FirstToken]:
        finishing = [c for c in batch if c.finishing]
        # One row per choice: a request of n choices samples n first tokens from its row,
        # choice i with its own generator (seed + i).
        rows, params = [], []
        for row, c in enumerate(finishing):
            sampling = c.sampling or SamplingParams()
            for i in range(sampling.n):
                rows.append(row)
                params.append(sampling.for_choice(i) if sampling.n > 1 else sampling)
        if len(rows) != len(finishing):
            logits = logits[rows]
        generators = [p.make_generator(logits.device) for p in params]
        # The first token's penalties start from the prompt (no output yet).
        histories = [
            TokenHistory(finishing[row].prompt_token_ids, grammar=self._grammar(p))
            for row, p in zip(rows, params, strict=True)
        ]
        tokens, logprobs, top = sample(logits, params, generators, histories)
        firsts: dict[str, FirstToken] = {}
        for k, row in enumerate(rows):
            c = finishing[row]
            if c.rid not in firsts:
                firsts[c.rid] = FirstToken(
                    room=c.room,
                    token_id=tokens[k],
                    logprob=logprobs[k],
                    num_prompt_tokens=c.start + len(c.token_ids),
                    top_logprobs=top[k],
                )
            else:
                first = firsts[c.rid]
                more = (*first.more_choices, (tokens[k], logprobs[k], top[k]))
                firsts[c.rid] = dataclasses.replace(first, more_choices=more)
        return firsts


def _seq_chunk(c: ChunkPlan) -> SeqChunk:
    """The engine's view of a planned chunk: a token is sampled after a finishing one; every
    token's logits where the prompt is scored."""
    scores = c.prompt_logprobs is not None
    return SeqChunk(c.start, len(c.token_ids), c.pages, c.finishing, all_logits=scores)
