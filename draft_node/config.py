"""Draft node settings: env vars SPECWIRE_DRAFT_* or `specwire draft --flag`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.config import NodeConfig
from services.limits import MAX_CANDIDATES, MAX_HTTP_STREAMS, MAX_Q_SUPPORT, MAX_SPECULATIVE_TOKENS


class DraftConfig(NodeConfig):
    model_config = SettingsConfigDict(env_prefix="SPECWIRE_DRAFT_")

    model: str = Field("qwen2.5-coder-0.5b-instruct", description="draft model")
    dtype: str = Field(
        "float32",
        description="float32 | bfloat16 | float16: the draft's precision changes acceptance, never the output "
        "(on a CPU without bf16 instructions a bfloat16 prefill is ~7x slower than float32; with --weights "
        "int8, decode steps and the prompt prefill read the int8 copy)",
    )
    weights: Literal["auto", "gguf", "fp32", "int8"] = Field(
        "auto",
        description="hf proposer: weights its forwards read: gguf, the GGUF file's quantized blocks (CPU kernels); "
        "fp32, a transformers model in --dtype; int8, a weight-only int8 copy of that model (per-row scales, CPU "
        "kernel); auto: gguf for a GGUF model on a CPU, else int8 on a CPU, else fp32. Changes acceptance, never "
        "the output",
    )
    draft_vocab: int = Field(
        65536,
        ge=0,
        description="gguf: the output head covers only the first ids of the vocabulary (frequent BPE merges come "
        "first): tokens past it are never drafted, the target supplies them (0: the whole vocabulary). 65536 "
        "holds 98% of the packaged target's benchmark tokens; 32768 (95%) lost a quarter of the accepted tokens",
    )
    prefill_chunk_tokens: int = Field(256, ge=16, description="gguf: prompt tokens per forward")
    port: int = Field(50052, description="gRPC port of the DraftService (0: pick a free one)")
    metrics_port: int = Field(
        9102, ge=-1, description="Prometheus /metrics port (0: pick a free one, -1: off)"
    )
    http_port: int = Field(
        8000, ge=-1, description="OpenAI-compatible HTTP API port (0: pick a free one, -1: off)"
    )
    http_max_streams: int = Field(
        MAX_HTTP_STREAMS,
        ge=1,
        description="HTTP API: completions (streamed or not) served at once, each on its own thread; "
        "more get HTTP 429",
    )
    http_tls_cert: Path | None = Field(
        None, description="serve the HTTP API over TLS with this certificate (PEM; default: --tls-cert)"
    )
    http_tls_key: Path | None = Field(None, description="private key of --http-tls-cert (default: --tls-key)")
    served_model_name: str = Field(
        "", description="model name in the OpenAI API (default: the draft's target model id)"
    )
    target: str = Field(
        "127.0.0.1:50051", description="target: host:port or grpc://host:port, or modal://app/Class (deploy/modal_app.py)"
    )
    target_api_key: SecretStr | None = Field(None, description="API key sent to the target")
    target_tls_ca: Path | None = Field(None, description="reach the target over TLS, trusting this CA (PEM)")
    target_tls_cert: Path | None = Field(None, description="mutual TLS: this node's client certificate")
    target_tls_key: Path | None = Field(None, description="mutual TLS: key of --target-tls-cert")
    target_tls_server_name: str = Field("", description="expected name in the target's certificate")
    proposer: Literal["hf", "vllm", "ngram"] = Field(
        "hf", description="how drafts are made: HF model, vLLM engine, or prompt lookup (n-gram, no model)"
    )
    num_candidates: int = Field(
        1, ge=1, le=MAX_CANDIDATES, description="N: candidate continuations per round (vllm, ngram)"
    )
    vllm_max_model_len: int = Field(4096, ge=64, description="vllm proposer: engine context length")
    vllm_block_size: int = Field(
        32, ge=1, description="vllm proposer: KV block size (the CPU build needs a multiple of 32)"
    )
    ngram_min: int = Field(1, ge=1, description="ngram: shortest suffix to look up")
    ngram_max: int = Field(4, ge=1, description="ngram: longest suffix to look up")
    pipeline: Literal["auto", "on", "off"] = Field(
        "auto",
        description="draft the next round while the current one is verified: on, off, or auto (both measured "
        "as rounds go, the better used: it pays when draft and target do not share cores and the link is slow)",
    )
    adaptive: bool = Field(False, description="choose K and N each round from measured goodput (else fixed)")
    k_max: int = Field(8, ge=1, le=MAX_SPECULATIVE_TOKENS, description="adaptive: largest K tried")
    num_speculative_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_SPECULATIVE_TOKENS,
        description="K: the most draft tokens a round (default: 16 with the hf proposer, whose chains end early "
        "at --min-chain-probability; 5 with vllm and ngram; measured on a 2-core CPU, see README)",
    )
    confidence_threshold: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="hf proposer: end a round's chain after a token the draft gives less than this "
        "probability (0: always K tokens)",
    )
    min_chain_probability: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="hf proposer: end a round's chain once the draft's probability of the whole chain (the "
        "product of its tokens' probabilities) is below this (0: off; 0.5: measured fastest, see README)",
    )
    draft_top_k: int = Field(
        32, ge=1, le=MAX_Q_SUPPORT, description="when sampling, the draft keeps at most this many tokens (q)"
    )
    max_tokens: int = Field(128, ge=1, description="default completion length")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest prompt text accepted")
    target_timeout_s: float = Field(120.0, gt=0, description="deadline for unary calls to the target")
    target_round_timeout_s: float = Field(
        120.0, gt=0, description="deadline for one verify round on the generation's stream"
    )
    retry_deadline_s: float = Field(30.0, ge=0, description="keep retrying an unavailable target this long")
    generation_timeout_s: float = Field(
        3600.0, gt=0, description="deadline for one generation's verify stream"
    )

    @staticmethod
    def default_k(proposer: str) -> int:
        """K when none is set: a cap for the hf proposer's early-ending chains, else every round's length."""
        return 16 if proposer == "hf" else 5

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline_from_bool(cls, value: object) -> object:
        """Earlier releases took a boolean (SPECWIRE_DRAFT_PIPELINE=true): it still means on / off."""
        if isinstance(value, bool) or str(value).lower() in ("true", "false", "1", "0"):
            return "on" if str(value).lower() in ("true", "1") else "off"
        return value

    @model_validator(mode="after")
    def _k_for_proposer(self) -> Self:
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = self.default_k(self.proposer)
        return self

    @model_validator(mode="after")
    def _http_tls(self) -> Self:
        """The HTTP API takes the node's certificate unless it has its own: Bearer keys never travel
        in clear on a node that has one."""
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("--http-tls-cert and --http-tls-key go together")
        if self.http_tls_cert is None:
            self.http_tls_cert, self.http_tls_key = self.tls_cert, self.tls_key
        return self

    @model_validator(mode="after")
    def _default_within_limit(self) -> Self:
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens {self.max_tokens} exceeds max_tokens_limit {self.max_tokens_limit}")
        return self
