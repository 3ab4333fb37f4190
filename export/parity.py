"""Parity between the exported graphs (ONNX Runtime) and the PyTorch model: the export contract.

Checks, each returning the largest absolute difference it saw:
- `greedy_parity`: a padded batch of real sentences of different lengths, decoded greedily for
  30 steps in lockstep (both sides fed the same tokens, PyTorch's argmax); ORT log-probs must
  match PyTorch at every step within 1e-4 (fp32). top-k outputs must equal the top-k of log_probs.
- `padding_invariance`: each sentence decoded alone and inside the padded batch gives the same
  ORT log-probs (1e-5).
- `reorder_parity`: a beam batch (K rows per sentence) stepped a few times, then stepped again with
  beams reordered and a finished sentence dropped: ORT equals PyTorch given the same reordering
  (fp32 tolerance), and reading the reordered beams through the graph's cache indirection (no K/V
  moved) equals gathering the cache on the host, bit for bit.
- Signature mismatches are caught when the graphs are loaded (`OrtGraphs` -> check_session).

`check_entry` runs them all and raises ParityError with every failure named.
Shapes: B batch, K beams, R rows, S source length, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.ort_graphs import OrtGraphs
from model.checkpoint import load_checkpoint
from model.transformer import KV, Transformer
from service.tokenizer import AnyTokenizer

# Real source sentences of different lengths (Multi30k-style German), so the batch is padded.
SENTENCES = (
    "Ein Hund rennt.",
    "Zwei junge Männer stehen auf einer Straße und unterhalten sich.",
    "Eine Frau mit einem roten Hut sitzt auf einer Bank im Park.",
    "Kinder spielen im Wasser.",
    "Ein Mann in einem blauen Hemd repariert ein Fahrrad vor einem Geschäft, während ein kleiner Junge zusieht.",
    "Eine Gruppe von Menschen.",
)

@dataclass(frozen=True)
class Tolerance:
    """Pass bounds of one precision, against PyTorch fp32."""

    log_probs: float  # max |ORT - PyTorch| over every step, row and vocab entry (greedy and reorder)
    padding: float  # max |alone - in padded batch| (ORT vs ORT)
    top1_agreement: float  # min fraction of (step, row) where ORT's argmax equals PyTorch's


# fp32 is the contract. fp16 and int8 change the numbers by design: their bounds catch a broken
# graph, their quality is measured as BLEU. int8's activation scale spans the batch (see
# export/quantize.py), so its padding invariance is approximate.
TOLERANCES = {
    "fp32": Tolerance(log_probs=1e-4, padding=1e-5, top1_agreement=1.0),
    "fp16": Tolerance(log_probs=0.1, padding=1e-2, top1_agreement=0.9),
    "int8": Tolerance(log_probs=1.0, padding=0.5, top1_agreement=0.8),
}


class ParityError(AssertionError):
    """The exported graphs disagree with PyTorch beyond tolerance."""


@dataclass
class ParityReport:
    precision: str
    steps: int
    greedy_max_abs_diff: float  # over every step, row and vocab entry
    greedy_step_max_abs_diff: list[float] = field(default_factory=list)  # per step
    greedy_top1_agreement: float = 1.0  # fraction of (step, row) with the same argmax as PyTorch
    topk_consistent: bool = True  # the eos output equals the eos column of the log-probs
    padding_max_abs_diff: float = 0.0
    reorder_max_abs_diff: float = 0.0  # ORT vs PyTorch after a reorder + compaction
    reorder_indirection_exact: bool = True  # reorder through cache_indirection == host gather, bit for bit
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def source_ids(tok: AnyTokenizer, eos_id: int, sentences: tuple[str, ...] = SENTENCES) -> list[list[int]]:
    """Token ids of each sentence followed by eos."""
    return [ids + [eos_id] for ids in tok.encode_batch(list(sentences))]


def _pad(sources: list[list[int]], pad_id: int) -> np.ndarray:
    out = np.full((len(sources), max(len(s) for s in sources)), pad_id, dtype=np.int64)
    for i, s in enumerate(sources):
        out[i, : len(s)] = s
    return out


def _torch_kv(arrays: list[np.ndarray]) -> list[KV]:
    ts = [torch.from_numpy(np.ascontiguousarray(a)).float() for a in arrays]
    return [(ts[2 * i], ts[2 * i + 1]) for i in range(len(ts) // 2)]


def _flat(kv: list[KV]) -> list[np.ndarray]:
    return [t.numpy() for pair in kv for t in pair]


def _ort_lockstep(graphs: OrtGraphs, src: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    """ORT log-probs (R, V) per step when fed bos then tokens[:, t] at step t+1. tokens (B, T)."""
    cross = graphs.encode(src)
    b = src.shape[0]
    past, ids = graphs.empty_past(b), np.full((b, 1), graphs.bos_id, dtype=np.int64)
    out = []
    for step in range(tokens.shape[1] + 1):
        res = graphs.step(ids, np.full(b, step), src != graphs.pad_id, cross, past, np.arange(b))
        out.append(res.log_probs)
        if step < tokens.shape[1]:
            past, ids = res.present, tokens[:, step : step + 1]
    return out


@torch.no_grad()
def greedy_parity(graphs: OrtGraphs, model: Transformer, sources: list[list[int]], steps: int = 30,
                  topk: int = 4) -> tuple[list[float], float, bool, np.ndarray]:
    """Lockstep greedy decode for `steps` steps: per-step max |ORT - PyTorch| log-prob difference.

    Returns (per-step max diff, fraction of (step, row) whose argmax agrees, whether the eos
    output matched the log-probs every step, the tokens fed (B, steps-1) so other checks can replay
    the same path).
    """
    cfg = model.cfg
    src = _pad(sources, cfg.pad_id)
    b = src.shape[0]
    src_t = torch.from_numpy(src)
    mask_t = src_t != cfg.pad_id
    cross_t = model.cross_kv(model.encode(src_t))
    past_t = model.empty_cache(b)
    cross_o = graphs.encode(src)
    past_o = graphs.empty_past(b)
    ids = np.full((b, 1), cfg.bos_id, dtype=np.int64)
    diffs: list[float] = []
    agree: list[float] = []
    consistent = True
    fed: list[np.ndarray] = []
    for step in range(steps):
        pos = np.full(b, step, dtype=np.int64)
        lp_t, past_t = model.decode_step(torch.from_numpy(ids), torch.from_numpy(pos), mask_t, cross_t, past_t,
                                         torch.arange(b))
        res = graphs.step(ids, pos, src != cfg.pad_id, cross_o, past_o, np.arange(b), topk=topk)
        diffs.append(float(np.abs(res.log_probs - lp_t.numpy()).max()))
        agree.append(float((res.log_probs.argmax(-1) == lp_t.numpy().argmax(-1)).mean()))
        consistent &= bool(np.array_equal(res.eos_log_probs, res.log_probs[:, cfg.eos_id]))
        lp = lp_t.clone()
        lp[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
        ids = lp.argmax(-1, keepdim=True).numpy()  # (B, 1): both sides continue PyTorch's path
        fed.append(ids[:, 0])
        past_o = res.present
    return diffs, float(np.mean(agree)), consistent, np.stack(fed[:-1], axis=1)


def padding_invariance(graphs: OrtGraphs, sources: list[list[int]], tokens: np.ndarray) -> float:
    """Max |log-prob| difference between each sentence alone and inside the padded batch (ORT)."""
    batch = _ort_lockstep(graphs, _pad(sources, graphs.pad_id), tokens)
    worst = 0.0
    for i, s in enumerate(sources):
        alone = _ort_lockstep(graphs, np.array([s], dtype=np.int64), tokens[i : i + 1])
        for a, bt in zip(alone, batch, strict=True):
            worst = max(worst, float(np.abs(a[0] - bt[i]).max()))
    return worst


@torch.no_grad()
def reorder_parity(graphs: OrtGraphs, model: Transformer, sources: list[list[int]], beams: int = 3,
                   warmup: int = 3) -> tuple[float, bool]:
    """Beam rows (R = B*K), `warmup` steps, then one step that reorders the beams of every kept
    sentence and drops sentence 1 (compaction). Returns (max |ORT - PyTorch| over the log-probs and
    present K/V of that step, whether reading the reorder through the cache indirection equals
    gathering the cache on the host exactly).
    """
    cfg = model.cfg
    src = _pad(sources[:3], cfg.pad_id)
    b, k = src.shape[0], beams
    r = b * k
    rng = np.random.default_rng(0)
    src_t = torch.from_numpy(src)
    cross_t = model.cross_kv(model.encode(src_t))
    cross_o = graphs.encode(src)
    mask = src != cfg.pad_id
    past_t, past_o = model.empty_cache(r), graphs.empty_past(r)
    index = np.arange(r)
    for step in range(warmup):
        ids = rng.integers(4, cfg.vocab_size, size=(r, 1))  # rows diverge, so a reorder shows
        pos = np.full(r, step)
        _, past_t = model.decode_step(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask),
                                      cross_t, past_t, torch.from_numpy(index))
        past_o = graphs.step(ids, pos, mask, cross_o, past_o, index).present
    # Keep sentences 0 and 2; sentence 0's beams reversed, sentence 2 continues its beam 1 twice.
    keep = np.array([0, 2])
    origin = np.concatenate([np.arange(k)[::-1], np.array([1, 1] + [0] * (k - 2))])  # beam each row continues
    index = (np.repeat(keep, k) * k + origin).astype(np.int64)
    ids = rng.integers(4, cfg.vocab_size, size=(index.size, 1))
    pos = np.full(index.size, warmup)
    mask_k = mask[keep]
    cross_tk = [(ck[torch.from_numpy(keep)], cv[torch.from_numpy(keep)]) for ck, cv in cross_t]
    cross_ok = [c[keep] for c in cross_o]
    lp_t, present_t = model.decode_step(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask_k),
                                        cross_tk, past_t, torch.from_numpy(index))
    res = graphs.step(ids, pos, mask_k, cross_ok, past_o, index)
    worst = float(np.abs(res.log_probs - lp_t.numpy()).max())
    for got, want in zip(res.present, _flat(present_t), strict=True):
        worst = max(worst, float(np.abs(got.astype(np.float32) - want).max()))
    # The same step in place: the kept sentences' rows as they are, the reorder in the indirection.
    rows = (keep[:, None] * k + np.arange(k)).reshape(-1)
    cache = [np.ascontiguousarray(np.concatenate([p[rows], np.zeros_like(p[rows][:, :, :1])], axis=2))
             for p in past_o]
    indirection = np.empty((keep.size, k, warmup + 1), dtype=np.int32)
    indirection[:, :, :warmup] = origin.reshape(keep.size, k, 1)
    indirection[:, :, warmup] = np.arange(k)
    inplace = graphs.step_in_place(ids, pos, np.ones((index.size, warmup + 1), np.int32), mask_k, cross_ok, cache,
                                   indirection, warmup)
    logical = (np.arange(keep.size)[:, None, None] * k + indirection).reshape(index.size, warmup + 1)  # (R, T)
    exact = bool(np.array_equal(inplace.log_probs, res.log_probs)) and all(
        np.array_equal(c[logical, :, np.arange(warmup + 1)[None, :]].transpose(0, 2, 1, 3), h)
        for c, h in zip(inplace.present, res.present, strict=True))
    return worst, exact


def run_parity(graphs: OrtGraphs, model: Transformer, tok: AnyTokenizer, steps: int = 30) -> ParityReport:
    """All checks on loaded graphs; the report lists every failure (empty when all passed)."""
    precision = str(graphs.manifest["precision"])
    sources = source_ids(tok, model.cfg.eos_id)
    diffs, agreement, consistent, fed = greedy_parity(graphs, model, sources, steps)
    report = ParityReport(precision, steps, max(diffs), [float(f"{d:.3g}") for d in diffs], round(agreement, 4),
                          consistent)
    report.padding_max_abs_diff = padding_invariance(graphs, sources, fed[:, :10])
    report.reorder_max_abs_diff, report.reorder_indirection_exact = reorder_parity(graphs, model, sources)
    tol = TOLERANCES[precision]
    if report.greedy_max_abs_diff > tol.log_probs:
        worst = int(np.argmax(diffs))
        report.failures.append(f"greedy log-probs differ from PyTorch by {report.greedy_max_abs_diff:.3g} "
                               f"(step {worst}) > {tol.log_probs:g}")
    if agreement < tol.top1_agreement:
        report.failures.append(f"greedy argmax agrees with PyTorch at {agreement:.1%} of steps "
                               f"< {tol.top1_agreement:.0%}")
    if not consistent:
        report.failures.append("eos_log_probs is not the eos column of the log-probs")
    if report.padding_max_abs_diff > tol.padding:
        report.failures.append(f"padding changes log-probs by {report.padding_max_abs_diff:.3g} > {tol.padding:g}")
    if report.reorder_max_abs_diff > tol.log_probs:
        report.failures.append(f"after a beam reorder/compaction ORT differs from PyTorch by "
                               f"{report.reorder_max_abs_diff:.3g} > {tol.log_probs:g}")
    if not report.reorder_indirection_exact:
        report.failures.append("a reorder read through cache_indirection differs from gathering the cache on the host")
    return report


def check_entry(entry: Path, checkpoint: Path, steps: int = 30, threads: int = 1) -> ParityReport:
    """Load `entry` in ONNX Runtime (signature-checked) and compare it with `checkpoint` in PyTorch.

    Raises ParityError naming every failed check; returns the report when all pass.
    """
    graphs = OrtGraphs(Path(entry), threads=threads)
    model, tok = load_checkpoint(Path(checkpoint))
    report = run_parity(graphs, model, tok, steps)
    if report.failures:
        raise ParityError(f"parity check of {entry} ({report.precision}) failed: " + "; ".join(report.failures))
    return report
