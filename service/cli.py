"""The `rosetta` command. Subcommands import their side lazily, so serving never imports torch.

Every setting of a config dataclass is a flag (`--peak-lr`) with an environment-variable twin
(`ROSETTA_PEAK_LR`); a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

ENV_PREFIX = "ROSETTA_"
SUBCOMMAND_MODULES = ("export.cli", "service.engine_cli", "service.server_cli")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of `cls` (nested dataclasses flattened), default from the environment."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_flags(parser, tp, skip)  # type: ignore[arg-type]
            continue
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # a nested field sharing a name: one flag sets both
            continue
        env = ENV_PREFIX + f.name.upper()
        origin = typing.get_origin(tp)
        if tp is bool:
            conv: Any = _parse_bool
        elif origin is tuple:
            conv = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
        elif tp in (int, float, str):
            conv = tp
        else:
            conv = str
        default = conv(os.environ[env]) if env in os.environ else argparse.SUPPRESS
        parser.add_argument(flag, type=conv, default=default, help=f"(env {env})")


def build_dataclass(cls: type, args: argparse.Namespace) -> Any:
    """Instantiate `cls` from parsed flags; fields not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_dataclass(tp, args)  # type: ignore[arg-type]
        elif hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    from model.config import TrainConfig
    from model.train import train

    cfg = build_dataclass(TrainConfig, args)
    print(train(cfg))
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.train import average_last
    from service.tokenizer import Tokenizer

    run = Path(args.run)
    print(average_last(run, args.last, Tokenizer.load(run / "tokenizer.json")))
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def main(argv: Sequence[str] | None = None) -> int:
    from service.options import DecodingOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="rosetta", description="Transformer translation: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a Transformer on a Multi30k language pair (needs the train extra)")
    from model.config import TrainConfig  # torch-free dataclasses

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

    p = sub.add_parser("evaluate", help="sacreBLEU + chrF of a checkpoint on a test file pair")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("--src-file", required=True, help="source sentences, one per line (.gz ok)")
    p.add_argument("--ref-file", required=True, help="reference translations, aligned by line")
    p.add_argument("--hyp-out", default=None, help="where to write the hypotheses (default: next to nothing)")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded source tokens per batch")
    p.add_argument("--threads", type=int, default=0)
    add_dataclass_flags(p, DecodingOptions)
    p.set_defaults(func=_cmd_evaluate)

    # Subcommands owned by other parts of the codebase: each module has register(subparsers)
    # and must not import torch at import time.
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # part not built yet
            if err.name != name:
                raise
            continue
        module.register(sub)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
