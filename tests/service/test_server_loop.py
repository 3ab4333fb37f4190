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


@pytest.fixture()
def loop_server(start_server: Any) -> Any:
    return start_server(scheduler="loop", workers=2)


def test_concurrent_calls_with_mixed_options_share_steps_and_match_each_alone(
        loop_server: Any, tiny_engine: Any, german: list[str]) -> None:
    calls = [(german[i:i + 1 + i % 3], MIXED[i % len(MIXED)]) for i in range(40)]
    stubs = [loop_server.stub() for _ in range(8)]

    def send(i: int) -> Any:
        sentences, options = calls[i]
        return stubs[i % len(stubs)].Translate(request(sentences, options), timeout=60)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(send, range(len(calls))))
    for (sentences, options), reply in zip(calls, replies, strict=True):
        expected = tiny_engine.translate_batch(sentences, options)
        for served, exp in zip(reply.results, expected, strict=True):
            assert_same(served, exp, tiny_engine.tokenizer)
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
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(request(german[:MANY], LONG), timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    partial = dataclasses.replace(LONG, partial_at_deadline=True)
    started = time.monotonic()
    reply = stub.Translate(request(german[:2 * MANY], partial), timeout=0.4)  # far more than 0.4 s of work
    assert time.monotonic() - started < 0.4
    assert all(r.finish_reason == pb.FINISH_REASON_DEADLINE for r in reply.results)
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
