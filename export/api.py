"""Export a checkpoint into one model-repository entry: `export_entry(checkpoint, out)`.

An entry is a folder `model_repository/NAME/VERSION/` holding encoder.onnx, decoder.onnx,
tokenizer.json and manifest.json (see export/manifest.py). Each precision is its own entry,
by convention its own NAME: `de-en/1` (fp32), `de-en-fp16/1`, `de-en-int8/1`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from export.config import ExportConfig
from export.manifest import (
    DECODER_FILE,
    ENCODER_FILE,
    MANIFEST,
    library_versions,
    read_manifest,
    write_manifest,
)
from service import signature as sig

__all__ = ["ExportConfig", "export_entry", "export_repository"]

log = logging.getLogger(__name__)


def export_entry(checkpoint: str | Path, out: str | Path, config: ExportConfig | None = None,
                 **overrides: Any) -> Path:
    """Export `checkpoint` (model.safetensors + config.json + tokenizer.json) into the folder `out`.

    `overrides` are ExportConfig fields (e.g. precision="int8"). Writes encoder.onnx, decoder.onnx,
    tokenizer.json and manifest.json (files replaced if present) and returns `out` as a Path.
    Raises export.parity.ParityError when config.check is set and the graphs disagree with PyTorch
    (the entry's manifest.json is then removed, so no engine loads it), and
    service.signature.SignatureMismatch if a graph does not match the signature.
    """
    import onnx
    import torch

    from export.graphs import OPSET, export_decoder, export_encoder, signatures, store_exact_fp16
    from model.checkpoint import load_checkpoint

    cfg = ExportConfig(**{**(config.__dict__ if config else {}), **overrides})
    checkpoint, out = Path(checkpoint), Path(out)
    if (cfg.name and cfg.name != out.absolute().parent.name) or (cfg.version and cfg.version != out.absolute().name):
        raise ValueError(f"export to {out}: an entry named {cfg.name or '(folder)'}/{cfg.version or '(folder)'} "
                         "must be written to a folder .../NAME/VERSION of that name: the server refuses an entry "
                         "whose manifest disagrees with its folder")
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    model, tokenizer = load_checkpoint(checkpoint)
    float_dtype = "float16" if cfg.precision == "fp16" else "float32"
    if cfg.precision == "fp16":
        model = model.half()
    with torch.no_grad():
        encoder = export_encoder(model, float_dtype, cfg.optimize)
        decoder = export_decoder(model, float_dtype, cfg.optimize)
    timings["trace_seconds"] = round(time.perf_counter() - started, 2)
    log.info("traced %s graphs in %.1fs", cfg.precision, timings["trace_seconds"])

    with tempfile.TemporaryDirectory(prefix="rosetta-export-") as tmp:
        enc_path, dec_path = Path(tmp) / ENCODER_FILE, Path(tmp) / DECODER_FILE
        onnx.save(encoder, str(enc_path))
        onnx.save(decoder, str(dec_path))
        int8_form = None
        if cfg.precision == "int8":
            from export.quantize import quantize_int8
            from service.engine.cpu import recommended_int8_form

            int8_form = recommended_int8_form() if cfg.int8_form == "auto" else cfg.int8_form
            quantize_int8(enc_path, enc_path, form=int8_form)
            quantize_int8(dec_path, dec_path, form=int8_form)
        for path in (enc_path, dec_path):  # after quantizing: it reads the fp32 weights
            proto = onnx.load(str(path))
            if store_exact_fp16(proto.graph):  # lossless: half the file for an fp16 checkpoint
                onnx.save(proto, str(path))
        enc_spec, dec_spec = signatures(model, float_dtype)
        sig.check_onnx(ENCODER_FILE, enc_spec, enc_path)
        sig.check_onnx(DECODER_FILE, dec_spec, dec_path)
        shutil.copyfile(enc_path, out / ENCODER_FILE)
        shutil.copyfile(dec_path, out / DECODER_FILE)
    for name in tokenizer.FILES:  # copied as they are: their sha256 go into the manifest
        shutil.copyfile(checkpoint / name, out / name)

    mc = model.cfg
    manifest: dict[str, Any] = {
        "signature_version": sig.SIGNATURE_VERSION,
        "name": cfg.name or out.parent.name,
        "version": cfg.version or out.name,
        "precision": cfg.precision,
        "source_lang": cfg.source_lang,
        "target_lang": cfg.target_lang,
        "opset": OPSET,
        "model_config": mc.to_dict(),
        "special_ids": {"pad": mc.pad_id, "bos": mc.bos_id, "eos": mc.eos_id, "unk": mc.unk_id},
        "tokenizer": tokenizer.kind,
        "graphs": {
            "encoder": {"file": ENCODER_FILE, **enc_spec.to_dict()},
            "decoder": {"file": DECODER_FILE, **dec_spec.to_dict()},
        },
        "library_versions": library_versions(),
        "optimized": cfg.optimize,
        **({"int8_form": int8_form} if int8_form else {}),
        "quality": {},
        "export_seconds": 0.0,
        "timings": timings,
    }
    timings["write_seconds"] = round(time.perf_counter() - started, 2)  # cumulative: graphs on disk
    write_manifest(out, manifest)  # the parity check and evaluation read the entry back

    if cfg.check:
        from export.parity import ParityError, check_entry

        t0 = time.perf_counter()
        try:
            report = check_entry(out, checkpoint)
        except ParityError:
            # Without a manifest the engine refuses the folder: a failed export is never servable.
            (out / MANIFEST).unlink()
            log.error("parity check failed: removed %s (graphs left for inspection)", out / MANIFEST)
            raise
        manifest["parity"] = report.to_dict()
        timings["check_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.evaluate_dir:
        from export.evaluate import evaluate_entry

        t0 = time.perf_counter()
        manifest["quality"] = evaluate_entry(out, Path(cfg.evaluate_dir), cfg, cfg.evaluate_sentences)
        timings["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    timings["cpu_seconds"] = round(time.process_time() - cpu_started, 2)  # this process; wall depends on load
    write_manifest(out, manifest)
    log.info("exported %s entry %s in %.1fs", cfg.precision, out, manifest["export_seconds"])
    return out


def export_repository(checkpoint: str | Path, repository: str | Path, name: str, version: str = "1",
                      precisions: tuple[str, ...] = ("fp32", "int8"), **overrides: Any) -> list[Path]:
    """Export one checkpoint in several precisions: `repository/NAME/VERSION` for fp32 and
    `repository/NAME-PRECISION/VERSION` for the others, each compared with the fp32 entry when
    evaluated. Returns the entry folders, fp32 first. `overrides` are ExportConfig fields."""
    root = Path(repository)
    fp32 = export_entry(checkpoint, root / name / version, precision="fp32", name=name, version=version, **overrides)
    entries = [fp32]
    for precision in precisions:
        if precision == "fp32":
            continue
        variant = f"{name}-{precision}"
        entries.append(export_entry(checkpoint, root / variant / version, precision=precision, name=variant,
                                    version=version, reference_entry=str(fp32), **overrides))
    return entries


def load_manifest(entry: str | Path) -> dict[str, Any]:
    """The manifest of an exported entry."""
    return read_manifest(Path(entry))
