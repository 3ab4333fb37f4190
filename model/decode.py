"""Reference decoding in PyTorch: greedy and beam search over the KV cache.

This is the oracle the ONNX Runtime engine must match token for token, so every rule is spelled
out here once:

- Step t (0-based) generates target position t+1; a hypothesis ending at step t has t+1 tokens,
  eos included, and ranks by log_prob / (t+1)**length_penalty.
- pad and bos are never generated; eos is blocked while t < min_decoding_length; at the last
  allowed step (t+1 == max length of the sentence) only eos is allowed (finish reason "length").
- Beam search keeps K = beam_size live rows per sentence. Each step takes the top 2K of
  (row score + token log-prob) over K*V; an eos candidate becomes a finished hypothesis only if it
  ranks among the first K, other candidates fill the K live rows in rank order. The first step
  starts from one row (the others score -inf). Rows left without a finite candidate stay dead
  (-inf).
- A sentence is done when it has no live row with a finite score, or when it holds at least K
  finished hypotheses and no live row, scored as if it ended at its current length, beats the
  K-th best finished one (HuggingFace's default heuristic). Done sentences leave the batch at
  once: `cache_index` drops their rows.
- Results: finished hypotheses sorted by score (ties keep the order they finished in), the first
  num_hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.data import pad as pad_batch
from model.transformer import KV, Transformer
from service.engine.batching import batches_by_length
from service.options import DecodingOptions, Hypothesis, TranslationResult


@dataclass
class _Finished:
    score: float
    log_prob: float
    tokens: list[int]
    reason: str


def mask_log_probs(
    lp: Tensor, step: int, max_lens: Tensor, cfg_ids: tuple[int, int, int], min_len: int
) -> Tensor:
    """Apply the generation rules to log-probs lp (R, V) at `step`; max_lens (R,) per row."""
    pad_id, bos_id, eos_id = cfg_ids
    lp = lp.clone()
    lp[:, pad_id] = float("-inf")
    lp[:, bos_id] = float("-inf")
    if step < min_len:
        lp[:, eos_id] = float("-inf")
    last = (step + 1) >= max_lens  # (R,) rows that must end now
    if bool(last.any()):
        eos_col = lp[:, eos_id].clone()
        lp[last] = float("-inf")
        lp[last, eos_id] = torch.where(torch.isinf(eos_col[last]), 0.0, eos_col[last])
    return lp


def _start(model: Transformer, src: Tensor) -> tuple[list[KV], Tensor, Tensor]:
    """Encoder pass: cross K/V per layer, src_mask (B, S) bool, source lengths (B,)."""
    src_mask = src != model.cfg.pad_id
    return model.cross_kv(model.encode(src)), src_mask, src_mask.sum(1)


@torch.no_grad()
def greedy_search(model: Transformer, src: Tensor, options: DecodingOptions) -> list[TranslationResult]:
    """Greedy decoding of src (B, S); one result per sentence, in order."""
    cfg = model.cfg
    ids = (cfg.pad_id, cfg.bos_id, cfg.eos_id)
    cross, src_mask, src_lens = _start(model, src)
    b = src.size(0)
    max_lens = torch.tensor([options.max_length_for(int(n)) for n in src_lens])
    alive = torch.arange(b)  # original index of each live row
    tokens: list[list[int]] = [[] for _ in range(b)]
    log_probs = [0.0] * b
    results: list[TranslationResult | None] = [None] * b
    input_ids = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    cache_index = torch.arange(b, device=src.device)
    past = model.empty_cache(b, src.device)
    step = 0
    while alive.numel():
        position = torch.full((alive.numel(),), step, dtype=torch.long, device=src.device)
        lp, past = model.decode_step(input_ids, position, src_mask, cross, past, cache_index)
        lp = mask_log_probs(lp.cpu(), step, max_lens[alive], ids, options.min_decoding_length)
        best_lp, best = lp.max(dim=-1)
        keep = []
        for row, orig in enumerate(alive.tolist()):
            tok = int(best[row])
            log_probs[orig] += float(best_lp[row])
            if tok == cfg.eos_id:
                length = len(tokens[orig]) + 1
                reason = "length" if length >= int(max_lens[orig]) else "eos"
                score = options.normalize(log_probs[orig], length)
                results[orig] = TranslationResult([Hypothesis(tokens[orig], score, log_probs[orig])], reason)
            else:
                tokens[orig].append(tok)
                keep.append(row)
        keep_t = torch.tensor(keep, dtype=torch.long)
        alive = alive[keep_t]
        cache_index = keep_t.to(src.device)
        input_ids = best[keep_t].view(-1, 1).to(src.device)
        cross = [(k.index_select(0, cache_index), v.index_select(0, cache_index)) for k, v in cross]
        src_mask = src_mask.index_select(0, cache_index)
        step += 1
    return [r for r in results if r is not None]


@torch.no_grad()
def beam_search(model: Transformer, src: Tensor, options: DecodingOptions) -> list[TranslationResult]:
    """Beam search over src (B, S); one result per sentence, in order (see the module doc)."""
    cfg = model.cfg
    ids = (cfg.pad_id, cfg.bos_id, cfg.eos_id)
    k = options.beam_size
    dev = src.device
    cross, src_mask, src_lens = _start(model, src)
    b = src.size(0)
    max_lens = torch.tensor([options.max_length_for(int(n)) for n in src_lens])
    alive = torch.arange(b)  # original sentence index of each live sentence
    finished: list[list[_Finished]] = [[] for _ in range(b)]
    scores = torch.full((b, k), float("-inf"), dtype=torch.float64)
    scores[:, 0] = 0.0
    history: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]  # live rows' tokens
    input_ids = torch.full((b * k, 1), cfg.bos_id, dtype=torch.long, device=dev)
    cache_index = torch.arange(b * k, device=dev)
    past = model.empty_cache(b * k, dev)
    step = 0
    while alive.numel():
        n = alive.numel()
        position = torch.full((n * k,), step, dtype=torch.long, device=dev)
        lp, past = model.decode_step(input_ids, position, src_mask, cross, past, cache_index)
        row_max = max_lens[alive].repeat_interleave(k)
        lp = mask_log_probs(lp.cpu().double(), step, row_max, ids, options.min_decoding_length)
        v = lp.size(1)
        cand = (scores.view(-1, 1) + lp).view(n, k * v)  # (n, K*V)
        top_v, top_i = cand.topk(min(2 * k, k * v), dim=1)
        next_scores = torch.full((n, k), float("-inf"), dtype=torch.float64)
        next_tokens = torch.full((n, k), cfg.eos_id, dtype=torch.long)
        origins = torch.arange(n).repeat_interleave(k).view(n, k) * k  # dead rows continue row 0
        next_history: list[list[list[int]]] = []
        keep: list[int] = []
        for j in range(n):
            orig = int(alive[j])
            hist: list[list[int]] = [[] for _ in range(k)]
            filled = 0
            for rank in range(top_v.size(1)):
                score = float(top_v[j, rank])
                if score == float("-inf") or filled == k:
                    break
                beam, tok = divmod(int(top_i[j, rank]), v)
                if tok == cfg.eos_id:
                    if rank < k:
                        length = step + 1
                        reason = "length" if length >= int(max_lens[orig]) else "eos"
                        finished[orig].append(
                            _Finished(options.normalize(score, length), score, history[j][beam], reason)
                        )
                    continue
                next_scores[j, filled] = score
                next_tokens[j, filled] = tok
                origins[j, filled] = j * k + beam
                hist[filled] = history[j][beam] + [tok]
                filled += 1
            if not _sentence_done(finished[orig], next_scores[j], step + 1, k, options):
                keep.append(j)
                next_history.append(hist)
        if not keep:
            break
        keep_t = torch.tensor(keep, dtype=torch.long)
        alive = alive[keep_t]
        scores = next_scores[keep_t]
        history = next_history
        cache_index = origins[keep_t].view(-1).to(dev)
        input_ids = next_tokens[keep_t].view(-1, 1).to(dev)
        sent_index = keep_t.to(dev)
        cross = [(ck.index_select(0, sent_index), cv.index_select(0, sent_index)) for ck, cv in cross]
        src_mask = src_mask.index_select(0, sent_index)
        step += 1
    return [_result(f, options) for f in finished]


def _sentence_done(
    finished: list[_Finished], live_scores: Tensor, length: int, k: int, options: DecodingOptions
) -> bool:
    best_live = float(live_scores.max())
    if best_live == float("-inf"):
        return True
    if len(finished) < k:
        return False
    kth = sorted((f.score for f in finished), reverse=True)[k - 1]
    return options.normalize(best_live, length) <= kth


def _result(finished: list[_Finished], options: DecodingOptions) -> TranslationResult:
    ranked = sorted(finished, key=lambda f: -f.score)  # stable: ties keep finishing order
    top = ranked[: options.num_hypotheses]
    return TranslationResult(
        [Hypothesis(f.tokens, f.score, f.log_prob) for f in top], top[0].reason if top else "length"
    )


def decode(model: Transformer, src: Tensor, options: DecodingOptions) -> list[TranslationResult]:
    """Greedy for beam_size 1, beam search otherwise."""
    if options.beam_size == 1:
        return greedy_search(model, src, options)
    return beam_search(model, src, options)


def translate_ids(
    model: Transformer, sources: list[list[int]], options: DecodingOptions, max_tokens: int = 4096
) -> list[TranslationResult]:
    """Decode token-id sources (each already ending with eos); results in input order."""
    dev = next(model.parameters()).device
    results: list[TranslationResult | None] = [None] * len(sources)
    for idx in batches_by_length([len(s) for s in sources], max_tokens, max_sentences=256):
        src = pad_batch([sources[i] for i in idx], model.cfg.pad_id).to(dev)
        for i, r in zip(idx, decode(model, src, options), strict=True):
            results[i] = r
    return [r for r in results if r is not None]
