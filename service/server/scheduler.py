"""The batching scheduler: sentences from many calls -> engine batches -> results back to each caller.

One `Scheduler` per loaded model owns that model's engine runners. Calls `submit` tokenized sentences with
their `DecodingOptions` and get one future per sentence. A dispatcher task on the event loop forms batches
and hands each to a free runner on an executor thread, so the event loop never blocks on compute:

    submit() -> queue (per DecodingOptions) -> _next_batch() -> runner(sources, options) in a thread
             -> futures resolved on the event loop -> the caller awaiting them

Batching rules
- Only sentences with equal DecodingOptions share a batch (the engine takes one options value per batch).
- A batch is capped by `max_batch_sentences` and by `max_batch_tokens` padded source tokens (sentences x
  longest, eos included); it is formed when it is full or when its oldest sentence has waited `max_wait_ms`.
- Every batch contains the oldest queued sentence of its options group (no starvation); the rest are the
  queued sentences closest to it in length, and the batch is sorted by length, which keeps padding low.
- A batch is also capped by `max_batch_kv_bytes`, the sum of its sentences' KV-cache bounds (`submit`'s
  `kv_bytes`), so the memory of a running batch is bounded whatever its requests ask for.
- The queue is bounded by `max_queue_sentences`: a submit that does not fit raises QueueFull at once.
- Sentences whose deadline passed are dropped before compute (DeadlineExceeded); a cancelled ticket's
  queued sentences are removed at once. A running batch asks, between two decoder steps, which of its
  sentences nobody waits for any more (call cancelled, deadline passed, scheduler closing): those leave
  the batch at once, so the runners serve the callers still waiting.
- A runner that raises fails only the sentences of that batch (EngineFailure); the scheduler keeps going.
- `close()` fails the queue (Unavailable) and makes running batches stop at their next step.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

from service.engine.search import ABANDON, KEEP, STOP_PARTIAL, Abandoned
from service.errors import DeadlineExceeded, EngineFailure, QueueFull, Unavailable
from service.options import DecodingOptions

if TYPE_CHECKING:  # the decode loop's module loads onnxruntime; the batch scheduler does not need it
    from service.engine.loop import Prefix

log = logging.getLogger(__name__)

R = TypeVar("R")
BatchRunner = Callable[[list[list[int]], DecodingOptions, Abandoned], Sequence["R | None"]]
"""Runs one batch: (sources (token ids without eos, sorted by length), options, abandoned) -> one result
per source, in order; None for a source it abandoned because `abandoned()` (service.engine.search.Abandoned)
said so. Called on an executor thread; each runner runs one batch at a time."""

DEADLINE_SLACK_S = 0.05
"""A call that ends within this long of its deadline ended by its deadline: gRPC's own timer and ours
read different clocks, and a cancellation that close is the deadline firing, not the client."""


class SchedulerObserver(Protocol):
    """Where the scheduler reports (service.metrics.ModelMetrics implements it)."""

    def on_batch(self, sentences: int, real_tokens: int, padded_tokens: int) -> None: ...
    def on_queue_wait(self, seconds: float) -> None: ...
    def on_dropped(self, reason: str, sentences: int = 1) -> None: ...
    def set_queue(self, depth: int, capacity: int) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_sentences: int = 64  # sentences per engine batch
    max_batch_tokens: int = 4096  # padded source tokens per batch, eos included
    max_wait_ms: float = 5.0  # longest wait of the oldest sentence for a fuller batch
    max_queue_sentences: int = 2048  # queued (not yet running) sentences; beyond it QueueFull
    max_batch_kv_bytes: int = 1 << 62  # sum of the sentences' kv_bytes per batch (submit); a lone one may exceed it
    partial_margin_s: float = 0.1  # partial_at_deadline: stop this long before the deadline, so the answer is in time

    def __post_init__(self) -> None:
        if min(self.max_batch_sentences, self.max_batch_tokens, self.max_queue_sentences, self.max_batch_kv_bytes) < 1:
            raise ValueError("max_batch_sentences, max_batch_tokens, max_queue_sentences and max_batch_kv_bytes "
                             "must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True)
class SentenceOutput(Generic[R]):
    """What one sentence's future resolves to."""

    result: R
    queue_wait_s: float  # from submit to the start of its batch
    compute_s: float  # run time of its batch
    batch_sentences: int  # size of its batch
    beam_size: int = 0  # the beam it was decoded with


@dataclass(eq=False)
class _Item:
    ids: list[int]
    options: DecodingOptions
    ticket: Ticket
    enqueued_at: float
    future: asyncio.Future[SentenceOutput]  # type: ignore[type-arg]
    seq: int
    kv_bytes: int = 0  # the KV-cache bound of this sentence (counted against max_batch_kv_bytes)
    on_prefix: Callable[[Prefix], object] | None = None  # step-level scheduler: streamed prefixes

    @property
    def tokens(self) -> int:
        return len(self.ids) + 1  # the engine appends eos


@dataclass(eq=False)
class Ticket:
    """One submit: `futures[i]` resolves to the SentenceOutput of `sources[i]` (or raises a ServiceError)."""

    futures: list[asyncio.Future[SentenceOutput]]  # type: ignore[type-arg]
    deadline: float | None  # time.monotonic() value; None: no deadline
    _scheduler: Scheduler | None = field(default=None, repr=False)

    def cancel(self) -> int:
        """Remove this ticket's still-queued sentences and cancel their futures; returns how many were
        removed. Safe to call any number of times, also after every future is done."""
        return self._scheduler._cancel(self) if self._scheduler is not None else 0


class Scheduler:
    """Batches the sentences of many calls for one model. Create and use it on one event loop:
    `start()` before the first submit, `await close()` at the end."""

    def __init__(self, runners: Sequence[BatchRunner], config: SchedulerConfig = SchedulerConfig(),
                 observer: SchedulerObserver | None = None, name: str = "model",
                 on_idle: Callable[[], object] | None = None) -> None:
        """`on_idle` runs on an executor thread whenever the last running batch ends with nothing queued
        (the server hands memory back to the OS there)."""
        if not runners:
            raise ValueError("a scheduler needs at least one runner")
        self.config = config
        self.name = name
        self._runners = list(runners)
        self._free: list[BatchRunner] = list(runners)
        self._observer = observer
        self._groups: dict[DecodingOptions, list[_Item]] = {}
        self._queued = 0
        self._seq = itertools.count()
        self._running: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix=f"engine-{name}")
        self._watches: set[_BatchWatch] = set()  # one per running batch
        self._on_idle = on_idle
        self._closed = False

    # -- public -------------------------------------------------------------------------------------------

    @property
    def queued_sentences(self) -> int:
        return self._queued

    @property
    def workers(self) -> int:
        return len(self._runners)

    def start(self) -> None:
        """Start the dispatcher task on the running event loop."""
        self._changed = asyncio.Event()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"scheduler-{self.name}")
        self._report_queue()

    def submit(self, sources: Sequence[list[int]], options: DecodingOptions, deadline: float | None = None,
               kv_bytes: Sequence[int] | None = None) -> Ticket:
        """Queue `sources` (token ids without eos) for decoding with `options`; `kv_bytes[i]` bounds the
        KV cache of sources[i] (batches are capped by their sum; default 0).

        Raises QueueFull (nothing queued) when they do not fit, Unavailable after close(), and
        DeadlineExceeded when `deadline` (time.monotonic()) has already passed."""
        if self._closed or self._changed is None:
            raise Unavailable("the scheduler is not running")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        cap = self.config.max_queue_sentences
        if self._queued + len(sources) > cap:
            raise QueueFull(f"queue full: {self._queued} sentences queued, the request adds {len(sources)}, "
                            f"max_queue_sentences={cap}; retry later")
        loop = asyncio.get_running_loop()
        ticket = Ticket([], deadline, self)
        group = self._groups.setdefault(options, [])
        costs = kv_bytes if kv_bytes is not None else [0] * len(sources)
        for ids, cost in zip(sources, costs, strict=True):
            fut: asyncio.Future[SentenceOutput] = loop.create_future()  # type: ignore[type-arg]
            ticket.futures.append(fut)
            group.append(_Item(list(ids), options, ticket, now, fut, next(self._seq), int(cost)))
        self._queued += len(sources)
        self._report_queue()
        self._changed.set()
        return ticket

    async def close(self, timeout_s: float = 5.0) -> None:
        """Fail every queued sentence (Unavailable), stop running batches at their next decoder step and
        wait for them (at most `timeout_s`: a runner that ignores `abandoned` is left behind), stop the
        executor."""
        self._closed = True
        for watch in self._watches:
            watch.abort()
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
        self._groups.clear()
        self._queued = 0
        self._report_queue()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=timeout_s)
            if late:
                log.error("%d batch(es) of %s still running %.1fs after close; leaving them", len(late),
                          self.name, timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------------------------

    def _report_queue(self) -> None:
        if self._observer is not None:
            self._observer.set_queue(self._queued, self.config.max_queue_sentences)

    def _cancel(self, ticket: Ticket) -> int:
        removed = 0
        for options, group in list(self._groups.items()):
            keep = [it for it in group if it.ticket is not ticket]
            removed += len(group) - len(keep)
            if keep:
                self._groups[options] = keep
            else:
                del self._groups[options]
        for fut in ticket.futures:
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark a failure nobody will await as retrieved
            else:
                fut.cancel()
        if removed:
            self._queued -= removed
            if self._observer is not None:
                self._observer.on_dropped(_drop_reason(ticket, time.monotonic()), removed)
            self._report_queue()
            if self._changed is not None:
                self._changed.set()
        return removed

    def _drop_expired(self, now: float) -> None:
        """Fail queued sentences whose deadline passed, and remove those whose future is already done
        (its call was cancelled before `Ticket.cancel` ran); both count as dropped, once."""
        dropped = {DEADLINE: 0, CANCELLED: 0}
        for options, group in list(self._groups.items()):
            keep: list[_Item] = []
            for it in group:
                if it.future.done():
                    dropped[_drop_reason(it.ticket, now)] += 1
                    continue
                if it.ticket.deadline is not None and now >= it.ticket.deadline:
                    it.future.set_exception(DeadlineExceeded("deadline passed while the sentence was queued"))
                    dropped[DEADLINE] += 1
                    continue
                keep.append(it)
            self._queued -= len(group) - len(keep)
            if keep:
                self._groups[options] = keep
            else:
                del self._groups[options]
        if self._observer is not None:
            for reason, count in dropped.items():
                if count:
                    self._observer.on_dropped(reason, count)
        self._report_queue()

    def _is_full(self, group: list[_Item]) -> bool:
        if len(group) >= self.config.max_batch_sentences:
            return True
        if sum(it.kv_bytes for it in group) >= self.config.max_batch_kv_bytes:
            return True
        longest = max(it.tokens for it in group)
        return len(group) * longest >= self.config.max_batch_tokens

    def _next_due(self, now: float) -> tuple[DecodingOptions | None, float]:
        """The options group to run now (ready group with the oldest sentence), else None and the time
        at which the earliest group becomes ready by age."""
        wait_s = self.config.max_wait_ms / 1000.0
        best: DecodingOptions | None = None
        best_seq = -1
        due_at = float("inf")
        for options, group in self._groups.items():
            oldest = group[0]
            ready_at = oldest.enqueued_at + wait_s
            if ready_at <= now or self._is_full(group):
                if best is None or oldest.seq < best_seq:
                    best, best_seq = options, oldest.seq
            else:
                due_at = min(due_at, ready_at)
        return best, due_at

    def _take_batch(self, options: DecodingOptions) -> list[_Item]:
        """Remove and return the next batch of `options`: its oldest sentence plus the queued sentences
        closest to it in length, within both caps, sorted by length."""
        group = self._groups[options]
        oldest = group[0]
        by_len = sorted(group, key=lambda it: (len(it.ids), it.seq))
        pos = by_len.index(oldest)
        lo, hi = pos, pos + 1  # the window by_len[lo:hi]
        longest = oldest.tokens
        kv = oldest.kv_bytes
        cfg = self.config
        while hi - lo < cfg.max_batch_sentences:
            candidates = []  # (distance in length from the oldest, side, item); the left side first on ties
            if lo > 0:
                candidates.append((len(oldest.ids) - len(by_len[lo - 1].ids), 0, by_len[lo - 1]))
            if hi < len(by_len):
                candidates.append((len(by_len[hi].ids) - len(oldest.ids), 1, by_len[hi]))
            for _, side, cand in sorted(candidates, key=lambda c: (c[0], c[1])):
                if ((hi - lo + 1) * max(longest, cand.tokens) <= cfg.max_batch_tokens
                        and kv + cand.kv_bytes <= cfg.max_batch_kv_bytes):
                    longest = max(longest, cand.tokens)
                    kv += cand.kv_bytes
                    lo, hi = (lo - 1, hi) if side == 0 else (lo, hi + 1)
                    break
            else:
                break  # nothing left, or nothing that fits the token cap
        batch = by_len[lo:hi]
        chosen = set(map(id, batch))
        rest = [it for it in group if id(it) not in chosen]
        if rest:
            self._groups[options] = rest
        else:
            del self._groups[options]
        self._queued -= len(batch)
        self._report_queue()
        return batch

    async def _dispatch_loop(self) -> None:
        assert self._changed is not None
        while True:
            self._changed.clear()
            if not self._groups or not self._free:
                await self._changed.wait()
                continue
            now = time.monotonic()
            self._drop_expired(now)
            options, due_at = self._next_due(now)
            if options is None:
                if due_at != float("inf"):
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=max(due_at - now, 0.0))
                    except asyncio.TimeoutError:
                        pass
                continue
            batch = self._take_batch(options)
            runner = self._free.pop()
            task = asyncio.get_running_loop().create_task(self._run(runner, options, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, runner: BatchRunner, options: DecodingOptions, batch: list[_Item]) -> None:
        try:
            start = time.monotonic()
            sources = [it.ids for it in batch]
            if self._observer is not None:
                for it in batch:
                    self._observer.on_queue_wait(start - it.enqueued_at)
                self._observer.on_batch(len(batch), sum(it.tokens for it in batch), len(batch) * batch[-1].tokens)
            loop = asyncio.get_running_loop()
            watch = _BatchWatch(batch, self.config.partial_margin_s if options.partial_at_deadline else None)
            self._watches.add(watch)
            try:
                results = await loop.run_in_executor(self._executor, runner, sources, options, watch.gone)
                if len(results) != len(batch):
                    raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} sources")
            except Exception as err:
                log.exception("engine failed on a batch of %d sentences (%s)", len(batch), self.name)
                failure = EngineFailure(f"the engine failed on this request's batch: {type(err).__name__}: {err}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(failure)
                return
            finally:
                self._watches.discard(watch)
            compute_s = time.monotonic() - start
            now = time.monotonic()
            dropped = {DEADLINE: 0, CANCELLED: 0, SHUTDOWN: 0}
            for it, result in zip(batch, results, strict=True):
                if result is None:  # the runner stopped it: the call is gone, or the server is stopping
                    reason = SHUTDOWN if watch.aborted else _drop_reason(it.ticket, now)
                    dropped[reason] += 1
                    if not it.future.done():
                        it.future.set_exception(
                            Unavailable("the server stopped before this sentence was finished; retry")
                            if reason == SHUTDOWN else DeadlineExceeded("deadline passed while decoding"))
                elif not it.future.done():
                    it.future.set_result(SentenceOutput(result, start - it.enqueued_at, compute_s, len(batch),
                                                        it.options.beam_size))
            if self._observer is not None:
                for reason, count in dropped.items():
                    if count:
                        self._observer.on_dropped(reason, count)
        finally:
            self._free.append(runner)
            if self._on_idle is not None and len(self._free) == len(self._runners) and not self._queued:
                asyncio.get_running_loop().run_in_executor(self._executor, self._on_idle)
            if self._changed is not None:
                self._changed.set()


DEADLINE, CANCELLED, SHUTDOWN = "deadline_exceeded", "cancelled", "shutdown"  # drop reasons (metrics label)


def _drop_reason(ticket: Ticket, now: float) -> str:
    """Why a sentence of `ticket` leaves unfinished: DEADLINE once its deadline passed (give or take
    DEADLINE_SLACK_S), else CANCELLED."""
    expired = ticket.deadline is not None and now >= ticket.deadline - DEADLINE_SLACK_S
    return DEADLINE if expired else CANCELLED


class _BatchWatch:
    """Which sentences of a running batch nobody waits for any more; read from the decoding thread.

    The event loop flags a sentence when its future is done before the batch finished (the call was
    cancelled, or its deadline made gRPC cancel it); the decoding thread also compares the deadlines
    with the clock itself, and `abort()` (scheduler closing) stops them all."""

    def __init__(self, batch: list[_Item], partial_margin_s: float | None = None) -> None:
        self.flags = np.zeros(len(batch), dtype=bool)
        self.deadlines = np.array([it.ticket.deadline if it.ticket.deadline is not None else np.inf
                                   for it in batch], dtype=np.float64)
        # partial_at_deadline (the whole batch shares its options): stop `margin` early with the best so far
        self.margin = partial_margin_s
        self.first_deadline = float(self.deadlines.min()) - (partial_margin_s or 0.0)
        self.changed = False  # a flag was set since the batch started
        self.aborted = False
        for i, it in enumerate(batch):
            it.future.add_done_callback(functools.partial(self._flag, i))

    def _flag(self, i: int, _future: object) -> None:
        self.flags[i] = True
        self.changed = True

    def abort(self) -> None:
        self.aborted = True

    def gone(self) -> np.ndarray | None:
        """(B,) search codes (service.engine.search): ABANDON for the sentences nobody waits for, STOP_PARTIAL
        once a partial-at-deadline batch is within its margin; None when every one is still wanted (the
        common case, answered without allocating)."""
        if self.aborted:
            return np.full(self.flags.size, ABANDON, dtype=np.int8)
        now = time.monotonic()
        if not self.changed and now < self.first_deadline:
            return None
        if self.margin is None:
            codes = np.where(self.deadlines <= now, ABANDON, KEEP).astype(np.int8)
        else:
            codes = np.where(self.deadlines - self.margin <= now, STOP_PARTIAL, KEEP).astype(np.int8)
        codes[self.flags] = ABANDON  # a call already gone (cancelled, or gRPC's deadline fired first)
        return codes
