"""Length-sorted batches of sentences: how a long input is cut into engine batches.

No onnxruntime here: the PyTorch reference (model/decode.py, model/evaluate.py) batches the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def batches_by_length(lengths: Sequence[int], max_tokens: int, max_sentences: int) -> Iterator[list[int]]:
    """Indices sorted by length, grouped so that every padded batch (count x longest) stays within
    `max_tokens` and `max_sentences`; a single sentence over `max_tokens` forms its own batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if batch and (w * (len(batch) + 1) > max_tokens or len(batch) >= max_sentences):
            yield batch
            batch, w = [], lengths[i]
        batch.append(i)
        width = w
    if batch:
        yield batch
