"""The engine's in-place cache (signature v2) against independent computations of the same steps.

- rows at different steps in one decoder call give what each row gives alone;
- a cache that outgrows its first allocation, and beams reordered through the indirection, give
  what the export side's runner gives with the cache gathered on the host (itself held to PyTorch
  by export/parity.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.ort_graphs import OrtGraphs
from service.engine import Engine, EngineConfig
from service.engine.runtime import FIRST_SLOTS, DecoderState, OrtModel
from service.engine.search import StepRequest

TOPK = 8


@pytest.fixture(scope="module")
def runtime(tiny_repository_entry: Path) -> OrtModel:
    return Engine.load(tiny_repository_entry, EngineConfig(provider="cpu", intra_op_threads=1)).runtime


def _src(runtime: OrtModel, *sources: list[int]) -> np.ndarray:
    cfg = runtime.entry.config
    out = np.full((len(sources), max(len(s) for s in sources) + 1), cfg.pad_id, dtype=np.int64)
    for i, s in enumerate(sources):
        out[i, : len(s)] = s
        out[i, len(s)] = cfg.eos_id
    return out


def _step(runtime: OrtModel, state: DecoderState, step: int, tokens: list[int], index: Any = None) -> Any:
    rows = len(tokens)
    request = StepRequest(step, np.array(tokens, dtype=np.int64).reshape(-1, 1),
                          np.arange(rows) if index is None else np.asarray(index), None, TOPK)
    return runtime.step(state, request)


def _alone(runtime: OrtModel, source: list[int], tokens: list[int]) -> list[Any]:
    """Scores of each step of one sentence fed `tokens` (bos first), decoded alone."""
    state = runtime.encode(_src(runtime, source))
    return [_step(runtime, state, t, [tok]) for t, tok in enumerate(tokens)]


def test_rows_at_different_steps_in_one_call_equal_each_row_alone(runtime: OrtModel) -> None:
    cfg = runtime.entry.config
    a, b = [5, 9, 14, 22, 7], [31, 8, 12]
    late = 4  # b's first slot: a has run 4 steps when b starts
    rng = np.random.default_rng(0)
    a_tokens = [cfg.bos_id, *rng.integers(4, cfg.vocab_size, 9).tolist()]
    b_tokens = [cfg.bos_id, *rng.integers(4, cfg.vocab_size, 9 - late).tolist()]
    a_alone, b_alone = _alone(runtime, a, a_tokens), _alone(runtime, b, b_tokens)

    state = runtime.encode(_src(runtime, a, b))
    state.start = np.array([0, late])  # b's rows own the slots from `late` on
    for t, a_tok in enumerate(a_tokens):
        # Before its start b's row computes whatever its dummy token gives; nothing of it is read later.
        b_tok = b_tokens[t - late] if t >= late else cfg.unk_id
        scores = _step(runtime, state, t, [a_tok, b_tok])
        np.testing.assert_allclose(scores.topk_log_probs[0], a_alone[t].topk_log_probs[0], atol=1e-5)
        assert scores.topk_ids[0, 0] == a_alone[t].topk_ids[0, 0]
        if t >= late:
            np.testing.assert_allclose(scores.topk_log_probs[1], b_alone[t - late].topk_log_probs[0], atol=1e-5)
            assert scores.topk_ids[1, 0] == b_alone[t - late].topk_ids[0, 0]
            np.testing.assert_allclose(scores.eos_log_probs()[1], b_alone[t - late].eos_log_probs()[0], atol=1e-5)


def test_beam_reorders_and_a_growing_cache_equal_a_host_gathered_cache(
        runtime: OrtModel, tiny_repository_entry: Path) -> None:
    """K=3 beams of 2 sentences, beams shuffled every step for more steps than the first allocation holds;
    the export runner gathers its cache on the host by the same origins (no indirection)."""
    cfg = runtime.entry.config
    graphs = OrtGraphs(tiny_repository_entry)
    src = _src(runtime, [5, 9, 14, 22], [31, 8])
    k, steps = 3, FIRST_SLOTS + 6
    rng = np.random.default_rng(1)
    state = runtime.encode(src)
    cross = graphs.encode(src)
    past = graphs.empty_past(2)
    tokens = np.full(2, cfg.bos_id)
    index = np.arange(2)
    for t in range(steps):
        got = _step(runtime, state, t, tokens.tolist(), index)
        want = graphs.step(tokens, np.full(tokens.size, t), src != cfg.pad_id, cross, past, index, topk=TOPK)
        np.testing.assert_allclose(got.topk_log_probs, want.topk_log_probs, atol=1e-5)
        np.testing.assert_array_equal(got.topk_ids[:, 0], want.topk_ids[:, 0])
        past = want.present
        # Next rows: K per sentence, each continuing a random beam of its own sentence.
        per = tokens.size // 2
        index = (np.repeat(np.arange(2), k) * per + rng.integers(0, per, 2 * k)).astype(np.int64)
        tokens = rng.integers(4, cfg.vocab_size, 2 * k)
    assert state.slots > FIRST_SLOTS  # the cache grew on the way


def test_a_finished_sentence_leaves_and_the_others_continue_unchanged(runtime: OrtModel) -> None:
    cfg = runtime.entry.config
    a, b, c = [5, 9, 14], [31, 8, 12, 40], [17, 6]
    rng = np.random.default_rng(2)
    toks = [[cfg.bos_id, *rng.integers(4, cfg.vocab_size, 5).tolist()] for _ in range(3)]
    alone = [_alone(runtime, s, t) for s, t in zip((a, b, c), toks, strict=True)]
    state = runtime.encode(_src(runtime, a, b, c))
    live = [0, 1, 2]
    for t in range(6):
        if t == 3:  # sentence 1 leaves: rows, cross K/V and masks of 0 and 2 stay
            keep = np.array([0, 2])
            request = StepRequest(t, np.array([[toks[0][t]], [toks[2][t]]]), keep, keep, TOPK)
            live = [0, 2]
            scores = runtime.step(state, request)
        else:
            scores = _step(runtime, state, t, [toks[s][t] for s in live])
        for row, s in enumerate(live):
            np.testing.assert_allclose(scores.topk_log_probs[row], alone[s][t].topk_log_probs[0], atol=1e-5)
    assert state.cache is not None and state.cache[0].shape[0] == 2


@pytest.mark.parametrize("events", [
    {2: [0, 2, 3, 4], 4: [1, 3]},  # a request-level batch: survivors in order, moved in runs
    {2: [0, 4, 2, 3], 4: [2, 1, 0]},  # a loop's `fill_holes`: the last fill the holes, then a sentence moves left
    {2: [3, 1, 0]},  # a sentence moving right could overwrite another: gathered into new arrays instead
])
def test_sentences_that_stay_move_within_their_arrays_and_decode_unchanged(runtime: OrtModel,
                                                                            events: dict[int, list[int]]) -> None:
    cfg = runtime.entry.config
    rng = np.random.default_rng(5)
    sources = [rng.integers(4, cfg.vocab_size, n).tolist() for n in (3, 6, 2, 5, 4)]
    toks = [[cfg.bos_id, *rng.integers(4, cfg.vocab_size, 6).tolist()] for _ in sources]
    alone = [_alone(runtime, s, t) for s, t in zip(sources, toks, strict=True)]
    state = runtime.encode(_src(runtime, *sources))
    live = list(range(len(sources)))
    for t in range(7):
        keep = events.get(t)
        if keep is None:
            scores = _step(runtime, state, t, [toks[s][t] for s in live])
        else:
            before = [*state.cross, *state.cache]
            live = [live[q] for q in keep]
            index = np.array(keep)
            scores = runtime.step(state, StepRequest(t, np.array([[toks[s][t]] for s in live]), index, index, TOPK))
            in_place = all(keep[p] >= p for p in range(len(keep)))
            after = [*state.cross, *state.cache]
            assert [np.shares_memory(a, b) for a, b in zip(before, after, strict=True)] == [in_place] * len(after)
            assert state.cache[0].shape[0] == len(keep)
        for row, s in enumerate(live):
            np.testing.assert_allclose(scores.topk_log_probs[row], alone[s][t].topk_log_probs[0], atol=1e-5)
