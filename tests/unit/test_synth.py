"""Synthetic text (backends/emulator/synth.py): determinism and stop-string matching across
chunks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.emulator import synth


def test_token_text_is_deterministic_and_spaced() -> None:
    first = [synth.token_text(5, i) for i in range(50)]
    assert first == [synth.token_text(5, i) for i in range(50)]
    assert not first[0].startswith(" ")
    assert all(t.startswith(" ") and len(t) > 1 and " " not in t[1:] for t in first[1:])


def test_text_is_the_concatenation_of_token_texts() -> None:
    assert synth.text(9, 3, 7) == "".join(synth.token_text(9, i) for i in range(3, 10))
    assert synth.text(9, 0, 0) == ""
    # Splitting a range anywhere gives the same text: prefill and decode join up.
    whole = synth.text(9, 0, 40)
    for cut in [1, 2, 17, 39]:
        assert synth.text(9, 0, cut) + synth.text(9, cut, 40 - cut) == whole


def test_different_seeds_give_different_text() -> None:
    texts = {synth.text(seed, 0, 30) for seed in range(20)}
    assert len(texts) == 20


def test_text_uses_a_spread_of_words() -> None:
    words = synth.text(1, 0, 2000).split()
    assert len(words) == 2000
    assert len(set(words)) > 50  # not stuck on a handful of words


# -- StopMatcher --------------------------------------------------------------------------


def test_no_stops_is_passthrough() -> None:
    m = synth.StopMatcher(())
    assert m.feed("hello") == ("hello", False)
    assert m.feed(" world") == (" world", False)
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    m = synth.StopMatcher(("",))
    assert m.feed("abc") == ("abc", False)


def test_stop_within_one_chunk() -> None:
    m = synth.StopMatcher(("STOP",))
    assert m.feed("abcSTOPdef") == ("abc", True)


def test_stop_split_over_two_chunks() -> None:
    m = synth.StopMatcher(("cd",))
    out1, stopped1 = m.feed("abc")
    assert not stopped1
    assert out1 == "ab"  # "c" might begin the stop string: held back
    out2, stopped2 = m.feed("def")
    assert stopped2
    assert out1 + out2 == "ab"


def test_stop_split_over_many_chunks() -> None:
    m = synth.StopMatcher(("<end>",))
    emitted = ""
    for chunk in ["x", "y<", "e", "n", "d>", "z"]:
        out, stopped = m.feed(chunk)
        emitted += out
        if stopped:
            break
    assert stopped
    assert emitted == "xy"


def test_held_back_text_is_released_by_flush() -> None:
    m = synth.StopMatcher(("xyz",))
    out, stopped = m.feed("abcxy")
    assert not stopped
    assert out == "abc"
    assert m.flush() == "xy"
    assert m.flush() == ""  # flushing empties the buffer


def test_held_text_from_an_earlier_leg_joins_the_next_chunk() -> None:
    # A prefill leg held back "c" (it may begin "cd"); the decode leg starts from it.
    m = synth.StopMatcher(("cd",), "c")
    assert m.feed("def") == ("", True)
    m = synth.StopMatcher(("cd",), "c")
    assert m.feed("xy") == ("cx", False)
    assert m.flush() == "y"


def test_unchecked_feed_passes_text_and_held_text_through() -> None:
    m = synth.StopMatcher(("ab",))
    assert m.feed("xa") == ("x", False)
    assert m.feed("b", check=False) == ("ab", False)  # before min_tokens: no stop check
    assert m.flush() == ""
    assert m.feed("zab") == ("z", True)  # checked again afterwards


def test_earliest_of_several_stops_wins() -> None:
    m = synth.StopMatcher(("world", "lo"))
    assert m.feed("hello world") == ("hel", True)


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Per-character semantics: the stop that completes first ends the text at its start."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def _stream(stops: tuple[str, ...], chunks: list[str]) -> tuple[str, bool]:
    m = synth.StopMatcher(stops)
    emitted = ""
    for chunk in chunks:
        out, stopped = m.feed(chunk)
        emitted += out
        if stopped:
            return emitted, True
    return emitted + m.flush(), False


def _chunked(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, database=None, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=40),
    stop=st.text(alphabet="abc ", min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_streamed_matching_of_one_stop_equals_whole_text_matching(
    text: str, stop: str, cuts: list[int]
) -> None:
    """Whatever the chunking, the output is the text up to the stop (or all of it)."""
    emitted, stopped = _stream((stop,), _chunked(text, cuts))
    assert stopped == (stop in text)
    assert emitted == (text[: text.find(stop)] if stop in text else text)
    assert stop not in emitted


@settings(max_examples=300, database=None, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=40),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_streamed_output_never_contains_a_stop_and_is_a_prefix(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    emitted, stopped = _stream(tuple(stops), _chunked(text, cuts))
    assert text.startswith(emitted)
    assert stopped == any(s in text for s in stops)
    for s in stops:
        assert s not in emitted


def test_multi_stop_result_does_not_depend_on_chunking() -> None:
    # "c" completes at the third character, before "aca" (which starts earlier) completes.
    stops = ("c", "aca")
    assert _reference("aaca", list(stops)) == ("aa", True)
    assert _stream(stops, ["a", "a", "c", "a"]) == ("aa", True)  # token by token
    assert _stream(stops, ["aac", "a"]) == ("aa", True)
    assert _stream(stops, ["aaca"]) == ("aa", True)  # the same tokens, coalesced


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_matcher_on_synthetic_stream(seed: int) -> None:
    full = synth.text(seed, 0, 60)
    stop = synth.token_text(seed, 30)
    m = synth.StopMatcher((stop,))
    emitted = ""
    for i in range(60):
        out, stopped = m.feed(synth.token_text(seed, i))
        emitted += out
        if stopped:
            break
    assert stopped
    assert emitted == full[: full.find(stop)]
