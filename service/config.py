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


SCHEDULERS = ("loop", "batch")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one `rosetta serve` process. Limits are enforced per request with INVALID_ARGUMENT."""

    # Network
    host: str = "0.0.0.0"  # interface of the gRPC listener (0.0.0.0: every interface, as a pod needs)
    port: int = 50051  # gRPC port; 0 picks a free one (printed at start)
    metrics_host: str = ""  # interface of the /metrics listener; "": the same as `host`
    metrics_port: int = 9400  # Prometheus /metrics HTTP port; 0 picks a free one; -1 disables it
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC max receive and send message size
    # Calls gRPC core holds before the server takes them (a burst arrives faster than the event loop
    # accepts it). Past gRPC's defaults (soft 1000, hard 3000) core answers CANCELLED, unseen by the
    # metrics; this keeps overload answered by the scheduler (RESOURCE_EXHAUSTED, counted). ~14 KB a call.
    max_pending_calls: int = 16384
    # TLS for gRPC (PEM files). cert + key turn TLS on; a client CA on top requires client certificates (mTLS)
    tls_cert_file: str = ""  # server certificate chain
    tls_key_file: str = ""  # its private key
    tls_client_ca_file: str = ""  # CA bundle that signs the client certificates; "": no client certificate
    # Models
    model_repository: str = "models/model_repository"  # folder of NAME/VERSION entries
    models: str = "de-en"  # comma-separated NAME or NAME/VERSION entries to load; the first is the default
    # Scheduling: "loop" (step-level: sentences join a running decode loop between two decoder steps,
    # service/server/loop_scheduler.py) or "batch" (request-level: batches of equal options run to their end;
    # kept so that benchmarks can measure the loop against it in one run)
    scheduler: str = "loop"
    max_live_rows: int = 256  # "loop": decoder rows (sentences x beams) one decode loop runs at most
    # "loop": a sentence queued longer than this is admitted with DecodingOptions.overload_beam_size when its
    # request set one (counted in rosetta_beam_reduced_sentences); 0 turns reduction off
    overload_queue_wait_ms: float = 250.0
    # "loop", 2+ workers: while sentences of fewer source tokens than this and sentences of at least this many
    # both arrive, worker 0's loop decodes only the short ones and loops holding a long one take no short one
    # (a caption's latency beside paragraphs stays near its idle latency; benchmarks/README.md); 0: off
    long_source_tokens: int = 0
    # Batching scheduler ("batch"; max_queue_sentences and max_batch_kv_bytes bound "loop" too)
    max_batch_sentences: int = 64  # sentences per engine batch
    max_batch_tokens: int = 4096  # padded source tokens per engine batch (sentences * longest)
    max_wait_ms: float = 5.0  # how long the oldest queued sentence may wait for a fuller batch
    max_queue_sentences: int = 2048  # queued sentences per model; beyond it RESOURCE_EXHAUSTED at once
    workers: int = 0  # engine batches in flight per model (threads sharing its sessions); 0: one per core
    # Request limits
    max_sentences_per_request: int = 128  # Translate
    max_sentences_per_stream: int = 10000  # TranslateStream (fed to the queue progressively)
    max_input_tokens: int = 256  # subword tokens per source sentence
    max_input_bytes: int = 4096  # UTF-8 bytes per source sentence, checked before tokenizing
    max_beam_size: int = 16
    max_output_tokens: int = 512  # highest max_decoding_length a request may ask for
    # Cost bounds, checked before a request is queued (deploy/README.md sizes them against a pod's memory).
    # A sentence's decoder rows x positions is beam_size x its length cap (max_decoding_length, the ratio
    # cap, the model's positions); its KV-cache bytes follow from the model's layers, width and precision.
    max_request_decode_tokens: int = 131072  # sum over a request's sentences of beam_size x length cap
    max_batch_kv_bytes: int = 128 * 1024 * 1024  # KV cache of one engine batch; a sentence over it alone is refused
    # DecodingOptions.partial_at_deadline: decoding stops this long before the call's deadline, so the best
    # hypothesis so far reaches the client in time (one decoder step and the answer must fit in it)
    partial_margin_ms: float = 100.0
    # Lifecycle
    drain_grace_s: float = 20.0  # after SIGTERM: time in-flight requests get to finish; then their work stops
    drain_delay_s: float = 0.0  # after SIGTERM: keep serving this long with health NOT_SERVING first
    warmup: bool = True  # decode a few sentences before reporting SERVING
    # ONNX Runtime
    provider: str = "auto"  # "auto" (CUDA when usable, else CPU), "cuda" or "cpu"
    intra_op_threads: int = 0  # threads per session call; 0: the engine's measured choice (1 on CPU)
    inter_op_threads: int = 1
    # Memory: give a big batch's memory back once it is done (benchmarks/heavy_request.py measures both)
    cpu_memory_arena: bool = False  # onnxruntime's CPU arena keeps the largest batch's peak for good
    trim_memory_when_idle: bool = True  # glibc: hand freed heap memory back to the OS when a model's work is done

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "port" and value < 0):
                raise ValueError(f"{name} must be a TCP port (0 picks a free one), got {value}")
        positive = ("max_batch_sentences", "max_batch_tokens", "max_queue_sentences",
                    "max_sentences_per_request", "max_sentences_per_stream", "max_input_tokens",
                    "max_beam_size", "max_output_tokens", "max_message_bytes", "max_input_bytes", "max_pending_calls",
                    "max_request_decode_tokens", "max_batch_kv_bytes", "max_live_rows")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "drain_grace_s", "drain_delay_s", "partial_margin_ms", "overload_queue_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.long_source_tokens < 0:
            raise ValueError(f"long_source_tokens must be >= 0, got {self.long_source_tokens}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0 or self.workers < 0:
            raise ValueError("intra_op_threads, inter_op_threads and workers must be >= 0")
        if self.max_sentences_per_request > self.max_queue_sentences:
            raise ValueError(f"max_sentences_per_request={self.max_sentences_per_request} exceeds "
                             f"max_queue_sentences={self.max_queue_sentences}: such a request could never run")
        if self.max_input_tokens + 1 > self.max_batch_tokens:  # +1: the engine appends eos
            raise ValueError(f"max_input_tokens={self.max_input_tokens} does not fit in "
                             f"max_batch_tokens={self.max_batch_tokens}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        self.model_specs()  # raises on a malformed list

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def model_specs(self) -> list[ModelSpec]:
        """The entries of `models`, in order; the first is the default model."""
        specs = [ModelSpec.parse(m) for m in self.models.split(",") if m.strip()]
        if not specs:
            raise ValueError("models must name at least one model-repository entry")
        return specs
