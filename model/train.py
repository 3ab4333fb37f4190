"""Training: label-smoothed cross-entropy, Adam with inverse-square-root warm-up, per-epoch
validation (loss and BLEU), best/last/epoch checkpoints, averaging, resume, CSV + PNG curves.

Folder layout of a run (`TrainConfig.out_dir`):
    tokenizer.json       learned once from the training corpus
    train_config.json    the run's settings
    epochs/NNN/          the last `keep_last` epoch checkpoints (weights + config + tokenizer)
    last/                newest epoch checkpoint plus optimizer.safetensors and state.json (resume)
    best/                the epoch with the best validation BLEU
    averaged/            mean of the last `average_last` epoch checkpoints
    metrics.csv, curves.png
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.checkpoint import average_checkpoints, load_weights, save_checkpoint
from model.config import TrainConfig
from model.data import Example, encode_pairs, iterate_batches, read_pair
from model.decode import translate_ids
from model.tokenizer import load_or_train
from model.transformer import Transformer, count_parameters
from service.options import DecodingOptions
from service.tokenizer import Tokenizer

log = logging.getLogger("rosetta.train")

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_bleu", "tokens_per_s", "elapsed_s"]


def inverse_sqrt_lr(step: int, peak_lr: float, warmup: int) -> float:
    """Linear warm-up to peak_lr over `warmup` steps, then peak_lr * sqrt(warmup / step)."""
    step = max(step, 1)
    return peak_lr * min(step / warmup, math.sqrt(warmup / step))


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, eps: float, pad_id: int) -> torch.Tensor:
    """Summed label-smoothed cross-entropy over non-pad targets. logits (N, V), target (N,)."""
    return F.cross_entropy(logits.float(), target, ignore_index=pad_id, label_smoothing=eps, reduction="sum")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def validation_loss(model: Transformer, examples: list[Example], max_tokens: int, device: torch.device) -> float:
    """Mean per-token cross-entropy (no smoothing) over the examples."""
    model.eval()
    total, count = 0.0, 0
    cfg = model.cfg
    for batch in iterate_batches(examples, max_tokens * 2, cfg.pad_id, cfg.bos_id):
        batch = batch.to(device)
        logits = model(batch.src, batch.tgt_in)
        total += float(label_smoothed_loss(logits.flatten(0, 1), batch.tgt_out.flatten(), 0.0, cfg.pad_id))
        count += batch.n_tokens
    return total / max(count, 1)


def bleu_of(model: Transformer, tok: Tokenizer, sources: list[str], refs: list[str], options: DecodingOptions) -> float:
    model.eval()
    src_ids = [ids + [tok.eos_id] for ids in tok.encode_batch(sources)]
    hyps = [tok.decode(r.hypotheses[0].tokens) for r in translate_ids(model, src_ids, options)]
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


class _State:
    """Optimizer + counters saved beside the last checkpoint so a run can resume."""

    @staticmethod
    def save(path: Path, opt: torch.optim.Adam, model: Transformer, epoch: int, step: int) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {"torch_rng": torch.get_rng_state()}
        steps: dict[str, float] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if not st:
                    continue
                n = names[id(p)]
                tensors[f"{n}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
                tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
                steps[n] = float(st["step"])
        save_file(tensors, str(path / "optimizer.safetensors"))
        (path / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "param_steps": steps}))

    @staticmethod
    def load(path: Path, opt: torch.optim.Adam, model: Transformer) -> tuple[int, int]:
        tensors = load_file(str(path / "optimizer.safetensors"))
        meta = json.loads((path / "state.json").read_text())
        torch.set_rng_state(tensors["torch_rng"])
        for n, p in model.named_parameters():
            if f"{n}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": torch.tensor(meta["param_steps"][n]),
                    "exp_avg": tensors[f"{n}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device),
                }
        return int(meta["epoch"]), int(meta["step"])


def plot_curves(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ep, [float(r["train_loss"]) for r in rows], label="train (label-smoothed)")
    a1.plot(ep, [float(r["val_loss"]) for r in rows], label="validation")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss per token"), a1.legend(), a1.grid(alpha=0.3)
    a2.plot(ep, [float(r["val_bleu"]) for r in rows], marker="o", color="tab:green")
    a2.set_xlabel("epoch"), a2.set_ylabel("validation BLEU (greedy)"), a2.grid(alpha=0.3)
    fig.suptitle(f"training curves ({csv_path.parent.name})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the folder of the averaged checkpoint."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)

    train_src, train_tgt = read_pair(cfg.data_dir, "train", cfg.src_lang, cfg.tgt_lang)
    val_src, val_tgt = read_pair(cfg.data_dir, "val", cfg.src_lang, cfg.tgt_lang)
    tok = load_or_train(out / "tokenizer.json", train_src + train_tgt, cfg.vocab_size)
    mcfg = replace(cfg.model, vocab_size=tok.vocab_size)
    cfg = replace(cfg, model=mcfg)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    train_ex = encode_pairs(tok, train_src, train_tgt, max_len=mcfg.max_positions)
    val_ex = encode_pairs(tok, val_src, val_tgt)
    model = Transformer(mcfg).to(device)
    log.info("model: %.2fM parameters, %s, %d training pairs", count_parameters(model) / 1e6, device, len(train_ex))

    opt = torch.optim.Adam(model.parameters(), lr=cfg.peak_lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay)
    epoch, step = 0, 0
    last = out / "last"
    if (last / "state.json").exists():
        load_weights(model, load_file(str(last / "model.safetensors")))
        epoch, step = _State.load(last, opt, model)
        log.info("resumed from %s: epoch %d, step %d", last, epoch, step)

    metrics_csv = out / "metrics.csv"
    if not metrics_csv.exists():
        with metrics_csv.open("w", newline="") as f:
            csv.writer(f).writerow(METRIC_FIELDS)
    best_bleu = max((float(r["val_bleu"]) for r in csv.DictReader(metrics_csv.open())), default=-1.0)

    n_val = cfg.val_bleu_sentences or len(val_src)
    greedy = DecodingOptions(beam_size=1)
    use_amp = device.type == "cuda"
    start = time.time()
    epochs_run = 0
    while epoch < cfg.epochs:
        if cfg.max_epochs_this_run and epochs_run >= cfg.max_epochs_this_run:
            break
        epoch += 1
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])  # batch order is a function of (seed, epoch)
        batches = list(iterate_batches(train_ex, cfg.max_tokens, mcfg.pad_id, mcfg.bos_id, rng))
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", mininterval=5.0)
        loss_sum, tok_sum, t0 = 0.0, 0, time.time()
        opt.zero_grad(set_to_none=True)
        lr = inverse_sqrt_lr(step + 1, cfg.peak_lr, cfg.warmup_steps)
        for i, batch in enumerate(bar, 1):
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(batch.src, batch.tgt_in)
            loss = label_smoothed_loss(logits.flatten(0, 1), batch.tgt_out.flatten(), cfg.label_smoothing, mcfg.pad_id)
            (loss / batch.n_tokens / cfg.accum_steps).backward()
            loss_sum += float(loss.detach())
            tok_sum += batch.n_tokens
            if i % cfg.accum_steps == 0 or i == len(batches):
                step += 1
                lr = inverse_sqrt_lr(step, cfg.peak_lr, cfg.warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                if cfg.clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss_sum / tok_sum:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tok_sum / (time.time() - t0):.0f}", refresh=False)
        bar.close()
        train_loss = loss_sum / tok_sum
        tps = tok_sum / (time.time() - t0)
        val_loss = validation_loss(model, val_ex, cfg.max_tokens, device)
        val_bleu = bleu_of(model, tok, val_src[:n_val], val_tgt[:n_val], greedy)
        log.info("epoch %d: train %.4f val loss %.4f val BLEU %.2f (%.0f tok/s)",
                 epoch, train_loss, val_loss, val_bleu, tps)

        ep_dir = out / "epochs" / f"{epoch:03d}"
        save_checkpoint(ep_dir, model, tok, metadata={"epoch": str(epoch), "step": str(step)})
        tmp = out / "last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ep_dir, tmp)
        _State.save(tmp, opt, model, epoch, step)
        shutil.rmtree(last, ignore_errors=True)
        tmp.rename(last)  # the resume point moves only once complete
        if val_bleu > best_bleu:
            best_bleu = val_bleu
            shutil.rmtree(out / "best", ignore_errors=True)
            shutil.copytree(ep_dir, out / "best")
        for old in sorted((out / "epochs").iterdir())[: -cfg.keep_last]:
            shutil.rmtree(old)
        with metrics_csv.open("a", newline="") as f:
            csv.writer(f).writerow([epoch, step, f"{lr:.6g}", f"{train_loss:.4f}", f"{val_loss:.4f}",
                                    f"{val_bleu:.2f}", f"{tps:.0f}", f"{time.time() - start:.0f}"])
        plot_curves(metrics_csv, out / "curves.png")
        epochs_run += 1

    return average_last(out, cfg.average_last, tok)


def average_last(out: Path, n: int, tok: Tokenizer) -> Path:
    """Average the newest n epoch checkpoints of a run into out/averaged."""
    folders = sorted((out / "epochs").iterdir())[-n:]
    from model.config import ModelConfig

    model = Transformer(ModelConfig.load(folders[-1] / "config.json"))
    load_weights(model, average_checkpoints(folders))
    names = ",".join(f.name for f in folders)
    save_checkpoint(out / "averaged", model, tok, metadata={"averaged_epochs": names})
    log.info("averaged epochs %s into %s", names, out / "averaged")
    return out / "averaged"
