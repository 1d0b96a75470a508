"""The chaos soak, short: every fault phase for a few seconds under mixed traffic
(``loadtests/chaos.py``; the long run's figures are in docs/failures.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.bench_gateway import run_loop
from loadtests.chaos import PHASES, soak


@pytest.mark.timeout(180)
def test_short_chaos_soak_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    result = soak(seconds=36, concurrency=4, logs=tmp_path)
    result = run_loop(result)
    print(result.report())
    assert all(result.tallies[name].sent > 0 for name in PHASES)
    assert result.lost() == 0, result.table()
    assert result.misattributed() == 0, [t.misattributed for t in result.tallies.values()]
    assert not {k: v for k, v in result.leftovers.items() if v}
    ok = sum(t.outcomes["ok"] for t in result.tallies.values())
    client = sum(t.outcomes["client_error"] for t in result.tallies.values())
    assert ok > 0
    assert client > 0  # the client's errors came back as such
    assert result.rss_growth_mb() < 40
