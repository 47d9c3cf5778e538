from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SOURCE_UNSPECIFIED: _ClassVar[TokenSource]
    TOKEN_SOURCE_ACCEPTED: _ClassVar[TokenSource]
    TOKEN_SOURCE_RECOVERED: _ClassVar[TokenSource]
    TOKEN_SOURCE_BONUS: _ClassVar[TokenSource]
    TOKEN_SOURCE_TARGET: _ClassVar[TokenSource]
TOKEN_SOURCE_UNSPECIFIED: TokenSource
TOKEN_SOURCE_ACCEPTED: TokenSource
TOKEN_SOURCE_RECOVERED: TokenSource
TOKEN_SOURCE_BONUS: TokenSource
TOKEN_SOURCE_TARGET: TokenSource

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "apply_chat_template", "num_speculative_tokens", "stop", "temperature", "top_p", "top_k", "seed", "strategy", "num_candidates", "target_only")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TARGET_ONLY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    apply_chat_template: bool
    num_speculative_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    strategy: str
    num_candidates: int
    target_only: bool
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., apply_chat_template: _Optional[bool] = ..., num_speculative_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., strategy: _Optional[str] = ..., num_candidates: _Optional[int] = ..., target_only: _Optional[bool] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("source", "text", "target_logprob")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    source: TokenSource
    text: str
    target_logprob: float
    def __init__(self, source: _Optional[_Union[TokenSource, str]] = ..., text: _Optional[str] = ..., target_logprob: _Optional[float] = ...) -> None: ...

class CandidateInfo(_message.Message):
    __slots__ = ("token_ids", "accepted_length")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted_length: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., accepted_length: _Optional[int] = ...) -> None: ...

class RoundStats(_message.Message):
    __slots__ = ("round", "drafted_tokens", "accepted_tokens", "draft_seconds", "verify_seconds", "round_seconds", "pipeline", "candidates")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    round: int
    drafted_tokens: int
    accepted_tokens: int
    draft_seconds: float
    verify_seconds: float
    round_seconds: float
    pipeline: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateInfo]
    def __init__(self, round: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., round_seconds: _Optional[float] = ..., pipeline: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateInfo, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "stats", "finish_reason", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: RoundStats
    finish_reason: str
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[RoundStats, _Mapping]] = ..., finish_reason: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...
