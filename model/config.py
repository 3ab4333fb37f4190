"""Configuration dataclasses for the model and its training.

Torch-free on purpose: the exporter writes `ModelConfig` into every manifest and the
serving side reads it back without importing torch.

Shape legend used across the project:
    B batch, K beams, R live hypothesis rows (B*K), S source length, T target length,
    D d_model, H heads, Dh head dim (D // H), L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an encoder-decoder Transformer; stored inside every checkpoint."""

    vocab_size: int = 8000  # joint source+target subword vocabulary
    d_model: int = 256  # width of every residual stream
    heads: int = 4  # attention heads; d_model must divide evenly
    encoder_layers: int = 3
    decoder_layers: int = 3
    d_ff: int = 1024  # inner width of the position-wise feed-forward
    dropout: float = 0.3  # residual, embedding and feed-forward dropout
    attention_dropout: float = 0.1  # dropout on attention weights
    activation: str = "relu"  # "relu" (paper) or "gelu"
    norm_first: bool = False  # False: post-norm as in the paper; True: pre-norm
    positional: str = "sinusoidal"  # "sinusoidal" (paper) or "learned"
    tie_embeddings: bool = True  # share source, target and output-projection weights
    max_positions: int = 512  # longest sequence the positional table covers
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu, not {self.activation!r}")
        if self.positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional must be sinusoidal or learned, not {self.positional!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides one training run besides the architecture."""

    data_dir: str = "../shared/data/multi30k"  # folder of {split}.{lang}.gz files
    src_lang: str = "de"
    tgt_lang: str = "en"
    out_dir: str = "runs/de-en"  # checkpoints, metrics.csv, curves.png
    vocab_size: int = 8000
    epochs: int = 30
    max_tokens: int = 2048  # cap on (padded) target tokens in one batch
    accum_steps: int = 1  # gradient accumulation: optimizer step every N batches
    peak_lr: float = 1e-3  # learning rate reached at the end of warm-up
    warmup_steps: int = 1000  # linear warm-up, then inverse square root decay
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # gradient clipping by global L2 norm; 0 disables
    seed: int = 1
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    keep_last: int = 5  # epoch checkpoints kept for averaging
    average_last: int = 5  # average this many last epoch checkpoints at the end
    val_bleu_sentences: int = 0  # 0: whole val set; else the first N (faster epochs)
    max_epochs_this_run: int = 0  # stop after N epochs in this invocation (0: no limit)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["model"] = ModelConfig.from_dict(data.get("model", {}))
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)
