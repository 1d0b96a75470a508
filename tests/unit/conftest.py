"""Fixtures shared by the unit tests: running coroutines on a fresh virtual-time event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from backends.clock import close_loop, virtual_event_loop

T = TypeVar("T")

RunVirtual = Callable[[Callable[[], Awaitable[Any]]], Any]


def run_on_virtual_loop(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a fresh virtual-time loop; cancel leftovers and close the loop."""
    loop = virtual_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        close_loop(loop)


@pytest.fixture
def run_virtual() -> RunVirtual:
    """``run_virtual(lambda: coro())``: the coroutine's result, computed in virtual time."""
    return run_on_virtual_loop
