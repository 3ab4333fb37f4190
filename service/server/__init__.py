"""The gRPC server: `rosetta.v1.Translator` on grpc.aio, with health, reflection, metrics and drain.

One file per stage of a request's way, outside in:

    servicer.py    the protobuf edge: parse, status mapping (`_RpcScope`), request metrics, responses
    validation.py  options, sizes and cost against the ServerConfig limits (INVALID_ARGUMENT)
    translator.py  plain Python: validate -> tokenize -> schedule -> results (no protobuf)
    models.py      the served models: one loaded entry's engine, tokenizer, scheduler and metrics
    loop_scheduler.py  scheduler=loop (the default): decode loops that sentences join and leave between two
                   steps, whatever their options; streamed prefixes, overload beams
    scheduler.py   scheduler=batch (kept to measure the loop against): batches sentences of equal options
    results.py     what a call gives back, before the servicer turns it into protobuf
    app.py         lifecycle: listen (health NOT_SERVING) -> load + warm up (SERVING) -> drain

Defined results (see protos/translate.proto): an empty or whitespace-only sentence is not sent to the
engine; it gets one empty hypothesis (score 0) with finish reason "empty" and source_tokens 0.
"""

from __future__ import annotations

from service.server.app import HEALTH_SERVICES, SERVICE_NAME, WARMUP_TEXT, Endpoints, RosettaServer, serve
from service.server.models import ServedModel, load_model, make_runner, trim_memory
from service.server.results import SentenceTranslation, ServedHypothesis, Translation
from service.server.servicer import TranslatorServicer
from service.server.translator import Translator
from service.server.validation import RequestLimits

__all__ = ["HEALTH_SERVICES", "SERVICE_NAME", "WARMUP_TEXT", "Endpoints", "RequestLimits", "RosettaServer",
           "SentenceTranslation", "ServedHypothesis", "ServedModel", "Translation", "Translator",
           "TranslatorServicer", "load_model", "make_runner", "serve", "trim_memory"]
