"""The official ``openai`` SDK against the in-process app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.helpers import MODEL
from tests.integration.conftest import Client

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain KV cache transfer."},
]


@pytest.fixture
async def sdk(client: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    app, _ = client
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pdgate") as http:
        yield openai.AsyncOpenAI(
            base_url="http://pdgate/v1", api_key="x", http_client=http, max_retries=0
        )


async def test_chat_non_stream(sdk: openai.AsyncOpenAI) -> None:
    out = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=7)
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert len(choice.message.content.split(" ")) == 12
    assert out.usage is not None
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


async def test_chat_stream_matches_non_stream(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=15, seed=3
    )
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=15,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    assert finish == "length"
    assert text == whole.choices[0].message.content
    assert usage is not None
    assert usage == whole.usage


async def test_completions(sdk: openai.AsyncOpenAI) -> None:
    out = await sdk.completions.create(model=MODEL, prompt="The gateway", max_tokens=6, seed=9)
    assert out.object == "text_completion"
    assert out.choices[0].finish_reason == "length"
    assert len(out.choices[0].text.split(" ")) == 6
    assert out.usage is not None
    assert out.usage.prompt_tokens == 3  # ceil(11 bytes / 4)
    assert out.usage.completion_tokens == 6

    stream = await sdk.completions.create(
        model=MODEL,
        prompt="The gateway",
        max_tokens=6,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        text += "".join(c.text for c in chunk.choices)
    assert text == out.choices[0].text
    assert usage == out.usage


async def test_token_id_prompt_and_stop(sdk: openai.AsyncOpenAI) -> None:
    full = await sdk.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=12, seed=5)
    assert full.usage is not None
    assert full.usage.prompt_tokens == 4
    words = full.choices[0].text.split(" ")
    stop = " " + words[5]
    cut = await sdk.completions.create(
        model=MODEL, prompt=[1, 2, 3, 4], max_tokens=12, seed=5, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.find(stop)]


async def test_models_and_errors(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as nf:
        await sdk.chat.completions.create(model="nope", messages=MESSAGES)
    assert nf.value.status_code == 404
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3.0)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
