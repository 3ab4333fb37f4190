"""Greedy and beam search over the decoder's per-row top-k: the host side of one decoding loop.

A search never touches a session. The engine asks it what to compute (`StepRequest`: which rows,
which tokens, which rows of the previous step they continue, which sentences are still live),
runs the decoder step, hands back the top-k candidates of every row (`StepScores`), and repeats
until the search answers None. So only token ids, beam origins and top-k scores cross between the
device and the host.

The rules are those of the PyTorch reference (model/decode.py, its module docstring) and must stay
token-for-token identical to it:
- step t generates target position t+1; a hypothesis ending at step t has t+1 tokens, eos included,
  and ranks by log_prob / (t+1)**length_penalty (`DecodingOptions.normalize`);
- pad and bos are never generated, eos is blocked while t < min_decoding_length, and at a row's last
  allowed step only eos is (its raw log-prob, or 0.0 when eos was blocked);
- greedy takes the best allowed token of every row (ties: the lower id, as torch.max);
- beam search keeps K rows per sentence and ranks the candidates (row score + log-prob, float64)
  of a sentence's K*V; the first 2K are kept, an eos candidate finishes a hypothesis only among the
  first K, the others fill the live rows in rank order; rows without a finite candidate stay dead;
- a sentence is done when no live row is finite, or when it holds >= K finished hypotheses and no
  live row, scored at its current length, beats the K-th best; done sentences leave at once.

Why top-k is enough: the global top 2K of a sentence over K*V is contained in the union of each
row's top 2K allowed tokens, and at most 3 tokens (pad, bos, eos) are not allowed, so the graph's
top (2K+3) raw log-probs per row hold every candidate the reference can pick (disallowed ones are
set to -inf and rank last). Ranking ties between
equal float64 candidates are broken by (beam, token) index; torch.topk leaves that order
unspecified, which is the only place the two can differ given the same log-probs.

Shapes: B live sentences, K beams, R live rows (B at the first step, B*K after), k top-k width,
T tokens generated so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.options import DecodingOptions, Hypothesis, TranslationResult

NEG_INF = -math.inf


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int


@dataclass(frozen=True)
class StepRequest:
    """What the next decoder call computes."""

    step: int  # 0-based; every row's input token sits at position `step`
    input_ids: np.ndarray  # (R, 1) int64, the last token of every live row
    cache_index: np.ndarray  # (R,) int64, the row of the previous step each row continues
    sentences: np.ndarray | None  # (B,) int64 previous-step sentences still live, in order; None: all of them
    topk: int  # top-k width the search reads back per row


@dataclass(frozen=True)
class StepScores:
    """What the search reads back from one decoder call."""

    topk_log_probs: np.ndarray  # (R, k) float32, descending per row, ties by lower id
    topk_ids: np.ndarray  # (R, k) int64
    eos_log_probs: Callable[[], np.ndarray]  # () -> (R,) float32 raw log-prob of eos; called only at a last step


class Search(Protocol):
    """One decoding loop over a batch: start() -> advance(scores) ... -> None, then results()."""

    def start(self) -> StepRequest: ...

    def advance(self, scores: StepScores) -> StepRequest | None: ...

    def drop(self, request: StepRequest, codes: np.ndarray) -> StepRequest | None: ...

    def results(self) -> list[TranslationResult]: ...


ABANDONED = "abandoned"
"""finish_reason of a sentence that `Search.drop` removed (its caller is gone): no hypotheses."""
DEADLINE = "deadline"
"""finish_reason of a sentence `Search.drop` stopped with STOP_PARTIAL: its best hypotheses so far."""
KEEP, ABANDON, STOP_PARTIAL = 0, 1, 2
"""What `Search.drop` does with a live sentence, by its code: nothing; end it with no hypotheses (ABANDONED);
end it with its best hypotheses so far (DEADLINE)."""
Abandoned = Callable[[], "np.ndarray | None"]
"""Asked between two decoder steps (`service.engine.run_search`): a (B,) array of those codes over the batch's
sentences (a bool array means ABANDON where True: nobody waits for them any more), or None when all are still
wanted. Called on the decoding thread; it must be cheap (it runs once per step)."""


def _without(request: StepRequest, keep_sentences: np.ndarray, rows: np.ndarray, prev_live: int) -> StepRequest:
    """`request` restricted to the live sentences at positions `keep_sentences` (their rows: `rows`).

    `prev_live` is the number of sentences the previous step ran: `request.sentences` indexes those."""
    before = np.arange(prev_live) if request.sentences is None else request.sentences
    return StepRequest(request.step, request.input_ids[rows], request.cache_index[rows], before[keep_sentences],
                       request.topk)


def masked_candidates(
    scores: StepScores, step: int, row_max_lens: np.ndarray, ids: SpecialIds, min_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's top-k under the generation rules: (log_probs (R, k) float64, -inf where the token
    is not allowed; token ids (R, k) int64), still in descending order of the raw log-probs.

    row_max_lens (R,) is each row's length cap (eos included); a row at its last step keeps eos
    alone, in column 0.
    """
    toks = scores.topk_ids  # (R, k)
    vals = scores.topk_log_probs.astype(np.float64)  # (R, k)
    blocked = (toks == ids.pad) | (toks == ids.bos)
    if step < min_len:
        blocked |= toks == ids.eos
    vals[blocked] = NEG_INF

    last = (step + 1) >= row_max_lens  # (R,) rows whose only allowed token is eos
    if last.any():
        eos_lp = scores.eos_log_probs().astype(np.float64)[last]
        if step < min_len:
            eos_lp[:] = 0.0  # eos was blocked: the reference lets it in with log-prob 0
        toks = toks.copy()
        vals[last] = NEG_INF
        vals[last, 0] = np.where(np.isinf(eos_lp), 0.0, eos_lp)
        toks[last, 0] = ids.eos
    return vals, toks


class GreedySearch:
    """Beam size 1: one row per sentence, the best allowed token each step."""

    def __init__(self, max_lens: list[int], options: DecodingOptions, ids: SpecialIds, vocab_size: int) -> None:
        b = len(max_lens)
        self.options, self.ids = options, ids
        self.max_lens = np.asarray(max_lens, dtype=np.int64)  # (B,) per original sentence
        self.topk = min(4, vocab_size)  # the best token plus at most pad, bos and eos disallowed
        self.alive = np.arange(b)  # (R,) original sentence of every live row
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.log_probs = np.zeros(b, dtype=np.float64)  # (B,) summed like the reference: float64
        self._results: list[TranslationResult | None] = [None] * b
        self._step = 0

    def start(self) -> StepRequest:
        b = self.alive.size
        return StepRequest(0, np.full((b, 1), self.ids.bos, dtype=np.int64), np.arange(b), None, self.topk)

    def advance(self, scores: StepScores) -> StepRequest | None:
        step = self._step
        vals, toks = masked_candidates(scores, step, self.max_lens[self.alive], self.ids,
                                       self.options.min_decoding_length)
        col = np.argmax(vals > NEG_INF, axis=1)  # the first allowed token is the best one
        rows = np.arange(vals.shape[0])
        best, best_lp = toks[rows, col], vals[rows, col]  # (R,)
        self.log_probs[self.alive] += best_lp
        keep: list[int] = []
        for row, orig in enumerate(self.alive.tolist()):
            tok = int(best[row])
            if tok == self.ids.eos:
                length = len(self.tokens[orig]) + 1
                reason = "length" if length >= int(self.max_lens[orig]) else "eos"
                lp = float(self.log_probs[orig])
                hyp = Hypothesis(self.tokens[orig], self.options.normalize(lp, length), lp)
                self._results[orig] = TranslationResult([hyp], reason)
            else:
                self.tokens[orig].append(tok)
                keep.append(row)
        self._step = step + 1
        if not keep:
            self.alive = self.alive[:0]
            return None
        keep_a = np.asarray(keep, dtype=np.int64)
        changed = keep_a.size < self.alive.size
        self.alive = self.alive[keep_a]
        return StepRequest(self._step, best[keep_a].reshape(-1, 1), keep_a, keep_a if changed else None, self.topk)

    def drop(self, request: StepRequest, codes: np.ndarray) -> StepRequest | None:
        """`request` (the last one `advance` returned) without the live sentences whose code in `codes` (B,
        by original index) is ABANDON (they end with no hypotheses, finish reason ABANDONED) or STOP_PARTIAL
        (they end with their tokens so far, finish reason DEADLINE). None when none is left."""
        lost = codes[self.alive] != KEEP  # (R,) one row per sentence
        if not lost.any():
            return request
        for orig in self.alive[lost].tolist():
            if codes[orig] == STOP_PARTIAL:
                tokens, lp = self.tokens[orig], float(self.log_probs[orig])
                hyp = Hypothesis(list(tokens), self.options.normalize(lp, max(1, len(tokens))), lp)
                self._results[orig] = TranslationResult([hyp], DEADLINE)
            else:
                self._results[orig] = TranslationResult([], ABANDONED)
        prev_live = self.alive.size if request.sentences is None else -1
        keep = np.flatnonzero(~lost)
        self.alive = self.alive[keep]
        if keep.size == 0:
            return None
        return _without(request, keep, keep, prev_live)

    def results(self) -> list[TranslationResult]:
        return [r if r is not None else TranslationResult([], "length") for r in self._results]


@dataclass
class _Finished:
    score: float  # normalized ranking score
    log_prob: float
    tokens: list[int]
    reason: str


class BeamSearch:
    """K rows per sentence; candidates ranked in float64 exactly as model/decode.py's beam_search."""

    def __init__(self, max_lens: list[int], options: DecodingOptions, ids: SpecialIds, vocab_size: int) -> None:
        b = len(max_lens)
        self.options, self.ids, self.vocab = options, ids, vocab_size
        self.k = options.beam_size
        self.topk = min(2 * self.k + 3, vocab_size)
        self.max_lens = np.asarray(max_lens, dtype=np.int64)  # (B,) per original sentence
        self.alive = np.arange(b)  # (B,) original index of every live sentence
        # The first step runs one row per sentence: the reference's K-1 other rows score -inf.
        self.scores = np.zeros((b, 1), dtype=np.float64)  # (B, rows per sentence)
        self.history = np.zeros((b, 0), dtype=np.int64)  # (R, T) tokens of every live row
        self.finished: list[list[_Finished]] = [[] for _ in range(b)]
        self._step = 0
        self._first_k = (np.arange(2 * self.k) < self.k)[None, :]  # (1, 2K) ranks where eos may finish
        self._beam_cache: dict[tuple[int, int], np.ndarray] = {}
        self._stopped: dict[int, str] = {}  # original index -> finish reason, for sentences drop() ended

    def start(self) -> StepRequest:
        b = self.alive.size
        return StepRequest(0, np.full((b, 1), self.ids.bos, dtype=np.int64), np.arange(b), None, self.topk)

    def advance(self, scores: StepScores) -> StepRequest | None:
        step, k, n = self._step, self.k, self.alive.size
        per = self.scores.shape[1]  # rows per sentence this step: 1 at step 0, K after
        width = 2 * k
        row_max = np.repeat(self.max_lens[self.alive], per) if per > 1 else self.max_lens[self.alive]  # (R,)
        vals, toks = masked_candidates(scores, step, row_max, self.ids, self.options.min_decoding_length)
        kk = vals.shape[1]
        cand = (self.scores.reshape(-1, 1) + vals).reshape(n, per * kk)  # (B, per*k) float64
        toks = toks.reshape(n, per * kk)
        beam = self._beam_of_column(per, kk)  # (per*k,) row within its sentence of every column
        flat = beam * self.vocab + toks  # the reference's index into K*V
        order = np.lexsort((flat, -cand), axis=1)[:, :width]  # (B, 2K) best first, ties by index
        sent = np.arange(n)[:, None]
        top_v, top_t, top_b = cand[sent, order], toks[sent, order], beam[order]  # (B, 2K) each

        finite = top_v > NEG_INF
        is_eos = top_t == self.ids.eos
        live = finite & ~is_eos
        slot = np.cumsum(live, axis=1) - 1  # (B, 2K) live row a candidate would fill
        fill = live & (slot < k)
        finish = finite & is_eos & self._first_k  # eos counts only among the first K

        next_scores = np.full((n, k), NEG_INF, dtype=np.float64)
        next_tokens = np.full((n, k), self.ids.eos, dtype=np.int64)
        origins = np.repeat(sent * per, k, axis=1)  # dead rows continue the sentence's row 0
        js, rs = np.nonzero(fill)
        slots = slot[js, rs]
        next_scores[js, slots] = top_v[js, rs]
        next_tokens[js, slots] = top_t[js, rs]
        origins[js, slots] = js * per + top_b[js, rs]

        length = step + 1
        if finish.any():
            for j, r in zip(*np.nonzero(finish), strict=True):  # row-major: rank order within a sentence
                orig = int(self.alive[j])
                lp = float(top_v[j, r])
                reason = "length" if length >= int(self.max_lens[orig]) else "eos"
                tokens = self.history[j * per + int(top_b[j, r])].tolist()
                self.finished[orig].append(_Finished(self.options.normalize(lp, length), lp, tokens, reason))

        best_live = next_scores.max(axis=1).tolist()  # (B,)
        keep = [j for j, orig in enumerate(self.alive.tolist())
                if not _sentence_done(self.finished[orig], best_live[j], length, k, self.options)]
        self._step = length
        if not keep:
            self.alive = self.alive[:0]
            return None
        if len(keep) == n:
            cache_index, tokens_in = origins.reshape(-1), next_tokens.reshape(-1, 1)
            self.scores, sentences = next_scores, None
        else:
            keep_a = np.asarray(keep, dtype=np.int64)
            cache_index, tokens_in = origins[keep_a].reshape(-1), next_tokens[keep_a].reshape(-1, 1)
            self.scores, sentences = next_scores[keep_a], keep_a
            self.alive = self.alive[keep_a]
        # (R', T+1): the tokens of every next row; cache_index indexes this step's rows.
        self.history = np.concatenate([self.history[cache_index], tokens_in], axis=1)
        return StepRequest(length, tokens_in, cache_index, sentences, self.topk)

    def drop(self, request: StepRequest, codes: np.ndarray) -> StepRequest | None:
        """`request` (the last one `advance` returned) without the live sentences whose code in `codes` (B,
        by original index) is ABANDON (they end with no hypotheses, finish reason ABANDONED) or STOP_PARTIAL
        (they end with their best hypotheses so far: finished ones and live rows, the live ones scored at
        their current length; finish reason DEADLINE). None when none is left."""
        lost = codes[self.alive] != KEEP  # (B',)
        if not lost.any():
            return request
        length = self.history.shape[1]  # tokens every live row holds now
        for j in np.flatnonzero(lost).tolist():
            orig = int(self.alive[j])
            if codes[orig] == STOP_PARTIAL:
                self.finished[orig] += [_Finished(self.options.normalize(sc, max(1, length)), sc,
                                                  self.history[j * self.k + r].tolist(), DEADLINE)
                                        for r, sc in enumerate(self.scores[j].tolist()) if sc > NEG_INF]
                self._stopped[orig] = DEADLINE
            else:
                self._stopped[orig] = ABANDONED
        prev_live = self.alive.size if request.sentences is None else -1
        keep = np.flatnonzero(~lost)
        rows = (keep[:, None] * self.k + np.arange(self.k)[None, :]).reshape(-1)  # K rows per sentence
        self.alive, self.scores, self.history = self.alive[keep], self.scores[keep], self.history[rows]
        if keep.size == 0:
            return None
        return _without(request, keep, rows, prev_live)

    def _beam_of_column(self, per: int, kk: int) -> np.ndarray:
        key = (per, kk)
        if key not in self._beam_cache:
            self._beam_cache[key] = np.arange(per * kk) // kk
        return self._beam_cache[key]

    def results(self) -> list[TranslationResult]:
        out = [_result(f, self.options) for f in self.finished]
        for i, reason in self._stopped.items():
            out[i] = TranslationResult([] if reason == ABANDONED else out[i].hypotheses, reason)
        return out


def _sentence_done(finished: list[_Finished], best_live: float, length: int, k: int,
                   options: DecodingOptions) -> bool:
    """The reference's stop test, given the sentence's best live score (float64)."""
    if best_live == NEG_INF:
        return True
    if len(finished) < k:
        return False
    kth = sorted((f.score for f in finished), reverse=True)[k - 1]
    return options.normalize(best_live, length) <= kth


def _result(finished: list[_Finished], options: DecodingOptions) -> TranslationResult:
    ranked = sorted(finished, key=lambda f: -f.score)  # stable: ties keep finishing order
    top = ranked[: options.num_hypotheses]
    return TranslationResult([Hypothesis(f.tokens, f.score, f.log_prob) for f in top],
                             top[0].reason if top else "length")


def make_search(max_lens: list[int], options: DecodingOptions, ids: SpecialIds, vocab_size: int) -> Search:
    """Greedy for beam_size 1 (the fast path), beam search otherwise."""
    if options.beam_size == 1:
        return GreedySearch(max_lens, options, ids, vocab_size)
    return BeamSearch(max_lens, options, ids, vocab_size)
