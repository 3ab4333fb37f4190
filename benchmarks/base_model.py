"""A base-size model with random weights for the engine benchmark: where GEMMs dominate a step.

    python benchmarks/base_model.py /tmp/rosetta-base [--sentences 1000]

Writes into OUT:
- checkpoint/   a Transformer of the paper's base size (d_model 512, 6+6 layers, 8 heads, d_ff 2048,
                vocabulary 32000) with its initial random weights, and a word-level tokenizer whose
                32000 tokens are "<pad> <s> </s> <unk> w4 ... w31999";
- model_repository/base/1, model_repository/base-int8/1   its fp32 and int8 entries (`export_entry`);
- sources.txt   random sentences of those words, their lengths drawn from test_2016_flickr's (BPE tokens).

Random weights translate nothing, so the benchmark fixes every output's length instead of scoring it
(`engine_benchmark.py --fixed-length N`): every system generates exactly N tokens per sentence, and the
CTranslate2 conversion (benchmarks/ct2_convert.py, the same one as for the real model) is checked against
PyTorch's log-probs as usual. Then:

    python benchmarks/engine_benchmark.py --checkpoint OUT/checkpoint \\
        --fp32 OUT/model_repository/base/1 --int8 OUT/model_repository/base-int8/1 \\
        --source OUT/sources.txt --fixed-length 24 --ct2-dir OUT/ct2 --out benchmarks/results/base
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from service.tokenizer import Tokenizer

BASE = ModelConfig(vocab_size=32000, d_model=512, heads=8, encoder_layers=6, decoder_layers=6, d_ff=2048,
                   dropout=0.0, attention_dropout=0.0, max_positions=256)
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3, as ModelConfig's pad/bos/eos/unk


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A whitespace word-level tokenizer of `vocab_size` tokens: the specials, then w4, w5, ..."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab_size)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    hf.add_special_tokens(list(SPECIALS))
    return Tokenizer(hf)


def source_lengths(data_dir: Path, n: int) -> list[int]:
    """Token counts of the first n test_2016_flickr sentences under the shipped model's BPE tokenizer."""
    lines = gzip.open(data_dir / "test_2016_flickr.de.gz", "rt", encoding="utf-8").read().splitlines()[:n]
    tok = Tokenizer.load(Path(__file__).resolve().parents[1] / "models" / "de-en" / "tokenizer.json")
    return [len(ids) for ids in tok.encode_batch(lines)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from export.api import export_entry

    torch.manual_seed(args.seed)
    model = Transformer(BASE).eval()
    checkpoint = args.out / "checkpoint"
    save_checkpoint(checkpoint, model, word_tokenizer(BASE.vocab_size))
    rng = np.random.default_rng(args.seed)
    lines = [" ".join(f"w{w}" for w in rng.integers(len(SPECIALS), BASE.vocab_size, n))
             for n in source_lengths(args.data_dir, args.sentences)]
    (args.out / "sources.txt").write_text("\n".join(lines) + "\n")
    repo = args.out / "model_repository"
    for name, precision in (("base", "fp32"), ("base-int8", "int8")):
        print(f"exporting {precision} ...", file=sys.stderr)
        export_entry(checkpoint, repo / name / "1", precision=precision, int8_form="avx2", check=precision == "fp32")
    print(f"{checkpoint}\n{repo / 'base' / '1'}\n{repo / 'base-int8' / '1'}\n{args.out / 'sources.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
