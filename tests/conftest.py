"""Fixtures shared by every test package: where the data is, and a tiny trained checkpoint."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Multi30k raw text: ../shared/data/multi30k beside the checkout, or $ROSETTA_DATA_DIR."""
    path = Path(os.environ.get("ROSETTA_DATA_DIR", REPO.parent / "shared" / "data" / "multi30k"))
    if not (path / "val.de.gz").exists():
        pytest.fail(f"Multi30k data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 2+2-layer d_model-32 model trained for a few seconds to copy German sentences."""
    pytest.importorskip("torch")
    from model.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", data_dir)


@pytest.fixture(scope="session")
def tiny_repository_entry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """`tiny_checkpoint` exported to an fp32 model-repository entry folder (.../model_repository/tiny/1).

    Holds encoder.onnx, decoder.onnx, tokenizer.json and manifest.json (see export/manifest.py).
    """
    pytest.importorskip("onnx")
    from export.api import export_entry

    return export_entry(tiny_checkpoint, tmp_path_factory.mktemp("model_repository") / "tiny" / "1")


SPECIAL_MARIAN = ("</s>", "<unk>")  # ids 0 and 1 in OPUS-MT vocabularies; <pad> is the last id


def _lines(path: Path, limit: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for _, line in zip(range(limit), f, strict=False)]


@pytest.fixture(scope="session")
def marian_files(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """source.spm (de), target.spm (en) and a joint vocab.json, as an OPUS-MT folder holds them: tiny unigram
    SentencePiece models trained on Multi30k; ids </s> 0, <unk> 1, a >>de<< language code, the pieces, <pad> last;
    one frequent target piece left out, so it must come out as <unk>."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("marian")
    for side, lang in (("source", "de"), ("target", "en")):
        corpus = folder / f"{lang}.txt"
        corpus.write_text("\n".join(_lines(data_dir / f"train.{lang}.gz", 8000)) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / side), vocab_size=600, model_type="unigram",
            character_coverage=1.0, bos_id=-1, eos_id=0, unk_id=1, pad_id=-1, minloglevel=2)
        (folder / f"{side}.model").rename(folder / f"{side}.spm")
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_MARIAN)}
    vocab[">>de<<"] = len(vocab)  # a language code, as multilingual OPUS-MT vocabularies have
    for side in ("source", "target"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if piece not in vocab and not sp.is_control(i) and not sp.is_unknown(i):
                vocab[piece] = len(vocab)
    # One frequent target piece left out of the vocabulary: it must come out as <unk> on both sides.
    target = sentencepiece.SentencePieceProcessor(model_file=str(folder / "target.spm"))
    counts = Counter(p for line in _lines(data_dir / "val.en.gz", 200) for p in target.encode(line, out_type=str))
    dropped = next(p for p, _ in counts.most_common() if p in vocab and p not in SPECIAL_MARIAN)
    pieces = [p for p in sorted(vocab, key=vocab.__getitem__) if p != dropped] + ["<pad>"]
    vocab = {p: i for i, p in enumerate(pieces)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return folder
