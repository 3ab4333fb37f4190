"""A decode loop that sentences join and leave between two decoder steps (step-level batching).

    loop = DecodeLoop(engine)
    jobs = loop.submit(sources, DecodingOptions(beam_size=4))   # any time, from the loop's thread
    while not loop.idle:
        for job in loop.step():                                  # one decoder call per lane
            job.result                                           # finished this step

Sentences run in lanes, one per beam width K (the decoder's fused self-attention takes one width per
call): a lane is one decoder state (service/engine/runtime.py) whose rows are K per sentence. In a
lane, sentences submitted together with the same options form a cohort, driven by one search of
service/engine/search.py (greedy or beam, token for token the reference); cohorts with different
length penalties, min/max lengths or n-best share the lane's decoder calls. A submitted sentence
is encoded apart and joins its lane at the next step, at that step's cache slot with position 0
(signature v2: per-row positions and key masks); a finished one leaves at the next step.

A beam search starts from one row per sentence; in a lane its first step runs K identical rows
(the lane's width) and the search reads the first of them, so a sentence never changes the
width of a running lane. Shapes: B sentences, K beams, R = B*K rows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.engine.runtime import DecoderState
from service.engine.search import ABANDONED, KEEP, Search, StepRequest, StepScores, make_search
from service.options import DecodingOptions, TranslationResult

_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One sentence of a loop: its source (token ids without eos), its options and, once done, its result."""

    source: list[int]
    options: DecodingOptions
    result: TranslationResult | None = None
    id: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False)
class _Cohort:
    """Sentences submitted together with one set of options, driven by one search."""

    jobs: list[Job]
    search: Search
    request: StepRequest | None
    live: int  # sentences of this cohort in the lane now (its rows are live * K)
    first: bool = True  # the next step is the search's first: one row per sentence for the search


@dataclass(eq=False)
class _Lane:
    beams: int
    state: DecoderState
    cohorts: list[_Cohort] = field(default_factory=list)


class DecodeLoop:
    """One running decode loop over one engine. Not thread-safe: one thread submits and steps."""

    def __init__(self, engine: Any, observer: Any = None) -> None:
        """`observer`: service.engine.EngineObserver, told each encoder call's and decoder step's time."""
        self.engine = engine
        self.observer = observer
        self.runtime = engine.runtime
        self.lanes: dict[int, _Lane] = {}
        self._pending: list[tuple[list[Job], DecodingOptions]] = []

    # -- what the scheduler sees -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.lanes and not self._pending

    @property
    def live_rows(self) -> int:
        return sum(lane.beams * sum(c.live for c in lane.cohorts) for lane in self.lanes.values())

    def submit(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> list[Job]:
        """Queue sentences (token ids without eos); they join at the next step. Raises ValueError for a
        source too long or with an id outside the vocabulary."""
        self.engine.pad_sources(sources, options)  # checks ids
        self.engine._check_lengths(sources)
        jobs = [Job(list(s), options) for s in sources]
        if jobs:
            self._pending.append((jobs, options))
        return jobs

    def step(self) -> list[Job]:
        """Admit what is pending, run one decoder step in every lane, advance every search; returns the jobs
        that finished in this step (their `result` set, text detokenized)."""
        self._admit()
        done: list[Job] = []
        for beams, lane in list(self.lanes.items()):
            done += self._step_lane(lane)
            if not lane.cohorts:
                del self.lanes[beams]
        return done

    def drop(self, codes: dict[Job, int]) -> list[Job]:
        """End live or pending jobs early, by search code (service.engine.search): ABANDON (nobody waits:
        result without hypotheses, finish reason "abandoned") or STOP_PARTIAL (its best hypotheses so far,
        finish reason "deadline"); their rows leave before the next step. Returns the jobs ended."""
        ended: list[Job] = []
        for jobs, options in list(self._pending):
            gone = [j for j in jobs if codes.get(j, KEEP) != KEEP]
            for job in gone:
                job.result = TranslationResult([], ABANDONED)
            ended += gone
            if gone:
                self._pending.remove((jobs, options))
                rest = [j for j in jobs if j not in gone]
                if rest:
                    self._pending.append((rest, options))
        for beams, lane in list(self.lanes.items()):
            keep: list[np.ndarray] = []
            changed, sentence, survivors = False, 0, []
            for c in lane.cohorts:
                assert c.request is not None
                order = np.asarray(c.search.alive)  # type: ignore[attr-defined]  # original index of each live one
                cohort_codes = np.array([codes.get(j, KEEP) for j in c.jobs], dtype=np.int8)
                lost = cohort_codes[order] != KEEP
                kept = np.flatnonzero(~lost)
                if lost.any():
                    changed = True
                    c.request = c.search.drop(c.request, cohort_codes)
                    results = c.search.results()
                    for i in order[lost].tolist():
                        c.jobs[i].result = self.engine._detokenize(results[i])
                        ended.append(c.jobs[i])
                keep.append(sentence + kept)
                sentence += c.live
                c.live = int(kept.size)
                if c.request is not None:
                    survivors.append(c)
            lane.cohorts = survivors
            if not survivors:
                del self.lanes[beams]
            elif changed:
                self.runtime.keep(lane.state, np.concatenate(keep))
        return ended

    @property
    def jobs(self) -> list[Job]:
        """Every job not finished yet: pending ones and those decoding."""
        live = [j for lane in self.lanes.values() for c in lane.cohorts for j in c.jobs if j.result is None]
        return [j for jobs, _ in self._pending for j in jobs] + live

    # -- inside --------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        pending, self._pending = self._pending, []
        for jobs, options in pending:
            src, max_lens = self.engine.pad_sources([j.source for j in jobs], options)
            beams = options.beam_size
            lane = self.lanes.get(beams)
            started = time.perf_counter()
            if lane is None:
                lane = self.lanes[beams] = _Lane(beams, self.runtime.encode(src))
            else:
                self.runtime.admit(lane.state, src)
            if self.observer is not None:
                self.observer.on_encoder(time.perf_counter() - started)
            search = make_search(max_lens, options, self.engine.special_ids, self.engine.vocab_size)
            lane.cohorts.append(_Cohort(jobs, search, search.start(), len(jobs)))

    def _step_lane(self, lane: _Lane) -> list[Job]:
        k = lane.beams
        ids, origin, topk = [], [], 0
        for c in lane.cohorts:
            request = c.request
            assert request is not None
            tokens = request.input_ids.reshape(-1)
            if c.first:  # one row per sentence for the search, K identical rows in the lane
                ids.append(np.repeat(tokens, k))
                origin.append(np.tile(np.arange(k), tokens.size))
            else:
                ids.append(tokens)
                origin.append(np.asarray(request.cache_index) % k)
            topk = max(topk, request.topk)
        started = time.perf_counter()
        rows = sum(x.size for x in ids)
        scores = self.runtime.step_rows(lane.state, np.concatenate(ids), np.concatenate(origin), None, topk)
        if self.observer is not None:
            self.observer.on_decoder_step(time.perf_counter() - started, rows)
        done: list[Job] = []
        keep: list[np.ndarray] = []
        row, sentence, changed = 0, 0, False
        survivors: list[_Cohort] = []
        for c in lane.cohorts:
            assert c.request is not None
            rows = c.live * k
            take = slice(row, row + rows, k) if c.first else slice(row, row + rows)
            width = c.request.topk
            part = StepScores(scores.topk_log_probs[take, :width], scores.topk_ids[take, :width],
                              _rows(scores.eos_log_probs, take))
            c.first = False
            c.request = c.search.advance(part)
            kept = np.arange(c.live) if c.request is None or c.request.sentences is None else c.request.sentences
            if c.request is None:
                kept = kept[:0]
                for job, result in zip(c.jobs, c.search.results(), strict=True):
                    job.result = self.engine._detokenize(result)
                    done.append(job)
            else:
                survivors.append(c)
            changed |= kept.size != c.live
            keep.append(sentence + kept)
            row += rows
            sentence += c.live
            c.live = int(kept.size)
        lane.cohorts = survivors
        if changed and survivors:
            self.runtime.keep(lane.state, np.concatenate(keep))
        return done


def _rows(eos: Any, take: slice) -> Any:
    return lambda: eos()[take]
