"""A GGUF model file as the decoder reads it: its settings, its tensors (the file's quantized blocks,
memory-mapped, never dequantized as a whole) and its tokenizer (converted once, then cached)."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
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


_VALUE = gguf.GGUFValueType
# GGUF metadata value types: struct format of a scalar, numpy type of an array's items (little-endian)
_SCALAR_FORMATS = {
    _VALUE.UINT8: "<B", _VALUE.INT8: "<b", _VALUE.UINT16: "<H", _VALUE.INT16: "<h", _VALUE.UINT32: "<I",
    _VALUE.INT32: "<i", _VALUE.FLOAT32: "<f", _VALUE.UINT64: "<Q", _VALUE.INT64: "<q", _VALUE.FLOAT64: "<d",
    _VALUE.BOOL: "<?",
}  # fmt: skip
_ARRAY_TYPES = {
    _VALUE.UINT8: np.uint8, _VALUE.INT8: np.int8, _VALUE.UINT16: np.uint16, _VALUE.INT16: np.int16,
    _VALUE.UINT32: np.uint32, _VALUE.INT32: np.int32, _VALUE.FLOAT32: np.float32, _VALUE.UINT64: np.uint64,
    _VALUE.INT64: np.int64, _VALUE.FLOAT64: np.float64, _VALUE.BOOL: np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the file's tensor table."""

    type: gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF's order: the row length first
    offset: int  # of the first byte, from the start of the file


class _Header:
    """Reads a GGUF file's header (versions 2 and 3, little-endian) straight from its memory map:
    the metadata as Python values (what gguf's `ReaderField.contents()` gives, arrays of arrays kept
    nested) and the tensor table. gguf's GGUFReader builds numpy views of every element of every
    array, 10-15 s for the 151k-token vocabularies of the packaged models; this takes under a second."""

    def __init__(self, data: np.ndarray, name: str) -> None:
        self.buffer, self.name, self.offset = memoryview(data), name, 0

    def scalar(self, fmt: str) -> int | float | bool:
        try:
            (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error as exc:
            raise ValueError(f"{self.name}: the GGUF header ends early (truncated file?)") from exc
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = int(self.scalar("<Q"))
        if self.offset + size > len(self.buffer):
            raise ValueError(f"{self.name}: the GGUF header ends early (truncated file?)")
        text = str(self.buffer[self.offset : self.offset + size], "utf-8")
        self.offset += size
        return text

    def value(self, raw_type: int) -> object:
        kind = _VALUE(raw_type)
        if kind == _VALUE.STRING:
            return self.string()
        if kind in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[kind])
        if kind != _VALUE.ARRAY:
            raise ValueError(f"{self.name}: unknown GGUF value type {raw_type}")
        item_type, count = _VALUE(self.scalar("<I")), int(self.scalar("<Q"))
        if item_type not in _ARRAY_TYPES:  # strings, nested arrays: item by item
            return [self.value(item_type) for _ in range(count)]
        items = np.frombuffer(self.buffer, _ARRAY_TYPES[item_type], count, self.offset)
        self.offset += items.nbytes
        return items.tolist()

    def read(self) -> tuple[dict[str, object], dict[str, TensorInfo]]:
        magic, version = self.scalar("<I"), self.scalar("<I")
        if magic != gguf.GGUF_MAGIC:
            raise ValueError(f"{self.name}: not a GGUF file")
        if version not in (2, 3):
            raise ValueError(
                f"{self.name}: GGUF version {version} (a big-endian file?); versions 2 and 3 are read"
            )
        tensor_count, field_count = self.scalar("<Q"), self.scalar("<Q")
        fields: dict[str, object] = {}
        for _ in range(field_count):
            key = self.string()
            fields[key] = self.value(self.scalar("<I"))
        table = []
        for _ in range(tensor_count):
            name = self.string()
            dims = tuple(int(self.scalar("<Q")) for _ in range(self.scalar("<I")))
            table.append((name, gguf.GGMLQuantizationType(self.scalar("<I")), dims, int(self.scalar("<Q"))))
        alignment = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.name}: alignment {alignment} is not a power of two")
        start = self.offset + -self.offset % alignment
        return fields, {name: TensorInfo(kind, dims, start + offset) for name, kind, dims, offset in table}


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data = np.memmap(self.path, mode="r")
        self.fields, self.tensors = _Header(self.data, self.path.name).read()
        self.architecture = self._field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: architecture {self.architecture!r} is not supported by the GGUF decoder "
                f"({', '.join(ARCHITECTURES)} are); run it with --weights fp32"
            )

    def _field(self, key: str, default: object = None) -> object:
        value = self.fields.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{self.path.name}: metadata {key!r} missing")
            return default
        return value

    def settings(self) -> DecoderSettings:
        arch = self.architecture
        heads = int(self._field(f"{arch}.attention.head_count"))
        embedding = self.tensors["token_embd.weight"]
        return DecoderSettings(
            vocab_size=int(embedding.dims[1]),
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
        cols = t.dims[0]
        rows = int(np.prod(t.dims[1:])) if len(t.dims) > 1 else 1
        floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        if t.type not in QUANTIZED_TYPES and t.type not in floats:
            raise ValueError(
                f"{self.path.name}: tensor {name} is {t.type.name}; the GGUF decoder computes with "
                f"{', '.join(sorted(q.name for q in QUANTIZED_TYPES))} (run this model with --weights fp32)"
            )
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.type]
        end = t.offset + rows * cols // block * block_bytes
        if end > len(self.data):
            raise ValueError(f"{self.path.name}: tensor {name} ends past the end of the file (truncated?)")
        raw = np.asarray(self.data[t.offset : end])  # memory-mapped, read only
        if t.type in QUANTIZED_TYPES:
            data = raw.reshape(rows, -1)
        else:
            data = np.asarray(raw.view(floats[t.type]), dtype=np.float32).reshape(rows, cols)
        return Tensor(name, t.type, rows, cols, data)

    def eos_token_ids(self) -> set[int]:
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
        return {int(eos)} if eos is not None else set()

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
