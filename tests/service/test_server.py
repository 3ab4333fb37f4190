"""A real server on 127.0.0.1 serving the tiny exported model, called through real gRPC channels."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from service.client import ClientResult, TranslatorClient
from service.options import DecodingOptions
from service.proto import translate_pb2 as pb

BEAM4 = DecodingOptions(beam_size=4, num_hypotheses=2)
GREEDY = DecodingOptions(beam_size=1)
# Keeps the only worker busy for a while: eos blocked for 240 steps, 32 sentences x 8 beams.
# ~0.45 s on the tiny model here (beam 8 took 0.22 s once the engine got faster: too close to the
# 0.3 s deadlines below); the tests that need more queue a second slow call behind the first.
SLOW = pb.DecodingOptions(beam_size=16, min_decoding_length=240, max_decoding_length=250)


def request(sentences: list[str], options: DecodingOptions | pb.DecodingOptions | None = None,
            model: str = "") -> pb.TranslateRequest:
    from service.wire import options_to_pb

    opts = options if isinstance(options, pb.DecodingOptions) else options_to_pb(options)
    return pb.TranslateRequest(sentences=sentences, model=model, options=opts)


def assert_same(served: pb.TranslationResult, expected: Any, tokenizer: Any) -> None:
    """A served result equals the engine's TranslationResult: tokens, text, scores (float32), reason."""
    got = ClientResult.from_pb(served)
    assert got.finish_reason == expected.finish_reason
    assert len(got.hypotheses) == len(expected.hypotheses)
    for g, e in zip(got.hypotheses, expected.hypotheses, strict=True):
        assert g.token_ids == list(e.tokens)
        assert g.text == tokenizer.decode(e.tokens)
        assert g.score == pytest.approx(e.score, rel=1e-6, abs=1e-6)
        assert g.log_prob == pytest.approx(e.log_prob, rel=1e-6, abs=1e-6)


def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# -- round trip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [GREEDY, BEAM4, DecodingOptions(beam_size=3, length_penalty=0.6,
                                                                     max_decoding_length_ratio=1.3)],
                         ids=["greedy", "beam4-nbest2", "beam3-alpha0.6-ratio1.3"])
def test_served_translation_equals_the_engines(server: Any, tiny_engine: Any, german: list[str],
                                               options: DecodingOptions) -> None:
    sentences = german[:24]
    reply = server.stub().Translate(request(sentences, options), timeout=60)
    expected = tiny_engine.translate_batch(sentences, options)
    assert len(reply.results) == len(sentences)
    for sentence, served, exp in zip(sentences, reply.results, expected, strict=True):
        assert_same(served, exp, tiny_engine.tokenizer)
        assert served.source_tokens == len(tiny_engine.tokenizer.encode(sentence))
    assert reply.model == "tiny" and reply.model_version == "1"
    assert reply.timing.total_ms > 0 and reply.timing.compute_ms > 0
    assert reply.timing.total_ms >= reply.timing.compute_ms


def test_unset_options_take_the_server_defaults(server: Any, tiny_engine: Any, german: list[str]) -> None:
    reply = server.stub().Translate(pb.TranslateRequest(sentences=german[:3]), timeout=60)
    for served, exp in zip(reply.results, tiny_engine.translate_batch(german[:3], DecodingOptions()), strict=True):
        assert_same(served, exp, tiny_engine.tokenizer)


def test_return_scores_false_leaves_scores_unset(server: Any, german: list[str]) -> None:
    reply = server.stub().Translate(request(german[:2], DecodingOptions(beam_size=2, return_scores=False)))
    for r in reply.results:
        assert not r.hypotheses[0].HasField("score") and not r.hypotheses[0].HasField("log_prob")
        assert r.hypotheses[0].text


def test_empty_and_whitespace_sentences_get_an_empty_result(server: Any, tiny_engine: Any,
                                                            german: list[str]) -> None:
    reply = server.stub().Translate(request(["", german[0], " \t ", german[1]], BEAM4), timeout=60)
    for i in (0, 2):
        r = reply.results[i]
        assert r.finish_reason == pb.FINISH_REASON_EMPTY_INPUT
        assert r.source_tokens == 0
        assert [(h.text, list(h.token_ids), h.score) for h in r.hypotheses] == [("", [], 0.0)]
    expected = tiny_engine.translate_batch([german[0], german[1]], BEAM4)
    assert_same(reply.results[1], expected[0], tiny_engine.tokenizer)
    assert_same(reply.results[3], expected[1], tiny_engine.tokenizer)


def test_python_client_helper_round_trip(server: Any, tiny_engine: Any, german: list[str]) -> None:
    with TranslatorClient(server.address) as client:
        assert client.health_status() == "SERVING"
        results = client.translate(german[:5], options={"beam_size": 4, "num_hypotheses": 2})
        streamed = dict(client.translate_stream(german[:5], options={"beam_size": 4, "num_hypotheses": 2}))
    expected = tiny_engine.translate_batch(german[:5], BEAM4)
    assert [r.text for r in results] == [tiny_engine.tokenizer.decode(e.hypotheses[0].tokens) for e in expected]
    assert [len(r.hypotheses) for r in results] == [2] * 5
    for i, result in enumerate(results):  # scores may differ in the last float bits: other step mates
        assert [h.token_ids for h in streamed[i].hypotheses] == [h.token_ids for h in result.hypotheses]
        assert [h.text for h in streamed[i].hypotheses] == [h.text for h in result.hypotheses]
        assert [h.score for h in streamed[i].hypotheses] == pytest.approx([h.score for h in result.hypotheses],
                                                                          rel=1e-5)


# -- streaming ----------------------------------------------------------------------------------------------


def test_stream_returns_every_sentence_once_tagged_with_its_index(server: Any, tiny_engine: Any,
                                                                  german: list[str]) -> None:
    # 160 sentences: more than max_sentences_per_request, so the document is fed to the queue in windows
    sentences = german[:159] + [""]
    seen: dict[int, pb.TranslationResult] = {}
    for msg in server.stub().TranslateStream(request(sentences, GREEDY), timeout=120):
        assert msg.index not in seen
        seen[msg.index] = msg.result
        assert msg.model == "tiny"
    assert sorted(seen) == list(range(160))
    expected = tiny_engine.translate_batch(sentences[:159], GREEDY)
    for i, exp in enumerate(expected):
        assert_same(seen[i], exp, tiny_engine.tokenizer)
    assert seen[159].finish_reason == pb.FINISH_REASON_EMPTY_INPUT


def test_stream_sentence_cap_is_max_sentences_per_stream(start_server: Any) -> None:
    stub = start_server(max_sentences_per_stream=5, warmup=False).stub()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.TranslateStream(request(["Hallo."] * 6, GREEDY), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_sentences_per_stream=5" in (info.value.details() or "")
    assert len(list(stub.TranslateStream(request(["Hallo."] * 5, GREEDY), timeout=30))) == 5


# -- many clients at once -----------------------------------------------------------------------------------


def test_240_concurrent_requests_from_16_channels_match_their_sequential_results(
        server: Any, tiny_engine: Any, german: list[str]) -> None:
    # 30 distinct requests (1-3 sentences, three option sets), each sent 8 times, all at once
    option_sets = [GREEDY, DecodingOptions(beam_size=3), BEAM4]
    distinct = [([german[(7 * i + j) % len(german)] for j in range(1 + i % 3)], option_sets[i % 3])
                for i in range(30)]
    sequential = [tiny_engine.translate_batch(s, o) for s, o in distinct]  # each alone, one after another
    calls = [distinct[(i * 7) % 30] for i in range(240)]
    stubs = [server.stub() for _ in range(16)]
    futures = [stubs[i % 16].Translate.future(request(s, o), timeout=120) for i, (s, o) in enumerate(calls)]
    replies = [f.result() for f in futures]
    steps = server.metric("rosetta_decoder_step_rows_count", model="tiny")
    small = server.metric("rosetta_decoder_step_rows_bucket", model="tiny", le="16.0")
    for i, reply in enumerate(replies):
        expected = sequential[(i * 7) % 30]
        assert len(reply.results) == len(expected)
        for served, exp in zip(reply.results, expected, strict=True):
            assert_same(served, exp, tiny_engine.tokenizer)
    # requests of different callers shared decoder steps: one request has at most 3 x 4 = 12 rows
    assert small < steps


# -- bad input ----------------------------------------------------------------------------------------------


BAD_INPUT = [
    ("no-sentences", pb.TranslateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "sentences is empty"),
    ("too-many-sentences", request(["Hallo."] * 129), grpc.StatusCode.INVALID_ARGUMENT,
     "max_sentences_per_request=128"),
    ("sentence-too-long", request(["Hallo.", "Hund " * 300]), grpc.StatusCode.INVALID_ARGUMENT,
     "max_input_tokens="),
    ("beam-size-zero", request(["Hallo."], pb.DecodingOptions(beam_size=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_beam_size=16"),
    ("beam-size-too-big", request(["Hallo."], pb.DecodingOptions(beam_size=17)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_beam_size=16"),
    ("num-hypotheses-zero", request(["Hallo."], pb.DecodingOptions(num_hypotheses=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "num_hypotheses=0"),
    ("num-hypotheses-above-beam", request(["Hallo."], pb.DecodingOptions(beam_size=4, num_hypotheses=5)),
     grpc.StatusCode.INVALID_ARGUMENT, "beam_size=4"),
    ("negative-max-length", request(["Hallo."], pb.DecodingOptions(max_decoding_length=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_decoding_length=-1"),
    ("max-length-above-limit", request(["Hallo."], pb.DecodingOptions(max_decoding_length=100000)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_output_tokens=512"),
    ("negative-min-length", request(["Hallo."], pb.DecodingOptions(min_decoding_length=-3)),
     grpc.StatusCode.INVALID_ARGUMENT, "min_decoding_length=-3"),
    ("negative-length-offset", request(["Hallo."], pb.DecodingOptions(max_decoding_length_offset_tokens=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_decoding_length_offset_tokens=-1"),
    ("negative-length-ratio", request(["Hallo."], pb.DecodingOptions(max_decoding_length_ratio=-0.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_decoding_length_ratio=-0.5"),
    ("nan-length-penalty", request(["Hallo."], pb.DecodingOptions(length_penalty=math.nan)),
     grpc.StatusCode.INVALID_ARGUMENT, "length_penalty"),
    ("unknown-model", request(["Hallo."], model="xx-yy"), grpc.StatusCode.NOT_FOUND, "'xx-yy' is not loaded"),
    ("unknown-version", request(["Hallo."], model="tiny/7"), grpc.StatusCode.NOT_FOUND, "'tiny/7' is not loaded"),
]


@pytest.mark.parametrize(("req", "code", "message"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_gets_a_precise_status_and_the_server_still_answers(
        server: Any, german: list[str], req: pb.TranslateRequest, code: grpc.StatusCode,
        message: str) -> None:
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(req, timeout=30)
    assert info.value.code() == code
    assert message in (info.value.details() or "")
    if len(req.sentences) <= server.config.max_sentences_per_request:  # streams have their own, higher cap
        with pytest.raises(grpc.RpcError) as info:
            list(stub.TranslateStream(req, timeout=30))
        assert info.value.code() == code
        assert message in (info.value.details() or "")
    assert len(stub.Translate(request(german[:2], GREEDY), timeout=30).results) == 2


def test_message_over_the_size_limit_is_refused(server: Any, german: list[str]) -> None:
    stub = server.stub()
    too_big = request(["a" * (server.config.max_message_bytes + 1024)])
    assert status_of(lambda: stub.Translate(too_big, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Translate(request(german[:1], GREEDY), timeout=30).results) == 1


def test_model_can_be_named_by_name_or_name_and_version(server: Any, german: list[str]) -> None:
    stub = server.stub()
    for model in ("", "tiny", "tiny/1"):
        assert stub.Translate(request(german[:1], GREEDY, model=model), timeout=30).model_version == "1"


# -- queue bound, deadlines, cancellation, engine failure ---------------------------------------------------


@pytest.fixture(params=["loop", "batch"])
def narrow_server(start_server: Any, request: pytest.FixtureRequest) -> Any:
    """One worker that one SLOW call fills (4 sentences x 16 beams: 64 live rows, or a batch of 4 sentences),
    a queue of 8 sentences; each scheduler."""
    return start_server(scheduler=request.param, workers=1, max_live_rows=64, max_batch_sentences=4,
                        max_queue_sentences=8, max_sentences_per_request=8, warmup=False)


def occupy(srv: Any, german: list[str]) -> Any:
    """Start a slow call that holds the only worker; returns its future once it runs."""
    fut = srv.stub().Translate.future(request(german[:4], SLOW), timeout=120)
    wait_until(lambda: srv.metric("rosetta_batch_size_sentences_count", model="tiny") >= 1)
    return fut


def test_full_queue_gets_resource_exhausted_at_once(narrow_server: Any, german: list[str]) -> None:
    slow = occupy(narrow_server, german)
    stub = narrow_server.stub()
    queued = stub.Translate.future(request(german[4:10], GREEDY), timeout=120)
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 6)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(request(german[10:13], GREEDY), timeout=60)
    assert time.monotonic() - started < 1.0
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_sentences=8" in (info.value.details() or "")
    assert len(queued.result().results) == 6
    assert len(slow.result().results) == 4
    assert narrow_server.metric("rosetta_requests_total", model="tiny", code="RESOURCE_EXHAUSTED") == 1


def test_passed_deadline_is_dropped_before_compute(narrow_server: Any, german: list[str]) -> None:
    stub = narrow_server.stub()
    assert status_of(lambda: stub.Translate(request(german[:1], GREEDY), timeout=0.0001)) \
        == grpc.StatusCode.DEADLINE_EXCEEDED
    slow = occupy(narrow_server, german)
    # A second slow call waits behind the first (its group is older than the next one), so the
    # worker stays busy for two slow calls: well past the 0.3 s deadline below.
    also_slow = stub.Translate.future(request(german[:4], SLOW), timeout=120)
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 4)
    sentences_run = narrow_server.metric("rosetta_batch_size_sentences_sum", model="tiny")
    assert status_of(lambda: stub.Translate(request(german[4:7], GREEDY), timeout=0.3)) \
        == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(slow.result().results) == 4 and len(also_slow.result().results) == 4
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 0)
    # the expired sentences never reached the engine: only the second slow call's 4 ran since
    assert narrow_server.metric("rosetta_batch_size_sentences_sum", model="tiny") == sentences_run + 4
    # deadline expiry is DEADLINE_EXCEEDED everywhere: the drop reason and the status label, never "cancelled".
    # The 0.3 s call's 3 sentences; plus the 0.1 ms call's one when its deadline passed only after it was queued
    # (tokenizing runs on a thread, so the deadline can pass between the handler's start and the queue).
    assert narrow_server.metric("rosetta_dropped_sentences_total", model="tiny", reason="deadline_exceeded") in (3, 4)
    assert narrow_server.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") == 0
    # the 0.3 s call, and the 0.1 ms one unless it ended inside gRPC before its handler started (then gRPC
    # answered it alone: a coroutine cancelled before its first line runs records nothing)
    assert narrow_server.metric("rosetta_requests_total", model="tiny", code="DEADLINE_EXCEEDED") in (1, 2)
    assert narrow_server.metric("rosetta_requests_total", model="tiny", code="CANCELLED") == 0
    assert len(stub.Translate(request(german[:2], GREEDY), timeout=30).results) == 2


def test_cancelled_call_has_its_queued_work_removed(narrow_server: Any, german: list[str]) -> None:
    stub = narrow_server.stub()
    slow = occupy(narrow_server, german)
    sentences_run = narrow_server.metric("rosetta_batch_size_sentences_sum", model="tiny")
    doomed = stub.Translate.future(request(german[4:9], GREEDY), timeout=60)
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 5)
    assert doomed.cancel()
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 0)
    assert narrow_server.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") == 5
    assert len(slow.result().results) == 4
    assert narrow_server.metric("rosetta_batch_size_sentences_sum", model="tiny") == sentences_run
    wait_until(lambda: narrow_server.metric("rosetta_requests_total", model="tiny", code="CANCELLED") == 1)
    assert len(stub.Translate(request(german[:2], GREEDY), timeout=30).results) == 2


def test_cancelled_stream_has_its_queued_work_removed(narrow_server: Any, german: list[str]) -> None:
    slow = occupy(narrow_server, german)
    stream = narrow_server.stub().TranslateStream(request(german[4:12], GREEDY), timeout=60)
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 8)
    stream.cancel()
    wait_until(lambda: narrow_server.metric("rosetta_queue_depth_sentences", model="tiny") == 0)
    assert narrow_server.metric("rosetta_dropped_sentences_total", model="tiny", reason="cancelled") == 8
    assert len(slow.result().results) == 4
    wait_until(lambda: narrow_server.metric("rosetta_requests_in_flight", model="tiny") == 0)


def test_engine_failure_fails_only_that_batch(start_server: Any, german: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The request-level scheduler (tests/service/test_server_loop.py has the decode loop's twin)."""
    server = start_server(scheduler="batch")
    engine = server.server.translator.resolve("tiny").engine
    real = engine.translate_ids

    def flaky(sources: list[list[int]], options: DecodingOptions, observer: Any = None, abandoned: Any = None) -> Any:
        if options.beam_size == 3:  # only batches decoded with beam 3 fail
            raise RuntimeError("injected engine fault")
        return real(sources, options, observer=observer, abandoned=abandoned)

    monkeypatch.setattr(engine, "translate_ids", flaky)
    stub = server.stub()
    bad = stub.Translate.future(request(german[:3], DecodingOptions(beam_size=3)), timeout=60)
    good = [stub.Translate.future(request(german[i:i + 2], GREEDY), timeout=60) for i in range(0, 20, 2)]
    with pytest.raises(grpc.RpcError) as info:
        bad.result()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "injected engine fault" in (info.value.details() or "")
    assert all(len(f.result().results) == 2 for f in good)
    monkeypatch.undo()
    assert len(stub.Translate(request(german[:3], DecodingOptions(beam_size=3)), timeout=60).results) == 3


# -- models, health, reflection, metrics --------------------------------------------------------------------


def test_list_models_and_get_model_describe_the_entry(server: Any, tiny_engine: Any) -> None:
    stub = server.stub()
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert listed.default_model == "tiny/1"
    [info] = listed.models
    assert (info.name, info.version, info.precision, info.source_lang) == ("tiny", "1", "fp32", "de")
    assert info.provider == "cpu"
    assert info.max_input_tokens == min(256, tiny_engine.max_source_tokens)
    assert info.vocab_size > 0 and info.decoder_layers == 2
    assert json.loads(info.manifest_json)["name"] == "tiny"
    assert stub.GetModel(pb.GetModelRequest(model="tiny/1"), timeout=10) == info
    assert status_of(lambda: stub.GetModel(pb.GetModelRequest(model="nope"), timeout=10)) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server: Any) -> None:
    db = ProtoReflectionDescriptorDatabase(server.channel())
    services = set(db.get_services())
    assert {"rosetta.v1.Translator", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("rosetta.v1.Translator").package == "rosetta.v1"


def test_health_is_not_serving_until_loaded_then_serving_then_not_serving_while_draining(
        start_server: Any, german: list[str]) -> None:
    srv = start_server(load=False, drain_delay_s=1.0)
    health = health_pb2_grpc.HealthStub(srv.channel())
    stub = srv.stub()

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    for name in ("", "rosetta.v1.Translator"):
        assert status(name) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status_of(lambda: stub.Translate(request(german[:1]), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    srv.call(srv.server.load_models())
    for name in ("", "rosetta.v1.Translator"):
        assert status(name) == health_pb2.HealthCheckResponse.SERVING
    drained = asyncio.run_coroutine_threadsafe(srv.server.drain(5.0), srv.loop)  # not awaited yet
    wait_until(lambda: status("rosetta.v1.Translator") == health_pb2.HealthCheckResponse.NOT_SERVING)
    assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
    # during drain_delay_s the server still answers, so load balancers can move away first
    assert len(stub.Translate(request(german[:1], GREEDY), timeout=10).results) == 1
    drained.result(30)
    assert status_of(lambda: stub.Translate(request(german[:1]), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_endpoint_counts_match_the_requests_sent(start_server: Any, tiny_engine: Any,
                                                         german: list[str]) -> None:
    srv = start_server(max_queue_sentences=100, max_sentences_per_request=100)
    stub = srv.stub()
    sentences_ok = 0
    for i in range(7):
        sentences = german[i * 3: i * 3 + 1 + i % 3]
        sentences_ok += len(sentences)
        stub.Translate(request(sentences, BEAM4), timeout=60)
    for _ in range(3):
        status_of(lambda: stub.Translate(request(["Hallo."], pb.DecodingOptions(beam_size=99)), timeout=10))
    status_of(lambda: stub.Translate(request(["Hallo."], model="nope"), timeout=10))
    streamed = list(stub.TranslateStream(request(german[:4], GREEDY), timeout=60))
    assert len(streamed) == 4
    port = srv.server.metrics_port
    m = scrape(f"http://127.0.0.1:{port}/metrics")

    def v(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert v("rosetta_request_duration_seconds_count", model="tiny", code="OK") == 8
    assert v("rosetta_requests_total", model="tiny", code="OK") == 8
    assert v("rosetta_request_duration_seconds_count", model="tiny", code="INVALID_ARGUMENT") == 3
    assert v("rosetta_requests_total", model="unknown", code="NOT_FOUND") == 1
    assert v("rosetta_queue_wait_seconds_count", model="tiny") == sentences_ok + 4
    assert v("rosetta_batch_size_sentences_sum", model="tiny") == sentences_ok + 4
    batches = v("rosetta_batch_size_sentences_count", model="tiny")  # admissions into a decode loop
    assert 2 <= batches <= sentences_ok + 4
    for name in ("rosetta_batch_size_tokens_count", "rosetta_batch_padding_ratio_count"):
        assert v(name, model="tiny") == batches, name
    assert 1 <= v("rosetta_encoder_duration_seconds_count", model="tiny") <= batches  # one call per lane per step
    assert v("rosetta_decoder_step_duration_seconds_count", model="tiny") >= batches
    assert v("rosetta_input_tokens_total", model="tiny") > 0
    assert v("rosetta_output_tokens_total", model="tiny") > 0
    assert v("rosetta_requests_in_flight", model="tiny") == 0
    assert v("rosetta_queue_depth_sentences", model="tiny") == 0
    assert v("rosetta_queue_capacity_sentences", model="tiny") == 100
    manifest = tiny_engine.manifest
    assert v("rosetta_model_info", model="tiny", version="1", precision="fp32", provider="cpu",
             source_lang=manifest["source_lang"], target_lang=manifest["target_lang"]) == 1
