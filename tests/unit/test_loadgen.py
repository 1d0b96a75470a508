"""The locust load generator's parts: prompts, workloads, arrivals, stream timing, result files."""

from __future__ import annotations

import csv
import itertools
import random
import statistics
from pathlib import Path

import pytest

from backends.tokens import TokenCounter
from gateway.prefix import chat_block_hashes
from gateway.sim.workload import RequestSpec, parse_length
from loadtests.pdgate_load import (
    REQUEST_COLUMNS,
    AgentWorkload,
    ItlHistogram,
    Pacer,
    RequestLog,
    Schedule,
    TraceArrivals,
    TraceWorkload,
    WorkloadOptions,
    make_workload,
    read_stream,
    text,
)

COUNTER = TokenCounter()


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_text_is_exact_and_deterministic() -> None:
    assert len(text(100, 1).encode()) == 400
    assert text(100, 1) == text(100, 1)
    assert text(100, 1) != text(100, 2)
    assert COUNTER.text(text(37, 5)) == 37


def test_chat_prompts_count_exactly_on_the_gateway() -> None:
    options = WorkloadOptions(prompt=parse_length("500"), output=parse_length("20"))
    chat = make_workload("chat", options, random.Random(1))
    req = chat.next_request()
    assert COUNTER.chat(req.messages) == 500
    assert req.max_tokens == 20
    body = req.body("m")
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_rag_prompts_are_long_and_share_popular_documents() -> None:
    options = WorkloadOptions(rag_prompt=parse_length("4000"))
    rag = make_workload("rag", options, random.Random(2))
    prompts = [rag.next_request().messages for _ in range(30)]
    assert {COUNTER.chat(m) for m in prompts} == {4000}
    firsts = [m[1]["content"][:4096] for m in prompts]
    assert len(set(firsts)) < len(firsts), "popular documents come back as shared prefixes"


def test_agent_sessions_grow_on_a_shared_prefix() -> None:
    agent = AgentWorkload(parse_length("10"), random.Random(3), turns=3, system_tokens=512)
    turns = []
    for _ in range(3):
        req = agent.next_request()
        turns.append(req.messages)
        agent.observe("an answer", ok=True)
    for before, after in itertools.pairwise(turns):
        assert after[: len(before)] == before
        assert len(after) == len(before) + 2
    hashes = [chat_block_hashes(m) for m in turns]
    assert hashes[1][: len(hashes[0])] == hashes[0], "prefix-aware routing sees the reuse"
    fresh = agent.next_request().messages  # after 3 turns, a new session
    assert len(fresh) == 2
    assert fresh[0] == turns[0][0], "every session shares the system prompt"
    assert fresh[1] != turns[0][1]


def test_a_failed_turn_restarts_the_session() -> None:
    agent = AgentWorkload(parse_length("10"), random.Random(4), turns=5)
    agent.next_request()
    agent.observe("", ok=False)
    assert len(agent.next_request().messages) == 2


def test_mix_picks_each_kind() -> None:
    rng = random.Random(5)
    kinds = {make_workload("mix", WorkloadOptions(), rng).kind for _ in range(60)}
    assert kinds == {"chat", "rag", "agent"}
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", WorkloadOptions(), rng)


def test_trace_prompts_share_text_where_hash_ids_agree() -> None:
    a = RequestSpec(1500, 10, 0.0, (1, 2, 3))
    b = RequestSpec(1200, 10, 0.0, (1, 2, 9))
    w = TraceWorkload()
    w.assign(a)
    ma = w.next_request().messages
    w.assign(b)
    mb = w.next_request().messages
    assert COUNTER.chat(ma) == 1500
    assert COUNTER.chat(mb) == 1200
    shared = 2 * 512 * 4
    assert ma[0]["content"][:shared] == mb[0]["content"][:shared]
    assert ma[0]["content"][shared : shared + 64] != mb[0]["content"][shared : shared + 64]


def test_pacer_makes_poisson_arrivals_at_the_rate() -> None:
    clock = FakeClock()
    pacer = Pacer(seed=1, clock=clock)
    assert pacer.claim() is None  # closed loop until a rate is set
    pacer.set_rate(10.0)
    times = [pacer.claim() for _ in range(4000)]
    gaps = [b - a for a, b in itertools.pairwise(times)]  # type: ignore[operator]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.1)  # exponential: std = mean
    pacer.set_rate(None)
    assert pacer.claim() is None


def test_schedules() -> None:
    step = Schedule("step", rate=2, step_rate=3, step_every=10, steps=3)
    assert [step.rate_at(t) for t in (0, 9.9, 10, 25, 30)] == [2, 2, 5, 8, None]
    spike = Schedule("spike", rate=1, spike_rate=20, spike_at=5, spike_for=2)
    assert [spike.rate_at(t) for t in (0, 5, 6.9, 7)] == [1, 20, 20, 1]
    assert Schedule("steady", rate=4).rate_at(1e6) == 4
    assert Schedule().rate_at(0) == 0.0
    with pytest.raises(ValueError, match="unknown shape"):
        Schedule("ramp")


def test_trace_arrivals_follow_the_trace_and_loop() -> None:
    specs = [RequestSpec(10, 5, t, ()) for t in (0.0, 1.0, 3.0)]
    arrivals = TraceArrivals(specs, speedup=2.0, clock=FakeClock(50.0))
    times = [arrivals.claim()[0] for _ in range(4)]
    assert times[:3] == [50.0, 50.5, 51.5]
    assert times[3] == pytest.approx(50.0 + 1.5 + 0.75)  # next lap, mean gap kept at the seam


def test_read_stream_stamps_each_event_as_it_arrives() -> None:
    clock = FakeClock(0.0)
    events = [
        (0.050, b'data: {"choices":[{"delta":{"role":"assistant","content":"Hi"}}]}'),
        (0.052, b""),
        (0.060, b'data: {"choices":[{"delta":{"content":" there"}}]}'),
        (0.070, b'data: {"choices":[{"delta":{"content":" you"}}]}'),
        (0.071, b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}'),
        (0.072, b"data: [DONE]"),
    ]

    def lines():  # type: ignore[no-untyped-def]
        for at, line in events:
            clock.t = at
            yield line

    r = read_stream(lines(), sent=0.0, clock=clock)
    assert r.error is None
    assert r.ttft == pytest.approx(0.050)
    assert r.gaps == pytest.approx([0.010, 0.010])
    assert r.tpot == pytest.approx(0.010)
    assert (r.prompt_tokens, r.tokens, r.text) == (9, 3, "Hi there you")


def test_read_stream_reports_errors() -> None:
    err = read_stream([b'data: {"error": {"message": "boom"}}'], 0.0)
    assert err.error == "boom"
    empty = read_stream([b"data: [DONE]"], 0.0)
    assert empty.error == "no tokens in the stream"


def test_result_files(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.csv")
    log.add({"start_unix_s": 1795318120.179285, "kind": "chat", "ok": 1, "ttft_s": 0.0123456789})
    log.close()
    with (tmp_path / "r.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert tuple(row) == REQUEST_COLUMNS
    assert row["start_unix_s"] == "1795318120.179285"
    assert row["ttft_s"] == "0.012346"
    hist = ItlHistogram()
    for gap in (0.0002, 0.0002, 0.002, 5000.0):
        hist.add(gap)
    hist.write(tmp_path / "itl.csv")
    with (tmp_path / "itl.csv").open() as f:
        counted = {r["le_s"]: int(r["count"]) for r in csv.DictReader(f) if r["count"] != "0"}
    assert counted == {"0.000251189": 2, "0.00251189": 1, "+Inf": 1}
