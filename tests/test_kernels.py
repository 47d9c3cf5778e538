"""Verify kernels: Triton (TRITON_INTERPRET=1 on the CPU) and CUDA (GPU only) equal the torch
reference exactly on integers; the reference matches a brute-force definition; sources compile
for sm_90 without a GPU (Triton to cubin, CUDA with nvcc -c)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import tests.test_verifier as verifier_tests
from services.candidate_tree import ROOT, CandidateTree, SparseProbs
from services.model_loading import load_model
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.kernels import TorchKernels, load_kernels, pack_draft_q, pack_trees
from target_node.kernels.cuda_ext import CUDA_DIR

REFERENCE = TorchKernels()
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module", params=["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernels(request):
    if request.param == "cuda":
        yield load_kernels("cuda", "cuda")
        return
    yield load_kernels("triton", "cuda" if HAS_CUDA else "cpu")  # CPU: conftest set TRITON_INTERPRET=1


def random_tree(rng: random.Random, size: int, vocab: int, chain_bias: float = 0.6) -> CandidateTree:
    """A trie with distinct sibling tokens; deep chains are likely (most nodes extend the newest)."""
    tree = CandidateTree()
    for node in range(size):
        parent = node - 1 if node and rng.random() < chain_bias else rng.randint(ROOT, node - 1)
        taken = {t for p, t in zip(tree.parents, tree.token_ids, strict=True) if p == parent}
        token = rng.choice([t for t in range(vocab) if t not in taken][:64])
        tree.parents.append(parent)
        tree.token_ids.append(token)
    return tree


def plant_acceptance(logits: torch.Tensor, tree: CandidateTree, rng: random.Random, rate: float) -> None:
    """Make node tokens their parent row's argmax with probability `rate`."""
    for node, (parent, token) in enumerate(zip(tree.parents, tree.token_ids, strict=True)):
        if rng.random() < rate:
            logits[parent + 1, token] = 50.0 + node


SIZES = [[1], [0, 3], [5, 1, 9], [16], [40, 7]]


@pytest.mark.parametrize("vocab", [1000, 1500])
@pytest.mark.parametrize("sizes", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("rate", [0.0, 0.7, 1.0])
def test_greedy_verify_equals_reference(kernels, device, vocab, sizes, rate):
    rng = random.Random(hash((vocab, tuple(sizes), rate)) % 1000)
    trees = [random_tree(rng, n, vocab) for n in sizes]
    batch = pack_trees(trees)
    gen = torch.Generator().manual_seed(len(sizes))
    logits = torch.randn(len(trees), batch.parents.shape[1] + 1, vocab, generator=gen)
    for b, tree in enumerate(trees):
        plant_acceptance(logits[b], tree, rng, rate)
    want = REFERENCE.tree_greedy_verify(logits, batch)
    got = kernels.tree_greedy_verify(logits.to(device), pack_trees(trees, device))
    for field in ("target_argmax", "node_accepted", "path_end", "path_length"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field


def test_greedy_ties_go_to_the_lowest_node(kernels, device):
    """Duplicate siblings (a trie the draft did not merge) accept equally: the first one wins."""
    tree = CandidateTree([ROOT, ROOT, 0, 1], [5, 5, 7, 7])
    logits = torch.zeros(1, 5, 1100)
    logits[0, 0, 5] = logits[0, 1, 7] = logits[0, 2, 7] = 1.0
    for k in (REFERENCE, kernels):
        result = k.tree_greedy_verify(logits.to(device), pack_trees([tree], device))
        assert (int(result.path_end[0]), int(result.path_length[0])) == (2, 2)


def brute_force_greedy(logits: torch.Tensor, tree: CandidateTree) -> tuple[int, int]:
    argmax = logits.argmax(-1).tolist()
    best, best_length = ROOT, 0
    for node in range(len(tree)):
        path = tree.path_to(node)
        if all(tree.token_ids[n] == argmax[tree.parents[n] + 1] for n in path) and len(path) > best_length:
            best, best_length = node, len(path)
    return best, best_length


def test_greedy_reference_matches_brute_force():
    rng = random.Random(0)
    for case in range(200):
        tree = random_tree(rng, rng.randint(0, 30), 50)
        logits = torch.randn(len(tree) + 1, 50, generator=torch.Generator().manual_seed(case))
        plant_acceptance(logits, tree, rng, rng.random())
        result = REFERENCE.tree_greedy_verify(logits[None], pack_trees([tree]))
        assert (int(result.path_end[0]), int(result.path_length[0])) == brute_force_greedy(logits, tree)


def random_q(rng: random.Random, tree: CandidateTree, vocab: int, point_mass: bool) -> CandidateTree:
    """Sparse q per node that puts mass on the node's token and none on earlier siblings' tokens."""
    if point_mass:
        return tree
    for node, token in enumerate(tree.token_ids):
        earlier = {t for n, t in enumerate(tree.token_ids[:node]) if tree.parents[n] == tree.parents[node]}
        others = rng.sample([t for t in range(vocab) if t not in earlier and t != token], rng.randint(0, 6))
        weights = [rng.random() + 0.05 for _ in range(len(others) + 1)]
        total = sum(weights) * rng.uniform(1.0, 1.3)  # some q leave mass out (truncated drafts)
        tree.draft_probs.append(SparseProbs([token, *others], [w / total for w in weights]))
    return tree


@pytest.mark.parametrize("vocab", [1000, 1500])
@pytest.mark.parametrize("sizes", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("uniforms", ["random", "accept-all", "reject-all"])
@pytest.mark.parametrize("point_mass", [False, True], ids=["sparse-q", "point-mass"])
def test_rejection_sample_equals_reference(kernels, device, vocab, sizes, uniforms, point_mass):
    rng = random.Random(hash((vocab, tuple(sizes), uniforms, point_mass)) % 1000)
    trees = [random_q(rng, random_tree(rng, n, vocab), vocab, point_mass) for n in sizes]
    batch, draft_q = pack_trees(trees), pack_draft_q(trees)
    gen = torch.Generator().manual_seed(len(sizes) + vocab)
    probs = (torch.randn(len(trees), batch.parents.shape[1] + 1, vocab, generator=gen) * 3).softmax(-1)
    for b, tree in enumerate(trees):  # give drafted tokens real target mass so paths go deep
        for parent, token in zip(tree.parents, tree.token_ids, strict=True):
            probs[b, parent + 1, token] += rng.random()
    probs /= probs.sum(-1, keepdim=True)
    accept_u = torch.rand(batch.parents.shape, generator=gen)
    if uniforms != "random":
        accept_u.fill_(0.0 if uniforms == "accept-all" else 0.999999)
    sample_u = torch.rand(len(trees), generator=gen)
    want = REFERENCE.tree_rejection_sample(probs, batch, draft_q, accept_u, sample_u)
    got = kernels.tree_rejection_sample(
        probs.to(device),
        pack_trees(trees, device),
        pack_draft_q(trees, device),
        accept_u.to(device),
        sample_u.to(device),
    )
    for field in ("path_end", "path_length", "next_token"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field
    if uniforms == "accept-all":  # u = 0 accepts the first child at every step, down to a leaf
        assert want.path_end.tolist() == [(t.leading_path() or [ROOT])[-1] for t in trees]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 48])
def test_compact_kv_equals_reference(kernels, device, dtype, head_dim):
    rng = random.Random(head_dim)
    for case in range(6):
        seq, dst = 40, rng.randint(0, 20)
        nodes = sorted(rng.sample(range(seq - dst), rng.randint(0, min(8, seq - dst))))
        src = torch.tensor([dst + n for n in nodes], dtype=torch.int32)
        gen = torch.Generator().manual_seed(case)
        tensors = [torch.randn(1, 2, seq, head_dim, generator=gen).to(dtype) for _ in range(6)]
        moved = [t.clone().to(device) for t in tensors]
        REFERENCE.compact_kv(tensors, src, dst)
        kernels.compact_kv(moved, src.to(device), dst)
        for want, got in zip(tensors, moved, strict=True):
            assert torch.equal(got.cpu(), want)


def test_compact_kv_rejects_mixed_tensors(kernels, device):
    tensors = [torch.zeros(1, 2, 8, 32, device=device), torch.zeros(1, 2, 8, 16, device=device)]
    with pytest.raises(ValueError, match="one shape"):
        kernels.compact_kv(tensors, torch.tensor([3], dtype=torch.int32, device=device), 1)


def test_registry_picks_and_refuses(monkeypatch):
    assert load_kernels("auto", "cpu").name == "torch"  # never the (slow) interpreter unless forced
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert load_kernels("torch", "cuda" if HAS_CUDA else "cpu").name == "torch"
    with pytest.raises(RuntimeError, match="kernels=cuda requested but unavailable"):
        load_kernels("cuda", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        load_kernels("triton", "cpu")
    with pytest.raises(ValueError, match="unknown kernels"):
        load_kernels("fast", "cpu")
    monkeypatch.setenv("SPECWIRE_KERNELS", "triton")
    assert TargetConfig(model="m").kernels == "triton"
    assert TargetConfig(model="m", kernels="torch").kernels == "torch"


@pytest.fixture(scope="module")
def device_target(tiny, device):
    """The tiny target where Triton compiles for real (the GPU) or is interpreted (the CPU)."""
    return load_model(tiny.target, device=device)


@pytest.fixture(scope="module")
def triton_verifier(device_target):
    verifier = build_verifier(
        TargetConfig(model="tiny", kernels="triton", max_tree_nodes=32, max_context_tokens=200), device_target
    )
    yield verifier
    verifier.backend.stop()


def test_target_with_triton_kernels_keeps_greedy_output(device_target, triton_verifier):
    """The full round (greedy verify kernel + KV compaction kernel) through the HF backend."""
    assert triton_verifier.backend.describe()["kernels"] == "triton"
    verifier_tests.test_tree_verification_equals_target_greedy(device_target, triton_verifier, 4)


def test_seeded_sampling_is_identical_across_kernels(device_target, triton_verifier):
    """Same seed, same uniforms: the Triton and torch rejection samplers pick the same tokens."""
    torch_verifier = build_verifier(
        TargetConfig(model="tiny", kernels="torch", max_tree_nodes=32), device_target
    )
    prompt = device_target.tokenizer.encode("def add(a, b):")
    rng = random.Random(5)
    trees = [
        CandidateTree.from_sequences([[rng.randrange(300) for _ in range(3)] for _ in range(2)])
        for _ in range(6)
    ]
    outputs = []
    for verifier in (torch_verifier, triton_verifier):
        opened = verifier_tests.open_session(
            verifier,
            prompt,
            strategy="probabilistic",
            sampling=target_pb2.SamplingParams(temperature=1.0, seed=1234),
        )
        tokens = [opened.first_token_id]
        for round_id, tree in enumerate(trees):
            result = verifier_tests.verify(verifier, opened.session_id, round_id, tree)
            tokens += [*result.accepted_token_ids, result.next_token_id]
        outputs.append(tokens)
    torch_verifier.backend.stop()
    assert outputs[0] == outputs[1]


TRITON_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from target_node.kernels import triton_kernels as k

SIGNATURES = {
    k._row_argmax_kernel: ({"logits_ptr": "*fp32"}, {"BLOCK_V": 1024}),
    k._tree_paths_kernel: ({"accepted_ptr": "*i8"}, {"BLOCK_N": 64}),
    k._tree_rejection_sample_kernel: (
        {name: "*fp32" for name in ("probs_ptr", "q_probs_ptr", "accept_u_ptr", "sample_u_ptr", "residual_ptr")},
        {"BLOCK_V": 1024, "BLOCK_N": 64, "BLOCK_S": 16},
    ),
    k._compact_kv_kernel: ({"table_ptr": "*i64"}, {"DTYPE": tl.bfloat16, "BLOCK_D": 128}),
}
for fn, (pointers, constexprs) in SIGNATURES.items():
    signature = {
        arg: "constexpr" if arg in constexprs else pointers.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
        for arg in fn.arg_names
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(fn.__name__, len(compiled.asm["cubin"]))
"""


def test_triton_kernels_compile_for_sm90():
    """Lower every Triton kernel through Triton's whole pipeline to an H100 cubin (no GPU needed).

    In a subprocess: compiling needs triton imported without the interpreter this session uses."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_COMPILE], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = dict(line.split() for line in result.stdout.splitlines())
    assert set(compiled) == {
        "_row_argmax_kernel",
        "_tree_paths_kernel",
        "_tree_rejection_sample_kernel",
        "_compact_kv_kernel",
    }
    assert all(int(size) > 0 for size in compiled.values())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    result = subprocess.run(
        [
            "nvcc",
            "-c",
            "-arch=sm_90",
            "-std=c++17",
            "-O3",
            str(CUDA_DIR / source),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr


NAN, INF = float("nan"), float("inf")
TIE_AND_NAN_ROWS = [  # (logits row, the one rule's token)
    ([1.0, 5.0, 5.0, 2.0], 1),  # a tie: the lowest index
    ([NAN, 1.0, 3.0, 3.0], 2),  # NaN counts as -inf
    ([3.0, NAN, 3.0, 0.0], 0),
    ([NAN, NAN, NAN, NAN], 0),  # no number at all: the lowest index
    ([-INF, -INF, -INF, -INF], 0),
    ([-INF, NAN, -INF, 2.0], 3),
]


def rule_rows(vocab: int = 4) -> tuple[torch.Tensor, list[int]]:
    rows = torch.full((len(TIE_AND_NAN_ROWS) + 1, vocab), -INF)
    for i, (row, _) in enumerate(TIE_AND_NAN_ROWS):
        rows[i, : len(row)] = torch.tensor(row)
    expected = [token for _, token in TIE_AND_NAN_ROWS]
    if vocab > 2100:  # a tie across Triton/CUDA blocks, NaN in an earlier block
        rows[-1, [100, 2100]], rows[-1, 50] = 9.0, NAN
        expected.append(100)
    else:
        expected.append(0)
    return rows, expected


@pytest.mark.parametrize("vocab", [4, 2500])
def test_one_greedy_rule_for_ties_and_nan_on_every_cpu_path(vocab):
    """Top-1 with ties and NaN logits: the lowest index wins a tie, NaN counts as -inf, a row with no
    number gives index 0; the same on every path that runs here (the rule's function, the torch and
    Triton verify kernels, both nodes' greedy choice, the greedy distribution)."""
    from draft_node.proposers.base import DraftNoise, draft_token
    from services.sampling import target_probs, top1
    from services.token_noise import TokenNoise
    from target_node.strategies import make_strategy

    rows, expected = rule_rows(vocab)
    greedy = target_pb2.SamplingParams()
    strategy = make_strategy("deterministic", greedy)
    tree = CandidateTree([-1] * (len(expected) - 1), [0] * (len(expected) - 1))
    paths = {
        "rule": top1(rows).tolist(),
        "torch kernels": REFERENCE.tree_greedy_verify(rows[None], pack_trees([tree])).target_argmax[0].tolist(),
        "triton kernels": load_kernels("triton", "cpu").tree_greedy_verify(rows[None], pack_trees([tree])).target_argmax[0].tolist(),
        "target token": [strategy.sample_token(row, TokenNoise(0), 0) for row in rows],
        "draft token": [draft_token(row, greedy, DraftNoise.for_strategy(0, ""), 0)[0] for row in rows],
        "greedy distribution": target_probs(rows, greedy).argmax(-1).tolist(),
    }
    for name, got in paths.items():
        assert got == expected, name


def test_sampled_distributions_give_nan_logits_no_mass():
    """The NaN rule for sampling: NaN logits have probability 0, a row without a number is all on index 0."""
    from services.sampling import target_probs

    rows, _ = rule_rows()
    probs = target_probs(rows, target_pb2.SamplingParams(temperature=0.7, top_p=0.9, top_k=3))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(len(rows)))
    for r in (1, 2, 5):  # rows with numbers: their NaN entries get nothing
        assert probs[r][rows[r].isnan()].sum() == 0
    assert probs[3].tolist() == [1.0, 0.0, 0.0, 0.0] and probs[4].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_vllm_top1_breaks_ties_by_the_lowest_token_id():
    """vLLM ranks tied tokens alike (rank = how many score at least as high); the dict's order must
    not decide."""
    from types import SimpleNamespace

    from target_node.backends.vllm import top1

    entry = {7: SimpleNamespace(rank=2, logprob=-0.1), 3: SimpleNamespace(rank=2, logprob=-0.1), 9: SimpleNamespace(rank=5, logprob=-3.0)}
    assert top1(entry) == 3
    assert top1({5: SimpleNamespace(rank=1, logprob=-0.1), 2: SimpleNamespace(rank=4, logprob=-2.0)}) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [4, 2500])
def test_cuda_greedy_kernel_follows_the_rule(vocab):
    rows, expected = rule_rows(vocab)
    tree = CandidateTree([-1] * (len(expected) - 1), [0] * (len(expected) - 1))
    got = load_kernels("cuda", "cuda").tree_greedy_verify(rows[None].cuda(), pack_trees([tree], "cuda"))
    assert got.target_argmax[0].tolist() == expected


def test_lossy_rules_never_accept_a_nan_logit():
    """The lossy strategies judge on the same rule: a token whose logit is NaN is nobody's top-k and
    has no probability."""
    from target_node.strategies import make_strategy

    rows = torch.tensor([[NAN, 5.0, 1.0, 0.0]] * 2)
    tokens = torch.tensor([0, 1])
    for name in ("topk", "threshold", "typical"):
        strategy = make_strategy(name, target_pb2.SamplingParams(temperature=1.0), target_pb2.StrategyParams(top_k=1))
        assert strategy.accept(rows, tokens).tolist() == [False, True], name
