"""Tiny Qwen2 GGUF files for tests: the tiny HF models' weights quantized into the block types of the
packaged models (Q4_K / Q6_K like the 1.5B target, Q5_0 / Q8_0 like the 0.5B draft), with the
tokenizer embedded as llama.cpp's converter writes it.

gguf's Python package quantizes Q4_0/Q5_0/Q8_0 but not the K-quants; `quantize_q4_k` and
`quantize_q6_k` are plain min/max quantizers (valid blocks, not llama.cpp's error-minimising
search): the tests compare against `gguf.quants.dequantize` of whatever blocks they hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

Q = gguf.GGMLQuantizationType


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 144] uint8 Q4_K blocks."""
    n, k = x.shape
    sub = x.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 15
    mins = -lo
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum(mins.max(-1), 1e-8) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / d16.astype(np.float32)[..., None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / dmin16.astype(np.float32)[..., None]), 0, 63).astype(np.uint8)
    step = d16.astype(np.float32)[..., None] * sc
    q = np.clip(np.round((sub + (dmin16.astype(np.float32)[..., None] * mn)[..., None]) / step[..., None]), 0, 15)
    q = q.astype(np.uint8).reshape(n, k // 256, 256)
    scales = np.zeros((n, k // 256, 12), np.uint8)
    scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    qs = np.zeros((n, k // 256, 128), np.uint8)
    for p in range(4):
        qs[..., 32 * p : 32 * p + 32] = q[..., 64 * p : 64 * p + 32] | (q[..., 64 * p + 32 : 64 * p + 64] << 4)
    out = np.concatenate(
        [d16[..., None].view(np.uint8), dmin16[..., None].view(np.uint8), scales, qs], axis=-1
    )
    return out.reshape(n, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 210] uint8 Q6_K blocks."""
    n, k = x.shape
    sub = x.reshape(n, k // 256, 16, 16).astype(np.float32)
    scale = np.abs(sub).max(-1) / 31
    d16 = (np.maximum(np.abs(scale).max(-1), 1e-8) / 127).astype(np.float16)
    sc = np.clip(np.round(scale / d16.astype(np.float32)[..., None]), 1, 127).astype(np.int8)
    step = d16.astype(np.float32)[..., None] * sc
    q = (np.clip(np.round(sub / step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(n, k // 256, 256)
    ql = np.zeros((n, k // 256, 128), np.uint8)
    qh = np.zeros((n, k // 256, 64), np.uint8)
    for h in range(2):
        q1, q2, q3, q4 = (q[..., 128 * h + 32 * i : 128 * h + 32 * i + 32] for i in range(4))
        ql[..., 64 * h : 64 * h + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
        ql[..., 64 * h + 32 : 64 * h + 64] = (q2 & 0xF) | ((q4 & 0xF) << 4)
        qh[..., 32 * h : 32 * h + 32] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16[..., None].view(np.uint8)], axis=-1)
    return out.reshape(n, -1)


def quantize(x: np.ndarray, kind: Q) -> np.ndarray:
    if kind == Q.Q4_K:
        return quantize_q4_k(x)
    if kind == Q.Q6_K:
        return quantize_q6_k(x)
    return gguf.quants.quantize(x.astype(np.float32), kind)


TARGET_TYPES = {"default": Q.Q4_K, "attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K, "token_embd": Q.Q4_K}
DRAFT_TYPES = {"default": Q.Q5_0, "attn_v": Q.Q8_0, "ffn_down": Q.Q6_K, "output": Q.Q8_0, "token_embd": Q.Q5_0}


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.pad_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def build_gguf(
    path: Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    layers: int = 2,
    types: dict[str, Q] = TARGET_TYPES,
    perturb_from: Path | None = None,
    noise: float = 0.0,
) -> Path:
    """A Qwen2 GGUF with random weights (large init: logits far from ties). With `perturb_from` (a
    GGUF this builds), its weights plus noise: a draft that agrees with that target often."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        initializer_range=0.3,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    weights = {k: v.float().numpy() for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    if perturb_from is not None:
        reader = gguf.GGUFReader(perturb_from)
        base = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1) for t in reader.tensors}
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    _tokenizer_metadata(writer, tokenizer)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    rng = np.random.default_rng(seed)
    for hf_name, value in weights.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{parts[module]}.{kind}"
        if perturb_from is not None:
            value = base[name].reshape(value.shape)
            value = value + rng.standard_normal(value.shape).astype(np.float32) * noise * value.std()
        if value.ndim == 1:
            writer.add_tensor(name, value.astype(np.float32))
            continue
        short = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        kind = types.get(short, types["default"])
        writer.add_tensor(name, quantize(value.astype(np.float32), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
