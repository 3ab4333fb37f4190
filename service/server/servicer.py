"""The protobuf edge: rosetta.v1.Translator requests parsed, handed to the Translator, results turned into
responses, and every exception turned into a gRPC status in one place (`_RpcScope`, `_status_of`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from service.errors import InvalidArgument, MessageTooLarge, ServiceError
from service.metrics import ServerMetrics
from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc
from service.server.models import ServedModel
from service.server.results import SentenceTranslation
from service.server.scheduler import DEADLINE_SLACK_S
from service.server.translator import Translator
from service.wire import finish_reason_to_pb, options_from_pb

log = logging.getLogger(__name__)
M = TypeVar("M")  # a request message type

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # "rosetta.v1.Translator"

MAX_STATUS_MESSAGE = 1024  # characters of a status message; longer ones are cut (gRPC puts them in trailers)
UNKNOWN_MODEL = "unknown"  # metrics label for requests naming no loaded model (bounded cardinality)


def result_to_pb(t: SentenceTranslation, return_scores: bool) -> pb.TranslationResult:
    hyps = []
    for h in t.hypotheses:
        msg = pb.Hypothesis(text=h.text, token_ids=h.token_ids, tokens=h.tokens)
        if return_scores:
            msg.score, msg.log_prob = h.score, h.log_prob
        hyps.append(msg)
    return pb.TranslationResult(hypotheses=hyps, finish_reason=finish_reason_to_pb(t.finish_reason),
                                source_tokens=t.source_tokens, beam_size=t.beam_size)


def model_info_to_pb(model: ServedModel) -> pb.ModelInfo:
    cfg = model.manifest.get("model_config", {})
    return pb.ModelInfo(
        name=model.name, version=model.version, source_lang=str(model.manifest.get("source_lang", "")),
        target_lang=str(model.manifest.get("target_lang", "")), precision=str(model.manifest.get("precision", "")),
        provider=model.provider, signature_version=int(model.manifest.get("signature_version", 0)),
        vocab_size=int(cfg.get("vocab_size", 0)), d_model=int(cfg.get("d_model", 0)),
        encoder_layers=int(cfg.get("encoder_layers", 0)), decoder_layers=int(cfg.get("decoder_layers", 0)),
        heads=int(cfg.get("heads", 0)), max_input_tokens=model.max_input_tokens,
        manifest_json=json.dumps(model.manifest, sort_keys=True))


def _status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from an exception to a gRPC status and message (at most MAX_STATUS_MESSAGE
    characters: it travels in the trailers, which have a size limit of their own)."""
    if isinstance(err, ServiceError):
        code, message = grpc.StatusCode[err.status], str(err)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[: MAX_STATUS_MESSAGE - 15] + "... (truncated)"
    return code, message


def parse(message_type: type[Any], data: bytes, max_bytes: int) -> Any:
    """A request message from its wire bytes: RESOURCE_EXHAUSTED over `max_bytes`, INVALID_ARGUMENT when
    they are not a valid `message_type` (garbage, invalid UTF-8 in a string field)."""
    if len(data) > max_bytes:
        raise MessageTooLarge(f"the request has {len(data)} bytes, more than max_message_bytes={max_bytes}")
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError, or a RuntimeWarning-free ValueError from upb
        raise InvalidArgument(f"the request is not a valid {message_type.DESCRIPTOR.full_name}: "
                              f"{str(err)[:200] or type(err).__name__}") from None
    return msg


class _RpcScope:
    """Wraps one Translate/TranslateStream call: in-flight gauge, latency and status metrics, and the
    exception -> status mapping. `bind(model)` once the model is known."""

    def __init__(self, metrics: ServerMetrics, context: grpc.aio.ServicerContext) -> None:
        self.metrics = metrics
        self.context = context
        self.model = UNKNOWN_MODEL
        self.bound = False
        self.start = time.perf_counter()
        # on time.monotonic()'s clock; read now: time_remaining() means nothing once the call has ended
        remaining = context.time_remaining()
        self.deadline: float | None = None if remaining is None else time.monotonic() + remaining

    def bind(self, model: ServedModel) -> None:
        self.model = model.name
        self.bound = True
        self.metrics.requests_in_flight.labels(self.model).inc()

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S

    def _record(self, code: str) -> None:
        self.metrics.request_duration.labels(self.model, code).observe(time.perf_counter() - self.start)
        self.metrics.requests.labels(self.model, code).inc()
        if self.bound:
            self.metrics.requests_in_flight.labels(self.model).dec()
            self.bound = False

    async def __aenter__(self) -> _RpcScope:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if exc is None:
            self._record("OK")
            return False
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # the client cancelled or its deadline passed; gRPC has already answered it
            self._record("DEADLINE_EXCEEDED" if self._expired() else "CANCELLED")
            return False
        code, message = _status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", self.model, message, exc_info=not isinstance(exc, ServiceError))
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and self.context.done():
            self._record(code.name)  # gRPC already ended the call with DEADLINE_EXCEEDED
            return True
        self._record(code.name)
        await self.context.abort(code, message)
        return False  # not reached: abort raises


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """rosetta.v1.Translator: protobuf in, plain Python through `Translator`, protobuf out."""

    def __init__(self, translator: Translator, metrics: ServerMetrics, max_message_bytes: int) -> None:
        self.translator = translator
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes

    def handlers(self) -> grpc.GenericRpcHandler:
        """The Translator service with requests parsed by the methods themselves (`parse`), so that a
        malformed or over-size body becomes a counted INVALID_ARGUMENT / RESOURCE_EXHAUSTED, not a
        traceback and UNKNOWN from gRPC's deserializer."""
        def out(cls: type[Any]) -> Callable[[Any], bytes]:
            return cls.SerializeToString  # type: ignore[no-any-return]

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Translate": grpc.unary_unary_rpc_method_handler(
                self.Translate, response_serializer=out(pb.TranslateResponse)),
            "TranslateStream": grpc.unary_stream_rpc_method_handler(
                self.TranslateStream, response_serializer=out(pb.TranslateStreamResponse)),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels, response_serializer=out(pb.ListModelsResponse)),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                self.GetModel, response_serializer=out(pb.ModelInfo)),
        })

    def _message(self, message_type: type[M], data: bytes | M) -> M:
        """The request as `message_type`: parsed from its wire bytes (`parse`), or as given when the method
        is called directly rather than through `handlers()`."""
        if isinstance(data, message_type):
            return data
        return parse(message_type, data, self.max_message_bytes)  # type: ignore[arg-type]

    async def Translate(self, request: bytes | pb.TranslateRequest,  # type: ignore[override]  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        async with _RpcScope(self.metrics, context) as scope:
            req = self._message(pb.TranslateRequest, request)
            if req.stream_prefix:
                raise InvalidArgument("stream_prefix is a TranslateStream option; Translate answers once")
            model = self.translator.resolve(req.model)
            scope.bind(model)
            options = options_from_pb(req.options)
            out = await self.translator.translate(model, list(req.sentences), options, scope.deadline)
            return_scores = options.get("return_scores", True)
            return pb.TranslateResponse(
                results=[result_to_pb(t, return_scores) for t in out.sentences], model=out.model,
                model_version=out.version,
                timing=pb.Timing(total_ms=(time.perf_counter() - scope.start) * 1000,
                                 queue_wait_ms=max((t.queue_wait_s for t in out.sentences), default=0) * 1000,
                                 compute_ms=max((t.compute_s for t in out.sentences), default=0) * 1000))
        raise AssertionError("unreachable")  # _RpcScope aborts on every error

    async def TranslateStream(self, request: bytes | pb.TranslateRequest,  # type: ignore[override]  # noqa: N802
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TranslateStreamResponse]:
        async with _RpcScope(self.metrics, context) as scope:
            req = self._message(pb.TranslateRequest, request)
            model = self.translator.resolve(req.model)
            scope.bind(model)
            options = options_from_pb(req.options)
            return_scores = options.get("return_scores", True)
            stream = self.translator.translate_stream(model, list(req.sentences), options, scope.deadline,
                                                      req.stream_prefix)
            streamed: set[int] = set()  # sentences with a first word out
            async with contextlib.aclosing(stream):
                async for index, t in stream:
                    if isinstance(t, str):  # progress: the agreed prefix grew
                        if index not in streamed:
                            streamed.add(index)
                            model.metrics.on_first_word(time.perf_counter() - scope.start)
                        yield pb.TranslateStreamResponse(index=index, prefix=t, model=model.name,
                                                         model_version=model.version)
                        continue
                    yield pb.TranslateStreamResponse(
                        index=index, result=result_to_pb(t, return_scores), model=model.name,
                        model_version=model.version,
                        timing=pb.Timing(total_ms=(time.perf_counter() - scope.start) * 1000,
                                         queue_wait_ms=t.queue_wait_s * 1000, compute_ms=t.compute_s * 1000))

    async def ListModels(self, request: bytes | pb.ListModelsRequest,  # type: ignore[override]  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            self._message(pb.ListModelsRequest, request)
        except ServiceError as err:
            await context.abort(*_status_of(err))
        default = self.translator.default
        return pb.ListModelsResponse(
            models=[model_info_to_pb(m) for m in self.translator.loaded()],
            default_model=default.key if default is not None else "")

    async def GetModel(self, request: bytes | pb.GetModelRequest,  # type: ignore[override]  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            model = self.translator.resolve(self._message(pb.GetModelRequest, request).model)
        except ServiceError as err:
            await context.abort(*_status_of(err))
        return model_info_to_pb(model)
