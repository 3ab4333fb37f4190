"""Choose a checkpoint and its decoding settings on val, never on test: sacreBLEU of exported entries over a
grid of beam sizes and length penalties.

    python -m export.val_sweep /tmp/sel/last/1 /tmp/sel/avg5/1 --beams 5 --length-penalties 1.0
    python -m export.val_sweep /tmp/sel/avg5/1 --beams 4,5,6,8 --length-penalties 0.6,0.8,1.0,1.2

Each entry (an fp32 export of one candidate checkpoint) translates the whole Multi30k val set with the
serving engine (token for token the PyTorch reference's beam search) at every setting of the grid.
Prints a Markdown table, best first, and writes it as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from model.data import read_lines
from model.evaluate import score
from service.options import DecodingOptions


def sweep(entries: list[Path], beams: list[int], penalties: list[float], data_dir: Path) -> list[dict[str, object]]:
    from service.engine import Engine, EngineConfig  # onnxruntime: only when sweeping

    src, ref = read_lines(data_dir, "val", "de"), read_lines(data_dir, "val", "en")
    rows: list[dict[str, object]] = []
    for entry in entries:
        engine = Engine.load(entry, EngineConfig(provider="cpu"))
        for beam in beams:
            for penalty in penalties:
                started = time.perf_counter()
                results = engine.translate_batch(src, DecodingOptions(beam_size=beam, length_penalty=penalty))
                hyps = [r.hypotheses[0].text if r.hypotheses else "" for r in results]
                bleu, signature, chrf, _ = score(hyps, ref)
                rows.append({"entry": str(entry), "beam": beam, "length_penalty": penalty, "bleu": round(bleu, 2),
                             "chrf": round(chrf, 2), "signature": signature})
                print(f"{entry} beam {beam} lp {penalty}: BLEU {bleu:.2f} chrF {chrf:.2f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: -float(r["bleu"]))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", type=Path, help="exported fp32 entries (model_repository/NAME/VERSION)")
    p.add_argument("--beams", default="5")
    p.add_argument("--length-penalties", default="1.0")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = sweep(args.entries, [int(b) for b in args.beams.split(",")],
                 [float(x) for x in args.length_penalties.split(",")], args.data_dir)
    print("| entry | beam | length penalty | val BLEU | val chrF |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['entry']} | {r['beam']} | {r['length_penalty']} | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
