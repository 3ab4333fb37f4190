"""OPUS-MT-size Marian model, side by side on CPU: Rosetta (imported, exported fp32 / int8), CTranslate2 (its own
transformers converter, fp32 / int8) and transformers `generate`.

    python benchmarks/marian_benchmark.py --work /tmp/marian-bench            # build, convert, measure
    python benchmarks/marian_benchmark.py --work /tmp/marian-bench --rounds 3 --out benchmarks/results

The model is the OPUS-MT shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 58,101, swish, scaled and
shared embeddings) with random weights, made with transformers' own MarianMTModel and saved with
save_pretrained, so every system reads the same folder: Rosetta through `rosetta import marian` + `rosetta
export`, CTranslate2 through `ct2-transformers-converter`'s Python API. The tokenizer is a SentencePiece model
trained on Multi30k with its vocabulary padded to 58,101 pieces (random weights make the text meaningless).
Random weights decode to random lengths, so every system generates exactly --length tokens per hypothesis
(eos included): min and max length pinned. Beam 4, val.de sentences, batch 32 and batch 1; each (system,
batch) runs in its own child process with all cores, given every sentence in one call and cutting it into
batches itself (engine: its measured threading, one batch per core; CTranslate2: inter_threads = cores,
intra_threads = 1, max_batch_size; transformers: one batch at a time on all cores); the median of
--rounds rounds is reported, with the generated-token count per system as a check that all did the same work.
Not a test.

Optimum's ONNX Runtime seq2seq pipeline is left out: it installs the `onnxruntime` wheel, which must not sit
beside the `onnxruntime-gpu` one this project uses.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k"
VOCAB = 58101
BEAM = 4
SYSTEMS = ("rosetta-fp32", "rosetta-int8", "ct2-fp32", "ct2-int8", "transformers")


def cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def read(limit: int) -> list[str]:
    with gzip.open(DATA / "val.de.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(limit), f, strict=False)]


# -- building the model and its conversions ----------------------------------------------------------------


def build(work: Path) -> None:
    """work/hf (the Marian folder), work/ckpt (imported), work/repo/marian{,-int8}/1, work/ct2-{fp32,int8}."""
    import sentencepiece as spm
    import torch
    import transformers

    hf = work / "hf"
    if not (hf / "config.json").exists():
        hf.mkdir(parents=True, exist_ok=True)
        for side, lang in (("source", "de"), ("target", "en")):
            corpus = work / f"{lang}.txt"
            with gzip.open(DATA / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
                corpus.write_text(f.read(), encoding="utf-8")
            spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(hf / side), vocab_size=6000,
                                           model_type="unigram", bos_id=-1, eos_id=0, unk_id=1, pad_id=-1,
                                           minloglevel=2)
            (hf / f"{side}.model").rename(hf / f"{side}.spm")
        vocab: dict[str, int] = {"</s>": 0, "<unk>": 1}
        for side in ("source", "target"):
            sp = spm.SentencePieceProcessor(model_file=str(hf / f"{side}.spm"))
            for i in range(sp.get_piece_size()):
                if not (sp.is_control(i) or sp.is_unknown(i)):
                    vocab.setdefault(sp.id_to_piece(i), len(vocab))
        filler = 0
        while len(vocab) < VOCAB - 1:  # OPUS-MT's vocabulary size: pieces no text here produces
            vocab.setdefault(f"\u2581filler{filler}", len(vocab))
            filler += 1
        vocab["<pad>"] = VOCAB - 1
        (hf / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        config = transformers.MarianConfig(
            vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
            scale_embedding=True, max_position_embeddings=512, pad_token_id=VOCAB - 1, eos_token_id=0,
            decoder_start_token_id=VOCAB - 1, share_encoder_decoder_embeddings=True)
        torch.manual_seed(0)
        transformers.MarianMTModel(config).eval().save_pretrained(str(hf))
        print(f"built {hf}", flush=True)
    if not (work / "ckpt").exists():
        from model.marian import import_marian

        import_marian(hf, work / "ckpt")
    for precision, name in (("fp32", "marian"), ("int8", "marian-int8")):
        entry = work / "repo" / name / "1"
        if not (entry / "manifest.json").exists():
            from export.api import export_entry

            export_entry(work / "ckpt", entry, precision=precision, int8_form="auto")
            print(f"exported {entry}", flush=True)
    for quant in ("float32", "int8"):
        out = work / f"ct2-{'fp32' if quant == 'float32' else 'int8'}"
        if not (out / "model.bin").exists():
            import ctranslate2

            ctranslate2.converters.TransformersConverter(str(hf)).convert(str(out), quantization=quant, force=True)
            print(f"converted {out}", flush=True)


# -- one measurement (child process) -----------------------------------------------------------------------


def measure(system: str, work: Path, batch: int, sentences: int, length: int) -> dict[str, Any]:
    lines = read(sentences)
    # One call per system with every sentence, cut into batches of `batch` by the system itself, so that each
    # runs its batches the way it runs best on these cores (the engine and CTranslate2 several at once).
    chunks = [lines]
    if system.startswith("rosetta"):
        from service.engine import Engine, EngineConfig
        from service.options import DecodingOptions

        entry = work / "repo" / ("marian" if system == "rosetta-fp32" else "marian-int8") / "1"
        engine = Engine.load(entry, EngineConfig(provider="cpu", max_batch_sentences=batch))
        options = DecodingOptions(beam_size=BEAM, min_decoding_length=length - 1, max_decoding_length=length,
                                  max_decoding_length_ratio=0.0)

        def run(chunk: list[str]) -> int:
            return sum(len(r.hypotheses[0].tokens) + 1 for r in engine.translate_batch(chunk, options))
    elif system.startswith("ct2"):
        import ctranslate2

        from service.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer.load(work / "hf")
        translator = ctranslate2.Translator(str(work / system), device="cpu", inter_threads=cores(), intra_threads=1)

        def run(chunk: list[str]) -> int:
            source = [[tok.id_to_token(i) for i in tok.encode(s)] + ["</s>"] for s in chunk]
            out = translator.translate_batch(source, beam_size=BEAM, min_decoding_length=length,
                                             max_decoding_length=length, max_batch_size=batch)
            return sum(len(r.hypotheses[0]) for r in out)  # CTranslate2 counts eos in the lengths, not the tokens
    else:
        import torch
        import transformers

        from service.tokenizer import SentencePieceTokenizer

        torch.set_num_threads(cores())
        tok = SentencePieceTokenizer.load(work / "hf")
        model = transformers.MarianMTModel.from_pretrained(str(work / "hf"), local_files_only=True).eval()

        def run(chunk: list[str]) -> int:
            tokens = 0
            for i in range(0, len(chunk), batch):  # generate takes one batch at a time
                ids = [tok.encode(s) + [tok.eos_id] for s in chunk[i:i + batch]]
                width = max(map(len, ids))
                src = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in ids])
                with torch.inference_mode():
                    out = model.generate(input_ids=src, attention_mask=(src != tok.pad_id).long(), num_beams=BEAM,
                                         do_sample=False, min_new_tokens=length, max_new_tokens=length)
                tokens += int((out[:, 1:] != tok.pad_id).sum())
            return tokens
    run(chunks[0][:1])  # warm-up: lazy initialisation is not what we measure
    started, cpu = time.perf_counter(), time.process_time()
    tokens = sum(run(c) for c in chunks)
    wall = time.perf_counter() - started
    return {"system": system, "batch": batch, "sentences": len(lines), "seconds": wall,
            "sent_per_s": len(lines) / wall, "tokens": tokens, "cpu_s": time.process_time() - cpu}


# -- the parent: rounds, table, plot -------------------------------------------------------------------------


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model and its conversions")
    parser.add_argument("--out", type=Path, default=None, help="write marian_benchmark.{md,json,png} here")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--length", type=int, default=24, help="generated tokens per hypothesis, eos included")
    parser.add_argument("--sentences-batch32", type=int, default=64)
    parser.add_argument("--sentences-batch1", type=int, default=8)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        system, batch = args.child[0], int(args.child[1])
        n = args.sentences_batch32 if batch > 1 else args.sentences_batch1
        print(json.dumps(measure(system, args.work, batch, n, args.length)))
        return 0
    build(args.work)
    systems = args.systems.split(",")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for batch in (32, 1):
            for system in systems:
                cmd = [sys.executable, __file__, "--work", str(args.work), "--length", str(args.length),
                       "--sentences-batch32", str(args.sentences_batch32),
                       "--sentences-batch1", str(args.sentences_batch1), "--child", system, str(batch)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((system, batch), []).append(row)
                print(f"round {r + 1}: {system} batch {batch}: {row['sent_per_s']:.2f} sent/s, "
                      f"{row['tokens']} tokens", flush=True)
    rows = []
    for (system, batch), runs in results.items():
        rows.append({"system": system, "batch": batch, "sent_per_s": statistics.median(x["sent_per_s"] for x in runs),
                     "tokens": runs[0]["tokens"], "rounds": len(runs)})
    lines = [f"Marian, OPUS-MT size (random weights), beam {BEAM}, {args.length} tokens per hypothesis; CPU flags: "
             f"{cpu_flags()}; {cores()} cores; median of {args.rounds} rounds",
             "", "| system | batch 32 sent/s | batch 1 sent/s | tokens (b32 / b1) |", "|---|---:|---:|---|"]
    by = {(r["system"], r["batch"]): r for r in rows}
    for system in systems:
        a, b = by.get((system, 32)), by.get((system, 1))
        lines.append(f"| {system} | {a['sent_per_s']:.2f} | {b['sent_per_s']:.2f} | {a['tokens']} / {b['tokens']} |"
                     if a and b else f"| {system} | - | - | - |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "marian_benchmark.md").write_text(report + "\n")
        (args.out / "marian_benchmark.json").write_text(json.dumps(
            {"command": " ".join(sys.argv), "cpu_flags": cpu_flags(), "cores": cores(), "rows": rows,
             "runs": {f"{s}/{b}": v for (s, b), v in results.items()}}, indent=2) + "\n")
        plot(rows, systems, args.out / "marian_benchmark.png")
    return 0


def plot(rows: list[dict[str, Any]], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, batch in zip(axes, (32, 1), strict=True):
        values = [next((r["sent_per_s"] for r in rows if r["system"] == s and r["batch"] == batch), 0.0)
                  for s in systems]
        ax.barh(systems[::-1], values[::-1], color=["#4c72b0" if s.startswith("rosetta") else "#999999"
                                                     for s in systems[::-1]])
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("sentences / s")
    fig.suptitle("OPUS-MT-size Marian (random weights), beam 4, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
