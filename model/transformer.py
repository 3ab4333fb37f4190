"""The encoder-decoder Transformer of "Attention Is All You Need", written from its parts.

One small class per concept of the paper. Shapes follow the legend in `model.config`:
B batch, R hypothesis rows (B*K in beam search), S source length, T target length,
D d_model, H heads, Dh head dim, V vocab.

Two ways to run the decoder:
- `forward(src, tgt_in)`: the whole target at once under a causal mask (training, scoring);
- `encode` + `cross_kv` once per source, then `decode_step` once per generated token,
  with a self-attention cache that grows by one position a step. This is the API the ONNX
  exporter wraps; `decode_step` takes `cache_index` so beam reordering and the removal of
  finished sentences are one gather on the cache. Its layers run `DecoderLayer.step`, the
  same arithmetic as `DecoderLayer.forward` for one position, kept 2-D with q/k/v in one GEMM
  (a smaller, faster exported graph; the tests hold it to the full forward at 1e-5).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig

KV = tuple[Tensor, Tensor]  # (keys, values), each (N, H, len, Dh)


def sinusoidal_table(max_positions: int, d_model: int, split: bool = False) -> Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(pos / 10000^(2i/D)). (P, D)

    `split`: the same values laid out sin-first-half, cos-second-half (Marian's table)."""
    pos = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    div = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    half = (d_model + 1) // 2
    if split:
        table[:, :half] = torch.sin(pos / div)
        table[:, half:] = torch.cos(pos / div)[:, : d_model - half]
    else:
        table[:, 0::2] = torch.sin(pos / div)
        table[:, 1::2] = torch.cos(pos / div)[:, : d_model // 2]
    return table.float()


def subsequent_mask(size: int, device: torch.device | None = None) -> Tensor:
    """(T, T) bool, True where query position i may attend key position j (j <= i)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention.

    q (N, H, Tq, Dh), k and v (N, H, Tk, Dh); mask bool broadcastable to (N, H, Tq, Tk), True
    where attention is allowed. Returns (output (N, H, Tq, Dh), weights (N, H, Tq, Tk)); masked
    keys get exactly zero weight. Every query must be allowed at least one key.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (N, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v), weights


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, H, T, Dh)"""
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:
        """(N, H, T, Dh) -> (N, T, D)"""
        n, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(n, t, h * dh)

    def project_kv(self, x: Tensor) -> KV:
        """Keys and values of x (N, T, D), each (N, H, T, Dh)."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def project_qkv_one(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of one position per row, x (R, D) -> each (R, H, 1, Dh), in ONE matmul.

        The three projections concatenated: one (D, 3D) GEMM instead of three (D, D) ones, and in
        the exported decoder one MatMul node where there were three (see Transformer.decode_step).
        """
        r = x.size(0)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3D, D)
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # (3D,)
        qkv = F.linear(x, w, b).view(r, 3, self.heads, 1, self.head_dim)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from x (N, Tq, D) against k, v (N, H, Tk, Dh) -> (N, Tq, D)."""
        q = self.split(self.q_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return self.out_proj(self.merge(torch.matmul(weights, v)))


class FeedForward(nn.Module):
    """Position-wise FFN(x) = W2 act(W1 x + b1) + b2."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}[activation]()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class SublayerConnection(nn.Module):
    """Residual + LayerNorm around a sublayer: post-norm LN(x + f(x)) or pre-norm x + f(LN(x))."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def inner(self, x: Tensor) -> Tensor:
        """What the sublayer reads."""
        return self.norm(x) if self.norm_first else x

    def outer(self, x: Tensor, y: Tensor) -> Tensor:
        """Combine the residual x with the sublayer's output y."""
        out = x + self.dropout(y)
        return out if self.norm_first else self.norm(out)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.sub1 = SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.sub2 = SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x (B, S, D); src_mask (B, 1, 1, S) bool."""
        h = self.sub1.inner(x)
        k, v = self.self_attn.project_kv(h)
        x = self.sub1.outer(x, self.self_attn.attend(h, k, v, src_mask))
        return self.sub2.outer(x, self.ff(self.sub2.inner(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.sub1 = SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.sub2 = SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.sub3 = SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, x: Tensor, cross: KV, src_mask: Tensor, self_mask: Tensor) -> Tensor:
        """One decoder layer over whole target sequences (training, scoring): x (B, T, D) -> (B, T, D).

        self_mask bool broadcastable to (B, H, T, T) (causal); cross K/V (B, H, S, Dh); src_mask
        (B, 1, 1, S). Incremental decoding, one new position per row with a cache, is `step`.
        """
        h = self.sub1.inner(x)
        k, v = self.self_attn.project_kv(h)
        x = self.sub1.outer(x, self.self_attn.attend(h, k, v, self_mask))
        x = self.sub2.outer(x, self.cross_attn.attend(self.sub2.inner(x), cross[0], cross[1], src_mask))
        return self.sub3.outer(x, self.ff(self.sub3.inner(x)))

    def step(self, x: Tensor, cross: KV, src_mask: Tensor, past: KV) -> tuple[Tensor, KV]:
        """`forward` for one new position per row, kept 2-D: x (R, D) -> (R, D).

        The arithmetic of `forward` at the last position of the prefix (the tests hold the two to
        1e-5), written for the one-step decoder graph: activations stay (R, D) so every projection
        is a plain 2-D GEMM with its bias fused, and q/k/v are one GEMM. past K/V (R, H, Tp, Dh)
        already gathered by cache_index; src_mask (B, 1, 1, S). Cross K/V are (B, H, S, Dh) with
        R = B*K: the K rows of a sentence are consecutive and are attended as K query positions of
        that sentence, so cross K/V are never copied per beam. Returns (x, present self K/V
        (R, H, Tp+1, Dh)).
        """
        r, d = x.shape
        attn = self.self_attn
        h = self.sub1.inner(x)
        q, k, v = attn.project_qkv_one(h)  # (R, H, 1, Dh) each
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        ctx, _ = attention(q, k, v, None)  # (R, H, 1, Dh)
        x = self.sub1.outer(x, attn.out_proj(ctx.reshape(r, d)))

        b = cross[0].size(0)
        cross_attn = self.cross_attn
        q = cross_attn.q_proj(self.sub2.inner(x)).view(b, -1, cross_attn.heads, cross_attn.head_dim).transpose(1, 2)
        ctx, _ = attention(q, cross[0], cross[1], src_mask)  # (B, H, K, Dh)
        x = self.sub2.outer(x, cross_attn.out_proj(ctx.transpose(1, 2).reshape(r, d)))
        return self.sub3.outer(x, self.ff(self.sub3.inner(x))), (k, v)


class Embeddings(nn.Module):
    """Token embedding scaled by sqrt(D) plus positional encoding, then dropout."""

    def __init__(self, cfg: ModelConfig, token: nn.Embedding) -> None:
        super().__init__()
        self.token = token
        self.scale = math.sqrt(cfg.d_model) if cfg.embedding_scale else 1.0
        self.learned = cfg.positional == "learned"
        if self.learned:
            self.pos = nn.Embedding(cfg.max_positions, cfg.d_model)
            nn.init.normal_(self.pos.weight, std=cfg.d_model**-0.5)
        else:
            table = sinusoidal_table(cfg.max_positions, cfg.d_model, split=cfg.positional == "sinusoidal_split")
            self.register_buffer("pe", table, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def positional(self, positions: Tensor) -> Tensor:
        """positions int64 (...,) -> (..., D)"""
        table: Tensor = self.pos.weight if self.learned else self.pe  # type: ignore[assignment]
        return table[positions]

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids (N, T), positions (N, T) or (T,) -> (N, T, D)"""
        return self.dropout(self.token(ids) * self.scale + self.positional(positions))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, v = cfg.d_model, cfg.vocab_size
        src_tok = nn.Embedding(v, d, padding_idx=cfg.pad_id)
        tgt_tok = src_tok if cfg.tie_embeddings else nn.Embedding(v, d, padding_idx=cfg.pad_id)
        self.src_embed = Embeddings(cfg, src_tok)
        self.tgt_embed = Embeddings(cfg, tgt_tok)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # Pre-norm stacks end with a LayerNorm; post-norm layers already end normalized.
        self.encoder_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.generator = None if cfg.tie_embeddings or cfg.tie_output else nn.Linear(d, v, bias=False)
        self.logits_bias = nn.Parameter(torch.zeros(v)) if cfg.logits_bias else None
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for emb in {self.src_embed.token, self.tgt_embed.token}:
            nn.init.normal_(emb.weight, std=self.cfg.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.cfg.pad_id].zero_()

    # -- pieces -----------------------------------------------------------------------------

    def src_padding_mask(self, src: Tensor) -> Tensor:
        """src (B, S) -> (B, 1, 1, S) bool, True at real tokens."""
        return (src != self.cfg.pad_id)[:, None, None, :]

    def encode(self, src: Tensor) -> Tensor:
        """src (B, S) -> memory (B, S, D)."""
        mask = self.src_padding_mask(src)
        x = self.src_embed(src, torch.arange(src.size(1), device=src.device))
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """Per decoder layer, the cross-attention K/V of memory (B, S, D): (B, H, S, Dh) each."""
        return [cast(DecoderLayer, layer).cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def logits(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., V)"""
        weight = self.tgt_embed.token.weight if self.generator is None else self.generator.weight
        return F.linear(x, weight, self.logits_bias)

    # -- whole sequences (training) ---------------------------------------------------------

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) starting with bos -> logits (B, T, V)."""
        src_mask = self.src_padding_mask(src)
        cross = self.cross_kv(self.encode(src))
        t = tgt_in.size(1)
        x = self.tgt_embed(tgt_in, torch.arange(t, device=tgt_in.device))
        causal = subsequent_mask(t, tgt_in.device)[None, None]  # (1, 1, T, T)
        for layer, kv in zip(self.decoder_layers, cross, strict=True):
            x = layer(x, kv, src_mask, causal)
        return self.logits(self.decoder_norm(x))

    # -- one step (incremental decoding) ----------------------------------------------------

    def decode_step(
        self,
        input_ids: Tensor,
        position: Tensor,
        src_mask: Tensor,
        cross: list[KV],
        past: list[KV],
        cache_index: Tensor,
    ) -> tuple[Tensor, list[KV]]:
        """Log-probs of the next token for every live hypothesis row.

        input_ids (R, 1) the last token of each row; position (R,) its position (0 for bos);
        src_mask (B, S) bool, True at real source tokens; cross: per layer K/V (B, H, S, Dh) of
        the live sentences, whose rows are R = B*K consecutive; past: per layer self K/V
        (R_prev, H, Tp, Dh) of the previous step (Tp may be 0); cache_index (R,) int64: row r
        continues row cache_index[r] of the previous step.
        Returns (log_probs (R, V), present: per layer self K/V (R, H, Tp+1, Dh)).
        """
        x = self.tgt_embed(input_ids, position[:, None])[:, 0]  # (R, D)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        present: list[KV] = []
        for layer, kv, (pk, pv) in zip(self.decoder_layers, cross, past, strict=True):
            pk, pv = pk.index_select(0, cache_index), pv.index_select(0, cache_index)
            x, new = cast(DecoderLayer, layer).step(x, kv, mask, (pk, pv))
            present.append(new)
        logits = self.logits(self.decoder_norm(x))  # (R, V)
        return torch.log_softmax(logits.float(), dim=-1), present

    def empty_cache(self, rows: int, device: torch.device | None = None) -> list[KV]:
        """Per layer a zero-length self-attention cache (rows, H, 0, Dh)."""
        shape = (rows, self.cfg.heads, 0, self.cfg.head_dim)
        return [
            (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
            for _ in self.decoder_layers
        ]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
