"""A decode loop that sentences join and leave between two decoder steps (step-level batching).

    loop = DecodeLoop(engine)
    jobs = loop.submit(sources, DecodingOptions(beam_size=4))   # any time, from the loop's thread
    while not loop.idle:
        for job in loop.step():                                  # one decoder call per lane
            job.result                                           # finished this step

Sentences run in lanes, one per beam width K (the decoder's fused self-attention takes one width per
call). Captions and paragraphs share a lane: a decoder call costs much the same for 4 rows as for 16,
so more lanes of fewer rows lose more than the wider source and self-attention window cost
(benchmarks/README.md, "Short calls while long ones run"). A lane is one decoder state
(service/engine/runtime.py) whose rows are K per sentence, and one search over all its sentences
(service/engine/lane_search.py: greedy or beam, token for token the reference), in which every sentence
has its own step, length penalty, min/max lengths and n-best. A submitted sentence is encoded apart
and joins its lane at the next step, at that step's cache slot with position 0 (signature v2: per-row
positions and key masks); a finished one leaves before the next step. A step costs one decoder call
and one search update per lane, however many requests its sentences came from.

A beam search starts from one row per sentence; in a lane a joining sentence runs K rows whose
rows 1..K-1 score -inf (the reference's first step), so a sentence never changes the width of a
running lane. Shapes: B sentences, K beams, R = B*K rows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.engine.lane_search import LaneBeamSearch, LaneGreedySearch, lane_search
from service.engine.runtime import DecoderState
from service.engine.search import ABANDONED, DEADLINE, KEEP, STOP_PARTIAL
from service.options import DecodingOptions, TranslationResult

_ids = itertools.count()


@dataclass(frozen=True)
class Prefix:
    """What a streamed sentence is told after a step: the tokens on which every hypothesis still in the running
    agrees (the final best hypothesis starts with them), and the tokens that can follow them in those
    hypotheses (eos for one that ends there), or None while one of them has not generated its next token.
    When every following token starts a word, the last word of `tokens` is complete."""

    tokens: list[int]
    following: tuple[int, ...] | None = None


@dataclass(eq=False)
class Job:
    """One sentence of a loop: its source (token ids without eos), its options and, once done, its result."""

    source: list[int]
    options: DecodingOptions
    result: TranslationResult | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # told the tokens every hypothesis still in the running shares, each time that prefix grows (streaming)
    on_prefix: Callable[[Prefix], object] | None = None
    agreed: int = 0  # tokens reported to on_prefix so far
    closed: bool = False  # whether what follows them was reported too


@dataclass(eq=False)
class _Lane:
    beams: int
    state: DecoderState
    search: LaneBeamSearch | LaneGreedySearch


class DecodeLoop:
    """One running decode loop over one engine. Not thread-safe: one thread submits and steps."""

    def __init__(self, engine: Any, observer: Any = None) -> None:
        """`observer`: service.engine.EngineObserver, told each encoder call's and decoder step's time."""
        self.engine = engine
        self.observer = observer
        self.runtime = engine.runtime
        self.lanes: dict[int, _Lane] = {}  # by beam width
        self._pending: list[tuple[list[Job], DecodingOptions]] = []
        self._watched: set[Job] = set()  # live jobs with an on_prefix

    # -- what the scheduler sees -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.lanes and not self._pending

    @property
    def live_rows(self) -> int:
        return sum(lane.beams * lane.search.size for lane in self.lanes.values())

    def submit(self, sources: Sequence[Sequence[int]], options: DecodingOptions,
               on_prefix: Sequence[Callable[[Prefix], object] | None] | None = None) -> list[Job]:
        """Queue sentences (token ids without eos); they join at the next step. `on_prefix[i]`, when given, is
        called after a step with a `Prefix` of sentence i each time it grows: more agreed tokens, or the tokens
        that follow them known. Raises ValueError for a source too long or with an id outside the vocabulary."""
        self.engine.pad_sources(sources, options)  # checks ids
        self.engine._check_lengths(sources)
        watch = list(on_prefix) if on_prefix is not None else [None] * len(sources)
        jobs = [Job(list(s), options, on_prefix=w) for s, w in zip(sources, watch, strict=True)]
        self._watched.update(j for j in jobs if j.on_prefix is not None)
        if jobs:
            self._pending.append((jobs, options))
        return jobs

    def step(self) -> list[Job]:
        """Admit what is pending, run one decoder step in every lane, advance every search; returns the jobs
        that finished in this step (their `result` set, text detokenized)."""
        self._admit()
        done: list[Job] = []
        for key, lane in list(self.lanes.items()):
            done += self._step_lane(lane)
            if not lane.search.size:
                del self.lanes[key]
        return done

    def drop(self, codes: dict[Job, int]) -> list[Job]:
        """End live or pending jobs early, by search code (service.engine.search): ABANDON (nobody waits:
        result without hypotheses, finish reason "abandoned") or STOP_PARTIAL (its best hypotheses so far,
        finish reason "deadline"); their rows leave before the next step. Returns the jobs ended."""
        ended: list[Job] = []
        pending, self._pending = self._pending, []
        for jobs, options in pending:
            for job in jobs:
                code = codes.get(job, KEEP)
                if code != KEEP:  # never started: nothing to answer with
                    job.result = TranslationResult([], DEADLINE if code == STOP_PARTIAL else ABANDONED)
                    ended.append(job)
                    self._watched.discard(job)
            rest = [j for j in jobs if j.result is None]
            if rest:
                self._pending.append((rest, options))
        for key, lane in list(self.lanes.items()):
            gone, kept = lane.search.drop(codes)
            for job, result in gone:
                job.result = self.engine._detokenize(result)
                ended.append(job)
                self._watched.discard(job)
            if not lane.search.size:
                del self.lanes[key]
            elif gone:
                self.runtime.keep(lane.state, kept)
        return ended

    @property
    def jobs(self) -> list[Job]:
        """Every job not finished yet: pending ones and those decoding."""
        live = [j for lane in self.lanes.values() for j in lane.search.keys]
        return [j for jobs, _ in self._pending for j in jobs] + live

    # -- inside --------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Every pending sentence joins its lane: one encoder call per lane for all of them."""
        pending, self._pending = self._pending, []
        by_lane: dict[int, list[tuple[list[Job], DecodingOptions]]] = {}
        for jobs, options in pending:
            by_lane.setdefault(options.beam_size, []).append((jobs, options))
        for beams, groups in by_lane.items():
            jobs = [j for group, _ in groups for j in group]
            src, _ = self.engine.pad_sources([j.source for j in jobs], groups[0][1])
            lane = self.lanes.get(beams)
            started = time.perf_counter()
            if lane is None:
                search = lane_search(beams, self.engine.special_ids, self.engine.vocab_size)
                lane = self.lanes[beams] = _Lane(beams, self.runtime.encode(src), search)
            else:
                self.runtime.admit(lane.state, src)
            if self.observer is not None:
                self.observer.on_encoder(time.perf_counter() - started)
            for group, options in groups:  # in the order of the encoded rows
                lane.search.add(group, self.engine.length_caps([len(j.source) for j in group], options), options)

    def _step_lane(self, lane: _Lane) -> list[Job]:
        ids, origin = lane.search.inputs()
        started = time.perf_counter()
        scores = self.runtime.step_rows(lane.state, ids, origin, None, lane.search.topk)
        if self.observer is not None:
            self.observer.on_decoder_step(time.perf_counter() - started, int(ids.size))
        ended, kept = lane.search.advance(scores)
        done: list[Job] = []
        for job, result in ended:
            job.result = self.engine._detokenize(result)
            done.append(job)
            self._watched.discard(job)
        if ended and lane.search.size:
            self.runtime.keep(lane.state, kept)
        if self._watched:
            self._report_prefixes(lane)
        return done

    def _report_prefixes(self, lane: _Lane) -> None:
        search = lane.search
        for j, job in enumerate(search.keys):
            if job.on_prefix is None:
                continue
            n = search.agreed(j)
            if n < job.agreed or (n == job.agreed and job.closed):
                continue  # nothing new: what follows these tokens was reported already
            following = search.following(j, n) if n else None
            if n > job.agreed or following is not None:
                job.agreed, job.closed = n, following is not None
                job.on_prefix(Prefix(search.agreed_tokens(j, n), None if following is None else tuple(following)))


