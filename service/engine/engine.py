"""The inference engine: batched greedy/beam search with a KV cache on ONNX Runtime. Torch-free.

    engine = Engine.load("models/model_repository/de-en/1")
    results = engine.translate_batch(["Ein Hund rennt."], DecodingOptions(beam_size=4))
    results[0].hypotheses[0].text  # "A dog is running."

One batch reads like the architecture (`Engine.translate_ids`):

    tokenize -> pad -> encode (once per batch) -> [decoder step -> search.advance] until done -> detokenize

- `service.engine.entry`    checks the model-repository entry (manifest, hashes, signature, tokenizer);
- `service.engine.runtime`  owns the sessions and the device-resident K/V (IO binding on CPU and CUDA);
- `service.engine.search`   is the host-side search, token-for-token the PyTorch reference (model/decode.py);
- `service.engine.batching` groups sentences into length-sorted batches (no onnxruntime: model/ reuses it).

Threads (CPU): see benchmarks/README.md, "Engine: CPU thread settings". With `intra_op_threads=0`
the engine uses what that measurement chose for a machine this size: one intra-op thread per
session call and as many concurrent batches as cores (`Engine.workers`). Concurrent calls of
`translate_ids` from several threads are safe and run in parallel; `translate_batch` does that
itself with its internal batches. `EngineConfig.worker_processes=N` makes `translate_batch` decode
them in N worker processes instead (one engine each, no shared GIL: faster for many small batches,
e.g. `rosetta translate --worker-processes 2 --max-batch-sentences 1`; CPU only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.engine.batching import batches_by_length
from service.engine.cpu import describe_int8
from service.engine.entry import ModelEntry, ModelEntryError, read_entry
from service.engine.runtime import CPU, CUDA, OrtModel, ProviderUnavailable, SessionSettings
from service.engine.search import (
    ABANDON,
    ABANDONED,
    Abandoned,
    Search,
    SpecialIds,
    StepRequest,
    StepScores,
    make_search,
)
from service.options import DecodingOptions, TranslationResult
from service.tokenizer import AnyTokenizer

__all__ = ["ABANDONED", "Abandoned", "Engine", "EngineConfig", "EngineObserver", "ModelEntryError",
           "ProviderUnavailable", "StepModel", "batches_by_length", "run_search"]

log = logging.getLogger(__name__)

PROVIDER_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    """How one engine runs. Built at the entry point (`rosetta translate` / `rosetta serve` flags)."""

    provider: str = "auto"  # "auto" | "cpu" | "cuda"; auto tries CUDA for real (encode + step), falls back to CPU
    intra_op_threads: int = 0  # threads per session call; 0: chosen by measurement (module docstring)
    inter_op_threads: int = 1  # the graphs are one chain of operators: more does not help
    max_batch_tokens: int = 4096  # padded source tokens (eos included) per internal batch of translate_batch
    max_batch_sentences: int = 64  # sentences per internal batch of translate_batch
    parallel_batches: int = 0  # internal batches translate_batch decodes at once; 0: cores / intra-op threads
    # translate_batch on CPU: decode the internal batches in this many worker processes, one engine
    # each, instead of threads of this process (0: threads). No shared GIL: ~1.25x at batch 1 on two
    # cores in most runs (benchmarks/README.md); costs one model copy and ~1 s of start-up per process.
    worker_processes: int = 0
    # onnxruntime's CPU memory arena: fast reuse, but it never gives back the peak of the largest batch
    # seen. The server turns it off (ServerConfig.cpu_memory_arena) so memory returns after a big batch.
    cpu_memory_arena: bool = True

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_CHOICES:
            raise ValueError(f"provider must be one of {PROVIDER_CHOICES}, got {self.provider!r}")
        for name in ("intra_op_threads", "inter_op_threads", "parallel_batches", "worker_processes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_batch_tokens < 1 or self.max_batch_sentences < 1:
            raise ValueError("max_batch_tokens and max_batch_sentences must be >= 1")


class EngineObserver(Protocol):
    """Timing hooks for metrics (service.metrics implements them); called on the decoding thread."""

    def on_encoder(self, seconds: float) -> None: ...

    def on_decoder_step(self, seconds: float, rows: int) -> None: ...


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which container CPU sets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_threading(config: EngineConfig, cores: int) -> tuple[SessionSettings, int]:
    """(session threads, concurrent batches) on CPU.

    The measured choice for `intra_op_threads=0`: 1 intra-op thread per call and one batch per
    core, i.e. one session shared by `cores` decoding threads (benchmarks/engine_threads.py).
    """
    intra = config.intra_op_threads or 1
    parallel = config.parallel_batches or max(1, cores // intra)
    return SessionSettings(intra, config.inter_op_threads, allow_spinning=False,
                           cpu_memory_arena=config.cpu_memory_arena), parallel


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Silence onnxruntime's process-wide logger while probing CUDA (its failure is expected here)."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings


class StepModel(Protocol):
    """What a decoding loop drives: `service.engine.runtime.OrtModel` (the benchmarks add a PyTorch one)."""

    def encode(self, src_ids: np.ndarray) -> Any: ...

    def step(self, state: Any, request: StepRequest) -> StepScores: ...




def run_search(model: StepModel, src_ids: np.ndarray, search: Search,
               observer: EngineObserver | None = None, abandoned: Abandoned | None = None) -> list[TranslationResult]:
    """One batch: encode once, then one decoder step per generated token until the search is done.

    src_ids (B, S) int64 padded; returns the search's results, one per sentence, in order. Sentences that
    `abandoned` reports leave the batch before the next step, like finished ones; their result has no
    hypotheses and finish reason "abandoned"."""
    if abandoned is not None and (codes := abandoned()) is not None and (np.asarray(codes) == ABANDON).all():
        return [TranslationResult([], ABANDONED) for _ in range(src_ids.shape[0])]
    started = time.perf_counter()
    state = model.encode(src_ids)
    if observer is not None:
        observer.on_encoder(time.perf_counter() - started)
    request: StepRequest | None = search.start()
    while request is not None:
        started = time.perf_counter()
        scores = model.step(state, request)
        if observer is not None:
            observer.on_decoder_step(time.perf_counter() - started, int(request.input_ids.shape[0]))
        request = search.advance(scores)
        if request is not None and abandoned is not None and (codes := abandoned()) is not None:
            request = search.drop(request, np.asarray(codes, dtype=np.int8))
    return search.results()


class Engine:
    """One loaded model-repository entry, ready to translate. Create with `Engine.load`."""

    def __init__(self, entry: ModelEntry, model: OrtModel, config: EngineConfig, workers: int) -> None:
        self.entry = entry
        self.config = config
        self.name: str = entry.name
        self.version: str = entry.version
        self.manifest: dict[str, Any] = entry.manifest
        self.tokenizer: AnyTokenizer = entry.tokenizer
        self.provider: str = model.device  # "cpu" or "cuda": the one actually in use
        self.workers: int = workers  # concurrent translate_ids calls the threading is sized for
        self.runtime = model  # the sessions; `run_search(engine.runtime, ...)` drives them directly
        cfg = entry.config
        self.special_ids = SpecialIds(cfg.pad_id, cfg.bos_id, cfg.eos_id)
        self.vocab_size: int = cfg.vocab_size
        # Positions index a table of max_positions rows: a source needs room for its eos, a target
        # for its eos at position max_length - 1.
        self.max_source_tokens: int = cfg.max_positions - 1  # tokens without the eos the engine appends
        self.max_target_tokens: int = cfg.max_positions  # generated tokens, eos included
        self._processes: ProcessPoolExecutor | None = None  # config.worker_processes > 0, made on first use
        # int8 entries: which weight form (export's int8_form; entries from before it were reduce-range)
        self.int8_form: str | None = None
        if entry.precision == "int8":
            self.int8_form = str(entry.manifest.get("int8_form", "avx2"))
            line, suits = describe_int8(self.int8_form)
            if suits or self.provider != CPU:
                log.info("%s/%s: %s", entry.name, entry.version, line)
            else:
                log.warning("%s/%s: %s: its int16 accumulations saturate with full-range weights and quality "
                            "drops; export the entry with --int8-form avx2 for this machine",
                            entry.name, entry.version, line)

    @classmethod
    def load(cls, entry_dir: str | Path, config: EngineConfig = EngineConfig()) -> Engine:
        """Check and load the entry folder; raises ModelEntryError (a ValueError) naming what is wrong,
        ProviderUnavailable when provider="cuda" cannot run here."""
        entry = read_entry(entry_dir)
        model: OrtModel | None = None
        workers = 1
        if config.provider in ("auto", CUDA):
            try:
                with _quiet_onnxruntime():
                    model = OrtModel.open(entry, CUDA, SessionSettings(1, config.inter_op_threads))
            except ProviderUnavailable as err:
                if config.provider == CUDA:
                    raise
                log.info("CUDA is not usable here (%s); running on CPU", err)
        if model is None:
            settings, workers = cpu_threading(config, available_cores())
            model = OrtModel.open(entry, CPU, settings)
        log.info("loaded %s/%s (%s) on %s, %d worker(s)", entry.name, entry.version, entry.precision,
                 model.device, workers)
        return cls(entry, model, config, workers)

    # -- translation ------------------------------------------------------------------------------------

    def translate_batch(self, sentences: Sequence[str], options: DecodingOptions,
                        progress: Callable[[int], None] | None = None) -> list[TranslationResult]:
        """Translate `sentences`; one result per sentence, in order, hypotheses with their text.

        Splits them into internal batches sorted by length (capped by max_batch_tokens and
        max_batch_sentences) and decodes up to `workers` batches at once (threads), or in
        `config.worker_processes` processes, a few batches per task. `progress(n)` is called
        with the number of sentences of every batch that completes. Raises ValueError for a
        sentence longer than max_source_tokens.
        """
        ids = self.tokenizer.encode_batch(list(sentences))
        results: list[TranslationResult | None] = [None] * len(ids)
        batches = list(batches_by_length([len(s) + 1 for s in ids], self.config.max_batch_tokens,
                                         self.config.max_batch_sentences))
        self._check_lengths(ids)

        def run(idx: list[int]) -> tuple[list[int], list[TranslationResult]]:
            return idx, self.translate_ids([ids[i] for i in idx], options)

        processes = self._process_pool() if len(batches) > 1 else None
        if processes is not None:
            try:
                for idx, batch in self._in_processes(processes, ids, batches, options):
                    self._place(results, idx, batch, progress)
            except BrokenProcessPool as err:  # a worker died (killed, out of memory): fresh ones next call
                self.close()
                raise RuntimeError(f"an engine worker process died: {err}") from err
        elif self.workers > 1 and len(batches) > 1:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="rosetta-engine") as pool:
                # Longest batches first, so the last one to finish is a short one.
                futures = [pool.submit(run, idx) for idx in reversed(batches)]
                for fut in as_completed(futures):
                    self._place(results, *fut.result(), progress)
        else:
            for idx in batches:
                self._place(results, *run(idx), progress)
        return [r for r in results if r is not None]

    def translate_ids(self, sources: Sequence[Sequence[int]], options: DecodingOptions,
                      observer: EngineObserver | None = None,
                      abandoned: Abandoned | None = None) -> list[TranslationResult]:
        """Decode `sources` (token ids WITHOUT eos; the engine appends it) as ONE batch.

        One result per source, in order; hypotheses carry tokens, score, log_prob and text. An empty
        source decodes from eos alone. Sentences `abandoned` reports leave at the next step (no
        hypotheses, finish reason "abandoned"). Raises ValueError for an id outside the vocabulary or
        a source longer than max_source_tokens. Safe to call from several threads at once.
        """
        if not sources:
            return []
        self._check_lengths(sources)
        src, max_lens = self.pad_sources(sources, options)
        search = make_search(max_lens, options, self.special_ids, self.vocab_size)
        return [self._detokenize(r) for r in run_search(self.runtime, src, search, observer, abandoned)]

    # -- cost of a request (ServerConfig bounds it before queueing) ------------------------------------

    def length_caps(self, source_lengths: Sequence[int], options: DecodingOptions) -> list[int]:
        """Generated-token cap (eos included) of each source of `source_lengths` tokens (eos excluded)."""
        return [min(options.max_length_for(n + 1), self.max_target_tokens) for n in source_lengths]

    def kv_bytes(self, source_tokens: int, beam_size: int, length_cap: int) -> int:
        """Upper bound of the K/V one sentence holds in a batch: self-attention K and V of its beam_size
        rows up to its length cap, plus its cross-attention K and V (eos included), in every decoder layer.
        A batch holds at most the sum over its sentences (finished ones leave it)."""
        cfg = self.entry.config
        per_token = 2 * cfg.decoder_layers * cfg.d_model * (2 if self.entry.float_dtype == "float16" else 4)
        return per_token * (beam_size * length_cap + source_tokens + 1)

    def _in_processes(self, processes: ProcessPoolExecutor, ids: list[list[int]], batches: list[list[int]],
                      options: DecodingOptions) -> Iterator[tuple[list[int], list[TranslationResult]]]:
        """(batch indices, results) of every batch as the worker processes finish them. Longest first,
        a few batches per task: one task per batch would cost an IPC round trip per sentence at batch 1."""
        order = list(reversed(batches))
        per_task = max(1, len(order) // (4 * self.config.worker_processes))
        pending = {processes.submit(_process_translate, [[ids[i] for i in idx] for idx in group], options): group
                   for group in (order[k: k + per_task] for k in range(0, len(order), per_task))}
        for done in as_completed(pending):
            yield from zip(pending[done], done.result(), strict=True)

    def close(self) -> None:
        """Stop the worker processes, if any (they also stop when the interpreter exits)."""
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None

    def _process_pool(self) -> ProcessPoolExecutor | None:
        """The worker processes of `config.worker_processes` (CPU only), started on first use."""
        n = self.config.worker_processes
        if n < 1 or self.provider != CPU:
            return None
        if self._processes is None:
            worker_config = dataclasses.replace(self.config, provider=CPU, parallel_batches=1, worker_processes=0)
            self._processes = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_process_init,
                                                  initargs=(str(self.entry.path), worker_config))
        return self._processes

    # -- helpers ----------------------------------------------------------------------------------------

    def _check_lengths(self, sources: Sequence[Sequence[int]]) -> None:
        for i, s in enumerate(sources):
            if len(s) > self.max_source_tokens:
                raise ValueError(f"source {i} has {len(s)} tokens; this model takes at most "
                                 f"{self.max_source_tokens} (max_positions - 1 for eos)")

    def pad_sources(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> tuple[np.ndarray, list[int]]:
        """(src_ids (B, S) int64 with eos appended and pad after it, per-sentence length caps)."""
        eos, pad = self.special_ids.eos, self.special_ids.pad
        width = max(len(s) for s in sources) + 1
        src = np.full((len(sources), width), pad, dtype=np.int64)
        for i, s in enumerate(sources):
            src[i, : len(s)] = s
            src[i, len(s)] = eos
        if src.size and (src.min() < 0 or src.max() >= self.vocab_size):
            bad = next(i for i, s in enumerate(sources) if any(not 0 <= t < self.vocab_size for t in s))
            raise ValueError(f"source {bad} has a token id outside the vocabulary [0, {self.vocab_size})")
        return src, self.length_caps([len(s) for s in sources], options)

    def _detokenize(self, result: TranslationResult) -> TranslationResult:
        hyps = [dataclasses.replace(h, text=self.tokenizer.decode(h.tokens)) for h in result.hypotheses]
        return TranslationResult(hyps, result.finish_reason)

    @staticmethod
    def _place(results: list[TranslationResult | None], idx: list[int], batch: list[TranslationResult],
               progress: Callable[[int], None] | None) -> None:
        for i, r in zip(idx, batch, strict=True):
            results[i] = r
        if progress is not None:
            progress(len(idx))


# -- worker processes (EngineConfig.worker_processes) ------------------------------------------------

_PROCESS_ENGINE: Engine | None = None  # the engine of a worker process


def _process_init(entry_dir: str, config: EngineConfig) -> None:
    global _PROCESS_ENGINE
    _PROCESS_ENGINE = Engine.load(entry_dir, config)


def _process_translate(batches: list[list[list[int]]], options: DecodingOptions) -> list[list[TranslationResult]]:
    """Decode several batches, one after the other, in a worker process."""
    assert _PROCESS_ENGINE is not None, "worker process not initialised"
    return [_PROCESS_ENGINE.translate_ids(sources, options) for sources in batches]
