"""Tiny real models for tests: a small tokenizer and a Transformer trained for seconds.

Used by the test suites of every package (export, engine, server) so they run on a model
that actually translates (here: copies) rather than on random weights that never emit eos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.data import encode_pairs, iterate_batches, read_lines
from model.tokenizer import train_tokenizer
from model.train import inverse_sqrt_lr, label_smoothed_loss
from model.transformer import Transformer

TINY = ModelConfig(vocab_size=0, d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64,
                   dropout=0.0, attention_dropout=0.0, max_positions=256)


def make_tiny_checkpoint(out: Path, data_dir: Path, steps: int = 120, seed: int = 0,
                         config: ModelConfig = TINY) -> Path:
    """Train a tiny copy model (German val lines -> themselves) for `steps` steps; save it."""
    torch.manual_seed(seed)
    lines = [ln for ln in read_lines(data_dir, "val", "de") if len(ln) < 60][:400]
    tok = train_tokenizer(lines, vocab_size=300)
    cfg = ModelConfig(**{**config.to_dict(), "vocab_size": tok.vocab_size})
    model = Transformer(cfg)
    examples = encode_pairs(tok, lines, lines)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    rng = np.random.default_rng(seed)
    step = 0
    model.train()
    while step < steps:
        for batch in iterate_batches(examples, 512, cfg.pad_id, cfg.bos_id, rng):
            step += 1
            for g in opt.param_groups:
                g["lr"] = inverse_sqrt_lr(step, 3e-3, 30)
            loss = label_smoothed_loss(model(batch.src, batch.tgt_in).flatten(0, 1), batch.tgt_out.flatten(),
                                       0.0, cfg.pad_id) / batch.n_tokens
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step >= steps:
                break
    model.eval()
    save_checkpoint(out, model, tok)
    return out
