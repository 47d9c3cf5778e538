"""Target node settings: env vars SPECWIRE_TARGET_* or `specwire target --flag`."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.config import NodeConfig
from services.limits import MEMORY_BUDGET_FRACTION


class TargetConfig(NodeConfig):
    model_config = SettingsConfigDict(env_prefix="SPECWIRE_TARGET_")

    model: str = Field("qwen2.5-coder-1.5b-instruct", description="target model")
    port: int = Field(50051, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(
        9101, ge=-1, description="Prometheus /metrics port (0: pick a free one, -1: off)"
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: tree attention, every strategy (GGUF or transformers weights, --weights); "
        "vllm: vLLM engine, greedy only"
    )
    weights: Literal["auto", "gguf", "fp32"] = Field(
        "auto",
        description="gguf: compute with the GGUF file's quantized blocks (CPU kernels: a quarter to a sixth of "
        "fp32's bytes per token); fp32: dequantize once into a transformers model in --dtype; auto: gguf for a "
        "GGUF model on a CPU, else fp32",
    )
    prefill_chunk_tokens: int = Field(
        256, ge=16, description="gguf: prompt tokens per forward; longer prompts take turns with other sessions' rounds"
    )
    kernels: Literal["auto", "cuda", "triton", "torch"] = Field(
        "auto",
        description="verify kernels (hf backend): auto tries cuda, then triton, then the torch reference; "
        "also read from SPECWIRE_KERNELS",
    )
    vllm_block_size: int = Field(
        32, ge=1, description="vllm: KV block size (the CPU build needs a multiple of 32)"
    )
    max_sessions: int = Field(64, ge=1, description="concurrent sessions (KV caches) held")
    kv_cache_budget_mb: float = Field(
        -1,
        ge=-1,
        description="memory for session KV caches and the prefix cache together: past it the prefix cache, then "
        "idle sessions (least recently used first) give way, and a new session that still does not fit is "
        f"refused with RESOURCE_EXHAUSTED before its prefill (-1: {MEMORY_BUDGET_FRACTION:.0%} of the memory "
        "available at start-up after the model loaded: MemAvailable, or the GPU's free memory; 0: off)",
    )
    session_ttl_s: float = Field(300.0, gt=0, description="idle sessions are closed after this long")
    max_queued_rounds: int = Field(
        128, ge=1, description="verify rounds in flight at once (running or waiting for a batch); past it a round "
        "is refused with RESOURCE_EXHAUSTED and a retry hint, which the draft honours"
    )
    draft_advice: bool = Field(
        True, description="under load, advise each round's draft length (no cap, 2, or 0: plain decoding rounds), "
        "whichever measured the most tokens a second in total at this load; off: drafts choose alone"
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="a VerifyStream with no round for this long is ended (its session stays)"
    )
    max_prompt_tokens: int = Field(4096, ge=1, description="longest prompt a session may prefill")
    max_context_tokens: int = Field(
        0, ge=0, description="prompt + generated per session (0: the model's limit)"
    )
    max_tree_nodes: int = Field(64, ge=1, description="candidate trie nodes per verify round")
    max_batch_size: int = Field(
        32, ge=1, description="verify rounds (and prompt chunks) of different sessions run in one forward"
    )
    batch_wait_ms: float = Field(
        2.0, ge=0, description="fp32 weights: how long a verify waits for others to batch with (gguf: only for rounds due back within half a forward, measured)"
    )
    pad_verify_rows: int = Field(
        1,
        ge=1,
        description="pad verify forwards to at least this many tokens (1: no padding; stock CPU BLAS ran "
        "2-3 rows slower than 4, the weight-stationary linears do not)",
    )

    @model_validator(mode="before")
    @classmethod
    def _kernels_from_short_env(cls, data: Any) -> Any:  # noqa: ANN401
        """SPECWIRE_KERNELS is the documented switch; flags and SPECWIRE_TARGET_KERNELS still win."""
        if isinstance(data, dict) and "kernels" not in data and os.environ.get("SPECWIRE_KERNELS"):
            return {**data, "kernels": os.environ["SPECWIRE_KERNELS"]}
        return data
