"""Multi30k reading, length-bucketed token-capped batching and padding.

Any language pair works: files are `{split}.{lang}.gz` (one sentence per line, aligned by line)
inside a data folder that is a setting.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.tokenizer import Tokenizer


def read_lines(data_dir: str | Path, split: str, lang: str) -> list[str]:
    """Lines of `{data_dir}/{split}.{lang}[.gz]`, without their newline."""
    base = Path(data_dir) / f"{split}.{lang}"
    gz = base.with_name(base.name + ".gz")
    if gz.exists():
        with gzip.open(gz, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    if base.exists():
        return base.read_text(encoding="utf-8").split("\n")[:-1]
    raise FileNotFoundError(f"no {gz} or {base}")


def read_pair(data_dir: str | Path, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    s, t = read_lines(data_dir, split, src), read_lines(data_dir, split, tgt)
    if len(s) != len(t):
        raise ValueError(f"{split}: {len(s)} {src} lines but {len(t)} {tgt} lines")
    return s, t


@dataclass
class Example:
    src: list[int]  # source ids followed by eos
    tgt: list[int]  # target ids followed by eos


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) int64, padded with pad_id
    tgt_in: torch.Tensor  # (B, T) bos + target
    tgt_out: torch.Tensor  # (B, T) target + eos; pad where tgt_in is pad
    n_tokens: int  # real (non-pad) target tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.n_tokens)


def encode_pairs(
    tok: Tokenizer, src: list[str], tgt: list[str], max_len: int | None = None
) -> list[Example]:
    """Tokenize aligned lines; drop pairs longer than `max_len` tokens (with eos) if given."""
    eos = tok.eos_id
    out = []
    for s, t in zip(tok.encode_batch(src), tok.encode_batch(tgt), strict=True):
        ex = Example(s + [eos], t + [eos])
        if max_len is None or (len(ex.src) <= max_len and len(ex.tgt) <= max_len):
            out.append(ex)
    return out


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, max_len) int64 tensor, right-padded."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: list[Example], pad_id: int, bos_id: int) -> Batch:
    src = pad([e.src for e in examples], pad_id)
    tgt_out = pad([e.tgt for e in examples], pad_id)
    tgt_in = pad([[bos_id] + e.tgt[:-1] for e in examples], pad_id)
    return Batch(src, tgt_in, tgt_out, sum(len(e.tgt) for e in examples))


def token_batches(
    examples: list[Example], max_tokens: int, rng: np.random.Generator | None = None
) -> list[list[int]]:
    """Indices of examples grouped by length so each padded batch holds <= max_tokens.

    The cap counts padded positions of the longer side (source or target). With an `rng`,
    lengths are jittered before sorting and the batch order is shuffled (training);
    without, batches come in length order (evaluation).
    """
    lengths = np.array([max(len(e.src), len(e.tgt)) for e in examples], dtype=np.float64)
    keys = lengths + (rng.uniform(0, 1, len(lengths)) if rng is not None else 0.0)
    order = np.argsort(keys, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = max(width, int(lengths[i]))
        if current and w * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, w = [], int(lengths[i])
        current.append(int(i))
        width = w
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def iterate_batches(
    examples: list[Example],
    max_tokens: int,
    pad_id: int,
    bos_id: int,
    rng: np.random.Generator | None = None,
) -> Iterator[Batch]:
    for idx in token_batches(examples, max_tokens, rng):
        yield collate([examples[i] for i in idx], pad_id, bos_id)
