"""Import a Marian (OPUS-MT) model from a local transformers folder into a Rosetta checkpoint.

    rosetta import marian HF_FOLDER --out CKPT      (train extra: torch, transformers)

HF_FOLDER is what `huggingface-cli download Helsinki-NLP/opus-mt-de-en` leaves on another machine:
config.json, the weights (model.safetensors, or the library's own format, read by its safe loader),
source.spm, target.spm and vocab.json. Nothing is downloaded: transformers reads the folder with
`local_files_only=True`. CKPT gets model.safetensors + config.json (a ModelConfig) + the three
tokenizer files; it is written in a temporary folder beside CKPT and renamed into place, so a failed
import leaves nothing behind.

What Marian's architecture needs is a ModelConfig option (service/model_config.py): the activation
("swish"), the sinusoidal table laid out sin-half / cos-half ("sinusoidal_split"), `embedding_scale`
(scale_embedding), `logits_bias` (final_logits_bias), and the special ids of its vocabulary (eos 0,
unk 1, pad last; decoding starts from pad, so bos_id = pad_id). Everything else is the paper's post-norm
Transformer with tied embeddings, which Rosetta already is; a decoder with embeddings of its own
(share_encoder_decoder_embeddings false) maps to tie_embeddings off with `tie_output`. Anything Rosetta does
not support (e.g. separate source and target vocabularies, different encoder and decoder widths) is refused
by name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CONFIG, WEIGHTS, state_tensors
from model.config import ModelConfig
from model.transformer import Transformer, sinusoidal_table

TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")
ACTIVATIONS = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}


class MarianImportError(ValueError):
    """The folder cannot be imported; the message names the folder and what is wrong."""


def marian_model_config(hf: dict[str, Any], vocab: dict[str, int], where: str) -> ModelConfig:
    """The ModelConfig of a transformers MarianConfig (as read from config.json); MarianImportError for an
    architecture Rosetta does not support."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise MarianImportError(f"{where}: unsupported Marian architecture: {what}")

    need(hf.get("encoder_attention_heads") == hf.get("decoder_attention_heads"),
         "encoder and decoder attention heads differ")
    need(hf.get("encoder_ffn_dim") == hf.get("decoder_ffn_dim"), "encoder and decoder ffn dims differ")
    need(hf.get("activation_function") in ACTIVATIONS, f"activation {hf.get('activation_function')!r}")
    need(hf.get("tie_word_embeddings", True), "an output projection not tied to the embeddings")
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    need(not hf.get("normalize_before", False), "pre-norm layers")
    need(not hf.get("add_bias_logits", False), "add_bias_logits")
    need(hf.get("decoder_vocab_size") in (None, hf.get("vocab_size")), "a decoder vocabulary of its own")
    if "<unk>" not in vocab:
        raise MarianImportError(f"{where}: vocab.json has no <unk>")
    if max(vocab.values()) >= int(hf["vocab_size"]):
        raise MarianImportError(f"{where}: vocab.json has ids up to {max(vocab.values())}, config.json vocab_size is "
                           f"{hf['vocab_size']}: the tokenizer does not belong to this model")
    pad, eos = int(hf["pad_token_id"]), int(hf["eos_token_id"])
    for token, want in (("<pad>", pad), ("</s>", eos)):
        if vocab.get(token) != want:
            raise MarianImportError(f"{where}: vocab.json has {token} at {vocab.get(token)}, config.json at {want}")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), heads=int(hf["encoder_attention_heads"]),
        encoder_layers=int(hf["encoder_layers"]), decoder_layers=int(hf["decoder_layers"]),
        d_ff=int(hf["encoder_ffn_dim"]), dropout=float(hf.get("dropout", 0.1)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        activation=ACTIVATIONS[hf["activation_function"]], norm_first=False, positional="sinusoidal_split",
        tie_embeddings=shared, tie_output=not shared, embedding_scale=bool(hf.get("scale_embedding", False)),
        logits_bias=True,
        max_positions=int(hf.get("max_position_embeddings", 512)), pad_id=pad,
        bos_id=int(hf.get("decoder_start_token_id", pad)), eos_id=eos, unk_id=int(vocab["<unk>"]))


def rosetta_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Marian's parameter names -> Rosetta's (model/transformer.py)."""
    if cfg.tie_embeddings:
        src = tgt = hf_state["model.shared.weight"]  # tied: one tensor
    else:  # the decoder has its own, which the output projection reuses (tie_output)
        src, tgt = hf_state["model.encoder.embed_tokens.weight"], hf_state["model.decoder.embed_tokens.weight"]
    out = {"src_embed.token.weight": src, "tgt_embed.token.weight": tgt,
           "logits_bias": hf_state["final_logits_bias"].reshape(-1)}
    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    for side, n, subs in (("encoder", cfg.encoder_layers, ("self_attn_layer_norm", "final_layer_norm")),
                          ("decoder", cfg.decoder_layers,
                           ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))):
        for i in range(n):
            theirs, ours = f"model.{side}.layers.{i}", f"{side}_layers.{i}"
            blocks = [("self_attn", "self_attn")] + ([("encoder_attn", "cross_attn")] if side == "decoder" else [])
            for their_block, our_block in blocks:
                for proj in attn:
                    for p in ("weight", "bias"):
                        out[f"{ours}.{our_block}.{proj}.{p}"] = hf_state[f"{theirs}.{their_block}.{proj}.{p}"]
            for p in ("weight", "bias"):
                out[f"{ours}.ff.w1.{p}"] = hf_state[f"{theirs}.fc1.{p}"]
                out[f"{ours}.ff.w2.{p}"] = hf_state[f"{theirs}.fc2.{p}"]
                for j, norm in enumerate(subs, start=1):
                    out[f"{ours}.sub{j}.norm.{p}"] = hf_state[f"{theirs}.{norm}.{p}"]
    return out


def load_marian(folder: Path) -> tuple[Transformer, dict[str, int]]:
    """The Marian model of `folder` as a Rosetta Transformer (fp32, eval) and its vocabulary."""
    where = f"marian folder {folder}"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MarianImportError(f"{where}: no config.json (not a transformers model folder)")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MarianImportError(f"{where}: config.json is not valid JSON ({err})") from err
    if hf.get("model_type") != "marian":
        raise MarianImportError(f"{where}: config.json model_type is {hf.get('model_type')!r}, not 'marian'")
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise MarianImportError(f"{where}: missing tokenizer file(s) {', '.join(missing)}")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    cfg = marian_model_config(hf, vocab, where)

    from transformers import MarianMTModel  # the library's own (safe) loader for its weight formats

    try:
        theirs = MarianMTModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise MarianImportError(f"{where}: the weights do not load ({str(err)[:300]})") from err
    hf_state = {k: v.detach() for k, v in theirs.state_dict().items()}
    table = sinusoidal_table(cfg.max_positions, cfg.d_model, split=True)
    for side in ("encoder", "decoder"):
        stored = hf_state[f"model.{side}.embed_positions.weight"]
        if not torch.allclose(stored, table, atol=1e-5):
            raise MarianImportError(f"{where}: the {side}'s position table is not Marian's sinusoidal one")
    model = Transformer(cfg)
    model.load_state_dict(rosetta_state(hf_state, cfg), strict=True)
    return model.eval(), vocab


def import_marian(folder: str | Path, out: str | Path) -> Path:
    """Write the Rosetta checkpoint of the Marian model in `folder` to `out` (which must not exist)."""
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise MarianImportError(f"{out} exists: choose a new checkpoint folder")
    model, _ = load_marian(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        from safetensors.torch import save_file

        save_file(state_tensors(model), str(tmp / WEIGHTS), metadata={"imported_from": "marian"})
        model.cfg.save(tmp / CONFIG)
        for name in TOKENIZER_FILES:
            shutil.copyfile(folder / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
