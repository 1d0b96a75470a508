"""The wire package's request side (:mod:`backends.wire.requests`) and the reduction of an
upstream's events (:func:`backends.wire.parse.event_of`)."""

from __future__ import annotations

import pytest

from backends.wire.parse import event_of, message
from backends.wire.requests import ContextLengthExceeded, check_context, generation_params
from backends.wire.schemas import ChatCompletionRequest, CompletionRequest


def _chat(**fields: object) -> tuple[ChatCompletionRequest, dict[str, object]]:
    data: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    data.update(fields)
    return ChatCompletionRequest.model_validate(data), data


def _never() -> int:
    raise AssertionError("the client's seed is used")


def test_the_context_check_allows_exactly_the_limit() -> None:
    check_context(100, 28, 128)
    with pytest.raises(ContextLengthExceeded) as err:
        check_context(100, 29, 128)
    assert (err.value.limit, err.value.prompt_tokens, err.value.max_tokens) == (128, 100, 29)
    assert "maximum context length is 128 tokens" in str(err.value)


def test_chat_params_take_max_completion_tokens_and_the_clients_seed() -> None:
    body, raw = _chat(max_completion_tokens=7, max_tokens=99, seed=5, stop="x", top_p=0.5)
    params = generation_params(
        body, raw, prompt_tokens=10, request_id="r", model="profile",
        default_max_tokens=3, max_context=100, seed=_never,
    )  # fmt: skip
    assert (params.api, params.max_tokens, params.seed, params.stop) == ("chat", 7, 5, ("x",))
    assert params.model == "profile"
    assert params.sampling == {"top_p": 0.5, "seed": 5}
    assert params.body is raw


def test_completion_params_default_max_tokens_and_draw_a_seed() -> None:
    raw: dict[str, object] = {"model": "m", "prompt": "hello"}
    body = CompletionRequest.model_validate(raw)
    params = generation_params(
        body, raw, prompt_tokens=2, request_id="r", model="p",
        default_max_tokens=6, max_context=100, seed=lambda: 42, block_hashes=(1, 2),
    )  # fmt: skip
    assert (params.api, params.max_tokens, params.seed, params.block_hashes) == (
        "completions", 6, 42, (1, 2),
    )  # fmt: skip


def test_the_builder_applies_the_context_check_to_the_default_max_tokens() -> None:
    body, raw = _chat()
    with pytest.raises(ContextLengthExceeded):
        generation_params(
            body, raw, prompt_tokens=95, request_id="r", model="p",
            default_max_tokens=6, max_context=100, seed=lambda: 0,
        )  # fmt: skip


def test_events_keep_fields_beyond_the_text_for_passthrough() -> None:
    event = event_of(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "a", "reasoning_content": "why", "role": "assistant"},
                    "logprobs": {"content": []},
                    "finish_reason": None,
                }
            ],
            "usage": {"completion_tokens": 1},
        }
    )
    assert event.text == "a"
    assert event.extra == {
        "reasoning_content": "why",
        "role": "assistant",
        "logprobs": {"content": []},
    }
    assert event.usage == {"completion_tokens": 1}


def test_a_whole_body_gives_its_text_and_finish_reason() -> None:
    chat = {
        "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]
    }
    assert message(chat) == ("ok", "stop")
    assert message({"choices": [{"text": "t", "finish_reason": "length"}]}) == ("t", "length")
    assert message({"choices": [{"message": {"content": None}}]}) == ("", None)
    assert message({}) == ("", None)
