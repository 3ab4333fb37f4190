"""Prometheus metrics of one server instance, on their own HTTP port at /metrics (any other path: 404).

Every instance owns a `CollectorRegistry`, so several servers can live in one process (the tests start
many). The names below are a contract with deploy/ (recording rules, alerts, Grafana dashboard):
rename none of them. Latencies are in seconds, sizes in sentences or tokens (base units).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENCODER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SENTENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
STEP_ROW_CLASSES = (8, 32, 128, 512)  # rosetta_decoder_step_by_rows_seconds: rows="<=8", ..., rows=">512"
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
METRICS_PATH = "/metrics"  # the only path the listener answers; deploy/ scrapes it

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ServerMetrics:
    """All metric families of one server; labels: `model` is the loaded model's name (or "unknown"
    for a request naming no loaded model), `code` the gRPC status name (OK, INVALID_ARGUMENT, ...)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "rosetta_request_duration_seconds", "Time from arrival to response of a Translate/TranslateStream call.",
            ["model", "code"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter(
            "rosetta_requests", "Translate/TranslateStream calls answered, by gRPC status.",
            ["model", "code"], registry=r)
        self.queue_wait = Histogram(
            "rosetta_queue_wait_seconds", "Time a sentence waited in the scheduler queue before its batch ran.",
            ["model"], buckets=QUEUE_BUCKETS_S, registry=r)
        self.encoder_duration = Histogram(
            "rosetta_encoder_duration_seconds", "Encoder session run time, once per engine batch.",
            ["model"], buckets=ENCODER_BUCKETS_S, registry=r)
        self.decoder_step_duration = Histogram(
            "rosetta_decoder_step_duration_seconds", "Decoder session run time of one beam-search step.",
            ["model"], buckets=STEP_BUCKETS_S, registry=r)
        self.batch_size_sentences = Histogram(
            "rosetta_batch_size_sentences", "Sentences per engine batch.",
            ["model"], buckets=SENTENCE_BUCKETS, registry=r)
        self.batch_size_tokens = Histogram(
            "rosetta_batch_size_tokens", "Padded source tokens per engine batch (sentences x longest, eos included).",
            ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.batch_padding_ratio = Histogram(
            "rosetta_batch_padding_ratio", "Share of an engine batch's source tokens that are padding.",
            ["model"], buckets=RATIO_BUCKETS, registry=r)
        self.input_tokens = Counter(
            "rosetta_input_tokens", "Source subword tokens translated (eos excluded).", ["model"], registry=r)
        self.output_tokens = Counter(
            "rosetta_output_tokens", "Target subword tokens generated, best hypotheses (eos excluded).",
            ["model"], registry=r)
        self.requests_in_flight = Gauge(
            "rosetta_requests_in_flight", "Translate/TranslateStream calls being served now.", ["model"], registry=r)
        self.queue_depth = Gauge(
            "rosetta_queue_depth_sentences", "Sentences waiting in the scheduler queue.", ["model"], registry=r)
        self.queue_capacity = Gauge(
            "rosetta_queue_capacity_sentences", "Scheduler queue capacity (max_queue_sentences).",
            ["model"], registry=r)
        self.dropped_sentences = Counter(
            "rosetta_dropped_sentences", "Sentences removed unfinished, from the queue or from a running batch at the "
            "next decoder step, by reason: deadline_exceeded, cancelled (the caller left), shutdown.",
            ["model", "reason"], registry=r)
        self.decoder_step_rows = Histogram(
            "rosetta_decoder_step_rows", "Hypothesis rows (sentences x beams) of one decoder step.",
            ["model"], buckets=ROW_BUCKETS, registry=r)
        self.live_rows = Gauge(
            "rosetta_live_rows", "Rows in the running decode loops (scheduler=loop), after their last step.",
            ["model"], registry=r)
        self.loop_admitted = Counter(
            "rosetta_loop_admitted_sentences", "Sentences admitted into a running decode loop (scheduler=loop).",
            ["model"], registry=r)
        self.loop_finished = Counter(
            "rosetta_loop_finished_sentences", "Sentences that finished in a decode loop (scheduler=loop).",
            ["model"], registry=r)
        self.decoder_step_by_rows = Histogram(
            "rosetta_decoder_step_by_rows_seconds", "Decoder session run time of one step, by its rows (sentences "
            "x beams) in classes: <=8, <=32, <=128, <=512, >512.", ["model", "rows"], buckets=STEP_BUCKETS_S,
            registry=r)
        self.kv_cache_bytes = Gauge(
            "rosetta_kv_cache_bytes", "K/V of the running decode loops (scheduler=loop): kind=allocated, the bytes "
            "their caches and cross-attention K/V hold; kind=reserved, the KV-cache bounds of their sentences, "
            "which admission keeps within rosetta_kv_cache_budget_bytes.", ["model", "kind"], registry=r)
        self.kv_cache_budget = Gauge(
            "rosetta_kv_cache_budget_bytes", "KV-cache budget of the decode loops (max_batch_kv_bytes x workers).",
            ["model"], registry=r)
        self.beam_reduced = Counter(
            "rosetta_beam_reduced_sentences", "Sentences admitted with their request's smaller overload_beam_size "
            "because they queued longer than overload_queue_wait_ms (scheduler=loop).", ["model"], registry=r)
        self.time_to_first_word = Histogram(
            "rosetta_time_to_first_word_seconds", "TranslateStream with stream_prefix: time from the call's arrival "
            "to a sentence's first streamed word.", ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.model_info = Gauge(
            "rosetta_model_info", "A loaded model (always 1).",
            ["model", "version", "precision", "provider", "source_lang", "target_lang"], registry=r)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def model(self, name: str) -> ModelMetrics:
        """The per-model view handed to that model's scheduler and engine observer. The decode-loop series
        start at 0 whichever scheduler runs, so dashboards and alerts find them from the first scrape."""
        self.live_rows.labels(name).set(0)
        self.loop_admitted.labels(name)
        self.loop_finished.labels(name)
        self.beam_reduced.labels(name)
        self.time_to_first_word.labels(name)
        for kind in ("allocated", "reserved"):
            self.kv_cache_bytes.labels(name, kind).set(0)
        self.kv_cache_budget.labels(name).set(0)
        return ModelMetrics(self, name)

    def serve_http(self, host: str, port: int) -> int:
        """Start the HTTP listener on a daemon thread; returns the bound port (port 0: a free one).

        GET and HEAD of /metrics (query strings such as `?name[]=...` included) answer with the registry's
        metrics; any other path answers 404. One thread per request; no access log line per request."""
        family, addr = _address_family(host, port)
        server_class = type("MetricsHTTPServer", (_MetricsHTTPServer,), {"address_family": family})
        self._http = make_server(addr, port, metrics_only_app(make_wsgi_app(self.registry)), server_class,
                                 handler_class=_SilentHandler)
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="rosetta-metrics-http",
                                             daemon=True)
        self._http_thread.start()
        return int(self._http.server_address[1])

    def close(self) -> None:
        """Stop the HTTP listener, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
            self._http_thread = None


def metrics_only_app(metrics_app: WsgiApp) -> WsgiApp:
    """Wrap prometheus_client's WSGI app (which answers every path) so only METRICS_PATH reaches it.

    HEAD is answered as GET without the body (prometheus_client answers HEAD with 405)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            body = b"404 Not Found: metrics are served at " + METRICS_PATH.encode() + b"\n"
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("REQUEST_METHOD") == "HEAD":  # GET's status and headers, Content-Length included
            answer: list[Any] = []
            body = b"".join(metrics_app({**environ, "REQUEST_METHOD": "GET"},
                                        lambda status, headers, exc_info=None: answer.extend((status, headers))))
            headers = [(k, v) for k, v in answer[1] if k.lower() != "content-length"]
            start_response(answer[0], [*headers, ("Content-Length", str(len(body)))])
            return []
        return metrics_app(environ, start_response)

    return app


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """One thread per request; the request threads do not keep the process alive."""

    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    """No access log line per request (a scrape every few seconds would flood stderr)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _address_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """(family, address) to bind `host`: IPv6 hosts such as "::" need AF_INET6."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


def row_class(rows: int) -> str:
    """The `rows` label of rosetta_decoder_step_by_rows_seconds for a step of `rows` rows."""
    for bound in STEP_ROW_CLASSES:
        if rows <= bound:
            return f"<={bound}"
    return f">{STEP_ROW_CLASSES[-1]}"


@dataclass(frozen=True)
class ModelMetrics:
    """Metrics bound to one model: the scheduler records batches and queue state through it, and it is the
    engine's `observer` (on_encoder / on_decoder_step are called from executor threads; prometheus-client
    is thread-safe)."""

    metrics: ServerMetrics
    model: str

    def on_encoder(self, seconds: float) -> None:
        self.metrics.encoder_duration.labels(self.model).observe(seconds)

    def on_decoder_step(self, seconds: float, rows: int) -> None:
        self.metrics.decoder_step_duration.labels(self.model).observe(seconds)
        self.metrics.decoder_step_rows.labels(self.model).observe(rows)
        self.metrics.decoder_step_by_rows.labels(self.model, row_class(rows)).observe(seconds)

    def on_kv_cache(self, allocated: int, reserved: int, budget: int) -> None:
        m = self.metrics
        m.kv_cache_bytes.labels(self.model, "allocated").set(allocated)
        m.kv_cache_bytes.labels(self.model, "reserved").set(reserved)
        m.kv_cache_budget.labels(self.model).set(budget)

    def on_beam_reduced(self, sentences: int) -> None:
        self.metrics.beam_reduced.labels(self.model).inc(sentences)

    def on_first_word(self, seconds: float) -> None:
        self.metrics.time_to_first_word.labels(self.model).observe(seconds)

    def on_loop(self, admitted: int, finished: int, live_rows: int) -> None:
        """One step of a decode loop (scheduler=loop): sentences that joined and left, rows after it."""
        m = self.metrics
        if admitted:
            m.loop_admitted.labels(self.model).inc(admitted)
        if finished:
            m.loop_finished.labels(self.model).inc(finished)
        m.live_rows.labels(self.model).set(live_rows)

    def on_batch(self, sentences: int, real_tokens: int, padded_tokens: int) -> None:
        m = self.metrics
        m.batch_size_sentences.labels(self.model).observe(sentences)
        m.batch_size_tokens.labels(self.model).observe(padded_tokens)
        m.batch_padding_ratio.labels(self.model).observe(1.0 - real_tokens / padded_tokens if padded_tokens else 0.0)

    def on_queue_wait(self, seconds: float) -> None:
        self.metrics.queue_wait.labels(self.model).observe(seconds)

    def on_tokens(self, input_tokens: int, output_tokens: int) -> None:
        self.metrics.input_tokens.labels(self.model).inc(input_tokens)
        self.metrics.output_tokens.labels(self.model).inc(output_tokens)

    def on_dropped(self, reason: str, sentences: int = 1) -> None:
        self.metrics.dropped_sentences.labels(self.model, reason).inc(sentences)

    def set_queue(self, depth: int, capacity: int) -> None:
        self.metrics.queue_depth.labels(self.model).set(depth)
        self.metrics.queue_capacity.labels(self.model).set(capacity)
