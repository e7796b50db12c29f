"""Printing a results table and writing it as JSON: shared by every benchmark."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def results_dir() -> Path:
    """benchmarks/results/, or `$OUT` where a lent GPU machine collects what comes back."""
    out = os.environ.get("OUT")
    return Path(out) if out else RESULTS_DIR


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "sms": props.multi_processor_count,
        }
    return info


def write_report(
    name: str, rows: list[dict[str, Any]], columns: list[str], extra: dict | None = None
) -> Path:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [
        "  ".join(c.ljust(widths[c]) for c in columns),
        "  ".join("-" * widths[c] for c in columns),
    ]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.json"
    payload = {"environment": environment(), "rows": rows, **(extra or {})}
    out.write_text(json.dumps(payload, indent=2, default=str))
    sys.stdout.write(f"wrote {out}\n")
    sys.stdout.flush()
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):  # three significant digits below 10 (ratios, ms), else one decimal
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)
