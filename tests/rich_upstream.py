"""An OpenAI-compatible server whose answers carry more than text — tool calls, logprobs,
reasoning content, a refusal field, usage details — for relay tests. Run it as a process:
``python -m uvicorn tests.rich_upstream:app --port N``.

It streams when asked to and answers whole otherwise; a request carrying
``kv_transfer_params`` (vLLM's prefill leg) gets some back, so it can stand in for both legs of
every P/D protocol.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

CALL_ID = "call_0123"
ARGUMENTS = ['{"city": ', '"Paris", ', '"unit": "C"}']
REASONING = ["The user ", "wants weather."]


def _logprob(token: str) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": -0.25,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": token, "logprob": -0.25, "bytes": list(token.encode())}],
    }


# The streamed chat events' choices, in order (index 0, n=1).
CHAT_EVENTS: list[dict[str, Any]] = [
    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
    *(
        {"index": 0, "delta": {"reasoning_content": part}, "logprobs": None, "finish_reason": None}
        for part in REASONING
    ),
    {
        "index": 0,
        "delta": {
            "tool_calls": [
                {
                    "index": 0,
                    "id": CALL_ID,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        "logprobs": {"content": [_logprob("get")], "refusal": None},
        "finish_reason": None,
    },
    *(
        {
            "index": 0,
            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": part}}]},
            "logprobs": {"content": [_logprob(part)], "refusal": None},
            "finish_reason": None,
        }
        for part in ARGUMENTS
    ),
    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"},
]
COMPLETION_EVENTS: list[dict[str, Any]] = [
    {
        "index": 0,
        "text": word,
        "logprobs": {
            "tokens": [word],
            "token_logprobs": [-0.5],
            "top_logprobs": [{word: -0.5}],
            "text_offset": [i],
        },
        "finish_reason": None,
    }
    for i, word in enumerate(["Once", " upon", " a"])
]
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 6,
    "total_tokens": 17,
    "completion_tokens_details": {"reasoning_tokens": 2, "accepted_prediction_tokens": 0},
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
}


def _events(api: str) -> list[dict[str, Any]]:
    return CHAT_EVENTS if api == "chat" else COMPLETION_EVENTS


def _whole(api: str) -> dict[str, Any]:
    """What a non-streaming request gets: the events folded as OpenAI folds them."""
    if api == "chat":
        calls = [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": "".join(ARGUMENTS)},
            }
        ]
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": calls,
            "reasoning_content": "".join(REASONING),
            "refusal": None,
        }
        logprobs = {
            "content": [_logprob("get"), *(_logprob(p) for p in ARGUMENTS)],
            "refusal": None,
        }
        choice = {"index": 0, "message": message, "logprobs": logprobs}
        return {**choice, "finish_reason": "tool_calls"}
    logprobs: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for event in COMPLETION_EVENTS:
        for key in logprobs:
            logprobs[key] += event["logprobs"][key]
    text = "".join(e["text"] for e in COMPLETION_EVENTS)
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}


async def _answer(request: Request, api: str) -> Response:
    body = await request.json()
    head = {
        "id": "up-1",
        "object": "chat.completion.chunk" if api == "chat" else "text_completion",
        "created": 1,
        "model": body["model"],
    }
    if not body.get("stream"):
        whole = {**head, "object": "chat.completion" if api == "chat" else "text_completion"}
        whole.update(choices=[_whole(api)], usage=USAGE)
        if body.get("kv_transfer_params"):
            whole["kv_transfer_params"] = {"remote_request_id": "r1", "remote_block_ids": [1]}
        return Response(orjson.dumps(whole), media_type="application/json")

    async def events() -> Any:
        for choice in _events(api):
            yield b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"
        yield b"data: " + orjson.dumps({**head, "choices": [], "usage": USAGE}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def chat(request: Request) -> Response:
    return await _answer(request, "chat")


async def completions(request: Request) -> Response:
    return await _answer(request, "completions")


async def health(request: Request) -> Response:
    return Response(b"{}", media_type="application/json")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
)
