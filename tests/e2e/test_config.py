"""The service's config paths: a YAML file with CLI overrides, and a Serve config file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from deployments.app import AppConfig, app_builder
from deployments.serve_cli import load_config, usage_text

EXAMPLE = Path(__file__).parents[2] / "examples" / "serve_config.yaml"


def test_yaml_config_with_flag_overrides(tmp_path, llama_dir) -> None:
    path = tmp_path / "pdserve.yaml"
    path.write_text(yaml.safe_dump({"model": str(llama_dir), "pp_size": 4, "port": 9000}))
    args = argparse.Namespace(
        config=str(path), model=None, pp_size=2, host=None, port=None, api_key="k"
    )
    config = load_config(args)
    assert (config.pp_size, config.port, config.api_key) == (2, 9000, "k")
    assert config.prefill().pp_size == 2 and config.decode().num_prefill_stages == 2
    text = usage_text(config)
    assert "Authorization: Bearer k" in text and ":9000/v1" in text


def test_missing_model_is_a_clear_error() -> None:
    args = argparse.Namespace(
        config=None, model=None, pp_size=None, host=None, port=None, api_key=None
    )
    with pytest.raises(ValueError, match="no model"):
        load_config(args)


def test_example_serve_config_is_valid_and_builds(llama_dir) -> None:
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(EXAMPLE.read_text())
    ServeDeploySchema.parse_obj(data)  # what `serve deploy` checks
    args = {**data["applications"][0]["args"], "model": str(llama_dir)}
    AppConfig.model_validate(args)
    assert app_builder(args) is not None
