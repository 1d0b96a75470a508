"""``pdgate`` command line: one subcommand per module.

    pdgate serve [--config FILE] [--host H] [--port P] [--log-level L] [--log-format F]
    pdgate report RESULTS... [--out DIR] [--slo-ttft S] [--slo-tpot S]
    pdgate backend --device D --model M [--role prefill|decode|both] [--port P] ...
    pdgate simulate (--device D --model M [--count N --tp N] | --config FILE) WORKLOAD LOAD
    pdgate calibrate [--points ID,...] [--json]
    pdgate plan --model M WORKLOAD --rate R --slo ttft:p90=S ... [--devices D,...] [--plot F]

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; :data:`COMMANDS` maps names to (module, one-line help). Modules are
imported only when used, so ``pdgate serve`` does not pay for the others' imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.commands.serve", "run the gateway"),
    "report": (
        "gateway.commands.report",
        "plot a load test (locust CSV) or simulations (simulate --json): TTFT, ITL, goodput",
    ),
    "backend": (
        "backends.server.cli",
        "run one emulated instance as an OpenAI server speaking vLLM's and SGLang's P/D protocols",
    ),
    "simulate": (
        "gateway.commands.simulate",
        "simulate a deployment (or a whole config) under a workload, in virtual time",
    ),
    "calibrate": (
        "gateway.commands.calibrate",
        "check the emulated devices against the published reference points",
    ),
    "plan": (
        "gateway.sim.plan.command",
        "find the cheapest deployment (mode, devices, counts, layouts) meeting a workload's SLOs",
    ),
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name][0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="pdgate",
        description="Disaggregated prefill/decode LLM gateway with calibrated device emulation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, text) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text, add_help=name == chosen)
        if name == chosen:
            _load(name).configure(command)
    args = parser.parse_args(argv)
    code: int = _load(args.command).run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
