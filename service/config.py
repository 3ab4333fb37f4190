"""ServerConfig: every setting of `rosetta serve`, one frozen dataclass.

Built once at the entry point (`rosetta serve` flags, each with a ROSETTA_<FIELD> environment twin) and
passed down; nothing below the entry point reads the environment. The field names, ports and defaults
are relied on by deploy/ (Kubernetes ConfigMap, probes, Prometheus scrape config): rename none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ServerConfig.models: a model-repository entry name and, optionally, its version."""

    name: str
    version: str | None  # None: the highest version present in the repository

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """'NAME' or 'NAME/VERSION' -> ModelSpec; raises ValueError on anything else."""
        parts = text.strip().split("/")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"a model is NAME or NAME/VERSION, got {text!r}")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)

    def resolve(self, repository: Path) -> Path:
        """The entry folder repository/NAME/VERSION; the highest version when none was given.

        Versions compare as integers when they all are, else as strings. Raises FileNotFoundError
        naming what is missing."""
        model_dir = repository / self.name
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model {self.name!r} not found: no folder {model_dir}")
        if self.version is not None:
            entry = model_dir / self.version
            if not entry.is_dir():
                raise FileNotFoundError(f"model {self.name}/{self.version} not found: no folder {entry}")
            return entry
        versions = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not versions:
            raise FileNotFoundError(f"model {self.name!r} has no version folder under {model_dir}")
        numeric = all(v.isdigit() for v in versions)
        return model_dir / max(versions, key=(lambda v: int(v)) if numeric else (lambda v: v))


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one `rosetta serve` process. Limits are enforced per request with INVALID_ARGUMENT."""

    # Network
    host: str = "0.0.0.0"  # interface for both the gRPC and the metrics listener
    port: int = 50051  # gRPC port; 0 picks a free one (printed at start)
    metrics_port: int = 9400  # Prometheus /metrics HTTP port; 0 picks a free one; -1 disables it
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC max receive and send message size
    # Models
    model_repository: str = "models/model_repository"  # folder of NAME/VERSION entries
    models: str = "de-en"  # comma-separated NAME or NAME/VERSION entries to load; the first is the default
    # Batching scheduler
    max_batch_sentences: int = 64  # sentences per engine batch
    max_batch_tokens: int = 4096  # padded source tokens per engine batch (sentences * longest)
    max_wait_ms: float = 5.0  # how long the oldest queued sentence may wait for a fuller batch
    max_queue_sentences: int = 2048  # queued sentences per model; beyond it RESOURCE_EXHAUSTED at once
    workers: int = 0  # engine batches in flight per model (threads sharing its sessions); 0: one per core
    # Request limits
    max_sentences_per_request: int = 128  # Translate
    max_sentences_per_stream: int = 10000  # TranslateStream (fed to the queue progressively)
    max_input_tokens: int = 256  # subword tokens per source sentence
    max_beam_size: int = 16
    max_output_tokens: int = 512  # highest max_decoding_length a request may ask for
    # Lifecycle
    drain_grace_s: float = 20.0  # after SIGTERM: time in-flight requests get to finish
    drain_delay_s: float = 0.0  # after SIGTERM: keep serving this long with health NOT_SERVING first
    warmup: bool = True  # decode a few sentences before reporting SERVING
    # ONNX Runtime
    provider: str = "auto"  # "auto" (CUDA when usable, else CPU), "cuda" or "cpu"
    intra_op_threads: int = 0  # threads per session call; 0: the engine's measured choice (1 on CPU)
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "port" and value < 0):
                raise ValueError(f"{name} must be a TCP port (0 picks a free one), got {value}")
        positive = ("max_batch_sentences", "max_batch_tokens", "max_queue_sentences",
                    "max_sentences_per_request", "max_sentences_per_stream", "max_input_tokens",
                    "max_beam_size", "max_output_tokens", "max_message_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "drain_grace_s", "drain_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0 or self.workers < 0:
            raise ValueError("intra_op_threads, inter_op_threads and workers must be >= 0")
        if self.max_sentences_per_request > self.max_queue_sentences:
            raise ValueError(f"max_sentences_per_request={self.max_sentences_per_request} exceeds "
                             f"max_queue_sentences={self.max_queue_sentences}: such a request could never run")
        if self.max_input_tokens + 1 > self.max_batch_tokens:  # +1: the engine appends eos
            raise ValueError(f"max_input_tokens={self.max_input_tokens} does not fit in "
                             f"max_batch_tokens={self.max_batch_tokens}")
        self.model_specs()  # raises on a malformed list

    def model_specs(self) -> list[ModelSpec]:
        """The entries of `models`, in order; the first is the default model."""
        specs = [ModelSpec.parse(m) for m in self.models.split(",") if m.strip()]
        if not specs:
            raise ValueError("models must name at least one model-repository entry")
        return specs
