"""`pdgate backend` processes: OpenAI, the vLLM NIXL and SGLang bootstrap handshakes, the
endpoints routers probe, vLLM-named metrics, KV leases and fault injection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape, kv_transfer_time
from tests.backend_procs import MODEL, Proc, run_backend

pytestmark = pytest.mark.system

VLLM_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


@pytest.fixture(scope="module")
def prefill() -> Iterator[Proc]:
    with run_backend("--time-scale", "10", "--seed", "1", role="prefill", bootstrap=True) as p:
        yield p


@pytest.fixture(scope="module")
def decode() -> Iterator[Proc]:
    args = ("--time-scale", "10", "--rendezvous-timeout", "1")
    with run_backend(*args, device="groq-lpu-v1", role="decode") as p:
        yield p


def chat(content: str = "Tell me about disaggregated serving.", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def sse(text: str) -> list[dict[str, Any]]:
    events = [e[len("data: ") :] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


def streamed_text(events: list[dict[str, Any]]) -> str:
    parts = []
    for e in events:
        for c in e.get("choices", []):
            parts.append(c["delta"].get("content") or "" if "delta" in c else c.get("text") or "")
    return "".join(parts)


def held_tokens(p: Proc) -> int:
    load = httpx.get(p.url + "/get_load").json()
    tokens: int = load["num_tokens"]
    return tokens


def wait_until_freed(p: Proc, limit_s: float = 3.0) -> None:
    deadline = time.monotonic() + limit_s
    while held_tokens(p) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held_tokens(p) == 0


# -- OpenAI ------------------------------------------------------------------------------------


def test_chat_non_stream_usage(decode: Proc) -> None:
    r = httpx.post(decode.url + "/v1/chat/completions", json=chat(max_tokens=7, seed=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 7
    assert len(body["choices"][0]["message"]["content"].split()) == 7


def test_stream_matches_non_stream(decode: Proc) -> None:
    whole = httpx.post(decode.url + "/v1/completions", json=_completion(max_tokens=9, seed=5))
    stream = httpx.post(
        decode.url + "/v1/completions",
        json=_completion(max_tokens=9, seed=5, stream=True, stream_options={"include_usage": True}),
    )
    events = sse(stream.text)
    assert streamed_text(events) == whole.json()["choices"][0]["text"]
    assert events[-1]["usage"] == whole.json()["usage"]


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", **fields}


def test_unknown_fields_are_accepted(decode: Proc) -> None:
    body = chat(max_tokens=2, separate_reasoning=True, no_stop_trim=False, return_hidden_states=0)
    assert httpx.post(decode.url + "/v1/chat/completions", json=body).status_code == 200


def test_unknown_model_is_404(decode: Proc) -> None:
    body = {**chat(max_tokens=2), "model": "nope"}
    r = httpx.post(decode.url + "/v1/chat/completions", json=body)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_router_probe_endpoints(prefill: Proc) -> None:
    for path in ("/health", "/health_generate", "/version", "/get_model_info", "/model_info"):
        assert httpx.get(prefill.url + path).status_code == 200, path
    info = httpx.get(prefill.url + "/get_server_info").json()
    assert "model_path" not in info  # the SGLang router would try to fetch a tokenizer for it
    assert info["disaggregation_mode"] == "prefill"
    assert httpx.get(prefill.url + "/server_info").json() == info
    assert httpx.get(prefill.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.post(prefill.url + "/flush_cache").status_code == 200
    assert set(httpx.get(prefill.url + "/get_load").json()) >= {"num_reqs", "num_tokens"}


def test_metrics_use_vllm_names(decode: Proc) -> None:
    before = httpx.get(decode.url + "/metrics").text
    r = httpx.post(decode.url + "/v1/chat/completions", json=chat(max_tokens=5))
    usage = r.json()["usage"]
    text = httpx.get(decode.url + "/metrics").text
    for name in VLLM_METRICS:
        assert f'{name}{{engine="0",model_name="{MODEL}"}}' in text, name
    gained = _sample(text, "vllm:generation_tokens_total") - _sample(
        before, "vllm:generation_tokens_total"
    )
    assert gained == 5
    prompt = _sample(text, "vllm:prompt_tokens_total") - _sample(before, "vllm:prompt_tokens_total")
    assert prompt == usage["prompt_tokens"]


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- vLLM NIXL ---------------------------------------------------------------------------------


def nixl_prefill(p: Proc, body: dict[str, Any]) -> dict[str, Any]:
    leg = {
        **body,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True},
    }
    r = httpx.post(p.url + "/v1/chat/completions", json=leg, headers={"X-Request-Id": "rq-1"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_nixl_prefill_answers_transfer_params_and_holds_kv(prefill: Proc) -> None:
    out = nixl_prefill(prefill, chat(max_tokens=20))
    assert out["usage"]["completion_tokens"] == 1
    ktp = out["kv_transfer_params"]
    assert ktp["do_remote_prefill"] is True
    assert ktp["remote_host"] == "127.0.0.1"
    assert ktp["remote_port"] == prefill.port
    assert ktp["tp_size"] == 1
    assert ktp["remote_request_id"].startswith("rq-1")
    assert isinstance(ktp["remote_engine_id"], str)
    assert len(ktp["remote_block_ids"]) == -(-out["usage"]["prompt_tokens"] // 16)
    assert held_tokens(prefill) > 0
    httpx.post(
        prefill.url + "/pdgate/kv/release", json={"remote_request_id": ktp["remote_request_id"]}
    )
    assert held_tokens(prefill) == 0


def test_nixl_decode_pulls_then_frees_the_prefill_kv(prefill: Proc, decode: Proc) -> None:
    body = chat(max_tokens=12, seed=9)
    ktp = nixl_prefill(prefill, body)["kv_transfer_params"]
    r = httpx.post(decode.url + "/v1/chat/completions", json={**body, "kv_transfer_params": ktp})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 12
    wait_until_freed(prefill)
    assert "recomputing" not in decode.log()


def test_nixl_decode_with_invalid_params_recomputes_locally(decode: Proc) -> None:
    bad = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_host": None}
    body = chat(max_tokens=4, seed=9, kv_transfer_params=bad)
    r = httpx.post(decode.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert "invalid kv_transfer_params" in decode.log()


def test_nixl_lease_expiry_frees_unpulled_kv(decode: Proc) -> None:
    with run_backend("--time-scale", "10", "--kv-lease", "0.3", role="prefill") as p:
        ktp = nixl_prefill(p, chat(max_tokens=5))["kv_transfer_params"]
        assert held_tokens(p) > 0
        wait_until_freed(p)
        assert "not pulled within" in p.log()
        body = chat(max_tokens=5, kv_transfer_params=ktp)
        r = httpx.post(decode.url + "/v1/chat/completions", json=body)
    assert r.json()["usage"]["completion_tokens"] == 5
    assert "holds no KV" in decode.log()


def test_nixl_transfer_time_comes_from_the_prefill_side_link(catalog: Catalog) -> None:
    """The decode leg's first token waits for the KV over the prefill instance's link."""
    tokens = 6000
    body = {"model": MODEL, "prompt": "abcd" * tokens, "max_tokens": 2}
    with (
        run_backend("--kv-link", "ethernet_25g", role="prefill") as p,
        run_backend(device="groq-lpu-v1", role="decode") as d,
        httpx.Client(timeout=30) as client,
    ):
        for prompt in ("warm up the connections and the pull path", body["prompt"]):
            leg = {**body, "prompt": prompt, "kv_transfer_params": {"do_remote_decode": True}}
            ktp = client.post(p.url + "/v1/completions", json=leg).json()["kv_transfer_params"]
            stream = {**body, "prompt": prompt, "stream": True, "kv_transfer_params": ktp}
            t0 = time.perf_counter()
            with client.stream("POST", d.url + "/v1/completions", json=stream) as r:
                assert any(line.startswith("data: {") for line in r.iter_lines())
                ttft = time.perf_counter() - t0
    prefill_dep = catalog.deployment("h100-sxm", MODEL)
    decode_dep = catalog.deployment("groq-lpu-v1", MODEL)
    kv_bytes = tokens * prefill_dep.kv_bytes_per_token
    slow = kv_transfer_time(catalog.link("ethernet_25g"), kv_bytes, -(-tokens // 16))
    fast = kv_transfer_time(catalog.link("roce_200g"), kv_bytes, -(-tokens // 16))
    expected = slow + decode_dep.step_time(StepShape.of([(1, tokens)]))
    # The pull's round trip and the client's read add a few milliseconds on top.
    assert expected * 0.95 < ttft < expected * 1.1 + 0.03
    assert ttft > 3 * fast


# -- SGLang bootstrap --------------------------------------------------------------------------


async def test_sglang_legs_rendezvous_by_room(prefill: Proc, decode: Proc) -> None:
    assert prefill.bootstrap_port is not None
    body = chat(
        max_tokens=10,
        seed=4,
        bootstrap_host="127.0.0.1",
        bootstrap_port=prefill.bootstrap_port,
        bootstrap_room=123456789,
    )
    async with httpx.AsyncClient(timeout=30) as client:
        decoded, prefilled = await asyncio.gather(
            client.post(
                decode.url + "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            ),
            client.post(prefill.url + "/v1/chat/completions", json=body),
        )
    assert prefilled.status_code == 200, prefilled.text
    assert prefilled.json()["usage"]["completion_tokens"] == 1
    events = sse(decoded.text)
    assert events[-1]["usage"]["completion_tokens"] == 10
    assert len(streamed_text(events).split()) == 10
    wait_until_freed(prefill)


def test_sglang_decode_fails_clearly_when_no_kv_arrives(prefill: Proc, decode: Proc) -> None:
    assert prefill.bootstrap_port is not None
    body = chat(
        max_tokens=3,
        bootstrap_host="127.0.0.1",
        bootstrap_port=prefill.bootstrap_port,
        bootstrap_room=42,
    )
    t0 = time.monotonic()
    r = httpx.post(decode.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 504
    assert "bootstrap room 42 did not arrive within 1 s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


# -- faults ------------------------------------------------------------------------------------


def test_fault_injection_at_start_and_through_the_admin_endpoint() -> None:
    with run_backend("--time-scale", "0", "--fail-rate", "1") as b:
        url = b.url + "/v1/chat/completions"
        failed = httpx.post(url, json=chat(max_tokens=3))
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "injected_failure"

        faults = httpx.post(b.url + "/admin/faults", json={"fail_rate": 0, "fail_after_tokens": 2})
        assert faults.json()["fail_after_tokens"] == 2
        r = httpx.post(url, json=chat(max_tokens=8, stream=True))
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert "injected failure after 2 tokens" in events[-1]
        assert len(streamed_text([orjson.loads(e[6:]) for e in events[:-1]]).split()) == 2

        httpx.post(
            b.url + "/admin/faults", json={"fail_after_tokens": None, "hang_after_tokens": 1}
        )
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=chat(max_tokens=8, stream=True), timeout=0.5)

        assert httpx.post(b.url + "/admin/faults", json={"slowdown": 0}).status_code == 400
        reset = {"hang_after_tokens": None, "slowdown": 2.0}
        assert httpx.post(b.url + "/admin/faults", json=reset).json()["slowdown"] == 2.0
        assert httpx.post(url, json=chat(max_tokens=3)).status_code == 200
