"""Convert a Rosetta checkpoint to a CTranslate2 model through `ctranslate2.specs.TransformerSpec`.

    python benchmarks/ct2_convert.py runs/de-en/averaged /tmp/ct2-de-en [--check 50]

Same weights, same architecture, mapped onto CTranslate2's spec of the paper's Transformer:
- post-norm (`pre_norm=False`): CTranslate2 keeps each sublayer's LayerNorm in its spec and applies it
  after the residual add, as `SublayerConnection` does; no final encoder/decoder norm; eps 1e-5 (torch's);
- ReLU feed-forward; embeddings scaled by sqrt(d_model) (`scale_embeddings`);
- sinusoidal positions: CTranslate2's built-in table concatenates [sin | cos] while ours interleaves
  (sin at even, cos at odd dims), so our own table is written into `position_encodings.encodings`
  (row p = position p, starting at 0 as in `Transformer.encode`/`decode_step`);
- tied weights: source embeddings = target embeddings = output projection (no bias);
- self-attention Q/K/V fused into one linear, cross-attention K/V fused (CTranslate2's layout);
- vocabulary: the tokenizer's tokens by id; sources are passed with their eos, decoding starts at <s>.

`--check N` verifies the conversion on N test sentences before it is used for timing: CTranslate2's
scores of our engine's greedy outputs must equal the PyTorch log-probs (1e-3), and its greedy outputs
must equal ours for all but near-ties. Needs torch (the reference) and ctranslate2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec

from model.config import ModelConfig
from service.tokenizer import Tokenizer


class RosettaConverter(Converter):
    """A checkpoint folder (model.safetensors, config.json, tokenizer.json) -> TransformerSpec."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)

    def _load(self) -> transformer_spec.TransformerSpec:
        from model.checkpoint import load_checkpoint
        from model.transformer import sinusoidal_table

        model, tok = load_checkpoint(self.checkpoint)
        cfg: ModelConfig = model.cfg
        if cfg.norm_first or cfg.activation != "relu" or cfg.positional != "sinusoidal" or not cfg.tie_embeddings:
            raise ValueError(f"this converter covers the paper's post-norm/relu/sinusoidal/tied model, not {cfg}")
        w = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        spec = transformer_spec.TransformerSpec.from_config(
            (cfg.encoder_layers, cfg.decoder_layers), cfg.heads, pre_norm=False,
            activation=common_spec.Activation.RELU)
        spec.config.layer_norm_epsilon = 1e-5
        positions = sinusoidal_table(cfg.max_positions, cfg.d_model).numpy()
        embed = w["src_embed.token.weight"]

        enc, dec = spec.encoder, spec.decoder
        enc.embeddings[0].weight = embed
        enc.scale_embeddings = True
        enc.position_encodings.encodings = positions
        for i, layer in enumerate(enc.layer):
            p = f"encoder_layers.{i}."
            _self_attention(layer.self_attention, w, p + "self_attn.", p + "sub1.norm.")
            _ffn(layer.ffn, w, p + "ff.", p + "sub2.norm.")

        dec.embeddings.weight = embed
        dec.scale_embeddings = True
        dec.position_encodings.encodings = positions
        dec.projection.weight = embed  # tied output projection, no bias
        for i, layer in enumerate(dec.layer):
            p = f"decoder_layers.{i}."
            _self_attention(layer.self_attention, w, p + "self_attn.", p + "sub1.norm.")
            _cross_attention(layer.attention, w, p + "cross_attn.", p + "sub2.norm.")
            _ffn(layer.ffn, w, p + "ff.", p + "sub3.norm.")

        tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
        spec.register_source_vocabulary(tokens)
        spec.register_target_vocabulary(tokens)
        return spec


def _linear(spec: common_spec.LinearSpec, w: dict[str, np.ndarray], names: list[str]) -> None:
    spec.weight = np.concatenate([w[n + "weight"] for n in names])
    spec.bias = np.concatenate([w[n + "bias"] for n in names])


def _norm(spec: common_spec.LayerNormSpec, w: dict[str, np.ndarray], prefix: str) -> None:
    spec.gamma, spec.beta = w[prefix + "weight"], w[prefix + "bias"]


def _self_attention(spec: object, w: dict[str, np.ndarray], p: str, norm: str) -> None:
    _linear(spec.linear[0], w, [p + "q_proj.", p + "k_proj.", p + "v_proj."])  # type: ignore[attr-defined]
    _linear(spec.linear[1], w, [p + "out_proj."])  # type: ignore[attr-defined]
    _norm(spec.layer_norm, w, norm)  # type: ignore[attr-defined]


def _cross_attention(spec: object, w: dict[str, np.ndarray], p: str, norm: str) -> None:
    _linear(spec.linear[0], w, [p + "q_proj."])  # type: ignore[attr-defined]
    _linear(spec.linear[1], w, [p + "k_proj.", p + "v_proj."])  # type: ignore[attr-defined]
    _linear(spec.linear[2], w, [p + "out_proj."])  # type: ignore[attr-defined]
    _norm(spec.layer_norm, w, norm)  # type: ignore[attr-defined]


def _ffn(spec: object, w: dict[str, np.ndarray], p: str, norm: str) -> None:
    _linear(spec.linear_0, w, [p + "w1."])  # type: ignore[attr-defined]
    _linear(spec.linear_1, w, [p + "w2."])  # type: ignore[attr-defined]
    _norm(spec.layer_norm, w, norm)  # type: ignore[attr-defined]


def convert(checkpoint: Path, out: Path) -> Path:
    RosettaConverter(checkpoint).convert(str(out), force=True)
    return out


def convert_once(checkpoint: Path, out: Path) -> Path:
    """`convert`, unless `out` already holds the conversion of these very weights (a stamp of the
    checkpoint's files, written beside model.bin): a conversion of another checkpoint is redone."""
    stamp = json.dumps({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                        for f in sorted(Path(checkpoint).iterdir()) if f.suffix in (".json", ".safetensors")})
    if (out / "model.bin").exists() and (out / "rosetta-source.json").is_file() \
            and (out / "rosetta-source.json").read_text() == stamp:
        return out
    convert(checkpoint, out)
    (out / "rosetta-source.json").write_text(stamp)
    return out


def ct2_tokens(tok: Tokenizer, sentences: list[str]) -> list[list[str]]:
    """Source token strings with the eos the model was trained with."""
    return [[tok.id_to_token(i) for i in ids] + ["</s>"] for ids in tok.encode_batch(sentences)]


def check(checkpoint: Path, ct2_dir: Path, sentences: list[str]) -> dict[str, float]:
    """Compare CTranslate2 with the PyTorch reference on `sentences` (greedy). Raises on a bad conversion."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.decode import translate_ids
    from service.options import DecodingOptions

    model, tok = load_checkpoint(checkpoint)
    # One absolute cap for both: 256 tokens with eos here is 255 decoding steps before eos there.
    ref = translate_ids(model, [s + [tok.eos_id] for s in tok.encode_batch(sentences)],
                        DecodingOptions(beam_size=1, max_decoding_length=256, max_decoding_length_ratio=0.0))
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="float32")
    src = ct2_tokens(tok, sentences)
    hyp_tokens = [[tok.id_to_token(i) for i in r.hypotheses[0].tokens] for r in ref]
    # 1. CTranslate2's log-probs of the reference's outputs (eos included) vs PyTorch's.
    scored = translator.score_batch(src, hyp_tokens)
    worst = 0.0
    for s, r in zip(scored, ref, strict=True):
        worst = max(worst, abs(sum(s.log_probs) - r.hypotheses[0].log_prob))
    if worst > 1e-3:
        raise ValueError(f"conversion is wrong: CTranslate2 log-probs differ from PyTorch by {worst:.2e}")
    # 2. Greedy outputs: the same but for near-ties (CTranslate2 does not block <pad>/<s>, which a
    #    trained model never prefers anyway).
    out = translator.translate_batch(src, beam_size=1, max_decoding_length=255, max_batch_size=32)
    same = sum(1 for o, h in zip(out, hyp_tokens, strict=True) if o.hypotheses[0] == h)
    del torch
    return {"sentences": len(sentences), "max_abs_log_prob_diff": worst, "greedy_identical": same / len(sentences)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", type=int, default=0, help="check on the first N test_2016_flickr sentences")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    args = parser.parse_args(argv)
    convert(args.checkpoint, args.out)
    print(f"converted {args.checkpoint} -> {args.out}", file=sys.stderr)
    if args.check:
        from model.data import read_lines

        lines = read_lines(args.data_dir, "test_2016_flickr", "de")[: args.check]
        print(json.dumps(check(args.checkpoint, args.out, lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
