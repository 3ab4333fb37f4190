"""The subword tokenizer: lossless round trip and no failure on odd input."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import read_lines
from model.tokenizer import train_tokenizer
from service.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "de-en" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(SHIPPED)


def test_special_ids_are_fixed(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert 7000 <= tok.vocab_size <= 9000


@pytest.mark.parametrize("lang", ["de", "en"])
def test_round_trip_is_exact_on_every_val_line(tok: Tokenizer, data_dir: Path, lang: str) -> None:
    lines = read_lines(data_dir, "val", lang)
    decoded = tok.decode_batch(tok.encode_batch(lines))
    mismatches = [(a, b) for a, b in zip(lines, decoded, strict=True) if a != b]
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  two  spaces and\ttab ",
        "Emoji 😀🚲 and CJK 漢字 and Ω",
        "control\x00chars\x07\x1b[0m\r\n",
        "UPPER lower MiXeD, punctuation!?;:«»„“",
        "x" * 20000,
        "Ein Mann fährt Fahrrad. " * 500,
    ],
    ids=["empty", "space", "whitespace", "emoji", "control", "case-punct", "long-word", "long-text"],
)
def test_odd_input_neither_crashes_nor_loses_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert (len(ids) == 0) == (text == "")


def test_tokenizer_learns_from_any_corpus_and_saves_to_one_file(tmp_path: Path) -> None:
    t = train_tokenizer(["hallo welt", "hello world", "bonjour le monde"] * 10, vocab_size=300)
    t.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode("hello welt") == t.encode("hello welt")
    assert again.decode(again.encode("Ünïcödé ✓")) == "Ünïcödé ✓"


def test_a_word_before_a_word_starting_token_is_complete(tok: Tokenizer, data_dir: Path) -> None:
    """What streaming relies on (service/server/translator.py): cut a val line's ids anywhere the next token
    starts a word (or at the end) and the text of the part before is the line's text up to a word boundary;
    cut where it does not, and the next token extends the last word."""
    lines = read_lines(data_dir, "val", "en")[:300]
    starts = ends = 0
    for ids in tok.encode_batch(lines):
        full = tok.decode(ids)
        for n in range(1, len(ids) + 1):
            head = tok.decode(ids[:n])
            assert full.startswith(head)
            after = ids[n] if n < len(ids) else tok.eos_id
            rest = full[len(head):]
            if tok.starts_word(after):
                assert rest == "" or rest[:1].isspace(), (head, rest)
                starts += 1
            else:
                assert rest and not rest[:1].isspace(), (head, rest)
                ends += 1
    assert starts > 1000 and ends > 100
    assert tok.starts_word(tok.eos_id) and not tok.starts_word(tok.encode("dog")[0])
