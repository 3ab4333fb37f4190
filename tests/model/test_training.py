"""Training: a tiny model learns a synthetic task; the training command runs, checkpoints,
averages and resumes."""

from __future__ import annotations

import csv
import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import average_checkpoints, load_checkpoint
from model.config import ModelConfig, TrainConfig
from model.data import Example, iterate_batches
from model.decode import translate_ids
from model.train import inverse_sqrt_lr, label_smoothed_loss, train
from model.transformer import Transformer
from service.options import DecodingOptions


def test_tiny_model_learns_to_reverse_sequences() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(vocab_size=14, d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128,
                      dropout=0.0, attention_dropout=0.0, max_positions=32)
    words = np.arange(4, cfg.vocab_size)

    def sample(n: int) -> list[Example]:
        out = []
        for _ in range(n):
            seq = rng.choice(words, size=int(rng.integers(3, 7))).tolist()
            out.append(Example(seq + [cfg.eos_id], seq[::-1] + [cfg.eos_id]))
        return out

    model = Transformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    train_ex = sample(3000)
    step = 0
    model.train()
    for _ in range(8):
        for batch in iterate_batches(train_ex, 512, cfg.pad_id, cfg.bos_id, rng):
            step += 1
            for g in opt.param_groups:
                g["lr"] = inverse_sqrt_lr(step, 1e-3, 60)
            loss = label_smoothed_loss(model(batch.src, batch.tgt_in).flatten(0, 1), batch.tgt_out.flatten(),
                                       0.1, cfg.pad_id) / batch.n_tokens
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    test = sample(200)
    results = translate_ids(model, [e.src for e in test], DecodingOptions(beam_size=1))
    correct = sum(r.hypotheses[0].tokens == e.tgt[:-1] for r, e in zip(results, test, strict=True))
    assert correct / len(test) >= 0.9, f"only {correct}/200 reversed exactly"


def test_warmup_schedule_rises_linearly_then_decays_as_inverse_sqrt() -> None:
    peak, warm = 1e-3, 100
    assert inverse_sqrt_lr(50, peak, warm) == 0.5 * peak
    assert inverse_sqrt_lr(100, peak, warm) == peak
    assert abs(inverse_sqrt_lr(400, peak, warm) - peak / 2) < 1e-12


def _tiny_corpus(root: Path, data_dir: Path) -> Path:
    """A 300-pair de-en slice of Multi30k in the same file layout."""
    from model.data import read_lines

    root.mkdir()
    for split, n in (("train", 300), ("val", 40)):
        for lang in ("de", "en"):
            lines = read_lines(data_dir, split, lang)[:n]
            with gzip.open(root / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
    return root


def test_training_command_checkpoints_averages_and_resumes(tmp_path: Path, data_dir: Path) -> None:
    corpus = _tiny_corpus(tmp_path / "data", data_dir)
    model = ModelConfig(d_model=32, heads=2, encoder_layers=1, decoder_layers=1, d_ff=64, dropout=0.1)
    cfg = TrainConfig(data_dir=str(corpus), out_dir=str(tmp_path / "run"), vocab_size=400, epochs=3,
                      max_tokens=1024, warmup_steps=10, peak_lr=3e-3, keep_last=2, average_last=2,
                      accum_steps=2, model=model, max_epochs_this_run=2)
    train(cfg)  # stops after 2 epochs, as if interrupted
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    steps_after_2 = int(rows[1]["step"])

    averaged = train(replace(cfg, max_epochs_this_run=0))  # resumes at epoch 3
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert int(rows[2]["step"]) == steps_after_2 + (steps_after_2 // 2)
    for name in ("best", "last", "averaged"):
        assert (run / name / "model.safetensors").exists()
    assert (run / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (run / "epochs").iterdir()) == ["002", "003"]
    # The averaged weights are the mean of the kept epochs, and the folder loads on its own.
    mean = average_checkpoints([run / "epochs" / "002", run / "epochs" / "003"])
    m, tok = load_checkpoint(averaged)
    name = "encoder_layers.0.ff.w1.weight"
    assert torch.allclose(m.state_dict()[name], mean[name])
    assert tok.vocab_size == m.cfg.vocab_size
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in run.rglob("*"))
