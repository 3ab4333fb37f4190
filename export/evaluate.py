"""Quality of an exported entry, written into its manifest: sacreBLEU on test_2016_flickr.

Translates with the serving engine (`service.engine.Engine`, ONNX Runtime on CPU, beam search with
the default DecodingOptions) so the number is what serving gives. With a reference entry (the
fp32 export of the same checkpoint) it also records the difference: "vs_fp32".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from export.config import ExportConfig
from export.manifest import read_manifest
from service.options import DecodingOptions

log = logging.getLogger(__name__)

TEST_SET = "test_2016_flickr"


def translate_entry(entry: Path, sources: list[str], options: DecodingOptions) -> list[str]:
    """Best hypothesis text per source, in order, decoded by the engine on CPU."""
    from service.engine import Engine, EngineConfig

    engine = Engine.load(entry, EngineConfig(provider="cpu"))
    return [r.hypotheses[0].text or "" for r in engine.translate_batch(sources, options)]


def evaluate_entry(entry: Path, data_dir: Path, cfg: ExportConfig, sentences: int = 0,
                   options: DecodingOptions | None = None) -> dict[str, Any]:
    """{"test_2016_flickr": {bleu, chrf, signatures, sentences, beam_size, seconds}, ["vs_fp32": {...}]}.

    Reads {data_dir}/test_2016_flickr.{source_lang,target_lang}.gz; `sentences` > 0 keeps the first N.
    """
    from model.evaluate import read_text, score

    options = options or DecodingOptions()
    sources = read_text(Path(data_dir) / f"{TEST_SET}.{cfg.source_lang}.gz")
    refs = read_text(Path(data_dir) / f"{TEST_SET}.{cfg.target_lang}.gz")
    if sentences:
        sources, refs = sources[:sentences], refs[:sentences]
    t0 = time.perf_counter()
    hyps = translate_entry(entry, sources, options)
    seconds = time.perf_counter() - t0
    bleu, bleu_sig, chrf, chrf_sig = score(hyps, refs)
    quality: dict[str, Any] = {
        TEST_SET: {
            "bleu": round(bleu, 2), "signature": bleu_sig, "chrf": round(chrf, 2), "chrf_signature": chrf_sig,
            "sentences": len(sources), "beam_size": options.beam_size, "length_penalty": options.length_penalty,
            "seconds": round(seconds, 1), "engine": "service.engine (onnxruntime, CPU)",
        }
    }
    log.info("%s: BLEU %.2f on %d sentences of %s", entry, bleu, len(sources), TEST_SET)
    if cfg.reference_entry:
        ref_entry = Path(cfg.reference_entry)
        if read_manifest(ref_entry)["precision"] != "fp32":
            raise ValueError(f"reference entry {ref_entry} is not fp32")
        ref_hyps = translate_entry(ref_entry, sources, options)
        ref_bleu = score(ref_hyps, refs)[0]
        same = sum(a == b for a, b in zip(hyps, ref_hyps, strict=True))
        quality["vs_fp32"] = {
            "reference_entry": str(ref_entry), "fp32_bleu": round(ref_bleu, 2),
            "bleu_delta": round(bleu - ref_bleu, 2), "identical_translations": round(same / len(hyps), 4),
        }
    return quality


def main() -> None:
    """`python -m export.evaluate ENTRY DATA_DIR`: measure an existing entry, update its manifest."""
    import argparse
    import json

    from export.manifest import write_manifest

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("entry", type=Path)
    parser.add_argument("data_dir", type=Path, help="Multi30k folder with test_2016_flickr.{src,tgt}.gz")
    parser.add_argument("--reference-entry", default="", help="the fp32 entry to compare against")
    parser.add_argument("--sentences", type=int, default=0, help="first N test sentences (0: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    manifest = read_manifest(args.entry)
    cfg = ExportConfig(precision=manifest["precision"], source_lang=manifest["source_lang"],
                       target_lang=manifest["target_lang"], reference_entry=args.reference_entry)
    manifest["quality"] = evaluate_entry(args.entry, args.data_dir, cfg, args.sentences)
    write_manifest(args.entry, manifest)
    print(json.dumps(manifest["quality"], indent=2))


if __name__ == "__main__":
    main()
