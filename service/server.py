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
from service.errors import InvalidArgument, ModelNotFound, QueueFull, ServiceError, Unavailable
from service.metrics import ModelMetrics, ServerMetrics
from service.options import DecodingOptions, TranslationResult
from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc
from service.scheduler import BatchRunner, Scheduler, SchedulerConfig, SentenceOutput, Ticket
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


@dataclass(frozen=True)
class RequestLimits:
    max_sentences_per_request: int
    max_sentences_per_stream: int
    max_input_tokens: int
    max_beam_size: int
    max_output_tokens: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> RequestLimits:
        return cls(config.max_sentences_per_request, config.max_sentences_per_stream, config.max_input_tokens,
                   config.max_beam_size, config.max_output_tokens)

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

    def run(sources: list[list[int]], options: DecodingOptions) -> list[SentenceTranslation]:
        results: list[TranslationResult] = engine.translate_ids(sources, options, observer=observer)
        out: list[SentenceTranslation] = []
        for ids, res in zip(sources, results, strict=True):
            hyps = [ServedHypothesis(h.text, list(h.tokens),
                                     [tokenizer.id_to_token(t) for t in h.tokens], h.score, h.log_prob)
                    for h in res.hypotheses]
            out.append(SentenceTranslation(hyps, res.finish_reason, len(ids)))
        observer.on_tokens(sum(len(ids) for ids in sources), sum(len(s.hypotheses[0].token_ids) for s in out))
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
                                 max_batch_sentences=config.max_batch_sentences)
    engine = Engine.load(entry, engine_config)
    model_metrics = metrics.model(engine.name)
    runners = [make_runner(engine, model_metrics) for _ in range(config.workers or engine.workers)]
    scheduler = Scheduler(runners, SchedulerConfig(config.max_batch_sentences, config.max_batch_tokens,
                                                   config.max_wait_ms, config.max_queue_sentences),
                          observer=model_metrics, name=engine.name)
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
        model = self.default if not name else self.models.get(name)
        if model is None:
            loaded = ", ".join(m.key for m in self.loaded())
            raise ModelNotFound(f"model {name!r} is not loaded; loaded models: {loaded}")
        return model

    async def prepare(self, model: ServedModel, sentences: Sequence[str], options: dict[str, Any],
                      stream: bool) -> tuple[DecodingOptions, list[list[int] | None]]:
        self.limits.check_count(len(sentences), stream)
        decoding = self.limits.decoding_options(options)
        if len(sentences) > 64:  # keep long documents from holding the event loop
            sources = await asyncio.to_thread(model.tokenize, sentences)
        else:
            sources = model.tokenize(sentences)
        self.limits.check_lengths(sources, model.max_input_tokens)
        return decoding, sources

    async def translate(self, model: ServedModel, sentences: Sequence[str], options: dict[str, Any],
                        deadline: float | None) -> Translation:
        """One SentenceTranslation per sentence, in order. Cancelling the awaiting task removes the
        request's queued sentences."""
        decoding, sources = await self.prepare(model, sentences, options, stream=False)
        todo = [i for i, ids in enumerate(sources) if ids is not None]
        out: list[SentenceTranslation] = [_empty_translation() for _ in sources]
        if todo:
            ticket = model.scheduler.submit([sources[i] for i in todo], decoding, deadline)  # type: ignore[misc]
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
        decoding, sources = await self.prepare(model, sentences, options, stream=True)
        for i, ids in enumerate(sources):
            if ids is None:
                yield i, _empty_translation()
        todo = [i for i, ids in enumerate(sources) if ids is not None]
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
                                                        deadline)
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
    """The one mapping from an exception to a gRPC status and message."""
    if isinstance(err, ServiceError):
        return grpc.StatusCode[err.status], str(err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


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
        remaining = self.context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

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
            remaining = self.context.time_remaining()
            self._record("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
            return False
        code, message = _status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", self.model, message, exc_info=not isinstance(exc, ServiceError))
        self._record(code.name)
        await self.context.abort(code, message)
        return False  # not reached: abort raises


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """rosetta.v1.Translator: protobuf in, plain Python through `Translator`, protobuf out."""

    def __init__(self, translator: Translator, metrics: ServerMetrics) -> None:
        self.translator = translator
        self.metrics = metrics

    async def Translate(self, request: pb.TranslateRequest,  # noqa: N802 (gRPC method name)
                        context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        async with _RpcScope(self.metrics, context) as scope:
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

    async def TranslateStream(self, request: pb.TranslateRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TranslateStreamResponse]:
        async with _RpcScope(self.metrics, context) as scope:
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

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        default = self.translator.default
        return pb.ListModelsResponse(
            models=[model_info_to_pb(m) for m in self.translator.loaded()],
            default_model=default.key if default is not None else "")

    async def GetModel(self, request: pb.GetModelRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            model = self.translator.resolve(request.model)
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
        url = None if self.metrics_port is None else f"http://{host}:{self.metrics_port}/metrics"
        return Endpoints(f"{host}:{self.port}", url)

    async def start(self) -> Endpoints:
        """Listen for gRPC (health NOT_SERVING, Translate UNAVAILABLE) and serve /metrics."""
        limit = self.config.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ])
        pb_grpc.add_TranslatorServicer_to_server(TranslatorServicer(self.translator, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
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
            await self._server.stop(grace)
        for model in self.translator.loaded():
            await model.scheduler.close()
        self.metrics.close()
        log.info("drained and stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: ServerConfig, announce: Callable[[str], None] = print) -> int:
    """Run a server until SIGTERM or SIGINT, then drain; returns the process exit status (0 after a
    clean drain, 1 when a model fails to load). `announce` gets the human-readable lines."""
    server = RosettaServer(config)
    endpoints = await server.start()
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
