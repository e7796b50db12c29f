"""Shared fixtures: generated checkpoints, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.testmodel import make_test_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("llama"), family="llama", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("qwen2"), family="qwen2", seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, llama_dir: Path, qwen2_dir: Path) -> Path:
    return {"llama": llama_dir, "qwen2": qwen2_dir}[request.param]
