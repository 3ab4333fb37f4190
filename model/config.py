"""Configuration dataclasses for the model and its training.

`ModelConfig` (the architecture) is defined on the serving side, in `service.model_config`: the exporter
writes it into every manifest and the engine reads it back, so it belongs to the side that serves; the
model imports it from there (imports run model -> export -> service, never back). Torch-free.

Shape legend used across the project:
    B batch, K beams, R live hypothesis rows (B*K), S source length, T target length,
    D d_model, H heads, Dh head dim (D // H), L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from service.model_config import ModelConfig

__all__ = ["ModelConfig", "TrainConfig"]


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
