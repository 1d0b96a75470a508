"""Synthetic output text: deterministic in (seed, token index), one word per token.

The same seed gives the same text whichever instance produces which token, so a prefill
instance's first token and a decode instance's continuation join up, and a client sending
``seed`` twice gets the same answer twice.
"""

from __future__ import annotations

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "are",
    "from",
    "or",
    "an",
    "have",
    "not",
    "which",
    "but",
    "they",
    "one",
    "all",
    "were",
    "we",
    "when",
    "there",
    "can",
    "more",
    "been",
    "has",
    "if",
    "will",
    "so",
    "no",
    "out",
    "their",
    "into",
    "time",
    "only",
    "some",
    "could",
    "them",
    "than",
    "other",
    "then",
    "its",
    "about",
    "these",
    "two",
    "may",
    "first",
    "any",
    "like",
    "now",
    "new",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "place",
    "light",
    "model",
    "token",
    "cache",
    "prefill",
    "decode",
    "memory",
    "stream",
    "batch",
    "layer",
    "chip",
    "wafer",
    "latency",
]
_N = len(_WORDS)
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def token_text(seed: int, index: int) -> str:
    """The text of token ``index`` (0-based); tokens after the first carry a leading space."""
    word = _WORDS[_mix((seed << 20) ^ index) % _N]
    return word if index == 0 else " " + word


def text(seed: int, start: int, count: int) -> str:
    """Concatenated text of tokens ``start .. start + count - 1``."""
    return "".join([token_text(seed, i) for i in range(start, start + count)])


class StopMatcher:
    """Finds the first stop string in streamed text, across chunk boundaries.

    ``feed(text)`` returns the text safe to emit now and whether a stop string ended the
    output; the stop string itself is never emitted (OpenAI semantics). While stop strings are
    set, the last ``len(longest stop) − 1`` characters are held back until the next chunk shows
    they do not begin a stop string; ``flush()`` releases them at the end of the stream.
    """

    def __init__(self, stops: tuple[str, ...], held: str = "") -> None:
        self._stops = tuple(s for s in stops if s) if stops else ()
        self._keep = max(len(s) for s in self._stops) - 1 if self._stops else 0
        self._held = held

    def feed(self, chunk: str, *, check: bool = True) -> tuple[str, bool]:
        """``check=False`` (before ``min_tokens``): pass text through, releasing held text."""
        if not self._stops or not check:
            out = self._held + chunk
            self._held = ""
            return out, False
        window = self._held + chunk
        # The stop that *completes* first wins (then the earliest start): the result must not
        # depend on how tokens happened to be grouped into chunks.
        hits = [(i + len(s), i) for s in self._stops if (i := window.find(s)) >= 0]
        if hits:
            self._held = ""
            return window[: min(hits)[1]], True
        split = max(0, len(window) - self._keep)
        self._held = window[split:] if self._keep else ""
        return (window[:split] if self._keep else window), False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
