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
import random
from collections import deque
from collections.abc import Sequence as Seq
from typing import Protocol

from backends.clock import Clock
from backends.emulator.kvcache import PrefixCache
from backends.emulator.timing import StepShape

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
        "_done",
        "_waiter",
        "arrival",
        "blocks",
        "cached_tokens",
        "cached_units",
        "cap",
        "computed",
        "finish_reason",
        "first_scheduled",
        "first_token_at",
        "generated",
        "hashes",
        "hold_after_prefill",
        "id",
        "last_token_at",
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
        self.generated = generated
        self.computed = computed
        self.transfer_s = transfer_s
        self.hold_after_prefill = hold_after_prefill
        self.hashes = hashes  # chained prompt block hashes, one per ``unit`` tokens
        self.unit = unit
        self.cached_units = 0  # leading hashes whose KV this sequence holds in the prefix cache
        self.cached_tokens = 0
        self.blocks = 0  # blocks this sequence owns (beyond its cached prefix)
        self.cap = 0  # tokens its KV can hold now: cached_tokens + blocks · block_size
        self.state = "waiting"  # waiting | running | held | finished
        self.ready_at = 0.0
        self.first_scheduled: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = last_token_at
        self.finish_reason: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None

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

    async def wait_finished(self) -> None:
        """Return once the sequence has finished (or is held), ignoring the tokens before."""
        while not self.finished:
            self._done = asyncio.get_running_loop().create_future()
            try:
                await self._done
            finally:
                self._done = None

    def _notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self) -> None:
        self._notify()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


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
        prefix_caching: bool = False,
        speculative_tokens: int = 0,
        acceptance_rate: float = 0.0,
        draft_cost_fraction: float = 0.0,
        seed: int = 0,
        recorder: GapRecorder | None = None,
        reserve_max: bool = False,
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
            step = self._schedule(start)
            if step is None:
                await self._idle(start)
                continue
            batch, shape, drafting = step
            seconds = self._dep.step_time(shape)
            if drafting is not None:
                seconds += self._draft_time(*drafting)
            end = start + seconds / self._time_scale if self._time_scale > 0 else start
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

    def _schedule(self, now: float) -> _Step | None:
        """Pick this step's batch: running sequences first (oldest first), then new ones.

        Returns the batch, its shape (summed here, so a step costs one pass over the batch)
        and, when it verifies drafts, (speculating sequences, their context); None when
        nothing can run. Under ``prefill_first`` a step is either prefills or decodes.
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
        batch: list[tuple[Sequence, int]] = []
        new = kv_read = drafts = draft_seqs = draft_context = 0
        pairs = decode_pairs = 0.0
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.state != "running" or seq.ready_at > now:
                continue
            c = seq.computed
            n = seq.prompt + seq.generated - c
            if not decodes and seq.generated:
                continue  # a prefill-only step
            if n == 1 and not spec:  # the common case: one plain decode token
                if c >= seq.cap and not self._grow(seq, 1):
                    continue
                batch.append((seq, 1))
                budget -= 1
                new += 1
                kv_read += c
                pairs += c + 1
                decode_pairs += c + 1
                continue
            d = 0
            if spec and n == 1 and seq.generated:  # decoding: verify drafts, not past max_new
                d = min(spec, seq.max_new - seq.generated - 1, budget - 1)
                n += d
            elif n > budget:
                n = budget
            if c + n > seq.cap and not self._grow(seq, n):
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
        whole = self.step_policy == "whole_prompt"
        while admit and budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if whole and seq.missing > budget and batch:
                break  # the whole prompt must fit (an empty step takes a chunk of it)
            if seq.hashes and seq.computed == 0:
                self._lookup(seq, first=seq.first_scheduled is None)
            n = min(seq.missing, budget)
            need = seq.computed + max(n, 1)
            if self._reserve_max:  # never beyond the whole cache: such a request ends early
                need = max(need, min(seq.prompt + seq.max_new, self.total_blocks * self.block_size))
            if not self._allocate(seq, need):
                self._unlookup(seq)
                break  # KV full: first come, first served
            self.waiting.popleft()
            self.running.append(seq)
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
            c = seq.computed
            batch.append((seq, n))
            budget -= n
            new += n
            kv_read += c
            pairs += n * (c + (n + 1) / 2)
        active = self.active_blocks
        if active > self.stats.kv_peak_blocks:
            self.stats.kv_peak_blocks = active
        if not batch:
            return None
        shape = StepShape(new, pairs, kv_read, len(batch), decode_pairs)
        return batch, shape, (draft_seqs, draft_context) if drafts else None

    def _draft_time(self, seqs: int, context: int) -> float:
        """The drafter's cost: k sequential passes, each a fraction of a plain decode step of
        the sequences that speculate."""
        plain = self._dep.step_time(StepShape(seqs, float(context + seqs), context, seqs))
        return self.speculative_tokens * self.draft_cost_fraction * plain

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
        recorder, prev = self._recorder, self._prev_end
        in_step = produced = 0  # sequences whose previous token came from the previous step
        for seq, n in batch:
            if seq.state != "running":
                continue  # aborted while the step ran
            computed = seq.computed + n
            gen = seq.generated
            known = seq.prompt + gen
            if computed == known and gen:  # the common case: one more decoded token
                seq.computed = computed
                gen += 1
                seq.generated = gen
                produced += 1
                last = seq.last_token_at
                seq.last_token_at = end
                if last == prev:
                    in_step += 1
                elif last is not None and recorder is not None:
                    recorder.add(end - last, 1)
                if gen >= seq.max_new:
                    self.running.remove(seq)
                    self._finish(seq, "length")
                elif seq._waiter is not None:
                    seq._notify()
                continue
            if computed < known:
                seq.computed = computed  # a prompt chunk; no token yet
                continue
            tokens = 1
            if computed > known:  # speculative: verified computed - known drafts
                accepted = self._accepted(computed - known)
                computed = known + accepted
                tokens += accepted
            seq.computed = computed
            seq.generated = gen + tokens
            produced += tokens
            if gen == 0:
                stats.prompt_tokens += seq.prompt  # once per request, however often recomputed
                if seq.first_token_at is None:
                    seq.first_token_at = end
                if seq.hashes:
                    self._adopt(seq)
            last = seq.last_token_at
            seq.last_token_at = end
            if recorder is not None and last is not None:
                if last == prev and tokens == 1:
                    in_step += 1
                else:
                    recorder.add((end - last) / tokens, tokens)
            if seq.generated >= seq.max_new:
                self.running.remove(seq)
                self._finish(seq, "length")
            elif seq.hold_after_prefill:
                self.running.remove(seq)
                seq.state = "held"
                seq._end()
            elif seq._waiter is not None:
                seq._notify()
        if in_step and recorder is not None:
            recorder.add(end - prev, in_step)
        stats.generation_tokens += produced
        self._prev_end = end

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
            seq.cached_tokens = seq.computed = hit * seq.unit
            seq.cap = seq.cached_tokens + seq.blocks * self.block_size
            if first:
                self.stats.prefix_hit_tokens += seq.cached_tokens

    def _unlookup(self, seq: Sequence) -> None:
        """Undo :meth:`_lookup` for a sequence that stays waiting."""
        if seq.cached_units and seq.blocks == 0 and self.cache is not None:
            self.cache.release(seq.hashes[: seq.cached_units])
            seq.cached_units = seq.cached_tokens = seq.computed = seq.cap = 0

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
            seq.blocks -= per_unit
        if full > seq.cached_units:
            seq.cached_units = full
            seq.cached_tokens = full * seq.unit
        seq.cap = seq.cached_tokens + seq.blocks * self.block_size

    # -- KV blocks -------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _allocate(self, seq: Sequence, tokens: int) -> bool:
        extra = self._blocks_for(tokens - seq.cached_tokens) - seq.blocks
        if extra > self.free_blocks:
            cache = self.cache
            if cache is None or extra > self.free_blocks + cache.evictable_blocks:
                return False
            self.free_blocks += cache.evict(extra - self.free_blocks)
        if extra > 0:
            self.free_blocks -= extra
            seq.blocks += extra
            seq.cap = seq.cached_tokens + seq.blocks * self.block_size
        return True

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        if seq.cached_units and self.cache is not None:
            self.cache.release(seq.hashes[: seq.cached_units])
        seq.cached_units = seq.cached_tokens = seq.cap = 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._free(seq)
        seq.state = "finished"
        seq.finish_reason = reason
        seq._end()
