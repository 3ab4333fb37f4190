"""The gRPC server: `rosetta.v1.Translator` on grpc.aio, with health, reflection, metrics and drain.

Layers, outside in:
    TranslatorServicer  the edge: protobuf <-> plain Python, request metrics, and the one place
                        (`_RpcScope`) where exceptions become gRPC statuses
    Translator          plain Python: validate -> tokenize -> scheduler -> results (no protobuf)
    ServedModel         one loaded entry: Engine + Scheduler + tokenizer + metrics
    RosettaServer       lifecycle: listen (health NOT_SERVING) -> load + warm up (SERVING) -> drain

Defined results (see protos/translate.proto): an empty or whitespace-only sentence is not sent to the
engine; it gets one empty hypothesis (score 0) with finish reason "empty" and source_tokens 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig
from service.engine.search import ABANDONED
from service.errors import InvalidArgument, MessageTooLarge, ModelNotFound, QueueFull, ServiceError, Unavailable
from service.metrics import ModelMetrics, ServerMetrics
from service.options import DecodingOptions, TranslationResult
from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc
from service.scheduler import (
    DEADLINE_SLACK_S,
    Abandoned,
    BatchRunner,
    Scheduler,
    SchedulerConfig,
    SentenceOutput,
    Ticket,
)
from service.tls import server_credentials
from service.wire import finish_reason_to_pb, options_from_pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # "rosetta.v1.Translator"
HEALTH_SERVICES = ("", SERVICE_NAME)  # overall health and the Translator service
WARMUP_TEXT = "Ein Mann fährt mit dem Fahrrad die Straße entlang."  # any text works; German is the default pair
UNKNOWN_MODEL = "unknown"  # metrics label for requests naming no loaded model (bounded cardinality)


# ---------------------------------------------------------------------------------------------------------
# Plain results (no protobuf below the servicer)


@dataclass(frozen=True)
class ServedHypothesis:
    text: str
    token_ids: list[int]  # generated ids, eos excluded
    tokens: list[str]  # the tokenizer's spelling of token_ids
    score: float  # log_prob / length**length_penalty
    log_prob: float


@dataclass(frozen=True)
class SentenceTranslation:
    hypotheses: list[ServedHypothesis]  # best first
    finish_reason: str  # "eos", "length" or "empty"
    source_tokens: int  # eos excluded
    queue_wait_s: float = 0.0
    compute_s: float = 0.0


@dataclass(frozen=True)
class Translation:
    """The outcome of one Translate call: one SentenceTranslation per sentence, in order."""

    sentences: list[SentenceTranslation]
    model: str
    version: str


def _empty_translation() -> SentenceTranslation:
    return SentenceTranslation([ServedHypothesis("", [], [], 0.0, 0.0)], "empty", 0)


# ---------------------------------------------------------------------------------------------------------
# Request limits (ServerConfig) applied to plain values


LENGTH_PENALTY_RANGE = (-10.0, 10.0)  # wider values only overflow: 512**10 is already 1e27
MAX_RATIO = 1000.0  # max_decoding_length_ratio above this changes nothing (max_decoding_length caps first)
MAX_MODEL_NAME_BYTES = 256  # a longer `model` is refused before lookup; messages quote at most this much
STOP_SLACK_S = 5.0  # drain: how long past the grace period stopping may take before it is cut short
RECEIVE_HEADROOM = 2  # gRPC core's receive limit, in multiples of max_message_bytes (RosettaServer.start)
MAX_STATUS_MESSAGE = 1024  # characters of a status message; longer ones are cut (gRPC puts them in trailers)


def shown(text: str, limit: int = 64) -> str:
    """`text` quoted for a status message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class RequestLimits:
    max_sentences_per_request: int
    max_sentences_per_stream: int
    max_input_tokens: int
    max_beam_size: int
    max_output_tokens: int
    max_input_bytes: int = 4096
    max_request_decode_tokens: int = 131072
    max_batch_kv_bytes: int = 128 * 1024 * 1024

    @classmethod
    def from_config(cls, config: ServerConfig) -> RequestLimits:
        return cls(config.max_sentences_per_request, config.max_sentences_per_stream, config.max_input_tokens,
                   config.max_beam_size, config.max_output_tokens, config.max_input_bytes,
                   config.max_request_decode_tokens, config.max_batch_kv_bytes)

    def decoding_options(self, given: dict[str, Any]) -> DecodingOptions:
        """DecodingOptions from the fields a request set (others keep their defaults); InvalidArgument
        naming the field and its limit when one is out of range."""
        merged = {**DecodingOptions().__dict__, **given}
        beam, nbest = merged["beam_size"], merged["num_hypotheses"]
        if not 1 <= beam <= self.max_beam_size:
            raise InvalidArgument(f"beam_size={beam} is out of range [1, max_beam_size={self.max_beam_size}]")
        if not 1 <= nbest <= beam:
            raise InvalidArgument(f"num_hypotheses={nbest} is out of range [1, beam_size={beam}]")
        max_len = merged["max_decoding_length"]
        if not 1 <= max_len <= self.max_output_tokens:
            raise InvalidArgument(f"max_decoding_length={max_len} is out of range "
                                  f"[1, max_output_tokens={self.max_output_tokens}]")
        for name in ("min_decoding_length", "max_decoding_length_offset", "max_decoding_length_ratio"):
            if merged[name] < 0:
                shown = "max_decoding_length_offset_tokens" if name == "max_decoding_length_offset" else name
                raise InvalidArgument(f"{shown}={merged[name]} is negative; it must be >= 0")
        for name in ("length_penalty", "max_decoding_length_ratio"):
            if merged[name] != merged[name] or merged[name] in (float("inf"), float("-inf")):
                raise InvalidArgument(f"{name}={merged[name]} is not a finite number")
        low, high = LENGTH_PENALTY_RANGE
        if not low <= merged["length_penalty"] <= high:
            raise InvalidArgument(f"length_penalty={merged['length_penalty']:g} is out of range [{low:g}, {high:g}]")
        if merged["max_decoding_length_ratio"] > MAX_RATIO:
            raise InvalidArgument(f"max_decoding_length_ratio={merged['max_decoding_length_ratio']:g} is out of "
                                  f"range [0, {MAX_RATIO:g}]")
        try:
            return DecodingOptions(**merged)
        except ValueError as err:  # any rule DecodingOptions adds later
            raise InvalidArgument(str(err)) from err

    def check_count(self, n: int, stream: bool) -> None:
        cap, name = ((self.max_sentences_per_stream, "max_sentences_per_stream") if stream
                     else (self.max_sentences_per_request, "max_sentences_per_request"))
        if n == 0:
            raise InvalidArgument("sentences is empty: send at least one sentence")
        if n > cap:
            raise InvalidArgument(f"the request has {n} sentences, more than {name}={cap}")

    def check_bytes(self, sentences: Sequence[str]) -> None:
        """Before tokenizing: every sentence within max_input_bytes of UTF-8 (a cheap, exact bound on the
        tokenizer's work and memory)."""
        cap = self.max_input_bytes
        for i, s in enumerate(sentences):
            # a str holds at most 4 UTF-8 bytes a character: skip the encode when it cannot exceed the cap
            if len(s) * 4 > cap and len(s.encode("utf-8", "surrogatepass")) > cap:
                raise InvalidArgument(f"sentence {i} has {len(s.encode('utf-8', 'surrogatepass'))} bytes of UTF-8, "
                                      f"more than max_input_bytes={cap}")

    def check_cost(self, model: ServedModel, sources: Sequence[list[int] | None], options: DecodingOptions,
                   stream: bool) -> list[int]:
        """The KV-cache bound of each source to decode (None ones skipped); INVALID_ARGUMENT when one
        sentence alone exceeds max_batch_kv_bytes or (Translate) when the request's decoder rows x
        positions, summed over its sentences, exceed max_request_decode_tokens."""
        lengths = [len(ids) for ids in sources if ids is not None]
        caps = model.engine.length_caps(lengths, options)
        beam = options.beam_size
        kv = [model.engine.kv_bytes(n, beam, cap) for n, cap in zip(lengths, caps, strict=True)]
        worst = max(range(len(kv)), key=kv.__getitem__, default=None)
        if worst is not None and kv[worst] > self.max_batch_kv_bytes:
            raise InvalidArgument(
                f"a sentence of {lengths[worst]} tokens at beam_size={beam} and a length cap of {caps[worst]} "
                f"tokens needs {kv[worst]} bytes of KV cache, more than max_batch_kv_bytes="
                f"{self.max_batch_kv_bytes}; lower beam_size or max_decoding_length")
        decode_tokens = beam * sum(caps)
        if not stream and decode_tokens > self.max_request_decode_tokens:
            raise InvalidArgument(
                f"the request's decoding work, beam_size x length cap summed over its sentences, is "
                f"{decode_tokens} tokens, more than max_request_decode_tokens={self.max_request_decode_tokens}; "
                f"split the request or lower beam_size or max_decoding_length")
        return kv

    def check_lengths(self, sources: Sequence[list[int] | None], max_input_tokens: int) -> None:
        """`max_input_tokens`: the model's limit (ServerConfig.max_input_tokens or lower)."""
        for i, ids in enumerate(sources):
            if ids is not None and len(ids) > max_input_tokens:
                raise InvalidArgument(f"sentence {i} has {len(ids)} tokens, more than "
                                      f"max_input_tokens={max_input_tokens}")


# ---------------------------------------------------------------------------------------------------------
# One loaded model


@dataclass
class ServedModel:
    """A loaded model-repository entry and the scheduler that owns its engine."""

    name: str
    version: str
    manifest: dict[str, Any]
    provider: str
    tokenizer: Any  # service.tokenizer.Tokenizer
    engine: Any  # service.engine.Engine
    scheduler: Scheduler
    metrics: ModelMetrics
    max_input_tokens: int  # ServerConfig.max_input_tokens, lowered to what the model's positions allow

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def tokenize(self, sentences: Sequence[str]) -> list[list[int] | None]:
        """Token ids (no eos) per sentence; None for an empty or whitespace-only one."""
        texts = [s for s in sentences if s.strip()]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        return [next(encoded) if s.strip() else None for s in sentences]


def make_runner(engine: Any, observer: ModelMetrics) -> BatchRunner:
    """The scheduler's batch function for `engine`: decode, then detokenize on the same executor thread."""
    tokenizer = engine.tokenizer

    def run(sources: list[list[int]], options: DecodingOptions,
            abandoned: Abandoned | None = None) -> list[SentenceTranslation | None]:
        results: list[TranslationResult] = engine.translate_ids(sources, options, observer=observer,
                                                                abandoned=abandoned)
        out: list[SentenceTranslation | None] = []
        for ids, res in zip(sources, results, strict=True):
            if res.finish_reason == ABANDONED:  # nobody waits for it: the scheduler counts it as dropped
                out.append(None)
                continue
            hyps = [ServedHypothesis(h.text, list(h.tokens),
                                     [tokenizer.id_to_token(t) for t in h.tokens], h.score, h.log_prob)
                    for h in res.hypotheses]
            out.append(SentenceTranslation(hyps, res.finish_reason, len(ids)))
        done = [(ids, s) for ids, s in zip(sources, out, strict=True) if s is not None]
        observer.on_tokens(sum(len(ids) for ids, _ in done), sum(len(s.hypotheses[0].token_ids) for _, s in done))
        return out

    return run


def load_model(entry: Path, config: ServerConfig, metrics: ServerMetrics) -> ServedModel:
    """Load `entry` (model_repository/NAME/VERSION) and build its scheduler (not started).

    One Engine (one copy of the weights) is shared by `workers` runners: its translate_ids is safe to call
    from several threads and runs them in parallel. workers=0 takes the engine's measured choice for this
    machine (`Engine.workers`: one batch per core at one intra-op thread each, so every core decodes).
    Raises ValueError (from the engine) on a bad entry."""
    from service.engine import Engine, EngineConfig  # onnxruntime: imported only when serving

    engine_config = EngineConfig(provider=config.provider, intra_op_threads=config.intra_op_threads,
                                 inter_op_threads=config.inter_op_threads,
                                 max_batch_tokens=config.max_batch_tokens,
                                 max_batch_sentences=config.max_batch_sentences,
                                 cpu_memory_arena=config.cpu_memory_arena)
    engine = Engine.load(entry, engine_config)
    model_metrics = metrics.model(engine.name)
    runners = [make_runner(engine, model_metrics) for _ in range(config.workers or engine.workers)]
    scheduler = Scheduler(runners, SchedulerConfig(config.max_batch_sentences, config.max_batch_tokens,
                                                   config.max_wait_ms, config.max_queue_sentences,
                                                   config.max_batch_kv_bytes),
                          observer=model_metrics, name=engine.name,
                          on_idle=trim_memory if config.trim_memory_when_idle else None)
    manifest = dict(engine.manifest)
    metrics.model_info.labels(engine.name, engine.version, str(manifest.get("precision", "")), engine.provider,
                              str(manifest.get("source_lang", "")), str(manifest.get("target_lang", ""))).set(1)
    max_input = min(config.max_input_tokens, engine.max_source_tokens)
    return ServedModel(engine.name, str(engine.version), manifest, engine.provider, engine.tokenizer, engine,
                       scheduler, model_metrics, max_input)


# ---------------------------------------------------------------------------------------------------------
# Plain-Python service: validation, tokenization, scheduling


class Translator:
    """Translates with the loaded models; speaks plain Python. Raises ServiceError subclasses."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.models: dict[str, ServedModel] = {}  # by "NAME" and by "NAME/VERSION"
        self.default: ServedModel | None = None
        self.ready = False  # every model loaded and warmed up
        self.draining = False

    def add(self, model: ServedModel) -> None:
        self.models.setdefault(model.name, model)
        self.models[model.key] = model
        if self.default is None:
            self.default = model

    def loaded(self) -> list[ServedModel]:
        seen: dict[str, ServedModel] = {}
        for m in self.models.values():
            seen.setdefault(m.key, m)
        return list(seen.values())

    def resolve(self, name: str) -> ServedModel:
        """The model a request names ("" = default); ModelNotFound if it is not loaded."""
        if self.draining:
            raise Unavailable("the server is draining; retry on another replica")
        if not self.ready:
            raise Unavailable("models are still loading; retry shortly")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
            raise InvalidArgument(f"model name of {len(name)} characters is longer than {MAX_MODEL_NAME_BYTES} bytes")
        model = self.default if not name else self.models.get(name)
        if model is None:
            loaded = ", ".join(m.key for m in self.loaded()[:16])
            raise ModelNotFound(f"model {shown(name)} is not loaded; loaded models: {loaded}")
        return model

    async def prepare(self, model: ServedModel, sentences: Sequence[str], options: dict[str, Any],
                      stream: bool) -> tuple[DecodingOptions, list[list[int] | None], list[int]]:
        """(options, token ids per sentence (None: empty), KV-cache bound of each non-empty one)."""
        self.limits.check_count(len(sentences), stream)
        decoding = self.limits.decoding_options(options)
        self.limits.check_bytes(sentences)
        sources = await asyncio.to_thread(model.tokenize, sentences)  # never on the event loop
        self.limits.check_lengths(sources, model.max_input_tokens)
        kv = self.limits.check_cost(model, sources, decoding, stream)
        return decoding, sources, kv

    async def translate(self, model: ServedModel, sentences: Sequence[str], options: dict[str, Any],
                        deadline: float | None) -> Translation:
        """One SentenceTranslation per sentence, in order. Cancelling the awaiting task removes the
        request's queued sentences."""
        decoding, sources, kv = await self.prepare(model, sentences, options, stream=False)
        todo = [i for i, ids in enumerate(sources) if ids is not None]
        out: list[SentenceTranslation] = [_empty_translation() for _ in sources]
        if todo:
            ticket = model.scheduler.submit([sources[i] for i in todo], decoding, deadline,  # type: ignore[misc]
                                            kv_bytes=kv)
            try:
                outputs = await asyncio.gather(*ticket.futures, return_exceptions=True)
            finally:
                ticket.cancel()
            for i, o in zip(todo, outputs, strict=True):
                if isinstance(o, BaseException):
                    raise o
                out[i] = _with_timing(o)
        return Translation(out, model.name, model.version)

    async def translate_stream(self, model: ServedModel, sentences: Sequence[str], options: dict[str, Any],
                               deadline: float | None) -> AsyncGenerator[tuple[int, SentenceTranslation], None]:
        """(index, translation) as sentences finish. At most max_sentences_per_request of this call's
        sentences are queued at a time, so one long document cannot fill the queue; the first chunk
        raises QueueFull when the queue is full, later chunks wait for room."""
        decoding, sources, kv = await self.prepare(model, sentences, options, stream=True)
        for i, ids in enumerate(sources):
            if ids is None:
                yield i, _empty_translation()
        todo = [i for i, ids in enumerate(sources) if ids is not None]
        kv_of = dict(zip(todo, kv, strict=True))
        window = self.limits.max_sentences_per_request
        pending: dict[asyncio.Future[SentenceOutput], int] = {}  # type: ignore[type-arg]
        tickets: list[Ticket] = []
        first = True
        try:
            while todo or pending:
                room = window - len(pending)
                if todo and room > 0:
                    chunk, rest = todo[:room], todo[room:]
                    try:
                        ticket = model.scheduler.submit([sources[i] for i in chunk], decoding,  # type: ignore[misc]
                                                        deadline, kv_bytes=[kv_of[i] for i in chunk])
                    except QueueFull:
                        if first:
                            raise
                        if not pending:  # nothing of ours in flight: wait for room
                            await asyncio.sleep(model.scheduler.config.max_wait_ms / 1000 + 0.005)
                            continue
                    else:
                        todo, first = rest, False
                        tickets.append(ticket)
                        pending.update(zip(ticket.futures, chunk, strict=True))
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f]):
                    index = pending.pop(fut)
                    yield index, _with_timing(fut.result())
        finally:
            for ticket in tickets:
                ticket.cancel()


def _with_timing(output: SentenceOutput) -> SentenceTranslation:  # type: ignore[type-arg]
    t: SentenceTranslation = output.result
    return SentenceTranslation(t.hypotheses, t.finish_reason, t.source_tokens, output.queue_wait_s, output.compute_s)


# ---------------------------------------------------------------------------------------------------------
# The protobuf edge


def result_to_pb(t: SentenceTranslation, return_scores: bool) -> pb.TranslationResult:
    hyps = []
    for h in t.hypotheses:
        msg = pb.Hypothesis(text=h.text, token_ids=h.token_ids, tokens=h.tokens)
        if return_scores:
            msg.score, msg.log_prob = h.score, h.log_prob
        hyps.append(msg)
    return pb.TranslationResult(hypotheses=hyps, finish_reason=finish_reason_to_pb(t.finish_reason),
                                source_tokens=t.source_tokens)


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

    def bind(self, model: ServedModel) -> None:
        self.model = model.name
        self.bound = True
        self.metrics.requests_in_flight.labels(self.model).inc()

    def deadline(self) -> float | None:
        """The call's deadline on time.monotonic()'s clock; None without one."""
        if not hasattr(self, "_deadline"):
            remaining = self.context.time_remaining()
            self._deadline = None if remaining is None else time.monotonic() + remaining
        return self._deadline

    def _expired(self) -> bool:
        deadline = self.deadline()
        return deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S

    def _record(self, code: str) -> None:
        self.metrics.request_duration.labels(self.model, code).observe(time.perf_counter() - self.start)
        self.metrics.requests.labels(self.model, code).inc()
        if self.bound:
            self.metrics.requests_in_flight.labels(self.model).dec()
            self.bound = False

    async def __aenter__(self) -> _RpcScope:
        self.deadline()  # read it now: time_remaining() means nothing once the call has ended
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

    def _request(self, data: bytes | pb.TranslateRequest) -> pb.TranslateRequest:
        if isinstance(data, pb.TranslateRequest):  # called directly, not through `handlers()`
            return data
        return parse(pb.TranslateRequest, data, self.max_message_bytes)

    async def Translate(self, request: bytes | pb.TranslateRequest,  # type: ignore[override]  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        async with _RpcScope(self.metrics, context) as scope:
            request = self._request(request)
            model = self.translator.resolve(request.model)
            scope.bind(model)
            options = options_from_pb(request.options)
            out = await self.translator.translate(model, list(request.sentences), options, scope.deadline())
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
            request = self._request(request)
            model = self.translator.resolve(request.model)
            scope.bind(model)
            options = options_from_pb(request.options)
            return_scores = options.get("return_scores", True)
            stream = self.translator.translate_stream(model, list(request.sentences), options, scope.deadline())
            async with contextlib.aclosing(stream):
                async for index, t in stream:
                    yield pb.TranslateStreamResponse(
                        index=index, result=result_to_pb(t, return_scores), model=model.name,
                        model_version=model.version,
                        timing=pb.Timing(total_ms=(time.perf_counter() - scope.start) * 1000,
                                         queue_wait_ms=t.queue_wait_s * 1000, compute_ms=t.compute_s * 1000))

    async def ListModels(self, request: bytes | pb.ListModelsRequest,  # type: ignore[override]  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        if isinstance(request, bytes):
            try:
                parse(pb.ListModelsRequest, request, self.max_message_bytes)
            except ServiceError as err:
                await context.abort(*_status_of(err))
        default = self.translator.default
        return pb.ListModelsResponse(
            models=[model_info_to_pb(m) for m in self.translator.loaded()],
            default_model=default.key if default is not None else "")

    async def GetModel(self, request: bytes | pb.GetModelRequest,  # type: ignore[override]  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            msg = parse(pb.GetModelRequest, request, self.max_message_bytes) if isinstance(request, bytes) else request
            model = self.translator.resolve(msg.model)
        except ServiceError as err:
            code, message = _status_of(err)
            await context.abort(code, message)
        return model_info_to_pb(model)


# ---------------------------------------------------------------------------------------------------------
# Lifecycle


@dataclass(frozen=True)
class Endpoints:
    grpc_address: str  # host:port the gRPC server listens on
    metrics_url: str | None  # http://host:port/metrics, None when disabled


class RosettaServer:
    """One server process's worth of state; every instance has its own metrics registry.

        server = RosettaServer(config)
        await server.start()        # listening; health NOT_SERVING; Translate -> UNAVAILABLE
        await server.load_models()  # engines loaded and warmed up; health SERVING
        ...
        await server.drain()        # health NOT_SERVING; in-flight calls get drain_grace_s; stopped
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.translator = Translator(RequestLimits.from_config(config))
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def endpoints(self) -> Endpoints:
        host = self.config.host
        metrics_host = self.config.metrics_host or host
        url = None if self.metrics_port is None else f"http://{metrics_host}:{self.metrics_port}/metrics"
        return Endpoints(f"{host}:{self.port}", url)

    async def start(self) -> Endpoints:
        """Listen for gRPC (health NOT_SERVING, Translate UNAVAILABLE) and serve /metrics."""
        limit = self.config.max_message_bytes
        server = grpc.aio.server(options=[
            # gRPC core reads up to RECEIVE_HEADROOM x the limit, so that an over-size body reaches `parse`
            # and is answered and counted here; beyond that core refuses it unread (not counted).
            ("grpc.max_receive_message_length", RECEIVE_HEADROOM * limit),
            ("grpc.max_send_message_length", limit),
            # gRPC core's backlog of calls not yet taken by the event loop; past it core cancels calls
            # (soft limit: at random; hard limit: all), which no handler sees (ServerConfig.max_pending_calls)
            ("grpc.server.max_pending_requests", self.config.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.config.max_pending_calls),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ])
        server.add_generic_rpc_handlers((TranslatorServicer(self.translator, self.metrics, limit).handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls:
            credentials = server_credentials(self.config.tls_cert_file, self.config.tls_key_file,
                                             self.config.tls_client_ca_file)
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_host or self.config.host,
                                                        self.config.metrics_port)
        log.info("listening: gRPC %s, metrics %s", self.endpoints.grpc_address, self.endpoints.metrics_url)
        return self.endpoints

    async def load_models(self) -> list[ServedModel]:
        """Load every entry of config.models, start its scheduler, warm it up; then report SERVING.
        Raises FileNotFoundError / ValueError naming a missing or bad entry."""
        repository = Path(self.config.model_repository)
        loaded = []
        for spec in self.config.model_specs():
            entry = spec.resolve(repository)
            started = time.perf_counter()
            model = await asyncio.to_thread(load_model, entry, self.config, self.metrics)
            model.scheduler.start()
            if self.config.warmup:
                await self._warm_up(model)
            self.translator.add(model)
            loaded.append(model)
            log.info("loaded %s (%s, %s) from %s in %.1fs", model.key, model.manifest.get("precision"),
                     model.provider, entry, time.perf_counter() - started)
        self.translator.ready = True
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return loaded

    async def _warm_up(self, model: ServedModel) -> None:
        """Decode greedily and with beam search on `workers` threads at once, so the first requests do not
        pay for ONNX Runtime's lazy initialisation. Not observed by the metrics."""
        ids = model.tokenizer.encode(WARMUP_TEXT)[: self.config.max_input_tokens]
        sources = [ids, ids[: max(1, len(ids) // 2)]]
        for options in (DecodingOptions(beam_size=1, max_decoding_length=8),
                        DecodingOptions(beam_size=min(4, self.config.max_beam_size), max_decoding_length=8)):
            await asyncio.gather(*(asyncio.to_thread(model.engine.translate_ids, sources, options)
                                   for _ in range(model.scheduler.workers)))

    async def drain(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING; keep serving for drain_delay_s; stop accepting calls and give the ones in
        flight `grace_s` (default drain_grace_s) to finish; then stop schedulers and /metrics."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        self.translator.draining = True  # calls already past resolve() still finish
        if self._server is not None:
            # After `grace` gRPC cancels the calls still running; their sentences leave their batches at
            # the next decoder step. gRPC's own stop is bounded too, so the process exits whatever is stuck.
            stopping = asyncio.ensure_future(self._server.stop(grace))
            done, _ = await asyncio.wait({stopping}, timeout=grace + STOP_SLACK_S)
            if not done:
                log.error("gRPC server still stopping %.0fs after the grace period; going on", STOP_SLACK_S)
        for model in self.translator.loaded():
            await model.scheduler.close(timeout_s=STOP_SLACK_S)  # running batches stop at their next step
        self.metrics.close()
        log.info("drained and stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def trim_memory() -> bool:
    """glibc only: give the heap's free memory back to the OS (malloc_trim). Freed K/V of a big batch
    otherwise stays in glibc's heaps: two heavy calls left a server at 417 MiB for good, against 166 MiB
    before them (benchmarks/heavy_request.py). False where unsupported."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


async def serve(config: ServerConfig, announce: Callable[[str], None] = print) -> int:
    """Run a server until SIGTERM or SIGINT, then drain; returns the process exit status (0 after a
    clean drain, 1 when a model fails to load). `announce` gets the human-readable lines."""
    server = RosettaServer(config)
    try:
        endpoints = await server.start()
    except (OSError, ValueError) as start_error:  # a taken port, an unreadable TLS file ...
        announce(f"rosetta serve: cannot start: {start_error}")
        return 1
    metrics = endpoints.metrics_url or "disabled"
    announce(f"rosetta serve: gRPC on {endpoints.grpc_address} (health, reflection), metrics {metrics}; "
             f"loading {config.models} from {config.model_repository}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.load_models())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loading.done() and loading.exception() is not None:
        err = loading.exception()
        log.error("cannot load models: %s", err)
        announce(f"rosetta serve: cannot load models: {err}")
        status = 1
    elif loading.done():
        models = ", ".join(f"{m.key} ({m.manifest.get('precision')}, {m.provider})" for m in loading.result())
        announce(f"rosetta serve: SERVING {models} on {endpoints.grpc_address}")
        await stopping
    else:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    stopping.cancel()
    announce("rosetta serve: draining")
    await server.drain()
    announce("rosetta serve: stopped")
    return status
