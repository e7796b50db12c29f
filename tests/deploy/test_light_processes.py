"""Processes that hold no model must not load torch: the ingress and the prefill controller
each stay near a bare Serve replica's memory (~150 MB) rather than ~550 MB."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["deployments.ingress", "deployments.prefill", "deployments.prefill_controller"],
)
def test_a_role_without_a_model_imports_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'mooncake') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"
