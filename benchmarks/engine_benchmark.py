"""Side-by-side CPU benchmark: this engine (fp32, int8), the PyTorch reference, CTranslate2 (fp32, int8).

    python benchmarks/engine_benchmark.py --checkpoint runs/de-en/averaged \\
        --fp32 models/model_repository/de-en/1 --int8 models/model_repository/de-en-int8/1 \\
        [--sentences 1000] [--batch-sizes 32,1] [--out benchmarks/results]

test_2016_flickr DE->EN, beam 4, every system on the same sentences in chunks of 250 (each chunk sorted
by length and cut into batches of --batch-sizes sentences), with all cores of the machine:
- engine-fp32 / engine-int8: `Engine.translate_batch` with its measured CPU threading (one intra-op
  thread per call, one batch per core);
- engine-fp32-procs / engine-int8-procs: the same with `EngineConfig(worker_processes=cores)`: one
  engine per worker process, one batch per core, no shared GIL (CPU time and peak RSS include the
  workers);
- pytorch: `model.decode` (the reference beam search) with torch using every core;
- ct2-fp32 / ct2-int8: CTranslate2 on the same weights (converted by benchmarks/ct2_convert.py and
  checked against PyTorch first), inter_threads = cores, intra_threads = 1 (its best setting on 2 cores).
Each (system, batch size) runs in its own child process, so peak memory (max RSS) is per system; the
engine's child never imports torch. Reports sentences/s, target tokens/s (generated tokens, eos
excluded), process CPU time per sentence, peak RSS (VmHWM) and sacreBLEU (median of --repeat
rounds, every round running every system once), as a Markdown table
(stdout and OUT/engine_benchmark.md), JSON and a PNG (OUT/engine_benchmark.png). Progress bars go
to stderr. Loading and one warm-up call are excluded from the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.options import DecodingOptions

CHUNK = 250  # sentences per call: every system gets the same chunks, each sorted by length inside
# The CPU comparison; -procs: the engine's internal batches in worker processes (EngineConfig.worker_processes).
SYSTEMS = ("engine-fp32", "engine-int8", "engine-fp32-procs", "engine-int8-procs", "pytorch", "ct2-fp32", "ct2-int8")
# On a GPU (--device cuda) compare fp32 and fp16 instead: engine-fp16 (needs --fp16) and ct2-fp16.
BEAM = 4
# One absolute length cap for every system (CTranslate2 has no cap relative to the source length):
# at most MAX_LENGTH tokens with eos for us, i.e. MAX_LENGTH - 1 decoding steps before eos in CTranslate2.
MAX_LENGTH = 256


FIXED_LENGTH = 0  # --fixed-length: every output exactly this many tokens with eos (models with random weights)


def options() -> DecodingOptions:
    if FIXED_LENGTH:  # eos blocked before the last step, forced at it
        return DecodingOptions(beam_size=BEAM, min_decoding_length=FIXED_LENGTH - 1, max_decoding_length=FIXED_LENGTH,
                               max_decoding_length_ratio=0.0)
    return DecodingOptions(beam_size=BEAM, max_decoding_length=MAX_LENGTH, max_decoding_length_ratio=0.0)


def ct2_lengths() -> dict[str, int]:
    """CTranslate2's length options for `options()`: its lengths count tokens without eos."""
    if FIXED_LENGTH:
        return dict(min_decoding_length=FIXED_LENGTH - 1, max_decoding_length=FIXED_LENGTH - 1)
    return dict(max_decoding_length=MAX_LENGTH - 1)


def source_lines(args: argparse.Namespace) -> list[str]:
    """--source's lines, or test_2016_flickr's German side."""
    if args.source:
        return Path(args.source).read_text(encoding="utf-8").splitlines()
    return read(args.data_dir / "test_2016_flickr.de.gz")


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def read(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


# -- children: one system at one batch size -------------------------------------------------------------


def _worker_pids(engine: Any) -> list[int]:
    pool = engine._processes  # noqa: SLF001  the engine's worker processes (worker_processes > 0)
    return [] if pool is None else [p.pid for p in pool._processes.values()]  # noqa: SLF001


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_engine(entry: str, lines: list[str], batch: int, device: str,
               processes: int = 0) -> tuple[list[str], list[int], float, float, float]:
    """(texts, lengths, seconds, CPU seconds, extra peak RSS MB of worker processes)."""
    from tqdm import tqdm

    from service.engine import Engine, EngineConfig

    engine = Engine.load(entry, EngineConfig(provider=device, max_batch_sentences=batch, max_batch_tokens=1 << 30,
                                             worker_processes=processes))
    opts = options()
    # Warm-up: first-run allocations; with worker processes, enough batches to start all of them.
    engine.translate_batch(lines[: 8 if not processes else 4 * processes * batch], opts)
    workers = _worker_pids(engine)
    texts: list[str] = []
    lengths: list[int] = []
    worker_cpu = sum(_proc_cpu_seconds(pid) for pid in workers)
    started, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=len(lines), desc=f"engine b{batch}", unit="sent", file=sys.stderr) as bar:
        for start in range(0, len(lines), CHUNK):
            for r in engine.translate_batch(lines[start:start + CHUNK], opts, progress=bar.update):
                texts.append(r.hypotheses[0].text)
                lengths.append(len(r.hypotheses[0].tokens))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    cpu += sum(_proc_cpu_seconds(pid) for pid in workers) - worker_cpu
    worker_rss = sum(_proc_peak_rss_mb(pid) for pid in workers)
    engine.close()
    return texts, lengths, seconds, cpu, worker_rss


def run_pytorch(checkpoint: str, lines: list[str], batch: int,
                device: str) -> tuple[list[str], list[int], float, float]:
    import torch
    from tqdm import tqdm

    from model.checkpoint import load_checkpoint
    from model.data import pad
    from model.decode import batches_by_length, decode

    torch.set_num_threads(cores())
    model, tok = load_checkpoint(Path(checkpoint), device=device)
    opts = options()
    ids = [s + [tok.eos_id] for s in tok.encode_batch(lines)]
    decode(model, pad(ids[:8], model.cfg.pad_id).to(device), opts)  # warm-up
    texts: list[str] = [""] * len(lines)
    lengths = [0] * len(lines)
    started, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=len(lines), desc=f"pytorch b{batch}", unit="sent", file=sys.stderr) as bar:
        for start in range(0, len(lines), CHUNK):
            chunk = list(range(start, min(start + CHUNK, len(lines))))
            for idx in batches_by_length([len(ids[i]) for i in chunk], 1 << 30, batch):
                rows = [chunk[j] for j in idx]
                src = pad([ids[i] for i in rows], model.cfg.pad_id).to(device)
                for i, r in zip(rows, decode(model, src, opts), strict=True):
                    texts[i] = tok.decode(r.hypotheses[0].tokens)
                    lengths[i] = len(r.hypotheses[0].tokens)
                bar.update(len(rows))
    return texts, lengths, time.perf_counter() - started, time.process_time() - cpu


def run_ct2(ct2_dir: str, tokenizer: str, lines: list[str], batch: int, compute_type: str,
            device: str) -> tuple[list[str], list[int], float, float]:
    import ctranslate2
    from tokenizers import Tokenizer
    from tqdm import tqdm

    hf = Tokenizer.from_file(tokenizer)
    threads = dict(inter_threads=cores(), intra_threads=1) if device == "cpu" else {}
    translator = ctranslate2.Translator(ct2_dir, device=device, compute_type=compute_type, **threads)
    src = [hf.encode(s, add_special_tokens=False).tokens + ["</s>"] for s in lines]
    kwargs: dict[str, Any] = dict(beam_size=BEAM, max_batch_size=batch, **ct2_lengths())
    translator.translate_batch(src[:8], **kwargs)  # warm-up
    texts: list[str] = []
    lengths: list[int] = []
    started, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=len(lines), desc=f"{compute_type} ct2 b{batch}", unit="sent", file=sys.stderr) as bar:
        for start in range(0, len(lines), CHUNK):
            for r in translator.translate_batch(src[start:start + CHUNK], **kwargs):
                out = [hf.token_to_id(t) for t in r.hypotheses[0]]
                texts.append(hf.decode([i for i in out if i is not None], skip_special_tokens=True))
                lengths.append(len(out))
            bar.update(min(CHUNK, len(lines) - start))
    return texts, lengths, time.perf_counter() - started, time.process_time() - cpu


def child(args: argparse.Namespace) -> int:
    lines = source_lines(args)[: args.sentences]
    system = args.child
    extra_rss = 0.0
    if system.startswith("engine-"):
        precision = system.split("-")[1]
        entry = {"fp32": args.fp32, "int8": args.int8, "fp16": args.fp16}[precision]
        processes = cores() if system.endswith("-procs") else 0
        texts, lengths, seconds, cpu, extra_rss = run_engine(entry, lines, args.batch, args.device, processes)
    elif system == "pytorch":
        texts, lengths, seconds, cpu = run_pytorch(args.checkpoint, lines, args.batch, args.device)
    else:
        compute_type = {"ct2-fp32": "float32", "ct2-int8": "int8", "ct2-fp16": "float16"}[system]
        tokenizer = str(Path(args.fp32) / "tokenizer.json")
        texts, lengths, seconds, cpu = run_ct2(str(args.ct2_dir), tokenizer, lines, args.batch, compute_type,
                                               args.device)
    print(json.dumps({"texts": texts, "lengths": lengths, "decode_seconds": seconds, "cpu_seconds": cpu,
                      "peak_rss_mb": peak_rss_mb() + extra_rss,
                      "torch_imported": "torch" in sys.modules}))
    return 0


# -- parent: every system, table, PNG ------------------------------------------------------------------


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run one child process; it times its translation loop itself (loading and warm-up excluded)."""
    out = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, check=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def prepare_ct2(args: argparse.Namespace) -> None:
    import ct2_convert  # benchmarks/ct2_convert.py

    ct2_convert.convert_once(Path(args.checkpoint), args.ct2_dir)
    lines = source_lines(args)[:100]
    report = ct2_convert.check(Path(args.checkpoint), args.ct2_dir, lines)
    print(f"CTranslate2 conversion check: {report}", file=sys.stderr)


# (system, baseline): the comparisons the bars are about
RATIOS = [("engine-fp32", "ct2-fp32"), ("engine-int8", "ct2-int8"), ("engine-fp32-procs", "ct2-fp32"),
          ("engine-int8-procs", "ct2-int8"), ("engine-fp32", "pytorch"), ("engine-fp16", "ct2-fp16"),
          ("engine-fp16", "pytorch")]


def ratios(samples: dict[tuple[str, int], list[dict[str, Any]]], batches: list[int]) -> list[dict[str, Any]]:
    """sentences/s of a system over its baseline's, round by round (both ran in the same round), and the median."""
    out = []
    for batch in batches:
        for system, base in RATIOS:
            mine = {r["round"]: r["sentences_per_s"] for r in samples.get((system, batch), [])}
            theirs = {r["round"]: r["sentences_per_s"] for r in samples.get((base, batch), [])}
            per_round = [mine[k] / theirs[k] for k in sorted(mine) if k in theirs]
            if per_round:
                out.append({"system": system, "baseline": base, "batch": batch,
                            "rounds": [round(x, 3) for x in per_round], "median": statistics.median(per_round)})
    return out


def ratio_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "\n| system / baseline | batch | per round | median |\n|---|---:|---|---:|\n"
    return head + "".join(f"| {r['system']} / {r['baseline']} | {r['batch']} | "
                          f"{', '.join(f'{x:.2f}' for x in r['rounds'])} | {r['median']:.2f}x |\n" for r in rows)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| system | batch | sentences/s (median) | rounds | target tokens/s | CPU ms/sentence | peak RSS (MB) "
            "| BLEU | same output as engine-fp32 |\n|---|---:|---:|---|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['system']} | {r['batch']} | {r['sentences_per_s']:.1f} | "
                   f"{', '.join(f'{x:.0f}' for x in r['rounds_sentences_per_s'])} | {r['tokens_per_s']:.0f} | "
                   f"{r['cpu_ms_per_sentence']:.0f} | {r['peak_rss_mb']:.0f} | {r['bleu']:.2f} | "
                   f"{r['same_as_engine_fp32']} |\n" for r in rows)
    return head + body


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows}, reverse=True)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4.2))
    palette = {"engine-fp32": "#1f77b4", "engine-int8": "#6baed6", "engine-fp32-procs": "#08519c",
               "engine-int8-procs": "#9ecae1", "engine-fp16": "#3182bd", "pytorch": "#d62728",
               "ct2-fp32": "#2ca02c", "ct2-int8": "#98df8a", "ct2-fp16": "#74c476"}
    spare = iter(plt.get_cmap("tab10").colors)
    colors = {s: palette.get(s) or next(spare) for s in systems}
    for ax, b in zip(axes, batches, strict=False):
        vals = [next((r["sentences_per_s"] for r in rows if r["system"] == s and r["batch"] == b), 0.0)
                for s in systems]
        bars = ax.bar(systems, vals, color=[colors[s] for s in systems])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(f"beam {BEAM}, batch {b}: sentences/s")
        ax.tick_params(axis="x", rotation=30)
    ax = axes[-1]
    mem = [max(r["peak_rss_mb"] for r in rows if r["system"] == s) for s in systems]
    bars = ax.bar(systems, mem, color=[colors[s] for s in systems])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title("peak RSS (MB), max over batch sizes")
    ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parent(args: argparse.Namespace) -> int:
    import sacrebleu

    systems = [s for s in args.systems.split(",") if s]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if any(s.startswith("ct2") for s in systems):
        prepare_ct2(args)
    refs = None if args.source else read(args.data_dir / "test_2016_flickr.en.gz")[: args.sentences]
    common = ["--data-dir", str(args.data_dir), "--sentences", str(args.sentences), "--checkpoint", args.checkpoint,
              "--fp32", args.fp32, "--int8", args.int8, "--fp16", args.fp16, "--ct2-dir", str(args.ct2_dir),
              "--device", args.device, "--source", args.source, "--fixed-length", str(args.fixed_length)]
    # Rounds: every (system, batch) once per round, so slow drifts of the machine hit all alike, each round
    # starting one system later (a drift within a round does not always favour the same systems); each cell
    # reports the median round (by sentences/s), each ratio the median of its per-round ratios.
    runs = [(r, s, b) for r in range(args.repeat) for b in batches
            for s in systems[r % len(systems):] + systems[: r % len(systems)]]
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    outputs: dict[tuple[str, int], list[str]] = {}
    for n, (rnd, system, batch) in enumerate(runs, 1):
        print(f"[{n}/{len(runs)}] round {rnd + 1}: {system}, batch {batch}", file=sys.stderr)
        started = time.perf_counter()
        res = run_child(["--child", system, "--batch", str(batch), *common])
        print(f"    {time.perf_counter() - started:.1f}s", file=sys.stderr)
        outputs[(system, batch)] = res["texts"]
        seconds = res["decode_seconds"]  # the translation loop only: no loading, no warm-up
        samples.setdefault((system, batch), []).append({
            "system": system, "batch": batch, "round": rnd, "seconds": seconds, "torch_imported": res["torch_imported"],
            "sentences_per_s": len(res["texts"]) / seconds, "tokens_per_s": sum(res["lengths"]) / seconds,
            "peak_rss_mb": res["peak_rss_mb"], "cpu_ms_per_sentence": 1000 * res["cpu_seconds"] / len(res["texts"]),
            "bleu": float("nan") if refs is None else sacrebleu.corpus_bleu(res["texts"], [refs]).score})
    rows: list[dict[str, Any]] = []
    for runs_of_cell in samples.values():
        ranked = sorted(runs_of_cell, key=lambda r: r["sentences_per_s"])
        row = dict(ranked[len(ranked) // 2])
        row["rounds_sentences_per_s"] = [round(r["sentences_per_s"], 1) for r in runs_of_cell]
        rows.append(row)
    for r in rows:
        base = outputs.get(("engine-fp32", r["batch"]))
        mine = outputs[(r["system"], r["batch"])]
        r["same_as_engine_fp32"] = "-" if base is None else \
            f"{100 * sum(a == b for a, b in zip(mine, base, strict=True)) / len(base):.1f}%"
    args.out.mkdir(parents=True, exist_ok=True)
    ratio_rows = ratios(samples, batches)
    md = table(rows) + ratio_table(ratio_rows)
    where = f"{cores()} CPU cores" if args.device == "cpu" else "GPU"
    data = f"{Path(args.source).name}" if args.source else "test_2016_flickr DE->EN"
    fixed = f", every output {args.fixed_length} tokens" if args.fixed_length else ""
    title = f"{data}, {args.sentences} sentences, beam {BEAM}{fixed}, {where} ({time.strftime('%Y-%m-%d')})"
    stem = "engine_benchmark" if args.device == "cpu" else "engine_benchmark_gpu"
    (args.out / f"{stem}.md").write_text(f"{title}\n\n{md}")
    (args.out / f"{stem}.json").write_text(json.dumps({"title": title, "rows": rows, "ratios": ratio_rows},
                                                      indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png", title)
    print(f"\n{title}\n\n{md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder: the PyTorch reference and CT2 source")
    parser.add_argument("--fp32", required=True, help="fp32 model-repository entry exported from --checkpoint")
    parser.add_argument("--int8", required=True, help="int8 model-repository entry exported from --checkpoint")
    parser.add_argument("--fp16", default="", help="fp16 entry (GPU runs: system engine-fp16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every system runs (engine provider, torch device, CTranslate2 device)")
    parser.add_argument("--ct2-dir", type=Path, default=Path("/tmp/rosetta-ct2"), help="converted CT2 model (made)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--source", default="", help="sentences to translate (one per line) instead of "
                        "test_2016_flickr; BLEU is then not computed (benchmarks/base_model.py writes one)")
    parser.add_argument("--fixed-length", type=int, default=0,
                        help="every output exactly N tokens with eos, in every system (random-weight models)")
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each cell reports the median round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--replot", action="store_true",
                        help="only redraw OUT/engine_benchmark.png from OUT/engine_benchmark.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global FIXED_LENGTH
    FIXED_LENGTH = args.fixed_length
    if args.replot:
        stem = "engine_benchmark" if args.device == "cpu" else "engine_benchmark_gpu"
        saved = json.loads((args.out / f"{stem}.json").read_text())
        plot(saved["rows"], args.out / f"{stem}.png", saved["title"])
        return 0
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
