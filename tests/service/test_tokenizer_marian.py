"""The Marian (OPUS-MT) tokenizer, torch-free, against transformers' own MarianTokenizer: tiny SentencePiece
models trained here on Multi30k, a joint vocab.json built the way Marian's are, every val line compared."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from service.tokenizer import SentencePieceTokenizer  # noqa: E402

SPECIAL = ("</s>", "<unk>")  # ids 0 and 1 in OPUS-MT vocabularies; <pad> is the last id


def read(data_dir: Path, name: str, limit: int = 0) -> list[str]:
    with gzip.open(data_dir / name, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


@pytest.fixture(scope="module")
def marian_files(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """source.spm (de), target.spm (en) and a joint vocab.json, as an OPUS-MT folder holds them."""
    folder = tmp_path_factory.mktemp("marian")
    for side, lang in (("source", "de"), ("target", "en")):
        corpus = folder / f"{lang}.txt"
        corpus.write_text("\n".join(read(data_dir, f"train.{lang}.gz", 8000)) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / side), vocab_size=600, model_type="unigram",
            character_coverage=1.0, bos_id=-1, eos_id=0, unk_id=1, pad_id=-1, minloglevel=2)
        (folder / f"{side}.model").rename(folder / f"{side}.spm")
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL)}
    vocab[">>de<<"] = len(vocab)  # a language code, as multilingual OPUS-MT vocabularies have
    for side in ("source", "target"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if piece not in vocab and not sp.is_control(i) and not sp.is_unknown(i):
                vocab[piece] = len(vocab)
    # One frequent target piece left out of the vocabulary: it must come out as <unk> on both sides.
    target = sentencepiece.SentencePieceProcessor(model_file=str(folder / "target.spm"))
    counts = Counter(p for line in read(data_dir, "val.en.gz", 200) for p in target.encode(line, out_type=str))
    dropped = next(p for p, _ in counts.most_common() if p in vocab and p not in SPECIAL)
    pieces = [p for p in sorted(vocab, key=vocab.__getitem__) if p != dropped] + ["<pad>"]
    vocab = {p: i for i, p in enumerate(pieces)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return folder


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
