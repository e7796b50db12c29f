"""Structured output's cost per decode step: the grammar mask (llguidance, a JSON schema) next to
the decode step it constrains, on the real default model (49k vocabulary), at batch 1 and 32.

The step is a plain decode step of the engine at that batch (median of several); the mask cost
is what a step adds for a batch that all follows the schema: the batch's mask (every row's
bitmask filled on llguidance's thread pool, then one masked fill) and one advance per row.
The rows are driven by random logits, not the model's (each matcher takes the most likely
allowed token and restarts once its answer completes), so the answers are valid but not the
ones the model would write.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import write_report
from deployments.model_store import pull
from engine import LLM, EngineConfig, SamplingParams
from engine.grammar import GrammarState, compile_grammar, mask_rows

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
}


def step_seconds(llm: LLM, batch: int, steps: int) -> float:
    """The median decode step at `batch` requests (prompts of 16 tokens)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        llm.add_request([100 + i] * 16, params)
    llm.step()  # the prefill
    times = []
    while llm.has_unfinished():
        start = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:-1])


def mask_seconds(llm: LLM, grammar: str, batch: int, steps: int) -> float:
    """The median time a step spends masking and advancing `batch` grammar rows."""
    vocab = llm.model_config.vocab_size
    states = [GrammarState(llm.tokenizer, vocab, grammar) for _ in range(batch)]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen)
        start = time.perf_counter()
        mask_rows(logits, list(enumerate(states)))  # as the sampler masks a batch
        masked = time.perf_counter() - start
        tokens = logits.argmax(dim=-1).tolist()  # the sampler's pick: not the grammar's cost
        start = time.perf_counter()
        for state, token in zip(states, tokens, strict=True):
            state.advance(token)
        times.append(masked + time.perf_counter() - start)
        for row, state in enumerate(states):
            if state.finished:
                states[row] = GrammarState(llm.tokenizer, vocab, grammar)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    path = Path(pull("smollm2-135m-instruct"))
    llm = LLM(EngineConfig(model=str(path), dtype="float32", device="cpu", num_pages=512))
    grammar = compile_grammar("json_schema", SCHEMA)
    rows = []
    for batch in (1, 32):
        step = step_seconds(llm, batch, args.steps)
        mask = mask_seconds(llm, grammar, batch, args.steps)
        rows.append(
            {
                "batch": batch,
                "decode_step_ms": step * 1e3,
                "mask_ms": mask * 1e3,
                "mask_per_row_ms": mask * 1e3 / batch,
                "mask_share": mask / (step + mask),
            }
        )
    write_report(
        "grammar",
        rows,
        ["batch", "decode_step_ms", "mask_ms", "mask_per_row_ms", "mask_share"],
        {"model": str(path), "vocab": llm.model_config.vocab_size, "schema": SCHEMA},
    )


if __name__ == "__main__":
    main()
