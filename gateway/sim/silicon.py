"""Measured serving runs ("silicon" rows) against the emulation: parsing, mapping, statistics.

A row is one closed-loop benchmark of a real engine (vLLM, SGLang, TensorRT-LLM) on real GPUs,
in the format of AIConfigurator's silicon sample (``silicon/README.md`` of the calibration
data): engine and version, model, system, precision, fixed ISL/OSL, ``C`` clients (in
``silicon_data_source`` as ``silicon_concurrency=C``), a parallel layout (aggregated) or a
prefill and a decode layout with worker counts (disaggregated), and the measured mean TTFT and
TPOT in milliseconds.

This module turns a row into what the emulation needs (:func:`parse_row`, :func:`map_row`),
runs an aggregated row's closed loop on one engine in virtual time (:func:`closed_loop`), and
grades predictions (:func:`accuracy`, :func:`breakdown`). Disaggregated rows go through the
gateway's own P/D flow (``gateway.sim.silicon_run``).

How the runs were measured, and mirrored here (:class:`Recipe`, :func:`recipe_of`): two
benchmark clients made the sample's rows.

- **aiperf** (AIConfigurator's own recipe) with ``--concurrency C --warmup-request-count C
  --request-count 20×C``, fixed lengths, ``ignore_eos``, streaming. The warm-up wave of ``C``
  requests finishes before the counted phase starts; the counted phase starts ``C`` clients at
  once and each sends its next request when its last one ends. With fixed lengths the counted
  phase settles into a periodic pattern within a few waves, so :func:`closed_loop` stops once
  the running means of two consecutive waves agree within ``tolerance`` (or after the 20 waves).
- **bench_serving** (the rows from dated source files and the results database):
  ``benchmark_serving.py --dataset-name random --random-range-ratio 0.8 --num-prompts 10×C
  --max-concurrency C``. Every prompt and output length is drawn uniformly from ``[0.8·L, L]``,
  no warm-up, all ``10×C`` requests counted. Unequal output lengths desynchronise the clients
  within a wave or two, so a new prompt mostly meets a running decode batch rather than ``C − 1``
  other prompts.

Mean TTFT and mean TPOT are over the counted requests.
"""

from __future__ import annotations

import csv
import datetime
import math
import random
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any, Protocol

# Tolerances of the accuracy targets (issue 14): TPOT within ±15 %, TTFT within ±25 %.
TPOT_TOLERANCE = 0.15
TTFT_TOLERANCE = 0.25

# Hugging Face model path → model profile (``config/models``). DeepSeek-R1 and -V3 share one
# architecture (config.json identical but for the name); the NVIDIA FP8 Llama is the same shape.
MODELS: dict[str, str] = {
    "deepseek-ai/DeepSeek-R1": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Llama-3.1-405B": "llama-3.1-405b",
    "Qwen/Qwen3-32B": "qwen3-32b",
    "Qwen/Qwen3-32B-FP8": "qwen3-32b",
    "Qwen/Qwen3-235B-A22B-FP8": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B": "qwen3-235b-a22b",
    "openai/gpt-oss-120b": "gpt-oss-120b",
    "MiniMaxAI/MiniMax-M2.5": "minimax-m2.5",
    "Qwen/Qwen3.5-397B-A17B": "qwen3.5-397b-a17b",
    "moonshotai/Kimi-K2.5": "kimi-k2.5",
    "zhipuai/GLM-5": "glm-5",
    "zai-org/GLM-5": "glm-5",
    "zai-org/GLM-5-FP8": "glm-5",
}

# Model names by architecture, for paths not in :data:`MODELS` (other organisations' copies,
# quantised checkpoints, point releases of one architecture): matched against the path's last
# part, lower-cased, after a ``Meta-`` prefix. DeepSeek-V3, -V3-0324, -V3.1 and R1, R1-0528
# share one shape (V3.2 adds sparse attention and is not matched); Llama 3.3 70B is Llama
# 3.1 70B's shape; Kimi-K2's text model is K2.5's; MiniMax-M2 and -M2.1 are M2.5's.
ARCHITECTURES: tuple[tuple[str, str], ...] = (
    (r"deepseek-(r1|v3)(?!\.[2-9])", "deepseek-v3"),
    (r"llama-3\.[13]-70b", "llama-3.1-70b"),
    (r"llama-3\.1-8b", "llama-3.1-8b"),
    (r"llama-3\.1-405b", "llama-3.1-405b"),
    (r"llama-2-70b", "llama-2-70b"),
    (r"qwen3-32b", "qwen3-32b"),
    (r"qwen3-30b-a3b", "qwen3-30b-a3b"),
    (r"qwen3-235b-a22b", "qwen3-235b-a22b"),
    (r"qwen3\.5-397b-a17b", "qwen3.5-397b-a17b"),
    (r"gpt-oss-120b", "gpt-oss-120b"),
    (r"minimax-m2(\.[15])?(?![.\d])", "minimax-m2.5"),
    (r"kimi-k2(\.5)?(?![.\d])", "kimi-k2.5"),
    (r"glm-5(?![.\d])", "glm-5"),
    (r"mixtral-8x7b", "mixtral-8x7b"),
)


def model_profile_of(path: str) -> str | None:
    """The model profile of a Hugging Face model path: :data:`MODELS`, else the architecture
    its name carries (:data:`ARCHITECTURES`: ``nvidia/DeepSeek-V3.1-NVFP4`` → ``deepseek-v3``,
    ``meta-llama/Meta-Llama-3.1-405B`` → ``llama-3.1-405b``); None for an unknown model."""
    if path in MODELS:
        return MODELS[path]
    name = path.rsplit("/", 1)[-1].lower().removeprefix("meta-")
    for pattern, profile in ARCHITECTURES:
        if re.match(pattern, name):
            return profile
    return None


# ``system`` → device profile (``config/devices``).
DEVICES: dict[str, str] = {
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200-sxm",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
    "gb200_nvl72": "gb200",
    "gb300_nvl72": "gb300",
}

# The GPU a system name carries, for names not in :data:`DEVICES` (``gb200_sxm``, ``H200``,
# ``b300-nvl72``): the name lower-cased, its form factor and rack suffixes dropped.
_SYSTEM_SUFFIX = re.compile(r"[-_ ]?(sxm\d?|nvl\d+|hgx|dgx)$")
_GPUS = {
    "h100": "h100-sxm",
    "h200": "h200-sxm",
    "b200": "b200",
    "b300": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
}


def device_of(system: str) -> str | None:
    """The device profile of a ``system`` name: :data:`DEVICES`, else the GPU its name
    carries (``gb200_sxm`` → ``gb200``, ``H100`` → ``h100-sxm``); None for an unknown one."""
    if system in DEVICES:
        return DEVICES[system]
    name = system.strip().lower()
    while (bare := _SYSTEM_SUFFIX.sub("", name)) != name:
        name = bare
    return _GPUS.get(name)


FAMILIES: dict[str, str] = {
    "deepseek-v3": "deepseek",
    "kimi-k2.5": "kimi",
    "glm-5": "glm",
    "llama-3.1-8b": "llama",
    "llama-3.1-70b": "llama",
    "llama-3.1-405b": "llama",
    "qwen3-32b": "qwen3",
    "qwen3-235b-a22b": "qwen3-moe",
    "qwen3.5-397b-a17b": "qwen3.5",
    "gpt-oss-120b": "gpt-oss",
    "minimax-m2.5": "minimax",
}


class RowError(ValueError):
    """A row that cannot be read (missing or malformed fields)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """One worker's parallel layout, in the sample's terms.

    ``tp`` attention tensor parallelism, ``pp`` pipeline stages, ``dp`` attention data
    parallelism (each of ``dp`` groups of ``tp`` GPUs holds its own requests), ``moe_tp`` and
    ``moe_ep`` how each MoE layer's experts are split (``moe_tp × moe_ep`` GPUs). ``batch`` the
    worker's batch cap (per worker, over its data-parallel ranks), ``workers`` how many
    identical workers there are.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    moe_tp: int = 1
    moe_ep: int = 1
    batch: int | None = None
    workers: int = 1

    @property
    def gpus(self) -> int:
        """GPUs of one worker: attention groups (``tp × dp``) or expert groups, per stage."""
        return max(self.tp * self.dp, self.moe_tp * self.moe_ep) * self.pp


@dataclass(frozen=True, slots=True)
class SiliconRow:
    id: str
    backend: str
    version: str
    model_path: str
    system: str
    precision: str
    gemm_quant: str
    moe_quant: str
    mode: str  # "agg" | "disagg"
    isl: int
    osl: int
    concurrency: int
    ttft_ms: float | None
    tpot_ms: float | None
    agg: Layout | None = None
    prefill: Layout | None = None
    decode: Layout | None = None
    source: str = ""
    # A disaggregated row that records both pools' worker counts; without them the deployment
    # is inferred (gateway.sim.silicon_disagg).
    workers_given: bool = True
    # Where the recorded deployment came from when the row itself records none: the id of a
    # sibling run that does (:func:`sibling_deployments`).
    deployment_of: str | None = None

    @property
    def model(self) -> str | None:
        return model_profile_of(self.model_path)

    @property
    def recipe(self) -> Recipe:
        """How its benchmark client ran the closed loop (:func:`recipe_of`)."""
        return recipe_of(self.source)

    @property
    def family(self) -> str:
        return FAMILIES.get(self.model or "", self.model_path)

    @property
    def device(self) -> str | None:
        return device_of(self.system)

    @property
    def measured(self) -> datetime.date | None:
        """The day the run was measured (``measured=YYYY-MM-DD…`` in its source), if recorded."""
        m = _MEASURED.search(self.source)
        if m is None:
            return None
        try:
            return datetime.date.fromisoformat(m.group(1))
        except ValueError:
            return None


_MEASURED = re.compile(r"measured=(\d{4}-\d{2}-\d{2})")


def _int(d: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    raw = (d.get(key) or "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise RowError(f"{key}: not a number: {raw!r}") from None
    return value


def _float(d: Mapping[str, str], key: str) -> float | None:
    raw = (d.get(key) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RowError(f"{key}: not a number: {raw!r}") from None
    return value if math.isfinite(value) and value > 0 else None


def _layout(d: Mapping[str, str], prefix: str) -> Layout:
    def get(name: str, default: int) -> int:
        value = _int(d, prefix + name, default)
        # 0 in a layout column means "not used" (seen in moe_ep_size): one way.
        return max(1, value if value is not None else default)

    workers = _int(d, prefix + "num_workers", 1) if prefix else 1
    batch = _int(d, prefix + "batch_size")
    tp, dp = get("tp_size", 1), get("attention_dp_size", 1)
    moe_tp, moe_ep = get("moe_tp_size", 1), get("moe_ep_size", 1)
    if prefix and _int(d, prefix + "moe_tp_size") == 0 and _int(d, prefix + "moe_ep_size") == 0:
        # A disaggregated worker with neither expert split recorded (vLLM with data-parallel
        # attention and no --enable-expert-parallel) shards each expert over all its ranks.
        moe_tp = tp * dp
    return Layout(
        tp=tp,
        pp=get("pp_size", 1),
        dp=dp,
        moe_tp=moe_tp,
        moe_ep=moe_ep,
        batch=batch if batch and batch > 0 else None,
        workers=max(1, workers or 1),
    )


_CONCURRENCY = re.compile(r"silicon_concurrency=(\d+)")


def concurrency_of(d: Mapping[str, str]) -> int:
    """Closed-loop clients: ``silicon_concurrency=C`` in the source column; rows without it
    ran one client per batch slot: the batch size times the workers, and for a disaggregated
    row times the decode workers' attention data-parallel ranks (its batch column is per rank:
    every xPyD row that records ``C`` has ``C = decode batch × attention DP × decode
    workers``)."""
    m = _CONCURRENCY.search(d.get("silicon_data_source") or "")
    if m:
        return int(m.group(1))
    mode = (d.get("mode") or "").strip()
    if mode == "disagg":
        batch = _int(d, "decode_batch_size")
        workers = (_int(d, "decode_num_workers", 1) or 1) * max(
            1, _int(d, "decode_attention_dp_size", 1) or 1
        )
    else:
        batch = _int(d, "batch_size")
        workers = 1
    if not batch:
        raise RowError("no silicon_concurrency in silicon_data_source and no batch size")
    return batch * workers


def parse_row(d: Mapping[str, str]) -> SiliconRow:
    """A row of the silicon-sample CSV (a ``csv.DictReader`` dict); :class:`RowError` if it
    lacks what a simulation needs."""
    rid = (d.get("id") or "").strip()
    if not rid:
        raise RowError("missing id")
    mode = (d.get("mode") or "").strip()
    if mode not in ("agg", "disagg"):
        raise RowError(f"mode must be agg or disagg, not {mode!r}")
    isl, osl = _int(d, "isl"), _int(d, "osl")
    if not isl or not osl or isl <= 0 or osl <= 0:
        raise RowError("isl and osl must be positive integers")
    common: dict[str, Any] = {
        "id": rid,
        "backend": (d.get("backend") or "").strip().lower(),
        "version": (d.get("backend_version") or "").strip(),
        "model_path": (d.get("model_path") or "").strip(),
        "system": (d.get("system") or "").strip().lower(),
        "precision": (d.get("precision") or "").strip().lower(),
        "gemm_quant": (d.get("gemm_quant_mode") or "").strip().lower(),
        "moe_quant": (d.get("moe_quant_mode") or "").strip().lower(),
        "mode": mode,
        "isl": isl,
        "osl": osl,
        "concurrency": concurrency_of(d),
        "ttft_ms": _float(d, "silicon_ttft_ms"),
        "tpot_ms": _float(d, "silicon_tpot_ms"),
        "source": d.get("silicon_data_source") or "",
    }
    if mode == "agg":
        return SiliconRow(**common, agg=_layout(d, ""))
    given = all((d.get(f"{role}_num_workers") or "").strip() for role in ("prefill", "decode"))
    return SiliconRow(
        **common,
        prefill=_layout(d, "prefill_"),
        decode=_layout(d, "decode_"),
        workers_given=given,
    )


def _run_key(row: SiliconRow) -> tuple[object, ...]:
    """What makes two disaggregated runs the same benchmark point: engine and version, model
    (its profile: DeepSeek-R1 and -V3 share one architecture), system, precision, lengths and
    client count."""
    return (
        row.backend,
        row.version,
        row.model or row.model_path,
        row.system,
        row.precision,
        row.isl,
        row.osl,
        row.concurrency,
    )


def sibling_deployments(rows: Sequence[SiliconRow]) -> list[SiliconRow]:
    """``rows`` with each disaggregated row that records no worker counts given the
    deployment a sibling records: the first row of the same benchmark point (:func:`_run_key`)
    that records its prefill and decode workers, batches and layouts.

    A benchmark pipeline deploys one configuration per point, and a results file often holds
    the same point more than once, once with the deployment and once without (the silicon
    sample's dated source files repeat its results-database rows). The deployment a sibling
    records is a fact about the run; inferring one (:mod:`gateway.sim.silicon_disagg`) is the
    fallback where no sibling records it. Measurements are never read."""
    recorded: dict[tuple[object, ...], SiliconRow] = {}
    for r in rows:
        if r.mode == "disagg" and r.workers_given:
            recorded.setdefault(_run_key(r), r)

    def filled(r: SiliconRow) -> SiliconRow:
        sib = recorded.get(_run_key(r)) if r.mode == "disagg" and not r.workers_given else None
        if sib is None:
            return r
        return replace(
            r, prefill=sib.prefill, decode=sib.decode, workers_given=True, deployment_of=sib.id
        )

    return [filled(r) for r in rows]


def without_deployments(rows: Sequence[SiliconRow]) -> list[SiliconRow]:
    """``rows`` with each disaggregated row's recorded worker counts and batches dropped, so
    that its deployment is inferred (:mod:`gateway.sim.silicon_disagg`): how well the inference
    recovers the deployments that are recorded. A row whose client count is itself derived
    from its deployment (no ``silicon_concurrency``, :func:`concurrency_of`) keeps it."""

    def stripped(r: SiliconRow) -> SiliconRow:
        if r.mode != "disagg" or r.prefill is None or r.decode is None:
            return r
        if not _CONCURRENCY.search(r.source):
            return r
        return replace(
            r,
            prefill=replace(r.prefill, batch=None, workers=1),
            decode=replace(r.decode, batch=None, workers=1),
            workers_given=False,
            deployment_of=None,
        )

    return [stripped(r) for r in rows]


def read_rows(path: Path) -> list[dict[str, str]]:
    """The raw rows of a CSV file in the silicon-sample format."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- weights -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Weights:
    """How a checkpoint stores its weights and what its GEMMs compute in.

    ``dense`` the attention, dense-FFN and shared-expert weights, ``experts`` the routed
    experts, ``compute`` the GEMM input dtype (the tensor-core peak that applies).
    """

    dense: str
    experts: str
    compute: str


def weights_of(row: SiliconRow, *, fp4_gemms: bool = False) -> Weights:
    """The row's weight formats, from ``precision``, ``gemm_quant_mode`` and
    ``moe_quant_mode``; ``fp4_gemms``: the row's GPU has FP4 tensor cores (Blackwell).

    * empty precision (TensorRT-LLM Llama rows) and ``bf16``/``fp16``: 16-bit throughout;
    * ``fp8`` (per-tensor or 128×128 blocks): FP8 weights and FP8 GEMMs;
    * ``int4`` / ``int4_wo`` (Kimi-K2.5): INT4 weight-only routed experts, group size 32; the
      checkpoint leaves attention, shared experts and dense MLPs in BF16 (config.json
      ``quantization_config.ignore``); GEMMs run in BF16;
    * ``fp4`` / ``nvfp4`` / ``mxfp4`` on gpt-oss: its own checkpoint's MXFP4 routed experts
      (its config leaves attention, router, embeddings in BF16, ``modules_to_not_convert``),
      run as BF16 GEMMs (the weights dequantised in the kernel);
    * ``fp4`` / ``nvfp4`` on any other model: NVIDIA's NVFP4 checkpoint of it, every linear
      layer but those its ``hf_quant_config.json`` excludes (``nvfp4_unquantised_params_b``)
      in NVFP4; FP4 GEMMs where the GPU has FP4 tensor cores, else BF16 GEMMs over the
      dequantised weights. FP8 precision over NVFP4 experts keeps the rest in FP8;
    * ``w4a8`` / ``w4afp8`` experts: INT4 expert weights over FP8 activations and GEMMs.
    """
    p, g, m = (x.lower() for x in (row.precision, row.gemm_quant, row.moe_quant))
    sixteen = ("", "bf16", "fp16", "bfloat16", "float16", "auto")
    if p in sixteen and g in sixteen and m in sixteen:
        return Weights("bf16", "bf16", "bf16")
    if p in ("int4", "w4a16") or m.startswith(("int4", "w4a16_int4")):
        return Weights("bf16", "int4", "bf16")
    if m.startswith(("w4a8", "w4afp8")):  # INT4 experts over FP8 activations
        return Weights("fp8", "int4", "fp8")
    four = ("fp4", "nvfp4", "mxfp4")
    if p in four or m.startswith(four) or m == "w4a16_mxfp4":
        if (row.model or "").startswith("gpt-oss"):
            return Weights("bf16", "mxfp4", "bf16")
        dense = "fp8" if p == "fp8" else "nvfp4"  # FP8 attention over NVFP4 experts
        return Weights(dense, "nvfp4", "fp4" if fp4_gemms else "fp8" if dense == "fp8" else "bf16")
    if p == "fp8" or g.startswith("fp8"):
        experts = "fp8" if (m.startswith("fp8") or not m) else _fmt(m)
        return Weights("fp8", experts, "fp8")
    raise RowError(f"unknown precision {p!r} / {g!r} / {m!r}")


def _fmt(mode: str) -> str:
    for name in ("fp8", "int4", "mxfp4", "nvfp4"):
        if mode.startswith(name):
            return name
    return "bf16"


# -- the closed loop ---------------------------------------------------------------------------


class LoopEngine(Protocol):
    """What :func:`closed_loop` drives: :class:`backends.emulator.engine.Engine` through its step
    methods (no event loop: the loop here is the clock)."""

    running: Any
    waiting: Any

    def submit(self, prompt_tokens: int, max_new_tokens: int) -> Any: ...


class ManualClock:
    """A clock the closed loop sets by hand (an engine's ``Clock`` for :meth:`now`)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:  # pragma: no cover - not used
        raise RuntimeError("the closed loop drives the engine's steps itself")


@dataclass
class LoopResult:
    """Means over the counted requests (seconds), and how much was run.

    ``wait_s`` is the part of TTFT a request spends before the engine admits it (the front end,
    then the step already running when it arrives); ``ttft_s − wait_s`` is TTFT as the engine
    sees it. ``admitted_together`` is how many requests the engine admitted at the same step
    boundary, averaged over the counted requests: 1 when the clients are desynchronised, up to
    the client count when they arrive as one wave.
    """

    ttft_s: float
    tpot_s: float
    counted: int
    waves: int
    steps: int
    converged: bool
    wait_s: float = 0.0
    admitted_together: float = 1.0


@dataclass(frozen=True, slots=True)
class Recipe:
    """How a row was measured: how its benchmark client ran the closed loop (an uncounted
    warm-up wave or not, ``rounds × C`` counted requests, each request's prompt and output
    lengths drawn uniformly from ``[length_ratio · L, L]``, ``1.0``: fixed lengths), and the
    per-step token budget the pipeline's deployment generator wrote into the engine's config:
    ``batch + isl + token_headroom`` on an aggregated worker, ``isl + token_headroom`` on a
    prefill worker (``None``: the engine's own default)."""

    name: str
    warmup: bool
    rounds: int
    length_ratio: float = 1.0
    token_headroom: int | None = None

    def lengths(self, rng: random.Random, isl: int, osl: int) -> tuple[int, int]:
        """One request's prompt and output lengths (``benchmark_serving.py``'s random dataset:
        ``randint(int(L · ratio), L)`` for each)."""
        if self.length_ratio >= 1.0:
            return isl, osl
        return (
            rng.randint(max(1, int(isl * self.length_ratio)), isl),
            rng.randint(max(1, int(osl * self.length_ratio)), osl),
        )


# AIConfigurator's benchmark recipe (silicon/README.md of the calibration data). The same
# pipeline deploys the engines with its generator's benchmark rules (aiconfigurator 0.12.0,
# generator/rule_plugin/benchmark/{trtllm,vllm,sglang}.rule): TensorRT-LLM's and vLLM's
# max_num_tokens = max_batch_size + ISL + 1500 on an aggregated worker and ISL + 1500 on a
# prefill worker (SGLang's rows show no sign of its rules: silicon_run.recipe_budget). With the
# engines' default 8,192 a burst of C short prompts would be prefilled eight at a time; these
# configs take one or two.
AIPERF = Recipe("aiperf", warmup=True, rounds=20, token_headroom=1500)
# The dated source files and the results-database dump: vLLM's/SGLang's benchmark_serving.py
# with --random-range-ratio 0.8 --num-prompts 10×C and no warm-up. That their clients are
# desynchronised is in the rows themselves: on the aggregated vLLM series of these sources the
# measured TTFT over a desynchronised loop's is steady from 4 to 256 clients (1.2-2.1 by model),
# where over a synchronised loop's it swings threefold (docs/accuracy.md).
BENCH_SERVING = Recipe("bench_serving", warmup=False, rounds=10, length_ratio=0.8)


def recipe_of(source: str) -> Recipe:
    """The benchmark recipe of a row, from its ``silicon_data_source``."""
    if source.startswith(("source_file=", "db-dump")):
        return BENCH_SERVING
    return AIPERF


class Stalled(RuntimeError):
    """The engine could make no progress (a request that can never be admitted)."""


def closed_loop(
    engine: Any,
    clock: ManualClock,
    step_time: Callable[[Any], float],
    *,
    concurrency: int,
    isl: int,
    osl: int,
    recipe: Recipe = AIPERF,
    tolerance: float = 0.005,
    min_waves: int = 2,
    max_steps: int = 2_000_000,
    frontend_s: float = 0.0,
    latency_s: float = 0.0,
    spread: bool = False,
) -> LoopResult:
    """Run a benchmark client's closed loop on ``engine`` as ``recipe`` does: one warm-up wave
    of ``concurrency`` requests (not counted) if it has one, then ``concurrency`` clients sending
    the recipe's ``rounds × concurrency`` requests back to back, each request's lengths drawn
    by the recipe from a fixed seed. Returns the mean TTFT and TPOT of
    the counted requests.

    ``step_time(shape)`` prices one step (the deployment's physics plus any drafting cost).
    ``frontend_s`` is the serving front end's work per request before the engine sees it
    (HTTP parsing, tokenisation), done one request at a time: a wave of ``C`` requests sent
    together reaches the engine spread over ``C · frontend_s``, and is counted in TTFT.
    ``latency_s`` is the serving path's latency from a token's step to the client (the engine's
    ``serving_latency_s``): the client reads every token that much later, so TTFT grows by
    it, TPOT does not, and the client sends its next request that much after the last step.
    A wave is ``concurrency`` counted completions. With fixed lengths, after ``min_waves`` waves
    the loop stops as soon as the counted means of TTFT and TPOT moved less than ``tolerance``
    (relative) over the last wave; with drawn lengths every request is run, as the client does.

    ``spread`` starts the counted clients one after another, evenly over the warm-up wave's
    latency, instead of as one burst: a fully desynchronised start, the other bound of what a
    closed loop's clients can look like (``bench_silicon --explain`` shows both).
    """
    if getattr(engine, "_bulk", False):
        # Finished sequences are read from each step's batch, which bulk decodes are not in.
        raise ValueError("closed_loop needs an engine built with bulk_decode=False")
    c = max(1, concurrency)
    rng = random.Random(0)
    settles = recipe.length_ratio >= 1.0  # fixed lengths: the pattern repeats
    arrival: dict[int, float] = {}
    admitted: dict[int, tuple[float, int]] = {}  # admission time, requests admitted with it
    pending: deque[tuple[float, float]] = deque()  # (reaches the engine, sent by the client)
    free_at = 0.0

    def send(now: float) -> None:
        nonlocal free_at
        free_at = max(free_at, now) + frontend_s
        pending.append((free_at, now))

    def admit(now: float) -> None:
        group = []
        while pending and pending[0][0] <= now:
            _, sent_at = pending.popleft()
            seq = engine.submit(*recipe.lengths(rng, isl, osl))
            arrival[id(seq)] = sent_at
            group.append(id(seq))
        for key in group:
            admitted[key] = (now, len(group))

    ttft_sum = tpot_sum = wait_sum = together_sum = 0.0
    counted = steps = sent = waves = 0
    for _ in range(c):
        send(clock.t)
    warm_left = c if recipe.warmup else 0
    counted_phase = not recipe.warmup
    converged = False
    total = recipe.rounds * c
    if counted_phase:
        sent = c
    prev: tuple[float, float] | None = None
    while True:
        admit(clock.t)
        step = engine._schedule(clock.t)
        if step is None:
            ready = [s.ready_at for s in engine.running if s.ready_at > clock.t]
            if pending:
                ready.append(pending[0][0])
            if not ready:
                raise Stalled("no step can run and nothing is in flight")
            clock.t = min(ready)
            continue
        batch, shape, drafting = step
        seconds = step_time(shape)
        if drafting is not None:
            seconds += engine._draft_time(*drafting)
        clock.t += seconds
        engine._apply(batch, clock.t)
        steps += 1
        if steps > max_steps:
            raise Stalled(f"no convergence after {max_steps} steps")
        done = [s for s, _ in batch if s.state == "finished"]
        if not done:
            continue
        now = clock.t
        for s in done:
            start = arrival.pop(id(s))
            admitted_at, together = admitted.pop(id(s))
            if not counted_phase:
                warm_left -= 1
                continue
            first = s.first_token_at if s.first_token_at is not None else now
            ttft_sum += first + latency_s - start
            wait_sum += admitted_at - start
            together_sum += together
            if s.generated > 1:
                tpot_sum += (now - first) / (s.generated - 1)
            counted += 1
            if counted % c == 0:
                waves += 1
                means = (ttft_sum / counted, tpot_sum / counted)
                settled = prev is not None and _close(means, prev, tolerance)
                if settles and settled and waves >= min_waves:
                    converged = True
                prev = means
            if sent < total and not converged:
                send(now + latency_s)
                sent += 1
        if not counted_phase and warm_left == 0:
            counted_phase = True
            for k in range(c):  # the warm-up wave started at 0 and ended now
                send(now + latency_s + (k * now / c if spread else 0.0))
            sent = c
        if counted_phase and (converged or counted >= total):
            break
    return LoopResult(
        ttft_sum / counted,
        tpot_sum / counted,
        counted,
        waves,
        steps,
        converged,
        wait_s=wait_sum / counted,
        admitted_together=together_sum / counted,
    )


def _close(a: tuple[float, float], b: tuple[float, float], tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance * max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


# -- train / check split ----------------------------------------------------------------------


def is_train(row_id: str) -> bool:
    """Whether a row is in the train half of the fit (a fixed hash of its id): engine
    profiles' fitted factors are fitted on train rows only and graded on the others."""
    return zlib.crc32(row_id.encode()) % 2 == 0


def fit_objective(pairs: Sequence[tuple[SiliconRow, Prediction]]) -> float:
    """What a fit minimises: median |TPOT error| + median |TTFT error| (each capped at 1, and
    1 for an uncovered row), so neither metric nor a few wild rows dominate."""
    tpot: list[float] = []
    ttft: list[float] = []
    for row, pred in pairs:
        e1 = rel_error(pred.tpot_ms, row.tpot_ms)
        e2 = rel_error(pred.ttft_ms, row.ttft_ms)
        tpot.append(min(1.0, abs(e1)) if e1 is not None else 1.0)
        ttft.append(min(1.0, abs(e2)) if e2 is not None else 1.0)
    if not tpot:
        return math.inf
    return median(tpot) + median(ttft)


# -- predictions and their grades --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the emulation predicts for one row (None and a reason where it cannot)."""

    id: str
    ttft_ms: float | None
    tpot_ms: float | None
    reason: str = ""
    wall_s: float = 0.0

    @property
    def covered(self) -> bool:
        return self.ttft_ms is not None and self.tpot_ms is not None


def rel_error(pred: float | None, measured: float | None) -> float | None:
    """``(pred − measured) / measured``; None when either is missing."""
    if pred is None or measured is None or measured <= 0:
        return None
    return (pred - measured) / measured


@dataclass(frozen=True, slots=True)
class Accuracy:
    """Coverage and error of predictions over a set of rows.

    ``tpot_within``/``ttft_within`` are shares of the *covered* rows inside the tolerance;
    medians are of |relative error| over the covered rows (NaN when none is covered). The
    biases are the median *signed* errors: which way a group is off (+: emulated too long).
    """

    rows: int
    covered: int
    tpot_within: float
    ttft_within: float
    tpot_median: float
    ttft_median: float
    tpot_bias: float = math.nan
    ttft_bias: float = math.nan

    @property
    def coverage(self) -> float:
        return self.covered / self.rows if self.rows else math.nan

    def meets_targets(self) -> bool:
        """The issue's targets: TPOT median ≤ 12 % and ≥ 65 % within ±15 %; TTFT median ≤ 25 %
        and ≥ 50 % within ±25 %; coverage ≥ 98 %."""
        return (
            self.coverage >= 0.98
            and self.tpot_median <= 0.12
            and self.tpot_within >= 0.65
            and self.ttft_median <= 0.25
            and self.ttft_within >= 0.50
        )


def accuracy(
    pairs: Iterable[tuple[SiliconRow, Prediction]],
    tpot_tol: float = TPOT_TOLERANCE,
    ttft_tol: float = TTFT_TOLERANCE,
) -> Accuracy:
    rows = covered = 0
    tpot_err: list[float] = []
    ttft_err: list[float] = []
    for row, pred in pairs:
        rows += 1
        if not pred.covered:
            continue
        covered += 1
        e_tpot = rel_error(pred.tpot_ms, row.tpot_ms)
        e_ttft = rel_error(pred.ttft_ms, row.ttft_ms)
        if e_tpot is not None:
            tpot_err.append(e_tpot)
        if e_ttft is not None:
            ttft_err.append(e_ttft)
    tpot_abs = [abs(e) for e in tpot_err]
    ttft_abs = [abs(e) for e in ttft_err]
    return Accuracy(
        rows=rows,
        covered=covered,
        tpot_within=_share(tpot_abs, tpot_tol),
        ttft_within=_share(ttft_abs, ttft_tol),
        tpot_median=median(tpot_abs) if tpot_abs else math.nan,
        ttft_median=median(ttft_abs) if ttft_abs else math.nan,
        tpot_bias=median(tpot_err) if tpot_err else math.nan,
        ttft_bias=median(ttft_err) if ttft_err else math.nan,
    )


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The best any predictor that reads only a row's inputs can score on a set of rows.

    Rows whose inputs are identical (engine and version, model, system, weights, mode,
    lengths, client count, benchmark recipe and layouts) but whose measurements differ are
    runs of deployments the rows do not tell apart: a disaggregated row without worker
    counts repeats a recorded run with one deployment and a run with another (or with a
    speculative decoder) on the same inputs. One prediction must serve every row of such a
    group, so at most the largest subset whose measurements share a tolerance band can be
    hit. ``tpot_within``/``ttft_within`` are those best shares over all ``rows``.
    """

    rows: int
    inputs: int  # distinct inputs among the rows
    tpot_within: float
    ttft_within: float


def inputs_of(row: SiliconRow) -> tuple[object, ...]:
    """Everything about a row a predictor may read: all but its id, its source's bookkeeping
    and its measurements."""
    return (
        row.backend,
        row.version,
        row.model_path,
        row.system,
        row.precision,
        row.gemm_quant,
        row.moe_quant,
        row.mode,
        row.isl,
        row.osl,
        row.concurrency,
        row.recipe.name,
        row.agg,
        row.prefill,
        row.decode,
        row.workers_given,
    )


def most_within(measured: Sequence[float], tol: float, floor: float = 0.0) -> int:
    """Most of ``measured`` one prediction ``p ≥ floor`` lies within ``tol`` of: each
    measurement m accepts the predictions in ``[m(1 − tol), m(1 + tol)]``, and the deepest
    overlap of those intervals at or above ``floor`` starts at one of their lower ends or at
    ``floor``."""
    starts = [max(floor, m * (1 - tol)) for m in measured] + [floor]
    return max(
        (sum(1 for m in measured if abs(p - m) <= tol * m + 1e-12) for p in starts), default=0
    )


def ceiling(
    rows: Sequence[SiliconRow],
    tpot_tol: float = TPOT_TOLERANCE,
    ttft_tol: float = TTFT_TOLERANCE,
) -> Ceiling:
    """:class:`Ceiling` of ``rows`` (rows without both measurements are left out)."""
    groups: dict[tuple[object, ...], list[SiliconRow]] = {}
    for row in rows:
        if row.tpot_ms and row.ttft_ms:
            groups.setdefault(inputs_of(row), []).append(row)
    n = sum(len(g) for g in groups.values())
    if not n:
        return Ceiling(0, 0, math.nan, math.nan)
    tpot = sum(most_within([r.tpot_ms or 0.0 for r in g], tpot_tol) for g in groups.values())
    ttft = sum(most_within([r.ttft_ms or 0.0 for r in g], ttft_tol) for g in groups.values())
    return Ceiling(n, len(groups), tpot / n, ttft / n)


def _share(errors: Sequence[float], tol: float) -> float:
    if not errors:
        return math.nan
    return sum(1 for e in errors if e <= tol + 1e-12) / len(errors)


def _bucket(value: int, edges: Sequence[int]) -> str:
    """``value``'s bucket among ascending upper ``edges``: ``"≤e"`` for the first edge it does
    not exceed, ``">last"`` above them all."""
    for e in edges:
        if value <= e:
            return f"≤{e}"
    return f">{edges[-1]}"


_BUCKET = re.compile(r"([≤>])(\d+)")


def _group_order(name: str) -> tuple[int, int, str]:
    """Buckets in numeric order (``≤8`` before ``≤32`` before ``>128``), other names by name."""
    m = _BUCKET.fullmatch(name)
    if m is None:
        return (0, 0, name)
    return (1, 2 * int(m.group(2)) + (m.group(1) == ">"), name)


BREAKDOWNS: dict[str, Callable[[SiliconRow], str]] = {
    "mode": lambda r: r.mode,
    # A disaggregated row's deployment: as the row records it (worker counts and batch sizes)
    # or inferred (gateway.sim.silicon_disagg); aggregated rows always give theirs.
    "deployment": lambda r: (
        "sibling" if r.deployment_of else "given" if r.workers_given else "inferred"
    ),
    "engine": lambda r: r.backend,
    "family": lambda r: r.family,
    "device": lambda r: r.system,
    # The benchmark client that measured the row (aiperf's bursts or benchmark_serving's
    # drawn lengths), which decides how synchronised its clients are.
    "client": lambda r: r.recipe.name,
    # How synchronised a closed loop's waves stay depends on the prompt and the client count.
    "isl": lambda r: _bucket(r.isl, (1500, 5000)),
    "clients": lambda r: _bucket(r.concurrency, (8, 32, 128)),
}


def breakdown(
    pairs: Sequence[tuple[SiliconRow, Prediction]], key: Callable[[SiliconRow], str]
) -> dict[str, Accuracy]:
    """:func:`accuracy` per group of rows (groups sorted by name)."""
    groups: dict[str, list[tuple[SiliconRow, Prediction]]] = {}
    for row, pred in pairs:
        groups.setdefault(key(row), []).append((row, pred))
    return {k: accuracy(groups[k]) for k in sorted(groups, key=_group_order)}


@dataclass
class Table:
    """Accuracy tables as text (the harness's summary)."""

    lines: list[str] = field(default_factory=list)

    HEADER = (
        f"{'group':<24} {'rows':>5} {'cov':>6} {'TPOT±15%':>9} {'TPOT med':>9} "
        f"{'TPOT bias':>9} {'TTFT±25%':>9} {'TTFT med':>9} {'TTFT bias':>9}"
    )

    def add(self, name: str, a: Accuracy) -> None:
        self.lines.append(
            f"{name:<24} {a.rows:>5} {percent(a.coverage):>6} {percent(a.tpot_within):>9} "
            f"{percent(a.tpot_median):>9} {_signed(a.tpot_bias):>9} {percent(a.ttft_within):>9} "
            f"{percent(a.ttft_median):>9} {_signed(a.ttft_bias):>9}"
        )

    def text(self) -> str:
        return "\n".join([self.HEADER, *self.lines])


def percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.0f}%"


def summary_table(pairs: Sequence[tuple[SiliconRow, Prediction]]) -> str:
    """All rows, then by mode, deployment, engine, model family, device, benchmark client,
    prompt length and client count, then the :func:`ceiling`."""
    t = Table()
    t.add("all", accuracy(pairs))
    for name, key in BREAKDOWNS.items():
        for group, acc in breakdown(pairs, key).items():
            t.add(f"{name}={group}", acc)
    return t.text() + "\n" + ceiling_lines([row for row, _ in pairs])


def ceiling_lines(rows: Sequence[SiliconRow]) -> str:
    """The :func:`ceiling` of all rows and of each mode, as the summary's closing lines."""
    lines = [
        "ceiling (best any input-only prediction can reach; identical inputs, differing runs):"
    ]
    modes = sorted({r.mode for r in rows})
    for name, part in [("all", list(rows))] + [
        (f"mode={m}", [r for r in rows if r.mode == m]) for m in modes
    ]:
        c = ceiling(part)
        lines.append(
            f"  {name:<22} {c.rows:>5} rows, {c.inputs:>5} distinct inputs: "
            f"TPOT±15% {percent(c.tpot_within)}, TTFT±25% {percent(c.ttft_within)}"
        )
    return "\n".join(lines)
