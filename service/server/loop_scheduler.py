"""Step-level scheduling: one running decode loop per worker, sentences join and leave between steps.

The same interface as the request-level `Scheduler` (service/server/scheduler.py): `submit` tokenized
sentences with their options, get one future per sentence. Each worker thread owns a
`service.engine.loop.DecodeLoop` over the model's engine:

    submit() -> FIFO queue -> [worker: admit the oldest that fit -> drop the unwanted -> one step]
             -> finished sentences' futures resolved on the event loop

- Admission, between two steps: oldest first, while the loop's live rows stay within `max_live_rows`
  and the sum of its sentences' KV-cache bounds (`submit`'s `kv_bytes`) within `max_kv_bytes`; a loop
  with nothing live takes the oldest sentence whatever its size. The queue is never reordered, so a
  long sentence is never passed over for short ones (no starvation; the opt-in split below passes one
  over for at most `split_wait_s`). Options do not group anything:
  every sentence joins whichever loop is free, with its own beam, lengths and penalty.
- A lone caller waits for nothing: an idle worker admits a sentence as soon as it is queued.
- Short apart from long (opt-in, `LoopConfig.long_source_tokens`): while both kinds arrive, worker 0's loop
  takes only short sentences and a loop holding a long one takes no short one, so a caption does not share
  its steps (and their cost) with paragraphs; a sentence passed over for `split_wait_s` goes to any loop.
- Overload: a sentence that waited in the queue longer than `overload_queue_wait_s` is admitted with its
  request's `overload_beam_size` when it set one (fewer rows, so the queue drains sooner); counted.
- Streaming: a sentence submitted with an `on_prefix` callback is told, on the event loop, the tokens on
  which all its hypotheses still in the running agree and what may follow them, each time that grows
  (service.engine.loop.Prefix).
- Between two steps, sentences whose call was cancelled or whose deadline passed leave the loop (with
  `partial_at_deadline`, `partial_margin_s` before the deadline with their best hypotheses so far).
- A step that raises fails the sentences of that loop (EngineFailure); the worker starts a new loop.
- `close()` fails the queue (Unavailable); the loops end their sentences at the next step (Unavailable).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.engine.loop import DecodeLoop, Job, Prefix
from service.engine.search import ABANDON, ABANDONED, STOP_PARTIAL
from service.errors import DeadlineExceeded, EngineFailure, QueueFull, Unavailable
from service.options import DecodingOptions, TranslationResult
from service.server.scheduler import (
    CANCELLED,
    DEADLINE,
    SHUTDOWN,
    SchedulerConfig,
    SchedulerObserver,
    SentenceOutput,
    Ticket,
    _drop_reason,
    _Item,
)

log = logging.getLogger(__name__)

class LoopObserver(SchedulerObserver, Protocol):
    """The scheduler's observer plus the engine's (service.metrics.ModelMetrics implements it)."""

    def on_loop(self, admitted: int, finished: int, live_rows: int) -> None: ...
    def on_kv_cache(self, allocated: int, reserved: int, budget: int) -> None: ...
    def on_beam_reduced(self, sentences: int) -> None: ...
    def on_encoder(self, seconds: float) -> None: ...
    def on_decoder_step(self, seconds: float, rows: int) -> None: ...


Convert = Callable[[list[int], TranslationResult], Any]
"""A finished sentence's engine result -> what its future resolves with (SentenceOutput.result)."""


@dataclass(frozen=True)
class LoopConfig:
    max_live_rows: int = 256  # decoder rows (sentences x beams) of one loop
    max_kv_bytes: int = 128 * 1024 * 1024  # sum of the live sentences' KV-cache bounds in one loop
    overload_queue_wait_s: float = 0.25  # queued longer: admitted with overload_beam_size if allowed; 0 off
    # on_idle (the server's malloc_trim) runs when a loop goes idle only if its K/V cache reached this many
    # bytes since the last time: after a caption there is nothing worth handing back, and the trim would
    # cost a lone caller's next call a millisecond or two (benchmarks/README.md)
    idle_after_kv_bytes: int = 16 * 1024 * 1024
    # Short sentences apart from long ones (0: off). While both a sentence of fewer source tokens than this
    # and one of at least this many were queued in the last `split_window_s`, and there are 2+ workers,
    # worker 0's loop takes only short sentences, and a loop that holds a long one takes no short one: a
    # caption then never shares its steps with a paragraph. A sentence left for the other kind of loop for
    # `split_wait_s` is taken by any loop (nothing starves; a burst of one kind still uses every core).
    long_source_tokens: int = 0
    split_window_s: float = 1.0
    split_wait_s: float = 0.05


class LoopScheduler:
    """Step-level batching for one model: `workers` threads, each with a decode loop over `engine`. Create
    and use it on one event loop: `start()` before the first submit, `await close()` at the end."""

    def __init__(self, engine: Any, workers: int, convert: Convert, config: SchedulerConfig, loop_config: LoopConfig,
                 observer: Any = None, name: str = "model", on_idle: Callable[[], object] | None = None) -> None:
        if workers < 1:
            raise ValueError("a scheduler needs at least one worker")
        self.config, self.loop_config, self.name = config, loop_config, name
        self._engine, self._workers, self._convert = engine, workers, convert
        self._observer: LoopObserver | None = observer
        self._on_idle = on_idle
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._seq = 0
        self.live_rows = [0] * workers  # per worker, after its last step (metrics, tests)
        self._kv = [(0, 0)] * workers  # per worker: (bytes its loop's K/V hold, its sentences' KV bounds)
        self._outbox = threading.local()  # a worker's callbacks for the event loop, sent once per step
        self._last_queued = {False: -math.inf, True: -math.inf}  # by "is long": when one was last queued

    # -- the Scheduler interface ----------------------------------------------------------------------

    @property
    def queued_sentences(self) -> int:
        return len(self._queue)

    @property
    def workers(self) -> int:
        return self._workers

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, args=(i,), name=f"decode-loop-{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._report_queue()

    def submit(self, sources: Sequence[list[int]], options: DecodingOptions, deadline: float | None = None,
               kv_bytes: Sequence[int] | None = None,
               on_prefix: Sequence[Callable[[Prefix], object] | None] | None = None) -> Ticket:
        """Queue `sources` (token ids without eos); raises QueueFull (nothing queued), Unavailable after
        close() and DeadlineExceeded when `deadline` (time.monotonic()) has passed. `on_prefix[i]` (called
        on the event loop) streams sentence i's agreed prefix (service.engine.loop.DecodeLoop.submit)."""
        if self._closed or self._event_loop is None:
            raise Unavailable("the scheduler is not running")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        cap = self.config.max_queue_sentences
        costs = kv_bytes if kv_bytes is not None else [0] * len(sources)
        watch = on_prefix if on_prefix is not None else [None] * len(sources)
        ticket = Ticket([], deadline, self)  # type: ignore[arg-type]  # Ticket.cancel calls our _cancel
        with self._cond:
            if len(self._queue) + len(sources) > cap:
                raise QueueFull(f"queue full: {len(self._queue)} sentences queued, the request adds {len(sources)}, "
                                f"max_queue_sentences={cap}; retry later")
            for ids, cost, callback in zip(sources, costs, watch, strict=True):
                if self.loop_config.long_source_tokens:
                    self._last_queued[self._is_long(ids)] = now
                fut: asyncio.Future[SentenceOutput] = self._event_loop.create_future()  # type: ignore[type-arg]
                ticket.futures.append(fut)
                self._seq += 1
                self._queue.append(_Item(list(ids), options, ticket, now, fut, self._seq, int(cost), callback))
            self._cond.notify_all()  # every idle worker: each takes its share
        self._report_queue()
        return ticket

    async def close(self, timeout_s: float = 5.0) -> None:
        """Fail the queue (Unavailable), end every loop's sentences at its next step, join the workers."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for it in queued:
            if not it.future.done():
                it.future.set_exception(Unavailable("server is shutting down"))
        self._report_queue()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("decode loop %s still running %.1fs after close; leaving it", thread.name, timeout_s)

    def _cancel(self, ticket: Ticket) -> int:
        """Ticket.cancel: its queued sentences leave the queue; its live ones leave their loop at the next step
        (their futures are cancelled, which the workers see)."""
        with self._cond:
            keep = collections.deque(it for it in self._queue if it.ticket is not ticket)
            removed = len(self._queue) - len(keep)
            self._queue = keep
        for fut in ticket.futures:
            if fut.done() and not fut.cancelled():
                fut.exception()  # a failure nobody will await: retrieved
            else:
                fut.cancel()
        if removed:
            if self._observer is not None:
                self._observer.on_dropped(_drop_reason(ticket, time.monotonic()), removed)
            self._report_queue()
        return removed

    # -- a worker -------------------------------------------------------------------------------------

    def _work(self, worker: int) -> None:
        loop = DecodeLoop(self._engine, self._observer)
        live: dict[Job, tuple[_Item, float]] = {}  # job -> (its item, admission time)
        self._outbox.items = []
        kv_peak = 0  # the most bytes this loop's K/V held since on_idle last ran
        while True:
            self._flush()  # what the last step resolved and streamed: one wakeup of the event loop
            with self._cond:
                while not self._closed and not self._queue and loop.idle:
                    self._cond.wait()
                if self._closed:
                    break
                queued = len(self._queue)
                admitted, reduced = self._take(worker, loop, live)
                if len(self._queue) < queued:  # admitted, or removed as cancelled while queued
                    self._report_queue_threadsafe()
                if not admitted and loop.idle:  # all that is queued is left for the other kind of loop
                    self._cond.wait(self.loop_config.split_wait_s)
                    continue
            if reduced and self._observer is not None:
                self._observer.on_beam_reduced(reduced)
            self._admit(loop, live, admitted)
            if self._drop_unwanted(loop, live) and loop.idle:
                self._after_step(worker, loop, 0, 0)
            if loop.idle:
                continue
            try:
                finished = loop.step()
            except Exception as err:  # noqa: BLE001 - an engine failure fails this loop's sentences only
                log.exception("engine failed in a decode loop of %s (%d sentences)", self.name, len(live))
                failure = EngineFailure(f"the engine failed on this request's sentences: {type(err).__name__}: {err}")
                for it, _ in live.values():
                    self._resolve(it, error=failure)
                live.clear()
                loop = DecodeLoop(self._engine, self._observer)
                self._after_step(worker, loop, 0, 0)  # no rows left: the stalled-loop alert must not see any
                continue
            now = time.monotonic()
            for job in finished:
                it, admitted_at = live.pop(job)
                assert job.result is not None
                self._resolve(it, SentenceOutput(self._convert(it.ids, job.result), admitted_at - it.enqueued_at,
                                                 now - admitted_at, len(live) + 1, it.options.beam_size))
            self._after_step(worker, loop, len(admitted), len(finished), live)
            kv_peak = max(kv_peak, self._kv[worker][0])
            if (loop.idle and self._on_idle is not None and not self._queue
                    and kv_peak >= self.loop_config.idle_after_kv_bytes):
                self._flush()  # the answers go out first
                self._on_idle()
                kv_peak = 0
        for it, _ in live.values():
            self._resolve(it, error=Unavailable("the server stopped before this sentence was finished; retry"))
        self._flush()
        if live and self._observer is not None:
            self._observer.on_dropped(SHUTDOWN, len(live))

    def _after_step(self, worker: int, loop: DecodeLoop, admitted: int, finished: int,
                    live: dict[Job, tuple[_Item, float]] | None = None) -> None:
        self.live_rows[worker] = loop.live_rows
        self._kv[worker] = (sum(lane.state.kv_bytes for lane in loop.lanes.values()),
                            sum(it.kv_bytes for it, _ in live.values()) if live else 0)
        if self._observer is not None:
            self._observer.on_loop(admitted, finished, sum(self.live_rows))
            self._observer.on_kv_cache(sum(a for a, _ in self._kv), sum(r for _, r in self._kv),
                                       self.loop_config.max_kv_bytes * self._workers)

    def _take(self, worker: int, loop: DecodeLoop,
              live: dict[Job, tuple[_Item, float]]) -> tuple[list[_Item], int]:
        """The oldest queued sentences that fit this loop (caller holds the lock), and how many of them were
        given their request's smaller overload beam. With several workers a loop takes only its share of the
        work (live rows of every loop plus the queue's, split evenly), so that a burst spreads over the
        cores instead of filling the first loop. While short and long sentences are split (LoopConfig
        .long_source_tokens), a sentence of the kind this loop does not take is passed over until it has
        waited split_wait_s; then the share does not apply (the loops' roles differ)."""
        rows, kv = loop.live_rows, sum(it.kv_bytes for it, _ in live.values())
        cfg = self.loop_config
        now = time.monotonic()
        skip: bool | None = None  # the kind ("is long") this loop passes over, if any
        if self._split(now):
            if worker == 0:
                skip = True
            elif any(self._is_long(it.ids) for it, _ in live.values()):
                skip = False
            share = float(cfg.max_live_rows)
        else:
            others = sum(self.live_rows) - self.live_rows[worker]
            ahead = itertools.islice(self._queue, cfg.max_live_rows * self._workers)  # enough to fill every loop
            share = (others + rows + sum(it.options.beam_size for it in ahead)) / self._workers
        taken: list[_Item] = []
        reduced = 0
        overload = cfg.overload_queue_wait_s
        i = 0  # queued sentences passed over (left for a loop of their kind); taken ones leave the queue
        while i < min(len(self._queue), cfg.max_live_rows * self._workers):
            it = self._queue[i]
            if it.future.done():  # its call was cancelled while queued (Ticket.cancel had not run yet)
                del self._queue[i]
                if self._observer is not None:
                    self._observer.on_dropped(_drop_reason(it.ticket, time.monotonic()))
                continue
            if skip is not None and self._is_long(it.ids) == skip and now - it.enqueued_at < cfg.split_wait_s:
                i += 1
                continue
            options = it.options
            if overload > 0 and now - it.enqueued_at > overload:
                options = options.under_overload()
            grow = options.beam_size
            if (rows or taken) and (rows + grow > min(cfg.max_live_rows, max(share, grow))
                                    or kv + it.kv_bytes > cfg.max_kv_bytes):
                break
            del self._queue[i]
            if options is not it.options:
                it.options = options
                reduced += 1
            taken.append(it)
            rows, kv = rows + grow, kv + it.kv_bytes
        return taken, reduced

    def _is_long(self, ids: Sequence[int]) -> bool:
        return len(ids) >= self.loop_config.long_source_tokens

    def _split(self, now: float) -> bool:
        """Whether short and long sentences go to loops of their own kind now (LoopConfig.long_source_tokens)."""
        window = self.loop_config.split_window_s
        return bool(self.loop_config.long_source_tokens) and self._workers >= 2 and all(
            now - seen <= window for seen in self._last_queued.values())

    def _admit(self, loop: DecodeLoop, live: dict[Job, tuple[_Item, float]], items: list[_Item]) -> None:
        now = time.monotonic()
        by_options: dict[DecodingOptions, list[_Item]] = {}
        for it in items:
            if it.ticket.deadline is not None and now >= it.ticket.deadline and not it.options.partial_at_deadline:
                self._resolve(it, error=DeadlineExceeded("deadline passed while the sentence was queued"))
                if self._observer is not None:
                    self._observer.on_dropped(DEADLINE)
                continue
            by_options.setdefault(it.options, []).append(it)
        for options, group in by_options.items():
            watch = [self._prefix_hop(it.on_prefix) if it.on_prefix is not None else None for it in group]
            try:
                jobs = loop.submit([it.ids for it in group], options, watch if any(watch) else None)
            except ValueError as err:  # the servicer checked lengths and ids: not expected
                for it in group:
                    self._resolve(it, error=EngineFailure(str(err)))
                continue
            for job, it in zip(jobs, group, strict=True):
                live[job] = (it, now)
            if self._observer is not None:
                for it in group:
                    self._observer.on_queue_wait(now - it.enqueued_at)
                width = max(it.tokens for it in group)
                self._observer.on_batch(len(group), sum(it.tokens for it in group), len(group) * width)

    def _drop_unwanted(self, loop: DecodeLoop, live: dict[Job, tuple[_Item, float]]) -> bool:
        """Sentences nobody waits for (call cancelled, deadline passed) or due for their partial answer leave;
        True when any did."""
        now = time.monotonic()
        margin = self.config.partial_margin_s
        codes: dict[Job, int] = {}
        for job, (it, _) in live.items():
            deadline = it.ticket.deadline
            if it.future.done():
                codes[job] = ABANDON
            elif deadline is not None and it.options.partial_at_deadline and now >= deadline - margin:
                codes[job] = STOP_PARTIAL
            elif deadline is not None and now >= deadline:
                codes[job] = ABANDON
        if not codes:
            return False
        dropped = {DEADLINE: 0, CANCELLED: 0}
        for job in loop.drop(codes):
            it, admitted_at = live.pop(job)
            result = job.result
            if result is not None and result.finish_reason != ABANDONED:  # a partial answer
                self._resolve(it, SentenceOutput(self._convert(it.ids, result), admitted_at - it.enqueued_at,
                                                 now - admitted_at, len(live) + 1, it.options.beam_size))
                continue
            reason = _drop_reason(it.ticket, now)
            dropped[reason] += 1
            self._resolve(it, error=DeadlineExceeded("deadline passed while decoding"))
        if self._observer is not None:
            for reason, count in dropped.items():
                if count:
                    self._observer.on_dropped(reason, count)
        return True

    # -- the event loop's side ------------------------------------------------------------------------

    def _prefix_hop(self, callback: Callable[[Prefix], object]) -> Callable[[Prefix], None]:
        """`callback`, called from a worker, run on the event loop."""
        return lambda prefix: self._post(functools.partial(callback, prefix))

    def _post(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the event loop: from a worker, after its current step (`_flush`), in order."""
        box = getattr(self._outbox, "items", None)
        if box is None:  # not a worker thread
            self._send([fn])
        else:
            box.append(fn)

    def _flush(self) -> None:
        box = self._outbox.items
        if box:
            self._outbox.items = []
            self._send(box)

    def _send(self, fns: list[Callable[[], object]]) -> None:
        event_loop = self._event_loop
        if event_loop is not None and not event_loop.is_closed():
            event_loop.call_soon_threadsafe(_run_all, fns)

    def _resolve(self, it: _Item, value: SentenceOutput | None = None, error: Exception | None = None) -> None:
        def settle() -> None:
            if it.future.done():
                return
            if error is not None:
                it.future.set_exception(error)
            else:
                assert value is not None
                it.future.set_result(value)

        self._post(settle)

    def _report_queue(self) -> None:
        if self._observer is not None:
            self._observer.set_queue(len(self._queue), self.config.max_queue_sentences)

    def _report_queue_threadsafe(self) -> None:
        if self._observer is not None:
            self._post(self._report_queue)


def _run_all(fns: list[Callable[[], object]]) -> None:
    for fn in fns:
        fn()

