"""The entry's two ONNX Runtime sessions on one device, and the two calls a decoding loop makes.

    encode(src_ids)          once per batch: cross-attention K/V of every decoder layer
    step(state, request)     once per generated token: top-k per row, present K/V

Everything runs through IO binding, on CPU as on CUDA, so past/present K/V never become numpy
arrays: they stay where ONNX Runtime allocated them (device memory under CUDA) and `cache_index`
reorders beams and drops finished rows inside the graph. Per step only small tensors cross to the
host: token ids, positions, cache_index and the padding mask go in; the top-k log-probs and ids
come out. The full log-probs stay on the device and are copied only at a sentence's max-length
step, where the search needs the eos column. When sentences finish, their cross K/V are dropped
with one gather along the batch axis, once per finishing event (not per step): in numpy on CPU,
where the cross K/V are kept as arrays bound without a copy, and through the host on CUDA, since
the signature has no sentence index for the graph to gather with.

Providers: "cuda" is used only after a session was created with it AND a real encode + decoder
step ran on it; the provider list of an onnxruntime-gpu wheel names CUDA on machines without a
usable GPU. Shapes: B sentences, S source length, R rows, H heads, Dh head dim, V vocab, k top-k.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from service import signature as sig
from service.engine.entry import ModelEntry, check_sessions
from service.engine.search import StepRequest, StepScores

log = logging.getLogger(__name__)

CPU, CUDA = "cpu", "cuda"
PROVIDERS = {CPU: ["CPUExecutionProvider"], CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot run this model on this machine."""


@dataclass(frozen=True)
class SessionSettings:
    """Threading and memory of one session (see benchmarks/README.md for how the CPU values were chosen)."""

    intra_op_threads: int  # threads inside one operator; 1: runs on the calling thread only
    inter_op_threads: int  # threads across independent operators (sequential mode ignores it)
    allow_spinning: bool = False  # busy-wait intra-op threads between operators
    # onnxruntime's CPU arena keeps the peak of every batch for the life of the process; without it
    # tensors go back to malloc when freed (see EngineConfig.cpu_memory_arena)
    cpu_memory_arena: bool = True


def session_options(settings: SessionSettings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: the CUDA probe's expected failure stays quiet
    so.enable_cpu_mem_arena = settings.cpu_memory_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    return so


@dataclass
class DecoderState:
    """The device-side state of one decoding loop."""

    cross: list[Any]  # per layer cross_k, cross_v (B, H, S, Dh) of the live sentences: numpy on CPU, OrtValue else
    src_mask: np.ndarray  # (B, S) bool, True at real source tokens; host side, small
    past: list[ort.OrtValue] | None = None  # per layer past_k, past_v: (R, H, T, Dh); None before step 0
    binding: Any = None  # the decoder's IO binding for this loop: cross K/V, src_mask and top-k stay bound
    topk: int = 0  # the top-k width bound now


class OrtModel:
    """encoder.onnx + decoder.onnx of one entry on one device. Thread-safe: every call binds its own
    IO binding, and concurrent calls run in parallel (with 1 intra-op thread, on their callers' threads)."""

    def __init__(self, entry: ModelEntry, encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                 device: str) -> None:
        self.entry, self.encoder, self.decoder, self.device = entry, encoder, decoder, device
        cfg = entry.config
        self.layers, self.heads, self.head_dim = cfg.decoder_layers, cfg.heads, cfg.head_dim
        self.eos_id = cfg.eos_id
        self.kv_dtype = np.float16 if entry.float_dtype == "float16" else np.float32
        self._cross_names = [n for i in range(self.layers) for n in (sig.cross_k(i), sig.cross_v(i))]
        self._past_names = [n for i in range(self.layers) for n in (sig.past_k(i), sig.past_v(i))]
        self._present_names = [n for i in range(self.layers) for n in (sig.present_k(i), sig.present_v(i))]

    @classmethod
    def open(cls, entry: ModelEntry, device: str, settings: SessionSettings) -> OrtModel:
        """Create both sessions on `device` ("cpu" or "cuda") and check them against the signature.

        For "cuda", also runs one encode and one decoder step on the GPU; raises ProviderUnavailable
        when CUDA cannot be registered or fails to run. Raises ModelEntryError on a graph mismatch.
        """
        so = session_options(settings)
        sessions: list[ort.InferenceSession] = []
        for path in (entry.encoder_file, entry.decoder_file):  # the encoder first: a CUDA probe stops early
            try:
                session = ort.InferenceSession(str(path), so, providers=PROVIDERS[device])
            except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
                if device == CUDA:
                    raise ProviderUnavailable(f"creating a CUDA session failed: {err}") from err
                raise
            if device == CUDA and session.get_providers()[0] != "CUDAExecutionProvider":
                raise ProviderUnavailable(f"onnxruntime fell back to {session.get_providers()} (no usable CUDA)")
            sessions.append(session)
        encoder, decoder = sessions
        check_sessions(entry, encoder, decoder)
        model = cls(entry, encoder, decoder, device)
        if device == CUDA:
            model.smoke_test()
        return model

    def smoke_test(self) -> None:
        """Encode one source and run one decoder step; raises ProviderUnavailable if either fails."""
        cfg = self.entry.config
        try:
            state = self.encode(np.array([[cfg.eos_id]], dtype=np.int64))
            request = StepRequest(0, np.array([[cfg.bos_id]], dtype=np.int64), np.zeros(1, dtype=np.int64), None, 1)
            out = self.step(state, request)
            if not np.isfinite(out.topk_log_probs).all():
                raise RuntimeError("non-finite log-probs")
        except Exception as err:
            raise ProviderUnavailable(f"a test decode on {self.device} failed: {err}") from err

    # -- the two calls of a decoding loop ---------------------------------------------------------------

    def encode(self, src_ids: np.ndarray) -> DecoderState:
        """src_ids (B, S) int64 padded with pad_id -> the loop's state (cross K/V on the device)."""
        src_ids = np.ascontiguousarray(src_ids, dtype=np.int64)
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(sig.SRC_IDS, src_ids)
        for name in self._cross_names:
            binding.bind_output(name, self.device)
        self.encoder.run_with_iobinding(binding)
        cross: list[Any] = binding.get_outputs()
        if self.device == CPU:  # one copy per batch; then gathers copy only the survivors
            cross = [v.numpy() for v in cross]
        return DecoderState(cross, src_ids != self.entry.config.pad_id)

    def step(self, state: DecoderState, request: StepRequest) -> StepScores:
        """One decoder call for the rows of `request`; updates `state` (past K/V, live sentences).

        The loop keeps one IO binding: cross K/V, src_mask and the top-k width are bound once (again
        only when sentences leave or the width changes); each step rebinds the token ids, positions,
        cache_index, past K/V and the outputs.
        """
        binding = state.binding
        if binding is None:
            binding = state.binding = self.decoder.io_binding()
            self._bind_sentences(binding, state)
        elif request.sentences is not None:
            state.cross = self._gather_sentences(state.cross, request.sentences)
            state.src_mask = np.ascontiguousarray(state.src_mask[request.sentences])
            self._bind_sentences(binding, state)
        if request.topk != state.topk:
            binding.bind_cpu_input(sig.TOPK, np.array([request.topk], dtype=np.int64))
            state.topk = request.topk
        rows = request.input_ids.shape[0]
        # Small host inputs; under CUDA onnxruntime copies them to the device.
        binding.bind_cpu_input(sig.INPUT_IDS, np.ascontiguousarray(request.input_ids, dtype=np.int64))
        binding.bind_cpu_input(sig.POSITION, np.full(rows, request.step, dtype=np.int64))
        binding.bind_cpu_input(sig.CACHE_INDEX, np.ascontiguousarray(request.cache_index, dtype=np.int64))
        if state.past is None:  # first step: a zero-length past that cache_index = arange(R) indexes
            empty = np.zeros((rows, self.heads, 0, self.head_dim), dtype=self.kv_dtype)
            for name in self._past_names:
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self._past_names, state.past, strict=True):
                binding.bind_ortvalue_input(name, value)
        # Outputs are rebound every step: after a run they hold that step's tensors, whose shapes
        # (rows, past length) the next step no longer has.
        binding.bind_output(sig.LOG_PROBS, self.device)
        binding.bind_output(sig.TOPK_LOG_PROBS, CPU)
        binding.bind_output(sig.TOPK_IDS, CPU)
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        log_probs = outputs[0]
        state.past = outputs[3:]
        eos = self.eos_id
        return StepScores(outputs[1].numpy(), outputs[2].numpy(), lambda: log_probs.numpy()[:, eos])

    def _bind_sentences(self, binding: Any, state: DecoderState) -> None:
        """Bind what is per live sentence: the padding mask and the cross K/V."""
        binding.bind_cpu_input(sig.SRC_MASK, state.src_mask)
        for name, value in zip(self._cross_names, state.cross, strict=True):
            if self.device == CPU:
                binding.bind_cpu_input(name, value)  # no copy: ORT reads the numpy buffer
            else:
                binding.bind_ortvalue_input(name, value)

    def _gather_sentences(self, values: list[Any], index: np.ndarray) -> list[Any]:
        """values[i][index] along the batch axis, on this model's device."""
        if self.device == CPU:
            return [np.take(v, index, axis=0) for v in values]
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[index]), self.device, 0)
                for v in values]


def cuda_usable(entry: ModelEntry) -> tuple[bool, str]:
    """(True, "") when this entry encodes and decodes on CUDA here, else (False, why not)."""
    try:
        OrtModel.open(entry, CUDA, SessionSettings(1, 1))
    except ProviderUnavailable as err:
        return False, str(err)
    return True, ""
