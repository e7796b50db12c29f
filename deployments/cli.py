"""The `pdserve` command line: the same code paths users reach through Serve, from a shell."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.logs import configure_logging

log = logging.getLogger("pdserve.cli")


def _make_model(args: argparse.Namespace) -> int:
    from engine.testmodel import make_test_model

    path = make_test_model(args.dir, family=args.family, seed=args.seed, shards=args.shards)
    log.info(
        "generated test model", extra={"path": str(path), "family": args.family, "seed": args.seed}
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, EngineConfig, SamplingParams

    llm = LLM(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    if args.chat:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt = llm.tokenizer.encode(args.prompt)
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, top_p=args.top_p
    )
    started = time.perf_counter()
    [completion] = llm.generate([prompt], params)
    elapsed = time.perf_counter() - started
    sys.stdout.write(f"prompt: {args.prompt!r}\ncompletion: {completion.text!r}\n")
    log.info(
        "generated",
        extra={
            "rid": completion.rid,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason.value if completion.finish_reason else None,
            "seconds": round(elapsed, 3),
        },
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    from deployments.model_store import PullError, pull

    try:
        path = pull(args.name)
    except PullError as exc:
        log.error(str(exc))
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a small random-weight HF checkpoint for tests")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--family", choices=["llama", "qwen2"], default="llama")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--shards", type=int, default=1)
    mk.set_defaults(func=_make_model)

    gen = sub.add_parser("generate", help="run one prompt through the engine in this process")
    gen.add_argument("--model", required=True, help="local HF model directory")
    gen.add_argument("--prompt", default="The capital of France is")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.set_defaults(func=_generate)

    from deployments.serve_cli import add_parser

    add_parser(sub)

    pull = sub.add_parser(
        "pull", help="fetch a known model (e.g. smollm2-135m-instruct) into the cache"
    )
    pull.add_argument("name")
    pull.set_defaults(func=_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        log.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
