"""The searches of a decode loop's lane: one search over a changing set of sentences, each at its own
step with its own options (service/engine/loop.py).

Token for token the rules of service/engine/search.py (and so of the PyTorch reference), with what a
batch shared there held per sentence here: the step, the length caps, min length, length penalty and
n-best. Sentences join (`add`) and leave (`advance`, `drop`) between two decoder calls; a step costs
the same few numpy calls however many requests the sentences came from.

Rows are K per sentence, always (the lane's decoder calls keep one width). A joining sentence's rows
1..K-1 start dead (-inf), which is the reference's first step: its K candidates' ranking reads row 0
only, where search.py's first step has one row. Shapes: B live sentences, K beams, R = B*K rows,
k top-k width, T history capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.engine.search import (
    ABANDONED,
    DEADLINE,
    KEEP,
    NEG_INF,
    STOP_PARTIAL,
    SpecialIds,
    StepScores,
    _Finished,
    _result,
    _sentence_done,
)
from service.options import DecodingOptions, Hypothesis, TranslationResult

Finished = list[tuple[Any, TranslationResult]]
"""(key, result) of the sentences that ended, in the order they ended."""


def fill_holes(kept: np.ndarray, before: int) -> np.ndarray:
    """The order of the sentences that stay (`kept`: their positions among `before`, increasing) in which the
    fewest move: each stays where it is unless it sits past the new end, and those fill the holes left by
    the sentences that went. Applied to the decoder state, it moves K/V rows only for those."""
    n = kept.size
    if n == before:
        return kept
    order = np.arange(n)
    stay = np.zeros(n, dtype=bool)
    inside = kept[kept < n]
    stay[inside] = True
    order[~stay] = kept[kept >= n]
    return order


class _Lane:
    """What both searches keep per live sentence."""

    def __init__(self, k: int, ids: SpecialIds, vocab_size: int, topk: int) -> None:
        self.k, self.ids, self.vocab, self.topk = k, ids, vocab_size, topk
        self.keys: list[Any] = []
        self.options: list[DecodingOptions] = []
        self.step = np.zeros(0, dtype=np.int64)  # (B,) tokens generated so far
        self.max_len = np.zeros(0, dtype=np.int64)  # (B,) length caps, eos included
        self.min_len = np.zeros(0, dtype=np.int64)  # (B,)
        self.history = np.zeros((0, 8), dtype=np.int64)  # (R, T) tokens of every row, first step[b] valid
        self.tokens_in = np.zeros(0, dtype=np.int64)  # (R,) next input token of every row
        self.origin = np.zeros(0, dtype=np.int64)  # (R,) the beam each row continues (within its sentence)

    @property
    def size(self) -> int:
        return len(self.keys)

    def _add(self, keys: Sequence[Any], max_lens: Sequence[int], options: DecodingOptions) -> None:
        n, k = len(keys), self.k
        self.keys += list(keys)
        self.options += [options] * n
        self.step = np.concatenate([self.step, np.zeros(n, dtype=np.int64)])
        self.max_len = np.concatenate([self.max_len, np.asarray(max_lens, dtype=np.int64)])
        self.min_len = np.concatenate([self.min_len, np.full(n, options.min_decoding_length, dtype=np.int64)])
        self.history = np.concatenate([self.history, np.zeros((n * k, self.history.shape[1]), dtype=np.int64)])
        self.tokens_in = np.concatenate([self.tokens_in, np.full(n * k, self.ids.bos, dtype=np.int64)])
        self.origin = np.concatenate([self.origin, np.tile(np.arange(k, dtype=np.int64), n)])

    def _keep(self, keep: np.ndarray) -> None:
        """Only the sentences `keep` (positions, in their new order) stay."""
        rows = (keep[:, None] * self.k + np.arange(self.k)).reshape(-1)
        self.keys = [self.keys[i] for i in keep.tolist()]
        self.options = [self.options[i] for i in keep.tolist()]
        self.step, self.max_len, self.min_len = self.step[keep], self.max_len[keep], self.min_len[keep]
        self.history, self.tokens_in, self.origin = self.history[rows], self.tokens_in[rows], self.origin[rows]

    def _masked(self, scores: StepScores) -> tuple[np.ndarray, np.ndarray]:
        """search.masked_candidates with each row's own step and length rules."""
        k = self.k
        step_r, min_r = np.repeat(self.step, k), np.repeat(self.min_len, k)
        toks = scores.topk_ids[:, : self.topk]
        vals = scores.topk_log_probs[:, : self.topk].astype(np.float64)
        early = step_r < min_r  # (R,) eos still blocked
        blocked = (toks == self.ids.pad) | (toks == self.ids.bos) | ((toks == self.ids.eos) & early[:, None])
        vals[blocked] = NEG_INF
        last = (step_r + 1) >= np.repeat(self.max_len, k)  # rows whose only allowed token is eos
        if last.any():
            eos_lp = scores.eos_log_probs().astype(np.float64)[last]
            eos_lp[early[last]] = 0.0  # eos was blocked: the reference lets it in with log-prob 0
            toks = toks.copy()
            vals[last] = NEG_INF
            vals[last, 0] = np.where(np.isinf(eos_lp), 0.0, eos_lp)
            toks[last, 0] = self.ids.eos
        return vals, toks

    def _grow_history(self) -> None:
        if self.size and int(self.step.max()) >= self.history.shape[1]:
            wider = np.zeros((self.history.shape[0], 2 * self.history.shape[1]), dtype=np.int64)
            wider[:, : self.history.shape[1]] = self.history
            self.history = wider

    def drop(self, codes: dict[Any, int]) -> tuple[Finished, np.ndarray]:
        """End sentences by search code (ABANDON: no hypotheses, "abandoned"; STOP_PARTIAL: the best so far,
        "deadline"); returns (ended, positions that stay)."""
        ended: Finished = []
        keep: list[int] = []
        for j, key in enumerate(self.keys):
            code = codes.get(key, KEEP)
            if code == KEEP:
                keep.append(j)
            else:
                ended.append((key, self._partial(j) if code == STOP_PARTIAL else TranslationResult([], ABANDONED)))
        return ended, self._leave(keep)

    def _leave(self, keep: list[int]) -> np.ndarray:
        """Only the sentences at positions `keep` (increasing) stay, in `fill_holes` order; returns that order."""
        kept = fill_holes(np.asarray(keep, dtype=np.int64), self.size)
        if kept.size < self.size:
            self._keep(kept)
        return kept

    def _partial(self, j: int) -> TranslationResult:
        raise NotImplementedError

    def agreed(self, j: int) -> int:
        """How many leading tokens every hypothesis of sentence j still in the running shares: its live rows
        and its best finished hypothesis (a finished one ranked below it can no longer be the result). The
        final best hypothesis starts with them, and the count never shrinks."""
        raise NotImplementedError

    def agreed_tokens(self, j: int, n: int) -> list[int]:
        """The first n tokens of sentence j (all its rows share them when n <= agreed(j))."""
        return self.history[j * self.k, :n].tolist()

    def following(self, j: int, n: int) -> list[int] | None:
        """The tokens that come after the first n (n <= agreed(j)) in the hypotheses of sentence j still in the
        running, eos for one that ends there; None while a live row has not generated its (n+1)-th token."""
        return None

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(input ids (R,), origin beam (R,)) of the next decoder call."""
        return self.tokens_in, self.origin


class LaneBeamSearch(_Lane):
    """Beam search (K >= 2 rows per sentence), candidates ranked in float64 as search.BeamSearch does."""

    def __init__(self, k: int, ids: SpecialIds, vocab_size: int) -> None:
        super().__init__(k, ids, vocab_size, min(2 * k + 3, vocab_size))
        self.scores = np.zeros((0, k), dtype=np.float64)  # (B, K)
        self.finished: list[list[_Finished]] = []
        self._first_k = (np.arange(2 * k) < k)[None, :]
        self._beam = np.arange(k * self.topk) // self.topk  # (K*k,) row within its sentence of each column

    def add(self, keys: Sequence[Any], max_lens: Sequence[int], options: DecodingOptions) -> None:
        n = len(keys)
        self._add(keys, max_lens, options)
        first = np.full((n, self.k), NEG_INF)
        first[:, 0] = 0.0  # one live row: the reference's first step
        self.scores = np.concatenate([self.scores, first])
        self.finished += [[] for _ in range(n)]

    def advance(self, scores: StepScores) -> tuple[Finished, np.ndarray]:
        """Read one decoder call's scores; returns (sentences that ended, positions of those that stay)."""
        n, k = self.size, self.k
        width = 2 * k
        self._grow_history()
        vals, toks = self._masked(scores)
        kk = vals.shape[1]
        cand = (self.scores.reshape(-1, 1) + vals).reshape(n, k * kk)
        toks = toks.reshape(n, k * kk)
        beam = self._beam if kk == self.topk else np.arange(k * kk) // kk
        flat = beam * self.vocab + toks
        order = np.lexsort((flat, -cand), axis=1)[:, :width]
        sent = np.arange(n)[:, None]
        top_v, top_t, top_b = cand[sent, order], toks[sent, order], beam[order]
        finite = top_v > NEG_INF
        is_eos = top_t == self.ids.eos
        live = finite & ~is_eos
        slot = np.cumsum(live, axis=1) - 1
        fill = live & (slot < k)
        finish = finite & is_eos & self._first_k
        next_scores = np.full((n, k), NEG_INF)
        next_tokens = np.full((n, k), self.ids.eos, dtype=np.int64)
        origins = np.zeros((n, k), dtype=np.int64)  # dead rows continue the sentence's row 0
        js, rs = np.nonzero(fill)
        slots = slot[js, rs]
        next_scores[js, slots] = top_v[js, rs]
        next_tokens[js, slots] = top_t[js, rs]
        origins[js, slots] = top_b[js, rs]
        length = self.step + 1  # (B,)
        if finish.any():
            for j, r in zip(*np.nonzero(finish), strict=True):
                options = self.options[j]
                lp = float(top_v[j, r])
                reason = "length" if length[j] >= self.max_len[j] else "eos"
                tokens = self.history[j * k + int(top_b[j, r]), : self.step[j]].tolist()
                self.finished[j].append(_Finished(options.normalize(lp, int(length[j])), lp, tokens, reason))
        best_live = next_scores.max(axis=1).tolist()
        ended: Finished = []
        keep: list[int] = []
        for j in range(n):
            if _sentence_done(self.finished[j], best_live[j], int(length[j]), k, self.options[j]):
                ended.append((self.keys[j], _result(self.finished[j], self.options[j])))
            else:
                keep.append(j)
        rows = (np.arange(n)[:, None] * k + origins).reshape(-1)  # the row each next row continues
        self.history = self.history[rows]
        self.history[np.arange(n * k), np.repeat(self.step, k)] = next_tokens.reshape(-1)
        self.scores, self.step = next_scores, length
        self.tokens_in, self.origin = next_tokens.reshape(-1), origins.reshape(-1)
        return ended, self._leave(keep)

    def _keep(self, keep: np.ndarray) -> None:
        super()._keep(keep)
        self.scores = self.scores[keep]
        self.finished = [self.finished[j] for j in keep.tolist()]

    def _partial(self, j: int) -> TranslationResult:
        """Sentence j's best hypotheses so far: finished ones and live rows scored at their current length."""
        options, length = self.options[j], int(self.step[j])
        found = self.finished[j] + [
            _Finished(options.normalize(sc, max(1, length)), sc, self.history[j * self.k + r, :length].tolist(),
                      DEADLINE)
            for r, sc in enumerate(self.scores[j].tolist()) if sc > NEG_INF]
        return TranslationResult(_result(found, options).hypotheses, DEADLINE)

    def _live_rows(self, j: int) -> np.ndarray:
        """Rows (into history) of sentence j's live beams."""
        return j * self.k + np.flatnonzero(self.scores[j] > NEG_INF)

    def _best_finished(self, j: int) -> _Finished | None:
        """Of sentence j's finished hypotheses the only one that can still be the result (_result): the best,
        the first of equals as _result's stable sort."""
        return max(self.finished[j], key=lambda f: f.score) if self.finished[j] else None

    def agreed(self, j: int) -> int:
        length = int(self.step[j])
        rows = self.history[self._live_rows(j), :length]
        if rows.shape[0] > 1:
            differs = np.flatnonzero((rows != rows[0]).any(axis=0))
            length = int(differs[0]) if differs.size else length
        done = self._best_finished(j)
        if done is not None:
            if not rows.shape[0]:
                return len(done.tokens)
            n = min(length, len(done.tokens))
            differs = np.flatnonzero(np.asarray(done.tokens[:n]) != rows[0, :n])
            length = int(differs[0]) if differs.size else n
        return length

    def following(self, j: int, n: int) -> list[int] | None:
        live = self._live_rows(j)
        if live.size and n >= int(self.step[j]):
            return None
        nxt = self.history[live, n].tolist()
        done = self._best_finished(j)
        if done is not None:
            nxt.append(done.tokens[n] if n < len(done.tokens) else self.ids.eos)
        return sorted(set(nxt)) or None

    def agreed_tokens(self, j: int, n: int) -> list[int]:
        live = self._live_rows(j)
        if live.size:
            return self.history[int(live[0]), :n].tolist()
        done = self._best_finished(j)
        assert done is not None  # a sentence still in its lane has a live beam or a finished hypothesis
        return list(done.tokens[:n])


class LaneGreedySearch(_Lane):
    """Beam size 1: the best allowed token of every row, as search.GreedySearch."""

    def __init__(self, ids: SpecialIds, vocab_size: int) -> None:
        super().__init__(1, ids, vocab_size, min(4, vocab_size))
        self.log_probs = np.zeros(0, dtype=np.float64)  # (B,)

    def add(self, keys: Sequence[Any], max_lens: Sequence[int], options: DecodingOptions) -> None:
        self._add(keys, max_lens, options)
        self.log_probs = np.concatenate([self.log_probs, np.zeros(len(keys))])

    def advance(self, scores: StepScores) -> tuple[Finished, np.ndarray]:
        n = self.size
        self._grow_history()
        vals, toks = self._masked(scores)
        col = np.argmax(vals > NEG_INF, axis=1)
        rows = np.arange(n)
        best, best_lp = toks[rows, col], vals[rows, col]
        self.log_probs = self.log_probs + best_lp
        ended: Finished = []
        keep: list[int] = []
        for j in range(n):
            tok = int(best[j])
            if tok == self.ids.eos:
                length = int(self.step[j]) + 1
                reason = "length" if length >= int(self.max_len[j]) else "eos"
                lp = float(self.log_probs[j])
                hyp = Hypothesis(self.history[j, : self.step[j]].tolist(), self.options[j].normalize(lp, length), lp)
                ended.append((self.keys[j], TranslationResult([hyp], reason)))
            else:
                keep.append(j)
        self.history[rows, self.step] = best
        self.step = self.step + 1
        self.tokens_in, self.origin = best.astype(np.int64), np.zeros(n, dtype=np.int64)
        return ended, self._leave(keep)

    def _keep(self, keep: np.ndarray) -> None:
        super()._keep(keep)
        self.log_probs = self.log_probs[keep]

    def agreed(self, j: int) -> int:
        return int(self.step[j])  # one hypothesis: every token it has

    def _partial(self, j: int) -> TranslationResult:
        length, lp = int(self.step[j]), float(self.log_probs[j])
        hyp = Hypothesis(self.history[j, :length].tolist(), self.options[j].normalize(lp, max(1, length)), lp)
        return TranslationResult([hyp], DEADLINE)


def lane_search(beams: int, ids: SpecialIds, vocab_size: int) -> LaneBeamSearch | LaneGreedySearch:
    return LaneGreedySearch(ids, vocab_size) if beams == 1 else LaneBeamSearch(beams, ids, vocab_size)
