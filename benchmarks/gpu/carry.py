"""Build what a lent GPU machine lacks to run the whole service, small enough to carry.

The device machine (Python 3.12, CUDA torch, no internet) has no Ray, Serve, FastAPI, uvicorn,
pydantic or Mooncake, and a `run` call carries at most 64 MiB of working tree. This downloads
the wheels for Python 3.12 from the package index and trims the two large ones:

- ray: without `ray/jars` (Java workers, 31 MiB compressed), `ray/rllib`, `ray/llm` and the
  dashboard's web client; the raylet, GCS server and `_raylet.so` with their symbols stripped;
- mooncake-transfer-engine-cuda13: `mooncake/engine.so` and only what it links (readelf
  NEEDED, resolved through its RPATH), plus the package's Python files; not `_store`,
  `mooncake_master`, `mooncake_client`, `libmooncake_pg*`, `_ep`, the bench.

Each trimmed wheel's RECORD lists exactly the files it keeps. Output: `.whl/` (wheels) and
`.debs/` (Debian's libibverbs1 and friends, which `mooncake/engine.so` links), both ignored by
git; `python3 benchmarks/gpu/common.py setup` installs them on the device.

    python3 benchmarks/gpu/carry.py            # -> .whl/ .debs/, prints sizes
    # then on the device: carry [".whl", ".debs"]

`python3 benchmarks/gpu/carry.py probe --python-version 3.11` builds the same set for this
machine's Python in a venv that sees only the device image's packages (emulated by links into
this venv's site-packages) plus the carried ones: a CPU dry run there proves the set complete.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MIB = 64

# What the service needs beyond the device image (KINDS.md lists the image's packages), with
# the versions this project's venv runs. Their own needs are in the image (anyio, h11, click,
# annotated-doc, attrs, numpy, pyyaml, tqdm, msgpack, protobuf, grpcio, aiohttp, requests...).
PACKAGES = [
    "ray==2.60.0",
    "mooncake-transfer-engine-cuda13==0.3.14",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "opentelemetry-api==1.45.2",  # fastapi imports it
    # Serve imports it at start; 1.60 checks no grpcio/protobuf versions (the newer ones insist
    # on a grpcio at least as new as themselves, and the image's is not pinned here)
    "grpcio-reflection==1.60.0",
    # ray core's own requirement, absent from the image
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    # engine.gguf
    "gguf==0.19.0",
]
DEBS = [
    "libibverbs1",
    "libnl-3-200",
    "libnl-route-3-200",
    "ibverbs-providers",
    "libnuma1",
    "libcurl4",
    "libnghttp2-14",
    "libssh2-1",
    "librtmp1",
    "libpsl5",
    "libbrotli1",
    "libldap-2.5-0",
    "libsasl2-2",
]
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/dashboard/client/build/")
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")
MOONCAKE_ROOT = "mooncake/engine.so"

# The device image's Python packages (KINDS.md, read 2026-11-17), for `probe`.
IMAGE = set(
    [
        "absl-py",
        "accelerate",
        "aiofiles",
        "aiohappyeyeballs",
        "aiohttp",
        "aiosignal",
        "annotated-doc",
        "anyio",
        "attrs",
        "certifi",
        "charset-normalizer",
        "click",
        "cloudpickle",
        "colorama",
        "filelock",
        "frozenlist",
        "fsspec",
        "grpcio",
        "h11",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "idna",
        "jinja2",
        "markupsafe",
        "msgpack",
        "multidict",
        "mpmath",
        "networkx",
        "numpy",
        "packaging",
        "pillow",
        "pip",
        "platformdirs",
        "prometheus-client",
        "propcache",
        "protobuf",
        "psutil",
        "pyyaml",
        "regex",
        "requests",
        "safetensors",
        "setuptools",
        "six",
        "sympy",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
        "typing-extensions",
        "urllib3",
        "uvloop",
        "wrapt",
        "yarl",
        "pluggy",
        "iniconfig",
        "pytest",
        "pytest-timeout",
        "hypothesis",
        "sortedcontainers",
        "pygments",
        "rich",
        "markdown-it-py",
        "mdurl",
        "typer",
        "shellingham",
        "python-dateutil",
        "pyparsing",
    ]
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def rewrite_wheel(src: Path, dest: Path, keep, transform=None) -> None:
    """Copy wheel `src` to `dest` with only the members `keep(name)` accepts (RECORD rewritten;
    `transform(name, bytes)` may change a member's bytes)."""
    with zipfile.ZipFile(src) as zin:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
            for info in zin.infolist():
                name = info.filename
                if name == record_name or not keep(name):
                    continue
                data = zin.read(name)
                if transform is not None:
                    data = transform(name, data)
                out = zipfile.ZipInfo(name, info.date_time)
                out.external_attr = info.external_attr
                out.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(out, data)
                rows.append(_record_line(name, data))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows([*rows, [record_name, "", ""]])
            zout.writestr(record_name, buf.getvalue())


def _strip(name: str, data: bytes) -> bytes:
    if name not in RAY_STRIP:
        return data
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
        return Path(f.name).read_bytes()
    finally:
        os.unlink(f.name)


def trim_ray(src: Path, dest: Path) -> None:
    rewrite_wheel(src, dest, lambda n: not n.startswith(RAY_DROP), _strip)


def mooncake_closure(src: Path) -> set[str]:
    """`mooncake/engine.so` and the wheel's libraries it loads, through NEEDED and RPATH."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as z:
        libs = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
        z.extractall(tmp, members=libs)
        by_name = {}
        for n in libs:  # engine.so's RPATH: $ORIGIN first, then the .libs folder
            by_name.setdefault(Path(n).name, []).append(n)
        keep, todo = set(), [MOONCAKE_ROOT]
        while todo:
            member = todo.pop()
            if member in keep:
                continue
            keep.add(member)
            out = subprocess.run(
                ["readelf", "-d", str(Path(tmp) / member)], capture_output=True, text=True
            ).stdout
            for needed in re.findall(r"NEEDED.*\[(.+)\]", out):
                found = sorted(by_name.get(needed, []), key=lambda n: not n.startswith("mooncake/"))
                if found:
                    todo.append(found[0])
        return keep


def trim_mooncake(src: Path, dest: Path) -> None:
    libs = mooncake_closure(src)

    def keep(name: str) -> bool:
        if name.endswith(".py") or ".dist-info/" in name:
            return True
        return name in libs

    rewrite_wheel(src, dest, keep)


def download(packages: list[str], python_version: str, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    plat = []
    for p in (
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ):
        plat += ["--platform", p]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *plat,
            "-d",
            str(into),
            *packages,
        ],
        check=True,
    )


def build(dest: Path, python_version: str, packages: list[str]) -> list[Path]:
    cache = Path(tempfile.gettempdir()) / f"pdserve-carry-{python_version}"
    download(packages, python_version, cache)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    wanted = {_norm(re.split(r"[=<>]", p)[0]) for p in packages}
    out = []
    for whl in sorted(cache.glob("*.whl")):
        dist = _norm(whl.name.split("-")[0])
        if dist not in wanted:
            continue
        target = dest / whl.name
        if dist == "ray":
            trim_ray(whl, target)
        elif dist.startswith("mooncake-transfer-engine"):
            trim_mooncake(whl, target)
        else:
            shutil.copy2(whl, target)
        out.append(target)
    return out


def fetch_debs(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in dest.glob("*.deb")}
    missing = [d for d in DEBS if d not in have]
    for cached in (ROOT.parent / "main" / ".debs").glob("*.deb"):  # an earlier session's
        if cached.name.split("_")[0] in missing:
            shutil.copy2(cached, dest / cached.name)
            missing.remove(cached.name.split("_")[0])
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=dest, check=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def repo_bytes() -> int:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def main_build(args: argparse.Namespace) -> None:
    wheels = build(ROOT / ".whl", args.python_version, PACKAGES)
    fetch_debs(ROOT / ".debs")
    total = 0
    for w in wheels:
        total += w.stat().st_size
        print(f"{mib(w.stat().st_size):>10}  .whl/{w.name}")
    debs = sum(p.stat().st_size for p in (ROOT / ".debs").glob("*.deb"))
    repo = repo_bytes()
    print(f"{mib(total):>10}  wheels ({len(wheels)})")
    print(f"{mib(debs):>10}  .debs")
    print(f"{mib(repo):>10}  the repo (tracked and untracked, not ignored)")
    print(
        f"{mib(total + debs + repo):>10}  travels with carry ['.whl', '.debs'] (limit {LIMIT_MIB} MiB)"
    )
    if total + debs + repo > LIMIT_MIB * 2**20:
        sys.exit("over the limit")


def main_probe(args: argparse.Namespace) -> None:
    """A venv of this machine's Python that sees the image's packages and the carried set only."""
    venv = Path(args.venv)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    image = venv / "image"
    image.mkdir()
    site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in IMAGE:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            if top.endswith((".dist-info", "..")) or top == "__pycache__" or top.startswith(".."):
                continue
            src = site / top
            if src.exists() and not (image / top).exists():
                (image / top).symlink_to(src)
        info = Path(dist._path)  # type: ignore[attr-defined]
        if not (image / info.name).exists():
            (image / info.name).symlink_to(info)
    # Mooncake's CPU build stands in for the CUDA one on this machine.
    packages = [p for p in PACKAGES if not p.startswith("mooncake")]
    packages.append("mooncake-transfer-engine-non-cuda==0.3.13.post1")
    wheels = build(venv / "whl", args.python_version, packages)
    carried = venv / "carried"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            str(carried),
            *map(str, wheels),
        ],
        check=True,
    )
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    pth = venv / "lib" / py / "site-packages" / "probe.pth"
    pth.write_text(f"{carried}\n{image}\n")
    print(f"probe venv: {venv}/bin/python (image packages linked, {len(wheels)} carried wheels)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", nargs="?", default="build", choices=("build", "probe"))
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--venv", default="/tmp/pdserve-probe")
    args = parser.parse_args()
    {"build": main_build, "probe": main_probe}[args.what](args)
