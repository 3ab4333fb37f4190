"""Validation: a request's options, sizes and cost against the ServerConfig limits, before anything is
queued. Raises InvalidArgument naming the field and its limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.config import ServerConfig
from service.errors import InvalidArgument
from service.options import DecodingOptions

if TYPE_CHECKING:
    from service.server.models import ServedModel


LENGTH_PENALTY_RANGE = (-10.0, 10.0)  # wider values only overflow: 512**10 is already 1e27
MAX_RATIO = 1000.0  # max_decoding_length_ratio above this changes nothing (max_decoding_length caps first)
MAX_MODEL_NAME_BYTES = 256  # a longer `model` is refused before lookup; messages quote at most this much


def shown(text: str, limit: int = 64) -> str:
    """`text` quoted for a status message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class RequestLimits:
    max_sentences_per_request: int
    max_sentences_per_stream: int
    max_input_tokens: int
    max_beam_size: int
    max_output_tokens: int
    max_input_bytes: int
    max_request_decode_tokens: int
    max_batch_kv_bytes: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> RequestLimits:
        return cls(config.max_sentences_per_request, config.max_sentences_per_stream, config.max_input_tokens,
                   config.max_beam_size, config.max_output_tokens, config.max_input_bytes,
                   config.max_request_decode_tokens, config.max_batch_kv_bytes)

    def decoding_options(self, given: dict[str, Any]) -> DecodingOptions:
        """DecodingOptions from the fields a request set (others keep their defaults); InvalidArgument
        naming the field and its limit when one is out of range."""
        merged = {**DecodingOptions().__dict__, **given}
        beam, nbest = merged["beam_size"], merged["num_hypotheses"]
        if not 1 <= beam <= self.max_beam_size:
            raise InvalidArgument(f"beam_size={beam} is out of range [1, max_beam_size={self.max_beam_size}]")
        if not 1 <= nbest <= beam:
            raise InvalidArgument(f"num_hypotheses={nbest} is out of range [1, beam_size={beam}]")
        max_len = merged["max_decoding_length"]
        if not 1 <= max_len <= self.max_output_tokens:
            raise InvalidArgument(f"max_decoding_length={max_len} is out of range "
                                  f"[1, max_output_tokens={self.max_output_tokens}]")
        for name in ("min_decoding_length", "max_decoding_length_offset", "max_decoding_length_ratio"):
            if merged[name] < 0:
                field = "max_decoding_length_offset_tokens" if name == "max_decoding_length_offset" else name
                raise InvalidArgument(f"{field}={merged[name]} is negative; it must be >= 0")
        for name in ("length_penalty", "max_decoding_length_ratio"):
            if merged[name] != merged[name] or merged[name] in (float("inf"), float("-inf")):
                raise InvalidArgument(f"{name}={merged[name]} is not a finite number")
        low, high = LENGTH_PENALTY_RANGE
        if not low <= merged["length_penalty"] <= high:
            raise InvalidArgument(f"length_penalty={merged['length_penalty']:g} is out of range [{low:g}, {high:g}]")
        if merged["max_decoding_length_ratio"] > MAX_RATIO:
            raise InvalidArgument(f"max_decoding_length_ratio={merged['max_decoding_length_ratio']:g} is out of "
                                  f"range [0, {MAX_RATIO:g}]")
        try:
            return DecodingOptions(**merged)
        except ValueError as err:  # any rule DecodingOptions adds later
            raise InvalidArgument(str(err)) from err

    def check_count(self, n: int, stream: bool) -> None:
        cap, name = ((self.max_sentences_per_stream, "max_sentences_per_stream") if stream
                     else (self.max_sentences_per_request, "max_sentences_per_request"))
        if n == 0:
            raise InvalidArgument("sentences is empty: send at least one sentence")
        if n > cap:
            raise InvalidArgument(f"the request has {n} sentences, more than {name}={cap}")

    def check_bytes(self, sentences: Sequence[str]) -> None:
        """Before tokenizing: every sentence within max_input_bytes of UTF-8 (a cheap, exact bound on the
        tokenizer's work and memory)."""
        cap = self.max_input_bytes
        for i, s in enumerate(sentences):
            # a str holds at most 4 UTF-8 bytes a character: skip the encode when it cannot exceed the cap
            if len(s) * 4 > cap and (size := len(s.encode("utf-8", "surrogatepass"))) > cap:
                raise InvalidArgument(f"sentence {i} has {size} bytes of UTF-8, more than max_input_bytes={cap}")

    def check_cost(self, model: ServedModel, sources: Sequence[list[int] | None], options: DecodingOptions,
                   stream: bool) -> list[int]:
        """The KV-cache bound of each source to decode (None ones skipped); INVALID_ARGUMENT when one
        sentence alone exceeds max_batch_kv_bytes or (Translate) when the request's decoder rows x
        positions, summed over its sentences, exceed max_request_decode_tokens."""
        lengths = [len(ids) for ids in sources if ids is not None]
        caps = model.engine.length_caps(lengths, options)
        beam = options.beam_size
        kv = [model.engine.kv_bytes(n, beam, cap) for n, cap in zip(lengths, caps, strict=True)]
        worst = max(range(len(kv)), key=kv.__getitem__, default=None)
        if worst is not None and kv[worst] > self.max_batch_kv_bytes:
            raise InvalidArgument(
                f"a sentence of {lengths[worst]} tokens at beam_size={beam} and a length cap of {caps[worst]} "
                f"tokens needs {kv[worst]} bytes of KV cache, more than max_batch_kv_bytes="
                f"{self.max_batch_kv_bytes}; lower beam_size or max_decoding_length")
        decode_tokens = beam * sum(caps)
        if not stream and decode_tokens > self.max_request_decode_tokens:
            raise InvalidArgument(
                f"the request's decoding work, beam_size x length cap summed over its sentences, is "
                f"{decode_tokens} tokens, more than max_request_decode_tokens={self.max_request_decode_tokens}; "
                f"split the request or lower beam_size or max_decoding_length")
        return kv

    def check_lengths(self, sources: Sequence[list[int] | None], max_input_tokens: int) -> None:
        """`max_input_tokens`: the model's limit (ServerConfig.max_input_tokens or lower)."""
        for i, ids in enumerate(sources):
            if ids is not None and len(ids) > max_input_tokens:
                raise InvalidArgument(f"sentence {i} has {len(ids)} tokens, more than "
                                      f"max_input_tokens={max_input_tokens}")
