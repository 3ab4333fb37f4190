"""The Marian (OPUS-MT) tokenizer, torch-free, against transformers' own MarianTokenizer: tiny SentencePiece
models trained here on Multi30k, a joint vocab.json built the way Marian's are, every val line compared."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from service.tokenizer import SentencePieceTokenizer  # noqa: E402


def read(data_dir: Path, name: str, limit: int = 0) -> list[str]:
    with gzip.open(data_dir / name, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


@pytest.fixture(scope="module")
def theirs(marian_files: Path) -> Any:
    return transformers.MarianTokenizer(str(marian_files / "source.spm"), str(marian_files / "target.spm"),
                                        str(marian_files / "vocab.json"), source_lang="de", target_lang="en")


@pytest.fixture(scope="module")
def ours(marian_files: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.load(marian_files)


def test_source_ids_equal_marian_tokenizers_on_every_val_line(ours: SentencePieceTokenizer, theirs: Any,
                                                              data_dir: Path) -> None:
    lines = read(data_dir, "val.de.gz")
    expected = [ids[:-1] for ids in theirs(lines)["input_ids"]]  # theirs appends eos; the engine does that itself
    assert ours.encode_batch(lines) == expected
    assert sum(theirs.eos_token_id == ids[-1] for ids in theirs(lines)["input_ids"]) == len(lines)


def test_target_ids_equal_marian_tokenizers_on_every_val_line(ours: SentencePieceTokenizer, theirs: Any,
                                                              data_dir: Path) -> None:
    lines = read(data_dir, "val.en.gz")
    expected = [ids[:-1] for ids in theirs(text_target=lines)["input_ids"]]
    got = [ours.encode_target(line) for line in lines]
    assert got == expected
    assert any(ours.unk_id in ids for ids in got)  # the piece left out of vocab.json comes out as <unk> in both


def test_decoding_equals_marian_tokenizers_and_round_trips(ours: SentencePieceTokenizer, theirs: Any,
                                                           data_dir: Path) -> None:
    lines = read(data_dir, "val.en.gz")
    batch = [ours.encode_target(line) + [ours.eos_id] for line in lines]
    assert ours.decode_batch(batch) == theirs.batch_decode(batch, skip_special_tokens=True)
    unk_free = [(line, ids) for line, ids in zip(lines, batch, strict=True) if ours.unk_id not in ids]
    exact = sum(ours.decode(ids) == line.strip() for line, ids in unk_free)
    assert exact >= 0.99 * len(unk_free), f"{exact}/{len(unk_free)} lines round-trip"


def test_language_code_is_one_token_and_special_ids_come_from_the_vocab(ours: SentencePieceTokenizer,
                                                                        theirs: Any) -> None:
    text = ">>de<< Ein Hund läuft."
    assert ours.encode(text) == theirs(text)["input_ids"][:-1]
    assert ours.encode(text)[0] == theirs.convert_tokens_to_ids(">>de<<")
    assert (ours.eos_id, ours.unk_id, ours.pad_id) == (theirs.eos_token_id, theirs.unk_token_id, theirs.pad_token_id)
    assert ours.bos_id == ours.pad_id  # Marian starts decoding from pad
    assert ours.vocab_size == len(theirs)


def test_a_folder_without_the_marian_files_is_refused_naming_them(tmp_path: Path, marian_files: Path) -> None:
    (tmp_path / "vocab.json").write_text((marian_files / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match="no source.spm, target.spm"):
        SentencePieceTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    for side in ("source", "target"):
        (tmp_path / f"{side}.spm").write_bytes((marian_files / f"{side}.spm").read_bytes())
    with pytest.raises(ValueError, match="lacks the special tokens"):
        SentencePieceTokenizer.load(tmp_path)


def test_a_word_before_a_word_starting_piece_is_complete(ours: SentencePieceTokenizer, data_dir: Path) -> None:
    """Streaming's rule (service/server/translator.py) on target text: where the next piece starts a word,
    the text so far ends at a word boundary of the whole line's text."""
    lines = read(data_dir, "val.en.gz", 200)
    starts = 0
    for line in lines:
        ids = ours.encode_target(line)
        full = ours.decode(ids)
        for n in range(1, len(ids) + 1):
            head = ours.decode(ids[:n])
            after = ids[n] if n < len(ids) else ours.eos_id
            if ours.starts_word(after):
                assert full.startswith(head) and full[len(head):][:1] in ("", " "), (head, full)
                starts += 1
    assert starts > 500 and ours.starts_word(ours.eos_id)
