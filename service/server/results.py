"""What a translation call gives back, in plain Python: the servicer turns it into protobuf."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServedHypothesis:
    text: str
    token_ids: list[int]  # generated ids, eos excluded
    tokens: list[str]  # the tokenizer's spelling of token_ids
    score: float  # log_prob / length**length_penalty
    log_prob: float


@dataclass(frozen=True)
class SentenceTranslation:
    hypotheses: list[ServedHypothesis]  # best first
    finish_reason: str  # "eos", "length" or "empty"
    source_tokens: int  # eos excluded
    queue_wait_s: float = 0.0
    compute_s: float = 0.0
    beam_size: int = 0  # the beam it ran with (reduced under overload when the request allowed it); 0: empty


@dataclass(frozen=True)
class Translation:
    """The outcome of one Translate call: one SentenceTranslation per sentence, in order."""

    sentences: list[SentenceTranslation]
    model: str
    version: str


def empty_translation() -> SentenceTranslation:
    return SentenceTranslation([ServedHypothesis("", [], [], 0.0, 0.0)], "empty", 0)
