"""A small Python client for a Rosetta server, and the `rosetta translate --server HOST:PORT` mode.

    from service.client import TranslatorClient
    with TranslatorClient("localhost:50051") as client:
        client.wait_until_serving()
        [result] = client.translate(["Ein Hund läuft im Schnee."], options={"beam_size": 4})
        print(result.text)                 # best hypothesis
        for index, result in client.translate_stream(document_lines):
            ...                            # as sentences finish, tagged with their index
        for index, event in client.translate_stream_prefixes(lines):   # a server with scheduler=loop
            ...                            # str: the words agreed so far; ClientResult: the final result

Over TLS (a server started with `--tls-cert-file` / `--tls-key-file`), pass `tls=ClientTLS(...)`:

    TranslatorClient("rosetta.example.com:50051", tls=ClientTLS(ca_file="ca.pem"))            # TLS
    TranslatorClient(target, tls=ClientTLS("ca.pem", cert_file="me.pem", key_file="me.key"))  # mutual TLS
    TranslatorClient(target, tls=ClientTLS())                                                # the system's CAs

Failures surface as `grpc.RpcError` (`.code()`, `.details()`), the server's status unchanged; a server that
cannot be reached, or whose TLS handshake fails, is UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import gzip
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.options import DecodingOptions
from service.proto import translate_pb2 as pb
from service.proto import translate_pb2_grpc as pb_grpc
from service.tls import channel_credentials
from service.wire import finish_reason_from_pb, options_to_pb

DEFAULT_TARGET = "localhost:50051"
SERVICE_NAME = "rosetta.v1.Translator"
Options = DecodingOptions | dict[str, Any] | None
"""A DecodingOptions (every field sent) or a dict of some of its fields (the rest: server defaults)."""


@dataclass(frozen=True)
class ClientHypothesis:
    text: str
    score: float | None  # None when return_scores was false
    log_prob: float | None
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class ClientResult:
    """The translation of one sentence as the server returned it."""

    hypotheses: list[ClientHypothesis]  # best first
    finish_reason: str  # "eos", "length", "deadline" or "empty"
    source_tokens: int
    beam_size: int = 0  # the beam it ran with (smaller than asked when reduced under overload); 0: empty

    @property
    def text(self) -> str:
        """The best hypothesis."""
        return self.hypotheses[0].text if self.hypotheses else ""

    @classmethod
    def from_pb(cls, msg: pb.TranslationResult) -> ClientResult:
        hyps = [ClientHypothesis(h.text, h.score if h.HasField("score") else None,
                                 h.log_prob if h.HasField("log_prob") else None, list(h.token_ids), list(h.tokens))
                for h in msg.hypotheses]
        return cls(hyps, finish_reason_from_pb(msg.finish_reason), msg.source_tokens, msg.beam_size)


@dataclass(frozen=True)
class ClientTLS:
    """TLS of a client channel; a `TranslatorClient` given one connects over TLS, without one in plaintext.
    Files are PEM, read when the channel is made (ValueError naming the file when unreadable)."""

    ca_file: str = ""  # CA bundle that verifies the server's certificate; "": the system's trusted roots
    cert_file: str = ""  # client certificate chain, for a server that requires one (mTLS); with key_file
    key_file: str = ""  # its private key
    server_name: str = ""  # name checked against the server's certificate; "": the host of the target

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca_file, self.cert_file, self.key_file)


def request_pb(sentences: Sequence[str], model: str = "", options: Options = None) -> pb.TranslateRequest:
    return pb.TranslateRequest(sentences=list(sentences), model=model, options=options_to_pb(options))


class TranslatorClient:
    """Blocking client over one channel. `timeout_s` is the default deadline of every call; `tls` makes
    the channel a TLS one (None: plaintext)."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout_s: float | None = 60.0,
                 max_message_bytes: int = 4 * 1024 * 1024, tls: ClientTLS | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self.stub = pb_grpc.TranslatorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> TranslatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def translate(self, sentences: Sequence[str], model: str = "", options: Options = None,
                  timeout_s: float | None = None) -> list[ClientResult]:
        """One result per sentence, in order."""
        reply = self.stub.Translate(request_pb(sentences, model, options), timeout=timeout_s or self.timeout_s)
        return [ClientResult.from_pb(r) for r in reply.results]

    def translate_stream(self, sentences: Sequence[str], model: str = "", options: Options = None,
                         timeout_s: float | None = None) -> Iterator[tuple[int, ClientResult]]:
        """(index, result) as the server finishes sentences (any order)."""
        for index, event in self.translate_stream_prefixes(sentences, model, options, timeout_s, prefixes=False):
            assert isinstance(event, ClientResult)
            yield index, event

    def translate_stream_prefixes(self, sentences: Sequence[str], model: str = "", options: Options = None,
                                  timeout_s: float | None = None,
                                  prefixes: bool = True) -> Iterator[tuple[int, ClientResult | str]]:
        """TranslateStream with stream_prefix: (index, text so far) each time the words every hypothesis of a
        sentence agrees on grow, then (index, result) when it is finished (sentences in any order)."""
        request = request_pb(sentences, model, options)
        request.stream_prefix = prefixes
        for msg in self.stub.TranslateStream(request, timeout=timeout_s or self.timeout_s):
            yield msg.index, (ClientResult.from_pb(msg.result) if msg.HasField("result") else msg.prefix)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    def health_status(self, service: str = SERVICE_NAME) -> str:
        """"SERVING", "NOT_SERVING", ... of the server's grpc.health.v1 service."""
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout_s: float = 120.0, service: str = SERVICE_NAME) -> None:
        """Block until health reports SERVING; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health_status(service)
                if last == "SERVING":
                    return
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)
        raise TimeoutError(f"{self.target} not SERVING after {timeout_s:.0f}s (last: {last})")


def format_result(index: int, result: ClientResult, n_best: bool, with_scores: bool) -> list[str]:
    """Output lines of one sentence, as the local `rosetta translate` prints them: the best text (with
    `SCORE<TAB>` in front when with_scores), or with n_best one `INDEX ||| TEXT ||| SCORE` line per
    hypothesis (Moses n-best format)."""
    if n_best:
        return [f"{index} ||| {h.text} ||| {(h.score or 0.0):.6f}" for h in result.hypotheses]
    best = result.hypotheses[0] if result.hypotheses else None
    if with_scores and best is not None and best.score is not None:
        return [f"{best.score:.6f}\t{best.text}"]
    return [result.text]


def translate_lines(target: str, lines: Iterable[str], out: TextIO = sys.stdout, model: str = "",
                    options: Options = None, batch_sentences: int = 64, timeout_s: float | None = 60.0,
                    with_scores: bool = False, tls: ClientTLS | None = None) -> int:
    """Translate `lines` (one sentence each) on the server at `target` (over TLS when `tls` is given),
    `batch_sentences` per call, and write them to `out` in order (format_result; n-best lines when options
    ask for num_hypotheses > 1). Returns the number of sentences translated. Raises grpc.RpcError on a
    failed call."""
    given = options.__dict__ if isinstance(options, DecodingOptions) else (options or {})
    n_best = int(given.get("num_hypotheses", 1)) > 1
    done = 0
    with TranslatorClient(target, timeout_s, tls=tls) as client:
        batch: list[str] = []

        def flush() -> None:
            nonlocal done
            if not batch:
                return
            for i, result in enumerate(client.translate(batch, model, options)):
                for line in format_result(done + i, result, n_best, with_scores):
                    out.write(line + "\n")
            out.flush()
            done += len(batch)
            batch.clear()

        for line in lines:
            batch.append(line.rstrip("\n"))
            if len(batch) >= batch_sentences:
                flush()
        flush()
    return done


def translate_command(target: str, sentences: Sequence[str] = (), input_path: str = "-", output_path: str = "-",
                      options: Options = None, model: str = "", timeout_s: float | None = 60.0,
                      batch_sentences: int = 64, with_scores: bool = False, tls: ClientTLS | None = None) -> int:
    """The body of `rosetta translate --server HOST:PORT`: the given sentences, else the lines of
    `input_path` (- for stdin, .gz ok), translated on the server (over TLS when `tls` is given) and written
    to `output_path` (- for stdout). Returns the exit status: 0, or 1 after printing the failed call's gRPC
    status (or an unreadable TLS file) to stderr."""
    if tls is not None:
        try:
            tls.credentials()  # an unreadable or non-PEM file fails here, before any input is read
        except ValueError as err:
            print(f"rosetta translate: {err}", file=sys.stderr)
            return 1
    with contextlib.ExitStack() as stack:
        if sentences:
            lines: Iterable[str] = sentences
        elif input_path == "-":
            lines = sys.stdin
        else:
            opener: Any = gzip.open if input_path.endswith(".gz") else open
            lines = stack.enter_context(opener(input_path, "rt", encoding="utf-8"))
        out = sys.stdout if output_path == "-" else stack.enter_context(open(output_path, "w", encoding="utf-8"))
        try:
            translate_lines(target, lines, out, model, options, batch_sentences, timeout_s, with_scores, tls)
        except grpc.RpcError as err:
            print(f"rosetta translate: {target}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0
