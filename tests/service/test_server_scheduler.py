"""The batching scheduler on its own, with trivial real runners (no model): batching rules, routing,
bounds, deadlines, cancellation and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from service.errors import DeadlineExceeded, EngineFailure, QueueFull, Unavailable
from service.options import DecodingOptions
from service.server.scheduler import Scheduler, SchedulerConfig

BEAM4 = DecodingOptions(beam_size=4)
GREEDY = DecodingOptions(beam_size=1)


class Recorder:
    """A runner that answers each source with (its ids, beam size) and records every batch it ran."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.batches: list[tuple[list[list[int]], DecodingOptions]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, sources: list[list[int]], options: DecodingOptions,
                 abandoned: object = None) -> Sequence[tuple[tuple[int, ...], int]]:
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.batches.append(([list(s) for s in sources], options))
        if self.fail_on is not None and any(self.fail_on in s for s in sources):
            raise RuntimeError("poisoned batch")
        return [(tuple(s), options.beam_size) for s in sources]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_every_sentence_result_goes_back_to_its_caller() -> None:
    rec = Recorder()

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_batch_sentences=8, max_wait_ms=2))
        sched.start()
        tickets = [sched.submit([[i, j] for j in range(i % 3 + 1)], BEAM4) for i in range(50)]
        for i, ticket in enumerate(tickets):
            outs = await asyncio.gather(*ticket.futures)
            assert [o.result for o in outs] == [((i, j), 4) for j in range(i % 3 + 1)]
        await sched.close()

    run(main())
    assert len(rec.batches) < 50  # calls were batched together
    assert all(len(srcs) <= 8 for srcs, _ in rec.batches)


def test_only_sentences_with_equal_options_share_a_batch() -> None:
    rec = Recorder()

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=20))
        sched.start()
        a = sched.submit([[1], [2]], BEAM4)
        b = sched.submit([[3]], GREEDY)
        c = sched.submit([[4]], BEAM4)
        outs = await asyncio.gather(*a.futures, *b.futures, *c.futures)
        assert [o.result[1] for o in outs] == [4, 4, 1, 4]
        await sched.close()

    run(main())
    for sources, options in rec.batches:
        expected = 1 if options == GREEDY else 4
        assert all((s[0] == 3) == (expected == 1) for s in sources)
    assert sorted(len(s) for s, _ in rec.batches) == [1, 3]


def test_batches_respect_sentence_and_token_caps_and_are_sorted_by_length() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        # 7 sentences per batch at most; 40 padded tokens (ids + eos) at most.
        sched = Scheduler([rec], SchedulerConfig(max_batch_sentences=7, max_batch_tokens=40, max_wait_ms=0))
        sched.start()
        blocker = sched.submit([[0]], BEAM4)  # occupies the only runner while the rest queue up
        await asyncio.sleep(0.05)
        lengths = [1, 9, 3, 5, 2, 8, 4, 6, 7, 1, 3, 2, 9, 5, 4]
        ticket = sched.submit([[100 + i] * n for i, n in enumerate(lengths)], BEAM4)
        gate.set()
        await asyncio.gather(*blocker.futures, *ticket.futures)
        await sched.close()

    run(main())
    for sources, _ in rec.batches[1:]:
        lens = [len(s) for s in sources]
        assert lens == sorted(lens)
        assert len(sources) <= 7
        assert len(sources) * (max(lens) + 1) <= 40
    # every batch holds the oldest queued sentence, so the first one holds the first source
    assert rec.batches[1][0].count([100]) == 1


def test_waits_up_to_max_wait_for_a_fuller_batch() -> None:
    rec = Recorder()

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=200))
        sched.start()
        a = sched.submit([[1]], BEAM4)
        await asyncio.sleep(0.05)
        b = sched.submit([[2]], BEAM4)
        t0 = time.monotonic()
        outs = await asyncio.gather(*a.futures, *b.futures)
        assert time.monotonic() - t0 < 1.0
        assert outs[0].batch_sentences == outs[1].batch_sentences == 2
        assert outs[0].queue_wait_s >= 0.15
        await sched.close()

    run(main())
    assert len(rec.batches) == 1


def test_a_full_batch_runs_without_waiting() -> None:
    async def main() -> None:
        sched = Scheduler([Recorder()], SchedulerConfig(max_batch_sentences=4, max_wait_ms=10_000))
        sched.start()
        t0 = time.monotonic()
        ticket = sched.submit([[1], [2], [3], [4]], BEAM4)
        await asyncio.gather(*ticket.futures)
        assert time.monotonic() - t0 < 2
        await sched.close()

    run(main())


def test_full_queue_raises_queue_full_at_once_and_queues_nothing() -> None:
    gate = threading.Event()

    async def main() -> None:
        sched = Scheduler([Recorder(gate)], SchedulerConfig(max_queue_sentences=5, max_wait_ms=0))
        sched.start()
        running = sched.submit([[1]], BEAM4)
        await asyncio.sleep(0.05)  # now running, not queued
        queued = sched.submit([[2], [3], [4]], BEAM4)
        with pytest.raises(QueueFull, match="max_queue_sentences=5"):
            sched.submit([[5], [6], [7]], BEAM4)
        assert sched.queued_sentences == 3
        sched.submit([[8], [9]], BEAM4)  # exactly fills the queue
        gate.set()
        await asyncio.gather(*running.futures, *queued.futures)
        await sched.close()

    run(main())


def test_cancelled_ticket_is_removed_before_compute() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0))
        sched.start()
        running = sched.submit([[1]], BEAM4)
        await asyncio.sleep(0.05)
        doomed = sched.submit([[66], [67]], BEAM4)
        kept = sched.submit([[2]], BEAM4)
        assert doomed.cancel() == 2
        assert sched.queued_sentences == 1
        assert all(f.cancelled() for f in doomed.futures)
        gate.set()
        await asyncio.gather(*running.futures, *kept.futures)
        await sched.close()

    run(main())
    ran = [s for sources, _ in rec.batches for s in sources]
    assert [66] not in ran and [67] not in ran and [2] in ran


class DropCounter:
    """A scheduler observer that counts dropped sentences by reason."""

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}

    def on_dropped(self, reason: str, sentences: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + sentences

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: None  # the other hooks: queue depth, batch sizes ...


def test_futures_cancelled_without_their_ticket_are_counted_once_when_removed() -> None:
    """A call's futures can be cancelled (its task was) before Ticket.cancel runs; whichever removes
    the sentences first counts them as dropped, and only once."""
    gate = threading.Event()
    rec = Recorder(gate)
    counter = DropCounter()

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0), observer=counter)  # type: ignore[arg-type]
        sched.start()
        running = sched.submit([[1]], BEAM4)
        await asyncio.sleep(0.05)
        doomed = sched.submit([[66], [67], [68]], BEAM4)
        for fut in doomed.futures:
            fut.cancel()
        gate.set()  # the runner frees up; the scheduler sweeps its queue before the next batch
        await asyncio.gather(*running.futures)
        await asyncio.sleep(0.05)
        assert doomed.cancel() == 0  # already swept
        assert sched.queued_sentences == 0
        await sched.close()

    run(main())
    assert counter.dropped == {"cancelled": 3}
    assert all(s not in sources for sources, _ in rec.batches for s in ([66], [67], [68]))


def test_expired_deadline_is_dropped_before_compute() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0))
        sched.start()
        running = sched.submit([[1]], BEAM4)
        await asyncio.sleep(0.05)
        late = sched.submit([[77]], BEAM4, deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.1)
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await late.futures[0]
        await asyncio.gather(*running.futures)
        with pytest.raises(DeadlineExceeded):
            sched.submit([[78]], BEAM4, deadline=time.monotonic() - 1)
        await sched.close()

    run(main())
    assert all([77] not in sources for sources, _ in rec.batches)


def test_runner_failure_fails_only_its_batch() -> None:
    rec = Recorder(fail_on=13)

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0))
        sched.start()
        bad = sched.submit([[13]], GREEDY)
        good = sched.submit([[14]], BEAM4)  # other options: another batch
        with pytest.raises(EngineFailure, match="poisoned batch"):
            await bad.futures[0]
        assert (await good.futures[0]).result == ((14,), 4)
        again = sched.submit([[15]], GREEDY)
        assert (await again.futures[0]).result == ((15,), 1)
        await sched.close()

    run(main())


def test_two_runners_run_batches_concurrently() -> None:
    both_running = threading.Barrier(2, timeout=5)

    def runner(sources: list[list[int]], options: DecodingOptions, abandoned: object = None) -> list[int]:
        both_running.wait()  # passes only if two batches are in flight at once
        return [s[0] for s in sources]

    async def main() -> None:
        sched = Scheduler([runner, runner], SchedulerConfig(max_batch_sentences=1, max_wait_ms=0))
        sched.start()
        ticket = sched.submit([[1], [2]], BEAM4)
        assert [o.result for o in await asyncio.gather(*ticket.futures)] == [1, 2]
        await sched.close()

    run(main())


class Stepper:
    """A runner that decodes like the engine: `steps` steps of `step_s` each, asking `abandoned()` between
    two steps and returning None for the sentences it reported. Records how many steps each batch ran."""

    def __init__(self, steps: int = 200, step_s: float = 0.005) -> None:
        self.steps, self.step_s = steps, step_s
        self.ran: list[int] = []
        self.started = threading.Event()

    def __call__(self, sources: list[list[int]], options: DecodingOptions, abandoned: Any) -> list[Any]:
        live = np.ones(len(sources), dtype=bool)
        self.started.set()
        step = 0
        while step < self.steps and live.any():
            time.sleep(self.step_s)
            step += 1
            gone = abandoned()
            if gone is not None:
                live &= gone == 0  # search codes: KEEP is 0
        self.ran.append(step)
        return [s[0] if keep else None for s, keep in zip(sources, live, strict=True)]


def test_cancelled_call_leaves_its_running_batch_at_the_next_step() -> None:
    stepper = Stepper()
    counter = DropCounter()

    async def main() -> None:
        sched = Scheduler([stepper], SchedulerConfig(max_wait_ms=0), observer=counter)  # type: ignore[arg-type]
        sched.start()
        ticket = sched.submit([[1], [2]], BEAM4)
        await asyncio.to_thread(stepper.started.wait, 5)
        ticket.cancel()  # what the server does when the call's task is cancelled
        await asyncio.sleep(0.2)
        assert stepper.ran and stepper.ran[0] < 50  # stopped long before its 200 steps
        after = sched.submit([[3]], BEAM4)  # the runner is free for the next caller
        assert (await after.futures[0]).result == 3
        await sched.close()

    run(main())
    assert counter.dropped == {"cancelled": 2}


def test_only_the_abandoned_sentences_leave_a_running_batch() -> None:
    stepper = Stepper(steps=40)
    counter = DropCounter()

    async def main() -> None:
        sched = Scheduler([stepper], SchedulerConfig(max_wait_ms=5), observer=counter)  # type: ignore[arg-type]
        sched.start()
        kept = sched.submit([[1]], BEAM4)
        doomed = sched.submit([[2]], BEAM4)  # same options: the same batch
        await asyncio.to_thread(stepper.started.wait, 5)
        doomed.cancel()
        assert (await kept.futures[0]).result == 1
        await sched.close()

    run(main())
    assert stepper.ran == [40]  # the kept sentence ran to its end
    assert counter.dropped == {"cancelled": 1}


def test_deadline_passing_mid_batch_stops_the_sentence_as_deadline_exceeded() -> None:
    stepper = Stepper()
    counter = DropCounter()

    async def main() -> None:
        sched = Scheduler([stepper], SchedulerConfig(max_wait_ms=0), observer=counter)  # type: ignore[arg-type]
        sched.start()
        ticket = sched.submit([[1]], BEAM4, deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceeded):
            await ticket.futures[0]
        await sched.close()

    run(main())
    assert stepper.ran[0] < 100
    assert counter.dropped == {"deadline_exceeded": 1}


def test_close_stops_running_batches_at_their_next_step() -> None:
    stepper = Stepper(steps=100_000)  # ~8 minutes if nothing stopped it
    counter = DropCounter()

    async def main() -> None:
        sched = Scheduler([stepper], SchedulerConfig(max_wait_ms=0), observer=counter)  # type: ignore[arg-type]
        sched.start()
        ticket = sched.submit([[1], [2]], BEAM4)
        await asyncio.to_thread(stepper.started.wait, 5)
        started = time.monotonic()
        await sched.close()
        assert time.monotonic() - started < 2.0
        for fut in ticket.futures:
            with pytest.raises(Unavailable):
                await fut

    run(main())
    assert counter.dropped == {"shutdown": 2}


def test_batches_are_capped_by_their_kv_bytes() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0, max_batch_kv_bytes=1000))
        sched.start()
        first = sched.submit([[0]], BEAM4, kv_bytes=[10])  # occupies the runner until the gate opens
        await asyncio.sleep(0.05)
        rest = sched.submit([[1], [2], [3], [4], [5]], BEAM4, kv_bytes=[400, 400, 400, 100, 1500])
        gate.set()
        await asyncio.gather(*first.futures, *rest.futures)
        await sched.close()

    run(main())
    sizes = {tuple(s[0] for s in srcs): None for srcs, _ in rec.batches[1:]}
    for batch in sizes:
        cost = sum({1: 400, 2: 400, 3: 400, 4: 100, 5: 1500}[i] for i in batch)
        assert cost <= 1000 or len(batch) == 1  # a lone sentence over the cap still runs alone
    assert sorted(i for b in sizes for i in b) == [1, 2, 3, 4, 5]


def test_on_idle_runs_once_the_last_batch_ends_with_nothing_queued() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    idle: list[int] = []

    async def main() -> None:
        sched = Scheduler([rec], SchedulerConfig(max_wait_ms=0, max_batch_sentences=1),
                          on_idle=lambda: idle.append(len(rec.batches)))
        sched.start()
        ticket = sched.submit([[1], [2], [3]], BEAM4)  # three batches, one after the other
        await asyncio.sleep(0.05)
        assert idle == []  # busy
        gate.set()
        await asyncio.gather(*ticket.futures)
        await asyncio.sleep(0.05)
        await sched.close()

    run(main())
    assert idle == [3]  # only after the third: while sentences were queued the scheduler was not idle
