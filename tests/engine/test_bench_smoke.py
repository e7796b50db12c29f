"""`make bench`'s engine benchmarks run end to end (tiny sizes, one round) and write their
tables: nothing else runs them before a user does. What they measure is checked by running them
(`make bench`), not here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module,args,rows",
    [
        (
            "benchmarks.engine_bench",
            ["--rounds", "1", "--prefill-tokens", "32", "--decode-tokens", "3"],
            {"engine": 4, "engine_dtypes": 4},
        ),
        (
            "benchmarks.real_model_bench",
            ["--rounds", "1", "--prefill-tokens", "16", "--decode-tokens", "3"],
            {"real_model": 4},
        ),
    ],
)
def test_the_engine_benchmarks_run_and_report(tmp_path, module, args, rows):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {report.stem for report in tmp_path.glob("*.json")} == set(rows)
    for name, count in rows.items():
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(data["rows"]) == count
        # A number, not a figure: at these sizes the decode time (N tokens minus 1) is noise
        # and may even come out negative on a busy machine.
        assert all(math.isfinite(row["ratio"]) for row in data["rows"])
