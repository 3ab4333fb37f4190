"""The `rosetta` command. Each part registers its subcommands (SUBCOMMAND_MODULES) and imports its
side lazily, so serving never imports torch.

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
SUBCOMMAND_MODULES = ("model.cli", "export.cli", "service.engine_cli", "service.server_cli")


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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="rosetta", description="Transformer translation: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    # Subcommands owned by other parts of the codebase: each module has register(subparsers)
    # and must not import torch at import time.
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
