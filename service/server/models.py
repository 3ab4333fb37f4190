"""The served models: one loaded model-repository entry with its engine, tokenizer, scheduler and metrics."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import ServerConfig
from service.engine.search import ABANDONED, Abandoned
from service.metrics import ModelMetrics, ServerMetrics
from service.options import DecodingOptions, TranslationResult
from service.server.loop_scheduler import LoopConfig, LoopScheduler
from service.server.results import SentenceTranslation, ServedHypothesis
from service.server.scheduler import BatchRunner, Scheduler, SchedulerConfig


@dataclass
class ServedModel:
    """A loaded model-repository entry and the scheduler that owns its engine."""

    name: str
    version: str
    manifest: dict[str, Any]
    provider: str
    tokenizer: Any  # service.tokenizer.Tokenizer
    engine: Any  # service.engine.Engine
    scheduler: Scheduler | LoopScheduler
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


def served(engine: Any, ids: list[int], result: TranslationResult) -> SentenceTranslation:
    """An engine result as the server returns it: hypotheses with their token strings."""
    tokenizer = engine.tokenizer
    hyps = [ServedHypothesis(h.text, list(h.tokens), [tokenizer.id_to_token(t) for t in h.tokens], h.score, h.log_prob)
            for h in result.hypotheses]
    return SentenceTranslation(hyps, result.finish_reason, len(ids))


def make_converter(engine: Any, observer: ModelMetrics) -> Callable[[list[int], TranslationResult],
                                                                     SentenceTranslation]:
    """The loop scheduler's per-sentence conversion, counting tokens in and out."""

    def convert(ids: list[int], result: TranslationResult) -> SentenceTranslation:
        out = served(engine, ids, result)
        observer.on_tokens(len(ids), len(out.hypotheses[0].token_ids) if out.hypotheses else 0)
        return out

    return convert


def make_runner(engine: Any, observer: ModelMetrics) -> BatchRunner:
    """The scheduler's batch function for `engine`: decode, then detokenize on the same executor thread."""

    def run(sources: list[list[int]], options: DecodingOptions,
            abandoned: Abandoned | None = None) -> list[SentenceTranslation | None]:
        results: list[TranslationResult] = engine.translate_ids(sources, options, observer=observer,
                                                                abandoned=abandoned)
        out: list[SentenceTranslation | None] = []
        for ids, res in zip(sources, results, strict=True):
            if res.finish_reason == ABANDONED:  # nobody waits for it: the scheduler counts it as dropped
                out.append(None)
                continue
            out.append(served(engine, ids, res))
        done = [(ids, s) for ids, s in zip(sources, out, strict=True) if s is not None]
        observer.on_tokens(sum(len(ids) for ids, _ in done),
                           sum(len(s.hypotheses[0].token_ids) for _, s in done if s.hypotheses))
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
    workers = config.workers or engine.workers
    scheduler_config = SchedulerConfig(config.max_batch_sentences, config.max_batch_tokens, config.max_wait_ms,
                                       config.max_queue_sentences, config.max_batch_kv_bytes,
                                       config.partial_margin_ms / 1000)
    on_idle = trim_memory if config.trim_memory_when_idle else None
    scheduler: Scheduler | LoopScheduler
    if config.scheduler == "loop":
        scheduler = LoopScheduler(engine, workers, make_converter(engine, model_metrics), scheduler_config,
                                  LoopConfig(config.max_live_rows, config.max_batch_kv_bytes,
                                             config.overload_queue_wait_ms / 1000,
                                             long_source_tokens=config.long_source_tokens), model_metrics,
                                  engine.name, on_idle)
    else:
        runners = [make_runner(engine, model_metrics) for _ in range(workers)]
        scheduler = Scheduler(runners, scheduler_config, observer=model_metrics, name=engine.name, on_idle=on_idle)
    manifest = dict(engine.manifest)
    metrics.model_info.labels(engine.name, engine.version, str(manifest.get("precision", "")), engine.provider,
                              str(manifest.get("source_lang", "")), str(manifest.get("target_lang", ""))).set(1)
    max_input = min(config.max_input_tokens, engine.max_source_tokens)
    return ServedModel(engine.name, str(engine.version), manifest, engine.provider, engine.tokenizer, engine,
                       scheduler, model_metrics, max_input)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def trim_memory() -> bool:
    """glibc only: give the heap's free memory back to the OS (malloc_trim). Freed K/V of a big batch
    otherwise stays in glibc's heaps: two heavy calls left a server at 417 MiB for good, against 166 MiB
    before them (benchmarks/heavy_request.py). False where unsupported."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))
