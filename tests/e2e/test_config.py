"""The service's config file: a YAML AppConfig with CLI overrides (Serve configs: tests/deploy)."""

from __future__ import annotations

import argparse
import os

import pytest
import yaml

from deployments.serve_cli import load_config, usage_text


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


@pytest.mark.parametrize(("env", "expected"), [(None, "disabled"), ("token", "token")])
def test_serve_sets_the_ray_auth_mode_on_purpose(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str
) -> None:
    """Start and deploy agree: the mode goes into this process's environment before Ray
    starts, never left to whether ~/.ray/auth_token happens to exist."""
    from deployments.cli import build_parser
    from deployments.serve_cli import set_ray_environment

    if env is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", env)
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.ray_auth_mode == expected
    monkeypatch.setenv("RAY_AUTH_MODE", "unset")  # undone after the test, as are these:
    monkeypatch.setenv("RAY_SERVE_SLOW_STARTUP_WARNING_S", "2")
    monkeypatch.setenv("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "2")
    set_ray_environment(args.ray_auth_mode)
    assert os.environ["RAY_AUTH_MODE"] == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray-auth-mode", "maybe"])


def test_serve_takes_a_mode_and_says_which(tmp_path, llama_dir) -> None:
    from deployments.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "m"]).mode == "pd"
    args = build_parser().parse_args(["serve", "--model", str(llama_dir), "--mode", "colocated"])
    assert args.mode == "colocated"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mode", "both"])
    for attr in ("config", "pp_size", "host", "port", "api_key"):
        setattr(args, attr, getattr(args, attr, None))
    config = load_config(args)
    assert "(colocated)" in usage_text(config, "colocated")
    assert "(prefill PP=2, decode)" in usage_text(config, "pd")
