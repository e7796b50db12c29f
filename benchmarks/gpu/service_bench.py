"""The whole service on one GPU: PD (prefill PP=2 + decode, KV over CUDA IPC) against colocated.

Starts Ray on this machine (one GPU), then for each model shape deploys pdserve in `pd` mode and
in `colocated` mode, one after the other, behind the same OpenAI ingress (`build_service`), with
fractional GPUs for every engine process (`--gpu-frac`, 0.25 each: two prefill stages and the
decode replica of PD, or the one colocated engine). Per shape:

(a) greedy PD == colocated, token for token through the HTTP API: `--prompts` prompts of
    `--max-tokens` tokens each (ignore_eos), compared by text and token count, streamed and not;
(b) the serving load (benchmarks/serving_bench.py's request mix: Poisson arrivals, prompts of
    8-160 words, 8-64 output tokens, streamed) at each of `--rates`: TTFT, ITL p50/p99, output
    tokens/s, PD / colocated ratios;
(c) one request's time to first token by phase on the idle PD service: the decode log line
    "first token" (`phases_ms`) and the `pdserve_request_phase_seconds{phase}` sums of /metrics
    before and after it, control-plane milliseconds beside forward milliseconds.

Models: `small` is `engine.testmodel.make_test_model` (llama family, 4 layers); `qwen2-1.5b` and
`llama3-8b` are `REALISTIC_SHAPES` with random bf16 weights drawn on the GPU and written as an
HF checkpoint (safetensors shards, to /dev/shm when it has room) with the generated tokenizer.
Embedding / LM-head rows past the tokenizer's 640 ids are zero, so greedy picks only tokens the
tokenizer can print (the LM head still multiplies the whole vocabulary).

    python3 benchmarks/gpu/common.py setup > /tmp/env.sh; . /tmp/env.sh
    python3 -m benchmarks.gpu.service_bench --shapes small,qwen2-1.5b      # -> service_gpu.json
    python3 -m benchmarks.gpu.service_bench --device cpu --shapes small --rates 1 --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "10")

import torch

from benchmarks.report import environment, write_report
from benchmarks.serving_bench import pct

MODEL_NAME = "bench"
PROMPTS = [
    "The quick brown fox",
    "pdserve serves",
    "1 2 3 4 5 6 7 8",
    "Once upon a time, in a land far away, there lived",
    "alpha beta gamma delta",
    "What is the capital of France?",
    "Prefill and decode run in different processes",
    "The history of the",
    "import torch\nx = torch",
    "Q: why is the sky blue?\nA:",
    "Tokens tokens tokens",
    "The end",
]


def log(msg: str) -> None:
    sys.stderr.write(f"[service_bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- models


def realistic_checkpoint(shape: str, out: Path, device: str, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights of `REALISTIC_SHAPES[shape]` in HF layout, the generated tokenizer."""
    from safetensors.torch import save_file

    from engine.testmodel import REALISTIC_SHAPES, make_test_model, random_stage

    cfg = REALISTIC_SHAPES[shape]
    t0 = time.perf_counter()
    # Tokenizer, config and generation files from the small generator (its weights are
    # rewritten below); then the config gets the real shape.
    make_test_model(out, family=cfg.family, seed=seed, num_hidden_layers=1)
    for f in out.glob("*.safetensors"):
        f.unlink()
    hf = json.loads((out / "config.json").read_text())
    tok_vocab = hf["vocab_size"]
    hf |= {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.family == "qwen2":
        hf["max_window_layers"] = cfg.num_hidden_layers
    if cfg.rope.rope_type != "default":
        hf["rope_scaling"] = {
            "rope_type": cfg.rope.rope_type,
            "factor": cfg.rope.factor,
            "low_freq_factor": cfg.rope.low_freq_factor,
            "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
        }
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    cfg = dataclasses.replace(cfg, torch_dtype="bfloat16")
    stage = random_stage(cfg, device=device, dtype=torch.bfloat16, seed=seed)
    t_draw = time.perf_counter()
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        # Rows past the tokenizer's ids: zero, so greedy never picks a token it cannot print.
        stage.embed_tokens.weight[tok_vocab:].zero_()
        if not cfg.tie_word_embeddings:
            stage.lm_head.weight[tok_vocab:].zero_()
        for name, t in stage.state_dict().items():
            if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            if name.startswith("layers.") or name.startswith(("embed_tokens.", "norm.")):
                name = "model." + name
            if ".qkv_proj." in name:
                for part, piece in zip(
                    ("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=False
                ):
                    weights[name.replace("qkv_proj", part)] = piece
            elif ".gate_up_proj." in name:
                for part, piece in zip(
                    ("gate_proj", "up_proj"), t.split([inter, inter]), strict=False
                ):
                    weights[name.replace("gate_up_proj", part)] = piece
            else:
                weights[name] = t
    # Shards of ~2 GiB, each copied to the host and written on its own.
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > 2 << 30:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {n: weights[n].detach().to("cpu", copy=True).contiguous() for n in names}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map |= dict.fromkeys(part, fname)
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    del weights, stage
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    t_end = time.perf_counter()
    info = {
        "shape": shape,
        "weights_GiB": round(total / 2**30, 2),
        "draw_s": round(t_draw - t0, 2),
        "write_s": round(t_end - t_draw, 2),
        "write_GB_s": round(total / 1e9 / max(t_end - t_draw, 1e-9), 2),
        "dir": str(out),
    }
    log(f"checkpoint {info}")
    return info


def model_root(need_bytes: int) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir():
        free = shutil.disk_usage(shm).free
        if free > 2 * need_bytes:
            return Path(tempfile.mkdtemp(prefix="pdserve-model-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="pdserve-model-"))


def make_model(shape: str, device: str) -> tuple[Path, dict[str, Any]]:
    if shape == "small":
        from engine.testmodel import make_test_model

        root = Path(tempfile.mkdtemp(prefix="pdserve-model-"))
        t0 = time.perf_counter()
        path = make_test_model(root / "small", family="llama", seed=0)
        return path, {"shape": "small", "write_s": round(time.perf_counter() - t0, 2)}
    from engine.testmodel import REALISTIC_SHAPES

    cfg = REALISTIC_SHAPES[shape]
    approx = 2 * (
        cfg.num_hidden_layers
        * (
            cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size + cfg.q_size)
            + 3 * cfg.hidden_size * cfg.intermediate_size
        )
        + cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    )
    root = model_root(approx)
    path = root / shape
    return path, realistic_checkpoint(shape, path, device)


# ---------------------------------------------------------------- HTTP client


def completion_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy completion of exactly `max_tokens` tokens (usage included when streamed)."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def complete(session: Any, base: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = completion_body(prompt, max_tokens, stream)
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {await resp.text()}")
        if not stream:
            data = await resp.json()
            return {
                "id": data["id"],
                "text": data["choices"][0]["text"],
                "tokens": data["usage"]["completion_tokens"],
            }
        text, tokens, rid = "", 0, None
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(str(data["error"]))
            rid = data.get("id", rid)
            for c in data.get("choices", []):
                text += c.get("text") or ""
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
        return {"id": rid, "text": text, "tokens": tokens}


async def greedy_outputs(base: str, prompts: list[str], max_tokens: int) -> list[dict]:
    import aiohttp

    out = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for p in prompts:  # one at a time: the same batch shapes in both modes
            plain = await complete(session, base, p, max_tokens, stream=False)
            streamed = await complete(session, base, p, max_tokens, stream=True)
            out.append(
                {
                    "prompt": p,
                    "text": plain["text"],
                    "tokens": plain["tokens"],
                    "streamed_text": streamed["text"],
                    "streamed_tokens": streamed["tokens"],
                }
            )
    return out


async def one_request(session: Any, base: str, rng: random.Random, out: dict) -> None:
    """serving_bench.one_request's mix, over aiohttp (the device image has no openai client)."""
    words = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
        for _ in range(rng.choice([8, 32, 96, 160]))
    )
    max_tokens = rng.choice([8, 32, 64])
    body = completion_body(words, max_tokens, stream=True)
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with session.post(f"{base}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {await resp.text()}")
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if data.get("choices"):
                    if first is None:
                        first = now
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    except Exception as exc:
        out["errors"].append(str(exc)[:200])
        return
    end = time.perf_counter()
    out["ttft"].append((first or end) - start)
    out["itl"].extend(gaps)
    out["e2e"].append(end - start)
    out["tokens"].append(tokens)


async def load(base: str, rate: float, duration: float, seed: int) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(seed)
    out: dict[str, list] = {"ttft": [], "itl": [], "e2e": [], "tokens": [], "errors": []}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        tasks = []
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            tasks.append(asyncio.ensure_future(one_request(s, base, rng, out)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {**out, "elapsed": elapsed, "requests": len(tasks)}


# ---------------------------------------------------------------- phases


def phase_sums(base: str) -> dict[str, tuple[float, float]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base}/metrics", timeout=15).read().decode()
    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("pdserve_request_phase_seconds_"):
                kind = sample.name.rsplit("_", 1)[1]
                if kind not in ("sum", "count"):
                    continue
                entry = sums.setdefault(sample.labels["phase"], [0.0, 0.0])
                entry[0 if kind == "sum" else 1] += sample.value
    return {k: (v[0], v[1]) for k, v in sums.items()}


def ray_logs() -> Path:
    try:
        import ray

        return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:
        return Path("/tmp/ray/session_latest/logs")


def log_lines(needle: str) -> list[str]:
    """Lines of this Ray session's process logs that contain `needle`."""
    lines = []
    logs = ray_logs()
    for f in [*logs.glob("*.err"), *logs.glob("*.out"), *logs.rglob("serve/*.log")]:
        with contextlib.suppress(OSError):
            lines += [ln for ln in f.read_text(errors="replace").splitlines() if needle in ln]
    return lines


def kv_path() -> dict[str, int]:
    """How the prefill stages' KV reached decode: the CUDA IPC fast path or Mooncake."""
    return {
        "cuda_ipc": len(log_lines("KV moves by CUDA IPC")),
        "fallback_to_mooncake": len(log_lines("unavailable, using Mooncake"))
        + len(log_lines("cannot export KV memory with CUDA IPC")),
    }


def first_token_line(rid: str | None) -> dict[str, Any] | None:
    """The decode replica's "first token" log line for `rid` (the last one if not found)."""
    logs = ray_logs()
    found: list[tuple[float, dict]] = []
    for f in list(logs.glob("*.err")) + list(logs.glob("*.out")) + list(logs.rglob("serve/*.log")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if "first token" not in text:
            continue
        for line in text.splitlines():
            if '"first token"' not in line and "first token" not in line:
                continue
            start = line.find("{")
            if start < 0:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line[start:])
                if "phases_ms" in rec:
                    found.append((f.stat().st_mtime, rec))
    if not found:
        return None
    if rid:
        for _, rec in found:
            if rid in str(rec.get("rid", "")) or str(rec.get("rid", "")) in rid:
                return rec
    return found[-1][1]


async def timed_request(base: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        body = completion_body(prompt, max_tokens, stream=True)
        ttft, rid = None, None
        async with session.post(f"{base}/v1/completions", json=body) as resp:
            async for line in resp.content:
                line = line.strip()
                if line.startswith(b"data: {"):
                    data = json.loads(line[6:])
                    rid = data.get("id", rid)
                    if ttft is None and data.get("choices"):
                        ttft = time.perf_counter() - t0
        return {
            "rid": rid,
            "ttft_ms": 1e3 * (ttft or float("nan")),
            "e2e_ms": 1e3 * (time.perf_counter() - t0),
        }


def timeline(base: str, prompt_words: int = 100) -> dict[str, Any]:
    """One request on the idle PD service: client TTFT, the log line, the metric deltas."""
    prompt = " ".join(["alpha", "beta", "gamma", "delta"] * (prompt_words // 4))
    asyncio.run(timed_request(base, prompt, 4))  # same shapes once, so nothing is cold
    time.sleep(0.5)
    before = phase_sums(base)
    req = asyncio.run(timed_request(base, prompt, 4))
    time.sleep(0.5)
    after = phase_sums(base)
    metric_ms = {
        p: round(1e3 * (after[p][0] - before.get(p, (0, 0))[0]), 3)
        for p in after
        if after[p][1] - before.get(p, (0, 0))[1] > 0
    }
    line = first_token_line(req["rid"])
    phases = (line or {}).get("phases_ms") or {
        **{k: v for k, v in metric_ms.items() if k in ("prealloc", "prefill_call", "join")},
        **{
            f"prefill.{k}": v
            for k, v in metric_ms.items()
            if k in ("bootstrap", "queue_wait", "forward", "kv_transfer")
        },
    }
    forward = phases.get("prefill.forward", float("nan"))
    decode_side = sum(phases.get(k, 0.0) for k in ("prealloc", "prefill_call", "join"))
    return {
        **req,
        "log_line_found": line is not None,
        "phases_ms": phases,
        "metric_phase_ms": metric_ms,
        "forward_ms": forward,
        "control_ms": round(decode_side - forward, 3),
        "ttft_minus_server_ms": round(req["ttft_ms"] - decode_side, 3),
    }


# ---------------------------------------------------------------- main


def deploy(config: Any, mode: str, name: str, port: int) -> tuple[str, float]:
    from ray import serve

    from deployments.app import build_service

    t0 = time.perf_counter()
    serve.run(build_service(config, mode), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}", time.perf_counter() - t0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    tput = sum(r["tokens"]) / r["elapsed"]
    return {
        "requests": r["requests"],
        "errors": len(r["errors"]),
        "ttft_p50_ms": 1e3 * pct(r["ttft"], 0.5),
        "ttft_p99_ms": 1e3 * pct(r["ttft"], 0.99),
        "itl_p50_ms": 1e3 * pct(r["itl"], 0.5),
        "itl_p99_ms": 1e3 * pct(r["itl"], 0.99),
        "e2e_p50_s": pct(r["e2e"], 0.5),
        "tok_s": tput,
    }


def app_config(model: Path, args: argparse.Namespace, mode: str) -> Any:
    """The service's config for `mode`. By default every engine process (each prefill stage, the
    decode replica, the colocated engine) takes `--gpu-frac` of the one GPU; `--stage-gpus`,
    `--decode-gpus` and the replica counts give them GPUs of their own (multi_gpu_service.py).
    A colocated replica is a decode replica that also prefills: `--decode-gpus` each."""
    from deployments.app import AppConfig

    cuda = args.device == "cuda"

    def gpus(each: float | None) -> float:
        return (args.gpu_frac if each is None else each) if cuda else 0

    return AppConfig(
        model=str(model),
        served_model_name=MODEL_NAME,
        pp_size=args.pp,
        dtype="auto" if cuda else "float32",
        device="auto" if cuda else "cpu",
        num_gpus_per_stage=gpus(args.stage_gpus),
        decode_num_gpus=gpus(args.decode_gpus),
        prefill_replicas=args.prefill_replicas,
        decode_replicas=args.decode_replicas if mode == "pd" else args.colocated_replicas,
        num_cpus_per_stage=1 if cuda else 0.5,
        decode_num_cpus=1 if cuda else 0.5,
        max_model_len=args.max_model_len,
        prefill_num_pages=args.prefill_pages,
        decode_num_pages=args.decode_pages,
    )


def engine_gpus(lines: list[str]) -> list[list[str]]:
    """The GPU ids Ray gave each engine process that logged `lines` ("actor drives cuda:<i>",
    cluster/gpu_visibility.py): whether stages and replicas landed on GPUs of their own."""
    found = []
    for line in lines:
        start = line.find("{")
        with contextlib.suppress(json.JSONDecodeError, ValueError):
            found.append([str(g) for g in json.loads(line[start:]).get("gpu_ids", [])])
    return sorted(found)


def saturated(before: dict[str, Any] | None, now: dict[str, Any], gain: float) -> bool:
    """A rate that served errors, or less than `gain` more tokens/s than the rate before it:
    raising the offered load further measures only the queue."""
    return now["errors"] > 0 or (before is not None and now["tok_s"] < (1 + gain) * before["tok_s"])


def run_shape(shape: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    from ray import serve

    cuda = args.device == "cuda"
    model, model_info = make_model(shape, "cuda" if cuda else "cpu")
    result: dict[str, Any] = {"shape": shape, "model": model_info, "modes": {}}
    prompts = PROMPTS[: args.prompts]
    for mode in ("pd", "colocated"):
        name = f"{shape}-{mode}".replace(".", "_")
        config = app_config(model, args, mode)
        log(f"{shape}: deploying {mode}")
        driving = set(log_lines("actor drives cuda:"))
        base, deploy_s = deploy(config, mode, name, port)
        log(f"{shape}: {mode} up in {deploy_s:.1f}s; greedy check")
        m: dict[str, Any] = {"deploy_s": round(deploy_s, 1)}
        m["engine_gpus"] = engine_gpus(
            [x for x in log_lines("actor drives cuda:") if x not in driving]
        )
        log(f"{shape}: {mode} engine processes on GPUs {m['engine_gpus']}")
        m["greedy"] = asyncio.run(greedy_outputs(base, prompts, args.max_tokens))
        if mode == "pd":
            m["kv_path"] = kv_path()
            log(f"{shape}: KV path (log lines) {m['kv_path']}")
        if mode == "pd" and not args.skip_timeline:
            m["timeline"] = timeline(base)
            log(f"{shape}: timeline {m['timeline']}")
        if args.rates:
            # Warm up at the highest rate: the batch sizes it reaches compile and capture
            # their kernels here, not inside the first measured run.
            warmup_rate = args.warmup_rate or max(args.rates)
            asyncio.run(load(base, warmup_rate, args.warmup, seed=99))
            m["load"] = {}
            before = None
            for rate in args.rates:
                log(f"{shape}: {mode} at {rate} req/s for {args.duration}s")
                raw = asyncio.run(load(base, rate, args.duration, seed=int(rate * 10)))
                m["load"][rate] = summarize(raw)
                log(f"{shape}: {mode} {rate} req/s: {m['load'][rate]}")
                if args.saturate and saturated(before, m["load"][rate], args.saturation_gain):
                    m["saturated_at"] = rate
                    log(f"{shape}: {mode} saturated at {rate} req/s; no higher rate")
                    break
                before = m["load"][rate]
        serve.delete(name)
        result["modes"][mode] = m
    pd, co = result["modes"]["pd"]["greedy"], result["modes"]["colocated"]["greedy"]
    mismatches = []
    for a, b in zip(pd, co, strict=False):
        same = (a["text"], a["tokens"]) == (b["text"], b["tokens"])
        streamed = a["streamed_text"] == a["text"] and b["streamed_text"] == b["text"]
        if not (same and streamed and a["tokens"] == args.max_tokens):
            mismatches.append({"prompt": a["prompt"], "pd": a, "colocated": b})
    result["greedy_equal"] = not mismatches
    result["greedy_mismatches"] = mismatches
    log(f"{shape}: greedy PD == colocated: {result['greedy_equal']} ({len(pd)} prompts)")
    if not args.keep_models and model_info.get("dir"):
        shutil.rmtree(Path(model_info["dir"]).parent, ignore_errors=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The options; multi_gpu_service.py starts from them with other defaults."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--shapes", default="small,qwen2-1.5b", help="small, qwen2-1.5b, llama3-8b")
    parser.add_argument("--rates", default="1,8", help="req/s, comma-separated; empty: no load")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--warmup-rate", type=float, default=None, help="default: the highest")
    parser.add_argument(
        "--saturate",
        action="store_true",
        help="per mode, stop raising the rate once one adds less than --saturation-gain "
        "tokens/s or serves errors",
    )
    parser.add_argument("--saturation-gain", type=float, default=0.1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--gpu-frac", type=float, default=0.25, help="GPUs per engine process")
    parser.add_argument("--stage-gpus", type=float, default=None, help="default: --gpu-frac")
    parser.add_argument(
        "--decode-gpus", type=float, default=None, help="per decode or colocated replica"
    )
    parser.add_argument("--prefill-replicas", type=int, default=1)
    parser.add_argument("--decode-replicas", type=int, default=1)
    parser.add_argument("--colocated-replicas", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--prefill-pages", type=int, default=1024)
    parser.add_argument("--decode-pages", type=int, default=2048)
    parser.add_argument("--skip-timeline", action="store_true")
    parser.add_argument("--keep-models", action="store_true")
    parser.add_argument("--name", default="service_gpu")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    return args


def main() -> None:
    run(parse(build_parser()))


def run(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
    """Ray and Serve on this machine (all its GPUs), every shape in turn, then the report
    (`extra` goes into its JSON)."""
    shapes = [s for s in args.shapes.split(",") if s]

    from deployments.serve_cli import set_ray_environment

    set_ray_environment("disabled")
    import ray
    from ray import serve

    t0 = time.perf_counter()
    ray.init(
        address="local",  # a cluster of its own, even where others run on this machine
        num_cpus=max(8, os.cpu_count() or 1),
        num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    log(f"ray + serve up in {time.perf_counter() - t0:.1f}s")
    results = []
    failures = {}
    try:
        for shape in shapes:
            try:
                results.append(run_shape(shape, args, port))
            except Exception as exc:  # the next shape still runs
                import traceback

                traceback.print_exc()
                failures[shape] = f"{type(exc).__name__}: {exc}"[:2000]
                with contextlib.suppress(Exception):
                    for app in list(serve.status().applications):
                        serve.delete(app)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    report(results, failures, args, extra)


def report(
    results: list[dict],
    failures: dict[str, str],
    args: argparse.Namespace,
    extra: dict[str, Any] | None = None,
) -> None:
    rows = []
    for r in results:
        modes = r["modes"]
        for rate in args.rates:
            co = modes["colocated"].get("load", {}).get(rate)
            for mode in ("pd", "colocated"):
                s = modes[mode].get("load", {}).get(rate)
                if not s:  # a mode that saturated below this rate
                    continue
                rows.append(
                    {
                        "shape": r["shape"],
                        "rate": rate,
                        "mode": mode,
                        **{
                            k: s[k]
                            for k in (
                                "requests",
                                "errors",
                                "ttft_p50_ms",
                                "ttft_p99_ms",
                                "itl_p50_ms",
                                "itl_p99_ms",
                                "tok_s",
                            )
                        },
                        "ttft_p50_x": s["ttft_p50_ms"] / co["ttft_p50_ms"] if co else None,
                        "itl_p50_x": s["itl_p50_ms"] / co["itl_p50_ms"] if co else None,
                        "tok_s_x": s["tok_s"] / co["tok_s"] if co else None,
                        "greedy_eq": r["greedy_equal"],
                    }
                )
    print()
    for r in results:
        print(
            f"== {r['shape']}: model {r['model']}; greedy PD == colocated over "
            f"{len(r['modes']['pd']['greedy'])} prompts x {args.max_tokens} tokens: "
            f"{r['greedy_equal']}; deploy s: pd {r['modes']['pd']['deploy_s']}, "
            f"colocated {r['modes']['colocated']['deploy_s']}"
        )
        print(
            "   engine processes' GPUs (Ray ids): "
            + "; ".join(f"{m} {r['modes'][m].get('engine_gpus')}" for m in ("pd", "colocated"))
            + "; saturated at req/s: "
            + "; ".join(f"{m} {r['modes'][m].get('saturated_at')}" for m in ("pd", "colocated"))
        )
        for mm in r["greedy_mismatches"][:3]:
            print(f"   MISMATCH {json.dumps(mm)[:600]}")
        t = r["modes"]["pd"].get("timeline")
        if t:
            print(
                f"   one request (PD, idle, ~100-word prompt): client TTFT {t['ttft_ms']:.1f} ms; "
                f"forward {t['forward_ms']} ms, control plane {t['control_ms']} ms "
                f"(decode-side phases minus prefill forward), client/HTTP/ingress "
                f"{t['ttft_minus_server_ms']} ms; log line found: {t['log_line_found']}"
            )
            print(f"   phases_ms {json.dumps(t['phases_ms'])}")
            print(f"   KV path (log lines, session so far) {r['modes']['pd'].get('kv_path')}")
            print(f"   metric deltas ms {json.dumps(t['metric_phase_ms'])}")
    for shape, why in failures.items():
        print(f"== {shape}: FAILED {why[:500]}")
    extra = {
        **(extra or {}),
        "results": results,
        "failures": failures,
        "args": {k: v for k, v in vars(args).items()},
    }
    if rows:
        write_report(args.name, rows, list(rows[0]), extra)
    else:
        from benchmarks.report import results_dir

        out = results_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(
            json.dumps({"environment": environment(), "rows": [], **extra}, indent=2, default=str)
        )
        print(f"wrote {out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
