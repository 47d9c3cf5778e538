"""Shared base for the per-node pydantic settings: env vars with a prefix, CLI flags in kebab case."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Here rather than in model_loading: a health check imports the configs and must not import torch.
DEFAULT_CACHE_DIR = Path(os.environ.get("SPECWIRE_CACHE_DIR", Path.home() / ".cache" / "specwire"))


class NodeConfig(BaseSettings):
    """Settings common to both nodes. Subclasses set `env_prefix`; CLI flags beat env vars."""

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True, extra="forbid")

    model: str = Field(description="HF model dir, .gguf file, or packaged model name")
    dtype: str = Field("float32", description="float32 | bfloat16 | float16")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the model runs: auto (the first CUDA GPU if torch sees one, else the CPU), cpu, cuda[:N]",
    )
    host: str = Field("127.0.0.1", description="interface the gRPC server binds")
    port: int = Field(description="gRPC port (0: pick a free one)")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="where assembled/dequantized weights are cached")
    metrics_port: int = Field(description="Prometheus /metrics port (0: pick a free one, -1: off)", ge=-1)
    workers: int = Field(
        16, ge=1, description="draft: gRPC server threads (concurrent calls); target: threads for prefills and "
        "closes (rounds get their own, --max-queued-rounds)"
    )
    threads: int = Field(
        0, ge=0, description="torch compute threads of a node process (0: torch's default, one per core)"
    )
    small_row_linear: str = Field(
        "auto",
        pattern=r"^(auto|\d+)$",
        description="CPU: weight-stationary linears up to this many rows per forward (auto: measured at "
        "start-up; 0: off, stock F.linear)",
    )
    prefix_cache_mb: float = Field(
        256.0,
        ge=0,
        description="hf models: KV entries of recent prompts kept, so a prompt that starts like an earlier one "
        "prefills only the rest (0: off)",
    )
    log_level: str = Field("INFO", description="python logging level")
    tls_cert: Path | None = Field(None, description="serve gRPC over TLS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="private key of --tls-cert (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="mutual TLS: require client certificates signed by this CA (PEM)"
    )
    api_keys_file: Path | None = Field(
        None, description="require an API key from this file (one per line) on every gRPC call but health"
    )

    @model_validator(mode="after")
    def _tls_pairs(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    @classmethod
    def from_cli(cls, argv: Sequence[str], prog: str) -> Self:
        """Parse CLI flags (falling back to env vars, then defaults)."""
        return cls(_cli_parse_args=list(argv), _cli_prog_name=prog)
