"""`rosetta translate`: translate with the local engine, stdin (or arguments, or a file) -> stdout.

    rosetta translate "Ein Hund rennt über die Wiese."
    rosetta translate --model de-en --beam-size 4 < test.de > test.en      # progress bar on stderr
    rosetta translate --input test.de.gz --output test.en --num-hypotheses 3 --with-scores

One line in, one line out (empty lines included, in order). With --num-hypotheses N > 1 a sentence
prints N lines `INDEX ||| TEXT ||| SCORE` (Moses n-best format). A progress bar goes to stderr when
the input is a file (--input, or stdin redirected from a regular file); an interactive terminal is
translated line by line as it is typed.

Client mode: service/server_cli.py (registered after this module) adds `--server HOST:PORT` to this
same subcommand and routes the call to a running `rosetta serve` when it is given; this module only
does the local engine. Imports nothing heavy at import time: onnxruntime loads in the handler.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = "models/model_repository"
DEFAULT_MODEL = "de-en"


def register(subparsers: Any) -> None:
    """Add the `translate` subcommand (local engine) to the `rosetta` parser."""
    from service.cli import ENV_PREFIX, add_dataclass_flags
    from service.engine import EngineConfig  # plain dataclasses: onnxruntime loads lazily below
    from service.options import DecodingOptions

    p = subparsers.add_parser(
        "translate", help="translate sentences (arguments, --input or stdin lines) with the local engine",
        description="Translate one sentence per line with a model-repository entry on ONNX Runtime. "
                    "Every flag has a ROSETTA_<FLAG> environment twin.")
    env = os.environ
    p.add_argument("sentences", nargs="*", help="sentences to translate; --input or stdin lines when none")
    p.add_argument("--model", default=env.get(ENV_PREFIX + "MODEL", DEFAULT_MODEL),
                   help="an entry folder (holding manifest.json), or NAME or NAME/VERSION inside "
                        f"--model-repository (env {ENV_PREFIX}MODEL)")
    p.add_argument("--model-repository", default=env.get(ENV_PREFIX + "MODEL_REPOSITORY", DEFAULT_REPOSITORY),
                   help=f"folder of NAME/VERSION entries (env {ENV_PREFIX}MODEL_REPOSITORY)")
    p.add_argument("--input", "-i", default="-", help="input file, one sentence per line (.gz ok); - for stdin")
    p.add_argument("--output", "-o", default="-", help="output file; - for stdout")
    p.add_argument("--with-scores", action="store_true", help="prefix every line with its score and a tab")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr; auto: when the input is a file")
    add_dataclass_flags(p, DecodingOptions)
    add_dataclass_flags(p, EngineConfig)
    p.set_defaults(func=_cmd_translate)


def resolve_entry(model: str, repository: str) -> Path:
    """The entry folder `model` names: a folder holding manifest.json, else NAME[/VERSION] in `repository`."""
    from service.config import ModelSpec

    path = Path(model)
    if (path / "manifest.json").is_file():
        return path
    return ModelSpec.parse(model).resolve(Path(repository))


def _cmd_translate(args: argparse.Namespace) -> int:
    from service.cli import build_dataclass
    from service.engine import Engine, EngineConfig, ModelEntryError
    from service.options import DecodingOptions

    try:
        options = build_dataclass(DecodingOptions, args)
        entry = resolve_entry(args.model, args.model_repository)
        engine = Engine.load(entry, build_dataclass(EngineConfig, args))
    except (ValueError, FileNotFoundError) as err:  # ModelEntryError is a ValueError
        kind = "bad model entry" if isinstance(err, ModelEntryError) else "error"
        print(f"rosetta translate: {kind}: {err}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        out = _open_output(args.output, stack)
        if args.sentences:
            lines, from_file = list(args.sentences), False
        else:
            source, from_file = _open_input(args.input, stack)
            if not from_file and source.isatty():
                return _interactive(engine, options, source, out, args.with_scores)
            lines = [line.rstrip("\n") for line in source]
        progress = args.progress == "on" or (args.progress == "auto" and from_file)
        try:
            _translate_all(engine, options, lines, out, args.with_scores, progress)
        except ValueError as err:  # a sentence over the model's length limit
            print(f"rosetta translate: {err}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `| head`: the reader left; not an error
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
    return 0


def _translate_all(engine: Any, options: Any, lines: list[str], out: IO[str], with_scores: bool,
                   progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=len(lines), unit="sent", desc="translating", disable=not progress, file=sys.stderr,
              mininterval=0.5) as bar:
        results = engine.translate_batch(lines, options, progress=bar.update)
    for i, result in enumerate(results):
        for line in _format(i, result, options.num_hypotheses, with_scores):
            out.write(line + "\n")
    out.flush()


def _interactive(engine: Any, options: Any, source: IO[str], out: IO[str], with_scores: bool) -> int:
    for i, line in enumerate(source):
        try:
            (result,) = engine.translate_batch([line.rstrip("\n")], options)
        except ValueError as err:
            print(f"rosetta translate: {err}", file=sys.stderr)
            continue
        for text in _format(i, result, options.num_hypotheses, with_scores):
            out.write(text + "\n")
        out.flush()
    return 0


def _format(index: int, result: Any, n_best: int, with_scores: bool) -> Iterator[str]:
    if n_best > 1:
        for h in result.hypotheses:
            yield f"{index} ||| {h.text} ||| {h.score:.6f}"
        return
    best = result.hypotheses[0] if result.hypotheses else None
    text = best.text if best is not None else ""
    yield f"{best.score:.6f}\t{text}" if with_scores and best is not None else text


def _open_input(name: str, stack: ExitStack) -> tuple[IO[str], bool]:
    """(text stream, whether it is a regular file)."""
    if name == "-":
        try:
            regular = stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)
        except (OSError, ValueError):  # stdin replaced by a non-file object
            regular = False
        return sys.stdin, regular
    opener = gzip.open if name.endswith(".gz") else open
    return stack.enter_context(opener(name, "rt", encoding="utf-8")), True  # type: ignore[operator]


def _open_output(name: str, stack: ExitStack) -> IO[str]:
    if name == "-":
        return sys.stdout
    return stack.enter_context(open(name, "w", encoding="utf-8"))
