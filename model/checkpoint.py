"""Checkpoints: safetensors weights + config.json + tokenizer.json in one folder. No pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer
from service.tokenizer import AnyTokenizer, load_tokenizer

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def state_tensors(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each stored once (tied weights are not repeated)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if id(tensor) in seen or tensor.data_ptr() in seen:
            continue
        seen[tensor.data_ptr()] = name
        t = tensor.detach().cpu().contiguous()
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def save_checkpoint(
    path: Path,
    model: Transformer,
    tokenizer: AnyTokenizer,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the folder `path`; `dtype=torch.float16` halves its size for shipping."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(state_tensors(model, dtype), str(path / WEIGHTS), metadata=metadata or {})
    model.cfg.save(path / CONFIG)
    tokenizer.save_files(path)


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Load by name; weights tied in the model may be stored once under either name."""
    expected = model.state_dict()
    missing = []
    for name, target in expected.items():
        if name in tensors:
            src = tensors[name]
        else:
            # A tied parameter shares storage with one that was saved under another name.
            twin = next(
                (n for n, t in expected.items() if n in tensors and t.data_ptr() == target.data_ptr()),
                None,
            )
            if twin is None:
                missing.append(name)
                continue
            src = tensors[twin]
        if src.shape != target.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(src.to(target.dtype))
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {missing}")
    unknown = set(tensors) - set(expected)
    if unknown:
        raise ValueError(f"checkpoint has unknown tensors: {sorted(unknown)}")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[Transformer, AnyTokenizer]:
    """Rebuild the model from the folder alone (config inside), fp32, in eval mode, with its tokenizer
    (tokenizer.json, or an imported Marian model's SentencePiece files)."""
    path = Path(path)
    cfg = ModelConfig.load(path / CONFIG)
    model = Transformer(cfg)
    load_weights(model, load_file(str(path / WEIGHTS)))
    return model.to(device).eval(), load_tokenizer(path)


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the weights in several checkpoint folders (fp32)."""
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        for name, t in load_file(str(Path(p) / WEIGHTS)).items():
            t = t.float()
            total[name] = total[name] + t if name in total else t.clone()
    return {name: t / len(paths) for name, t in total.items()}


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f:
        return dict(f.metadata() or {})


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
