"""The ONNX Runtime engine against the PyTorch reference decoder, on the tiny exported model.

Real sessions, one intra-op thread, no mocks. The sources mix validation lines (which the tiny copy
model learned, so they end with eos) and test lines (unseen, often cut at max length).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.engine import Engine, EngineConfig, ModelEntryError, ProviderUnavailable, batches_by_length
from service.options import DecodingOptions, TranslationResult

torch = pytest.importorskip("torch")

CPU1 = EngineConfig(provider="cpu", intra_op_threads=1, parallel_batches=1)


@pytest.fixture(scope="module")
def engine(tiny_repository_entry: Path) -> Engine:
    return Engine.load(tiny_repository_entry, CPU1)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Iterator[object]:
    from model.checkpoint import load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(tiny_checkpoint)
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(engine: Engine, data_dir: Path) -> list[list[int]]:
    """Token ids (without eos) of 24 learned and 16 unseen sentences of different lengths."""
    from model.data import read_lines

    seen = [s for s in read_lines(data_dir, "val", "de") if len(s) < 60][:24]
    unseen = read_lines(data_dir, "test_2016_flickr", "de")[:16]
    return engine.tokenizer.encode_batch(seen + unseen)


def reference_decode(model: object, sources: list[list[int]], options: DecodingOptions) -> list[TranslationResult]:
    from model.decode import translate_ids

    eos = model.cfg.eos_id  # type: ignore[attr-defined]
    return translate_ids(model, [s + [eos] for s in sources], options)  # type: ignore[arg-type]


def assert_same(got: list[TranslationResult], want: list[TranslationResult]) -> None:
    """Same tokens, finish reasons and hypothesis order; scores equal up to float32 rounding."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [h.tokens for h in g.hypotheses] == [h.tokens for h in w.hypotheses], f"sentence {i}"
        assert g.finish_reason == w.finish_reason, f"sentence {i}"
        for hg, hw in zip(g.hypotheses, w.hypotheses, strict=True):
            assert hg.score == pytest.approx(hw.score, abs=1e-4)
            assert hg.log_prob == pytest.approx(hw.log_prob, abs=1e-4)


# -- parity with the reference ----------------------------------------------------------------------------


def test_greedy_matches_reference(engine: Engine, reference: object, sources: list[list[int]]) -> None:
    options = DecodingOptions(beam_size=1)
    assert_same(engine.translate_ids(sources, options), reference_decode(reference, sources, options))


def test_beam_search_matches_reference(engine: Engine, reference: object, sources: list[list[int]]) -> None:
    options = DecodingOptions(beam_size=4)
    assert_same(engine.translate_ids(sources, options), reference_decode(reference, sources, options))


def test_n_best_with_length_penalty_matches_reference(engine: Engine, reference: object,
                                                      sources: list[list[int]]) -> None:
    options = DecodingOptions(beam_size=5, num_hypotheses=3, length_penalty=0.6)
    got = engine.translate_ids(sources, options)
    assert_same(got, reference_decode(reference, sources, options))
    for r in got:
        assert len(r.hypotheses) == 3
        assert [h.score for h in r.hypotheses] == sorted((h.score for h in r.hypotheses), reverse=True)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_min_and_max_length_rules_match_reference(engine: Engine, reference: object, sources: list[list[int]],
                                                  beam_size: int) -> None:
    options = DecodingOptions(beam_size=beam_size, min_decoding_length=4, max_decoding_length=9,
                              num_hypotheses=beam_size)
    got = engine.translate_ids(sources, options)
    assert_same(got, reference_decode(reference, sources, options))
    for r in got:
        for h in r.hypotheses:
            assert 4 <= len(h.tokens) + 1 <= 9


def test_min_length_above_max_length_forces_eos_like_reference(engine: Engine, reference: object,
                                                               sources: list[list[int]]) -> None:
    # eos is blocked at every step, so the last step takes eos with log-prob 0 (the reference's rule).
    for beam_size in (1, 2):
        options = DecodingOptions(beam_size=beam_size, min_decoding_length=5, max_decoding_length=3)
        got = engine.translate_ids(sources[:6], options)
        assert_same(got, reference_decode(reference, sources[:6], options))
        assert all(r.finish_reason == "length" and len(r.hypotheses[0].tokens) == 2 for r in got)


# -- lengths ----------------------------------------------------------------------------------------------


def test_max_decoding_length_respected(engine: Engine, sources: list[list[int]]) -> None:
    for options in (DecodingOptions(beam_size=1, max_decoding_length=5),
                    DecodingOptions(beam_size=4, max_decoding_length=5, num_hypotheses=4),
                    DecodingOptions(beam_size=4, max_decoding_length_ratio=0.5, max_decoding_length_offset=1)):
        for src, r in zip(sources, engine.translate_ids(sources, options), strict=True):
            cap = options.max_length_for(len(src) + 1)
            for h in r.hypotheses:
                assert len(h.tokens) + 1 <= cap
            if r.finish_reason == "length":
                assert len(r.hypotheses[0].tokens) + 1 == cap


def test_empty_and_one_token_sources(engine: Engine, reference: object) -> None:
    token = engine.tokenizer.encode("Hund")[0]
    for options in (DecodingOptions(beam_size=1), DecodingOptions(beam_size=4, num_hypotheses=2)):
        got = engine.translate_ids([[], [token]], options)
        assert_same(got, reference_decode(reference, [[], [token]], options))
    (empty,) = engine.translate_batch([""], DecodingOptions(beam_size=2))
    assert empty.hypotheses and empty.finish_reason in ("eos", "length")


def test_too_long_or_out_of_vocabulary_source_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="at most"):
        engine.translate_ids([[5] * (engine.max_source_tokens + 1)], DecodingOptions(beam_size=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.translate_ids([[5, engine.tokenizer.vocab_size]], DecodingOptions(beam_size=1))


# -- batching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 4])
def test_sentence_gives_same_result_alone_and_in_any_batch(engine: Engine, sources: list[list[int]],
                                                           beam_size: int) -> None:
    options = DecodingOptions(beam_size=beam_size, num_hypotheses=min(2, beam_size))
    alone = [engine.translate_ids([s], options)[0] for s in sources]
    batched = engine.translate_ids(sources, options)
    reversed_batch = engine.translate_ids(sources[::-1], options)[::-1]
    mixed = [sources[i] for i in (3, 30, 0, 17, 39, 8)]  # short and long together: more padding
    in_mixed = engine.translate_ids(mixed, options)
    for got in (batched, reversed_batch):
        assert [[h.tokens for h in r.hypotheses] for r in got] == [[h.tokens for h in r.hypotheses] for r in alone]
        assert [h.score for r in got for h in r.hypotheses] == pytest.approx(
            [h.score for r in alone for h in r.hypotheses], abs=1e-5)
    for i, r in zip((3, 30, 0, 17, 39, 8), in_mixed, strict=True):
        assert [h.tokens for h in r.hypotheses] == [h.tokens for h in alone[i].hypotheses]


class StepLog:
    def __init__(self) -> None:
        self.encoder_calls = 0
        self.rows: list[int] = []

    def on_encoder(self, seconds: float) -> None:
        assert seconds >= 0
        self.encoder_calls += 1

    def on_decoder_step(self, seconds: float, rows: int) -> None:
        assert seconds >= 0
        self.rows.append(rows)


def test_finished_sentences_leave_the_batch_greedy(engine: Engine, sources: list[list[int]]) -> None:
    log = StepLog()
    results = engine.translate_ids(sources, DecodingOptions(beam_size=1), observer=log)
    assert log.encoder_calls == 1
    # A sentence that emitted eos at step len(tokens) is in the rows of steps 0..len(tokens) only.
    generated = [len(r.hypotheses[0].tokens) for r in results]
    assert log.rows == [sum(1 for n in generated if n >= t) for t in range(max(generated) + 1)]


def test_finished_sentences_leave_the_batch_beam(engine: Engine, sources: list[list[int]]) -> None:
    log = StepLog()
    k = 4
    short, long = [], sources[-1]  # an empty source ends long before an unseen long one
    engine.translate_ids([short, long], DecodingOptions(beam_size=k, max_decoding_length=40), observer=log)
    assert log.rows[0] == 2  # the first step runs one row per sentence
    assert all(r % k == 0 for r in log.rows[1:])
    assert log.rows == sorted(log.rows[:1]) + sorted(log.rows[1:], reverse=True)
    assert 2 * k in log.rows and log.rows[-1] == k  # the short sentence left; the long one ran alone


def test_translate_batch_in_order_with_text(tiny_repository_entry: Path, engine: Engine, data_dir: Path) -> None:
    from model.data import read_lines

    lines = read_lines(data_dir, "test_2016_flickr", "de")[:23] + ["", "Hund"]
    options = DecodingOptions(beam_size=2)
    small = Engine.load(tiny_repository_entry, EngineConfig(provider="cpu", intra_op_threads=1, parallel_batches=2,
                                                            max_batch_sentences=4, max_batch_tokens=60))
    done: list[int] = []
    results = small.translate_batch(lines, options, progress=done.append)
    assert sum(done) == len(lines) and len(done) > 2  # several internal batches, two at a time
    one_batch = engine.translate_batch(lines, options)  # a different batching of the same sentences
    assert [r.hypotheses[0].tokens for r in results] == [r.hypotheses[0].tokens for r in one_batch]
    for r in results:
        assert r.hypotheses[0].text == engine.tokenizer.decode(r.hypotheses[0].tokens)


def test_translate_batch_in_worker_processes_equals_threads(tiny_repository_entry: Path, data_dir: Path) -> None:
    from model.data import read_lines

    lines = read_lines(data_dir, "test_2016_flickr", "de")[:19] + ["", "Hund"]
    options = DecodingOptions(beam_size=3, num_hypotheses=2)
    procs = Engine.load(tiny_repository_entry, EngineConfig(provider="cpu", worker_processes=2, max_batch_sentences=4))
    try:
        done: list[int] = []
        results = procs.translate_batch(lines, options, progress=done.append)
        pids = procs._processes and {p.pid for p in procs._processes._processes.values()}  # noqa: SLF001
    finally:
        procs.close()
    assert sum(done) == len(lines) and len(done) > 2  # several internal batches went to the processes
    assert pids and os.getpid() not in pids and len(pids) == 2
    threads = Engine.load(tiny_repository_entry,
                          EngineConfig(provider="cpu", parallel_batches=2, max_batch_sentences=4))
    want = threads.translate_batch(lines, options)  # the same internal batches: bit-identical results
    assert [[(h.tokens, h.score, h.text) for h in r.hypotheses] for r in results] == \
        [[(h.tokens, h.score, h.text) for h in r.hypotheses] for r in want]
    assert procs._processes is None  # noqa: SLF001  closed


def test_a_dead_worker_process_fails_the_call_and_the_next_call_gets_fresh_ones(tiny_repository_entry: Path,
                                                                                 data_dir: Path) -> None:
    import signal

    from model.data import read_lines

    lines = read_lines(data_dir, "test_2016_flickr", "de")[:12]
    options = DecodingOptions(beam_size=2)
    procs = Engine.load(tiny_repository_entry, EngineConfig(provider="cpu", worker_processes=2, max_batch_sentences=2))
    try:
        want = procs.translate_batch(lines, options)
        pids = {p.pid for p in procs._processes._processes.values()}  # noqa: SLF001
        os.kill(next(iter(pids)), signal.SIGKILL)
        with pytest.raises(RuntimeError, match="worker process died"):
            for _ in range(3):  # the pool may not have noticed the death before the first submit
                procs.translate_batch(lines, options)
        got = procs.translate_batch(lines, options)
        new_pids = {p.pid for p in procs._processes._processes.values()}  # noqa: SLF001
    finally:
        procs.close()
    assert [r.hypotheses[0].tokens for r in got] == [r.hypotheses[0].tokens for r in want]
    assert new_pids and not new_pids & pids


def test_batches_by_length_respects_caps() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2, 30]
    batches = list(batches_by_length(lengths, max_tokens=12, max_sentences=3))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)


def test_concurrent_calls_share_one_engine(engine: Engine, sources: list[list[int]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    options = DecodingOptions(beam_size=3)
    chunks = [sources[i:i + 10] for i in range(0, len(sources), 10)]
    sequential = [engine.translate_ids(c, options) for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda c: engine.translate_ids(c, options), chunks))
    assert [[r.hypotheses[0].tokens for r in rs] for rs in parallel] == \
        [[r.hypotheses[0].tokens for r in rs] for rs in sequential]


# -- loading ----------------------------------------------------------------------------------------------


def test_engine_reports_entry_and_provider(engine: Engine) -> None:
    assert engine.provider == "cpu"
    assert engine.name == engine.manifest["name"] and engine.version == engine.manifest["version"]
    assert engine.workers == 1


@pytest.fixture()
def entry_copy(tiny_repository_entry: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_repository_entry, tmp_path / "tiny" / "1"))


def _rewrite_manifest(entry: Path, change: object) -> None:
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest))


def test_corrupted_file_is_rejected(entry_copy: Path) -> None:
    data = bytearray((entry_copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry_copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelEntryError, match=r"'decoder.onnx' is corrupted.*sha256"):
        Engine.load(entry_copy, CPU1)


def test_missing_manifest_or_file_is_rejected(entry_copy: Path) -> None:
    (entry_copy / "encoder.onnx").unlink()
    with pytest.raises(ModelEntryError, match="'encoder.onnx' listed in the manifest is missing"):
        Engine.load(entry_copy, CPU1)
    (entry_copy / "manifest.json").unlink()
    with pytest.raises(ModelEntryError, match="no manifest.json"):
        Engine.load(entry_copy, CPU1)


def test_manifest_that_disagrees_with_itself_is_rejected(entry_copy: Path) -> None:
    _rewrite_manifest(entry_copy, lambda m: m["model_config"].update(heads=2))  # graphs declare 4 heads
    with pytest.raises(ModelEntryError, match=r"manifest graphs.encoder.*'cross_k.0' axis 1 is 4, expected 2"):
        Engine.load(entry_copy, CPU1)


def test_manifest_of_another_signature_version_is_rejected(entry_copy: Path) -> None:
    _rewrite_manifest(entry_copy, lambda m: m.update(signature_version=99))
    with pytest.raises(ModelEntryError, match="signature_version is 99"):
        Engine.load(entry_copy, CPU1)


def test_entry_of_signature_v1_is_refused_with_a_re_export_hint(entry_copy: Path) -> None:
    _rewrite_manifest(entry_copy, lambda m: m.update(signature_version=1))
    with pytest.raises(ModelEntryError, match=r"signature_version is 1, this engine speaks 2; re-export the model"):
        Engine.load(entry_copy, CPU1)


def test_graph_not_matching_signature_is_rejected(entry_copy: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from export.manifest import sha256_of

    path = entry_copy / "decoder.onnx"
    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == "cache_indirection":
            value.name = "beam_index"
    for node in model.graph.node:
        node.input[:] = ["beam_index" if i == "cache_indirection" else i for i in node.input]
    onnx.save(model, str(path))
    _rewrite_manifest(entry_copy, lambda m: m["files"].update({"decoder.onnx": sha256_of(path)}))
    with pytest.raises(ModelEntryError, match=r"decoder.onnx does not match.*missing input 'cache_indirection'"
                                              r".*unexpected input 'beam_index'"):
        Engine.load(entry_copy, CPU1)


# -- providers --------------------------------------------------------------------------------------------


def _cuda_engine(entry: Path) -> Engine:
    try:
        return Engine.load(entry, EngineConfig(provider="cuda"))
    except ProviderUnavailable as err:
        pytest.skip(f"no usable CUDA GPU: {err}")


def test_auto_provider_falls_back_to_cpu_or_uses_a_working_gpu(tiny_repository_entry: Path) -> None:
    auto = Engine.load(tiny_repository_entry, EngineConfig(intra_op_threads=1))
    assert auto.provider in ("cpu", "cuda")
    if auto.provider == "cpu":
        with pytest.raises(ProviderUnavailable):
            Engine.load(tiny_repository_entry, EngineConfig(provider="cuda"))


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_repository_entry: Path, engine: Engine, sources: list[list[int]]) -> None:
    gpu = _cuda_engine(tiny_repository_entry)
    assert gpu.provider == "cuda"
    for options in (DecodingOptions(beam_size=1), DecodingOptions(beam_size=4, num_hypotheses=2)):
        assert_same(gpu.translate_ids(sources, options), engine.translate_ids(sources, options))


# -- the command ------------------------------------------------------------------------------------------


def test_translate_command_reads_a_file_and_writes_one_line_per_sentence(
        tiny_repository_entry: Path, engine: Engine, tmp_path: Path) -> None:
    from service.cli import main

    lines = ["Ein Hund rennt.", "", "Zwei Männer spielen Fußball."]
    src, out = tmp_path / "in.de", tmp_path / "out.en"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["translate", "--model", str(tiny_repository_entry), "--provider", "cpu", "--intra-op-threads", "1",
                 "--beam-size", "2", "--input", str(src), "--output", str(out), "--progress", "off"])
    assert code == 0
    want = [r.hypotheses[0].text for r in engine.translate_batch(lines, DecodingOptions(beam_size=2))]
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == want


# -- sentences nobody waits for (cancelled calls, passed deadlines) ---------------------------------------


@pytest.mark.parametrize("beam_size", [1, 4])
def test_abandoned_sentences_leave_at_the_next_step_and_the_rest_decode_unchanged(
        engine: Engine, sources: list[list[int]], beam_size: int) -> None:
    options = DecodingOptions(beam_size=beam_size, num_hypotheses=min(2, beam_size), min_decoding_length=8,
                              max_decoding_length=30)
    batch = sources[:6]
    expected = engine.translate_ids(batch, options)
    asked: list[int] = []
    gone = np.zeros(len(batch), dtype=bool)
    gone[[1, 4]] = True

    def abandoned() -> np.ndarray | None:
        asked.append(1)
        # asked once before the encoder, then after every step: 1 and 4 are given up after the second step
        return gone if len(asked) >= 3 else None

    log = StepLog()
    got = engine.translate_ids(batch, options, observer=log, abandoned=abandoned)
    per_sentence = beam_size
    assert log.rows[2] == log.rows[1] - 2 * per_sentence  # both left before the third step
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if gone[i]:
            assert g.finish_reason == "abandoned" and g.hypotheses == []
        else:
            assert [h.tokens for h in g.hypotheses] == [h.tokens for h in e.hypotheses]
            assert [h.score for h in g.hypotheses] == pytest.approx([h.score for h in e.hypotheses], abs=1e-6)
            assert g.finish_reason == e.finish_reason


def test_batch_abandoned_before_it_starts_runs_no_session(engine: Engine, sources: list[list[int]]) -> None:
    log = StepLog()
    got = engine.translate_ids(sources[:3], DecodingOptions(beam_size=4), observer=log,
                               abandoned=lambda: np.ones(3, dtype=bool))
    assert log.encoder_calls == 0 and log.rows == []
    assert [r.finish_reason for r in got] == ["abandoned"] * 3


def test_kv_bytes_bound_the_cache_of_a_sentence(engine: Engine) -> None:
    cfg = engine.entry.config
    caps = engine.length_caps([10, 300], DecodingOptions(max_decoding_length=500, max_decoding_length_ratio=0))
    assert caps == [min(500, engine.max_target_tokens)] * 2
    per_token = 2 * cfg.decoder_layers * cfg.d_model * 4  # fp32 K and V of every decoder layer
    assert engine.kv_bytes(10, 4, 20) == per_token * (4 * 20 + 11)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_sentence_stopped_at_its_deadline_keeps_its_best_hypothesis_so_far(
        engine: Engine, sources: list[list[int]], beam_size: int) -> None:
    options = DecodingOptions(beam_size=beam_size, num_hypotheses=min(2, beam_size), min_decoding_length=10,
                              max_decoding_length=30)
    batch = sources[:4]
    expected = engine.translate_ids(batch, options)
    asked: list[int] = []
    codes = np.zeros(len(batch), dtype=np.int8)
    codes[2] = 2  # stop with the best so far

    def abandoned() -> np.ndarray | None:
        asked.append(1)
        return codes if len(asked) >= 6 else None  # before the encoder, then after steps 0..4: 5 steps ran

    got = engine.translate_ids(batch, options, abandoned=abandoned)
    stopped = got[2]
    assert stopped.finish_reason == "deadline" and stopped.hypotheses
    assert all(len(h.tokens) == 5 and np.isfinite(h.score) for h in stopped.hypotheses)  # eos blocked: all live
    if beam_size == 1:  # greedy: exactly the first tokens of the undisturbed decoding
        assert stopped.hypotheses[0].tokens == expected[2].hypotheses[0].tokens[:5]
    for i in (0, 1, 3):
        assert [h.tokens for h in got[i].hypotheses] == [h.tokens for h in expected[i].hypotheses]
