"""The runtime tokenizer: one `tokenizer.json` file, loaded without torch.

Byte-level BPE (the HuggingFace `tokenizers` library): every string maps to tokens over a
256-symbol byte alphabet, so no input can fail or fall back to an unknown token, and decoding
gives back exactly the bytes that went in (case, punctuation, spacing, emoji, control chars).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order


class Tokenizer:
    """Text <-> subword ids. Special ids: pad 0, bos 1, eos 2, unk 3."""

    def __init__(self, hf: _HFTokenizer) -> None:
        self._hf = hf
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"tokenizer special ids must be pad/bos/eos/unk = 0/1/2/3, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Subword ids of `text`, without bos/eos."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        return str(self._hf.decode(list(ids), skip_special_tokens=True))

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return list(self._hf.decode_batch([list(ids) for ids in batch], skip_special_tokens=True))

    def id_to_token(self, token_id: int) -> str:
        return str(self._hf.id_to_token(token_id))
