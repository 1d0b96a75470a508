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
        "--model-path", row.model_path,
        "--system", row.system,
        "--backend", row.backend,
        "--isl", str(row.isl),
        "--osl", str(row.osl),
        "--gemm-quant-mode", _quant(row.gemm_quant),
        "--moe-quant-mode", _quant(row.moe_quant),
        "--log-level", "ERROR",
    ]  # fmt: skip
    if row.mode == "agg" and row.agg is not None:
        cmd += ["--estimate-mode", "agg", *_layout_args("", row.agg, row.agg.batch)]
    elif row.prefill is not None and row.decode is not None:
        cmd += ["--estimate-mode", "disagg"]
        cmd += _layout_args("prefill-", row.prefill, row.prefill.batch)
        cmd += _layout_args("decode-", row.decode, row.decode.batch)
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
