"""Predict measured serving runs ("silicon" rows) with the emulation.

An aggregated row runs aiperf's closed loop on one emulated engine in virtual time
(:func:`gateway.sim.silicon.closed_loop`): the engine's own scheduler and the deployment's
physics, no HTTP and no event loop, so a row costs a fraction of a second. A disaggregated row
(xPyD) runs through the gateway's P/D flow exactly as ``pdgate serve`` would route it
(:func:`gateway.sim.simulate`): ``x`` prefill workers, ``y`` decode workers, the KV link between
them, the same engines; where the row records no worker counts they are inferred
(:mod:`gateway.sim.silicon_disagg`).

Example::

    row = parse_row(csv_dict)
    predict(row)   # Prediction(id=..., ttft_ms=..., tpot_ms=..., reason="")
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from backends.emulator.catalog import (
    Catalog,
    Deployment,
    EngineKnobs,
    EngineProfile,
    ModelProfile,
    ParallelLayout,
    WeightFormats,
)
from backends.emulator.engine import Engine
from backends.emulator.timing import StepShape
from backends.errors import CatalogError
from gateway.settings import EmulatedWorker, ModelConfig, PoolConfig, Settings
from gateway.sim.plan.sizing import decode_step, prefill_time
from gateway.sim.silicon import (
    AIPERF,
    Layout,
    LoopResult,
    ManualClock,
    Prediction,
    Recipe,
    RowError,
    SiliconRow,
    Stalled,
    closed_loop,
    weights_of,
)
from gateway.sim.silicon_disagg import PoolSizing, infer_pools
from gateway.sim.workload import RequestSpec

if TYPE_CHECKING:  # the simulation is imported only when a disaggregated row runs
    from gateway.sim.run import RequestRecord

# A disaggregated row's closed loop, as its benchmark client ran it (gateway.sim.silicon,
# Recipe): the counted phase starts ``C`` clients at once on an idle deployment (aiperf's
# warm-up wave has finished; benchmark_serving has none) and ``rounds × C`` requests are
# counted. The gateway's closed loop has no convergence test, so the first (burst) wave and
# ``DISAGG_WAVES`` more are run; the later waves stand for the remaining ``rounds − 1``: with
# fixed lengths the pattern repeats after the first wave, with drawn lengths the clients have
# desynchronised by then.
DISAGG_WAVES = 4

# KV link between prefill and decode workers on separate nodes: each GPU's own 400 Gb/s
# InfiniBand NIC (DGX H100/H200/B200: eight ConnectX-7, one per GPU). A deployment that fits
# one NVLink domain (a GB200/GB300 NVL72 rack) moves its KV over NVLink instead.
DISAGG_LINK = "ib_ndr"
DISAGG_NVLINK = "nvlink"

_catalog: Catalog | None = None

# A worker's part in a row: an aggregated worker, or a prefill or decode worker of an xPyD row.
Role = Literal["agg", "prefill", "decode"]

MOE_MODELS = {
    "deepseek-v3",
    "kimi-k2.5",
    "glm-5",
    "qwen3-235b-a22b",
    "qwen3.5-397b-a17b",
    "gpt-oss-120b",
    "minimax-m2.5",
}


def catalog() -> Catalog:
    global _catalog
    if _catalog is None:
        _catalog = Catalog.load()
    return _catalog


def engine_profile(row: SiliconRow, cat: Catalog | None = None) -> EngineProfile:
    """The engine profile of the row's engine and version family (by the day it was measured
    when the row records no version)."""
    return (cat or catalog()).engine_for(row.backend, row.version, row.measured)


# Knob overrides by engine profile name, for fitting a profile's factors (:func:`fit_profile`).
_overrides: dict[str, dict[str, float]] = {}


def knobs_for(
    row: SiliconRow, layout: Layout, cat: Catalog | None = None, *, role: Role = "agg"
) -> EngineKnobs:
    """Engine settings of a worker of the row: its engine's defaults on the row's device, with
    the row's batch cap (per attention data-parallel rank, so ``batch × dp`` per worker) and
    the token budget its recipe's deployment generator writes (:func:`recipe_budget`), also
    per rank: each of ``dp`` ranks of TensorRT-LLM or vLLM schedules its own steps, so the
    worker's budget, and its default batch cap where the row records none, are ``dp`` times
    the rank's (SGLang splits one of each among its ranks).

    An engine that admits only whole prompts (TensorRT-LLM without chunked prefill) needs a
    token budget that holds a prompt beside its running batch: with the default 8,192 tokens an
    8,192-token prompt could join no step that has a decode in it, and the engine would run
    one request at a time. No measured run shows that, so where the row's recipe leaves the
    engine's default, a deployment serving the row's lengths is taken to set
    ``max_num_tokens`` to at least ``isl + batch`` (an assumption, named in the accuracy page).
    """
    profile = engine_profile(row, cat)
    batch = layout.batch * layout.dp if layout.batch else None
    knobs = profile.knobs_for(row.device or "")
    budget = recipe_budget(row, batch or row.concurrency, role)
    if budget is not None:
        knobs = knobs.model_copy(update={"max_num_batched_tokens": budget})
    elif knobs.step_policy == "whole_prompt":
        need = row.isl + (batch or row.concurrency)
        if knobs.max_num_batched_tokens < need:
            knobs = knobs.model_copy(update={"max_num_batched_tokens": need})
    knobs = profile.worker_knobs(knobs, parallel_layout(row, layout).dp)
    if batch:  # the deployment's cap is the whole worker's, over its ranks
        knobs = knobs.model_copy(update={"max_num_seqs": batch})
    if profile.name in _overrides:
        knobs = knobs.model_copy(update=_overrides[profile.name])
    return knobs


def recipe_budget(row: SiliconRow, batch: int, role: Role) -> int | None:
    """The per-step token budget the row's deployment generator wrote, or ``None`` where its
    recipe leaves the engine's default (:class:`Recipe`): TensorRT-LLM's ``max_num_tokens``
    (in whole 32-token KV blocks) and vLLM's ``max_num_batched_tokens``. Decode workers keep
    the default: their steps hold one token per running request.

    SGLang keeps its defaults. The same rules would also turn on its mixed chunked prefill,
    and its aiperf rows show the opposite, prefill batches run alone: Qwen3-32B on TP8 H100 at
    64 clients measures a TTFT of 922 ms and a TPOT of 13.7 ms under SGLang 0.5.1 where vLLM
    0.12 measures 194 ms and 21.3 ms. So those rows were not deployed with these rules."""
    headroom = row.recipe.token_headroom
    if headroom is None or role == "decode" or row.backend not in ("trtllm", "vllm"):
        return None
    budget = row.isl + headroom + (batch if role == "agg" else 0)
    if row.backend == "trtllm":
        return -(-budget // 32) * 32
    return budget


def predict_with(row: SiliconRow, overrides: dict[str, dict[str, float]]) -> Prediction:
    """:func:`predict` with some engine profiles' knobs replaced (fitting)."""
    _overrides.clear()
    _overrides.update(overrides)
    try:
        return predict(row)
    finally:
        _overrides.clear()


def deployment_for(
    row: SiliconRow, layout: Layout, cat: Catalog | None = None, *, role: Role = "agg"
) -> Deployment:
    cat = cat or catalog()
    model, device = row.model, row.device
    if model is None:
        raise RowError(f"no model profile for {row.model_path}")
    if device is None:
        raise RowError(f"no device profile for system {row.system}")
    w = weights_of(row, fp4_gemms="fp4" in getattr(cat.device(device), "peak_tflops", {}))
    engine = knobs_for(row, layout, cat, role=role)
    if checkpoint_kv_fp8(row, w.dense, cat.model(model)):
        engine = engine.model_copy(update={"kv_dtype": "fp8"})
    return cat.deployment(
        device,
        model,
        dtype=w.compute,
        engine=engine,
        layout=parallel_layout(row, layout),
        weights=WeightFormats(dense=w.dense, experts=w.experts),
    )


def checkpoint_kv_fp8(row: SiliconRow, dense: str, model: ModelProfile) -> bool:
    """Whether the row's engine keeps its KV cache in FP8 because the checkpoint says so.

    NVIDIA's Model Optimizer checkpoints declare ``kv_cache_quant_algo: FP8`` in their
    ``hf_quant_config.json``: the NVFP4 ones of every model (calibration/silicon/model_configs)
    and the per-tensor FP8 ones of dense models (NVIDIA's FP8 Llamas; the model makers' own
    FP8 checkpoints scale per 128x128 block and declare no KV format). NVFP4 rows run it on
    every engine, as those checkpoints' serving recipes set it. Per-tensor FP8 rows run it on
    TensorRT-LLM alone: its ``KvCacheConfig.dtype`` ``auto`` takes the checkpoint's KV format,
    where vLLM's and SGLang's ``auto`` is the model's 16-bit dtype (calibration/engines.md).
    """
    if dense == "nvfp4":
        return True
    return (
        row.backend == "trtllm"
        and dense == "fp8"
        and not model.experts
        and not model.fp8_block_scaled
    )


def parallel_layout(row: SiliconRow, layout: Layout) -> ParallelLayout:
    """The row's layout in the catalog's terms.

    Dense models have no experts to split: their ``moe_*`` columns only repeat the GPU count.
    For MoE models the expert group ``moe_tp × moe_ep`` is the worker's GPU count, and the
    attention layout must fill it (``tp × dp``); some rows record more attention ranks than
    there are GPUs (DP 64 on one 8-GPU node), and some fewer (vLLM Qwen3-235B: ``tp 1``,
    ``moe_tp 4``, no DP column: the one way an engine runs that is data-parallel attention on
    every GPU, each expert sharded over all of them, vLLM's DP without
    ``--enable-expert-parallel``), so ``dp`` is whatever fills the group at the row's ``tp``.
    A row with neither expert split recorded (``moe_tp`` and ``moe_ep`` both 1) on several GPUs
    runs its experts as every engine does by default, sharded over all of them (``moe_tp`` =
    ``tp × dp``): none replicates every expert on every GPU.
    """
    moe = (row.model or "") in MOE_MODELS
    if not moe:
        return ParallelLayout(tp=layout.tp, pp=layout.pp, dp=layout.dp)
    moe_tp = layout.moe_tp
    if layout.moe_tp * layout.moe_ep == 1:
        moe_tp = layout.tp * layout.dp
    g = moe_tp * layout.moe_ep
    tp = min(layout.tp, g)
    dp = max(1, g // tp)
    return ParallelLayout(tp=tp, pp=layout.pp, dp=dp, moe_tp=moe_tp, ep=layout.moe_ep)


def predict(row: SiliconRow, cat: Catalog | None = None) -> Prediction:
    """The emulation's TTFT and TPOT for ``row``, or a reason why it cannot say."""
    wall = time.perf_counter()
    try:
        if row.mode == "agg":
            assert row.agg is not None
            ttft, tpot = _agg(row, row.agg, cat)
        else:
            ttft, tpot = _disagg(row, cat)
    except (RowError, CatalogError, Stalled, ValueError) as exc:
        return Prediction(row.id, None, None, str(exc), time.perf_counter() - wall)
    return Prediction(row.id, ttft * 1e3, tpot * 1e3, "", time.perf_counter() - wall)


def _agg(row: SiliconRow, layout: Layout, cat: Catalog | None) -> tuple[float, float]:
    r = agg_loop(row, layout, cat)
    return r.ttft_s, r.tpot_s


def agg_replicas(row: SiliconRow, layout: Layout) -> int:
    """Identical workers an aggregated row ran on: the fewest whose batch caps hold every
    client (the fallback of a disaggregated row's decode pool,
    :mod:`gateway.sim.silicon_disagg`), 1 when the row records no cap. A row of 192 clients
    on a worker capped at 48 ran on 4 workers behind a router."""
    cap = layout.batch * layout.dp if layout.batch else 0
    if cap <= 0 or row.concurrency <= cap:
        return 1
    return math.ceil(row.concurrency / cap)


def agg_loop(
    row: SiliconRow,
    layout: Layout,
    cat: Catalog | None = None,
    *,
    spread: bool = False,
    recipe: Recipe | None = None,
) -> LoopResult:
    """The closed loop of an aggregated row on its deployment and engine profile, run as the
    row's benchmark client ran it (or as ``recipe``). With several workers
    (:func:`agg_replicas`) the clients spread evenly over them, so one worker runs with its
    share. ``spread``: the clients start desynchronised (:func:`closed_loop`)."""
    replicas = agg_replicas(row, layout)
    dep = deployment_for(row, layout, cat)
    clock = ManualClock()
    # The closed loop reads each step's batch, so sequences are stepped one by one.
    engine = Engine.from_knobs(dep, clock, dep.engine, bulk_decode=False)  # type: ignore[arg-type]
    profile = engine_profile(row, cat)
    frontend = profile.frontend_request_s + profile.frontend_token_s * row.isl
    return closed_loop(
        engine,
        clock,
        dep.step_time,
        concurrency=math.ceil(row.concurrency / replicas),
        isl=row.isl,
        osl=row.osl,
        recipe=recipe or row.recipe,
        frontend_s=frontend,
        latency_s=dep.engine.serving_latency_s,
        spread=spread,
    )


def explain(row: SiliconRow, cat: Catalog | None = None) -> str:
    """How a row is simulated and where its TTFT goes (``bench_silicon --explain ID``). An
    aggregated row: the deployment, one prompt's prefill step alone, the closed loop's means,
    how synchronised its clients are, and the same loop started desynchronised. A
    disaggregated row: :func:`explain_disagg`."""
    if row.mode == "disagg":
        return explain_disagg(row, cat)
    if row.agg is None:
        raise RowError("--explain needs an aggregated or a disaggregated row")
    dep = deployment_for(row, row.agg, cat)
    alone = dep.step_time(StepShape.of([(row.isl, 0)]))
    r = agg_loop(row, row.agg, cat)
    # The other bound of how synchronised the clients are: aiperf's loop started one client
    # after another, or benchmark_serving's run as aiperf's single burst of fixed lengths.
    if row.recipe.warmup:
        other, d = "started desynchronised instead", agg_loop(row, row.agg, cat, spread=True)
    else:
        other, d = "as aiperf's fixed lengths and burst", agg_loop(row, row.agg, cat, recipe=AIPERF)
    replicas = agg_replicas(row, row.agg)
    clients = math.ceil(row.concurrency / replicas)
    workers = f"; {replicas} workers, {clients} clients each" if replicas > 1 else ""
    ms = 1e3
    return "\n".join(
        [
            f"{row.id}",
            f"  {row.backend} {row.version or '(no version)'} → profile "
            f"{engine_profile(row, cat).name}; {dep.device.name} × {dep.count}, "
            f"tp {dep.tp}, dtype {dep.dtype}; {row.concurrency} clients, {row.isl}/{row.osl}"
            f"{workers}",
            f"  client: {_describe(row.recipe)}",
            f"  one prompt's prefill step alone: {alone * ms:.1f} ms",
            f"  TTFT {r.ttft_s * ms:.1f} ms (measured {row.ttft_ms or math.nan:.1f}): "
            f"{r.wait_s * ms:.1f} ms before the engine admits it, "
            f"{(r.ttft_s - r.wait_s) * ms:.1f} ms in the engine",
            f"  TPOT {r.tpot_s * ms:.2f} ms (measured {row.tpot_ms or math.nan:.2f})",
            f"  admitted together: {r.admitted_together:.1f} of {clients} clients "
            f"on average; {r.counted} requests counted over {r.waves} waves, {r.steps} steps",
            f"  {other}: TTFT {d.ttft_s * ms:.1f} ms, "
            f"TPOT {d.tpot_s * ms:.2f} ms, admitted together {d.admitted_together:.1f}",
        ]
    )


def explain_disagg(row: SiliconRow, cat: Catalog | None = None) -> str:
    """How an xPyD row is simulated: where its deployment comes from (recorded, a sibling
    run's, or inferred, and by which rule), each pool's workers and layout, the KV link, one
    prompt's prefill alone and a decode step at the pool's batch, and the run's means."""
    prefill, decode, sizing = disagg_deployment(row, cat)
    if sizing is None:
        origin = f"a sibling run's ({row.deployment_of})" if row.deployment_of else "recorded"
    elif sizing.swept:
        origin = (
            f"inferred: the sweep's decode pool ({row.concurrency} = {sizing.decode_workers} "
            f"workers · {decode.dp} rank{'s' if decode.dp > 1 else ''} · "
            f"{sizing.decode_batch // decode.dp}), the prefill "
            "pool rate-matched"
        )
    else:
        origin = (
            f"inferred: the fewest decode workers of {sizing.decode_cap} sequences that hold "
            f"{row.concurrency} clients, the prefill pool rate-matched"
        )
    p_dep = deployment_for(row, replace(prefill, workers=1), cat, role="prefill")
    d_dep = deployment_for(row, replace(decode, workers=1), cat, role="decode")
    batch = (decode.batch or 1) * decode.dp
    ttft, tpot = _disagg(row, cat)
    ms = 1e3
    return "\n".join(
        [
            f"{row.id}",
            f"  {row.backend} {row.version or '(no version)'} → profile "
            f"{engine_profile(row, cat).name}; {d_dep.device.name}; {row.concurrency} "
            f"clients, {row.isl}/{row.osl}",
            f"  client: {_describe(row.recipe)}",
            f"  deployment: {origin}",
            f"  prefill: {_pool(prefill)}; decode: {_pool(decode)}; KV over "
            f"{disagg_link(row, prefill, decode, cat)}",
            f"  one prompt's prefill alone: {prefill_time(p_dep, row.isl) * ms:.1f} ms; a decode "
            f"step of {batch} at the mean context: "
            f"{decode_step(d_dep, batch, row.isl + row.osl / 2) * ms:.2f} ms",
            f"  TTFT {ttft * ms:.1f} ms (measured {row.ttft_ms or math.nan:.1f})",
            f"  TPOT {tpot * ms:.2f} ms (measured {row.tpot_ms or math.nan:.2f})",
        ]
    )


def _pool(layout: Layout) -> str:
    experts = f", experts {layout.moe_tp}×{layout.moe_ep}" if layout.moe_ep > 1 else ""
    dp = f", dp {layout.dp}" if layout.dp > 1 else ""
    batch = f", {layout.batch} a rank" if layout.batch else ""
    return f"{layout.workers} × {layout.gpus} GPUs (tp {layout.tp}{dp}{experts}{batch})"


def _describe(recipe: Recipe) -> str:
    warm = "one warm-up wave, then " if recipe.warmup else "no warm-up, "
    lengths = (
        "fixed lengths"
        if recipe.length_ratio >= 1.0
        else f"lengths drawn from [{recipe.length_ratio:g}·L, L]"
    )
    return f"{recipe.name} ({warm}{recipe.rounds}×C counted, {lengths})"


def disagg_settings(row: SiliconRow, cat: Catalog | None = None) -> Settings:
    """The gateway config an xPyD row describes: a prefill pool of ``x`` workers and a decode
    pool of ``y``, each worker with its own layout, joined by the KV link."""
    model = row.model
    if model is None:
        raise RowError(f"no model profile for {row.model_path}")
    prefill, decode = disagg_layouts(row, cat)
    link = disagg_link(row, prefill, decode, cat)
    pools = {}
    roles: tuple[tuple[Role, Layout], ...] = (("prefill", prefill), ("decode", decode))
    for role, layout in roles:
        dep = deployment_for(row, layout, cat, role=role)  # validates that it fits
        worker = EmulatedWorker(
            device=dep.device.name,
            count=dep.count,
            tp=dep.tp,
            dtype=dep.dtype,
            replicas=layout.workers,
            engine=dep.engine,
            layout=dep.layout,
            weights=dep.weights,
        )
        pools[role] = PoolConfig(policy="least_loaded", kv_link=link, workers=[worker])
    # SGLang's PD mode and Dynamo stream the first token from the decode worker.
    served = ModelConfig(name=model, mode="disaggregated", first_token="decode", pools=pools)
    return Settings(models=[served])


def disagg_link(
    row: SiliconRow, prefill: Layout, decode: Layout, cat: Catalog | None = None
) -> str:
    """The KV link of an xPyD row: NVLink where every worker of both pools fits the device's
    NVLink domain (``scale_up_domain``: one 8-GPU node, the 72 GPUs of an NVL72 rack), else
    the GPUs' InfiniBand NICs."""
    device = (cat or catalog()).device(row.device or "")
    domain = getattr(device, "scale_up_domain", 0)
    gpus = prefill.gpus * prefill.workers + decode.gpus * decode.workers
    return DISAGG_NVLINK if domain and gpus <= domain else DISAGG_LINK


def disagg_layouts(row: SiliconRow, cat: Catalog | None = None) -> tuple[Layout, Layout]:
    """The prefill and decode layouts of an xPyD row, worker counts and decode batch included:
    as recorded, or inferred from the row's physics where it records no worker counts
    (:mod:`gateway.sim.silicon_disagg`)."""
    prefill, decode, _ = disagg_deployment(row, cat)
    return prefill, decode


def disagg_deployment(
    row: SiliconRow, cat: Catalog | None = None
) -> tuple[Layout, Layout, PoolSizing | None]:
    """:func:`disagg_layouts` and, where the deployment is inferred, how (the sizing)."""
    if row.prefill is None or row.decode is None:
        raise RowError("a disaggregated row needs prefill and decode layouts")
    if row.workers_given:
        return row.prefill, row.decode, None
    one = replace(row.prefill, batch=None, workers=1)
    dec = replace(row.decode, batch=None, workers=1)
    sizing = infer_pools(
        concurrency=row.concurrency,
        isl=row.isl,
        osl=row.osl,
        prefill=deployment_for(row, one, cat),
        decode=deployment_for(row, dec, cat),
    )
    per_rank = math.ceil(sizing.decode_batch / dec.dp)
    return (
        replace(one, workers=sizing.prefill_workers),
        replace(dec, workers=sizing.decode_workers, batch=per_rank),
        sizing,
    )


def _disagg(row: SiliconRow, cat: Catalog | None) -> tuple[float, float]:
    from gateway.sim.run import SimulationSpec, simulate

    settings = disagg_settings(row, cat)
    c = row.concurrency
    total = c * (1 + DISAGG_WAVES)
    recipe, rng = row.recipe, random.Random(0)

    def requests() -> Iterator[RequestSpec]:
        for _ in range(total):
            isl, osl = recipe.lengths(rng, row.isl, row.osl)
            yield RequestSpec(prompt_tokens=isl, output_tokens=osl)

    spec = SimulationSpec(
        settings, row.model or "", requests(), concurrency=c, total=total, catalog=cat or catalog()
    )
    result = simulate(spec)
    if not any(r.error is None and r.end_at is not None for r in result.records):
        errors = {r.error for r in result.records if r.error}
        raise RowError(f"no request completed: {', '.join(sorted(e for e in errors if e))}")
    # The first wave starts as one burst on an idle deployment (after aiperf's warm-up, or as
    # benchmark_serving's first C requests); the later waves stand for the rest of the rounds.
    return wave_means(result.records[:c], result.records[c:], recipe.rounds)


def wave_means(
    first: Sequence[RequestRecord], later: Sequence[RequestRecord], rounds: int
) -> tuple[float, float]:
    """Mean TTFT and TPOT of ``rounds`` counted waves from the first wave and a few later ones:
    the first wave counts ``1 / rounds``, the later waves' mean the rest (they repeat). Either
    part may be empty (failed requests are left out)."""
    parts = []
    for records, weight in ((first, 1.0), (later, rounds - 1.0)):
        ok = [r for r in records if r.error is None and r.end_at is not None]
        if ok:
            tpots = [t for r in ok if (t := r.tpot) is not None]
            tpot = sum(tpots) / len(tpots) if tpots else 0.0
            parts.append((weight, sum(r.ttft for r in ok) / len(ok), tpot))
    if not parts:
        raise RowError("no request completed")
    w = sum(p[0] for p in parts)
    return sum(p[0] * p[1] for p in parts) / w, sum(p[0] * p[2] for p in parts) / w
