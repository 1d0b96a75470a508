"""A continuous-batching engine for one emulated instance, driven by a :class:`Clock`.

The engine owns a waiting queue, a running batch (at most ``max_num_seqs``), a per-step token
budget (``max_num_batched_tokens``, so long prompts are prefilled in chunks alongside decodes)
and a paged KV cache of ``kv_capacity_tokens`` in blocks of ``block_size``. Each step it picks
the batch, asks the deployment's physics how long that composition takes, waits until the
step's absolute end time, then applies the step: prompt chunks advance, and every sequence
whose KV is complete gets one more token. Queueing, batch slow-down, KV exhaustion and
preemption therefore emerge from the loop; no request ever sleeps on its own.

Optional behaviour, each off by default:

* **Prefix caching** (``prefix_caching``): requests carrying chained prompt block hashes reuse
  the KV of prefixes computed before (:mod:`backends.emulator.kvcache`). A hit skips the prefill
  compute of the cached tokens; attention still reads their KV, so the step's bytes do not
  shrink. Unreferenced cached blocks are evicted, least recently released first, on demand.
* **Speculative decoding** (``speculative_tokens`` = k, ``acceptance_rate`` = a): each decode
  step verifies k draft tokens, so the step computes ``k + 1`` tokens per decoding sequence and
  costs that verification plus ``k · draft_cost_fraction`` of a plain decode step for the
  drafts. Each draft is accepted with probability a until the first rejection, so a step yields
  ``1 + accepted`` tokens — on average ``(1 − a^(k+1)) / (1 − a)``. Draws come from a
  generator seeded with ``seed``: the same inputs give the same schedule.
* **Reserving KV for the whole request** (``reserve_max``, TensorRT-LLM's
  ``guaranteed_no_evict``): a request is admitted only when its prompt plus ``max_new_tokens``
  fit, and those blocks are taken at once, so no sequence is ever preempted. Without it
  (vLLM), a request is admitted when its next chunk fits, and the newest sequence is preempted
  (recomputed later) when decodes outgrow the cache.
* **Step building** (``step_policy``): ``mixed`` (vLLM V1, the default) runs the running
  sequences first, then admits waiting ones into the same step with whatever token budget is
  left, the last one cut into a chunk; ``prefill_first`` (SGLang) runs a prefill-only step
  whenever a waiting request can be admitted or a chunked prefill is unfinished, and a
  decode-only step otherwise; ``whole_prompt`` (TensorRT-LLM without chunked prefill) runs
  the decodes first and admits a new request only if its whole prompt fits in the budget left
  (first come, first served: admission stops at the first that does not).
* **Token-gap recording** (``recorder``): the gap before every token a sequence receives, for
  inter-token-latency percentiles in simulation. Recorded per step (one entry for all
  sequences that also took part in the previous step), never per token event.

A sequence's state is token counts only (``computed`` KV tokens, ``generated`` output tokens):
bookkeeping is per step, not per token, and consumers read new tokens when they are ready,
coalescing whatever the engine produced since they last looked.

**Bulk decoding** (``bulk_decode``, on unless speculating): most of a step is sequences that
just decode — one token each, nobody waiting on each token. They advance together: the engine
keeps their count and total context, so a step costs the same however many there are, and a
sequence's counts are derived from the step number it joined at (``generated`` and
``computed`` are exact whenever read). Only events cost per sequence: a KV block every
``block_size`` tokens, the last token, a consumer starting to wait on each token, preemption.
The steps, their shapes and times, every token's time, the recorded gaps and the order in
which consumers wake are those of the per-sequence path (``bulk_decode=False``), which runs
whenever the bulk's place in the running order matters (the token budget runs out before
sequences older than some bulk sequence) and tests compare against.

**Stepping.** On a clock bound to a virtual loop (``LoopClock(loop)``, as simulations run)
each step is a timer whose callback applies the step and builds the next one; elsewhere a task
sleeps until each step's end. The steps, their times and the order in which consumers wake are
the same either way (tests run both).

Example::

    engine = Engine(deployment, LoopClock())
    engine.start()
    seq = engine.submit(prompt_tokens=1000, max_new_tokens=64)
    while not seq.finished:
        await seq.wait_beyond(seq.generated)
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Generator
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, Protocol

from backends.clock import Clock, LoopClock
from backends.emulator.kvcache import PrefixCache
from backends.emulator.timing import StepShape

if TYPE_CHECKING:
    from backends.emulator.catalog import EngineKnobs

log = logging.getLogger("pdgate.engine")


class StepTimer(Protocol):
    """What the engine needs from a deployment."""

    @property
    def kv_capacity_tokens(self) -> int: ...

    def step_time(self, shape: StepShape) -> float: ...


class GapRecorder(Protocol):
    """Receives inter-token gaps: ``weight`` tokens each arrived ``gap`` seconds after the last."""

    def add(self, gap: float, weight: int) -> None: ...


class Sequence:
    """One request's progress on an engine.

    ``prompt`` tokens plus ``generated`` tokens are known; ``computed`` of them have KV in the
    cache (the first ``cached_tokens`` of them in shared prefix-cache entries). A step computes
    some of the missing ones; when none is missing after a step, the step has produced the next
    token.
    """

    __slots__ = (
        "_base",
        "_blocks",
        "_cap",
        "_co",
        "_comp",
        "_done",
        "_ev",
        "_fin",
        "_g0",
        "_gen",
        "_last",
        "_loop",
        "_rank",
        "_ring",
        "_waiter",
        "arrival",
        "cached_tokens",
        "cached_units",
        "finish_reason",
        "first_scheduled",
        "first_token_at",
        "hashes",
        "hold_after_prefill",
        "id",
        "max_new",
        "prompt",
        "ready_at",
        "state",
        "transfer_s",
        "unit",
    )

    def __init__(
        self,
        seq_id: int,
        prompt: int,
        max_new: int,
        arrival: float,
        *,
        generated: int = 0,
        computed: int = 0,
        transfer_s: float = 0.0,
        hold_after_prefill: bool = False,
        hashes: tuple[int, ...] = (),
        unit: int = 0,
        last_token_at: float | None = None,
    ) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.max_new = max_new
        self.arrival = arrival
        self._gen = generated
        self._comp = computed
        self.transfer_s = transfer_s
        self.hold_after_prefill = hold_after_prefill
        self.hashes = hashes  # chained prompt block hashes, one per ``unit`` tokens
        self.unit = unit
        self.cached_units = 0  # leading hashes whose KV this sequence holds in the prefix cache
        self.cached_tokens = 0
        self._blocks = 0  # blocks it owns beyond its cached prefix (see ``blocks``)
        self._cap = 0  # tokens its KV holds: cached_tokens + blocks · block_size (see ``cap``)
        self.state = "waiting"  # waiting | running | held | finished
        self.ready_at = 0.0
        self.first_scheduled: float | None = None
        self.first_token_at: float | None = None
        self._last = last_token_at
        self.finish_reason: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # its engine's virtual loop, if any
        # Bulk decoding (see Engine): while ``_co`` is the engine, the sequence gains one token
        # per engine step and ``_gen``/``_comp`` are its counts as of step ``_base``.
        self._co: Engine | None = None
        self._base = 0
        self._rank = 0  # admission order into the running batch
        self._ev = -1  # step at which its KV must grow next (while in bulk, off the ring)
        self._fin = -1  # step that produces its last token (while in bulk)
        # On the engine's growth ring (see Engine._grow_bulk): its slot there, and the slot's
        # grant count when it joined; it gains one block per grant since.
        self._ring = -1
        self._g0 = 0

    @property
    def generated(self) -> int:
        """Output tokens produced so far."""
        co = self._co
        return self._gen if co is None else self._gen + co.stats.steps - self._base

    @generated.setter
    def generated(self, value: int) -> None:
        if self._co is not None:
            self._co._leave(self)
        self._gen = value

    @property
    def computed(self) -> int:
        """Tokens whose KV is in the cache."""
        co = self._co
        return self._comp if co is None else self._comp + co.stats.steps - self._base

    @computed.setter
    def computed(self, value: int) -> None:
        if self._co is not None:
            self._co._leave(self)
        self._comp = value

    @property
    def last_token_at(self) -> float | None:
        """When its latest token was produced (or the previous leg's, for a decode leg)."""
        co = self._co
        return self._last if co is None else co._prev_end

    @last_token_at.setter
    def last_token_at(self, value: float | None) -> None:
        if self._co is not None:
            self._co._leave(self)
        self._last = value

    @property
    def blocks(self) -> int:
        """KV blocks it owns beyond its cached prefix."""
        slot = self._ring
        if slot < 0 or self._co is None:
            return self._blocks
        return self._blocks + self._co._grants[slot] - self._g0

    @property
    def cap(self) -> int:
        """Tokens its KV can hold now: ``cached_tokens + blocks · block_size``."""
        slot = self._ring
        if slot < 0 or self._co is None:
            return self._cap
        co = self._co
        return self._cap + (co._grants[slot] - self._g0) * co.block_size

    @property
    def missing(self) -> int:
        return self.prompt + self.generated - self.computed

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "held")

    def wait_beyond(self, seen: int) -> Awaitable[None]:
        """Something to await until more than ``seen`` tokens exist or the sequence has
        finished: done at once if they do, else a future that the next token or the end
        sets (nothing else does, so it never wakes its waiter early)."""
        if self.generated > seen or self.finished:
            return _READY
        waiter = self._waiter = _future(self._loop)
        if self._co is not None:
            self._co._notify_q.append(self)  # wake me at the next token
        return waiter

    def wait_finished(self) -> Awaitable[None]:
        """Something to await until the sequence has finished (or is held), ignoring the
        tokens before: done at once if it has, else a future that the end sets."""
        if self.finished:
            return _READY
        done = self._done = _future(self._loop)
        return done

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # (not cancelled with its waiter)
                waiter.set_result(None)

    def _end(self) -> None:
        self._notify()
        done = self._done
        if done is not None:
            self._done = None
            if not done.done():
                done.set_result(None)


class _Ready:
    """An awaitable that is already done."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # (a generator that ends at once)


_READY = _Ready()


def _future(loop: asyncio.AbstractEventLoop | None) -> asyncio.Future[None]:
    """A future on the running loop: on ``loop`` when it is known to be it (a virtual loop,
    which makes its futures as asyncio's base loop does), without looking the loop up."""
    if loop is None:
        return asyncio.get_running_loop().create_future()
    return asyncio.Future(loop=loop)


class EngineStats:
    """Counters an engine keeps (read by metrics endpoints, simulation reports and tests)."""

    __slots__ = (
        "draft_tokens",
        "draft_tokens_accepted",
        "generation_tokens",
        "kv_peak_blocks",
        "preemptions",
        "prefix_hit_tokens",
        "prompt_tokens",
        "steps",
    )

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.steps = 0
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache
        self.draft_tokens = 0  # speculative tokens verified
        self.draft_tokens_accepted = 0
        self.kv_peak_blocks = 0  # most blocks held by sequences at once (not evictable cache)


_Step = tuple[list[tuple[Sequence, int]], StepShape, tuple[int, int] | None]


def _rank_of(seq: Sequence) -> int:
    return seq._rank


def _first_rank(entry: tuple[Sequence, int]) -> int:
    return entry[0]._rank


class Engine:
    """Continuous batching over a clock; see the module docstring."""

    # When the event loop falls this far behind the device schedule, restart the schedule
    # from now instead of bursting to catch up (the loop was starved, not the device).
    MAX_LAG_S = 0.25

    @classmethod
    def from_knobs(
        cls, deployment: StepTimer, clock: Clock, knobs: EngineKnobs, **options: Any
    ) -> Engine:
        """An engine running ``knobs`` (an instance's engine settings: caps, budget, block size,
        prefix caching, speculative decoding, admission, step policy); ``options`` are the
        engine's other arguments (time scale, seed, recorder, bulk decoding)."""
        return cls(
            deployment,
            clock,
            max_num_seqs=knobs.max_num_seqs,
            max_num_batched_tokens=knobs.max_num_batched_tokens,
            block_size=knobs.block_size,
            prefix_caching=knobs.enable_prefix_caching,
            speculative_tokens=knobs.speculative_tokens,
            acceptance_rate=knobs.acceptance_rate,
            draft_cost_fraction=knobs.draft_cost_fraction,
            reserve_max=knobs.scheduler_policy == "guaranteed_no_evict",
            step_policy=knobs.step_policy,
            **options,
        )

    def __init__(
        self,
        deployment: StepTimer,
        clock: Clock,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        time_scale: float = 1.0,
        prefix_caching: bool = False,
        speculative_tokens: int = 0,
        acceptance_rate: float = 0.0,
        draft_cost_fraction: float = 0.0,
        seed: int = 0,
        recorder: GapRecorder | None = None,
        reserve_max: bool = False,
        bulk_decode: bool = True,
        step_policy: str = "mixed",
    ) -> None:
        self._dep = deployment
        self._clock = clock
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.total_blocks = deployment.kv_capacity_tokens // block_size
        self.free_blocks = self.total_blocks
        self._time_scale = time_scale
        self.cache = PrefixCache() if prefix_caching else None
        self.speculative_tokens = speculative_tokens
        self.acceptance_rate = acceptance_rate
        self.draft_cost_fraction = draft_cost_fraction
        self._rng = random.Random(seed)
        self._recorder = recorder
        self._reserve_max = reserve_max
        if step_policy not in ("mixed", "prefill_first", "whole_prompt"):
            raise ValueError(f"unknown step policy {step_policy!r}")
        self.step_policy = step_policy
        self._prev_end = -math.inf  # end of the previous step (gap bookkeeping)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # On a virtual loop the steps are timer callbacks instead (see _tick).
        self._vloop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None  # the step's end, the idle wake-up or a kick
        self._idle_now = False  # (virtual loop) nothing scheduled: new work starts a step
        self._busy_until: float | None = None
        self.failed = False
        # Bulk decoding: running sequences that just decode (one token a step, nobody waiting
        # on each token) advance together as counters instead of one update per sequence per
        # step; see _schedule_bulk. Everything else running is in ``_others``, in batch order.
        self._bulk = bulk_decode and speculative_tokens == 0
        self._ranks = itertools.count()
        self._others: list[Sequence] = []
        self._co: set[Sequence] = set()
        self._co_computed = 0  # their total context now
        self._co_max_rank = -1  # at least the newest one's rank
        self._grow_at: dict[int, list[Sequence]] = {}  # step → those whose KV grows in it
        # The growth ring: slot ``k`` holds the bulk sequences whose KV grows by a block in
        # every step numbered ``k`` modulo ``block_size``, and counts the grants made to it.
        self._ring: list[set[Sequence]] = [set() for _ in range(block_size)]
        self._grants = [0] * block_size
        self._finish_at: dict[int, list[Sequence]] = {}  # step → those it ends
        self._notify_q: list[Sequence] = []  # those a consumer waits on for the next token

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None or self._vloop is not None:
            return
        clock = self._clock
        vloop = clock.virtual_loop if isinstance(clock, LoopClock) else None
        if vloop is not None:
            self._vloop = vloop
            self._idle_now = True
            self._kick()
        else:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._vloop = None
        self._idle_now = False
        self._abort_all()

    def _abort_all(self) -> None:
        self._dissolve()  # (first: the bulk's counts and blocks written in, then freed)
        for seq in [*self.waiting, *self.running]:
            self._finish(seq, "abort")
        self.waiting.clear()
        self.running.clear()
        self._others.clear()

    # -- requests --------------------------------------------------------------------------

    def submit(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        *,
        hold_after_prefill: bool = False,
        prefilled: bool = False,
        transfer_s: float = 0.0,
        block_hashes: Seq[int] = (),
        hash_block_tokens: int = 512,
        last_token_at: float | None = None,
    ) -> Sequence:
        """Queue a request.

        ``hold_after_prefill``: stop after the first token and keep the KV blocks (a prefill
        leg) until :meth:`release`. ``prefilled``: the prompt's KV and the first token arrive
        from elsewhere, taking ``transfer_s`` once blocks are allocated (a decode leg).
        ``block_hashes``: chained hashes of the prompt's ``hash_block_tokens``-token blocks,
        used by the prefix cache (ignored without one, and for decode legs).
        ``last_token_at``: when the request's previous token was produced elsewhere (the
        prefill side's first token), for gap recording.
        """
        cacheable = (
            self.cache is not None
            and not prefilled
            and hash_block_tokens > 0
            and hash_block_tokens % self.block_size == 0
        )
        seq = Sequence(
            next(self._ids),
            prompt_tokens,
            max_new_tokens,
            self._clock.now(),
            generated=1 if prefilled else 0,
            computed=prompt_tokens if prefilled else 0,
            transfer_s=transfer_s,
            hold_after_prefill=hold_after_prefill,
            hashes=tuple(block_hashes) if cacheable else (),
            unit=hash_block_tokens if cacheable else 0,
            last_token_at=last_token_at,
        )
        seq._loop = self._vloop
        needed = self._blocks_for(prompt_tokens + 1)
        if needed > self.total_blocks:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens needs {needed} KV blocks; "
                f"the instance has {self.total_blocks}"
            )
        if prefilled and seq.generated >= max_new_tokens:
            seq.state = "finished"
            seq.finish_reason = "length"
            return seq
        self.waiting.append(seq)
        self._kick()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its KV now (not at the next step)."""
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            self._drop(seq)
        if seq.state != "finished":
            self._finish(seq, "abort")
            self._kick()

    def release(self, seq: Sequence) -> None:
        """Free a held prefill's KV blocks (idempotent)."""
        if seq.state == "held":
            self._free(seq)
            seq.state = "finished"
            self._kick()  # queued requests may fit now

    def pending_prefill(self) -> tuple[int, int, int]:
        """(prompt tokens still to prefill, decoding sequences, their total context)."""
        queued = sum(s.missing for s in self.waiting)
        decodes, context = len(self._co), self._co_computed
        for s in self._others:
            if s._gen == 0:
                queued += s.prompt - s._comp
            else:
                decodes += 1
                context += s._comp
        return queued, decodes, context

    @property
    def used_blocks(self) -> int:
        """Blocks not free: held by sequences or by the prefix cache (evictable or not)."""
        return self.total_blocks - self.free_blocks

    @property
    def active_blocks(self) -> int:
        """Blocks sequences need now (cached blocks nobody references are reusable)."""
        evictable = self.cache.evictable_blocks if self.cache is not None else 0
        return self.total_blocks - self.free_blocks - evictable

    # -- the step loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception:
            self._failed()
            raise

    async def _loop(self) -> None:
        while True:
            start = self._step_start()
            step = self._schedule(start)
            if step is None:
                await self._idle(start)
                continue
            batch, shape, drafting = step
            end = self._step_end(start, shape, drafting)
            await self._clock.sleep_until(end)
            if self._step_done(batch, end):
                await asyncio.sleep(0)  # catching up: let consumers run now and then

    def _step_end(self, start: float, shape: StepShape, drafting: tuple[int, int] | None) -> float:
        seconds = self._dep.step_time(shape)
        if drafting is not None:
            seconds += self._draft_time(*drafting)
        return start + seconds / self._time_scale if self._time_scale > 0 else start

    def _step_done(self, batch: list[tuple[Sequence, int]], end: float) -> bool:
        """Apply a step that has ended; True when the loop should let consumers run before
        the next step (it is behind its schedule: every 16th step)."""
        self._busy_until = end
        self._apply(batch, end)
        return end <= self._clock.now() and self.stats.steps % 16 == 0

    # The same loop on a virtual loop, as callbacks: a step is one timer, whose callback
    # applies it and builds the next, with no task to wake in between (two loop passes and a
    # coroutine resumption per step otherwise). Events keep their order: the 16th-step yield
    # becomes a call_soon, an idle engine waits for a kick (new work, freed KV) or for its
    # next KV transfer to land.

    def _tick(self) -> None:
        """Build steps until one takes time (its end is timed) or nothing can run.

        (``_step_start``, ``_schedule``, ``_step_end`` and ``_step_done`` spelled out: this
        runs once a step.)"""
        self._timer = None
        self._idle_now = False
        loop = self._vloop
        if loop is None:  # stopped
            return
        clock = self._clock  # bound to the loop: its time, which stands still in a callback
        try:
            while True:
                now = clock.now()
                busy = self._busy_until
                start = busy if busy is not None and now - busy < self.MAX_LAG_S else now
                if self.step_policy == "prefill_first":
                    step = self._schedule(start)
                else:
                    step = self._build(start, decodes=True, admit=True)
                if step is None:
                    self._idle_until_kicked(loop, start)
                    return
                batch, shape, drafting = step
                seconds = self._dep.step_time(shape)
                if drafting is not None:
                    seconds += self._draft_time(*drafting)
                scale = self._time_scale
                end = start + seconds / scale if scale > 0 else start
                if end > now:
                    self._timer = loop.call_at(end, self._timed_step_done, batch, end)
                    return
                self._busy_until = end
                self._apply(batch, end)
                if end <= now and self.stats.steps % 16 == 0:
                    self._timer = loop.call_soon(self._tick)
                    return
        except Exception:
            self._failed()

    def _timed_step_done(self, batch: list[tuple[Sequence, int]], end: float) -> None:
        self._timer = None
        try:
            self._busy_until = end  # (_step_done)
            self._apply(batch, end)
            if end <= self._clock.now() and self.stats.steps % 16 == 0:
                if self._vloop is not None:
                    self._timer = self._vloop.call_soon(self._tick)
                return
        except Exception:
            self._failed()
            return
        self._tick()

    def _idle_until_kicked(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._busy_until = None
        self._idle_now = True
        pending = [s.ready_at for s in self.running if s.ready_at > now]
        if pending:
            self._timer = loop.call_at(min(pending), self._tick)

    def _kick(self) -> None:
        """New work, or room for it: an idle engine looks for a step."""
        if self._vloop is None:
            self._wake.set()
        elif self._idle_now:
            self._idle_now = False
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._vloop.call_soon(self._tick)

    def _failed(self) -> None:
        # A bug in the physics or the scheduler must not leave requests waiting forever.
        log.exception(
            "engine step loop failed; aborting its %d sequences",
            len(self.waiting) + len(self.running),
        )
        self.failed = True
        self._abort_all()

    def _step_start(self) -> float:
        now = self._clock.now()
        if self._busy_until is not None and now - self._busy_until < self.MAX_LAG_S:
            return self._busy_until
        return now

    async def _idle(self, now: float) -> None:
        """Nothing schedulable: wait for new work or for the next KV transfer to land."""
        self._busy_until = None
        self._wake.clear()
        pending = [s.ready_at for s in self.running if s.ready_at > now]
        if not pending:
            await self._wake.wait()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep_until(min(pending)))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _schedule(self, now: float) -> _Step | None:
        """Pick this step's batch: running sequences first (oldest first), then new ones.

        Returns the batch, its shape (summed here, so a step costs one pass over the batch)
        and, when it verifies drafts, (speculating sequences, their context); None when
        nothing can run. Under ``prefill_first`` a step is either prefills or decodes. Sequences
        decoding in bulk are not in the returned batch: they are all in the step, and the shape
        counts them from the engine's running totals; a prefill-only step, which they sit out,
        first returns them to the per-sequence path.
        """
        if self.step_policy == "prefill_first":
            if self._prefill_pending(now):
                step = self._build(now, decodes=False, admit=True)
                if step is not None:
                    return step
            return self._build(now, decodes=True, admit=False)
        return self._build(now, decodes=True, admit=True)

    def _prefill_pending(self, now: float) -> bool:
        if self.waiting and len(self.running) < self.max_num_seqs:
            return True
        return any(
            s.generated == 0 and s.missing > 0 and s.state == "running" and s.ready_at <= now
            for s in self.running
        )

    def _build(self, now: float, *, decodes: bool, admit: bool) -> _Step | None:
        budget = self.max_batched_tokens
        spec = self.speculative_tokens
        step_no = self.stats.steps
        co = self._co
        if co and not decodes:  # the bulk gains a token every step; this one has no decodes
            self._dissolve()
        order: Seq[Sequence | None] | None = self._bulk_order(now, step_no) if co else None
        if order is None:
            if co:
                self._dissolve()
            order = list(self.running)
        co_tokens_due = bool(co)  # the bulk's tokens are not yet taken from the budget
        batch: list[tuple[Sequence, int]] = []
        new = kv_read = drafts = draft_seqs = draft_context = prompts = prompt_tokens = 0
        pairs = decode_pairs = 0.0
        for seq in order:
            if seq is None:  # the bulk, older than every sequence after this mark
                budget -= len(co)
                co_tokens_due = False
                continue
            if budget <= 0:
                break
            if seq._co is self:  # decoding in bulk, and its KV must grow in this step
                if seq._ev != step_no:
                    continue
                c = seq._comp + step_no - seq._base
                if self._grow(seq, c, 1):
                    self._schedule_growth(seq, step_no + seq._cap - c)
                continue
            if seq.state != "running" or seq.ready_at > now:
                continue
            c = seq._comp
            n = seq.prompt + seq._gen - c
            if not decodes and seq._gen:
                continue  # a prefill-only step
            if n == 1 and not spec:  # the common case: one plain decode token
                if c >= seq._cap and not self._grow(seq, c, 1):
                    continue
                batch.append((seq, 1))
                budget -= 1
                new += 1
                kv_read += c
                pairs += c + 1
                decode_pairs += c + 1
                continue
            d = 0
            if spec and n == 1 and seq._gen:  # decoding: verify drafts, not past max_new
                d = min(spec, seq.max_new - seq._gen - 1, budget - 1)
                n += d
            elif n > budget:
                n = budget
            if c + n > seq._cap and not self._grow(seq, c, n):
                continue  # preempted (or ended) itself
            batch.append((seq, n))
            budget -= n
            new += n
            kv_read += c
            pairs += n * (c + (n + 1) / 2)
            if d:
                drafts += d
                draft_seqs += 1
                draft_context += c
            else:  # the next chunk of its prompt
                prompts += 1
                prompt_tokens += n
        bulk = len(co)
        if co_tokens_due:
            budget -= bulk
        whole = self.step_policy == "whole_prompt"
        while admit and budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if whole and seq.missing > budget and (batch or bulk):
                break  # the whole prompt must fit (an empty step takes a chunk of it)
            if seq.hashes and seq._comp == 0:
                self._lookup(seq, first=seq.first_scheduled is None)
            n = min(seq.missing, budget)
            need = seq._comp + max(n, 1)
            if self._reserve_max:  # never beyond the whole cache: such a request ends early
                need = max(need, min(seq.prompt + seq.max_new, self.total_blocks * self.block_size))
            if not self._allocate(seq, need):
                self._unlookup(seq)
                break  # KV full: first come, first served
            self.waiting.popleft()
            self.running.append(seq)
            self._others.append(seq)
            seq._rank = next(self._ranks)
            seq.state = "running"
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            if seq.transfer_s > 0:
                seq.ready_at = now + seq.transfer_s / (self._time_scale or math.inf)
                seq.transfer_s = 0.0
                # A transfer too short to move the clock (time scale 0, or so large that
                # ``now + t`` rounds to ``now``) has landed: decode in this step, since no
                # timer would ever wake the engine for it.
                if seq.ready_at > now:
                    continue
            c = seq._comp
            batch.append((seq, n))
            budget -= n
            new += n
            kv_read += c
            pairs += n * (c + (n + 1) / 2)
            if n > 1:  # a prompt (one whose KV arrived from a prefill worker has one token left)
                prompts += 1
                prompt_tokens += n
        active = self.active_blocks
        if active > self.stats.kv_peak_blocks:
            self.stats.kv_peak_blocks = active
        if bulk:  # one decode token each; every partial sum stays an exact float
            new += bulk
            kv_read += self._co_computed
            pairs += self._co_computed + bulk
            decode_pairs += self._co_computed + bulk
        elif not batch:
            return None
        shape = StepShape(
            new, pairs, kv_read, len(batch) + bulk, decode_pairs, prompt_tokens, prompts
        )
        return batch, shape, (draft_seqs, draft_context) if drafts else None

    def _bulk_order(self, now: float, step_no: int) -> Seq[Sequence | None] | None:
        """The order in which to visit this step's sequences that are not plain bulk decodes,
        or None when the bulk must be dissolved to keep the per-sequence schedule exact.

        The bulk sequences take one token each wherever they stand in the running order. That
        place only matters when the token budget runs out: then they must all be older than
        every other schedulable sequence (None marks where they take their tokens), or the
        step is scheduled sequence by sequence. KV growth is visited in running order too.
        """
        grow = self._grow_at.pop(step_no, None)
        ring = self._ring[step_no % self.block_size]
        others = self._others
        bulk = len(self._co)
        demand = bulk
        first = -1  # rank of the oldest other sequence that can run now
        for seq in others:
            if seq.state == "running" and seq.ready_at <= now:
                demand += seq.prompt + seq._gen - seq._comp
                if first < 0:
                    first = seq._rank
        if grow is not None:  # those still in the bulk and due now (entries go stale)
            grow = [s for s in grow if s._co is self and s._ev == step_no]
            if len(set(grow)) < len(grow):  # one that left the bulk and joined it again
                grow = list(dict.fromkeys(grow))
        binding = demand > self.max_batched_tokens
        if binding and (bulk > self.max_batched_tokens or 0 <= first < self._co_max_rank):
            return None
        if (grow or ring) and self._grow_bulk(
            grow or [], ring, step_no, now, others if not binding else ()
        ):
            grow = None
        elif ring:  # they grow one by one below, in running order, with those due off the ring
            grow = [*(grow or ()), *self._unring(ring, step_no)]
        if not binding:
            if not grow:
                return list(others)
            return sorted(others + grow, key=_rank_of)
        if grow:
            grow.sort(key=_rank_of)
        return [*(grow or ()), None, *others]

    def _grow_bulk(
        self,
        grow: list[Sequence],
        ring: set[Sequence],
        step_no: int,
        now: float,
        before: Seq[Sequence],
    ) -> bool:
        """Give each bulk sequence due to grow in this step (those in ``grow`` and on the
        ring's slot ``ring``, each at its capacity) one more block at once, when the free
        blocks cover them and whatever the sequences in ``before`` (visited among them) need in
        this step: no allocation can then fail, so the order of the allocations does not
        matter. False (nothing done) otherwise.

        A block lasts ``block_size`` steps, so each grows again ``block_size`` steps later,
        and every ``block_size`` steps after that while it stays in the bulk: the ring's slot
        for this step number keeps them, and a grant to the slot is one count, however many
        sequences it holds (their ``blocks`` and ``cap`` are read through it)."""
        free, bs = self.free_blocks, self.block_size
        need = taken = len(grow) + len(ring)
        if need > free:
            return False
        for seq in before:
            if seq.state == "running" and seq.ready_at <= now:
                tokens = seq.prompt + seq._gen - seq.cached_tokens
                need += max(0, -(-tokens // bs) - seq._blocks)
        if need > free:  # (a sequence that has outgrown the cache leaves no block free)
            return False
        self.free_blocks = free - taken
        slot = step_no % bs
        grants = self._grants
        if ring:
            grants[slot] += 1
        for seq in grow:  # onto the ring, with the block it gets now
            seq._blocks += 1
            seq._cap += bs
            seq._ev = -1
            seq._ring = slot
            seq._g0 = grants[slot]
            ring.add(seq)
        return True

    def _off_ring(self, seq: Sequence) -> None:
        """Take a sequence off the growth ring, with the blocks granted to it written in."""
        slot = seq._ring
        k = self._grants[slot] - seq._g0
        seq._blocks += k
        seq._cap += k * self.block_size
        seq._ring = -1
        self._ring[slot].discard(seq)

    def _unring(self, ring: set[Sequence], step_no: int) -> list[Sequence]:
        """Every sequence of a ring slot, off the ring and due to grow in this step."""
        out = list(ring)
        for seq in out:
            self._off_ring(seq)
            seq._ev = step_no
        return out

    def _schedule_growth(self, seq: Sequence, step_no: int) -> None:
        seq._ev = step_no
        at = self._grow_at.get(step_no)
        if at is None:
            self._grow_at[step_no] = [seq]
        else:
            at.append(seq)

    def _join(self, seq: Sequence) -> None:
        """A running sequence that will decode one token a step with nobody waiting on each
        token: from now on it advances with the bulk."""
        step_no = self.stats.steps  # the next step's number
        self._others.remove(seq)
        self._co.add(seq)
        seq._co = self
        seq._base = step_no
        self._co_computed += seq._comp
        if seq._rank > self._co_max_rank:
            self._co_max_rank = seq._rank
        self._schedule_growth(seq, step_no + max(0, seq._cap - seq._comp))
        seq._fin = fin = step_no + seq.max_new - seq._gen - 1
        at = self._finish_at.get(fin)
        if at is None:
            self._finish_at[fin] = [seq]
        else:
            at.append(seq)

    def _leave(self, seq: Sequence, *, keep: bool = True) -> None:
        """Take a sequence out of the bulk, with its counts brought up to date (``keep``: it
        stays in the running batch)."""
        k = self.stats.steps - seq._base
        seq._gen += k
        seq._comp += k
        seq._last = self._prev_end  # it took part in every step since joining
        if seq._ring >= 0:
            self._off_ring(seq)
        seq._co = None
        self._co.discard(seq)
        self._co_computed -= seq._comp
        if not self._co:  # the last one: drop the schedule's stale entries
            self._co_max_rank = -1
            self._grow_at.clear()
            self._finish_at.clear()
        if keep:
            bisect.insort(self._others, seq, key=_rank_of)

    def _dissolve(self) -> None:
        """Every bulk sequence back to per-sequence scheduling."""
        for seq in self._co:
            k = self.stats.steps - seq._base
            seq._gen += k
            seq._comp += k
            seq._last = self._prev_end
            if seq._ring >= 0:
                self._off_ring(seq)
            seq._co = None
        if self._co:
            self._others = [s for s in self.running if s.state == "running"]
        self._co.clear()
        self._co_computed = 0
        self._co_max_rank = -1
        self._grow_at.clear()
        self._finish_at.clear()
        self._notify_q.clear()

    def _drop(self, seq: Sequence) -> None:
        """Remove a sequence from the running batch."""
        self.running.remove(seq)
        if seq._co is self:
            self._leave(seq, keep=False)
        else:
            self._others.remove(seq)

    def _draft_time(self, seqs: int, context: int) -> float:
        """The drafter's cost: k sequential passes, each a fraction of a plain decode step of
        the sequences that speculate."""
        plain = self._dep.step_time(StepShape(seqs, float(context + seqs), context, seqs))
        return self.speculative_tokens * self.draft_cost_fraction * plain

    def _grow(self, seq: Sequence, computed: int, n: int) -> bool:
        """Make room for ``n`` more tokens of a running sequence that has ``computed``,
        preempting the newest.

        A sequence that has outgrown the whole cache cannot be helped by preemption: it ends
        with ``length``, as an engine ends a sequence at its maximum model length.
        """
        if self._blocks_for(computed + n) > self.total_blocks:
            self._drop(seq)
            self._finish(seq, "length")
            return False
        while not self._allocate(seq, computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front."""
        self._drop(seq)
        self._free(seq)
        seq._comp = 0
        seq.state = "waiting"
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _apply(self, batch: list[tuple[Sequence, int]], end: float) -> None:
        stats = self.stats
        step_no = stats.steps
        stats.steps = step_no + 1
        recorder, prev = self._recorder, self._prev_end
        self._prev_end = end
        # The bulk: one more token each, all of them after a token in the previous step.
        bulk = len(self._co)
        self._co_computed += bulk
        in_step = produced = bulk  # sequences whose previous token came from the previous step
        ending = self._finish_at.pop(step_no, None)
        if ending is not None or self._notify_q:
            # Bulk sequences that end, or that a consumer waits on, are handled here in
            # running order among the others: wake-ups keep the per-sequence order.
            # (negative: batch entries count tokens, zero for an empty prompt's first step)
            events = [(s, -1) for s in ending or () if s._fin == step_no and s._co is self]
            events += [(s, -2) for s in self._notify_q]
            self._notify_q = []
            todo = sorted(batch + events, key=_first_rank) if events else batch
        else:
            todo = batch
        for seq, n in todo:
            if n < 0:  # from the bulk
                if seq._co is not self:
                    continue
                if n == -1:  # its last token
                    self._drop(seq)
                    self._finish(seq, "length")
                else:
                    self._leave(seq)
                    seq._notify()
                continue
            if seq.state != "running":
                continue  # aborted while the step ran
            computed = seq._comp + n
            gen = seq._gen
            known = seq.prompt + gen
            if computed == known and gen:  # the common case: one more decoded token
                seq._comp = computed
                gen += 1
                seq._gen = gen
                produced += 1
                last = seq._last
                seq._last = end
                if last == prev:
                    in_step += 1
                elif last is not None and recorder is not None:
                    recorder.add(end - last, 1)
                if gen >= seq.max_new:
                    self._drop(seq)
                    self._finish(seq, "length")
                elif seq._waiter is not None:
                    seq._notify()
                continue
            if computed < known:
                seq._comp = computed  # a prompt chunk; no token yet
                continue
            tokens = 1
            if computed > known:  # speculative: verified computed - known drafts
                accepted = self._accepted(computed - known)
                computed = known + accepted
                tokens += accepted
            seq._comp = computed
            seq._gen = gen + tokens
            produced += tokens
            if gen == 0:
                stats.prompt_tokens += seq.prompt  # once per request, however often recomputed
                if seq.first_token_at is None:
                    seq.first_token_at = end
                if seq.hashes:
                    self._adopt(seq)
            last = seq._last
            seq._last = end
            if recorder is not None and last is not None:
                if last == prev and tokens == 1:
                    in_step += 1
                else:
                    recorder.add((end - last) / tokens, tokens)
            if seq._gen >= seq.max_new:
                self._drop(seq)
                self._finish(seq, "length")
            elif seq.hold_after_prefill:
                self._drop(seq)
                seq.state = "held"
                seq._end()
            elif seq._waiter is not None:
                seq._notify()
        if in_step and recorder is not None:
            recorder.add(end - prev, in_step)
        stats.generation_tokens += produced
        if self._bulk:
            for seq, _ in batch:
                if (
                    seq.state == "running"
                    and seq._co is None
                    and seq._last == end
                    and seq._comp == seq.prompt + seq._gen - 1
                    and (seq._waiter is None or seq._waiter.done())
                ):
                    self._join(seq)

    def _accepted(self, drafts: int) -> int:
        """Drafts accepted in one verification: each with probability a, until a rejection."""
        a, rng = self.acceptance_rate, self._rng
        accepted = 0
        while accepted < drafts and rng.random() < a:
            accepted += 1
        self.stats.draft_tokens += drafts
        self.stats.draft_tokens_accepted += accepted
        return accepted

    # -- prefix cache ----------------------------------------------------------------------

    def _full_units(self, seq: Sequence, tokens: int) -> int:
        return min(len(seq.hashes), tokens // seq.unit)

    def _lookup(self, seq: Sequence, *, first: bool) -> None:
        """Reference the cached leading units of a waiting sequence's prompt (not all of it:
        the last prompt token is always computed, to produce the first output token)."""
        cache = self.cache
        if cache is None:
            return
        limit = self._full_units(seq, seq.prompt - 1)
        hit = cache.match(seq.hashes[:limit])
        if hit:
            cache.acquire(seq.hashes[:hit])
            seq.cached_units = hit
            seq.cached_tokens = seq._comp = hit * seq.unit
            seq._cap = seq.cached_tokens + seq._blocks * self.block_size
            if first:
                self.stats.prefix_hit_tokens += seq.cached_tokens

    def _unlookup(self, seq: Sequence) -> None:
        """Undo :meth:`_lookup` for a sequence that stays waiting."""
        if seq.cached_units and seq._blocks == 0 and self.cache is not None:
            self.cache.release(seq.hashes[: seq.cached_units])
            seq.cached_units = seq.cached_tokens = seq._comp = seq._cap = 0

    def _adopt(self, seq: Sequence) -> None:
        """After prefill, hand the prompt's full units to the prefix cache (deduplicated)."""
        cache = self.cache
        if cache is None:
            return
        full = self._full_units(seq, seq.prompt)
        per_unit = seq.unit // self.block_size
        for h in seq.hashes[seq.cached_units : full]:
            if not cache.insert(h, per_unit):  # computed meanwhile by another sequence
                cache.acquire((h,))
                self.free_blocks += per_unit
            seq._blocks -= per_unit
        if full > seq.cached_units:
            seq.cached_units = full
            seq.cached_tokens = full * seq.unit
        seq._cap = seq.cached_tokens + seq._blocks * self.block_size

    # -- KV blocks -------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _allocate(self, seq: Sequence, tokens: int) -> bool:
        extra = self._blocks_for(tokens - seq.cached_tokens) - seq._blocks
        if extra > self.free_blocks:
            cache = self.cache
            if cache is None or extra > self.free_blocks + cache.evictable_blocks:
                return False
            self.free_blocks += cache.evict(extra - self.free_blocks)
        if extra > 0:
            self.free_blocks -= extra
            seq._blocks += extra
            seq._cap = seq.cached_tokens + seq._blocks * self.block_size
        return True

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq._blocks
        seq._blocks = 0
        if seq.cached_units and self.cache is not None:
            self.cache.release(seq.hashes[: seq.cached_units])
        seq.cached_units = seq.cached_tokens = seq._cap = 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._free(seq)
        seq.state = "finished"
        seq.finish_reason = reason
        seq._end()
