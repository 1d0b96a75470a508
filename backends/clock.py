"""Time for everything that waits: real time for serving, virtual time for simulation.

The :class:`Clock` protocol is what engines, dispatch and admission use to read time and to
wait. :class:`LoopClock` reads the running event loop's monotonic clock, so it is exact under a
real loop and also under :func:`virtual_event_loop`, whose time jumps straight to the next
timer: the same code then simulates hours of traffic in seconds.

A real loop's clock is read at full resolution: uvloop's ``loop.time()`` counts whole
milliseconds (libuv's ``uv_now``), which would round away the 0.3–3 ms between an LPU's or a
wafer's tokens in every TTFT, inter-token gap and step start.

Deadlines are absolute (``sleep_until``), so a late wake-up never shifts the schedule that
follows it.

Example::

    loop = virtual_event_loop()
    clock = LoopClock()
    async def main() -> float:
        await clock.sleep(3600.0)       # returns at once in wall time
        return clock.now()
    loop.run_until_complete(main())    # ≈ 3600.0
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import selectors
import time
from asyncio import format_helpers
from collections.abc import Callable, Coroutine, Generator
from contextvars import Context, copy_context
from typing import Any, Protocol, TypeVar, TypeVarTuple, Unpack


class Clock(Protocol):
    """Reads time and waits on it, in float seconds."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...

    async def sleep(self, seconds: float) -> None: ...


_EARLY_S = 1e-6  # a wake-up this close to its deadline is on time


class LoopClock:
    """The running event loop's monotonic clock (real or virtual), in float seconds.

    Every real loop (asyncio's, uvloop's) keeps time on CLOCK_MONOTONIC, which
    ``time.monotonic()`` reads to the nanosecond; a virtual loop keeps its own time.

    ``LoopClock(loop)`` binds the clock to a :func:`virtual_event_loop`: it then reads and
    waits on that loop directly instead of looking up the running loop on every call (on
    Python 3.11 each lookup is a ``getpid`` system call, and a simulation reads the clock
    about a million times). A bound clock must only be used while its loop runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if type(loop) is _VirtualEventLoop else None

    @property
    def virtual_loop(self) -> asyncio.AbstractEventLoop | None:
        """The virtual loop this clock is bound to (None: real time, or unbound): code that
        runs only on it may schedule callbacks at virtual instants instead of sleeping."""
        return self._loop

    def now(self) -> float:
        if self._loop is not None:
            return self._loop._virtual.time
        loop = asyncio.get_running_loop()
        return loop.time() if type(loop) is _VirtualEventLoop else time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        """Returns at ``deadline`` or later, never before: a device cannot deliver a token
        ahead of its schedule. uvloop rounds a timer to the nearest millisecond, counted from
        its last reading of the clock, so a third of its sleeps end early, by up to 1 ms; what
        is left is slept again, for at least a millisecond (a shorter uvloop sleep is a
        callback on the next loop pass, so a remainder of microseconds would spin)."""
        if self._loop is not None:
            await self._loop.sleep_until(deadline)
            return
        delay = deadline - self.now()
        while delay > _EARLY_S:
            await asyncio.sleep(delay)
            delay = deadline - self.now()
            if delay > _EARLY_S:
                delay = max(delay, 0.001)

    async def sleep(self, seconds: float) -> None:
        if self._loop is not None:
            await self._loop.sleep_until(self._loop._virtual.time + seconds)
        elif seconds > 0:
            await asyncio.sleep(seconds)


_Ts = TypeVarTuple("_Ts")
_T = TypeVar("_T")
_H = TypeVar("_H", bound=asyncio.Handle)

_POLL_EVERY = 256  # loop passes between polls of a selector that holds only the wake-up pipe
# asyncio's own limits (base_events): rebuild the timer heap when more than half of more than
# 100 timers are cancelled; never advance more than a day in one pass.
_MIN_SCHEDULED = 100
_MAX_CANCELLED = 0.5
_MAX_TIMEOUT = 24 * 3600.0


class _VirtualSelector(selectors.DefaultSelector):
    """A selector that, instead of blocking for ``timeout``, advances virtual time by it.

    The loop registers one descriptor of its own, the self-pipe that other threads write to
    after ``call_soon_threadsafe``; their callbacks are already queued by then, so while
    nothing else is registered there is nothing to poll for, and the ``epoll_wait`` each loop
    pass would make is skipped (the pipe is still drained now and then so it never fills).
    """

    def __init__(self) -> None:
        super().__init__()
        self.time = 0.0
        self._passes = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # Nothing is scheduled and nothing is ready: in virtual time that is a deadlock.
            raise RuntimeError("virtual event loop has nothing left to wait for")
        if timeout > 0:
            self.time += timeout
        return self.poll() if self.poll_due() else []

    def poll_due(self) -> bool:
        """Count a loop pass; whether this one must poll the registered descriptors."""
        self._passes += 1
        # (the registry dict itself: len(get_map()) goes through a Python-level mapping)
        return len(self._fd_to_key) > 1 or not self._passes % _POLL_EVERY  # type: ignore[attr-defined]

    def poll(self) -> list[tuple[selectors.SelectorKey, int]]:
        return super().select(0)


class _Handle(asyncio.Handle):
    """asyncio's callback handle, filled in by the virtual loop itself (see
    :meth:`_VirtualEventLoop.call_soon`)."""

    __slots__ = ()


class _TimerHandle(asyncio.TimerHandle):
    """asyncio's timer handle, filled in by the virtual loop itself."""

    __slots__ = ()


_new_handle = object.__new__


def _bare_handle(
    cls: type[_H], loop: asyncio.AbstractEventLoop, callback: Any, args: Any, context: Any
) -> _H:
    """``cls.__init__`` (a handle or timer handle) without its debug check."""
    handle = _new_handle(cls)
    handle._context = copy_context() if context is None else context  # type: ignore[attr-defined]
    handle._loop = loop  # type: ignore[attr-defined]
    handle._callback = callback  # type: ignore[attr-defined]
    handle._args = args
    handle._cancelled = False
    handle._repr = None  # type: ignore[attr-defined]
    handle._source_traceback = None  # type: ignore[attr-defined]
    return handle


def _report(loop: asyncio.AbstractEventLoop, handle: asyncio.Handle, exc: BaseException) -> None:
    """What ``Handle._run`` does when its callback raises: tell the loop's exception handler."""
    callback, args = handle._callback, handle._args  # type: ignore[attr-defined]
    source = format_helpers._format_callback_source(callback, args)
    context: dict[str, Any] = {
        "message": f"Exception in callback {source}",
        "exception": exc,
        "handle": handle,
    }
    if handle._source_traceback:  # type: ignore[attr-defined]
        context["source_traceback"] = handle._source_traceback  # type: ignore[attr-defined]
    loop.call_exception_handler(context)


class _VirtualEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a virtual clock, with its own timer queue.

    A simulation is a few hundred thousand loop passes, timers and task wake-ups, so the
    scheduling paths are lean: timers wait in a heap of ``(when, order, handle)`` tuples that
    compare in C (asyncio's heap of handles compares them with a Python method), timers due
    at the same instant run in the order they were set, and a pass neither polls a selector
    (see :class:`_VirtualSelector`) nor makes the checks only debug mode acts on. Outside
    debug mode, handles are filled in directly (no debug check per handle) and run inline, as
    ``Handle._run`` would run them. The clock advances exactly as asyncio's selector wait
    would advance it.

    Async generators are not tracked for :meth:`shutdown_asyncgens` (a simulation starts a few
    per request, and tracking each costs a weak reference and its callback): the tasks left at
    the end are cancelled by :func:`close_loop`, which closes the generators they run, and a
    generator dropped unfinished is closed by asyncio's finalizer hook, as on any loop.
    """

    # asyncio.BaseEventLoop's own state, used here as it uses it.
    _ready: collections.deque[asyncio.Handle]
    _stopping: bool
    _closed: bool
    _debug: bool
    _task_factory: object
    _timer_cancelled_count: int

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self._clock_resolution = 1e-9
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._virtual.time

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.Handle:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            handle = asyncio.Handle(callback, args, self, context)
        else:
            handle = _bare_handle(_Handle, self, callback, args, context)
        self._ready.append(handle)
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if when is None:
            raise TypeError("when cannot be None")
        if self._debug:
            timer = asyncio.TimerHandle(when, callback, args, self, context)
        else:
            timer = _bare_handle(_TimerHandle, self, callback, args, context)
            timer._when = when  # type: ignore[attr-defined]
        heapq.heappush(self._timers, (when, next(self._order), timer))
        timer._scheduled = True  # type: ignore[attr-defined]  # (counted when cancelled)
        return timer

    def create_task(
        self,
        coro: Generator[Any, None, _T] | Coroutine[Any, Any, _T],
        *,
        name: object = None,
        context: Context | None = None,
    ) -> asyncio.Task[_T]:
        if self._task_factory is not None or self._debug:
            return super().create_task(coro, name=name, context=context)
        if self._closed:
            raise RuntimeError("Event loop is closed")
        label = None if name is None else str(name)
        return asyncio.Task(coro, loop=self, name=label, context=context)

    def _asyncgen_firstiter_hook(self, agen: object) -> None:
        return None  # not tracked: see the class's docstring

    def _run_once(self) -> None:
        """Loop passes until the loop is told to stop (``run_forever`` calls this once per
        pass and then checks for that: it is one call here, without a frame per pass).

        A pass: drop cancelled timers, advance the clock to the next timer when nothing is
        ready, move the timers due by then to the ready queue, run that queue (and, while the
        passes after it would only run what it scheduled, those too)."""
        timers = self._timers
        virtual = self._virtual
        ready = self._ready
        popleft = ready.popleft
        heappop = heapq.heappop
        fds = virtual._fd_to_key  # type: ignore[attr-defined]
        resolution = self._clock_resolution
        while True:
            count = len(timers)
            cancelled = self._timer_cancelled_count
            if count > _MIN_SCHEDULED and cancelled / count > _MAX_CANCELLED:
                for _, _, timer in timers:
                    if timer._cancelled:
                        timer._scheduled = False  # type: ignore[attr-defined]
                timers[:] = [t for t in timers if not t[2]._cancelled]
                heapq.heapify(timers)
                self._timer_cancelled_count = 0
            elif cancelled:
                while timers and timers[0][2]._cancelled:
                    self._timer_cancelled_count -= 1
                    heappop(timers)[2]._scheduled = False  # type: ignore[attr-defined]
            if not (ready or self._stopping):
                if not timers:  # nothing scheduled and nothing ready: in virtual time a deadlock
                    raise RuntimeError("virtual event loop has nothing left to wait for")
                timeout = timers[0][0] - virtual.time
                if timeout > 0:
                    virtual.time += timeout if timeout < _MAX_TIMEOUT else _MAX_TIMEOUT
            virtual._passes += 1  # (poll_due, inline)
            if len(fds) > 1 or not virtual._passes % _POLL_EVERY:
                self._process_events(virtual.poll())  # type: ignore[attr-defined]
            end = virtual.time + resolution
            while timers and timers[0][0] < end:
                timer = heappop(timers)[2]
                timer._scheduled = False  # type: ignore[attr-defined]
                ready.append(timer)
            while True:
                for _ in range(len(ready)):
                    handle = popleft()
                    if handle._cancelled:
                        continue
                    try:  # Handle._run, inline
                        handle._context.run(handle._callback, *handle._args)  # type: ignore[attr-defined]
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        _report(self, handle, exc)
                # The next pass would find no time to advance, no timer due and no descriptor
                # to poll, and run just the callbacks these ones scheduled: run them now.
                if not ready or self._stopping or len(fds) > 1:
                    break
                if (timers and timers[0][0] < end) or not (virtual._passes + 1) % _POLL_EVERY:
                    break
                virtual._passes += 1
            if self._stopping:
                return

    async def sleep_until(self, deadline: float) -> None:
        """Wait until virtual time reaches ``deadline`` (at once if it has)."""
        if deadline <= self._virtual.time:
            return
        waiter = self.create_future()
        handle = self.call_at(deadline, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def virtual_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose clock jumps to the next timer instead of waiting for it.

    Only for code that waits on timers and futures (no sockets): emulated engines and the
    gateway's dispatch over in-process pools.
    """
    return _VirtualEventLoop()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the loop's leftover tasks, let them finish, shut down its async generators and
    close it (for loops this code runs by hand, such as :func:`virtual_event_loop`)."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
