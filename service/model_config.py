"""ModelConfig: the architecture of an encoder-decoder Transformer, as a checkpoint and a model-repository
entry record it. A leaf of the serving side (no torch, no onnxruntime): the engine reads it from an entry's
manifest, and model/ builds the PyTorch model from it (model.config re-exports it).

Shape legend used across the project:
    B batch, K beams, R live hypothesis rows (B*K), S source length, T target length,
    D d_model, H heads, Dh head dim (D // H), L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIVATIONS = ("relu", "gelu", "swish")
POSITIONALS = ("sinusoidal", "sinusoidal_split", "learned")


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
    activation: str = "relu"  # "relu" (paper), "gelu" or "swish" (SiLU: Marian / OPUS-MT)
    norm_first: bool = False  # False: post-norm as in the paper; True: pre-norm
    # "sinusoidal" (paper: sin and cos interleaved), "sinusoidal_split" (the same frequencies, sin in the
    # first half of the dims and cos in the second: Marian) or "learned"
    positional: str = "sinusoidal"
    tie_embeddings: bool = True  # share source, target and output-projection weights
    # with tie_embeddings off: the output projection still reuses the target embedding (Marian models whose
    # decoder has embeddings of its own); off too: a projection of its own
    tie_output: bool = False
    embedding_scale: bool = True  # token embeddings times sqrt(d_model) (paper; Marian's scale_embedding)
    logits_bias: bool = False  # a learned (vocab,) bias added to the output logits (Marian's final_logits_bias)
    max_positions: int = 512  # longest sequence the positional table covers
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}, not {self.positional!r}")

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
