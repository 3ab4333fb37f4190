"""The runtime tokenizers, loaded without torch.

`Tokenizer`: Rosetta's own, one `tokenizer.json` file. Byte-level BPE (the HuggingFace `tokenizers`
library): every string maps to tokens over a 256-symbol byte alphabet, so no input can fail or fall
back to an unknown token, and decoding gives back exactly the bytes that went in.

`SentencePieceTokenizer`: a Marian (OPUS-MT) model's: SentencePiece models for the source and the target
side (`source.spm`, `target.spm`) over one joint vocabulary (`vocab.json`, piece -> id), token for token
what transformers' MarianTokenizer gives (tests/service/test_tokenizer_marian.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order


class Tokenizer:
    """Text <-> subword ids. Special ids: pad 0, bos 1, eos 2, unk 3."""

    kind = "bpe"  # an entry manifest's "tokenizer"
    FILES = ("tokenizer.json",)

    def __init__(self, hf: _HFTokenizer) -> None:
        self._hf = hf
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"tokenizer special ids must be pad/bos/eos/unk = 0/1/2/3, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        # starts_word's ids: the tokens whose text starts with whitespace (one decode of the vocabulary, a few
        # ms, here rather than on the event loop at the first streamed prefix), and eos
        texts = hf.decode_batch([[i] for i in range(hf.get_vocab_size())], skip_special_tokens=False)
        self._word_starts = frozenset(i for i, t in enumerate(texts) if t[:1].isspace()) | {self.eos_id}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._hf.save(str(path))

    def save_files(self, folder: str | Path) -> None:
        """Write tokenizer.json into `folder`."""
        self.save(Path(folder) / self.FILES[0])

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

    def starts_word(self, token_id: int) -> bool:
        """Whether `token_id` leaves the word before it complete: its text starts with whitespace, or it is
        eos (the end of the text). Streaming shows a word once every hypothesis goes on with such a token."""
        return token_id in self._word_starts


SPIECE_UNDERLINE = "\u2581"  # SentencePiece's word-boundary mark


class SentencePieceTokenizer:
    """Marian's tokenization: the source text through source.spm, the target text through target.spm, and
    pieces to ids through the joint vocab.json (a piece missing from it is unk). A leading language code
    (`>>fr<<`, multilingual models) is kept as one token. Decoding drops special ids and joins the pieces.

    Special ids come from the vocabulary: eos "</s>", unk "<unk>", pad "<pad>"; Marian has no bos and starts
    decoding from pad, so `bos_id` is pad_id."""

    kind = "sentencepiece"
    FILES = ("source.spm", "target.spm", "vocab.json")

    def __init__(self, source_spm: str | Path, target_spm: str | Path, vocab: dict[str, int]) -> None:
        import sentencepiece  # only for Marian models: the default tokenizer does not need it

        self._source = sentencepiece.SentencePieceProcessor(model_file=str(source_spm))
        self._target = sentencepiece.SentencePieceProcessor(model_file=str(target_spm))
        missing = [t for t in (EOS, UNK, PAD) if t not in vocab]
        if missing:
            raise ValueError(f"vocab.json lacks the special tokens {missing}")
        self._vocab = dict(vocab)
        self._pieces = {i: p for p, i in self._vocab.items()}
        if len(self._pieces) != len(self._vocab):
            raise ValueError("vocab.json maps two pieces to one id")
        self.eos_id, self.unk_id, self.pad_id = vocab[EOS], vocab[UNK], vocab[PAD]
        self.bos_id = self.pad_id
        self._special = {self.eos_id, self.unk_id, self.pad_id}
        starts = {i for p, i in self._vocab.items() if p.startswith(SPIECE_UNDERLINE)}
        self._word_starts = frozenset(starts | {self.eos_id})

    @classmethod
    def load(cls, folder: str | Path) -> SentencePieceTokenizer:
        """From a folder holding source.spm, target.spm and vocab.json; ValueError naming a missing file."""
        folder = Path(folder)
        missing = [f for f in cls.FILES if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"{folder}: no {', '.join(missing)} (a Marian tokenizer needs {', '.join(cls.FILES)})")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if not isinstance(vocab, dict):
            raise ValueError(f"{folder / 'vocab.json'} is not a JSON object of piece -> id")
        return cls(folder / "source.spm", folder / "target.spm", vocab)

    def save_files(self, folder: str | Path) -> None:
        """Write source.spm, target.spm and vocab.json into `folder`."""
        folder = Path(folder)
        (folder / "source.spm").write_bytes(self._source.serialized_model_proto())
        (folder / "target.spm").write_bytes(self._target.serialized_model_proto())
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return max(self._pieces) + 1

    def _ids(self, processor: object, text: str) -> list[int]:
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2:]
        pieces = code + processor.encode(text, out_type=str)  # type: ignore[attr-defined]
        unk = self.unk_id
        return [self._vocab.get(p, unk) for p in pieces]

    def encode(self, text: str) -> list[int]:
        """Source-side ids of `text`, without eos."""
        return self._ids(self._source, text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._ids(self._source, t) for t in texts]

    def encode_target(self, text: str) -> list[int]:
        """Target-side ids of `text` (target.spm), without eos: what training and evaluation compare with."""
        return self._ids(self._target, text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        pieces = [self._pieces.get(i, UNK) for i in ids if i not in self._special]
        return str(self._target.decode_pieces(pieces)).replace(SPIECE_UNDERLINE, " ").strip()

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_token(self, token_id: int) -> str:
        return self._pieces.get(token_id, UNK)

    def starts_word(self, token_id: int) -> bool:
        """Whether `token_id` leaves the word before it complete: a piece that starts a word, or eos."""
        return token_id in self._word_starts


AnyTokenizer = Tokenizer | SentencePieceTokenizer
# The files of each kind, as an entry's manifest names the kind ("tokenizer"): Rosetta's byte-level BPE, or
# Marian's SentencePiece models with their joint vocabulary.
TOKENIZER_FILES = {cls.kind: cls.FILES for cls in (Tokenizer, SentencePieceTokenizer)}


def load_tokenizer(folder: str | Path, kind: str | None = None) -> AnyTokenizer:
    """The tokenizer of `kind` ("bpe" or "sentencepiece") a checkpoint or entry folder holds; without a
    kind, the one its files show. ValueError when it holds none."""
    folder = Path(folder)
    if kind is None:
        if (folder / Tokenizer.FILES[0]).is_file():
            kind = Tokenizer.kind
        elif any((folder / f).exists() for f in SentencePieceTokenizer.FILES):
            kind = SentencePieceTokenizer.kind
        else:
            raise ValueError(f"{folder}: no tokenizer ({' or '.join(map(', '.join, TOKENIZER_FILES.values()))})")
    if kind == Tokenizer.kind:
        return Tokenizer.load(folder / Tokenizer.FILES[0])
    return SentencePieceTokenizer.load(folder)
