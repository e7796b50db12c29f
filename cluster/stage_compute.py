"""A stage actor's forward over a micro-batch, as `PlanExecutor` drives it: queue the layers,
let the KV sends start behind them, then wait for the hidden states or sample first tokens."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from cluster.messages import ChunkPlan
from engine.attention import SeqChunk
from engine.runner import StageRunner
from engine.sampling import sample
from transport.metadata import FirstToken
from transport.streams import after_sends, behind_current_stream


class LayerCompute:
    """Layers `[start, end)` of the model on this stage's device (`StageCompute`)."""

    def __init__(self, runner: StageRunner, pp_rank: int, is_first: bool, is_last: bool) -> None:
        self.runner = runner
        self.pp_rank = pp_rank
        self.is_first = is_first
        self.is_last = is_last

    def launch(self, batch: tuple[ChunkPlan, ...], upstream: torch.Tensor | None) -> torch.Tensor:
        """Queue the forward. It waits (on the GPU) for the sends queued before it, which may
        still read pages it is about to write."""
        inputs = self._inputs(batch, upstream)
        chunks = [SeqChunk(c.start, len(c.token_ids), c.pages, c.finishing) for c in batch]
        after_sends(self.runner.device)
        return self.runner.forward(chunks, inputs)

    def sends_after(self, out: torch.Tensor) -> AbstractContextManager[None]:
        """Sends started inside run on a side stream behind the forward: their copies overlap
        with handing the hidden states on, or with sampling."""
        return behind_current_stream(out.device)

    def finish(
        self, batch: tuple[ChunkPlan, ...], out: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, FirstToken]]:
        if not self.is_last:  # on its device: the stage's hidden channel hands it on
            return out, {}
        return None, self._first_tokens(batch, out)

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
        params = [c.sampling for c in finishing]
        generators = [p.make_generator(logits.device) if p is not None else None for p in params]
        tokens, logprobs = sample(logits, params, generators)  # type: ignore[arg-type]
        return {
            c.rid: FirstToken(
                room=c.room,
                token_id=token,
                logprob=logprob,
                num_prompt_tokens=c.start + len(c.token_ids),
            )
            for c, token, logprob in zip(finishing, tokens, logprobs, strict=True)
        }
