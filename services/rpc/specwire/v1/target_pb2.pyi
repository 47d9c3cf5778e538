from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_context_tokens", "max_tree_nodes", "max_sessions", "session_ttl_s")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_context_tokens: int
    max_tree_nodes: int
    max_sessions: int
    session_ttl_s: float
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_tree_nodes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., session_ttl_s: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "tokenizer_fingerprint", "vocab_size", "strategies", "limits", "lossy_strategies")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    strategies: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    lossy_strategies: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., strategies: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., lossy_strategies: _Optional[_Iterable[str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class StrategyParams(_message.Message):
    __slots__ = ("threshold", "epsilon", "alpha", "top_k")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    epsilon: float
    alpha: float
    top_k: int
    def __init__(self, threshold: _Optional[float] = ..., epsilon: _Optional[float] = ..., alpha: _Optional[float] = ..., top_k: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("prompt_token_ids", "tokenizer_fingerprint", "strategy", "sampling", "strategy_params", "resume_pending_token_id", "ignores_advice")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESUME_PENDING_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    IGNORES_ADVICE_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_fingerprint: str
    strategy: str
    sampling: SamplingParams
    strategy_params: StrategyParams
    resume_pending_token_id: int
    ignores_advice: bool
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_fingerprint: _Optional[str] = ..., strategy: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., strategy_params: _Optional[_Union[StrategyParams, _Mapping]] = ..., resume_pending_token_id: _Optional[int] = ..., ignores_advice: _Optional[bool] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "first_token_id", "context_length", "advised_draft_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADVISED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first_token_id: int
    context_length: int
    advised_draft_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., context_length: _Optional[int] = ..., advised_draft_tokens: _Optional[int] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class CandidateTree(_message.Message):
    __slots__ = ("parents", "token_ids", "draft_probs")
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    def __init__(self, parents: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("session_id", "round_id", "tree")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    tree: CandidateTree
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., tree: _Optional[_Union[CandidateTree, _Mapping]] = ...) -> None: ...

class CandidateResult(_message.Message):
    __slots__ = ("leaf_node_id", "length", "accepted_length", "target_logprob")
    LEAF_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    leaf_node_id: int
    length: int
    accepted_length: int
    target_logprob: float
    def __init__(self, leaf_node_id: _Optional[int] = ..., length: _Optional[int] = ..., accepted_length: _Optional[int] = ..., target_logprob: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("session_id", "round_id", "accepted_node_ids", "accepted_token_ids", "next_token_id", "next_is_bonus", "context_length", "tree_nodes", "verify_seconds", "candidates", "batch_size", "accepted_logprobs", "next_token_logprob", "advised_draft_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_IS_BONUS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ADVISED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    accepted_node_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    next_token_id: int
    next_is_bonus: bool
    context_length: int
    tree_nodes: int
    verify_seconds: float
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateResult]
    batch_size: int
    accepted_logprobs: _containers.RepeatedScalarFieldContainer[float]
    next_token_logprob: float
    advised_draft_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., accepted_node_ids: _Optional[_Iterable[int]] = ..., accepted_token_ids: _Optional[_Iterable[int]] = ..., next_token_id: _Optional[int] = ..., next_is_bonus: _Optional[bool] = ..., context_length: _Optional[int] = ..., tree_nodes: _Optional[int] = ..., verify_seconds: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[CandidateResult, _Mapping]]] = ..., batch_size: _Optional[int] = ..., accepted_logprobs: _Optional[_Iterable[float]] = ..., next_token_logprob: _Optional[float] = ..., advised_draft_tokens: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...
