"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1): load time, prefill and decode
throughput, ours against `transformers` loading the same file, in one run, as ratios.

Both dequantize the same GGUF to float32. Load time excludes the download (`pdserve pull` runs
first). Throughput is measured as in `engine_bench`: alternating rounds, medians, the median of
the rounds' ratios, decode time = generation of N tokens minus generation of 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.engine_bench import _ours, _theirs, throughput
from benchmarks.report import write_report
from deployments.model_store import pull
from engine import LLM, EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    path = Path(pull("smollm2-135m-instruct"))

    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    llm = LLM(EngineConfig(model=str(path), dtype="float32", device="cpu", num_pages=512))
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    theirs_load = time.perf_counter() - start

    gen = torch.Generator().manual_seed(0)
    vocab = llm.model_config.vocab_size

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(100, vocab, (batch, length), generator=gen).tolist()

    _ours(llm, prompts(1, 8), 2)
    _theirs(hf, prompts(1, 8), 2)
    rows = [
        {
            "phase": "load",
            "batch": None,
            "ours": ours_load,
            "transformers": theirs_load,
            "unit": "s",
            "ratio": theirs_load / ours_load,  # > 1: we load faster
        }
    ]
    for phase, batch, prompt_len, new_tokens in (
        ("prefill", 1, args.prefill_tokens, 1),
        ("decode", 1, 32, args.decode_tokens),
        ("decode", 8, 32, args.decode_tokens),
    ):
        ours, theirs, ratio = throughput(
            llm, hf, lambda b=batch, n=prompt_len: prompts(b, n), phase, new_tokens, args.rounds
        )
        rows.append(
            {
                "phase": phase,
                "batch": batch,
                "ours": ours,
                "transformers": theirs,
                "unit": "tok/s",
                "ratio": ratio,  # the median of the rounds' ratios
            }
        )
    write_report("real_model", rows, list(rows[0]), extra={"model": str(path)})


if __name__ == "__main__":
    main()
