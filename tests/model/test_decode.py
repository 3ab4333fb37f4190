"""Reference decoding: greedy, beam search, n-best, length rules."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.config import ModelConfig
from model.decode import beam_search, greedy_search
from model.transformer import Transformer
from service.options import DecodingOptions

# A vocabulary of pad/bos/eos/unk plus three words: small enough to enumerate every output.
TINY_VOCAB = ModelConfig(vocab_size=7, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32,
                         dropout=0.0, attention_dropout=0.0, max_positions=32)


def _model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharpen the random distributions so eos competes with the words
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _sequence_log_prob(model: Transformer, src: torch.Tensor, tokens: list[int]) -> float:
    cfg = model.cfg
    tgt_in = torch.tensor([[cfg.bos_id] + tokens])
    with torch.no_grad():
        lp = torch.log_softmax(model(src, tgt_in), dim=-1)[0]
    return float(sum(lp[i, t] for i, t in enumerate(tokens + [cfg.eos_id])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_equals_greedy(seed: int) -> None:
    cfg = ModelConfig(vocab_size=30, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32,
                      dropout=0.0, attention_dropout=0.0)
    model = _model(cfg, seed)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0], [11, 2, 0, 0, 0]])
    opts = DecodingOptions(beam_size=1, max_decoding_length=15, length_penalty=1.0)
    g = greedy_search(model, src, opts)
    b = beam_search(model, src, opts)
    assert [r.hypotheses[0].tokens for r in g] == [r.hypotheses[0].tokens for r in b]
    for rg, rb in zip(g, b, strict=True):
        assert rg.hypotheses[0].score == pytest.approx(rb.hypotheses[0].score, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_best(seed: int, alpha: float) -> None:
    model = _model(TINY_VOCAB, seed)
    src = torch.tensor([[4, 5, 6, 2]])
    max_len = 4  # eos included: at most 3 words
    words = [3, 4, 5, 6]  # every id but pad and bos, which are never generated
    opts = DecodingOptions(beam_size=64, length_penalty=alpha, max_decoding_length=max_len,
                           max_decoding_length_ratio=0)
    best_score, best_tokens = float("-inf"), None
    for n in range(max_len):
        for tokens in itertools.product(words, repeat=n):
            s = opts.normalize(_sequence_log_prob(model, src, list(tokens)), n + 1)
            if s > best_score:
                best_score, best_tokens = s, list(tokens)
    found = beam_search(model, src, opts)[0].hypotheses[0]
    assert found.tokens == best_tokens
    assert found.score == pytest.approx(best_score, abs=1e-5)
    # Its score is the real sequence log-prob, normalized.
    assert found.log_prob == pytest.approx(_sequence_log_prob(model, src, found.tokens), abs=1e-5)


def test_n_best_is_sorted_by_score_and_distinct() -> None:
    model = _model(TINY_VOCAB, 7)
    src = torch.tensor([[4, 5, 6, 2], [6, 2, 0, 0]])
    res = beam_search(model, src, DecodingOptions(beam_size=5, num_hypotheses=5, max_decoding_length=6))
    for r in res:
        scores = [h.score for h in r.hypotheses]
        assert len(scores) == 5
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in r.hypotheses}) == 5


def test_max_decoding_length_is_respected_absolute_and_relative() -> None:
    cfg = ModelConfig(vocab_size=30, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32,
                      dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # make eos very unlikely so only the cap can end a hypothesis
        model.src_embed.token.weight[cfg.eos_id].fill_(-5.0)
    src = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]])
    for beam in (1, 3):
        absolute = DecodingOptions(beam_size=beam, max_decoding_length=5, max_decoding_length_ratio=0)
        for r in beam_search(model, src, absolute) if beam > 1 else greedy_search(model, src, absolute):
            assert len(r.hypotheses[0].tokens) <= 4
        relative = DecodingOptions(beam_size=beam, max_decoding_length=100, max_decoding_length_ratio=1.0,
                                   max_decoding_length_offset=1)
        res = beam_search(model, src, relative) if beam > 1 else greedy_search(model, src, relative)
        # source lengths (eos included) 4 and 2 -> caps 5 and 3 generated tokens, eos included
        assert len(res[0].hypotheses[0].tokens) <= 4 and len(res[1].hypotheses[0].tokens) <= 2


def test_min_decoding_length_blocks_early_eos() -> None:
    model = _model(TINY_VOCAB, 1)
    src = torch.tensor([[4, 2]])
    for beam in (1, 3):
        opts = DecodingOptions(beam_size=beam, min_decoding_length=4, max_decoding_length=10)
        r = (greedy_search if beam == 1 else beam_search)(model, src, opts)[0]
        assert len(r.hypotheses[0].tokens) >= 4


def test_a_sentence_decodes_the_same_alone_and_in_a_batch() -> None:
    cfg = ModelConfig(vocab_size=30, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32,
                      dropout=0.0, attention_dropout=0.0)
    model = _model(cfg, 4)
    batch = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0], [11, 2, 0, 0, 0]])
    opts = DecodingOptions(beam_size=4, num_hypotheses=2, max_decoding_length=12)
    together = beam_search(model, batch, opts)
    for i, length in enumerate([5, 3, 2]):
        alone = beam_search(model, batch[i : i + 1, :length], opts)[0]
        assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in together[i].hypotheses]


def test_options_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="beam_size"):
        DecodingOptions(beam_size=0)
    with pytest.raises(ValueError, match="num_hypotheses"):
        DecodingOptions(beam_size=2, num_hypotheses=3)
    with pytest.raises(ValueError, match="min_decoding_length"):
        DecodingOptions(min_decoding_length=-1)
