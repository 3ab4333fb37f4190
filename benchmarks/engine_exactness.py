"""Exactness of the ONNX Runtime engine against the PyTorch reference beam search (model/decode.py).

    python benchmarks/engine_exactness.py runs/de-en/averaged models/model_repository/de-en/1 \\
        [--sentences 1000] [--beam-size 5] [--json out.json]

Three decodes of test_2016_flickr (DE, fp32):
1. the reference: `model.decode.translate_ids` (PyTorch log-probs, PyTorch search);
2. the engine: `Engine.translate_batch` (ONNX Runtime log-probs, the engine's search, its own batching);
3. the engine's search driven by PyTorch log-probs (`TorchSteps`), which isolates the search: 1 and 3
   may differ only where torch.topk orders exactly equal float64 candidates differently.
Then every sentence where 2 differs from 1 is replayed alone, the engine's search on ONNX Runtime and
on PyTorch log-probs side by side, up to the first step where they part; the report says whether the
two candidates that swapped (or the stop test that flipped) were within float32 noise of each other.
Prints a Markdown summary (and writes JSON with --json). Needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.data import read_lines
from model.decode import translate_ids as reference_translate
from model.transformer import Transformer
from service.engine import Engine, EngineConfig, run_search
from service.engine.search import BeamSearch, StepRequest, StepScores, make_search, masked_candidates
from service.options import DecodingOptions, TranslationResult


@dataclass
class TorchState:
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask: torch.Tensor  # (B, S) bool
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class TorchSteps:
    """`service.engine.StepModel` on the PyTorch model: the engine's search on reference log-probs."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    @torch.no_grad()
    def encode(self, src_ids: np.ndarray) -> TorchState:
        src = torch.from_numpy(src_ids)
        return TorchState(self.model.cross_kv(self.model.encode(src)), src != self.model.cfg.pad_id)

    @torch.no_grad()
    def step(self, state: TorchState, request: StepRequest) -> StepScores:
        if request.sentences is not None:
            index = torch.from_numpy(request.sentences)
            state.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in state.cross]
            state.src_mask = state.src_mask.index_select(0, index)
        rows = request.input_ids.shape[0]
        past = state.past if state.past is not None else self.model.empty_cache(rows)
        position = torch.full((rows,), request.step, dtype=torch.long)
        lp, state.past = self.model.decode_step(torch.from_numpy(request.input_ids), position, state.src_mask,
                                                state.cross, past, torch.from_numpy(request.cache_index))
        # A stable descending sort: ties by lower id, as ONNX Runtime's TopK.
        values, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
        eos = self.model.cfg.eos_id
        return StepScores(values[:, : request.topk].numpy(), ids[:, : request.topk].numpy(),
                          lambda: lp[:, eos].numpy())


def tokens(results: list[TranslationResult]) -> list[list[list[int]]]:
    return [[h.tokens for h in r.hypotheses] for r in results]


def ranking(search: BeamSearch, scores: StepScores) -> list[tuple[float, int, int]]:
    """The sentence's candidates (score, beam, token) best first, as BeamSearch.advance ranks them
    (one live sentence)."""
    step, per = search._step, search.scores.shape[1]
    row_max = np.repeat(search.max_lens[search.alive], per)
    vals, toks = masked_candidates(scores, step, row_max, search.ids, search.options.min_decoding_length)
    cand = search.scores.reshape(-1, 1) + vals
    out = [(float(cand[r, c]), r, int(toks[r, c])) for r in range(cand.shape[0]) for c in range(cand.shape[1])
           if cand[r, c] > -np.inf]
    return sorted(out, key=lambda x: (-x[0], x[1] * search.vocab + x[2]))


def first_divergence(engine: Engine, torch_steps: TorchSteps, source: list[int],
                     options: DecodingOptions) -> dict[str, Any]:
    """Replay one sentence with ONNX Runtime and PyTorch log-probs under the same search, in lockstep."""
    src, max_lens = engine.pad_sources([source], options)
    searches = [BeamSearch(max_lens, options, engine.special_ids, engine.vocab_size) for _ in range(2)]
    models = [engine.runtime, torch_steps]
    states = [m.encode(src) for m in models]
    requests = [s.start() for s in searches]
    while requests[0] is not None and requests[1] is not None:
        step = searches[0]._step
        outs = [m.step(st, rq) for m, st, rq in zip(models, states, requests, strict=True)]  # type: ignore[arg-type]
        lp_diff = float(np.abs(outs[0].topk_log_probs - outs[1].topk_log_probs).max())
        ranks = [ranking(s, o) for s, o in zip(searches, outs, strict=True)]
        requests = [s.advance(o) for s, o in zip(searches, outs, strict=True)]
        a, b = searches
        same_state = (requests[0] is None) == (requests[1] is None) and a.history.tolist() == b.history.tolist() \
            and [[f.tokens for f in fs] for fs in a.finished] == [[f.tokens for f in fs] for fs in b.finished]
        if same_state:
            continue
        width = 2 * options.beam_size
        ort_order = [(r[1], r[2]) for r in ranks[0][:width]]
        torch_order = [(r[1], r[2]) for r in ranks[1][:width]]
        torch_score = {(r[1], r[2]): r[0] for r in ranks[1]}
        for rank, (x, y) in enumerate(zip(ort_order, torch_order, strict=False)):
            if x != y:  # the candidates that swapped places, scored by PyTorch
                gap = abs(torch_score.get(x, -np.inf) - torch_score[y])
                return {"step": step, "kind": "candidate order", "rank": rank, "gap": gap, "lp_diff": lp_diff}
        return {"step": step, "kind": "stop test", "rank": None, "gap": _stop_gap(b, options), "lp_diff": lp_diff}
    # Alone, both agree to the end: the difference came from the sentence's batch (padding, batch-mates).
    return {"step": None, "kind": "none alone (batch effect)", "rank": None, "gap": None, "lp_diff": None}


def _stop_gap(search: BeamSearch, options: DecodingOptions) -> float:
    """|normalized best live score - K-th finished score| of the single sentence (PyTorch side)."""
    finished = sorted((f.score for f in search.finished[0]), reverse=True)
    if len(finished) < options.beam_size or search.scores.size == 0:
        return float("nan")
    best = options.normalize(float(search.scores.max()), search._step)
    return abs(best - finished[options.beam_size - 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("entry", type=Path, help="the fp32 model-repository entry exported from the checkpoint")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-torch-search", action="store_true", help="skip decode 3 (the search on torch)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint)
    engine = Engine.load(args.entry, EngineConfig(provider="cpu"))
    lines = read_lines(args.data_dir, "test_2016_flickr", "de")[: args.sentences]
    ids = tok.encode_batch(lines)
    options = DecodingOptions(beam_size=args.beam_size)

    t0 = time.perf_counter()
    ref: list[TranslationResult] = []
    for start in tqdm(range(0, len(ids), 100), desc="reference", unit="x100 sent"):
        ref += reference_translate(model, [s + [tok.eos_id] for s in ids[start:start + 100]], options)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tqdm(total=len(lines), desc="engine", unit="sent") as bar:
        got = engine.translate_batch(lines, options, progress=bar.update)
    t_eng = time.perf_counter() - t0

    search_exact = None
    if not args.skip_torch_search:
        steps = TorchSteps(model)
        on_torch: list[TranslationResult] = []
        for start in tqdm(range(0, len(ids), 32), desc="engine search on torch", unit="x32 sent"):
            chunk = ids[start:start + 32]
            src, max_lens = engine.pad_sources(chunk, options)
            on_torch += run_search(steps, src, make_search(max_lens, options, engine.special_ids, engine.vocab_size))
        search_exact = sum(a == b for a, b in zip(tokens(on_torch), tokens(ref), strict=True))

    differ = [i for i, (a, b) in enumerate(zip(tokens(got), tokens(ref), strict=True)) if a != b]
    steps = TorchSteps(model)
    report = []
    for i in differ:
        d = first_divergence(engine, steps, ids[i], options)
        report.append({"index": i, "source": lines[i], "engine": got[i].hypotheses[0].text,
                       "reference": tok.decode(ref[i].hypotheses[0].tokens),
                       "engine_score": got[i].hypotheses[0].score, "reference_score": ref[i].hypotheses[0].score,
                       **d})
    n = len(lines)
    summary = {"sentences": n, "beam_size": args.beam_size, "identical": n - len(differ),
               "identical_pct": 100.0 * (n - len(differ)) / n,
               "search_on_torch_identical": search_exact, "reference_seconds": round(t_ref, 1),
               "engine_seconds": round(t_eng, 1), "differing": report}
    print(f"\n## Engine exactness: test_2016_flickr, {n} sentences, fp32, beam {args.beam_size}\n")
    print(f"- tokens identical to the PyTorch reference: {n - len(differ)}/{n} ({summary['identical_pct']:.1f}%)")
    if search_exact is not None:
        print(f"- the engine's search on PyTorch log-probs: {search_exact}/{n} identical to the reference")
    print(f"- time: reference {t_ref:.1f}s, engine {t_eng:.1f}s\n")
    if report:
        print("| # | first divergence | kind | PyTorch score gap | max |lp ORT - lp torch| that step |"
              " engine | reference |")
        print("|---|---|---|---|---|---|---|")
        for r in report:
            gap = "-" if r["gap"] is None else f"{r['gap']:.1e}"
            lpd = "-" if r["lp_diff"] is None else f"{r['lp_diff']:.1e}"
            print(f"| {r['index']} | step {r['step']} | {r['kind']} | {gap} | {lpd} | {r['engine']} "
                  f"({r['engine_score']:.4f}) | {r['reference']} ({r['reference_score']:.4f}) |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
