"""Learning the joint source+target subword tokenizer from a training corpus."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from service.tokenizer import SPECIAL_TOKENS, Tokenizer


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn byte-level BPE over `lines` (source and target sentences together)."""
    hf = HFTokenizer(models.BPE())
    # No prefix space and no normalizer: the byte-level round trip is then exact.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(lines, trainer=trainer)
    return Tokenizer(hf)


def load_or_train(path: Path, lines: Iterable[str], vocab_size: int) -> Tokenizer:
    if path.exists():
        return Tokenizer.load(path)
    tok = train_tokenizer(lines, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok
