"""Shared checks for the launch configs: a Serve config must validate and build a pdserve app."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).parents[2]


def check_serve_config(data: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """What `serve deploy` checks, then the app's import path imports and builds an app.

    The config names a model path on cluster nodes; the build uses the generated test model
    in its place. Returns the app's args as the config wrote them.
    """
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import AppConfig

    ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    args = {**app["args"], "model": str(model_dir)}
    AppConfig.model_validate(args)  # every field is one AppConfig knows, with a valid value
    assert builder(args) is not None
    return app["args"]
