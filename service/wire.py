"""Protobuf <-> plain Python for the pieces both the servicer and the client convert.

Only the servicer (service/server/servicer.py) and the client helper (service/client.py) import this module;
everything below them speaks DecodingOptions and plain dataclasses.
"""

from __future__ import annotations

import math
from typing import Any

from service.options import DecodingOptions
from service.proto import translate_pb2 as pb

OPTION_FIELDS = {  # proto DecodingOptions field -> service.options.DecodingOptions field
    "beam_size": "beam_size",
    "length_penalty": "length_penalty",
    "max_decoding_length": "max_decoding_length",
    "max_decoding_length_ratio": "max_decoding_length_ratio",
    "max_decoding_length_offset_tokens": "max_decoding_length_offset",
    "min_decoding_length": "min_decoding_length",
    "num_hypotheses": "num_hypotheses",
    "return_scores": "return_scores",
    "partial_at_deadline": "partial_at_deadline",
    "overload_beam_size": "overload_beam_size",
}
_TO_PB = {ours: theirs for theirs, ours in OPTION_FIELDS.items()}

FINISH_REASONS = {  # plain name (TranslationResult.finish_reason, plus "empty") <-> proto enum
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "empty": pb.FINISH_REASON_EMPTY_INPUT,
    "deadline": pb.FINISH_REASON_DEADLINE,
}
_FROM_PB: dict[int, str] = {int(v): k for k, v in FINISH_REASONS.items()}


def options_from_pb(options: pb.DecodingOptions) -> dict[str, Any]:
    """The fields a request set, by DecodingOptions name (unset fields are absent: server defaults).

    float fields travel as float32: they are brought back to the shortest decimal that round-trips
    (0.6f -> 0.6, not 0.6000000238), so a client asking for 0.6 decodes exactly like a local 0.6."""
    given = {ours: getattr(options, theirs) for theirs, ours in OPTION_FIELDS.items() if options.HasField(theirs)}
    for name, value in given.items():
        if isinstance(value, float) and math.isfinite(value):
            given[name] = float(f"{value:.7g}")
    return given


def options_to_pb(options: DecodingOptions | dict[str, Any] | None) -> pb.DecodingOptions:
    """A DecodingOptions (every field sent) or a dict of DecodingOptions fields (only those sent)."""
    if options is None:
        return pb.DecodingOptions()
    given = options.__dict__ if isinstance(options, DecodingOptions) else options
    unknown = set(given) - set(_TO_PB)
    if unknown:
        raise ValueError(f"not decoding options: {sorted(unknown)}")
    return pb.DecodingOptions(**{_TO_PB[k]: v for k, v in given.items()})


def finish_reason_to_pb(reason: str) -> pb.FinishReason:
    return FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def finish_reason_from_pb(reason: int) -> str:
    return _FROM_PB.get(int(reason), "unspecified")
