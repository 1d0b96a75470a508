"""Folding and relaying upstream choices that carry more than text (backends.wire.relay)."""

from __future__ import annotations

import orjson

from backends.wire.relay import Accumulator, is_rich, stream_event, usage_details


def test_plain_text_choices_are_not_rich() -> None:
    assert not is_rich({"index": 0, "delta": {"content": "hi"}, "finish_reason": None})
    assert not is_rich({"index": 0, "delta": {"role": "assistant", "content": ""}})
    assert not is_rich({"index": 0, "text": "hi", "logprobs": None, "finish_reason": None})
    assert not is_rich({"index": 0, "delta": {"content": "x", "tool_calls": None}})


def test_anything_beyond_text_is_rich() -> None:
    assert is_rich({"index": 0, "delta": {"tool_calls": [{"index": 0}]}})
    assert is_rich({"index": 0, "delta": {"reasoning_content": "hm"}})
    assert is_rich({"index": 0, "text": "a", "logprobs": {"tokens": ["a"]}})
    assert is_rich({"index": 0, "delta": {"content": "a"}, "matched_stop": "x"})


def test_tool_call_deltas_fold_like_the_openai_sdk() -> None:
    acc = Accumulator()

    def calls(*parts: dict[str, object]) -> dict[str, object]:
        return {"index": 0, "delta": {"tool_calls": list(parts)}}

    acc.add(
        [
            calls({"index": 0, "id": "c1", "type": "function",
                   "function": {"name": "f", "arguments": ""}}),
            calls({"index": 0, "function": {"arguments": '{"a"'}}),
            calls({"index": 1, "id": "c2", "type": "function",
                   "function": {"name": "g", "arguments": "{}"}}),
            calls({"index": 0, "function": {"arguments": ": 1}"}}),
        ]
    )  # fmt: skip
    message, choice = acc.fields()
    assert message["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert choice == {}


def test_logprobs_and_reasoning_concatenate() -> None:
    acc = Accumulator()
    acc.add(
        [
            {"delta": {"reasoning_content": "a"}, "logprobs": {"content": [1], "refusal": None}},
            {"delta": {"reasoning_content": "b"}, "logprobs": {"content": [2], "refusal": None}},
        ]
    )
    message, choice = acc.fields()
    assert message == {"reasoning_content": "ab"}
    assert choice == {"logprobs": {"content": [1, 2], "refusal": None}}


def test_a_relayed_event_keeps_the_choice_but_index_role_and_finish() -> None:
    head = b'{"id":"x","object":"chat.completion.chunk","created":1,"model":"m"'
    choice = {"index": 3, "delta": {"role": "assistant", "refusal": "no"}, "finish_reason": "stop"}
    event = stream_event(head, choice, b"")
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    data = orjson.loads(event[6:])
    assert data["choices"] == [{"index": 0, "delta": {"refusal": "no"}, "finish_reason": None}]


def test_usage_details_are_the_fields_beyond_the_counts() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
             "completion_tokens_details": {"reasoning_tokens": 1}}  # fmt: skip
    assert usage_details(usage) == {"completion_tokens_details": {"reasoning_tokens": 1}}
    assert usage_details({"prompt_tokens": 1}) is None
