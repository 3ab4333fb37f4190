"""The model side of the `rosetta` command: train, average, package, evaluate (need the train extra).

Registered by `service.cli` like every other part's subcommands; nothing here imports torch until a
subcommand runs, so `rosetta serve` never does.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from model.config import TrainConfig  # torch-free dataclasses
    from service.cli import add_dataclass_flags
    from service.options import DecodingOptions

    p = sub.add_parser("train", help="train a Transformer on a Multi30k language pair (needs the train extra)")
    add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("average", help="average the last N epoch checkpoints of a run")
    p.add_argument("run", help="run folder (TrainConfig.out_dir)")
    p.add_argument("--last", type=int, default=5)
    p.set_defaults(func=_cmd_average)

    p = sub.add_parser("package", help="copy a checkpoint folder for shipping, optionally with fp16 weights")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    p.set_defaults(func=_cmd_package)

    p = sub.add_parser("import", help="import a model from another toolkit's local folder (needs the train extra)")
    kinds = p.add_subparsers(dest="kind", required=True)
    m = kinds.add_parser("marian", help="a transformers Marian (OPUS-MT) folder -> a Rosetta checkpoint",
                         description="Reads config.json, the weights, source.spm, target.spm and vocab.json of a "
                                     "local transformers Marian folder (nothing is downloaded) and writes a Rosetta "
                                     "checkpoint that `rosetta export` and `rosetta serve` take unchanged.")
    m.add_argument("folder", help="the transformers Marian folder (e.g. from huggingface-cli download)")
    m.add_argument("--out", required=True, help="the checkpoint folder to write (must not exist)")
    m.set_defaults(func=_cmd_import_marian)

    p = sub.add_parser("evaluate", help="sacreBLEU + chrF of a checkpoint on a test file pair")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("--src-file", required=True, help="source sentences, one per line (.gz ok)")
    p.add_argument("--ref-file", required=True, help="reference translations, aligned by line")
    p.add_argument("--hyp-out", default=None, help="where to write the hypotheses (default: next to nothing)")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded source tokens per batch")
    p.add_argument("--threads", type=int, default=0)
    add_dataclass_flags(p, DecodingOptions)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    from model.config import TrainConfig
    from model.train import train
    from service.cli import build_dataclass

    print(train(build_dataclass(TrainConfig, args)))
    return 0


def _cmd_import_marian(args: argparse.Namespace) -> int:
    from model.marian import MarianImportError, import_marian

    try:
        print(import_marian(args.folder, args.out))
    except MarianImportError as err:
        print(f"rosetta import marian: {err}")
        return 1
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from model.train import average_last
    from service.tokenizer import Tokenizer

    run = Path(args.run)
    print(average_last(run, args.last, Tokenizer.load(run / "tokenizer.json")))
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint

    model, tok = load_checkpoint(Path(args.checkpoint))
    dtype = torch.float16 if args.fp16 else None
    save_checkpoint(Path(args.out), model, tok, dtype=dtype, metadata={"packaged_from": str(args.checkpoint)})
    print(args.out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import evaluate_command

    return evaluate_command(args)
