"""The GGUF decoder and its CPU kernels: products against gguf's reference dequantization, and the
exactness the speculative loop relies on (a row's numbers do not depend on the other rows)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from services.candidate_tree import CandidateTree
from services.gguf_decoder import GGUFDecoder, QuantLinear, Rows, greedy_decode, kernels, linears
from services.gguf_file import GGUFFile, Tensor
from target_node.tree_attention import build_tree_query
from tests.tiny_gguf import quantize

Q = gguf.GGMLQuantizationType


def quant_tensor(kind: Q, rows: int, cols: int, seed: int = 0) -> Tensor:
    rng = np.random.default_rng(seed)
    return Tensor("w", kind, rows, cols, quantize(rng.standard_normal((rows, cols)).astype(np.float32), kind))


def reference(tensor: Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.type).reshape(tensor.rows, tensor.cols)).float()


@pytest.mark.parametrize(
    ("kind", "rows", "cols"),
    [(Q.Q4_K, 40, 512), (Q.Q6_K, 33, 256), (Q.Q5_0, 48, 128), (Q.Q8_0, 17, 192), (Q.Q4_0, 16, 64)],
)
def test_products_match_dequantized_weights(kind, rows, cols):
    """x @ W^T against gguf's dequantization: the only difference is x's 8-bit rounding, at most
    half a step (amax / 254 per block) per value."""
    tensor = quant_tensor(kind, rows, cols)
    layer = QuantLinear.from_tensor(tensor)
    x = torch.randn(7, cols)
    got = linears(x, [layer])[0]
    want = x @ reference(tensor).T
    block = 256 if kind in (Q.Q4_K, Q.Q6_K) else 32
    step = x.view(7, -1, block).abs().amax(-1).repeat_interleave(block, -1) / 254  # largest rounding per value
    bound = step @ reference(tensor).abs().T + 1e-4 * want.abs() + 1e-4
    assert got.shape == (7, rows)
    assert ((got - want).abs() <= bound).all()


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0])
def test_output_rows_are_bitwise_independent_of_the_other_rows(kind):
    """A verify row must equal the decode step's row exactly: 1, a few and more rows than one pass
    takes (64) give each row the same bits, and so do several weights sharing x."""
    tensor = quant_tensor(kind, 48, 256)
    layer = QuantLinear.from_tensor(tensor)
    x = torch.randn(70, 256)
    together = linears(x, [layer])[0]
    for i in (0, 5, 63, 64, 69):
        assert torch.equal(linears(x[i : i + 1], [layer])[0][0], together[i])
    assert torch.equal(linears(x[3:9], [layer])[0], together[3:9])
    pair = linears(x[:4], [layer, QuantLinear.from_tensor(quant_tensor(Q.Q4_K, 16, 256, seed=1))])
    assert torch.equal(pair[0], together[:4])


def test_embedding_rows_dequantize_exactly():
    for kind in (Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0):
        tensor = quant_tensor(kind, 20, 256)
        ids = torch.tensor([0, 7, 19, 7])
        rows = kernels().gguf_dequantize_rows(torch.from_numpy(tensor.data), int(kind), 256, ids)
        assert torch.equal(rows, reference(tensor)[ids])


def test_unsupported_shapes_get_clear_errors():
    tensor = quant_tensor(Q.Q4_K, 16, 256)
    layer = QuantLinear.from_tensor(tensor)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels().gguf_linear(torch.randn(2, 256), [layer.weight], [int(Q.Q4_K)], [32], [None])
    with pytest.raises(RuntimeError, match="not supported"):
        kernels().gguf_repack(torch.zeros(4, 10, dtype=torch.uint8), 3, 32)  # Q4_1


@pytest.fixture(scope="module", params=["target", "draft_small"])
def decoder(request, tiny_gguf) -> GGUFDecoder:
    return GGUFDecoder(GGUFFile(Path(getattr(tiny_gguf, request.param))))


PROMPT = [5, 80, 33, 120, 7, 250, 11, 42, 9, 300]


def test_prefill_rows_equal_decoding_token_by_token(decoder):
    """The prompt prefill is a many-row forward; its logits (and so its cache entries) equal one
    decode step per token, bitwise; so do prefills in chunks."""
    whole = decoder.forward([Rows(decoder.new_cache(), PROMPT)])[0]
    cache = decoder.new_cache()
    steps = torch.cat([decoder.forward([Rows(cache, [t])])[0] for t in PROMPT])
    assert torch.equal(whole, steps)
    chunked = decoder.new_cache()
    parts = [decoder.forward([Rows(chunked, PROMPT[a:b])])[0] for a, b in ((0, 3), (3, 4), (4, 10))]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(chunked.data[:, :, :, :10], cache.data[:, :, :, :10])


def test_tree_rows_equal_decode_steps_of_each_branch(decoder):
    """Verify rows over a branching trie: each node's logits are bitwise those of decoding its own
    branch after the prompt (siblings share a position and never see each other)."""
    tree = CandidateTree.from_sequences([[4, 9, 13], [4, 17], [21, 3]])
    prefix = decoder.new_cache()
    decoder.forward([Rows(prefix, PROMPT[:-1])])
    query = build_tree_query(PROMPT[-1], tree, prefix.length)
    verify = decoder.forward([Rows(prefix.copy(), query.token_ids, query.positions, query.visible)])[0]
    for node in range(len(tree)):
        branch = [tree.token_ids[n] for n in tree.path_to(node)]
        alone = prefix.copy()
        steps = [decoder.forward([Rows(alone, [t])])[0] for t in [PROMPT[-1], *branch]]
        assert torch.equal(verify[1 + node], steps[-1][0]), node
    alone = prefix.copy()
    assert torch.equal(verify[0], decoder.forward([Rows(alone, [PROMPT[-1]])])[0][0])


def test_sequences_batched_in_one_forward_equal_each_alone(decoder):
    caches = [decoder.new_cache() for _ in range(3)]
    decoder.forward([Rows(caches[0], PROMPT[:4]), Rows(caches[1], PROMPT[2:9])])
    batched = decoder.forward(
        [Rows(caches[0], [1, 2]), Rows(caches[1], [3]), Rows(caches[2], PROMPT, all_logits=False)]
    )
    alone = [decoder.new_cache() for _ in range(3)]
    decoder.forward([Rows(alone[0], PROMPT[:4])])
    decoder.forward([Rows(alone[1], PROMPT[2:9])])
    assert torch.equal(batched[0], decoder.forward([Rows(alone[0], [1, 2])])[0])
    assert torch.equal(batched[1], decoder.forward([Rows(alone[1], [3])])[0])
    assert torch.equal(batched[2], decoder.forward([Rows(alone[2], PROMPT, all_logits=False)])[0])
    assert batched[2].shape[0] == 1


def test_a_batched_forward_writes_each_session_in_place_and_touches_no_other(decoder):
    """No per-round copies: each session's buffer is written where it lies (same storage), holds
    exactly what it holds alone, and the entries it held before are untouched by the others."""
    caches = [decoder.new_cache() for _ in range(3)]
    for cache, start in zip(caches, (0, 2, 5), strict=True):
        decoder.forward([Rows(cache, PROMPT[start : start + 4])])
    before = [(cache.data.data_ptr(), cache.data[:, :, :, :4].clone()) for cache in caches]
    decoder.forward([Rows(caches[0], [1, 2]), Rows(caches[1], [3]), Rows(caches[2], [4, 5, 6])])
    for cache, (pointer, held), start, new in zip(caches, before, (0, 2, 5), ([1, 2], [3], [4, 5, 6]), strict=True):
        assert cache.data.data_ptr() == pointer  # written in place, never copied
        assert torch.equal(cache.data[:, :, :, :4], held)  # its earlier entries untouched
        alone = decoder.new_cache()
        decoder.forward([Rows(alone, PROMPT[start : start + 4])])
        decoder.forward([Rows(alone, new)])
        assert cache.length == alone.length
        assert torch.equal(cache.data[:, :, :, : cache.length], alone.data[:, :, :, : alone.length])


def test_compaction_keeps_the_accepted_path(decoder):
    """After a round, the buffer holds prefix + pending + accepted nodes as if decoded alone."""
    tree = CandidateTree.from_sequences([[4, 9], [21, 3, 8]])
    cache = decoder.new_cache()
    decoder.forward([Rows(cache, PROMPT[:-1])])
    query = build_tree_query(PROMPT[-1], tree, cache.length)
    decoder.forward([Rows(cache, query.token_ids, query.positions, query.visible)])
    accepted = tree.path_to(4)  # the second branch, whole
    cache.compact(len(PROMPT), [len(PROMPT) + node for node in accepted])
    alone = decoder.new_cache()
    decoder.forward([Rows(alone, PROMPT + [21, 3, 8])])
    assert cache.length == alone.length
    assert torch.equal(cache.data[:, :, :, : cache.length], alone.data[:, :, :, : alone.length])


def test_forward_agrees_with_transformers_on_the_dequantized_model(tiny_gguf):
    """transformers loads the same file dequantized to float32: the logits differ by the 8-bit
    activations only."""
    from transformers import AutoModelForCausalLM

    path = Path(tiny_gguf.target)
    decoder = GGUFDecoder(GGUFFile(path))
    ours = decoder.forward([Rows(decoder.new_cache(), PROMPT)])[0]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(torch.tensor([PROMPT])).logits[0]
    assert (torch.nn.functional.cosine_similarity(ours, theirs, dim=-1) > 0.98).all()
    top = theirs.topk(2, dim=-1)
    clear = (top.values[:, 0] - top.values[:, 1]) > 2 * (ours - theirs).abs().amax(-1)  # no tie within the error
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


def test_greedy_decode_stops_at_eos_and_length(decoder):
    tokens = greedy_decode(decoder, PROMPT, 12)
    assert len(tokens) == 12
    eos = tokens[3]
    cut = greedy_decode(decoder, PROMPT, 12, eos_ids=[eos])
    assert cut == tokens[: tokens.index(eos)]
