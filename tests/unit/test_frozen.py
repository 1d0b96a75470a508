"""fast_init (backends/frozen.py): the same instances as a frozen dataclass's own __init__."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field

import pytest

from backends.base import GenerationParams, TokenChunk
from backends.frozen import fast_init


@dataclass(frozen=True, slots=True)
class _Plain:
    name: str
    count: int = 3
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict, hash=False)


@fast_init
@dataclass(frozen=True, slots=True)
class _Fast:
    name: str
    count: int = 3
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict, hash=False)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("a",), {}),
        (("a", 5), {}),
        (("a",), {"tags": ("x",), "extra": {"k": 1}}),
        ((), {"name": "b", "count": 0}),
    ],
)
def test_fast_init_builds_what_the_dataclass_builds(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    a, b = _Plain(*args, **kwargs), _Fast(*args, **kwargs)  # type: ignore[arg-type]
    assert dataclasses.astuple(a) == dataclasses.astuple(b)
    assert repr(a).removeprefix("_Plain") == repr(b).removeprefix("_Fast")
    again = _Fast(*args, **kwargs)  # type: ignore[arg-type]
    assert b == again
    assert hash(b) == hash(again)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.count = 9  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(b)) == b


def test_fast_init_keeps_the_signature_and_its_errors() -> None:
    assert str(inspect.signature(_Fast)) == str(inspect.signature(_Plain))
    b = _Fast("a")
    assert b.extra == {}
    assert b.extra is not _Fast("a").extra
    with pytest.raises(TypeError):
        _Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Fast("a", 1, (), {}, "one too many")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Fast("a", nope=1)  # type: ignore[call-arg]


def test_fast_init_refuses_what_it_would_not_build_the_same() -> None:
    @dataclass(slots=True)
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclass(frozen=True, slots=True)
    class After:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        x: int

    @dataclass(frozen=True, slots=True)
    class Hidden:
        x: int
        y: int = field(init=False, default=0)

    for cls in (Mutable, NoSlots, After, KeywordOnly, Hidden):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_records_take_it() -> None:
    chunk = TokenChunk("", 5, "length")
    assert (chunk.text, chunk.tokens, chunk.finish_reason, chunk.stats) == ("", 5, "length", None)
    params = GenerationParams("r", "m", "completions", 10, 20, 3)
    assert params.sampling == {}
    assert params.block_hashes == ()
    assert params.hash_block_tokens == 64
    assert TokenChunk.__init__.__qualname__ == "TokenChunk.__init__"
