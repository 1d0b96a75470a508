"""Did a change make the gateway cheaper? Two versions of it on one cluster, in alternating
rounds, compared as paired ratios.

On a shared machine the speed drifts by tens of percent within minutes, so two runs of
``bench_gateway`` an hour apart cannot tell a 5 % change from the weather. Here both versions
run at once in front of the same four backends (``bench_gateway``'s cluster, device timing
off); each round measures A then B (B then A in the next, so neither always goes first) for
``--duration`` seconds, and the report is the median over rounds of B's figure divided by A's
in the same round. For ``c1`` it then also takes turns (``--turns`` rounds of one request
each to A, B and direct-pd): latency differences of a fraction of a millisecond need that,
and several runs (see ``bench_gateway.Turns``).

A version is a git revision (its ``gateway/`` and ``backends/`` exported to a temporary
directory) or ``.``, the working tree::

    python -m loadtests.bench_ab                         # HEAD against the working tree, c64
    python -m loadtests.bench_ab --a HEAD~3 --b HEAD --scenario stream64 --rounds 4

Linux only (``/proc``). Every process it starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from loadtests.bench_gateway import (
    SCENARIOS,
    Processes,
    Result,
    Turns,
    client_session,
    exit_on_sigterm,
    free_port,
    gateway_config,
    make_sender,
    measure,
    plain_sender,
    run_loop,
    start_cluster,
    take_turns,
    wait_serving,
)

ROOT = Path(__file__).resolve().parents[1]
WORKING_TREE = "."


def export(revision: str, into: Path) -> Path:
    """The directory whose ``gateway`` and ``backends`` packages are ``revision``'s."""
    if revision == WORKING_TREE:
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "gateway", "backends"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def gateway_argv(source: Path, config: Path, port: int) -> list[str]:
    """``pdgate serve`` with ``source``'s packages first on the import path."""
    start = (
        f"import sys; sys.path.insert(0, {str(source)!r}); "
        "from gateway.cli import main; raise SystemExit(main())"
    )
    return [
        sys.executable, "-c", start, "serve", "--config", str(config),
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


@dataclass
class Comparison:
    scenario: str
    a: str
    b: str
    rounds: list[tuple[Result, Result]]  # (A's, B's), one pair per round
    turns: Turns | None = None  # c1: A, B and direct-pd in turns

    def ratio(self, field: str) -> float:
        """Median over rounds of B's ``field`` over A's."""
        pairs = [(getattr(a, field), getattr(b, field)) for a, b in self.rounds]
        return statistics.median(b / a for a, b in pairs if a)

    def report(self) -> str:
        lines = [
            f"| round | {self.a} req/s | {self.b} req/s | {self.a} CPU ms/req "
            f"| {self.b} CPU ms/req |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, (a, b) in enumerate(self.rounds, 1):
            lines.append(
                f"| {i} | {a.rps:.0f} | {b.rps:.0f} | {a.cpu_ms_per_req or 0:.3f} "
                f"| {b.cpu_ms_per_req or 0:.3f} |"
            )
        lines += [
            "",
            f"* {self.scenario}, {self.b} / {self.a}, median of paired rounds: "
            f"req/s {self.ratio('rps'):.3f}, tokens/s {self.ratio('tokens_per_s'):.3f}, "
            f"gateway CPU per request {self.ratio('cpu_ms_per_req'):.3f}",
        ]
        if self.turns is not None:
            lines += ["", f"A: {self.a}, B: {self.b}"]
            lines += [f"* {line}" for line in self.turns.report("direct-pd")]
            lines.append(
                f"* c1 in turns, B − A (median of paired rounds): "
                f"{self.turns.added_ms('B', 'A'):+.3f} ms"
            )
        return "\n".join(lines)


async def compare(args: argparse.Namespace) -> Comparison:
    scenario = next(s for s in SCENARIOS if s.name == args.scenario)
    versions = {"A": args.a, "B": args.b}
    with tempfile.TemporaryDirectory(prefix="pdgate-ab-") as tmp, Processes(Path(tmp)) as procs:
        cluster = await start_cluster(procs, [])
        config = procs.logs / "gateway.yaml"
        config.write_text(
            yaml.safe_dump(gateway_config("vllm-nixl", cluster.prefill, cluster.decode))
        )
        fronts = {}
        for name, revision in versions.items():
            source = export(revision, Path(tmp) / f"src-{name}")
            port = free_port()
            fronts[name] = procs.start(name, gateway_argv(source, config, port), port)
        async with client_session() as session:
            await asyncio.gather(*(wait_serving(session, p) for p in fronts.values()))
        rounds: list[tuple[Result, Result]] = []
        for i in range(args.rounds):
            got: dict[str, Result] = {}
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                front = fronts[name]
                async with client_session() as session:
                    got[name] = await measure(
                        plain_sender(session, [front.url], scenario), scenario, versions[name],
                        duration=args.duration, warmup=args.warmup, router_pid=front.pid,
                        backend_pids=cluster.backend_pids,
                    )  # fmt: skip
                errors = got[name].errors
                if errors:
                    raise SystemExit(f"{versions[name]}: {errors} errors: {got[name].error_kinds}")
            rounds.append((got["A"], got["B"]))
            a, b = got["A"], got["B"]
            print(
                f"# round {i + 1}: {args.a} {a.rps:.0f} req/s, {args.b} {b.rps:.0f} req/s",
                file=sys.stderr,
                flush=True,
            )
        turns = None
        if scenario.name == "c1" and args.turns:
            async with client_session() as session:
                senders = {
                    name: plain_sender(session, [front.url], scenario)
                    for name, front in fronts.items()
                }
                senders["direct-pd"] = make_sender(session, cluster, "direct-pd", scenario)
                turns = await take_turns(senders, args.turns)
    return Comparison(args.scenario, _label(args.a), _label(args.b), rounds, turns)


def _label(revision: str) -> str:
    return "working tree" if revision == WORKING_TREE else revision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_ab", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--a", default="HEAD", help="the version before (a git revision, or .)")
    parser.add_argument("--b", default=WORKING_TREE, help="the version after")
    parser.add_argument("--scenario", default="c64", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each")
    parser.add_argument(
        "--turns", type=int, default=1000,
        help="c1 only: then rounds of one request each to A, B and direct-pd in turn",
    )  # fmt: skip
    args = parser.parse_args(argv)
    exit_on_sigterm()
    print(run_loop(compare(args)).report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
