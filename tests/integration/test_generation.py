"""What gets generated and charged: seeds, stop strings, sampling fields, prompt accounting."""

from __future__ import annotations

from typing import Any

import pytest

from backends.emulator.catalog import Catalog
from tests.helpers import app_client, config, settings
from tests.integration.conftest import (
    CHAT,
    COMPLETIONS,
    Client,
    chat_body,
    completion_body,
    emulated,
    sse_chunks,
    streamed_text,
)


async def _text(c: Any, path: str, body: dict[str, Any]) -> str:
    resp = await c.post(path, json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return str(choice["message"]["content"] if path == CHAT else choice["text"])


async def test_same_seed_same_text(client: Client) -> None:
    _, c = client
    body = chat_body(max_tokens=20, seed=1234)
    texts = [await _text(c, CHAT, body) for _ in range(3)]
    assert texts[0] == texts[1] == texts[2]
    assert len(texts[0].split(" ")) == 20


async def test_different_seeds_different_text(client: Client) -> None:
    _, c = client
    texts = {await _text(c, CHAT, chat_body(max_tokens=20, seed=s)) for s in (1, 2, 3)}
    assert len(texts) == 3


async def test_unseeded_requests_differ(client: Client) -> None:
    _, c = client
    texts = {await _text(c, COMPLETIONS, completion_body(max_tokens=20)) for _ in range(3)}
    assert len(texts) == 3


async def test_seed_shared_by_both_apis(client: Client) -> None:
    _, c = client
    chat = await _text(c, CHAT, chat_body(max_tokens=8, seed=77))
    comp = await _text(c, COMPLETIONS, completion_body(max_tokens=8, seed=77))
    assert chat == comp


def _stop_for(text: str, word_index: int) -> tuple[str, str]:
    """A stop string `` <word>`` for the given word and the text expected before it."""
    words = text.split(" ")
    stop = " " + words[word_index]
    cut = text.find(stop)  # the first occurrence, possibly as a prefix of an earlier word
    assert 0 < cut <= len(" ".join(words[:word_index]))
    return stop, text[:cut]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("word_index", [1, 3, 9])
async def test_stop_string_ends_output(client: Client, path: str, word_index: int) -> None:
    _, c = client
    make = chat_body if path == CHAT else completion_body
    full = await _text(c, path, make(max_tokens=24, seed=99))
    stop, expected = _stop_for(full, word_index)

    resp = await c.post(path, json=make(max_tokens=24, seed=99, stop=[stop]))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    assert choice["finish_reason"] == "stop"
    assert text == expected
    assert stop not in text
    completion = body["usage"]["completion_tokens"]
    assert len(expected.split(" ")) <= completion <= 24

    stream = await c.post(path, json=make(max_tokens=24, seed=99, stop=stop, stream=True))
    chunks = sse_chunks(stream)
    assert streamed_text(chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stop_string_never_produced_runs_to_length(client: Client) -> None:
    _, c = client
    resp = await c.post(
        COMPLETIONS, json=completion_body(max_tokens=10, seed=5, stop=["zzz", "\n\n"])
    )
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    assert resp.json()["usage"]["completion_tokens"] == 10


def _boundary_stop(first_two: str) -> tuple[str, str]:
    """A stop string spanning the first token's end and the second token's start."""
    first = first_two.split(" ")[0]
    start = max(0, len(first) - 2)
    return first_two[start : len(first) + 3], first_two[:start]


async def test_stop_spanning_first_tokens_aggregated(catalog: Catalog) -> None:
    async with app_client(settings(config(mode="aggregated"), catalog)) as (_, c):
        full = await _text(c, COMPLETIONS, completion_body(max_tokens=8, seed=1))
        stop, expected = _boundary_stop(full)
        resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=8, seed=1, stop=stop))
        assert resp.json()["choices"][0]["finish_reason"] == "stop"
        assert resp.json()["choices"][0]["text"] == expected


async def test_stop_spanning_first_tokens_disaggregated(client: Client) -> None:
    _, c = client
    full = await _text(c, COMPLETIONS, completion_body(max_tokens=8, seed=1))
    stop, expected = _boundary_stop(full)
    resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=8, seed=1, stop=stop))
    assert resp.json()["choices"][0]["finish_reason"] == "stop"
    assert resp.json()["choices"][0]["text"] == expected


async def test_sampling_and_vllm_fields_accepted(client: Client) -> None:
    _, c = client
    extra: dict[str, Any] = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "logit_bias": {"50256": -100},
        "ignore_eos": True,
        "min_tokens": 2,
        "user": "tester",
        "foo": 1,
        "nested": {"anything": [1, 2]},
    }
    chat = await c.post(CHAT, json=chat_body(max_tokens=4, seed=3, **extra))
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 4
    comp = await c.post(COMPLETIONS, json=completion_body(max_tokens=4, echo=False, **extra))
    assert comp.status_code == 200, comp.text
    stream = await c.post(CHAT, json=chat_body(max_tokens=4, stream=True, **extra))
    assert sse_chunks(stream)[-1]["choices"][0]["finish_reason"] == "length"


async def test_min_tokens_defers_stop(client: Client) -> None:
    _, c = client
    full = await _text(c, COMPLETIONS, completion_body(max_tokens=24, seed=99))
    stop, expected = _stop_for(full, 1)
    resp = await c.post(
        COMPLETIONS, json=completion_body(max_tokens=24, seed=99, stop=[stop], min_tokens=24)
    )
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    assert resp.json()["choices"][0]["text"] == full
    assert expected != full


# -- prompt accounting -----------------------------------------------------------------------


async def test_usage_prompt_tokens_is_what_prefill_was_charged(client: Client) -> None:
    app, c = client
    resp = await c.post(CHAT, json=chat_body("word " * 300, max_tokens=5))
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 300
    engines = emulated(app)
    prefilled = sum(b.engine.stats.prompt_tokens for role, b in engines if role == "prefill")
    assert prefilled == usage["prompt_tokens"]
    # The decode side pulls the KV: it never recomputes the prompt.
    assert sum(b.engine.stats.prompt_tokens for role, b in engines if role == "decode") == 0
    generated = sum(b.engine.stats.generation_tokens for _, b in engines)
    assert generated == usage["completion_tokens"]


async def test_token_id_prompt_charged_as_given(client: Client) -> None:
    app, c = client
    resp = await c.post(COMPLETIONS, json=completion_body(list(range(777)), max_tokens=3))
    assert resp.json()["usage"]["prompt_tokens"] == 777
    charged = sum(b.engine.stats.prompt_tokens for role, b in emulated(app) if role == "prefill")
    assert charged == 777


async def test_aggregated_worker_charged_prompt(catalog: Catalog) -> None:
    async with app_client(settings(config(mode="aggregated"), catalog)) as (app, c):
        resp = await c.post(COMPLETIONS, json=completion_body("y" * 4000, max_tokens=4))
        assert resp.json()["usage"]["prompt_tokens"] == 1000
        ((role, backend),) = emulated(app)
        assert role == "aggregated"
        assert backend.engine.stats.prompt_tokens == 1000
        assert backend.engine.stats.generation_tokens == 4
