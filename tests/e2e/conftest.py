"""A running pdserve (ingress, decode, prefill with PP stages) on the test Ray cluster."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from deployments.app import AppConfig, build_app

os.environ.setdefault("GLOG_minloglevel", "1")

API_KEY = "test-key"
_APP_NUMBERS = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> Iterator[int]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def app_config(model_dir, pp: int, **overrides: Any) -> AppConfig:
    return AppConfig(
        model=str(model_dir),
        served_model_name="pdserve-test",
        pp_size=pp,
        dtype="float32",
        device="cpu",
        num_cpus_per_stage=0.5,
        prefill_num_pages=512,
        decode_num_pages=1024,
        max_batched_tokens=64,  # long prompts take several prefill chunks
        api_key=API_KEY,
        **overrides,
    )


@pytest.fixture(scope="module")
def deploy(serve_port) -> Iterator[Callable[[AppConfig], str]]:
    """Deploy an app config under its own route; returns its base URL."""
    from ray import serve

    names: list[str] = []

    def run(config: AppConfig) -> str:
        # Unique in the session: the metrics directory remembers a deleted app's processes for
        # a while, so a name reused by a later module would list them with its own.
        name = f"pdserve-pp{config.pp_size}-{next(_APP_NUMBERS)}"
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        names.append(name)
        return f"http://127.0.0.1:{serve_port}/{name}"

    yield run
    for name in names:
        serve.delete(name)
