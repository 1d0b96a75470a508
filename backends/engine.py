"""A continuous-batching engine for one emulated instance, driven by a :class:`Clock`.

The engine owns a waiting queue, a running batch (at most ``max_num_seqs``), a per-step token
budget (``max_num_batched_tokens``, so long prompts are prefilled in chunks alongside decodes)
and a paged KV cache of ``kv_capacity_tokens`` in blocks of ``block_size``. Each step it picks
the batch, asks the deployment's physics how long that composition takes, waits until the
step's absolute end time, then applies the step: prompt chunks advance, and every sequence
whose KV is complete gets one more token. Queueing, batch slow-down, KV exhaustion and
preemption therefore emerge from the loop; no request ever sleeps on its own.

A sequence's state is token counts only (``computed`` KV tokens, ``generated`` output tokens):
bookkeeping is per step, not per token, and consumers read new tokens when they are ready,
coalescing whatever the engine produced since they last looked.

Example::

    engine = Engine(deployment, LoopClock())
    engine.start()
    seq = engine.submit(prompt_tokens=1000, max_new_tokens=64)
    while not seq.finished:
        await seq.wait_beyond(seq.generated)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from typing import Protocol

from backends.clock import Clock
from backends.timing import StepShape

log = logging.getLogger("pdgate.engine")


class StepTimer(Protocol):
    """What the engine needs from a deployment."""

    @property
    def kv_capacity_tokens(self) -> int: ...

    def step_time(self, shape: StepShape) -> float: ...


class Sequence:
    """One request's progress on an engine.

    ``prompt`` tokens plus ``generated`` tokens are known; ``computed`` of them have KV in the
    cache. A step computes some of the missing ones; when none is missing after a step, the
    step has produced the next token.
    """

    __slots__ = (
        "_waiter",
        "arrival",
        "blocks",
        "computed",
        "finish_reason",
        "first_scheduled",
        "first_token_at",
        "generated",
        "hold_after_prefill",
        "id",
        "max_new",
        "prompt",
        "ready_at",
        "state",
        "transfer_s",
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
    ) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.max_new = max_new
        self.arrival = arrival
        self.generated = generated
        self.computed = computed
        self.transfer_s = transfer_s
        self.hold_after_prefill = hold_after_prefill
        self.blocks = 0
        self.state = "waiting"  # waiting | running | held | finished
        self.ready_at = 0.0
        self.first_scheduled: float | None = None
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def missing(self) -> int:
        return self.prompt + self.generated - self.computed

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "held")

    async def wait_beyond(self, seen: int) -> None:
        """Return once more than ``seen`` tokens exist or the sequence has finished."""
        while self.generated <= seen and not self.finished:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EngineStats:
    """Counters an engine keeps (read by metrics endpoints and tests)."""

    __slots__ = ("generation_tokens", "preemptions", "prompt_tokens", "steps")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.steps = 0


class Engine:
    """Continuous batching over a clock; see the module docstring."""

    # When the event loop falls this far behind the device schedule, restart the schedule
    # from now instead of bursting to catch up (the loop was starved, not the device).
    MAX_LAG_S = 0.25

    def __init__(
        self,
        deployment: StepTimer,
        clock: Clock,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        time_scale: float = 1.0,
    ) -> None:
        self._dep = deployment
        self._clock = clock
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.total_blocks = deployment.kv_capacity_tokens // block_size
        self.free_blocks = self.total_blocks
        self._time_scale = time_scale
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy_until: float | None = None
        self.failed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for seq in [*self.waiting, *self.running]:
            self._finish(seq, "abort")
        self.waiting.clear()
        self.running.clear()

    # -- requests --------------------------------------------------------------------------

    def submit(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        *,
        hold_after_prefill: bool = False,
        prefilled: bool = False,
        transfer_s: float = 0.0,
    ) -> Sequence:
        """Queue a request.

        ``hold_after_prefill``: stop after the first token and keep the KV blocks (a prefill
        leg) until :meth:`release`. ``prefilled``: the prompt's KV and the first token arrive
        from elsewhere, taking ``transfer_s`` once blocks are allocated (a decode leg).
        """
        seq = Sequence(
            next(self._ids),
            prompt_tokens,
            max_new_tokens,
            self._clock.now(),
            generated=1 if prefilled else 0,
            computed=prompt_tokens if prefilled else 0,
            transfer_s=transfer_s,
            hold_after_prefill=hold_after_prefill,
        )
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
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its KV now (not at the next step)."""
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            self.running.remove(seq)
        if seq.state != "finished":
            self._finish(seq, "abort")
            self._wake.set()

    def release(self, seq: Sequence) -> None:
        """Free a held prefill's KV blocks (idempotent)."""
        if seq.state == "held":
            self._free(seq)
            seq.state = "finished"
            self._wake.set()  # queued requests may fit now

    def pending_prefill(self) -> tuple[int, int, int]:
        """(prompt tokens still to prefill, decoding sequences, their total context)."""
        queued = sum(s.missing for s in self.waiting)
        decodes = context = 0
        for s in self.running:
            if s.generated == 0:
                queued += s.missing
            else:
                decodes += 1
                context += s.computed
        return queued, decodes, context

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    # -- the step loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception:
            # A bug in the physics or the scheduler must not leave requests waiting forever.
            log.exception(
                "engine step loop failed; aborting its %d sequences",
                len(self.waiting) + len(self.running),
            )
            self.failed = True
            for seq in [*self.waiting, *self.running]:
                self._finish(seq, "abort")
            self.waiting.clear()
            self.running.clear()
            raise

    async def _loop(self) -> None:
        while True:
            start = self._step_start()
            batch = self._schedule(start)
            if not batch:
                await self._idle(start)
                continue
            shape = StepShape.of([(n, seq.computed) for seq, n in batch])
            end = (
                start + self._dep.step_time(shape) / self._time_scale
                if self._time_scale > 0
                else start
            )
            await self._clock.sleep_until(end)
            self._busy_until = end
            self._apply(batch, end)
            if end <= self._clock.now() and self.stats.steps % 16 == 0:
                await asyncio.sleep(0)  # catching up: let consumers run now and then

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

    def _schedule(self, now: float) -> list[tuple[Sequence, int]]:
        budget = self.max_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.state != "running" or seq.ready_at > now:
                continue
            n = min(seq.missing, budget)
            if not self._grow(seq, n):
                continue  # preempted itself
            batch.append((seq, n))
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.missing, budget)
            if not self._allocate(seq, seq.computed + max(n, 1)):
                break  # KV full: first come, first served
            self.waiting.popleft()
            self.running.append(seq)
            seq.state = "running"
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            if seq.transfer_s > 0:
                seq.ready_at = now + seq.transfer_s / (self._time_scale or math.inf)
                seq.transfer_s = 0.0
                continue
            batch.append((seq, n))
            budget -= n
        return batch

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Make room for ``n`` more tokens of a running sequence, preempting the newest.

        A sequence that has outgrown the whole cache cannot be helped by preemption: it ends
        with ``length``, as an engine ends a sequence at its maximum model length.
        """
        if self._blocks_for(seq.computed + n) > self.total_blocks:
            self.running.remove(seq)
            self._finish(seq, "length")
            return False
        while not self._allocate(seq, seq.computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front."""
        self.running.remove(seq)
        self._free(seq)
        seq.computed = 0
        seq.state = "waiting"
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _apply(self, batch: list[tuple[Sequence, int]], end: float) -> None:
        stats = self.stats
        stats.steps += 1
        for seq, n in batch:
            if seq.state != "running":
                continue  # aborted while the step ran
            seq.computed += n
            if seq.missing:
                continue
            if seq.generated == 0:
                stats.prompt_tokens += seq.prompt  # once per request, however often recomputed
            seq.generated += 1
            stats.generation_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = end
            if seq.generated >= seq.max_new:
                self.running.remove(seq)
                self._finish(seq, "length")
            elif seq.hold_after_prefill:
                self.running.remove(seq)
                seq.state = "held"
                seq._notify()
            else:
                seq._notify()

    # -- KV blocks -------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _allocate(self, seq: Sequence, tokens: int) -> bool:
        extra = self._blocks_for(tokens) - seq.blocks
        if extra > self.free_blocks:
            return False
        if extra > 0:
            self.free_blocks -= extra
            seq.blocks += extra
        return True

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._free(seq)
        seq.state = "finished"
        seq.finish_reason = reason
        seq._notify()
