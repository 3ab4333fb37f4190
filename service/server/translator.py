"""The translator: validate -> tokenize -> schedule -> results, in plain Python (no protobuf). Raises
ServiceError subclasses, which the servicer maps to statuses."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from service.engine.loop import Prefix
from service.errors import FailedPrecondition, InvalidArgument, ModelNotFound, QueueFull, Unavailable
from service.options import DecodingOptions
from service.server.loop_scheduler import LoopScheduler
from service.server.models import ServedModel
from service.server.results import SentenceTranslation, Translation, empty_translation
from service.server.scheduler import (
    SentenceOutput,
    Ticket,
)
from service.server.validation import MAX_MODEL_NAME_BYTES, RequestLimits, shown


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
        out: list[SentenceTranslation] = [empty_translation() for _ in sources]
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
                               deadline: float | None, stream_prefix: bool = False,
                               ) -> AsyncGenerator[tuple[int, SentenceTranslation | str], None]:
        """(index, translation) as sentences finish; with `stream_prefix` also (index, prefix text) before
        that, each time the words every hypothesis of the sentence agrees on grow (`whole_words`). At most
        max_sentences_per_request of this call's sentences are queued at a time, so one long document
        cannot fill the queue; the first chunk raises QueueFull when the queue is full, later chunks wait
        for room."""
        if stream_prefix and not isinstance(model.scheduler, LoopScheduler):
            raise FailedPrecondition("stream_prefix needs the step-level scheduler, and this server runs the "
                                     "request-level one (ServerConfig.scheduler='batch')")
        decoding, sources, kv = await self.prepare(model, sentences, options, stream=True)
        for i, ids in enumerate(sources):
            if ids is None:
                yield i, empty_translation()
        todo = [i for i, ids in enumerate(sources) if ids is not None]
        kv_of = dict(zip(todo, kv, strict=True))
        window = self.limits.max_sentences_per_request
        events: asyncio.Queue[tuple[int, asyncio.Future[SentenceOutput] | Prefix]] = asyncio.Queue()  # type: ignore[type-arg]
        in_flight = 0
        shown_prefix: dict[int, str] = {}
        tickets: list[Ticket] = []
        first = True

        try:
            while todo or in_flight:
                room = window - in_flight
                if todo and room > 0:
                    chunk, rest = todo[:room], todo[room:]
                    extra = ({"on_prefix": [functools.partial(_put_index, events, i) for i in chunk]}
                             if stream_prefix else {})
                    try:
                        ticket = model.scheduler.submit([sources[i] for i in chunk], decoding,  # type: ignore[misc]
                                                        deadline, kv_bytes=[kv_of[i] for i in chunk], **extra)
                    except QueueFull:
                        if first:
                            raise
                        if not in_flight:  # nothing of ours in flight: wait for room
                            await asyncio.sleep(model.scheduler.config.max_wait_ms / 1000 + 0.005)
                            continue
                    else:
                        todo, first = rest, False
                        tickets.append(ticket)
                        in_flight += len(chunk)
                        for fut, i in zip(ticket.futures, chunk, strict=True):
                            fut.add_done_callback(functools.partial(_put_index, events, i))
                index, event = await events.get()
                if isinstance(event, Prefix):  # a grown agreed prefix
                    text = model.tokenizer.decode(event.tokens)
                    if event.following is None or not all(map(model.tokenizer.starts_word, event.following)):
                        text = whole_words(text)  # its last word may still grow
                    if len(text) > len(shown_prefix.get(index, "")):
                        shown_prefix[index] = text
                        yield index, text
                    continue
                in_flight -= 1
                yield index, _with_timing(event.result())
        finally:
            for ticket in tickets:
                ticket.cancel()


def _put_index(events: asyncio.Queue[Any], index: int, event: Any) -> None:
    events.put_nowait((index, event))


def _with_timing(output: SentenceOutput) -> SentenceTranslation:  # type: ignore[type-arg]
    t: SentenceTranslation = output.result
    return SentenceTranslation(t.hypotheses, t.finish_reason, t.source_tokens, output.queue_wait_s, output.compute_s,
                               output.beam_size)


_LAST_WORD = re.compile(r"\s+\S*\Z")


def whole_words(text: str) -> str:
    """The words of `text` that are complete: all but the last, which the next token may still extend
    (all of them when `text` ends with a space)."""
    match = _LAST_WORD.search(text)
    return text[: match.start()] if match else ""
