"""Step-level batching at the engine: sentences that join a running loop and leave it decode as alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.engine import Engine, EngineConfig
from service.engine.loop import DecodeLoop, Prefix
from service.options import DecodingOptions


@pytest.fixture(scope="module")
def engine(tiny_repository_entry: Path) -> Engine:
    return Engine.load(tiny_repository_entry, EngineConfig(provider="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def sources(engine: Engine, german: list[str]) -> list[list[int]]:
    return engine.tokenizer.encode_batch(german[:12])


OPTIONS = [
    DecodingOptions(beam_size=4),
    DecodingOptions(beam_size=1),
    DecodingOptions(beam_size=4, length_penalty=0.6, num_hypotheses=3),
    DecodingOptions(beam_size=2, min_decoding_length=3, max_decoding_length=12),
    DecodingOptions(beam_size=4, max_decoding_length=9),
]


def _same(got, want) -> None:  # type: ignore[no-untyped-def]
    assert got.finish_reason == want.finish_reason
    assert [h.tokens for h in got.hypotheses] == [h.tokens for h in want.hypotheses]
    np.testing.assert_allclose([h.score for h in got.hypotheses], [h.score for h in want.hypotheses], atol=1e-4)


def test_staggered_arrivals_with_mixed_options_decode_as_each_sentence_alone(
        engine: Engine, sources: list[list[int]]) -> None:
    loop = DecodeLoop(engine)
    plan = {0: [0, 1], 1: [2], 3: [3, 4, 5], 4: [6], 7: [7, 8], 9: [9, 10, 11]}  # step -> sources joining
    jobs, step, rows_seen = [], 0, set()
    while step <= max(plan) or not loop.idle:
        for i in plan.get(step, []):
            options = OPTIONS[i % len(OPTIONS)]
            jobs += [(i, options, job) for job in loop.submit([sources[i]], options)]
        loop.step()
        rows_seen.add(loop.live_rows)
        step += 1
    assert len(rows_seen) > 3  # the loop really grew and shrank
    for i, options, job in jobs:
        alone = engine.translate_ids([sources[i]], options)[0]
        assert job.result is not None
        _same(job.result, alone)


def test_a_cohort_of_several_sentences_joining_mid_loop_matches_one_batch(
        engine: Engine, sources: list[list[int]]) -> None:
    loop = DecodeLoop(engine)
    options = DecodingOptions(beam_size=4)
    first = loop.submit(sources[:3], options)
    for _ in range(2):
        loop.step()
    second = loop.submit(sources[3:8], options)
    while not loop.idle:
        loop.step()
    for job, want in zip(first + second, engine.translate_ids(sources[:8], options), strict=True):
        assert job.result is not None
        _same(job.result, want)


def test_a_loop_that_runs_long_reuses_its_cache_slots(engine: Engine, sources: list[list[int]]) -> None:
    """Sentences keep joining for more steps than the positional table has rows: the cache shifts over the
    slots no live sentence owns any more instead of growing, and late sentences still decode as alone."""
    loop = DecodeLoop(engine)
    options = DecodingOptions(beam_size=2, max_decoding_length=8)
    jobs = []
    limit = engine.entry.config.max_positions
    widest, latest = 0, 0
    for step in range(limit + 40):
        if step % 3 == 0:
            jobs += loop.submit([sources[step % len(sources)]], options)
        loop.step()
        widest = max([widest] + [lane.state.slots for lane in loop.lanes.values()])
        latest = max([latest] + [lane.state.slot for lane in loop.lanes.values()])
    while not loop.idle:
        loop.step()
    assert 0 < widest < limit // 2  # a few sentences of <= 8 steps: never near the table's length
    # and the slot a step writes stays near the live sentences' span (the attention reads every slot up to
    # it): shifted once half the slots are free, not only when the cache is full
    assert latest < 24
    assert all(j.result is not None for j in jobs)
    for job in (jobs[0], jobs[len(jobs) // 2], jobs[-1]):
        _same(job.result, engine.translate_ids([job.source], options)[0])


def test_dropped_sentences_leave_at_once_and_the_others_decode_as_alone(
        engine: Engine, sources: list[list[int]]) -> None:
    from service.engine.search import ABANDON, ABANDONED, DEADLINE, STOP_PARTIAL

    loop = DecodeLoop(engine)
    beam = DecodingOptions(beam_size=4)
    greedy = DecodingOptions(beam_size=1)
    a = loop.submit(sources[:4], beam)
    b = loop.submit(sources[4:6], greedy)
    for _ in range(3):
        loop.step()
    rows = loop.live_rows
    ended = loop.drop({a[1]: ABANDON, a[2]: STOP_PARTIAL, b[0]: ABANDON})
    assert set(ended) == {a[1], a[2], b[0]}
    assert loop.live_rows == rows - 4 - 4 - 1  # their rows are gone before the next step
    assert a[1].result is not None and a[1].result.finish_reason == ABANDONED and not a[1].result.hypotheses
    assert a[2].result is not None and a[2].result.finish_reason == DEADLINE and a[2].result.hypotheses
    assert len(a[2].result.hypotheses[0].tokens) >= 1
    while not loop.idle:
        loop.step()
    for job, options in ((a[0], beam), (a[3], beam), (b[1], greedy)):
        assert job.result is not None
        _same(job.result, engine.translate_ids([job.source], options)[0])


@pytest.mark.parametrize("options", [DecodingOptions(beam_size=4), DecodingOptions(beam_size=1),
                                     DecodingOptions(beam_size=3, length_penalty=0.6, num_hypotheses=2)])
def test_streamed_prefixes_grow_and_start_the_final_best_hypothesis(
        engine: Engine, sources: list[list[int]], options: DecodingOptions) -> None:
    """on_prefix reports the tokens every hypothesis still in the running shares: each report extends the
    one before (more tokens, or the same with what follows them newly known) and the final best hypothesis
    starts with all of them, then goes on with one of the reported following tokens (eos: it ends there);
    greedy reports every token."""
    loop = DecodeLoop(engine)
    reports: dict[int, list[Prefix]] = {i: [] for i in range(6)}
    jobs = loop.submit(sources[:3], options, on_prefix=[reports[i].append for i in range(3)])
    loop.step()
    jobs += loop.submit(sources[3:6], options, on_prefix=[reports[i].append for i in range(3, 6)])
    while not loop.idle:
        loop.step()
    assert not loop._watched
    grew = 0
    closed_seen = [0]
    for i, job in enumerate(jobs):
        assert job.result is not None
        best = job.result.hypotheses[0].tokens
        seen: list[int] = []
        closed = False
        for prefix in reports[i]:
            tokens = prefix.tokens
            assert tokens[: len(seen)] == seen
            assert len(tokens) > len(seen) or (tokens == seen and prefix.following is not None and not closed)
            assert best[: len(tokens)] == tokens
            if prefix.following is not None:
                after = best[len(tokens)] if len(best) > len(tokens) else engine.special_ids.eos
                assert after in prefix.following
            seen, closed = tokens, prefix.following is not None
            closed_seen[0] += closed
        grew += len(reports[i])
        if options.beam_size == 1:  # greedy: every token but the last step's eos was reported
            assert seen == best
        _same(job.result, engine.translate_ids([sources[i]], options)[0])  # watching changes nothing
    assert grew >= 6
    if options.beam_size > 1:  # beams part after an agreed prefix: what follows it is known then
        assert closed_seen[0] > 0
    else:  # greedy: the next token is never out before it is reported itself
        assert closed_seen[0] == 0


def test_the_agreed_prefix_reads_live_beams_and_only_the_best_finished_hypothesis() -> None:
    """A finished hypothesis ranked below the best finished one can no longer be the result, so it does not
    hold the prefix back; the best finished one and every live beam do."""
    from service.engine.lane_search import LaneBeamSearch
    from service.engine.search import NEG_INF, SpecialIds, _Finished

    search = LaneBeamSearch(3, SpecialIds(pad=0, bos=1, eos=2), 20)
    search.add(["s"], [10], DecodingOptions(beam_size=3))
    search.step = np.array([4])
    search.history = np.zeros((3, 8), dtype=np.int64)
    search.history[:, :4] = [[5, 6, 7, 9], [5, 6, 7, 8], [4, 4, 4, 4]]
    search.scores = np.array([[-0.5, -0.7, NEG_INF]])  # row 2 is dead: its tokens do not count
    assert search.agreed(0) == 3 and search.agreed_tokens(0, 3) == [5, 6, 7]
    search.finished = [[_Finished(-1.0, -1.0, [5, 6, 3], "eos"), _Finished(-9.0, -9.0, [4], "eos")]]
    assert search.agreed(0) == 2  # the best finished one parts from the beams after two tokens
    search.finished[0].append(_Finished(-0.1, -0.1, [5, 6, 7, 8, 3], "eos"))  # a better one: the -1.0 is out
    assert search.agreed(0) == 3
    assert search.following(0, 3) == [8, 9]  # the live beams' 4th tokens and the best finished one's
    search.finished[0].append(_Finished(-0.05, -0.05, [5, 6, 7], "eos"))  # ends after the agreed three
    assert search.following(0, 3) == [2, 8, 9]  # eos stands for its end
    assert search.following(0, 4) is None  # no live beam has a 5th token yet
