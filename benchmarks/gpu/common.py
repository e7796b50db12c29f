"""What the transport GPU benchmarks share: setting up a bare GPU machine, and the report.

A lent GPU machine has no internet, no Ray and no Mooncake. `python3 benchmarks/gpu/common.py
setup` installs the wheels brought along in `.whl/` into /tmp/site, unpacks the Debian
packages in `.debs/` (libibverbs1 and friends, which the Mooncake wheel links against) and
links only the libraries the machine lacks into one directory; it prints the `export` lines to
`eval`. Reports: `benchmarks.report.write_report` (JSON to `$OUT` when set).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


if __name__ == "__main__":
    if sys.argv[1:] == ["setup"]:
        sys.stdout.write(setup())
    else:
        sys.exit("usage: common.py setup")
