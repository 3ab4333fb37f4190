"""The Transformer's parts behave as the paper says: masks, positional encodings, cache."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer, attention, sinusoidal_table, subsequent_mask

CFG = ModelConfig(vocab_size=40, d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64,
                  dropout=0.0, attention_dropout=0.0, max_positions=64)


@pytest.fixture(params=[False, True], ids=["post-norm", "pre-norm"])
def model(request: pytest.FixtureRequest) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.to_dict(), "norm_first": request.param})
    return Transformer(cfg).eval()


def test_padding_keys_receive_zero_attention_weight() -> None:
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    _, weights = attention(q, k, v, mask)
    assert torch.all(weights[0, :, :, 3:] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 3))
    assert torch.all(weights[1] > 0)


def test_padding_does_not_change_real_positions(model: Transformer) -> None:
    src = torch.tensor([[5, 6, 7, 2, 0, 0]])
    shorter = src[:, :4]  # the same sentence without padding at all
    with torch.no_grad():
        a = model.encode(src)[0, :4]
        c = model.encode(shorter)[0]
        tgt = torch.tensor([[1, 8, 9]])
        la, lc = model(src, tgt), model(shorter, tgt)
    assert torch.allclose(a, c, atol=1e-5)
    assert torch.allclose(la, lc, atol=1e-5)


def test_padding_in_a_batch_does_not_change_a_sentence(model: Transformer) -> None:
    long, short = [5, 6, 7, 8, 9, 2], [10, 11, 2]
    batch = torch.tensor([long, short + [0, 0, 0]])
    tgt = torch.tensor([[1, 12, 13], [1, 14, 15]])
    with torch.no_grad():
        together = model(batch, tgt)
        alone = model(torch.tensor([short]), tgt[1:])
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_causal_mask_blocks_the_future(model: Transformer) -> None:
    mask = subsequent_mask(4)
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]
    src = torch.tensor([[5, 6, 7, 2]])
    t1 = torch.tensor([[1, 8, 9, 10, 11]])
    t2 = torch.tensor([[1, 8, 9, 30, 31]])  # differs only from position 3 on
    with torch.no_grad():
        a, b = model(src, t1), model(src, t2)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


def test_sinusoidal_encoding_has_the_papers_form() -> None:
    d = 16
    pe = sinusoidal_table(50, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / (10000 ** (2 * i / d))
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_embeddings_are_scaled_by_sqrt_d_model(model: Transformer) -> None:
    ids = torch.tensor([[5]])
    emb = model.src_embed
    expected = emb.token(ids) * math.sqrt(CFG.d_model) + emb.positional(torch.tensor([0]))
    assert torch.allclose(emb(ids, torch.tensor([0])), expected)


def test_incremental_decoding_matches_full_recomputation(model: Transformer) -> None:
    """Greedy with the KV cache gives the same tokens and log-probs (1e-5) as re-running the
    whole prefix every step."""
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])
    src_mask = src != 0
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src))
        past = model.empty_cache(2)
        ids = torch.full((2, 1), CFG.bos_id)
        prefix = ids.clone()
        for step in range(12):
            lp_cached, past = model.decode_step(ids, torch.full((2,), step), src_mask, cross, past, torch.arange(2))
            lp_full = torch.log_softmax(model(src, prefix)[:, -1], dim=-1)
            assert torch.allclose(lp_cached, lp_full, atol=1e-5), step
            nxt = lp_full.argmax(-1, keepdim=True)
            assert torch.equal(lp_cached.argmax(-1, keepdim=True), nxt)
            ids, prefix = nxt, torch.cat([prefix, nxt], dim=1)


def test_decode_step_with_several_rows_per_sentence_matches_full_recomputation(model: Transformer) -> None:
    """Beam-shaped steps: K=3 rows per sentence with different prefixes, shuffled by cache_index
    every step; every row's log-probs equal re-running its whole prefix (1e-5)."""
    k = 3
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])
    rows_src = src.repeat_interleave(k, dim=0)  # (B*K, S): row r belongs to sentence r // K
    src_mask = src != 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src))
        past = model.empty_cache(2 * k)
        prefix = torch.full((2 * k, 1), CFG.bos_id)
        cache_index = torch.arange(2 * k)
        for step in range(6):
            lp, past = model.decode_step(prefix[:, -1:], torch.full((2 * k,), step), src_mask, cross, past,
                                         cache_index)
            full = torch.log_softmax(model(rows_src, prefix)[:, -1], dim=-1)
            assert torch.allclose(lp, full, atol=1e-5), step
            # Next step: each row continues a random row of its own sentence with a random token.
            cache_index = torch.arange(2 * k) // k * k + torch.randint(0, k, (2 * k,), generator=gen)
            nxt = torch.randint(3, CFG.vocab_size, (2 * k, 1), generator=gen)
            prefix = torch.cat([prefix[cache_index], nxt], dim=1)


def test_cache_index_reorders_and_drops_rows(model: Transformer) -> None:
    src = torch.tensor([[5, 6, 7, 2], [9, 10, 2, 0]])
    src_mask = src != 0
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src))
        _, past = model.decode_step(torch.tensor([[1], [1]]), torch.zeros(2, dtype=torch.long), src_mask, cross,
                                    model.empty_cache(2), torch.arange(2))
        # Keep only sentence 1 (row 1): the result equals decoding it alone.
        keep = torch.tensor([1])
        lp, _ = model.decode_step(torch.tensor([[8]]), torch.ones(1, dtype=torch.long), src_mask[keep],
                                  [(k[keep], v[keep]) for k, v in cross], past, keep)
        alone_src = src[1:, :3]
        cross1 = model.cross_kv(model.encode(alone_src))
        _, p1 = model.decode_step(torch.tensor([[1]]), torch.zeros(1, dtype=torch.long), alone_src != 0, cross1,
                                  model.empty_cache(1), torch.arange(1))
        lp1, _ = model.decode_step(torch.tensor([[8]]), torch.ones(1, dtype=torch.long), alone_src != 0, cross1,
                                   p1, torch.arange(1))
    assert torch.allclose(lp, lp1, atol=1e-5)


def test_learned_positions_and_untied_embeddings_work() -> None:
    cfg = ModelConfig(**{**CFG.to_dict(), "positional": "learned", "tie_embeddings": False, "activation": "gelu"})
    m = Transformer(cfg).eval()
    out = m(torch.tensor([[5, 6, 2]]), torch.tensor([[1, 7]]))
    assert out.shape == (1, 2, CFG.vocab_size)
    assert m.generator is not None and m.src_embed.token is not m.tgt_embed.token


def test_config_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, heads=4)
