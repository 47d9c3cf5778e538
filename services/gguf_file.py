"""A GGUF model file as the decoder reads it: its settings, its tensors (the file's quantized blocks,
memory-mapped, never dequantized as a whole) and its tokenizer (converted once, then cached)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Block types the CPU kernels compute with (services/cpu/gguf_matmul.cpp), by ggml type id.
QUANTIZED_TYPES = {
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q5_0,
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q6_K,
}
ARCHITECTURES = ("qwen2",)  # rotate-half RoPE, q/k/v biases: the packaged Qwen2.5-Coder models


@dataclass(frozen=True)
class DecoderSettings:
    """The shape of a Qwen2-family decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_context: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: `data` is [rows, row bytes] uint8 (quantized) or [rows, cols] float32."""

    name: str
    type: gguf.GGMLQuantizationType
    rows: int  # out_features of a linear weight (GGUF's second dimension)
    cols: int  # in_features
    data: np.ndarray

    @property
    def quantized(self) -> bool:
        return self.type in QUANTIZED_TYPES


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.reader = gguf.GGUFReader(self.path)
        self.architecture = self._field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: architecture {self.architecture!r} is not supported by the GGUF decoder "
                f"({', '.join(ARCHITECTURES)} are); run it with --weights fp32"
            )
        self.tensors = {t.name: t for t in self.reader.tensors}

    def _field(self, key: str, default: object = None) -> object:
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise ValueError(f"{self.path.name}: metadata {key!r} missing")
            return default
        return field.contents()

    def settings(self) -> DecoderSettings:
        arch = self.architecture
        heads = int(self._field(f"{arch}.attention.head_count"))
        embedding = self.tensors["token_embd.weight"]
        return DecoderSettings(
            vocab_size=int(embedding.shape[1]),
            hidden_size=int(self._field(f"{arch}.embedding_length")),
            num_layers=int(self._field(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", heads)),
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            max_context=int(self._field(f"{arch}.context_length")),
        )

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"{self.path.name}: tensor {name!r} missing")
        cols = int(t.shape[0])
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        if t.tensor_type in QUANTIZED_TYPES:
            data = np.asarray(t.data).reshape(rows, -1)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.asarray(t.data, dtype=np.float32).reshape(rows, cols)
        else:
            raise ValueError(
                f"{self.path.name}: tensor {name} is {t.tensor_type.name}; the GGUF decoder computes with "
                f"{', '.join(sorted(q.name for q in QUANTIZED_TYPES))} (run this model with --weights fp32)"
            )
        return Tensor(name, t.tensor_type, rows, cols, data)

    def eos_token_ids(self) -> set[int]:
        eos = self.reader.fields.get("tokenizer.ggml.eos_token_id")
        return {int(eos.contents())} if eos is not None else set()

    def tokenizer(self, cache_dir: Path) -> PreTrainedTokenizerBase:
        """The tokenizer embedded in the file, converted by transformers the first time (about 15 s
        for Qwen's vocabulary) and read from `cache_dir` afterwards."""
        stat = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir / "tokenizers" / f"{self.path.stem}-{key}"
        if (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cached)
        log.info("converting the tokenizer of %s (once)", self.path.name)
        tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
        return tokenizer
