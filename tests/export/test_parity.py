"""ONNX Runtime against PyTorch on the tiny model: the parity contract of export/parity.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.parity import (
    ParityError,
    check_entry,
    greedy_parity,
    padding_invariance,
    reorder_parity,
    source_ids,
)


@pytest.fixture(scope="module")
def sources(tiny_model) -> list[list[int]]:  # type: ignore[no-untyped-def]
    model, tok = tiny_model
    return source_ids(tok, model.cfg.eos_id)


def test_sentences_of_the_check_have_different_lengths(sources: list[list[int]]) -> None:
    assert len({len(s) for s in sources}) == len(sources) >= 4


def test_ort_log_probs_match_pytorch_at_every_step_of_a_30_step_greedy_decode(
        tiny_graphs, tiny_model, sources) -> None:  # type: ignore[no-untyped-def]
    diffs, agreement, topk_consistent, _ = greedy_parity(tiny_graphs, tiny_model[0], sources, steps=30)
    assert len(diffs) == 30
    assert max(diffs) < 1e-4
    assert agreement == 1.0
    assert topk_consistent


def test_sentence_alone_and_in_a_padded_batch_give_the_same_log_probs(
        tiny_graphs, tiny_model, sources) -> None:  # type: ignore[no-untyped-def]
    _, _, _, fed = greedy_parity(tiny_graphs, tiny_model[0], sources, steps=12)
    assert padding_invariance(tiny_graphs, sources, fed) < 1e-5


def test_cache_index_reorder_and_compaction_equal_pytorch(
        tiny_graphs, tiny_model, sources) -> None:  # type: ignore[no-untyped-def]
    max_diff, gather_exact = reorder_parity(tiny_graphs, tiny_model[0], sources, beams=3)
    assert max_diff < 1e-4
    assert gather_exact


def test_topk_input_sets_the_width_of_the_topk_outputs(tiny_graphs, sources) -> None:  # type: ignore[no-untyped-def]
    src = np.array([sources[0]], dtype=np.int64)
    cross = tiny_graphs.encode(src)
    for k in (1, 7, 25):
        out = tiny_graphs.step(np.array([[1]]), np.array([0]), src != 0, cross, tiny_graphs.empty_past(1),
                               np.array([0]), topk=k)
        assert out.topk_ids.shape == out.topk_log_probs.shape == (1, k)
        assert np.array_equal(out.topk_log_probs[0], np.sort(out.log_probs[0])[::-1][:k])


@torch.no_grad()
def test_beam_rows_share_their_sentence_cross_attention_without_copies(
        tiny_graphs, tiny_model, sources) -> None:  # type: ignore[no-untyped-def]
    """R = B*K rows against (B, ...) cross K/V: each row equals its sentence decoded with one row."""
    b, k = 3, 4
    src = np.zeros((b, max(len(s) for s in sources[:b])), dtype=np.int64)
    for i, s in enumerate(sources[:b]):
        src[i, : len(s)] = s
    cross = tiny_graphs.encode(src)
    ids = np.array([[1]] * (b * k))
    beam = tiny_graphs.step(ids, np.zeros(b * k), src != 0, cross, tiny_graphs.empty_past(b * k), np.arange(b * k))
    single = tiny_graphs.step(ids[:b], np.zeros(b), src != 0, cross, tiny_graphs.empty_past(b), np.arange(b))
    np.testing.assert_allclose(beam.log_probs, np.repeat(single.log_probs, k, axis=0), atol=1e-5)
    assert beam.present[0].shape[:3] == (b * k, tiny_graphs.heads, 1)


def test_check_entry_passes_on_the_exported_entry(tiny_repository_entry: Path, tiny_checkpoint: Path) -> None:
    report = check_entry(tiny_repository_entry, tiny_checkpoint)
    assert report.failures == []
    assert report.greedy_max_abs_diff < 1e-4 and report.padding_max_abs_diff < 1e-5


def test_check_entry_fails_loudly_when_the_graphs_are_not_the_checkpoint(
        tiny_repository_entry: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model.checkpoint import load_checkpoint, save_checkpoint

    model, tok = load_checkpoint(tiny_checkpoint)
    weight = dict(model.named_parameters())["decoder_layers.0.ff.w1.weight"]
    with torch.no_grad():
        weight.mul_(1.05)  # a 5% drift in one weight matrix
    save_checkpoint(tmp_path / "drifted", model, tok)
    with pytest.raises(ParityError, match=r"greedy log-probs differ from PyTorch by .* > 0\.0001"):
        check_entry(tiny_repository_entry, tmp_path / "drifted")


@torch.no_grad()
def test_dynamic_axes_accept_one_sentence_of_one_token_and_any_past_length(
        tiny_graphs, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """batch = src_len = rows = prev_rows = 1, past_len 0, 1, 2: the smallest shapes still match PyTorch."""
    model = tiny_model[0]
    src = np.array([[model.cfg.eos_id]], dtype=np.int64)
    cross_o, cross_t = tiny_graphs.encode(src), model.cross_kv(model.encode(torch.from_numpy(src)))
    past_o, past_t = tiny_graphs.empty_past(1), model.empty_cache(1)
    ids = np.array([[model.cfg.bos_id]])
    for step in range(3):
        pos = np.array([step])
        out = tiny_graphs.step(ids, pos, src != 0, cross_o, past_o, np.array([0]))
        lp, past_t = model.decode_step(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(src != 0),
                                       cross_t, past_t, torch.tensor([0]))
        np.testing.assert_allclose(out.log_probs, lp.numpy(), atol=1e-4)
        assert out.present[0].shape == (1, tiny_graphs.heads, step + 1, tiny_graphs.head_dim)
        past_o, ids = out.present, np.array([[5 + step]])


def test_export_check_exits_nonzero_loudly_and_leaves_no_servable_entry(
        tiny_repository_entry: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tracer that produced the graphs of another model: `rosetta export --check` must catch it."""
    import onnx

    import export.graphs
    from model.checkpoint import load_checkpoint, save_checkpoint
    from service.cli import main

    model, tok = load_checkpoint(tiny_checkpoint)
    weight = dict(model.named_parameters())["decoder_layers.1.ff.w2.weight"]
    with torch.no_grad():
        weight.mul_(1.05)
    save_checkpoint(tmp_path / "drifted", model, tok)
    # The "exporter" returns the undrifted model's graphs: real graphs, wrong weights.
    monkeypatch.setattr(export.graphs, "export_encoder",
                        lambda *a, **k: onnx.load(str(tiny_repository_entry / "encoder.onnx")))
    monkeypatch.setattr(export.graphs, "export_decoder",
                        lambda *a, **k: onnx.load(str(tiny_repository_entry / "decoder.onnx")))
    out = tmp_path / "repo" / "bad" / "1"
    assert main(["export", str(tmp_path / "drifted"), "--out", str(out), "--check"]) == 1
    assert "EXPORT CHECK FAILED" in capsys.readouterr().err
    assert (out / "decoder.onnx").exists() and not (out / "manifest.json").exists()


VARIANTS = {
    "pre-norm, gelu": {"norm_first": True, "activation": "gelu"},
    "learned positions, untied output, logits bias, swish": {
        "positional": "learned", "tie_embeddings": False, "logits_bias": True, "activation": "swish"},
    "Marian-like: split sinusoids, tied output of a decoder embedding, no scale": {
        "positional": "sinusoidal_split", "tie_embeddings": False, "tie_output": True, "embedding_scale": False},
}


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_every_architecture_variant_exports_a_decoder_step_equal_to_pytorch(
        overrides: dict[str, object], tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The step graph is written node by node (export/step_graph.py): each branch of it against PyTorch,
    on random weights of the tiny shape (biases and norms randomized too, so no term can vanish)."""
    from export.api import export_entry
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.transformer import Transformer

    _, tok = tiny_model
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**tiny_model[0].cfg.to_dict(), **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, model, tok)
    report = check_entry(export_entry(checkpoint, tmp_path / "repo" / "variant" / "1"), checkpoint)
    assert report.greedy_max_abs_diff < 1e-4 and report.reorder_indirection_exact
