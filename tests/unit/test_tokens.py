"""Prompt token counting (backends/tokens.py): the approximation and a real HF tokenizer."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import WordLevelTrainer

from backends.tokens import (
    IMAGE_BYTES_PER_TOKEN,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD,
    REPLY_PRIMER,
    TokenCounter,
    approximate_count,
    message_texts,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "prefill and decode run on different devices",
    "the gateway routes each request to a worker",
    "kv cache blocks move over the link",
]


@pytest.mark.parametrize(
    "text",
    ["", "a", "abcd", "abcde", "hello world", "é", "日本語のテキスト", "emoji 🚀🚀", "x" * 1001],
)
def test_approximate_count_is_ceil_utf8_bytes_over_4(text: str) -> None:
    assert approximate_count(text) == math.ceil(len(text.encode("utf-8")) / 4)


@settings(max_examples=200, database=None, deadline=None)
@given(st.text(max_size=200))
def test_approximate_count_property(text: str) -> None:
    n = approximate_count(text)
    size = len(text.encode("utf-8"))
    assert 4 * (n - 1) < size <= 4 * n or (size == 0 and n == 0)


def test_chat_framing_overhead() -> None:
    counter = TokenCounter()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
    ]
    expected = REPLY_PRIMER + sum(
        MESSAGE_OVERHEAD + math.ceil(len(m["content"].encode()) / 4) for m in messages
    )
    assert counter.chat(messages) == expected
    assert counter.chat([]) == REPLY_PRIMER
    assert counter.chat([{"role": "user", "content": ""}]) == REPLY_PRIMER + MESSAGE_OVERHEAD


def test_chat_content_as_list_of_parts_and_name() -> None:
    counter = TokenCounter()
    message = {
        "role": "user",
        "name": "alice",
        "content": [
            {"type": "text", "text": "first part"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"type": "text", "text": "second"},
            "not a dict",
        ],
    }
    assert list(message_texts(message)) == ["first part", "second", "alice"]
    expected = (
        REPLY_PRIMER
        + MESSAGE_OVERHEAD
        + approximate_count("first part")
        + approximate_count("second")
        + approximate_count("alice")
        + IMAGE_TOKENS  # the image part
    )
    assert counter.chat([message]) == expected


def test_an_inline_image_is_charged_by_its_size() -> None:
    """Before: a 1 MB data URL was charged as nothing but the message framing."""
    payload = base64.b64encode(bytes(1_000_000)).decode()
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}
    message = {"role": "user", "content": [part]}
    charged = TokenCounter().chat([message]) - REPLY_PRIMER - MESSAGE_OVERHEAD
    assert charged == 1_000_000 // IMAGE_BYTES_PER_TOKEN
    small = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}
    assert TokenCounter().chat([small]) - REPLY_PRIMER - MESSAGE_OVERHEAD == IMAGE_TOKENS


def test_chat_message_without_content() -> None:
    assert list(message_texts({"role": "assistant", "content": None})) == []
    assert TokenCounter().chat([{"role": "assistant"}]) == REPLY_PRIMER + MESSAGE_OVERHEAD


def test_completion_prompt_text_and_token_ids() -> None:
    counter = TokenCounter()
    assert counter.prompt("hello world!") == math.ceil(12 / 4)
    assert counter.prompt([101, 2023, 2003, 102]) == 4
    assert counter.prompt([]) == 0
    assert counter.text("abcdefgh") == 2


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.train_from_iterator(CORPUS, trainer=WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


@pytest.mark.parametrize(
    "text",
    [
        "the quick brown fox",
        "hello world",  # unknown words still count, as [UNK]
        "the gateway routes, each request!",
        "",
        "   spaces   everywhere   ",
        "kv cache blocks move over the link " * 20,
    ],
)
def test_hf_tokenizer_counts_match_encode(hf_tokenizer: tuple[Tokenizer, Path], text: str) -> None:
    tok, path = hf_tokenizer
    counter = TokenCounter(tokenizer=path)
    assert counter.text(text) == len(tok.encode(text, add_special_tokens=False).ids)
    assert counter.prompt(text) == counter.text(text)


def test_hf_tokenizer_is_really_used(hf_tokenizer: tuple[Tokenizer, Path]) -> None:
    _, path = hf_tokenizer
    text = "the quick brown fox jumps over the lazy dog"
    hf = TokenCounter(tokenizer=path)
    assert hf.text(text) == len(text.split()) == 9
    assert approximate_count(text) != 9  # so the result cannot come from the fallback
    messages = [{"role": "user", "content": text}, {"role": "user", "content": "lazy dog"}]
    assert hf.chat(messages) == REPLY_PRIMER + 2 * MESSAGE_OVERHEAD + 9 + 2
    # Token-id prompts are counted as given, tokenizer or not.
    assert hf.prompt([1, 2, 3]) == 3
