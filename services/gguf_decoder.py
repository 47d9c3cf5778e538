"""A Qwen2 decoder that computes with a GGUF file's quantized weights on the CPU, over per-sequence
KV buffers, in the gpt-fast manner: one flat forward the project owns.

The rows of several sequences go through each linear layer together (the weights are read once
for all of them); attention runs per sequence over its own buffer. Every row is computed by a
sequence of operations that depends only on its own inputs and the keys it sees
(services/cpu/gguf_matmul.cpp, decoder_ops.cpp), so a verify row's logits are bitwise those of a
decode step over the same context, and a prompt's prefill gives the entries decoding it token by
token would.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from services.cpu_extension import load_extension
from services.gguf_file import DecoderSettings, GGUFFile, Tensor
from services.kv_buffer import KVBuffer
from services.sampling import top1

log = logging.getLogger(__name__)


KERNEL_SOURCES = ("gguf_matmul.cpp", "decoder_ops.cpp", "bindings.cpp")
KERNEL_FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")


@functools.cache
def kernels() -> ModuleType:
    """The CPU kernels (built for this machine's instruction sets on first use, about a minute)."""
    return load_extension("decoder", KERNEL_SOURCES, KERNEL_FLAGS, isa=True)


@dataclass(frozen=True)
class QuantLinear:
    """A linear layer's weight: the file's blocks regrouped for the kernel, and its bias."""

    weight: torch.Tensor  # uint8 [ceil(out / 16), group bytes]
    type: int
    out_features: int
    in_features: int
    bias: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, tensor: Tensor, bias: Tensor | None = None, rows: int | None = None) -> QuantLinear:
        """`rows`: only the first rows of the matrix (a draft's output head over part of the vocabulary)."""
        if not tensor.quantized:
            raise ValueError(f"{tensor.name} is {tensor.type.name}; the GGUF decoder's linears take quantized blocks")
        rows = tensor.rows if rows is None else rows
        blocks = torch.from_numpy(np.ascontiguousarray(tensor.data[:rows]))  # read only: never written
        return cls(
            kernels().gguf_repack(blocks, int(tensor.type), tensor.cols),
            int(tensor.type),
            rows,
            tensor.cols,
            None if bias is None else torch.from_numpy(bias.data.reshape(-1).copy()),
        )

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


def linears(x: torch.Tensor, layers: Sequence[QuantLinear]) -> list[torch.Tensor]:
    """x @ W^T + b for layers that share the input (x is quantized once for all of them)."""
    return kernels().gguf_linear(
        x, [m.weight for m in layers], [m.type for m in layers], [m.out_features for m in layers], [m.bias for m in layers]
    )


@dataclass
class Layer:
    attn_norm: torch.Tensor
    q: QuantLinear
    k: QuantLinear
    v: QuantLinear
    o: QuantLinear
    ffn_norm: torch.Tensor
    gate: QuantLinear
    up: QuantLinear
    down: QuantLinear


@dataclass
class Rows:
    """One sequence's new rows for a forward: tokens after the entries its buffer holds.

    `visible` [n, n] bool says which new rows each row attends to besides the buffer's entries
    (None: causal, a prompt chunk or a decode step); `positions` are the rows' RoPE positions (a
    verify tree's siblings share one). After the forward the buffer holds the new rows' entries.
    """

    cache: KVBuffer
    token_ids: Sequence[int]
    positions: Sequence[int] | None = None  # None: cache.length, cache.length + 1, ...
    visible: torch.Tensor | None = None
    all_logits: bool = True  # False: only the last row's (a prefill)


class GGUFDecoder:
    def __init__(self, file: GGUFFile, output_rows: int | None = None) -> None:
        """`output_rows`: compute the output head over the first rows of the vocabulary only (a draft's
        choice: the rest of the vocabulary gets -inf logits; None: all)."""
        start = time.perf_counter()
        self.settings: DecoderSettings = file.settings()
        s = self.settings
        if s.hidden_size % s.num_heads or s.head_dim % 16:
            raise ValueError(f"{file.path.name}: head size {s.hidden_size}/{s.num_heads} is not a multiple of 16")
        self.embedding = file.tensor("token_embd.weight")
        with warnings.catch_warnings():  # the file's memory map is read only, and so is every use of it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._embedding_blocks = torch.from_numpy(self.embedding.data)
        self.layers = [self._layer(file, i) for i in range(s.num_layers)]
        self.output_norm = self._norm(file, "output_norm.weight")
        head = file.tensor("output.weight" if file.has("output.weight") else "token_embd.weight")
        self.vocab_size = head.rows
        self.output = QuantLinear.from_tensor(head, rows=min(output_rows or head.rows, head.rows))
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        self.inv_freq = inv_freq
        log.info(
            "GGUF decoder %s: %d layers, %.0f MB of weights, ready in %.1f s",
            file.path.name,
            s.num_layers,
            self.nbytes / 1e6,
            time.perf_counter() - start,
        )

    @staticmethod
    def _norm(file: GGUFFile, name: str) -> torch.Tensor:
        return torch.from_numpy(file.tensor(name).data.reshape(-1).copy())

    def _layer(self, file: GGUFFile, i: int) -> Layer:
        def linear(name: str, bias: bool = False) -> QuantLinear:
            prefix = f"blk.{i}.{name}"
            has_bias = bias and file.has(f"{prefix}.bias")
            return QuantLinear.from_tensor(file.tensor(f"{prefix}.weight"), file.tensor(f"{prefix}.bias") if has_bias else None)

        return Layer(
            attn_norm=self._norm(file, f"blk.{i}.attn_norm.weight"),
            q=linear("attn_q", bias=True),
            k=linear("attn_k", bias=True),
            v=linear("attn_v", bias=True),
            o=linear("attn_output"),
            ffn_norm=self._norm(file, f"blk.{i}.ffn_norm.weight"),
            gate=linear("ffn_gate"),
            up=linear("ffn_up"),
            down=linear("ffn_down"),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of weights a decode step reads (the linears; the embedding is looked up by row)."""
        layers = sum(m.nbytes for layer in self.layers for m in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down))
        return layers + self.output.nbytes

    def new_cache(self) -> KVBuffer:
        s = self.settings
        return KVBuffer(s.num_layers, s.num_kv_heads, s.head_dim)

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        blocks = self._embedding_blocks
        return kernels().gguf_dequantize_rows(
            blocks, int(self.embedding.type), self.embedding.cols, torch.tensor(list(token_ids), dtype=torch.int64)
        )

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos().contiguous(), freqs.sin().contiguous()

    @torch.inference_mode()
    def forward(self, batch: Sequence[Rows]) -> list[torch.Tensor]:
        """Logits [rows, vocab] (or [1, vocab] where `all_logits` is False) per sequence, float32."""
        s, ops = self.settings, kernels()
        sizes = [len(rows.token_ids) for rows in batch]
        if not all(sizes):
            raise ValueError("every sequence of a forward needs at least one new row")
        starts = [rows.cache.length for rows in batch]
        for rows, size in zip(batch, sizes, strict=True):
            rows.cache.reserve(rows.cache.length + size)
        positions = torch.cat(
            [
                torch.arange(start, start + size) if rows.positions is None else torch.tensor(list(rows.positions))
                for rows, start, size in zip(batch, starts, sizes, strict=True)
            ]
        )
        cos, sin = self._rope_tables(positions)
        x = self.embed([t for rows in batch for t in rows.token_ids])
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        for index, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.attn_norm, s.rms_norm_eps)
            q, k, v = linears(h, (layer.q, layer.k, layer.v))
            q = q.view(-1, s.num_heads, s.head_dim)
            k = k.view(-1, s.num_kv_heads, s.head_dim)
            v = v.view(-1, s.num_kv_heads, s.head_dim)
            attended = []
            for rows, start, lo, hi in zip(batch, starts, bounds, bounds[1:], strict=False):
                k_cache, v_cache = rows.cache.layer(index)
                attended.append(
                    ops.attention_step(q[lo:hi], k[lo:hi], v[lo:hi], cos[lo:hi], sin[lo:hi], k_cache, v_cache, start, rows.visible)
                )
            attn = attended[0] if len(attended) == 1 else torch.cat(attended)
            x = x + linears(attn.view(-1, s.hidden_size), (layer.o,))[0]
            h = ops.rms_norm(x, layer.ffn_norm, s.rms_norm_eps)
            gate, up = linears(h, (layer.gate, layer.up))
            x = x + linears(ops.silu_mul(gate, up), (layer.down,))[0]
        keep = torch.cat(
            [torch.arange(lo, hi) if rows.all_logits else torch.tensor([hi - 1]) for rows, lo, hi in zip(batch, bounds, bounds[1:], strict=False)]
        )
        hidden = ops.rms_norm(x[keep] if len(keep) < len(x) else x, self.output_norm, s.rms_norm_eps)
        logits = linears(hidden, (self.output,))[0]
        if self.output.out_features < self.vocab_size:  # a draft's partial head: the rest cannot be drafted
            full = logits.new_full((len(logits), self.vocab_size), float("-inf"))
            full[:, : self.output.out_features] = logits
            logits = full
        out, offset = [], 0
        for rows, size in zip(batch, sizes, strict=True):
            rows.cache.length += size  # last: a forward that fails leaves every buffer as it was
            count = size if rows.all_logits else 1
            out.append(logits[offset : offset + count])
            offset += count
        return out


def load_gguf_decoder(path: Path, output_rows: int | None = None) -> GGUFDecoder:
    return GGUFDecoder(GGUFFile(path), output_rows)


def greedy_decode(
    decoder: GGUFDecoder,
    token_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    cache: KVBuffer | None = None,
) -> list[int]:
    """The decoder alone: prefill `token_ids` (after what `cache` already holds of them), then one
    token per forward, greedy, until `max_new_tokens` or an EOS id (not included)."""
    cache = cache if cache is not None else decoder.new_cache()
    logits = decoder.forward([Rows(cache, list(token_ids[cache.length :]), all_logits=False)])[0]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(top1(logits[-1]))
        if token in eos_ids:
            break
        out.append(token)
        if len(out) < max_new_tokens:
            logits = decoder.forward([Rows(cache, [token])])[0]
    return out
