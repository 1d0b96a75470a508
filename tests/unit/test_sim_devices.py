"""Every device profile in the catalog loads and simulates (gateway/sim/run.py)."""

from __future__ import annotations

import pytest

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.run import SimulationSpec, device_settings, simulate
from gateway.sim.workload import RequestSpec

CATALOG = Catalog.load()
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "mixtral-8x7b", "qwen3-30b-a3b")
DTYPES = ("bf16", "fp8", "fp4")


def _first_fit(device: str) -> tuple[str, str, int | None]:
    """The first (model, dtype, tp) the device can serve: one instance of its default size,
    else tensor parallel over 2, 4 or 8 devices."""
    for tp in (None, 2, 4, 8):
        for model in MODELS:
            for dtype in DTYPES:
                try:
                    CATALOG.deployment(device, model, dtype=dtype, tp=tp or 1, count=tp)
                except (CatalogError, ValueError):
                    continue
                return model, dtype, tp
    raise AssertionError(f"{device} serves none of {MODELS}")


@pytest.mark.parametrize("device", sorted(CATALOG.devices))
def test_every_device_profile_simulates(device: str) -> None:
    model, dtype, tp = _first_fit(device)
    settings = device_settings(CATALOG, device=device, model=model, dtype=dtype, tp=tp)
    spec = SimulationSpec(
        settings, model, [RequestSpec(256, 16)] * 4, concurrency=2, catalog=CATALOG
    )
    m = simulate(spec).metrics()
    assert m["requests"] == 4, m["errors"]
    assert 0 < m["ttft_s"]["mean"] < 60
    assert 0 < m["itl_s"]["mean"] < 1
    assert m["output_tokens_per_s"] > 0
    assert m["joules_per_output_token"] is None or m["joules_per_output_token"] > 0
