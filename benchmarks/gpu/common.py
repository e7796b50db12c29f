"""What the transport GPU benchmarks share: setting up a bare GPU machine, and the report.

A lent GPU machine has no internet, no Ray and no Mooncake. `python3 benchmarks/gpu/common.py
setup` installs the wheels brought along in `.whl/` into /tmp/site, unpacks the Debian
packages in `.debs/` (libibverbs1 and friends, which the Mooncake wheel links against) and
links only the libraries the machine lacks into one directory; it prints the `export` lines to
`eval`. Reports print a table and write JSON to `$OUT` when set, else benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SITE = Path("/tmp/site")
LIBS = Path("/tmp/pdserve-libs")


def setup() -> str:
    """Install carried wheels and missing shared libraries; return the shell exports."""
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run(
            [*pip, "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels],
            check=True,
            stdout=sys.stderr,
        )
    unpacked = Path("/tmp/pdserve-debs")
    for deb in sorted((ROOT / ".debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    have = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    known = {line.split()[0] for line in have.splitlines()[1:] if line.strip()}
    LIBS.mkdir(parents=True, exist_ok=True)
    linked = []
    for lib in sorted(unpacked.rglob("*.so.*")) if unpacked.exists() else []:
        soname = re.fullmatch(r"lib.+\.so\.\d+", lib.name) is not None
        if soname and lib.name not in known and "/libibverbs/" not in str(lib):
            target = LIBS / lib.name
            if not target.exists():
                target.symlink_to(lib.resolve())
            linked.append(lib.name)
    print(
        f"setup: wheels {len(wheels)}, libraries linked: {' '.join(linked) or 'none'}",
        file=sys.stderr,
    )
    ld = ":".join(p for p in (str(LIBS), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    py = ":".join(p for p in (str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return f"export LD_LIBRARY_PATH={ld}\nexport PYTHONPATH={py}\n"


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
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


def results_dir() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else ROOT / "benchmarks" / "results"


def write_report(
    name: str, rows: list[dict[str, Any]], columns: list[str], extra: dict | None = None
) -> Path:
    """Print `rows` as a table (only `columns`) and write all of it as JSON."""
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
    payload = {"environment": device_info(), "rows": rows, **(extra or {})}
    out.write_text(json.dumps(payload, indent=2, default=str))
    sys.stdout.write(f"wrote {out}\n")
    sys.stdout.flush()
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


if __name__ == "__main__":
    if sys.argv[1:] == ["setup"]:
        sys.stdout.write(setup())
    else:
        sys.exit("usage: common.py setup")
