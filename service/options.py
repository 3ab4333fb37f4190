"""Decoding options, in CTranslate2's vocabulary. Torch-free: shared by the PyTorch reference
decoder (model/decode.py) and the ONNX Runtime engine (service/)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 5  # hypotheses kept per sentence; 1 takes the greedy path
    length_penalty: float = 1.0  # alpha: hypotheses ranked by log_prob / length**alpha
    max_decoding_length: int = 256  # absolute cap on generated tokens, eos included
    max_decoding_length_ratio: float = 2.0  # relative cap: ratio * source tokens + offset; 0 off
    max_decoding_length_offset: int = 10
    min_decoding_length: int = 0  # eos is blocked until this many tokens were generated
    num_hypotheses: int = 1  # n-best size returned per sentence (<= beam_size)
    return_scores: bool = True
    # With a deadline: stop shortly before it and return the best hypothesis so far (finish reason "deadline")
    partial_at_deadline: bool = False
    # Under overload (a sentence queued longer than the server's threshold) decode with this smaller beam
    # instead (step-level scheduler); 0: never reduced
    overload_beam_size: int = 0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.num_hypotheses <= self.beam_size:
            raise ValueError(
                f"num_hypotheses must be in [1, beam_size={self.beam_size}], got {self.num_hypotheses}"
            )
        if self.max_decoding_length < 1:
            raise ValueError(f"max_decoding_length must be >= 1, got {self.max_decoding_length}")
        if self.min_decoding_length < 0:
            raise ValueError(f"min_decoding_length must be >= 0, got {self.min_decoding_length}")
        if self.max_decoding_length_ratio < 0 or self.max_decoding_length_offset < 0:
            raise ValueError("max_decoding_length_ratio and _offset must be >= 0")
        if self.overload_beam_size and not self.num_hypotheses <= self.overload_beam_size <= self.beam_size:
            raise ValueError(f"overload_beam_size={self.overload_beam_size} is out of range [num_hypotheses="
                             f"{self.num_hypotheses}, beam_size={self.beam_size}]; 0 or unset: never reduced")

    def under_overload(self) -> DecodingOptions:
        """These options with the beam the request allows under overload (itself when it allows none)."""
        if not self.overload_beam_size or self.overload_beam_size == self.beam_size:
            return self
        return replace(self, beam_size=self.overload_beam_size, overload_beam_size=0)

    def max_length_for(self, src_len: int) -> int:
        """Generated-token cap (eos included) for a source of `src_len` tokens (eos included)."""
        cap = self.max_decoding_length
        if self.max_decoding_length_ratio > 0:
            cap = min(cap, int(self.max_decoding_length_ratio * src_len) + self.max_decoding_length_offset)
        return max(cap, min(self.min_decoding_length + 1, self.max_decoding_length), 1)

    def normalize(self, log_prob: float, length: int) -> float:
        """The ranking score of a hypothesis of `length` tokens (eos included)."""
        return log_prob / (length**self.length_penalty) if self.length_penalty else log_prob


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated ids, eos excluded
    score: float  # log_prob / length**length_penalty: the ranking score
    log_prob: float  # sum of token log-probs, eos included
    text: str = ""  # detokenized tokens; filled by the engine (the PyTorch reference leaves it empty)


@dataclass(frozen=True)
class TranslationResult:
    hypotheses: list[Hypothesis]  # best first, num_hypotheses of them
    finish_reason: str  # "eos", "length", "deadline" (stopped early, partial_at_deadline) or "abandoned"


NEG_INF = -math.inf
