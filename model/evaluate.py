"""Evaluation: translate a test file with the PyTorch reference decoder and score it with
sacreBLEU (BLEU and chrF, cased, detokenized, with their signatures)."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.data import pad as pad_batch
from model.decode import decode
from model.transformer import Transformer
from service.engine.batching import batches_by_length
from service.options import DecodingOptions
from service.tokenizer import AnyTokenizer

log = logging.getLogger("rosetta.evaluate")


def read_text(path: str | Path) -> list[str]:
    """Lines of a plain or gzipped text file, without newlines."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [line.rstrip("\n") for line in f]


@dataclass(frozen=True)
class Scores:
    bleu: float
    bleu_signature: str
    chrf: float
    chrf_signature: str
    sentences: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def score(hypotheses: list[str], references: list[str]) -> tuple[float, str, float, str]:
    """Corpus BLEU (13a, cased) and chrF with sacreBLEU's signatures."""
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return b.score, str(bleu.get_signature()), c.score, str(chrf.get_signature())


def translate_texts(
    model: Transformer, tok: AnyTokenizer, sources: list[str], options: DecodingOptions, max_tokens: int = 4096,
    progress: bool = True,
) -> list[str]:
    """Best hypothesis text per source line, in order, with a progress bar."""
    ids = [s + [tok.eos_id] for s in tok.encode_batch(sources)]
    out: list[str] = [""] * len(sources)
    bar = tqdm(total=len(sources), unit="sent", desc="translating", disable=not progress, mininterval=2.0)
    for idx in batches_by_length([len(s) for s in ids], max_tokens, max_sentences=256):
        src = pad_batch([ids[i] for i in idx], model.cfg.pad_id)
        for i, r in zip(idx, decode(model, src, options), strict=True):
            out[i] = tok.decode(r.hypotheses[0].tokens)
        bar.update(len(idx))
    bar.close()
    return out


def evaluate(checkpoint: Path, src_file: Path, ref_file: Path, options: DecodingOptions,
             hyp_out: Path | None = None, max_tokens: int = 4096) -> Scores:
    model, tok = load_checkpoint(checkpoint)
    sources, refs = read_text(src_file), read_text(ref_file)
    if len(sources) != len(refs):
        raise ValueError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(refs)}")
    t0 = time.time()
    hyps = translate_texts(model, tok, sources, options, max_tokens)
    seconds = time.time() - t0
    if hyp_out is not None:
        hyp_out.parent.mkdir(parents=True, exist_ok=True)
        hyp_out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    bleu, bsig, chrf, csig = score(hyps, refs)
    return Scores(bleu, bsig, chrf, csig, len(hyps), seconds)


def evaluate_command(args: argparse.Namespace) -> int:
    from service.cli import build_dataclass

    if args.threads:
        torch.set_num_threads(args.threads)
    options = build_dataclass(DecodingOptions, args)
    scores = evaluate(Path(args.checkpoint), Path(args.src_file), Path(args.ref_file), options,
                      Path(args.hyp_out) if args.hyp_out else None, args.max_tokens)
    print(json.dumps({**scores.to_dict(), "options": options.__dict__}, indent=2))
    return 0
