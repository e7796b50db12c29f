"""Where pdserve keeps what it fetches or builds on a machine (models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PDSERVE_CACHE`, else `~/.cache/pdserve`."""
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
