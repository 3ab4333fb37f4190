"""The entry's two ONNX Runtime sessions on one device, and the two calls a decoding loop makes.

    encode(src_ids)          once per batch: cross-attention K/V of every decoder layer
    step(state, request)     once per generated token: top-k and eos log-prob per row

Everything runs through IO binding, on CPU as on CUDA. The self-attention cache of a loop is
allocated once (rows, H, slots, Dh) per layer and bound as both the past and the present of the
decoder (signature v2): each step writes one slot in place. Beam reordering moves no K/V: row
(b, i) reads slot s from row b*K + cache_indirection[b, i, s], and the engine updates that small
int32 table on the host. K/V are copied only when the loop's shape changes: when sentences
finish (their rows leave, once per finishing event), when a beam search widens from one row to
K rows per sentence after its first step, and when the cache runs out of slots (its capacity
doubles, so that happens log2(length) times). Per step only small tensors cross to the device:
token ids, positions, the self-attention key mask, the slot and the indirection go in; the
top-k log-probs, ids and the eos log-prob come out.

Rows of one loop may be at different steps: a sentence's rows have a first slot (`start`), their
positions count from it and the key mask hides the slots before it. Every sentence of a batch
starts at slot 0 today; the step-level scheduler admits sentences into a running loop with it.

Providers: "cuda" is used only after a session was created with it AND a real encode + decoder
step ran on it; the provider list of an onnxruntime-gpu wheel names CUDA on machines without a
usable GPU. On CUDA the shape changes above go through the host (rare events, not per step).
Shapes: B sentences, K beams, S source length, R = B*K rows, M cache slots, H heads, Dh head dim,
k top-k.
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


FIRST_SLOTS = 32  # cache slots a new loop allocates; doubled when a step needs more
# A running loop shifts its cache left once half of its slots belong to no live sentence any more (and it
# has at least this many): the fused attention reads every slot up to the current one, masked or not.
EAGER_REBASE_SLOTS = 16


@dataclass
class StepBuffers:
    """The host side of a decoder call, bound once per loop shape and then written or read in place."""

    rows: int
    topk: int
    ids: np.ndarray  # (R,) int64 input token ids
    positions: np.ndarray  # (R,) int64
    slot: np.ndarray  # (1,) int32 cache_slot
    mask: np.ndarray  # (R * M,) int32: self_mask of a step is its first R * (slot+1) values, as (R, slot+1)
    top_v: np.ndarray  # (R, k) float32 output
    top_i: np.ndarray  # (R, k) int64 output
    eos: np.ndarray  # (R,) float32 output
    mask_ones: bool = True  # `mask` holds ones only (no row starts late)


@dataclass
class _Spare:
    cross: list[np.ndarray]  # (cap, H, S_cap, Dh) each
    src_mask: np.ndarray  # (cap, S_cap) int32
    cache: list[np.ndarray]  # (cap * K, H, M, Dh) each
    capacity: int  # sentences


@dataclass
class DecoderState:
    """The device-side state of one decoding loop."""

    cross: list[Any]  # per layer cross_k, cross_v (B, H, S, Dh) of the live sentences: numpy on CPU, OrtValue else
    src_mask: np.ndarray  # (B, S) int32, 1 at real source tokens; host side, small
    start: np.ndarray  # (B,) int64 first cache slot of every live sentence (its position 0)
    cache: list[Any] | None = None  # per layer k, v (R, H, M, Dh): numpy on CPU (bound without a copy), OrtValue else
    indirection: np.ndarray | None = None  # (B, K, M) int32, host side
    beams: int = 0  # K: rows per sentence in the cache's layout
    slot: int = 0  # the slot the next step writes
    binding: Any = None  # the decoder's IO binding for this loop: everything stays bound, see OrtModel.step
    io: StepBuffers | None = None  # the host buffers bound now
    reshaped: bool = False  # sentences joined or the cache moved since the last bind: bind again
    # CPU, once sentences have joined or left: the arrays behind cross, src_mask and cache, with room for
    # more sentences (cross, src_mask, cache are their first B / B*K rows); None: exact-size arrays
    spare: _Spare | None = None

    @property
    def slots(self) -> int:
        return 0 if self.indirection is None else int(self.indirection.shape[2])

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this loop's K/V: the self-attention cache and the cross-attention K/V, spare room
        included (metrics: KV-cache occupancy)."""
        spare = self.spare
        cross = spare.cross if spare is not None else list(self.cross)
        cache = spare.cache if spare is not None and spare.cache else list(self.cache or [])
        return sum(_nbytes(a) for a in cross + cache)


def _nbytes(value: Any) -> int:
    """A numpy array's or an OrtValue's size in bytes."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    shape = value.shape()
    return int(np.prod(shape)) * (2 if "16" in value.data_type() else 4)


def _runs(to: np.ndarray, source: np.ndarray) -> list[tuple[int, int, int]]:
    """(p, q, length) for each run of consecutive positions `to` whose `source` positions are consecutive too:
    copying source[q : q + length] to [p : p + length] moves them in one slice."""
    if not to.size:
        return []
    cut = np.flatnonzero((np.diff(to) != 1) | (np.diff(source) != 1)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [to.size]])
    return [(int(to[a]), int(source[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


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
        """A short beam decode here and on CPU sessions of the same files: raises ProviderUnavailable if
        this device fails, returns non-finite scores, or disagrees with CPU (the fused attention kernels
        differ per provider; a wrong result must never be served)."""
        try:
            here = self._probe_decode(self)
            cpu = self._probe_decode(OrtModel.open(self.entry, CPU, SessionSettings(1, 1)))
        except Exception as err:
            raise ProviderUnavailable(f"a test decode on {self.device} failed: {err}") from err
        tolerance = 0.05 if self.kv_dtype == np.float16 else 1e-3
        if not np.isfinite(here[0]).all() or np.abs(here[0] - cpu[0]).max() > tolerance \
                or not np.array_equal(here[1][:, 0], cpu[1][:, 0]):
            raise ProviderUnavailable(f"a test decode on {self.device} disagrees with CPU (top log-probs "
                                      f"{here[0][:, 0].tolist()} vs {cpu[0][:, 0].tolist()})")

    @staticmethod
    def _probe_decode(model: OrtModel, steps: int = 4, beams: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(top log-probs, top ids) of `steps` steps of two sentences with `beams` rows each, fed fixed tokens
        and reordered every step: exercises the cache, the indirection and the cross-attention grouping."""
        cfg = model.entry.config
        src = np.array([[4 % cfg.vocab_size, cfg.eos_id], [cfg.eos_id, cfg.pad_id]], dtype=np.int64)
        state = model.encode(src)
        tokens = np.full((2, 1), cfg.bos_id, dtype=np.int64)
        index = np.arange(2)
        values, ids = [], []
        for step in range(steps):
            out = model.step(state, StepRequest(step, tokens, index, None, 2))
            values.append(out.topk_log_probs)
            ids.append(out.topk_ids)
            tokens = ((np.arange(2 * beams) + 5 + step) % cfg.vocab_size).reshape(-1, 1)  # beams differ
            per = out.topk_ids.shape[0] // 2
            index = np.repeat(np.arange(2) * per, beams) + (np.arange(2 * beams) + step) % per
        return np.concatenate(values), np.concatenate(ids)

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
        if self.device == CPU:  # host arrays; sentences that stay then move within them
            cross = [v.numpy() for v in cross]
        src_mask = (src_ids != self.entry.config.pad_id).astype(np.int32)
        return DecoderState(cross, src_mask, np.zeros(src_ids.shape[0], dtype=np.int64))

    def step(self, state: DecoderState, request: StepRequest) -> StepScores:
        """One decoder call for the rows of `request` (a search's); updates `state` (cache, indirection,
        live sentences). request.cache_index names, for every row, the row of the previous step it
        continues, in the sentence request.sentences[row // K] of the previous step (all when None)."""
        origin = np.asarray(request.cache_index) % max(state.beams, 1)  # the beam within its sentence
        return self.step_rows(state, request.input_ids.reshape(-1), origin, request.sentences, request.topk)

    def step_rows(self, state: DecoderState, input_ids: np.ndarray, origin: np.ndarray,
                  keep: np.ndarray | None, topk: int) -> StepScores:
        """One decoder call: first only the previous step's sentences `keep` stay (None: all), then row
        (b, i) continues beam origin[b*K + i] of its sentence b and is fed input_ids[b*K + i]. K (rows per
        sentence) may grow from one step to the next (a beam search after its first step).

        The host side of a step is a few small writes: every input and output is a host buffer bound
        once per loop shape (rows, top-k width, cache slots) and written or read in place; only the
        self-attention mask, whose width grows by one slot a step, is rebound (a view of one buffer).
        """
        rows = input_ids.shape[0]
        binding = state.binding
        reshaped = state.reshaped
        if binding is None:
            binding = state.binding = self.decoder.io_binding()
            reshaped = True
        if keep is not None:
            self._keep_sentences(state, np.asarray(keep))
            reshaped = True
        if reshaped:
            self._bind_sentences(binding, state)
        sentences = state.src_mask.shape[0]
        beams = rows // sentences
        if state.cache is None:
            self._allocate(state, sentences, beams, max(FIRST_SLOTS, state.slot + 1))
            reshaped = True
        else:
            reshaped |= self._reorder(state, origin, beams)
            if beams != state.beams:
                self._widen(state, beams)
            if state.slot >= state.slots or (state.slot >= EAGER_REBASE_SLOTS
                                              and state.start.size and 2 * int(state.start.min()) >= state.slot):
                self._rebase(state)  # every row's attention reads all slots up to `slot`: keep that short
            if state.slot >= state.slots:
                self._grow(state, max(state.slot + 1, min(2 * state.slots, 2 * self.max_slots)))
                reshaped = True
        state.reshaped = False
        slot = state.slot
        assert state.indirection is not None
        io = state.io
        if reshaped or io is None or io.rows != rows or io.topk != topk:
            io = state.io = self._bind_step(binding, state, rows, topk)
        state.indirection[:, :, slot] = np.arange(beams, dtype=np.int32)  # every row writes its own slot
        io.ids[:] = input_ids
        io.slot[0] = slot
        mask = io.mask[: rows * (slot + 1)].reshape(rows, slot + 1)
        if state.start.any():  # rows of different steps: positions from each sentence's first slot
            row_start = np.repeat(state.start, beams)
            np.maximum(slot - row_start, 0, out=io.positions)  # rows not started yet: position 0
            np.greater_equal(np.arange(slot + 1)[None, :], row_start[:, None], out=mask, casting="unsafe")
            io.mask_ones = False
        else:
            io.positions.fill(slot)
            if not io.mask_ones:
                io.mask.fill(1)
                io.mask_ones = True
        binding.bind_cpu_input(sig.SELF_MASK, mask)
        self.decoder.run_with_iobinding(binding)
        state.slot = slot + 1
        eos = io.eos.copy()  # copies: the buffers are the next step's
        return StepScores(io.top_v.copy(), io.top_i.copy(), lambda: eos)

    def keep(self, state: DecoderState, sentences: np.ndarray) -> None:
        """Only `sentences` (indices of the live ones, in order) stay in the loop; the next step rebinds."""
        self._keep_sentences(state, np.asarray(sentences, dtype=np.int64))
        state.reshaped = True

    def admit(self, state: DecoderState, src_ids: np.ndarray) -> None:
        """Sentences join a running loop: src_ids (B', S') padded, encoded apart and placed after the
        live sentences (cross K/V and masks padded to the longer source). Their rows start at the next
        step's slot with position 0, K rows each (the loop's width, zeroed cache); the next step_rows
        feeds them like any other row. On CPU the arrays keep room for more sentences (capacity doubles
        when full), so a sentence joining copies only its own rows."""
        new = self.encode(src_ids)
        n, added = state.src_mask.shape[0], src_ids.shape[0]
        state.start = np.concatenate([state.start, np.full(added, state.slot, dtype=np.int64)])
        if state.indirection is not None:
            state.indirection = np.concatenate(
                [state.indirection, np.zeros((added, *state.indirection.shape[1:]), dtype=np.int32)])
        state.reshaped = True
        if self.device != CPU:  # exact-size arrays, rebuilt through the host
            width = max(state.src_mask.shape[1], new.src_mask.shape[1])
            state.cross = [self._concat_padded(old, add, width)
                           for old, add in zip(state.cross, new.cross, strict=True)]
            mask = np.zeros((n + added, width), dtype=np.int32)
            mask[:n, : state.src_mask.shape[1]] = state.src_mask
            mask[n:, : new.src_mask.shape[1]] = new.src_mask
            state.src_mask = mask
            if state.cache is not None:
                rows = added * state.beams
                state.cache = [self._concat_padded(old, self._zeros((rows, *old.shape[1:])), None)
                               for old in state.cache]
            return
        spare = self._room(state, n + added, new.src_mask.shape[1])
        k = max(state.beams, 1)
        for base, add in zip(spare.cross, new.cross, strict=True):
            base[n: n + added] = 0.0
            base[n: n + added, :, : add.shape[2]] = add
        spare.src_mask[n: n + added] = 0
        spare.src_mask[n: n + added, : new.src_mask.shape[1]] = new.src_mask
        if state.cache is not None:
            for base in spare.cache:
                base[n * k: (n + added) * k] = 0.0
        self._views(state, n + added)

    def _concat_padded(self, old: Any, add: Any, width: int | None) -> Any:
        """old and add joined along axis 0, both padded with zeros to `width` on axis 2 (None: as they are)."""
        a, b = (v if self.device == CPU else v.numpy() for v in (old, add))
        if width is not None:
            a, b = (np.pad(v, [(0, 0), (0, 0), (0, width - v.shape[2]), (0, 0)]) for v in (a, b))
        return self._to_device(np.concatenate([a, b]))

    def _room(self, state: DecoderState, sentences: int, width: int) -> _Spare:
        """state.spare with room for `sentences` sentences of `width` source tokens (a copy when it grows)."""
        spare = state.spare
        if spare is not None and sentences <= spare.capacity and width <= spare.src_mask.shape[1] and (
                state.cache is None or spare.cache):
            return spare
        n = state.src_mask.shape[0]
        capacity = max(sentences, 2 * (spare.capacity if spare else n), 4)
        width = max(width, state.src_mask.shape[1]) + (-max(width, state.src_mask.shape[1])) % 8
        cross = []
        for view in state.cross:
            base = np.zeros((capacity, view.shape[1], width, view.shape[3]), dtype=view.dtype)
            base[:n, :, : view.shape[2]] = view
            cross.append(base)
        mask = np.zeros((capacity, width), dtype=np.int32)
        mask[:n, : state.src_mask.shape[1]] = state.src_mask
        cache = []
        if state.cache is not None:
            k = max(state.beams, 1)
            for view in state.cache:
                base = np.zeros((capacity * k, *view.shape[1:]), dtype=view.dtype)
                base[: n * k] = view
                cache.append(base)
        state.spare = _Spare(cross, mask, cache, capacity)
        return state.spare

    def _views(self, state: DecoderState, sentences: int) -> None:
        """cross, src_mask and cache: the first `sentences` of state.spare's arrays (contiguous views)."""
        assert state.spare is not None
        k = max(state.beams, 1)
        state.cross = [base[:sentences] for base in state.spare.cross]
        state.src_mask = state.spare.src_mask[:sentences]
        if state.cache is not None:
            state.cache = [base[: sentences * k] for base in state.spare.cache]

    def _rebase(self, state: DecoderState) -> None:
        """Slots before every live sentence's first one are free: shift the cache left over them (a loop
        that runs for long reuses its slots instead of growing without end)."""
        shift = int(state.start.min()) if state.start.size else state.slot
        if shift <= 0:
            return
        assert state.cache is not None and state.indirection is not None
        used = state.slot - shift  # slots still owned by a live sentence

        def shifted(value: Any) -> Any:
            host = value if self.device == CPU else value.numpy()
            host[:, :, :used] = host[:, :, shift: state.slot].copy()
            return value if self.device == CPU else self._to_device(host)

        state.cache = [shifted(v) for v in state.cache]
        state.indirection[:, :, :used] = state.indirection[:, :, shift: state.slot].copy()
        state.start = state.start - shift
        state.slot -= shift
        state.reshaped = True

    def _bind_step(self, binding: Any, state: DecoderState, rows: int, topk: int) -> StepBuffers:
        """Fresh host buffers for a loop shape, bound once: token ids, positions, slot, indirection, the
        mask's backing buffer, the cache (past and present on one buffer per layer) and the outputs."""
        assert state.cache is not None and state.indirection is not None
        io = StepBuffers(rows, topk, np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64),
                         np.zeros(1, dtype=np.int32), np.ones(rows * state.slots, dtype=np.int32),
                         np.zeros((rows, topk), dtype=np.float32), np.zeros((rows, topk), dtype=np.int64),
                         np.zeros(rows, dtype=np.float32))
        for name, value in ((sig.INPUT_IDS, io.ids), (sig.POSITION, io.positions), (sig.CACHE_SLOT, io.slot),
                            (sig.CACHE_INDIRECTION, state.indirection),
                            (sig.BEAM_WIDTH, np.array([state.beams], dtype=np.int32)),
                            (sig.TOPK, np.array([topk], dtype=np.int64))):
            binding.bind_cpu_input(name, value)  # no copy: ORT reads the numpy buffer, written in place
        for name, value in ((sig.TOPK_LOG_PROBS, io.top_v), (sig.TOPK_IDS, io.top_i), (sig.EOS_LOG_PROBS, io.eos)):
            binding.bind_output(name, CPU, 0, value.dtype, list(value.shape), value.ctypes.data)
        for past, present, value in zip(self._past_names, self._present_names, state.cache, strict=True):
            ort_value = ort.OrtValue.ortvalue_from_numpy(value) if self.device == CPU else value
            binding.bind_ortvalue_input(past, ort_value)
            binding.bind_ortvalue_output(present, ort_value)
        return io

    @property
    def max_slots(self) -> int:
        return self.entry.config.max_positions

    # -- the cache: allocated per loop, reshaped only on events ------------------------------------------

    def _allocate(self, state: DecoderState, sentences: int, beams: int, slots: int) -> None:
        shape = (sentences * beams, self.heads, slots, self.head_dim)
        state.cache = [self._zeros(shape) for _ in self._past_names]
        state.indirection = np.zeros((sentences, beams, slots), dtype=np.int32)
        state.beams = beams

    def _keep_sentences(self, state: DecoderState, keep: np.ndarray) -> None:
        """Only the sentences `keep` (indices of the previous step's, in their new order) stay: their rows,
        cross K/V, masks. On CPU they move within the arrays they are in (which keep their room): sentence
        p is copied only where keep[p] != p, in runs, and nothing is allocated. A request-level batch
        (keep increasing) moves the sentences after the first that left; a loop (`fill_holes`) only those
        past the new end."""
        state.start = state.start[keep]
        if state.indirection is not None:
            state.indirection = np.ascontiguousarray(state.indirection[keep])
        n = keep.size
        moved = np.flatnonzero(keep != np.arange(n))
        if self.device != CPU or (moved.size and (keep[moved] < moved).any()):  # a move could overwrite one
            state.cross = self._gather(state.cross, keep)
            state.src_mask = np.ascontiguousarray(state.src_mask[keep])
            if state.cache is not None:
                rows = (keep[:, None] * state.beams + np.arange(state.beams)).reshape(-1)
                state.cache = self._gather(state.cache, rows)
            state.spare = None
            return
        spare = state.spare
        if spare is None or (state.cache is not None and not spare.cache):  # the arrays in use become the room
            spare = state.spare = _Spare(list(state.cross), state.src_mask, list(state.cache or []),
                                         state.src_mask.shape[0])
        k = max(state.beams, 1)
        for p, q, length in _runs(moved, keep[moved]):
            for base in spare.cross:
                base[p: p + length] = base[q: q + length]
            spare.src_mask[p: p + length] = spare.src_mask[q: q + length]
            if state.cache is not None:
                for base in spare.cache:
                    base[p * k: (p + length) * k] = base[q * k: (q + length) * k]
        self._views(state, n)

    def _widen(self, state: DecoderState, beams: int) -> None:
        """The cache from state.beams to `beams` rows per sentence (a beam search after its first step): the
        old rows become the first of each sentence's block; `_reorder` already points the new rows at them."""
        old = state.beams
        if beams < old:
            raise ValueError(f"a loop cannot narrow from {old} to {beams} rows per sentence")
        sentences = state.src_mask.shape[0]

        def widen(value: Any) -> Any:
            host = value if self.device == CPU else value.numpy()
            wide = np.zeros((sentences, beams, *host.shape[1:]), dtype=host.dtype)
            wide[:, :old] = host.reshape(sentences, old, *host.shape[1:])
            return self._to_device(wide.reshape(sentences * beams, *host.shape[1:]))

        assert state.cache is not None
        state.cache = [widen(v) for v in state.cache]
        state.beams = beams
        state.spare = None  # exact-size arrays again

    def _grow(self, state: DecoderState, slots: int) -> None:
        """More cache slots: the filled ones copied into a larger cache."""
        assert state.cache is not None and state.indirection is not None
        filled = state.slots

        def grow(value: Any) -> Any:
            host = value if self.device == CPU else value.numpy()
            big = np.zeros((host.shape[0], host.shape[1], slots, host.shape[3]), dtype=host.dtype)
            big[:, :, :filled] = host
            return self._to_device(big)

        state.cache = [grow(v) for v in state.cache]
        state.spare = None  # exact-size arrays again
        indirection = np.zeros((*state.indirection.shape[:2], slots), dtype=np.int32)
        indirection[:, :, :filled] = state.indirection
        state.indirection = indirection

    @staticmethod
    def _reorder(state: DecoderState, origin: np.ndarray, beams: int) -> bool:
        """Row (b, i) of this step continues beam origin[b*K + i] of its sentence: it inherits that beam's
        slots, so (b, i) reads them where they are. Written into the bound table in place; True when the
        table's shape changed (a beam search widening)."""
        assert state.indirection is not None
        sentences = state.indirection.shape[0]
        table = np.take_along_axis(state.indirection, np.asarray(origin).reshape(sentences, beams, 1), axis=1)
        if table.shape == state.indirection.shape:
            state.indirection[...] = table
            return False
        state.indirection = table
        return True

    def _bind_sentences(self, binding: Any, state: DecoderState) -> None:
        """Bind what is per live sentence: the padding mask and the cross K/V."""
        binding.bind_cpu_input(sig.SRC_MASK, state.src_mask)
        for name, value in zip(self._cross_names, state.cross, strict=True):
            if self.device == CPU:
                binding.bind_cpu_input(name, value)  # no copy: ORT reads the numpy buffer
            else:
                binding.bind_ortvalue_input(name, value)

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        # Zeros, not empty: a masked or not yet written slot is read by the kernel (then weighted 0),
        # and uninitialised memory may hold NaN, which no weight cancels.
        return self._to_device(np.zeros(shape, dtype=self.kv_dtype))

    def _to_device(self, array: np.ndarray) -> Any:
        return array if self.device == CPU else ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def _gather(self, values: list[Any], index: np.ndarray) -> list[Any]:
        """values[i][index] along the first axis, on this model's device."""
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
