"""Shared base for the per-node pydantic settings: env vars with a prefix, CLI flags in kebab case."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.model_loading import DEFAULT_CACHE_DIR


class NodeConfig(BaseSettings):
    """Settings common to both nodes. Subclasses set `env_prefix`; CLI flags beat env vars."""

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True, extra="forbid")

    model: str = Field(description="HF model dir, .gguf file, or packaged model name")
    dtype: str = Field("float32", description="float32 | bfloat16 | float16")
    host: str = Field("127.0.0.1", description="interface the gRPC server binds")
    port: int = Field(description="gRPC port (0: pick a free one)")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="where assembled/dequantized weights are cached")
    metrics_port: int = Field(description="Prometheus /metrics port (0: pick a free one, -1: off)", ge=-1)
    workers: int = Field(16, ge=1, description="gRPC server threads (concurrent calls)")
    log_level: str = Field("INFO", description="python logging level")

    @classmethod
    def from_cli(cls, argv: Sequence[str], prog: str) -> Self:
        """Parse CLI flags (falling back to env vars, then defaults)."""
        return cls(_cli_parse_args=list(argv), _cli_prog_name=prog)
