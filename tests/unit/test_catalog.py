"""The device/model/link catalog (backends/emulator/catalog.py): loading, sizing, errors,
references."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.emulator.catalog import Catalog, EngineKnobs, HbmDevice, PipelineDevice
from backends.emulator.timing import StepShape
from backends.errors import CatalogError

CONFIG = Path(Catalog.default_dir())
DEVICE_FILES = sorted(p.stem for p in (CONFIG / "devices").glob("*.yaml"))
MODEL_FILES = sorted(p.stem for p in (CONFIG / "models").glob("*.yaml"))

KV_BYTES_BF16 = {
    "llama-3.1-8b": 131072,
    "llama-3.1-70b": 327680,
    "llama-3.1-405b": 516096,
    "llama-2-70b": 327680,
    "mixtral-8x7b": 131072,
    "qwen3-30b-a3b": 98304,
    "qwen3-235b-a22b": 192512,
    "deepseek-v3": 70272,
    "qwen3-32b": 262144,  # 2 x 64 x 8 x 128 x 2
    "gpt-oss-120b": 36864,  # 2 x 18 full-attention layers x 8 x 64 x 2 (windowed layers apart)
    "minimax-m2.5": 253952,  # 2 x 62 x 8 x 128 x 2
    "qwen3.5-397b-a17b": 30720,  # 2 x 15 attention layers x 2 x 256 x 2
    "kimi-k2.5": 70272,  # 61 x (512 + 64) x 2
    "glm-5": 100152,  # 78 x (512 + 64) x 2 latent + 78 x (128 + 4) FP8 indexer keys and scales
}


def _yaml(rel: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIG / rel).read_text())
    return data


# -- loading ------------------------------------------------------------------------------


def test_every_config_file_is_in_the_catalog(catalog: Catalog) -> None:
    assert DEVICE_FILES, "no device profiles shipped"
    assert MODEL_FILES, "no model profiles shipped"
    assert sorted(catalog.devices) == DEVICE_FILES
    assert sorted(catalog.models) == MODEL_FILES
    assert sorted(catalog.links) == sorted(_yaml("links.yaml"))


def test_reference_kv_table_covers_every_model() -> None:
    assert sorted(KV_BYTES_BF16) == MODEL_FILES


@pytest.mark.parametrize(("model", "expected"), sorted(KV_BYTES_BF16.items()))
def test_kv_bytes_per_token_bf16_reference(catalog: Catalog, model: str, expected: int) -> None:
    m = catalog.model(model)
    assert m.kv_bytes_per_token("bf16") == expected
    # 8-bit KV halves it (a sparse-attention indexer's FP8 key cache stays as it is); the
    # deployment reports the same figure.
    index = m.index_kv_bytes_per_token
    assert m.kv_bytes_per_token("fp8") == (expected - index) / 2 + index


@pytest.mark.parametrize("name", DEVICE_FILES)
def test_every_device_has_sources_and_matching_name(catalog: Catalog, name: str) -> None:
    d = catalog.device(name)
    assert d.name == name
    assert d.sources
    assert all(isinstance(v, str) and v.strip() for v in d.sources.values())


@pytest.mark.parametrize("name", MODEL_FILES)
def test_every_model_has_sources(catalog: Catalog, name: str) -> None:
    m = catalog.model(name)
    assert m.name == name
    assert all(v.strip() for v in m.sources.values())


def test_every_link_has_a_source(catalog: Catalog) -> None:
    for name, profile in catalog.links.items():
        assert profile.source.strip(), name
        link = catalog.link(name)
        assert link.name == name
        assert link.bandwidth == pytest.approx(profile.bandwidth_gb_s * 1e9)


# -- deployments --------------------------------------------------------------------------


def test_deployment_too_small_raises_with_arithmetic(catalog: Catalog) -> None:
    mod = _yaml("models/llama-3.1-405b.yaml")
    dev = _yaml("devices/h100-sxm.yaml")
    weights_gb = mod["params_b"] * 2.0  # bf16
    budget_gb = dev["memory_gb"] * EngineKnobs().gpu_memory_utilization
    with pytest.raises(CatalogError) as info:
        catalog.deployment("h100-sxm", "llama-3.1-405b", dtype="bf16")
    msg = str(info.value)
    assert "llama-3.1-405b" in msg
    assert "h100-sxm" in msg
    assert f"{weights_gb:.1f} GB" in msg
    assert f"{budget_gb:.1f} GB" in msg


def test_hbm_deployment_kv_capacity_is_free_memory_over_kv_per_token(catalog: Catalog) -> None:
    mod = _yaml("models/llama-3.1-8b.yaml")
    dev = _yaml("devices/h100-sxm.yaml")
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    free = dev["memory_gb"] * 1e9 * 0.9 - mod["params_b"] * 1e9 * 2
    assert dep.count == 1
    assert dep.kv_capacity_tokens == int(free // KV_BYTES_BF16["llama-3.1-8b"])
    tp2 = catalog.deployment("h100-sxm", "llama-3.1-8b", tp=2)
    assert tp2.count == 2
    assert tp2.kv_capacity_tokens > 2 * dep.kv_capacity_tokens


def test_count_must_be_multiple_of_tp(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="multiple of tp"):
        catalog.deployment("h100-sxm", "llama-3.1-8b", tp=2, count=3)


def test_unknown_dtype_for_device_is_a_catalog_error(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="no fp8 throughput") as info:
        catalog.deployment("cerebras-wse-3", "llama-3.1-8b", dtype="fp8")
    assert "bf16" in str(info.value)


def _derived_count(device: str, model: str, dtype_bytes: float) -> int:
    dev = _yaml(f"devices/{device}.yaml")
    mod = _yaml(f"models/{model}.yaml")
    usable = float(dev["memory_gb"] * 1e9 * 0.9 * (1 - dev["kv_reserve_fraction"]))
    weights = float(mod["params_b"]) * 1e9 * dtype_bytes
    return max(1, math.ceil(weights / usable))


@pytest.mark.parametrize("device", ["groq-lpu-v1", "cerebras-wse-3"])
def test_pipeline_device_count_is_derived_from_memory(catalog: Catalog, device: str) -> None:
    small = catalog.deployment(device, "llama-3.1-8b")
    big = catalog.deployment(device, "llama-3.1-70b")
    assert big.count > small.count
    assert small.count == _derived_count(device, "llama-3.1-8b", 2.0)
    assert big.count == _derived_count(device, "llama-3.1-70b", 2.0)
    for dep in (small, big):
        weights = dep.model.params_b * 1e9 * 2
        # Enough memory for the weights with the KV reserve left over ...
        d = dep.device
        assert isinstance(d, PipelineDevice)
        budget = dep.count * d.memory_gb * 1e9 * 0.9
        assert weights <= budget * (1 - d.kv_reserve_fraction)
        # ... and not a device more than that needs.
        assert weights > (dep.count - 1) * d.memory_gb * 1e9 * 0.9 * (1 - d.kv_reserve_fraction)


def test_70b_on_cerebras_needs_several_wafers(catalog: Catalog) -> None:
    dep = catalog.deployment("cerebras-wse-3", "llama-3.1-70b", dtype="bf16")
    wafer_gb = _yaml("devices/cerebras-wse-3.yaml")["memory_gb"]
    assert dep.count >= 2
    assert dep.count * wafer_gb * 1e9 > dep.model.params_b * 1e9 * 2


def test_explicit_pipeline_count_that_is_too_small_fails(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match=r"does not fit on 1 × cerebras-wse-3"):
        catalog.deployment("cerebras-wse-3", "llama-3.1-70b", count=1)


def test_unknown_names_list_the_known_ones(catalog: Catalog) -> None:
    with pytest.raises(CatalogError) as info:
        catalog.device("h1000")
    msg = str(info.value)
    assert "unknown device 'h1000'" in msg
    for name in DEVICE_FILES:
        assert name in msg
    with pytest.raises(CatalogError, match="unknown model 'gpt-9'"):
        catalog.model("gpt-9")
    with pytest.raises(CatalogError, match="unknown link 'carrier-pigeon'") as info:
        catalog.link("carrier-pigeon")
    assert "roce_200g" in str(info.value)


def test_device_families_bind_to_their_physics(catalog: Catalog) -> None:
    """The YAML's family picks the profile class (and with it the physics)."""
    for name in DEVICE_FILES:
        d = catalog.device(name)
        family = _yaml(f"devices/{name}.yaml")["family"]
        assert d.family == family, name
        if family == "hbm":
            assert isinstance(d, HbmDevice), name
        elif family in ("sram_pipeline", "wafer_scale"):
            assert isinstance(d, PipelineDevice), name
        else:
            assert not isinstance(d, HbmDevice | PipelineDevice), name


# -- malformed config directories ---------------------------------------------------------


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    shutil.copytree(CONFIG, root, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return root


def test_load_from_a_copy_works(config_copy: Path) -> None:
    cat = Catalog.load(config_copy)
    assert sorted(cat.devices) == DEVICE_FILES


def test_malformed_device_names_file_and_field(config_copy: Path) -> None:
    path = config_copy / "devices" / "h100-sxm.yaml"
    data = yaml.safe_load(path.read_text())
    data["memory_gb"] = "lots"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError) as info:
        Catalog.load(config_copy)
    msg = str(info.value)
    assert str(path) in msg
    assert "memory_gb:" in msg
    assert "hbm." not in msg  # the union tag is not a YAML key


def test_malformed_nested_device_field_has_dotted_path(config_copy: Path) -> None:
    path = config_copy / "devices" / "b200.yaml"
    data = yaml.safe_load(path.read_text())
    data["efficiency"]["mfu"] = 1.5
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError) as info:
        Catalog.load(config_copy)
    assert str(path) in str(info.value)
    assert "efficiency.mfu:" in str(info.value)


def test_unknown_device_key_is_rejected(config_copy: Path) -> None:
    path = config_copy / "devices" / "groq-lpu-v1.yaml"
    data = yaml.safe_load(path.read_text())
    data["clock_ghz"] = 0.9
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError, match="clock_ghz: Extra inputs are not permitted"):
        Catalog.load(config_copy)


def test_invalid_yaml_names_file(config_copy: Path) -> None:
    path = config_copy / "models" / "llama-3.1-8b.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(CatalogError) as info:
        Catalog.load(config_copy)
    assert str(path) in str(info.value)


def test_an_engine_profile_that_extends_another_takes_its_behaviour_not_its_identity(
    catalog: Catalog,
) -> None:
    dynamo, trt = catalog.engine("dynamo-trtllm-0.8"), catalog.engine("trtllm-1.1")
    assert _yaml("engines/dynamo-trtllm-0.8.yaml")["extends"] == "trtllm-1.1"
    mine, theirs = dynamo.knobs.model_dump(), trt.knobs.model_dump()
    changed = {k for k in mine if mine[k] != theirs[k]}
    assert changed == {"serving_latency_s"}  # its own knob; bandwidth 1.15 is fitted alike
    # The engine's MLA constant is inherited, on the devices it was measured on only.
    assert dynamo.mla_layer == trt.mla_layer
    assert dynamo.knobs_for("h200-sxm").mla_layer_s == pytest.approx(59e-6)
    assert dynamo.knobs_for("b200").mla_layer_s == 0.0
    assert dynamo.cuda_graph_max_batch == trt.cuda_graph_max_batch
    # Identity stays its own: no release date, not the default, its own fits and their sources.
    assert (dynamo.released, dynamo.default) == (None, False)
    assert trt.default
    assert trt.released is not None
    assert "released" not in dynamo.sources
    assert dynamo.sources["fitted"] != trt.sources["fitted"]
    assert dynamo.sources["max_num_batched_tokens"] == trt.sources["max_num_batched_tokens"]


@pytest.mark.parametrize(
    ("extends", "error"),
    [("nope", "extends unknown engine profile 'nope'"), ("chained", "which extends another")],
)
def test_an_engine_profile_extends_one_known_profile(
    config_copy: Path, extends: str, error: str
) -> None:
    engines = config_copy / "engines"
    chained = yaml.safe_load((engines / "dynamo-trtllm-0.8.yaml").read_text())
    chained["name"] = "chained"
    (engines / "chained.yaml").write_text(yaml.safe_dump(chained))
    probe = {"name": "probe", "extends": extends, "versions": ["9.9"], "sources": {"x": "y"}}
    (engines / "probe.yaml").write_text(yaml.safe_dump(probe))
    with pytest.raises(CatalogError, match=error):
        Catalog.load(config_copy)


def test_file_name_must_match_declared_name(config_copy: Path) -> None:
    src = config_copy / "devices" / "h100-sxm.yaml"
    shutil.copy(src, config_copy / "devices" / "h100-copy.yaml")
    with pytest.raises(CatalogError, match=r"'h100-copy\.yaml' declares name 'h100-sxm'"):
        Catalog.load(config_copy)


# -- reference per-user speeds (published figures) ----------------------------------------


def _tokens_per_s(catalog: Catalog, device: str, model: str, **kw: Any) -> float:
    dep = catalog.deployment(device, model, **kw)
    return 1.0 / dep.step_time(StepShape.of([(1, 1000)]))


def test_groq_8b_per_user_speed_matches_groqcloud(catalog: Catalog) -> None:
    assert _tokens_per_s(catalog, "groq-lpu-v1", "llama-3.1-8b") == pytest.approx(560, rel=0.1)


def test_cerebras_8b_per_user_speed_matches_launch_blog(catalog: Catalog) -> None:
    assert _tokens_per_s(catalog, "cerebras-wse-3", "llama-3.1-8b") == pytest.approx(1800, rel=0.1)


def test_h100_tp2_70b_fp8_itl_matches_nim_benchmark(catalog: Catalog) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
    itl = dep.step_time(StepShape.of([(1, 1000)]))
    assert itl == pytest.approx(18.9e-3, rel=0.1)


def test_deployment_kv_bytes_per_token_matches_model(catalog: Catalog) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
    assert dep.kv_bytes_per_token == KV_BYTES_BF16["llama-3.1-70b"] / 2


def test_engine_bandwidth_factor_speeds_only_the_weight_reads(catalog: Catalog) -> None:
    """An engine's ``bandwidth_efficiency`` multiplies the device's η for weight reads: a
    batch-1 decode of Llama-3.1-70B FP8 on one H200 is weight-bound (70.6 GB read against 141
    GFLOP), so the step shortens by exactly W / B · (1/η − 1/(1.15 η)) and nothing else moves
    (KV reads keep the device's own η, overheads are host time)."""
    from backends.emulator.timing import weight_bytes_read

    base = catalog.deployment("h200-sxm", "llama-3.1-70b", dtype="fp8")
    fast = catalog.deployment(
        "h200-sxm", "llama-3.1-70b", dtype="fp8", engine=EngineKnobs(bandwidth_efficiency=1.15)
    )
    shape = StepShape.of([(1, 1000)])
    device = catalog.device("h200-sxm")
    assert isinstance(device, HbmDevice)
    eta, bw = device.efficiency.bandwidth, device.memory_bandwidth_tb_s * 1e12
    w = weight_bytes_read(base.model_shape, 1)
    assert w == pytest.approx(70.6e9, rel=0.02)
    saved = w / bw * (1 / eta - 1 / (eta * 1.15))  # 0.72 -> 0.828: 20.4 ms -> 17.8 ms
    assert base.step_time(shape) - fast.step_time(shape) == pytest.approx(saved, rel=1e-9)
    assert saved == pytest.approx(2.66e-3, rel=0.02)


def test_engine_bandwidth_factor_cannot_exceed_the_device_peak(catalog: Catalog) -> None:
    """η × factor is capped at 1: an engine cannot read faster than the HBM's rated bandwidth."""
    dep = catalog.deployment(
        "h200-sxm", "llama-3.1-70b", dtype="fp8", engine=EngineKnobs(bandwidth_efficiency=1.5)
    )
    assert dep.device.constants(dep).bandwidth_efficiency == 1.0
