from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EMPTY_INPUT: _ClassVar[FinishReason]
    FINISH_REASON_DEADLINE: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EMPTY_INPUT: FinishReason
FINISH_REASON_DEADLINE: FinishReason

class DecodingOptions(_message.Message):
    __slots__ = ("beam_size", "length_penalty", "max_decoding_length", "max_decoding_length_ratio", "max_decoding_length_offset_tokens", "min_decoding_length", "num_hypotheses", "return_scores", "partial_at_deadline", "overload_beam_size")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODING_LENGTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODING_LENGTH_OFFSET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_DECODING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_AT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    OVERLOAD_BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    length_penalty: float
    max_decoding_length: int
    max_decoding_length_ratio: float
    max_decoding_length_offset_tokens: int
    min_decoding_length: int
    num_hypotheses: int
    return_scores: bool
    partial_at_deadline: bool
    overload_beam_size: int
    def __init__(self, beam_size: _Optional[int] = ..., length_penalty: _Optional[float] = ..., max_decoding_length: _Optional[int] = ..., max_decoding_length_ratio: _Optional[float] = ..., max_decoding_length_offset_tokens: _Optional[int] = ..., min_decoding_length: _Optional[int] = ..., num_hypotheses: _Optional[int] = ..., return_scores: _Optional[bool] = ..., partial_at_deadline: _Optional[bool] = ..., overload_beam_size: _Optional[int] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("sentences", "model", "options", "stream_prefix")
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STREAM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    sentences: _containers.RepeatedScalarFieldContainer[str]
    model: str
    options: DecodingOptions
    stream_prefix: bool
    def __init__(self, sentences: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., stream_prefix: _Optional[bool] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "score", "log_prob", "token_ids", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    log_prob: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., log_prob: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class TranslationResult(_message.Message):
    __slots__ = ("hypotheses", "finish_reason", "source_tokens", "beam_size")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    finish_reason: FinishReason
    source_tokens: int
    beam_size: int
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., source_tokens: _Optional[int] = ..., beam_size: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("total_ms", "queue_wait_ms", "compute_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    queue_wait_ms: float
    compute_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., queue_wait_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("results", "model", "model_version", "timing")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TranslationResult]
    model: str
    model_version: str
    timing: Timing
    def __init__(self, results: _Optional[_Iterable[_Union[TranslationResult, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("index", "result", "model", "model_version", "timing", "prefix")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    index: int
    result: TranslationResult
    model: str
    model_version: str
    timing: Timing
    prefix: str
    def __init__(self, index: _Optional[int] = ..., result: _Optional[_Union[TranslationResult, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., prefix: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "source_lang", "target_lang", "precision", "provider", "signature_version", "vocab_size", "d_model", "encoder_layers", "decoder_layers", "heads", "max_input_tokens", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANG_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANG_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    source_lang: str
    target_lang: str
    precision: str
    provider: str
    signature_version: int
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    max_input_tokens: int
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., source_lang: _Optional[str] = ..., target_lang: _Optional[str] = ..., precision: _Optional[str] = ..., provider: _Optional[str] = ..., signature_version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., d_model: _Optional[int] = ..., encoder_layers: _Optional[int] = ..., decoder_layers: _Optional[int] = ..., heads: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...
