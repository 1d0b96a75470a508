"""Secrets held in option objects never reach logs or printed settings through ``repr``."""

from __future__ import annotations

from backends.server.config import InstanceConfig
from backends.upstream.http import HttpOptions


def test_upstream_options_hide_the_control_token_and_api_key() -> None:
    options = HttpOptions(control_token="ctl-s3cret", api_key="key-s3cret")
    assert options.control_token == "ctl-s3cret"
    assert "s3cret" not in repr(options)


def test_backend_instance_config_hides_the_control_token() -> None:
    config = InstanceConfig(device="h100-sxm", model="llama-3.1-8b", control_token="ctl-s3cret")
    assert config.control_token == "ctl-s3cret"
    assert "s3cret" not in repr(config)
