"""Fuzzing the Translate request against a real server: structured messages (every field over its whole
type) and raw bytes (mutations of valid messages, and noise). No answer may be UNKNOWN or INTERNAL, and the
server stays healthy. Bounded: a fixed number of examples, derandomized (the same inputs every run)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from service.proto import translate_pb2 as pb  # noqa: E402

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Every value of the type, but often a small one, so that requests get past the other fields' checks.
INT32 = st.one_of(st.integers(-2, 20), st.integers(-(2**31), 2**31 - 1))
FLOAT32 = st.one_of(st.floats(-3, 3, width=32), st.floats(width=32))  # also nan, inf, +-3.4e38
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)  # proto strings are valid UTF-8
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def options(draw: Any) -> pb.DecodingOptions:
    fields = {"beam_size": INT32, "length_penalty": FLOAT32, "max_decoding_length": INT32,
              "max_decoding_length_ratio": FLOAT32, "max_decoding_length_offset_tokens": INT32,
              "min_decoding_length": INT32, "num_hypotheses": INT32, "return_scores": st.booleans(),
              "partial_at_deadline": st.booleans()}
    chosen = draw(st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=len(fields)))
    return pb.DecodingOptions(**{name: draw(fields[name]) for name in chosen})


requests = st.builds(
    lambda sentences, model, opts: pb.TranslateRequest(sentences=sentences, model=model, options=opts),
    st.lists(st.one_of(TEXT, st.sampled_from(["Ein Hund läuft.", "", "   ", "Zwei Männer spielen Fußball."])),
             max_size=6),
    st.one_of(st.just(""), st.just("tiny"), st.just("tiny/1"), TEXT),
    options(),
)


@pytest.fixture()
def fuzz_server(start_server: Any) -> Any:
    """A small decoding budget keeps every accepted example cheap; the checks under test are the same."""
    return start_server(max_request_decode_tokens=3000, warmup=False)


def assert_healthy(srv: Any) -> None:
    reply = health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ok = srv.stub().Translate(pb.TranslateRequest(sentences=["Ein Hund."]), timeout=30)
    assert len(ok.results) == 1


def status(call: Any) -> grpc.StatusCode:
    try:
        result = call()
        if not isinstance(result, (bytes, pb.TranslateResponse)):
            list(result)  # a stream: read it to the end
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_structured_requests_never_get_unknown_or_internal(fuzz_server: Any) -> None:
    stub = fuzz_server.stub()
    seen: set[str] = set()

    @FUZZ
    @given(request=requests, streamed=st.booleans())
    def check(request: pb.TranslateRequest, streamed: bool) -> None:
        method = stub.TranslateStream if streamed else stub.Translate
        code = status(lambda: method(request, timeout=20))
        seen.add(code.name)
        assert code not in FORBIDDEN, (code, request)

    check()
    assert "OK" in seen and "INVALID_ARGUMENT" in seen  # the inputs reached both sides of validation
    assert_healthy(fuzz_server)


def test_raw_bodies_never_get_unknown_or_internal(fuzz_server: Any) -> None:
    raw = fuzz_server.channel().unary_unary("/rosetta.v1.Translator/Translate")
    valid = pb.TranslateRequest(sentences=["Ein Hund läuft.", "Eine Frau."],
                                options=pb.DecodingOptions(beam_size=2, length_penalty=0.6)).SerializeToString()

    @st.composite
    def mutated(draw: Any) -> bytes:
        body = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(body) - 1))
            body[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(body)))
        return bytes(body[:cut] if draw(st.booleans()) else body)

    @FUZZ
    @given(body=st.one_of(mutated(), st.binary(max_size=300)))
    def check(body: bytes) -> None:
        code = status(lambda: raw(body, timeout=20))
        assert code not in FORBIDDEN, (code, body)

    check()
    assert_healthy(fuzz_server)
