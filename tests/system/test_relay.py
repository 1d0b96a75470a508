"""Nothing the upstream says is dropped: tool calls, logprobs, reasoning content, refusals and
usage details reach the official ``openai`` client unchanged, streamed and not, through every
upstream protocol — against a real OpenAI-compatible server process (``tests.rich_upstream``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests import rich_upstream as up
from tests.backend_procs import MODEL, Proc, run_gateway, spawn
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(120)
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Proc]:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "tests.rich_upstream:app", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip
    with spawn(argv, "/health", port) as proc:
        yield proc


def _config(protocol: str, url: str) -> dict[str, Any]:
    worker: dict[str, Any] = {"type": "http", "protocol": protocol, "url": url}
    if protocol == "openai":
        return {
            "models": [
                {
                    "name": MODEL,
                    "mode": "aggregated",
                    "pools": {"aggregated": {"workers": [worker]}},
                }
            ]
        }
    prefill = {**worker, "bootstrap_port": 1} if protocol == "sglang-bootstrap" else worker
    pools = {"prefill": {"workers": [prefill]}, "decode": {"workers": [worker]}}
    return {"models": [{"name": MODEL, "pools": pools}]}


@pytest.fixture(scope="module", params=["openai", "vllm-nixl", "sglang-bootstrap"])
def client(request: pytest.FixtureRequest, upstream: Proc) -> Iterator[openai.OpenAI]:
    with (
        run_gateway(_config(request.param, upstream.url)) as gw,
        openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0) as c,
    ):
        yield c


def _without_role(choice: dict[str, Any]) -> dict[str, Any]:
    delta = {k: v for k, v in choice["delta"].items() if k != "role"}
    return {**choice, "delta": delta}


def test_streamed_chat_relays_every_field(client: openai.OpenAI) -> None:
    """Before: tool calls, logprobs and reasoning were dropped (empty content, logprobs null,
    finish_reason tool_calls with no tool call)."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=1,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c.to_dict() for c in stream]
    relayed = [
        c["choices"][0]
        for c in chunks
        if c["choices"] and set(c["choices"][0]["delta"]) - {"role", "content"}
    ]
    expected = [_without_role(e) for e in up.CHAT_EVENTS[1:-1]]
    assert [{**r, "finish_reason": None} for r in relayed] == [
        {**e, "finish_reason": None} for e in expected
    ]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens_details"] == up.USAGE["completion_tokens_details"]
    assert usage["prompt_tokens_details"]["audio_tokens"] == 0


def test_whole_chat_answer_relays_every_field(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=1,
        max_tokens=50,
    ).to_dict()
    choice = answer["choices"][0]
    expected = up._whole("chat")
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == expected["message"]["tool_calls"]
    assert choice["message"]["reasoning_content"] == expected["message"]["reasoning_content"]
    assert choice["message"].get("content") is None
    assert choice["logprobs"] == expected["logprobs"]
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_are_relayed(client: openai.OpenAI, stream: bool) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "Once", "max_tokens": 3, "logprobs": 1}
    if stream:
        chunks = [c.to_dict() for c in client.completions.create(**args, stream=True)]
        got = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0].get("logprobs")]
        assert got == [e["logprobs"] for e in up.COMPLETION_EVENTS]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "Once upon a"
    else:
        choice = client.completions.create(**args).to_dict()["choices"][0]
        assert choice["text"] == "Once upon a"
        assert choice["logprobs"] == up._whole("completions")["logprobs"]
