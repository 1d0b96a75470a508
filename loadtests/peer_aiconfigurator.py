"""NVIDIA AIConfigurator as a peer for ``bench_silicon --peer aiconfigurator``.

Runs ``aiconfigurator cli estimate`` (optional extra: ``pip install 'pdgate[aiconfigurator]'``)
offline for one silicon row with the row's own model, system, engine, lengths, layout, batch
size and quantisation, and reads its TTFT and TPOT. Only the estimator is called; nothing of
the package's bundled data is read here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.sim.silicon import Layout, Prediction, SiliconRow

_TTFT = re.compile(r"TTFT:\s+([0-9.]+)\s*ms")
_TPOT = re.compile(r"TPOT:\s+([0-9.]+)\s*ms")
TIMEOUT_S = 300


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("aiconfigurator")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("aiconfigurator")
    if found is None:
        raise FileNotFoundError("aiconfigurator is not installed (pip install aiconfigurator)")
    return [found]


def _quant(mode: str) -> str:
    return {"": "bfloat16", "bf16": "bfloat16", "fp16": "bfloat16"}.get(mode, mode)


# Offline, AIConfigurator reads a model's config.json from a local directory; these are the
# calibration data's copies of the Hugging Face configs (silicon/model_configs).
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "shared/calibration/silicon/model_configs"
CONFIG_FILES = {
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama--Meta-Llama-3.1-8B_config.json",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "meta-llama--Meta-Llama-3.1-8B_config.json",
    "meta-llama/Llama-3.1-70B": "meta-llama--Meta-Llama-3.1-70B_config.json",
    "zhipuai/GLM-5": "zai-org--GLM-5-FP8_config.json",
}


def _model_path(row: SiliconRow, configs: Path = MODEL_CONFIGS) -> str:
    """The row's model for AIConfigurator: a local directory holding its config.json where the
    Hugging Face name alone does not resolve offline."""
    name = CONFIG_FILES.get(row.model_path)
    if name is None or not (configs / name).exists():
        return row.model_path
    target = Path(tempfile.gettempdir()) / "pdgate-aic-models" / row.model_path.replace("/", "--")
    target.mkdir(parents=True, exist_ok=True)
    dest = target / "config.json"
    if not dest.exists():
        shutil.copyfile(configs / name, dest)
    return str(target)


def _quants(row: SiliconRow) -> tuple[str, str]:
    """GEMM and MoE quantisation in AIConfigurator's names: gpt-oss's 4-bit experts on Hopper
    are MXFP4 weights with 16-bit activations (``w4a16_mxfp4``)."""
    if row.model_path.startswith("openai/gpt-oss") and row.precision in ("fp4", "mxfp4"):
        return "bfloat16", "w4a16_mxfp4"
    return _quant(row.gemm_quant), _quant(row.moe_quant)


def _layout_args(prefix: str, lay: Layout, batch: int | None) -> list[str]:
    args = [
        f"--{prefix}tp-size", str(lay.tp),
        f"--{prefix}pp-size", str(lay.pp),
        f"--{prefix}attention-dp-size", str(lay.dp),
        f"--{prefix}moe-tp-size", str(lay.moe_tp),
        f"--{prefix}moe-ep-size", str(lay.moe_ep),
    ]  # fmt: skip
    if batch:
        args += [f"--{prefix}batch-size", str(batch)]
    if prefix:
        args += [f"--{prefix}num-workers", str(lay.workers)]
    return args


def command(row: SiliconRow) -> list[str]:
    """The ``aiconfigurator cli estimate`` command line for ``row``."""
    cmd = [
        *_cli(), "cli", "estimate",
        "--model-path", _model_path(row),
        "--system", row.system,
        "--backend", row.backend,
        "--isl", str(row.isl),
        "--osl", str(row.osl),
        "--gemm-quant-mode", _quants(row)[0],
        "--moe-quant-mode", _quants(row)[1],
        "--log-level", "ERROR",
    ]  # fmt: skip
    if row.mode == "agg" and row.agg is not None:
        cmd += ["--estimate-mode", "agg", *_layout_args("", row.agg, row.agg.batch)]
    elif row.prefill is not None and row.decode is not None:
        cmd += ["--estimate-mode", "disagg"]
        # Rows that give no batch sizes: one prompt per prefill batch, the clients spread over
        # the decode workers.
        decode_batch = row.decode.batch or max(1, row.concurrency // row.decode.workers)
        cmd += _layout_args("prefill-", row.prefill, row.prefill.batch or 1)
        cmd += _layout_args("decode-", row.decode, decode_batch)
    return cmd


def predict(row: SiliconRow) -> Prediction:
    """AIConfigurator's TTFT and TPOT for ``row`` (None and the reason where it fails)."""
    wall = time.perf_counter()
    try:
        out = subprocess.run(
            command(row), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Prediction(row.id, None, None, f"aiconfigurator: {exc}")
    text = out.stdout + out.stderr
    ttft, tpot = _TTFT.search(text), _TPOT.search(text)
    if out.returncode != 0 or ttft is None or tpot is None:
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return Prediction(row.id, None, None, f"aiconfigurator: {last[0][:200]}")
    return Prediction(
        row.id, float(ttft.group(1)), float(tpot.group(1)), "", time.perf_counter() - wall
    )
