"""Engine throughput against `transformers` on the same generated checkpoint, side by side.

Prefill tokens/s (one long prompt) and decode tokens/s at batch 1 and 32, each measured for
both engines in alternating rounds of the same run; a ratio is the median of the rounds' ours /
theirs. Decode time is the time of a generation of N tokens minus that of a generation of 1
token (the prefill), for both engines alike. Both make token ids only: ours runs with
`detokenize=False`, as `transformers`' `generate` makes no text either.
Targets (CPU): prefill >= 1.0x, batched decode >= 2x.

A second table (`engine_dtypes`) sets our engine in float32 against ours in bfloat16 on the same
model, alike (alternating rounds, medians, the median of the rounds' bf16 / float32 ratios):
prefill and decode at batch 1, 8 and 32. `--dtypes-only` runs just that table, on any model our
engine loads (a .gguf too, which transformers' side would not).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_report
from engine import LLM, EngineConfig, SamplingParams, cpu_kernels
from engine.testmodel import make_test_model


def _ours(llm: LLM, prompts: list[list[int]], max_tokens: int, text: bool = False) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=text)
    start = time.perf_counter()
    out = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == max_tokens for c in out)
    return elapsed


def _theirs(model, prompts: list[list[int]], max_tokens: int, text: bool = False) -> float:
    """`text` is ours only: `generate` makes token ids."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + max_tokens
    return elapsed


def throughput(
    llm: LLM,
    hf: Any,
    make_prompts: Callable[[], list[list[int]]],
    phase: str,
    new_tokens: int,
    rounds: int,
    text: bool = False,
) -> tuple[float, float, float]:
    """Median tokens/s of ours and of transformers, alternating rounds on the same prompts, and
    the median of the rounds' ratios (each round's two runs are back to back, so the load of
    this shared machine weighs on both alike).

    Prefill: prompt tokens over the time to the first token. Decode: tokens after the first
    over the time of N tokens minus the time of 1, so the prefill cancels out. `text`: ours
    also detokenizes (what serving costs; transformers still makes ids only).
    """
    samples: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(rounds):
        prompts = make_prompts()
        for name, run, engine in (("ours", _ours, llm), ("transformers", _theirs, hf)):
            if phase == "prefill":
                tokens = sum(len(p) for p in prompts)
                seconds = run(engine, prompts, 1, text)
            else:
                tokens = len(prompts) * (new_tokens - 1)
                seconds = run(engine, prompts, new_tokens, text) - run(engine, prompts, 1, text)
            samples[name].append(tokens / seconds)
    ratios = [a / b for a, b in zip(samples["ours"], samples["transformers"], strict=True)]
    return (
        statistics.median(samples["ours"]),
        statistics.median(samples["transformers"]),
        statistics.median(ratios),
    )


def dtype_rows(
    model: str, rounds: int, prefill_tokens: int, decode_tokens: int, cpu_linear: str
) -> list[dict[str, Any]]:
    """Ours in float32 and in bfloat16 on the same prompts, side by side: tokens/s of each and
    the median of the rounds' bf16 / float32 ratios (> 1: bf16 is faster)."""
    engines = {
        dtype: LLM(
            EngineConfig(
                model=model,
                dtype=dtype,
                device="cpu",
                num_pages=2048,
                max_num_batched_tokens=4096,
                cpu_linear=cpu_linear,
            )
        )
        for dtype in ("float32", "bfloat16")
    }
    vocab = engines["float32"].model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for llm in engines.values():
        _ours(llm, torch.randint(5, vocab, (2, 16), generator=gen).tolist(), 4)
    rows = []
    for phase, batch, prompt_len, new_tokens in (
        ("prefill", 1, prefill_tokens, 1),
        ("decode", 1, 32, decode_tokens),
        ("decode", 8, 32, decode_tokens),
        ("decode", 32, 32, decode_tokens),
    ):
        samples: dict[str, list[float]] = {dtype: [] for dtype in engines}
        for _ in range(rounds):
            prompts = torch.randint(5, vocab, (batch, prompt_len), generator=gen).tolist()
            for dtype, llm in engines.items():
                if phase == "prefill":
                    samples[dtype].append(prompt_len * batch / _ours(llm, prompts, 1))
                else:
                    seconds = _ours(llm, prompts, new_tokens) - _ours(llm, prompts, 1)
                    samples[dtype].append(batch * (new_tokens - 1) / seconds)
        ratios = [b / a for a, b in zip(samples["float32"], samples["bfloat16"], strict=True)]
        rows.append(
            {
                "phase": phase,
                "batch": batch,
                "prompt_tokens": prompt_len,
                "new_tokens": new_tokens,
                "float32_tok_s": statistics.median(samples["float32"]),
                "bfloat16_tok_s": statistics.median(samples["bfloat16"]),
                "ratio": statistics.median(ratios),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="HF model dir (default: a generated one)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--cpu-linear",
        choices=["onednn", "mkl"],
        default="onednn",
        help="how our CPU linears run (EngineConfig.cpu_linear)",
    )
    parser.add_argument(
        "--dtypes-only", action="store_true", help="only ours in float32 against ours in bf16"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_test_model(Path(tmp) / "model", family="llama", seed=0)
        model_name = str(args.model or "generated llama (4 layers, hidden 256)")
        write_report(
            "engine_dtypes",
            dtype_rows(
                str(model_dir),
                args.rounds,
                args.prefill_tokens,
                args.decode_tokens,
                args.cpu_linear,
            ),
            [
                "phase",
                "batch",
                "prompt_tokens",
                "new_tokens",
                "float32_tok_s",
                "bfloat16_tok_s",
                "ratio",
            ],
            extra={
                "model": model_name,
                "rounds": args.rounds,
                "cpu_linear": args.cpu_linear,
                "bf16_matmul": "vdpbf16ps" if cpu_kernels.bf16_dot_products() else "widened",
            },
        )
        if args.dtypes_only:
            return
        llm = LLM(
            EngineConfig(
                model=str(model_dir),
                dtype="float32",
                device="cpu",
                num_pages=2048,
                max_num_batched_tokens=4096,
                cpu_linear=args.cpu_linear,
            )
        )
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        vocab = llm.model_config.vocab_size
        gen = torch.Generator().manual_seed(0)

        def prompts(batch: int, length: int) -> list[list[int]]:
            return torch.randint(5, vocab, (batch, length), generator=gen).tolist()

        # Warm both up once (first-call allocations, lazy init).
        _ours(llm, prompts(2, 16), 4)
        _theirs(hf, prompts(2, 16), 4)

        cases = [
            ("prefill", 1, args.prefill_tokens, 1, False),
            ("decode", 1, 32, args.decode_tokens, False),
            ("decode", 32, 32, args.decode_tokens, False),
            # For reference: ours detokenizing as it serves (no target: transformers makes ids).
            ("decode", 32, 32, args.decode_tokens, True),
        ]
        rows = []
        for phase, batch, prompt_len, new_tokens, text in cases:
            ours, theirs, ratio = throughput(
                llm,
                hf,
                lambda b=batch, n=prompt_len: prompts(b, n),
                phase,
                new_tokens,
                args.rounds,
                text,
            )
            rows.append(
                {
                    "phase": phase,
                    "batch": batch,
                    "ours_text": text,
                    "prompt_tokens": prompt_len,
                    "new_tokens": new_tokens,
                    "ours_tok_s": ours,
                    "transformers_tok_s": theirs,
                    "ratio": ratio,
                    "target": 1.0
                    if phase == "prefill"
                    else (2.0 if batch > 1 and not text else None),
                }
            )
        write_report(
            "engine",
            rows,
            [
                "phase",
                "batch",
                "ours_text",
                "prompt_tokens",
                "new_tokens",
                "ours_tok_s",
                "transformers_tok_s",
                "ratio",
                "target",
            ],
            extra={
                "model": model_name,
                "rounds": args.rounds,
                "cpu_linear": args.cpu_linear,
            },
        )


if __name__ == "__main__":
    main()
