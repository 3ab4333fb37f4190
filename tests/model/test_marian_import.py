"""`rosetta import marian`: a tiny random Marian model made with transformers' own classes, saved the way
the library saves it, imported into a Rosetta checkpoint whose PyTorch model gives transformers' logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model.checkpoint import load_checkpoint  # noqa: E402
from model.marian import MarianImportError, import_marian  # noqa: E402
from service.tokenizer import SentencePieceTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory: pytest.TempPathFactory, marian_files: Path) -> Path:
    """An OPUS-MT-shaped folder (swish, scaled embeddings, shared embeddings, final_logits_bias) with random
    weights, a random final_logits_bias, and the tokenizer files."""
    vocab = json.loads((marian_files / "vocab.json").read_text(encoding="utf-8"))
    v = max(vocab.values()) + 1
    config = transformers.MarianConfig(
        vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="swish",
        scale_embedding=True, max_position_embeddings=128, pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["<pad>"], share_encoder_decoder_embeddings=True)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)  # non-zero, so importing it is tested
    folder = tmp_path_factory.mktemp("opus-mt-tiny")
    model.save_pretrained(str(folder))
    for name in ("source.spm", "target.spm", "vocab.json"):
        shutil.copyfile(marian_files / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def imported(marian_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "opus-mt-tiny"
    assert main(["import", "marian", str(marian_folder), "--out", str(out)]) == 0
    return out


def theirs(folder: Path) -> Any:
    return transformers.MarianMTModel.from_pretrained(str(folder), local_files_only=True).eval()


def test_imported_logits_equal_transformers_on_a_padded_batch(marian_folder: Path, imported: Path,
                                                              marian_files: Path) -> None:
    model, tok = load_checkpoint(imported)
    assert isinstance(tok, SentencePieceTokenizer)
    hf = theirs(marian_folder)
    sources = ["Ein Hund rennt durch den Schnee.", "Zwei Männer.", "Eine Frau mit einem roten Hut liest ein Buch."]
    ids = [tok.encode(s) + [tok.eos_id] for s in sources]
    width = max(map(len, ids))
    src = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in ids])
    targets = [torch.tensor([tok.bos_id] + tok.encode_target(t)) for t in ("A dog runs.", "Two men.",
                                                                           "A woman reads a book.")]
    tgt_in = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=tok.pad_id)
    with torch.no_grad():
        ours = model(src, tgt_in)
        expected = hf(input_ids=src, attention_mask=(src != tok.pad_id).long(), decoder_input_ids=tgt_in).logits
    assert (src == tok.pad_id).any()  # the batch has padding
    assert torch.allclose(ours, expected, atol=1e-4), float((ours - expected).abs().max())


def test_imported_config_records_what_marian_needs(imported: Path) -> None:
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["activation"] == "swish" and cfg["positional"] == "sinusoidal_split"
    assert cfg["embedding_scale"] is True and cfg["logits_bias"] is True
    assert cfg["bos_id"] == cfg["pad_id"] and cfg["eos_id"] == 0
    assert {p.name for p in imported.iterdir()} == {"model.safetensors", "config.json", "source.spm",
                                                     "target.spm", "vocab.json"}


def test_a_folder_that_is_not_marian_is_refused_and_leaves_nothing(marian_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bart"
    shutil.copytree(marian_folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "bart"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MarianImportError, match="model_type is 'bart'"):
        import_marian(bad, tmp_path / "out" / "ckpt")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("change,message", [
    (lambda f: (f / "target.spm").unlink(), "missing tokenizer file"),
    (lambda f: (f / "config.json").unlink(), "no config.json"),
    (lambda f: _edit(f, tie_word_embeddings=False), "not tied to the embeddings"),
    (lambda f: _edit(f, decoder_ffn_dim=128), "ffn dims differ"),
    (lambda f: _edit(f, vocab_size=20, decoder_vocab_size=20), "does not belong to this model"),
], ids=["no-target-spm", "no-config", "untied-output", "ffn-dims", "vocab-mismatch"])
def test_bad_folders_get_a_clear_error_naming_the_problem(marian_folder: Path, tmp_path: Path, change: Any,
                                                          message: str) -> None:
    bad = tmp_path / "m"
    shutil.copytree(marian_folder, bad)
    change(bad)
    with pytest.raises(MarianImportError, match=message):
        import_marian(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no half-written folder


def test_cli_reports_a_refusal_and_exits_1(tmp_path: Path, capsys: Any) -> None:
    from service.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["import", "marian", str(tmp_path), "--out", str(tmp_path / "ckpt")]) == 1
    assert "model_type is 't5'" in capsys.readouterr().out


def _edit(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- export and serve an imported model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def marian_entry(imported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.api import export_entry

    return export_entry(imported, tmp_path_factory.mktemp("model_repository") / "opus-mt-tiny" / "1", check=True)


def test_exported_entry_records_and_loads_the_sentencepiece_tokenizer(marian_entry: Path) -> None:
    from service.engine import Engine, EngineConfig

    manifest = json.loads((marian_entry / "manifest.json").read_text())
    assert manifest["tokenizer"] == "sentencepiece"
    assert {"source.spm", "target.spm", "vocab.json"} <= set(manifest["files"])
    assert manifest["parity"]["failures"] == []
    engine = Engine.load(marian_entry, EngineConfig(provider="cpu", intra_op_threads=1))
    assert isinstance(engine.tokenizer, SentencePieceTokenizer)


@pytest.mark.parametrize("beams", [1, 4])
def test_search_through_the_engine_equals_transformers_generate(marian_folder: Path, marian_entry: Path,
                                                                data_dir: Path, beams: int) -> None:
    """generate(num_beams=K, length_penalty=1.0, early_stopping=False, max_length=64) with Marian's forced eos
    at the last position and pad banned is Rosetta's search with beam_size=K, length_penalty=1.0 and
    max_decoding_length=63: generate counts the decoder start token in max_length; both score a finished
    hypothesis by log_prob / (tokens generated, eos included)**length_penalty, keep 2K candidates of which
    eos finishes only among the first K, and stop a sentence once K are finished and the best running beam,
    scored at its current length, no longer beats the worst of them."""
    import gzip

    from service.engine import Engine, EngineConfig
    from service.options import DecodingOptions

    with gzip.open(data_dir / "val.de.gz", "rt", encoding="utf-8") as f:
        sentences = [line.strip() for _, line in zip(range(200), f, strict=False)]
    engine = Engine.load(marian_entry, EngineConfig(provider="cpu", intra_op_threads=1))
    tok = engine.tokenizer
    ours = engine.translate_batch(sentences, DecodingOptions(beam_size=beams, length_penalty=1.0,
                                                              max_decoding_length=63, max_decoding_length_ratio=0))
    hf = theirs(marian_folder)
    expected: list[list[int]] = []
    for i in range(0, len(sentences), 50):
        ids = [tok.encode(s) + [tok.eos_id] for s in sentences[i:i + 50]]
        width = max(map(len, ids))
        src = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in ids])
        with torch.no_grad():
            out = hf.generate(input_ids=src, attention_mask=(src != tok.pad_id).long(), num_beams=beams,
                              do_sample=False, length_penalty=1.0, early_stopping=False, max_length=64,
                              bad_words_ids=[[tok.pad_id]], forced_eos_token_id=tok.eos_id)
        for row in out.tolist():
            gen = row[1:]  # the decoder start token
            expected.append(gen[: gen.index(tok.eos_id)] if tok.eos_id in gen else gen)
    same = [r.hypotheses[0].tokens == e for r, e in zip(ours, expected, strict=True)]
    differ = [i for i, ok in enumerate(same) if not ok]
    assert sum(same) >= 0.99 * len(sentences), f"{sum(same)}/{len(sentences)} identical; differ: {differ[:20]}"


def test_a_server_loads_an_imported_model_beside_its_own(marian_entry: Path, tiny_repository_entry: Path,
                                                         tmp_path: Path) -> None:
    import asyncio

    import grpc

    from service.config import ServerConfig
    from service.proto import translate_pb2 as pb
    from service.proto import translate_pb2_grpc as pb_grpc
    from service.server import RosettaServer

    repository = tmp_path / "model_repository"
    shutil.copytree(tiny_repository_entry.parent, repository / "tiny")
    shutil.copytree(marian_entry.parent, repository / "opus-mt-tiny")
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, model_repository=str(repository),
                          models="tiny/1,opus-mt-tiny/1", intra_op_threads=1, workers=1, warmup=False)

    async def main() -> tuple[pb.ListModelsResponse, pb.TranslateResponse, pb.TranslateResponse]:
        server = RosettaServer(config)
        await server.start()
        await server.load_models()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.TranslatorStub(channel)
                listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
                request = pb.TranslateRequest(sentences=["Ein Hund läuft im Schnee."],
                                              options=pb.DecodingOptions(beam_size=2, max_decoding_length=20))
                request.model = "opus-mt-tiny"
                marian = await stub.Translate(request, timeout=60)
                request.model = "tiny"
                own = await stub.Translate(request, timeout=60)
                return listed, marian, own
        finally:
            await server.drain(1.0)

    listed, marian, own = asyncio.run(main())
    assert {m.name for m in listed.models} == {"tiny", "opus-mt-tiny"}
    assert marian.model == "opus-mt-tiny" and own.model == "tiny"
    engine_tokens = marian.results[0].hypotheses[0].token_ids
    assert engine_tokens and own.results[0].hypotheses[0].token_ids
    vocab = json.loads((marian_entry / "vocab.json").read_text(encoding="utf-8"))
    assert all(0 <= t < len(vocab) for t in engine_tokens)


def test_a_decoder_with_embeddings_of_its_own_imports_with_equal_logits(marian_files: Path, tmp_path: Path) -> None:
    """share_encoder_decoder_embeddings=False: the decoder's embeddings, also the output projection's."""
    vocab = json.loads((marian_files / "vocab.json").read_text(encoding="utf-8"))
    config = transformers.MarianConfig(
        vocab_size=max(vocab.values()) + 1, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="gelu",
        scale_embedding=False, max_position_embeddings=64, pad_token_id=vocab["<pad>"], eos_token_id=0,
        decoder_start_token_id=vocab["<pad>"], share_encoder_decoder_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.MarianMTModel(config).eval()
    folder = tmp_path / "separate"
    hf.save_pretrained(str(folder))
    for name in ("source.spm", "target.spm", "vocab.json"):
        shutil.copyfile(marian_files / name, folder / name)
    hf = theirs(folder)
    enc, dec = hf.model.encoder.embed_tokens.weight, hf.model.decoder.embed_tokens.weight
    assert not torch.equal(enc, dec)  # really two tables
    model, tok = load_checkpoint(import_marian(folder, tmp_path / "ckpt"))
    assert model.cfg.tie_output and not model.cfg.tie_embeddings
    src = torch.tensor([tok.encode("Zwei Hunde spielen.") + [tok.eos_id, tok.pad_id, tok.pad_id]])
    tgt_in = torch.tensor([[tok.bos_id] + tok.encode_target("Two dogs play.")])
    with torch.no_grad():
        ours = model(src, tgt_in)
        expected = hf(input_ids=src, attention_mask=(src != tok.pad_id).long(), decoder_input_ids=tgt_in).logits
    assert torch.allclose(ours, expected, atol=1e-4), float((ours - expected).abs().max())
