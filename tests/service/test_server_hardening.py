"""The server against hostile and careless clients: cost bounds, callers that leave, input that is too big
or malformed, options at the edges of their types, shutdown under load, bursts. A real server on
127.0.0.1, real gRPC channels, the tiny exported model."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.proto import translate_pb2 as pb

# Holds a worker for hundreds of decoder steps: eos blocked for 250 steps, 8 sentences x 16 beams.
HEAVY = pb.DecodingOptions(beam_size=16, min_decoding_length=250, max_decoding_length=255)
HEAVY_STEPS = 250  # decoder steps the heavy batch runs when nobody stops it


def steps(srv: Any) -> float:
    return srv.metric("rosetta_decoder_step_duration_seconds_count", model="tiny")


def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def raw_translate(srv: Any) -> Any:
    """Translate taking raw bytes: what a client with its own (or a broken) serializer sends."""
    return srv.channel().unary_unary("/rosetta.v1.Translator/Translate")


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture()
def one_worker(start_server: Any) -> Any:
    return start_server(workers=1, warmup=False)


# -- 1. work of callers that are gone --------------------------------------------------------------------


def test_request_over_the_decode_budget_is_refused_before_queueing(start_server: Any, german: list[str]) -> None:
    srv = start_server(max_request_decode_tokens=2000, warmup=False)
    stub = srv.stub()
    code, details = code_of(lambda: stub.Translate(pb.TranslateRequest(sentences=german[:8], options=HEAVY),
                                                   timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_request_decode_tokens=2000" in details
    assert steps(srv) == 0  # nothing reached the engine
    # within the budget: served
    ok = stub.Translate(pb.TranslateRequest(sentences=german[:2], options=pb.DecodingOptions(beam_size=4)),
                        timeout=30)
    assert len(ok.results) == 2


def test_sentence_whose_kv_cache_exceeds_a_batch_is_refused(start_server: Any, german: list[str]) -> None:
    srv = start_server(max_batch_kv_bytes=200_000, warmup=False)
    code, details = code_of(lambda: srv.stub().Translate(
        pb.TranslateRequest(sentences=german[:1], options=HEAVY), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_kv_bytes=200000" in details and "beam_size=16" in details


def test_batches_are_split_to_fit_the_kv_budget(start_server: Any, german: list[str]) -> None:
    # one heavy sentence: 16 rows x 251 positions x K/V of 2 layers x d 32 x fp32, ~2.1 MB: 2 fit in 4.5 MB
    srv = start_server(max_batch_kv_bytes=4_500_000, workers=1, warmup=False)
    reply = srv.stub().Translate(pb.TranslateRequest(sentences=german[:6], options=HEAVY), timeout=120)
    assert len(reply.results) == 6
    assert srv.metric("rosetta_batch_size_sentences_count", model="tiny") == 3  # 2 sentences a batch
    assert srv.metric("rosetta_batch_size_sentences_sum", model="tiny") == 6


def test_call_past_its_deadline_stops_its_batch_at_the_next_step(one_worker: Any, german: list[str]) -> None:
    stub = one_worker.stub()
    code, _ = code_of(lambda: stub.Translate(pb.TranslateRequest(sentences=german[:8], options=HEAVY), timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: one_worker.metric("rosetta_dropped_sentences_total", model="tiny",
                                         reason="deadline_exceeded") == 8)
    ran = steps(one_worker)
    assert 0 < ran < HEAVY_STEPS  # it left its batch long before its 250 steps
    # the worker is free for the next caller, whose call is served completely
    reply = stub.Translate(pb.TranslateRequest(sentences=german[:2], options=pb.DecodingOptions(beam_size=1)),
                           timeout=30)
    assert len(reply.results) == 2 and reply.results[0].hypotheses[0].text
    assert one_worker.metric("rosetta_requests_total", model="tiny", code="DEADLINE_EXCEEDED") == 1
    assert one_worker.metric("rosetta_requests_total", model="tiny", code="CANCELLED") == 0


def test_cancelled_call_frees_its_rows_at_the_next_step(one_worker: Any, german: list[str]) -> None:
    stub = one_worker.stub()
    heavy = stub.Translate.future(pb.TranslateRequest(sentences=german[:8], options=HEAVY), timeout=120)
    wait_until(lambda: steps(one_worker) >= 5)  # decoding
    heavy.cancel()
    wait_until(lambda: one_worker.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") == 8)
    assert steps(one_worker) < HEAVY_STEPS
    wait_until(lambda: one_worker.metric("rosetta_requests_total", model="tiny", code="CANCELLED") == 1)
    assert one_worker.metric("rosetta_requests_in_flight", model="tiny") == 0


def test_stream_cancelled_mid_document_stops_its_work(one_worker: Any, german: list[str]) -> None:
    stub = one_worker.stub()
    stream = stub.TranslateStream(pb.TranslateRequest(sentences=german[:40], options=HEAVY), timeout=120)
    wait_until(lambda: steps(one_worker) >= 5)
    stream.cancel()
    wait_until(lambda: one_worker.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") >= 1)
    wait_until(lambda: one_worker.metric("rosetta_queue_depth_sentences", model="tiny") == 0)
    wait_until(lambda: one_worker.metric("rosetta_live_rows", model="tiny") == 0)  # a step in flight has ended
    settled = steps(one_worker)
    time.sleep(0.3)
    assert steps(one_worker) == settled  # nothing of the stream decodes any more
    assert settled < 2 * HEAVY_STEPS


# -- 2. tokenization never blocks the event loop ---------------------------------------------------------


def test_sentence_over_max_input_bytes_is_refused_before_tokenizing(server: Any) -> None:
    blob = "x" * 4_000_000  # 4 MB, no spaces: what once held the event loop for seconds
    code, details = code_of(lambda: server.stub().Translate(pb.TranslateRequest(sentences=["ok", blob]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sentence 1" in details and "max_input_bytes=4096" in details
    multibyte = "ü" * 2100  # 2100 characters, 4200 bytes
    code, details = code_of(lambda: server.stub().Translate(pb.TranslateRequest(sentences=[multibyte]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4200 bytes" in details


def test_health_answers_while_large_requests_are_tokenized(start_server: Any) -> None:
    srv = start_server(max_input_bytes=60_000, max_input_tokens=255, warmup=False)
    health = health_pb2_grpc.HealthStub(srv.channel())
    blob = ["Kein" + "x" * 59_000] * 60  # each tokenizes to far more than max_input_tokens
    stub = srv.stub()
    calls = [stub.Translate.future(pb.TranslateRequest(sentences=blob), timeout=60) for _ in range(3)]
    answered = 0
    while not all(c.done() for c in calls):
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answered += 1
    for c in calls:
        assert c.exception() is not None and c.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_input_tokens" in (c.details() or "")
    assert answered >= 1


# -- 3. shutdown has a hard bound -------------------------------------------------------------------------


def test_drain_stops_running_work_after_the_grace_period(start_server: Any, german: list[str]) -> None:
    srv = start_server(workers=1, warmup=False, max_batch_kv_bytes=1 << 30)
    stub = srv.stub()
    # 3 heavy calls: ~3 x 250 steps of 128 rows, far longer than the grace period
    heavy = [stub.Translate.future(pb.TranslateRequest(sentences=german[i * 8:(i + 1) * 8], options=HEAVY),
                                   timeout=120) for i in range(3)]
    wait_until(lambda: steps(srv) >= 5)
    started = time.monotonic()
    srv.call(srv.server.drain(0.5))
    took = time.monotonic() - started
    assert took < 0.5 + 3.0, f"drain took {took:.1f}s"
    for call in heavy:
        assert call.exception(timeout=10) is not None
        assert call.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert steps(srv) < 3 * HEAVY_STEPS


# -- 4. every finite option either works or is INVALID_ARGUMENT -------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("length_penalty", 300.0), ("length_penalty", -400.0), ("length_penalty", 3.0e38), ("length_penalty", -3.0e38),
    ("length_penalty", 10.5), ("max_decoding_length_ratio", 3.0e38), ("max_decoding_length_ratio", -1.0),
    ("beam_size", -(2**31)), ("beam_size", 2**31 - 1), ("num_hypotheses", 0), ("max_decoding_length", 0),
    ("max_decoding_length", 2**31 - 1), ("min_decoding_length", -1), ("max_decoding_length_offset_tokens", -5),
])
def test_out_of_range_option_is_invalid_argument(server: Any, field: str, value: float) -> None:
    options = pb.DecodingOptions(**{field: value})
    code, details = code_of(lambda: server.stub().Translate(pb.TranslateRequest(sentences=["Ein Hund."],
                                                                                options=options), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split("_tokens")[0] in details


@pytest.mark.parametrize("options", [
    pb.DecodingOptions(length_penalty=10.0), pb.DecodingOptions(length_penalty=-10.0),
    pb.DecodingOptions(beam_size=2, length_penalty=-10.0, num_hypotheses=2),
    pb.DecodingOptions(max_decoding_length_ratio=1000.0), pb.DecodingOptions(min_decoding_length=2**31 - 1),
    pb.DecodingOptions(max_decoding_length_offset_tokens=2**31 - 1),
    pb.DecodingOptions(max_decoding_length=1, max_decoding_length_ratio=0.0),
], ids=["lp10", "lp-10", "beam2-lp-10", "ratio1000", "min-int-max", "offset-int-max", "len1"])
def test_option_at_the_edge_of_its_range_works(server: Any, options: pb.DecodingOptions) -> None:
    reply = server.stub().Translate(pb.TranslateRequest(sentences=["Ein Hund läuft."], options=options), timeout=30)
    assert len(reply.results) == 1 and reply.results[0].hypotheses
    assert all(math.isfinite(h.score) for h in reply.results[0].hypotheses)


# -- 6. a burst on a fresh server: nothing cancelled behind the metrics' back -----------------------------


@pytest.mark.slow
def test_burst_on_a_fresh_server_gets_only_documented_statuses_all_counted(start_server: Any) -> None:
    """gRPC core cancels calls beyond its backlog of not-yet-accepted calls (soft 1000, hard 3000 by
    default); max_pending_calls lifts it, so the scheduler answers overload, counted."""
    srv = start_server(warmup=False, max_queue_sentences=2048)
    stub = srv.stub()
    burst = [stub.Translate.future(pb.TranslateRequest(sentences=["Ein Hund läuft."],
                                                       options=pb.DecodingOptions(beam_size=1)), timeout=120)
             for _ in range(1500)]
    codes: dict[str, int] = {}
    for call in burst:
        code = call.code().name
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    counted = {code: srv.metric("rosetta_requests_total", model="tiny", code=code) for code in codes}
    assert counted == codes


# -- 7. malformed and over-size bodies --------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\x03\xff\xfe\xfd", b"\x0a\x80", b"\x12\x05\x08"],
                         ids=["garbage", "bad-utf8", "truncated-length", "truncated-options"])
def test_malformed_body_is_invalid_argument_counted_without_a_traceback(
        server: Any, body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    before = server.metric("rosetta_requests_total", model="unknown", code="INVALID_ARGUMENT")
    with caplog.at_level(logging.INFO):
        code, details = code_of(lambda: raw_translate(server)(body, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid rosetta.v1.TranslateRequest" in details
    assert server.metric("rosetta_requests_total", model="unknown", code="INVALID_ARGUMENT") == before + 1
    assert not [r for r in caplog.records if r.exc_info]


def test_over_size_body_is_resource_exhausted_and_counted(start_server: Any) -> None:
    srv = start_server(max_message_bytes=2000, warmup=False)
    body = pb.TranslateRequest(sentences=["x" * 1000, "y" * 1000]).SerializeToString()
    code, details = code_of(lambda: raw_translate(srv)(body, timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes=2000" in details
    assert srv.metric("rosetta_requests_total", model="unknown", code="RESOURCE_EXHAUSTED") == 1
    ok = srv.stub().Translate(pb.TranslateRequest(sentences=["Ein Hund."]), timeout=30)
    assert len(ok.results) == 1


# -- 8. status messages are bounded -----------------------------------------------------------------------


def test_long_model_names_get_bounded_messages(server: Any) -> None:
    stub = server.stub()
    code, details = code_of(lambda: stub.Translate(pb.TranslateRequest(sentences=["a"], model="m" * 1_000_000),
                                                   timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
    code, details = code_of(lambda: stub.Translate(pb.TranslateRequest(sentences=["a"], model="n" * 200), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "200 characters" in details and len(details) < 300
    code, details = code_of(lambda: stub.GetModel(pb.GetModelRequest(model="g" * 100_000), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300


# -- the server keeps serving through all of it -----------------------------------------------------------


def test_abuse_in_parallel_leaves_good_calls_served(start_server: Any, german: list[str]) -> None:
    srv = start_server(workers=2, warmup=False)
    stub = srv.stub()
    stop = threading.Event()
    bad_codes: set[str] = set()

    def abuse() -> None:
        while not stop.is_set():
            for call in (lambda: raw_translate(srv)(b"\xff\xff", timeout=5),
                         lambda: stub.Translate(pb.TranslateRequest(sentences=german[:8], options=HEAVY),
                                                timeout=0.2),
                         lambda: stub.Translate(pb.TranslateRequest(sentences=["x" * 5000]), timeout=5)):
                bad_codes.add(code_of(call)[0].name)

    threads = [threading.Thread(target=abuse) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            reply = stub.Translate(pb.TranslateRequest(sentences=german[i:i + 2],
                                                       options=pb.DecodingOptions(beam_size=2)), timeout=30)
            assert len(reply.results) == 2
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert bad_codes <= {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED"}
    assert "UNKNOWN" not in bad_codes and "INTERNAL" not in bad_codes


# -- a deadline can return the best hypotheses so far ----------------------------------------------------


def test_partial_at_deadline_answers_ok_with_the_best_so_far(one_worker: Any, german: list[str]) -> None:
    options = pb.DecodingOptions(beam_size=16, num_hypotheses=2, min_decoding_length=250, max_decoding_length=255,
                                 partial_at_deadline=True)  # HEAVY, answered with what it has 0.1 s before 0.4 s
    reply = one_worker.stub().Translate(pb.TranslateRequest(sentences=german[:8], options=options), timeout=0.4)
    assert len(reply.results) == 8
    for result in reply.results:
        assert result.finish_reason == pb.FINISH_REASON_DEADLINE
        assert len(result.hypotheses) == 2
        assert all(0 < len(h.token_ids) < 250 and math.isfinite(h.score) for h in result.hypotheses)
    assert steps(one_worker) < 250
    assert one_worker.metric("rosetta_requests_total", model="tiny", code="OK") == 1
    assert one_worker.metric("rosetta_requests_total", model="tiny", code="DEADLINE_EXCEEDED") == 0


def test_without_partial_at_deadline_the_same_call_fails_deadline_exceeded(one_worker: Any,
                                                                           german: list[str]) -> None:
    code, _ = code_of(lambda: one_worker.stub().Translate(pb.TranslateRequest(sentences=german[:8], options=HEAVY),
                                                          timeout=0.4))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
