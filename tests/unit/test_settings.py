"""Gateway configuration (gateway/settings.py): parsing, cross-checks, error paths, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.emulator.catalog import Catalog
from backends.emulator.timing import PipelineConstants
from gateway.cli import main as cli_main
from gateway.policies import POLICIES
from gateway.settings import ConfigError, EmulatedWorker, Settings, load_settings, parse_settings
from tests.helpers import config, pool

CONFIG = Path(Catalog.default_dir())
KNOWN_DEVICES = sorted(p.stem for p in (CONFIG / "devices").glob("*.yaml"))


def parse(data: Any, catalog: Catalog) -> Settings:
    return parse_settings(data, catalog=catalog, policies=set(POLICIES))


def error_of(data: Any, catalog: Catalog) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, catalog)
    return str(info.value)


def test_embedded_default_config_parses() -> None:
    s = load_settings(policies=set(POLICIES))
    assert s.models
    raw = yaml.safe_load((CONFIG / "default.yaml").read_text())
    assert [m.name for m in s.models] == [m["name"] for m in raw["models"]]
    for m in s.models:
        for role, p in m.pools.items():
            assert p.policy in POLICIES, (m.name, role)
    m0 = s.models[0]
    assert m0.mode == "disaggregated"
    assert set(m0.pools) == {"prefill", "decode"}
    assert s.server.port == raw["server"]["port"]


def test_embedded_default_answers_overload_with_429_at_its_decode_capacity() -> None:
    """The embedded default caps requests in flight at what its decode workers hold at once
    (a pipeline's slots, an HBM engine's batch cap), with as many again queued: beyond that,
    429 with Retry-After instead of waiting in the workers until the deadline (504)."""
    catalog = Catalog.load()
    s = load_settings(policies=set(POLICIES))
    decode = s.models[0].pools["decode"]
    held = 0
    for w in decode.workers:
        assert isinstance(w, EmulatedWorker)
        dep = catalog.deployment(w.device, s.models[0].name, dtype=w.dtype)
        c = dep._constants
        per = c.slots if isinstance(c, PipelineConstants) else dep.engine.max_num_seqs
        held += per * w.replicas
    assert held == 240
    assert decode.max_in_flight == held
    assert decode.max_queue == held


def test_helper_config_parses(catalog: Catalog) -> None:
    s = parse(config(), catalog)
    assert s.model("llama-3.1-8b") is not None
    assert s.model("nope") is None
    agg = parse(config(mode="aggregated"), catalog)
    assert set(agg.models[0].pools) == {"aggregated"}


def test_unknown_device_error_names_yaml_path_and_known_devices(catalog: Catalog) -> None:
    msg = error_of(config(decode=pool("h1000")), catalog)
    assert "models[0].pools.decode.workers[0].device: unknown device 'h1000'" in msg
    for name in KNOWN_DEVICES:
        assert name in msg


def test_unknown_policy(catalog: Catalog) -> None:
    msg = error_of(config(prefill=pool("h100-sxm", policy="random_walk")), catalog)
    assert "models[0].pools.prefill.policy: unknown policy 'random_walk'" in msg
    for name in POLICIES:
        assert name in msg


def test_policy_names_not_checked_without_a_policy_set(catalog: Catalog) -> None:
    data = config(prefill=pool("h100-sxm", policy="random_walk"))
    s = parse_settings(data, catalog=catalog, policies=None)
    assert s.models[0].pools["prefill"].policy == "random_walk"


def test_unknown_kv_link(catalog: Catalog) -> None:
    data = config()
    data["models"][0]["pools"]["prefill"]["kv_link"] = "smoke_signals"
    msg = error_of(data, catalog)
    assert "models[0].pools.prefill.kv_link: unknown link 'smoke_signals'" in msg
    assert "roce_200g" in msg


def test_unknown_model_profile(catalog: Catalog) -> None:
    msg = error_of(config(name="gpt-9"), catalog)
    assert "models[0].profile: unknown model 'gpt-9'" in msg
    ok = parse(config(name="my-llama", profile="llama-3.1-8b"), catalog)
    assert ok.models[0].profile_name == "llama-3.1-8b"


def test_disaggregated_without_decode_pool(catalog: Catalog) -> None:
    data = config()
    del data["models"][0]["pools"]["decode"]
    msg = error_of(data, catalog)
    assert "models[0]" in msg
    assert "missing ['decode']" in msg


def test_duplicate_model_names(catalog: Catalog) -> None:
    data = config()
    data["models"].append(config()["models"][0])
    msg = error_of(data, catalog)
    assert "model names must be unique" in msg
    assert "llama-3.1-8b" in msg


def test_deployment_too_small_names_the_worker_path(catalog: Catalog) -> None:
    data = config(name="llama-3.1-405b", prefill=pool("h100-sxm"), decode=pool("h200-sxm", tp=8))
    msg = error_of(data, catalog)
    assert "models[0].pools.prefill.workers[0]: llama-3.1-405b (bf16) does not fit" in msg
    assert "decode" not in msg  # 8 × H200 holds it


def test_extra_unknown_key_rejected_with_path(catalog: Catalog) -> None:
    data = config(prefill=pool("h100-sxm", colour="blue"))
    msg = error_of(data, catalog)
    assert "models[0].pools.prefill.workers[0].colour" in msg
    assert "Extra inputs are not permitted" in msg


def test_bad_value_type_has_path(catalog: Catalog) -> None:
    msg = error_of(config(server={"port": 70000}), catalog)
    assert "server.port" in msg


def test_several_problems_are_reported_together(catalog: Catalog) -> None:
    data = config(prefill=pool("h1000"), decode=pool("h2000"))
    msg = error_of(data, catalog)
    assert "unknown device 'h1000'" in msg
    assert "unknown device 'h2000'" in msg


def test_missing_tokenizer_file(catalog: Catalog, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    msg = error_of(config(tokenizer=str(missing)), catalog)
    assert f"models[0].tokenizer: no such file '{missing}'" in msg


def test_load_settings_from_file_prefixes_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(decode=pool("h1000"))))
    with pytest.raises(ConfigError) as info:
        load_settings(path, policies=set(POLICIES))
    assert str(info.value).startswith(f"{path}: ")


def test_load_settings_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_settings(path)


def test_cli_serve_with_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(decode=pool("h1000"))))
    rc = cli_main(["serve", "--config", str(path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config error" in err
    assert "unknown device 'h1000'" in err


def test_cli_serve_with_missing_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(["serve", "--config", str(tmp_path / "absent.yaml")])
    assert rc == 2
    assert "config error" in capsys.readouterr().err
