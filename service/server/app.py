"""The server's lifecycle: listen (health NOT_SERVING) -> load and warm up models (SERVING) -> drain on
SIGTERM, with the hard bounds of ServerConfig.drain_grace_s."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig
from service.metrics import ServerMetrics
from service.options import DecodingOptions
from service.server.models import ServedModel, load_model
from service.server.servicer import SERVICE_NAME, TranslatorServicer
from service.server.translator import Translator
from service.server.validation import RequestLimits
from service.tls import server_credentials

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)  # overall health and the Translator service
WARMUP_TEXT = "Ein Mann fährt mit dem Fahrrad die Straße entlang."  # any text works; German is the default pair
STOP_SLACK_S = 5.0  # drain: how long past the grace period stopping may take before it is cut short
RECEIVE_HEADROOM = 2  # gRPC core's receive limit, in multiples of max_message_bytes (RosettaServer.start)


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
        if self.config.drain_delay_s <= 0:  # no delay: refuse new calls before anything awaits
            self.translator.draining = True
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
