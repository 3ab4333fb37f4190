"""The server with step-level scheduling (scheduler="loop"): real server, real gRPC clients."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from service.options import DecodingOptions
from service.proto import translate_pb2 as pb
from tests.service.test_server import assert_same, request, wait_until

MIXED = [
    DecodingOptions(beam_size=4, num_hypotheses=2),
    DecodingOptions(beam_size=1),
    DecodingOptions(beam_size=3, length_penalty=0.6),
    DecodingOptions(beam_size=4, min_decoding_length=2, max_decoding_length=10),
]
# 255 steps (the tiny model's positions allow 256): eos blocked until then, no cap relative to the source;
# with 16 sentences x 4 beams a call decodes for about half a second on the tiny model
LONG = DecodingOptions(beam_size=4, min_decoding_length=254, max_decoding_length=255, max_decoding_length_ratio=0.0)
MANY = 16


def send_all_and_match_each_alone(server: Any, engine: Any, calls: list[tuple[list[str], DecodingOptions]]) -> None:
    """Send every (sentences, options) call at once from 16 threads over 8 channels; each reply must equal what
    the engine gives for that call alone."""
    stubs = [server.stub() for _ in range(8)]

    def send(i: int) -> Any:
        sentences, options = calls[i]
        return stubs[i % len(stubs)].Translate(request(sentences, options), timeout=60)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(send, range(len(calls))))
    for (sentences, options), reply in zip(calls, replies, strict=True):
        for served, exp in zip(reply.results, engine.translate_batch(sentences, options), strict=True):
            assert_same(served, exp, engine.tokenizer)


@pytest.fixture()
def loop_server(start_server: Any) -> Any:
    return start_server(scheduler="loop", workers=2)


def test_concurrent_calls_with_mixed_options_share_steps_and_match_each_alone(
        loop_server: Any, tiny_engine: Any, german: list[str]) -> None:
    calls = [(german[i:i + 1 + i % 3], MIXED[i % len(MIXED)]) for i in range(40)]
    send_all_and_match_each_alone(loop_server, tiny_engine, calls)
    steps = loop_server.metric("rosetta_decoder_step_rows_count", model="tiny")
    rows = loop_server.metric("rosetta_decoder_step_rows_sum", model="tiny")
    assert rows / steps > 4  # sentences of different calls and options shared decoder steps
    assert loop_server.metric("rosetta_loop_admitted_sentences_total", model="tiny") == \
        loop_server.metric("rosetta_loop_finished_sentences_total", model="tiny") == sum(len(s) for s, _ in calls)
    wait_until(lambda: loop_server.metric("rosetta_live_rows", model="tiny") == 0)


def test_a_cancelled_call_frees_its_rows_at_the_next_step(loop_server: Any, german: list[str]) -> None:
    scheduler = loop_server.server.translator.resolve("tiny").scheduler
    stub = loop_server.stub()
    future = stub.Translate.future(request(german[:MANY], LONG), timeout=60)
    wait_until(lambda: sum(scheduler.live_rows) > 0)  # decoding
    future.cancel()
    wait_until(lambda: sum(scheduler.live_rows) == 0, timeout_s=5)
    wait_until(lambda: loop_server.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") == MANY)
    assert loop_server.metric("rosetta_loop_finished_sentences_total", model="tiny") == 0  # none ran to its end
    assert len(stub.Translate(request(german[:1]), timeout=30).results) == 1  # the loop goes on


def test_deadline_in_a_loop_answers_deadline_exceeded_or_the_partial_result(
        loop_server: Any, german: list[str]) -> None:
    stub = loop_server.stub()
    # The tiny model can finish this work in a fraction of a second when the machine is fast, so the whole of
    # it is timed first and the deadlines below fall at a fraction of that: every sentence is still decoding.
    sentences = german[:2 * MANY]
    started = time.monotonic()
    stub.Translate(request(sentences, LONG), timeout=60)
    whole = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(request(german[:MANY], LONG), timeout=whole / 8)  # a quarter of its half of the work
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    timeout = loop_server.config.partial_margin_ms / 1000 + whole / 4
    partial = dataclasses.replace(LONG, partial_at_deadline=True)
    started = time.monotonic()
    reply = stub.Translate(request(sentences, partial), timeout=timeout)
    assert time.monotonic() - started < timeout
    assert [r.finish_reason for r in reply.results] == [pb.FINISH_REASON_DEADLINE] * len(sentences)
    # the best hypothesis so far: sentences that started decoding answer with their tokens (a sentence still
    # queued at the deadline has none)
    assert sum(len(r.hypotheses) > 0 and len(r.hypotheses[0].token_ids) > 0 for r in reply.results) >= MANY


def test_an_engine_failure_fails_only_that_loops_sentences_and_the_loop_restarts(
        start_server: Any, german: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engine import loop as loop_module

    loop_server = start_server(scheduler="loop", workers=1)  # one loop: the failing one

    real = loop_module.DecodeLoop.step
    failed, steps = [], []

    def flaky(self: Any) -> Any:  # fails the third step a beam-3 sentence is in: its rows are counted by then
        if not failed and any(j.options.beam_size == 3 for j in self.jobs):
            steps.append(True)
            if len(steps) == 3:
                failed.append(True)
                raise RuntimeError("injected engine fault")
        return real(self)

    monkeypatch.setattr(loop_module.DecodeLoop, "step", flaky)
    stub = loop_server.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(request(german[:3], DecodingOptions(beam_size=3, min_decoding_length=5)), timeout=60)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "injected engine fault" in (info.value.details() or "")
    wait_until(lambda: loop_server.metric("rosetta_live_rows", model="tiny") == 0)  # the failed loop's rows are gone
    assert len(stub.Translate(request(german[:3], DecodingOptions(beam_size=3)), timeout=60).results) == 3


def test_drain_lets_live_sentences_finish_then_stops(loop_server: Any, german: list[str]) -> None:
    stub = loop_server.stub()
    short = stub.Translate.future(request(german[:2], DecodingOptions(beam_size=2)), timeout=60)
    long = stub.Translate.future(request(german[:MANY], LONG), timeout=60)
    time.sleep(0.05)
    loop_server.call(loop_server.server.drain(0.1))
    assert len(short.result().results) == 2  # finished within the grace period
    with pytest.raises(grpc.RpcError) as info:
        long.result()
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# -- streaming the agreed prefix ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [DecodingOptions(beam_size=1), DecodingOptions(beam_size=4, num_hypotheses=2)])
def test_stream_prefix_sends_growing_whole_word_prefixes_that_the_final_result_starts_with(
        loop_server: Any, tiny_engine: Any, german: list[str], options: DecodingOptions) -> None:
    sentences = german[:12]
    req = request(sentences, options)
    req.stream_prefix = True
    prefixes: dict[int, list[str]] = {i: [] for i in range(len(sentences))}
    finals: dict[int, pb.TranslationResult] = {}
    for msg in loop_server.stub().TranslateStream(req, timeout=60):
        if msg.HasField("result"):
            assert msg.index not in finals and not msg.prefix
            finals[msg.index] = msg.result
        else:
            assert msg.index not in finals  # progress comes before the final message
            prefixes[msg.index].append(msg.prefix)
    expected = tiny_engine.translate_batch(sentences, options)
    streamed = 0
    for i, exp in enumerate(expected):
        assert_same(finals[i], exp, tiny_engine.tokenizer)  # streaming changes no result
        best = finals[i].hypotheses[0].text
        for before, after in zip([""] + prefixes[i], prefixes[i], strict=False):
            assert len(after) > len(before) and after.startswith(before)
        for prefix in prefixes[i]:
            rest = best[len(prefix):]
            assert best.startswith(prefix) and (rest == "" or rest[:1].isspace())  # whole words only
        if options.beam_size == 1 and len(best.split()) > 1:  # greedy: every word but the last one
            assert prefixes[i] and prefixes[i][-1] == best.rsplit(maxsplit=1)[0].rstrip()
        streamed += bool(prefixes[i])
    assert streamed >= 3
    assert loop_server.metric("rosetta_time_to_first_word_seconds_count", model="tiny") == streamed


def test_stream_prefix_is_refused_on_translate_and_by_the_request_level_scheduler(
        start_server: Any, german: list[str]) -> None:
    batch_server = start_server(scheduler="batch")
    req = request(german[:2])
    req.stream_prefix = True
    with pytest.raises(grpc.RpcError) as info:
        batch_server.stub().Translate(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_prefix" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        list(batch_server.stub().TranslateStream(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "step-level" in (info.value.details() or "")
    req.stream_prefix = False
    assert len(list(batch_server.stub().TranslateStream(req, timeout=30))) == 2  # the server is fine


# -- overload: a smaller beam when the request allows it ----------------------------------------------------


def test_under_overload_sentences_that_allow_it_run_with_their_smaller_beam(
        start_server: Any, tiny_engine: Any, german: list[str]) -> None:
    # one loop of 2 beam-4 sentences: the first two start at once, the rest queue for over 100 ms
    server = start_server(scheduler="loop", workers=1, max_live_rows=8, overload_queue_wait_ms=100)
    # at least 30 steps a sentence, so that 20 rounds of two outlast the 100 ms on any machine
    allowing = DecodingOptions(beam_size=4, overload_beam_size=1, min_decoding_length=30, max_decoding_length=40)
    sentences = german[:40]
    reply = server.stub().Translate(request(sentences, allowing), timeout=60)
    beams = [r.beam_size for r in reply.results]
    assert set(beams) == {1, 4}  # the first ones ran at once with beam 4, the queued rest with beam 1
    assert server.metric("rosetta_beam_reduced_sentences_total", model="tiny") == beams.count(1)
    for sentence, served in zip(sentences, reply.results, strict=True):  # each exactly its beam's result
        alone = tiny_engine.translate_batch([sentence], dataclasses.replace(
            allowing, beam_size=served.beam_size, overload_beam_size=0))[0]
        assert_same(served, alone, tiny_engine.tokenizer)
    fixed = server.stub().Translate(request(sentences, dataclasses.replace(allowing, overload_beam_size=0)), timeout=60)
    assert {r.beam_size for r in fixed.results} == {4}  # no overload_beam_size: never reduced
    assert server.metric("rosetta_beam_reduced_sentences_total", model="tiny") == beams.count(1)


@pytest.mark.parametrize("given, message", [
    (pb.DecodingOptions(beam_size=4, overload_beam_size=5), "overload_beam_size=5 is out of range [num_hypotheses=1, "
                                                            "beam_size=4]"),
    (pb.DecodingOptions(beam_size=4, num_hypotheses=3, overload_beam_size=2), "overload_beam_size=2 is out of range"),
    (pb.DecodingOptions(beam_size=4, overload_beam_size=-1), "overload_beam_size=-1 is out of range"),
])
def test_an_overload_beam_out_of_range_is_invalid_argument(loop_server: Any, german: list[str],
                                                           given: pb.DecodingOptions, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        loop_server.stub().Translate(request(german[:1], given), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


# -- KV-cache occupancy and step time by rows ----------------------------------------------------------------


def test_kv_cache_occupancy_is_reported_while_a_loop_runs_and_returns_to_zero(
        loop_server: Any, german: list[str]) -> None:
    stub = loop_server.stub()
    future = stub.Translate.future(request(german[:MANY], LONG), timeout=60)
    wait_until(lambda: loop_server.metric("rosetta_kv_cache_bytes", model="tiny", kind="allocated") > 0)
    reserved = loop_server.metric("rosetta_kv_cache_bytes", model="tiny", kind="reserved")
    budget = loop_server.metric("rosetta_kv_cache_budget_bytes", model="tiny")
    assert 0 < reserved <= budget == 2 * loop_server.server.config.max_batch_kv_bytes  # two workers
    assert len(future.result().results) == MANY
    wait_until(lambda: loop_server.metric("rosetta_kv_cache_bytes", model="tiny", kind="allocated") == 0)
    assert loop_server.metric("rosetta_kv_cache_bytes", model="tiny", kind="reserved") == 0
    steps = loop_server.metric("rosetta_decoder_step_duration_seconds_count", model="tiny")
    by_rows = sum(loop_server.metric("rosetta_decoder_step_by_rows_seconds_count", model="tiny", rows=c)
                  for c in ("<=8", "<=32", "<=128", "<=512", ">512"))
    assert steps > 200 and by_rows == steps
    # 16 sentences x 4 beams split over two loops: steps of 9 to 32 rows
    assert loop_server.metric("rosetta_decoder_step_by_rows_seconds_count", model="tiny", rows="<=32") > 0


def test_python_client_streams_prefixes_then_results(loop_server: Any, german: list[str]) -> None:
    from service.client import ClientResult, TranslatorClient

    with TranslatorClient(loop_server.address) as client:
        events = list(client.translate_stream_prefixes(german[:4], options={"beam_size": 1}))
        plain = dict(client.translate_stream(german[:4], options={"beam_size": 1}))
    results = {i: e for i, e in events if isinstance(e, ClientResult)}
    prefixes = [(i, e) for i, e in events if isinstance(e, str)]
    assert sorted(results) == [0, 1, 2, 3]  # scores may differ in the last float bits: other batch mates
    assert {i: r.hypotheses[0].token_ids for i, r in results.items()} == \
        {i: r.hypotheses[0].token_ids for i, r in plain.items()}
    assert prefixes and all(results[i].text.startswith(p) for i, p in prefixes)
    assert {r.beam_size for r in results.values()} == {1}


def test_on_idle_runs_only_after_a_loop_whose_kv_cache_grew_past_the_threshold(
        tiny_engine: Any, german: list[str]) -> None:
    """The server's malloc_trim (on_idle) is worth its time only after a loop held much K/V: a caption's loop
    going idle does not call it, a long loop's does, once."""
    import asyncio

    from service.server.loop_scheduler import LoopConfig, LoopScheduler
    from service.server.scheduler import SchedulerConfig

    idle: list[bool] = []

    async def main() -> tuple[int, int]:
        config = LoopConfig(idle_after_kv_bytes=2 * 1024 * 1024)
        sched = LoopScheduler(tiny_engine, 1, lambda ids, result: result, SchedulerConfig(), config,
                              on_idle=lambda: idle.append(True))
        sched.start()
        ticket = sched.submit([tiny_engine.tokenizer.encode(german[0])], DecodingOptions(beam_size=2))
        await asyncio.gather(*ticket.futures)
        await asyncio.sleep(0.1)
        after_caption = len(idle)
        sources = [tiny_engine.tokenizer.encode(s) for s in german[:MANY]]
        ticket = sched.submit(sources, LONG)
        await asyncio.gather(*ticket.futures)
        kv = tiny_engine.kv_bytes(max(len(s) for s in sources) + 1, LONG.beam_size, 256)
        await asyncio.sleep(0.1)
        await sched.close()
        return after_caption, kv

    after_caption, kv = asyncio.run(asyncio.wait_for(main(), 60))
    assert kv * MANY > 2 * 1024 * 1024  # the long loop's cache is past the threshold
    assert after_caption == 0 and idle == [True]


# -- short sentences apart from long ones (ServerConfig.long_source_tokens) ----------------------------------


def _split_scheduler(tiny_engine: Any, **loop: Any) -> Any:
    """A two-worker LoopScheduler bound to the running event loop, its workers not started: the test calls
    `_take` for a worker itself and sees which queued sentences that worker's loop would admit."""
    import asyncio

    from service.server.loop_scheduler import LoopConfig, LoopScheduler
    from service.server.scheduler import SchedulerConfig

    sched = LoopScheduler(tiny_engine, 2, lambda ids, result: result, SchedulerConfig(),
                          LoopConfig(long_source_tokens=6, **loop))
    sched._event_loop = asyncio.get_running_loop()
    return sched


SHORT, LONG_IDS = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12]


def test_split_keeps_short_sentences_out_of_loops_with_long_ones(tiny_engine: Any) -> None:
    """While both kinds arrive, worker 0 admits only short sentences, and a loop that holds a long sentence
    admits only long ones; the queue order within a kind is kept."""
    import asyncio

    from service.engine.loop import DecodeLoop

    async def main() -> None:
        sched = _split_scheduler(tiny_engine, split_wait_s=30.0)
        greedy = DecodingOptions(beam_size=1)
        sched.submit([SHORT, LONG_IDS, SHORT + [13], LONG_IDS + [13]], greedy)
        taken, _ = sched._take(0, DecodeLoop(tiny_engine), {})
        assert [it.ids for it in taken] == [SHORT, SHORT + [13]]  # worker 0: the short ones, in order
        sched.submit([SHORT + [14]], greedy)
        busy = DecodeLoop(tiny_engine)
        held = busy.submit([LONG_IDS], greedy)[0]
        live = {held: (sched._queue[0], 0.0)}  # worker 1 decodes a long sentence (the first long item)
        taken, _ = sched._take(1, busy, live)
        assert [it.ids for it in taken] == [LONG_IDS, LONG_IDS + [13]]  # not the short one queued after
        assert [it.ids for it in sched._queue] == [SHORT + [14]]
        for fut in sched._queue[0].ticket.futures:
            fut.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_split_passes_a_sentence_over_only_for_split_wait_s_and_only_while_both_kinds_arrive(
        tiny_engine: Any) -> None:
    import asyncio

    from service.engine.loop import DecodeLoop

    async def main() -> None:
        greedy = DecodingOptions(beam_size=1)
        sched = _split_scheduler(tiny_engine, split_wait_s=30.0)
        sched.submit([LONG_IDS], greedy)  # only long sentences so far: no split, worker 0 takes it
        assert [it.ids for it in sched._take(0, DecodeLoop(tiny_engine), {})[0]] == [LONG_IDS]
        sched.submit([SHORT, LONG_IDS], greedy)  # both kinds now
        assert [it.ids for it in sched._take(0, DecodeLoop(tiny_engine), {})[0]] == [SHORT]
        sched._queue[0].enqueued_at -= 31.0  # the long one has waited split_wait_s: any loop takes it
        assert [it.ids for it in sched._take(0, DecodeLoop(tiny_engine), {})[0]] == [LONG_IDS]
        off = _split_scheduler(tiny_engine, split_wait_s=30.0)
        off.loop_config = dataclasses.replace(off.loop_config, long_source_tokens=0)
        off.submit([LONG_IDS, SHORT], greedy)  # split off: the oldest first, worker 0 its half of the rows
        assert [it.ids for it in off._take(0, DecodeLoop(tiny_engine), {})[0]] == [LONG_IDS]
        for sched_ in (sched, off):
            for it in sched_._queue:
                it.future.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_split_server_answers_mixed_lengths_and_options_as_each_alone(
        start_server: Any, tiny_engine: Any, german: list[str]) -> None:
    """With long_source_tokens on, concurrent captions and paragraphs (five captions joined) of mixed options
    are all answered, each as it decodes alone."""
    server = start_server(scheduler="loop", workers=2, long_source_tokens=40)
    paragraphs = [" ".join(german[i:i + 5]) for i in range(0, 40, 5)]
    assert all(len(tiny_engine.tokenizer.encode(p)) >= 40 for p in paragraphs)
    calls = [([paragraphs[i % 8]] if i % 3 == 0 else german[i:i + 2], MIXED[i % len(MIXED)]) for i in range(36)]
    send_all_and_match_each_alone(server, tiny_engine, calls)
    wait_until(lambda: server.metric("rosetta_live_rows", model="tiny") == 0)


def test_sentences_whose_call_went_while_queued_leave_the_queue_depth_too(tiny_engine: Any, german: list[str]) -> None:
    """A call cancelled while its sentences wait has their futures cancelled (asyncio.gather does that) before
    Ticket.cancel runs; a busy worker that meets them first removes them, and the queue depth says so."""
    import asyncio

    from service.metrics import ServerMetrics
    from service.server.loop_scheduler import LoopConfig, LoopScheduler
    from service.server.scheduler import SchedulerConfig

    metrics = ServerMetrics()

    def depth() -> float:
        return metrics.registry.get_sample_value("rosetta_queue_depth_sentences", {"model": "tiny"}) or 0.0

    async def main() -> tuple[float, float]:
        # one loop, full with one LONG sentence (4 rows), so the other sentences stay queued
        sched = LoopScheduler(tiny_engine, 1, lambda ids, result: result, SchedulerConfig(),
                              LoopConfig(max_live_rows=4), metrics.model("tiny"), "tiny")
        sched.start()
        busy = sched.submit([tiny_engine.tokenizer.encode(german[0])], LONG)
        while sched.live_rows[0] == 0:
            await asyncio.sleep(0.01)
        gone = sched.submit([tiny_engine.tokenizer.encode(s) for s in german[1:4]], DecodingOptions(beam_size=2))
        queued = depth()
        for fut in gone.futures:  # what gather does to a cancelled call's futures, before Ticket.cancel
            fut.cancel()
        for _ in range(500):
            if sched.queued_sentences == 0 and depth() == 0:
                break
            await asyncio.sleep(0.01)
        after = depth()
        await asyncio.gather(*busy.futures)
        await sched.close()
        return queued, after

    queued, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert queued == 3
    assert after == 0
    assert metrics.registry.get_sample_value("rosetta_dropped_sentences_total",
                                             {"model": "tiny", "reason": "cancelled"}) == 3
