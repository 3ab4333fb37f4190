"""The inference engine: batched greedy/beam search with a KV cache on ONNX Runtime. Torch-free.

One file per stage of a batch (`service.engine.engine` tells the whole story):

    entry.py     read and check a model-repository entry (manifest, hashes, signature, tokenizer)
    batching.py  length-sorted batches (no onnxruntime: the PyTorch reference batches the same way)
    runtime.py   the ONNX Runtime sessions: encode, one decoder step (IO binding, K/V on the device)
    search.py    greedy and beam search on the host, token-for-token the PyTorch reference
    engine.py    Engine: load an entry, translate (tokenize -> batch -> encode -> steps -> detokenize)
    lane_search.py  the same searches over sentences that join and leave, each at its own step
    loop.py      DecodeLoop: sentences join a running loop between two decoder steps (step-level batching)

`from service.engine import Engine` works as before; onnxruntime is imported only when one of the names
that need it is first used, so `service.engine.batching` and `service.engine.search` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from service.engine.batching import batches_by_length

if TYPE_CHECKING:
    from service.engine.engine import Engine, EngineConfig, EngineObserver, StepModel, run_search
    from service.engine.entry import ModelEntryError
    from service.engine.runtime import ProviderUnavailable
    from service.engine.search import ABANDONED, Abandoned

__all__ = ["ABANDONED", "Abandoned", "Engine", "EngineConfig", "EngineObserver", "ModelEntryError",
           "ProviderUnavailable", "StepModel", "batches_by_length", "run_search"]

_LAZY = {"ABANDONED": "search", "Abandoned": "search", "Engine": "engine", "EngineConfig": "engine",
         "EngineObserver": "engine", "StepModel": "engine", "run_search": "engine",
         "ModelEntryError": "entry", "ProviderUnavailable": "runtime"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"service.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
