"""The target's verifier: prefill a session, then verify each round's trie in one forward pass."""

from __future__ import annotations

import logging
import secrets
import threading
import time

import torch
from transformers import DynamicCache, PreTrainedModel

from services.candidate_tree import CandidateTree
from services.errors import FailedPrecondition, InvalidArgument, OutOfRange
from services.kv_cache import compact_kv
from services.model_loading import LoadedModel
from services.rpc.specwire.v1 import target_pb2
from services.tokenizer_fingerprint import tokenizer_fingerprint
from target_node.batching import VerifyBatcher
from target_node.config import TargetConfig
from target_node.session import Session, SessionStore
from target_node.strategies import STRATEGIES, Decision, make_strategy
from target_node.strategies.base import node_logprobs
from target_node.tree_attention import batch_inputs, build_tree_query

log = logging.getLogger(__name__)


def candidate_results(
    tree: CandidateTree, decision: Decision, logprobs: list[float]
) -> list[target_pb2.CandidateResult]:
    """Per leaf: how many leading tokens were accepted and their target logprob; best first."""
    results = []
    leaves = sorted(set(range(len(tree))) - set(tree.parents))
    for leaf in leaves:
        path = tree.path_to(leaf)
        accepted = next((i for i, node in enumerate(path) if not decision.acceptable[node]), len(path))
        results.append(
            target_pb2.CandidateResult(
                leaf_node_id=leaf,
                length=len(path),
                accepted_length=accepted,
                target_logprob=sum(logprobs[node] for node in path[:accepted]),
            )
        )
    return sorted(results, key=lambda r: (-r.accepted_length, -r.target_logprob, r.leaf_node_id))


@torch.inference_mode()
def check_tree_attention(model: PreTrainedModel, model_id: str) -> None:
    """Refuse a model that ignores custom 4D attention masks: its tree verification would be wrong.

    Two sibling candidates are verified as a tree and compared with decoding each alone.
    """
    device = next(model.parameters()).device
    prompt, pending, siblings = [1, 2, 3], 4, [5, 6]
    tree = CandidateTree.from_sequences([[t] for t in siblings])
    try:
        cache = DynamicCache()
        model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
        inputs = batch_inputs([build_tree_query(pending, tree, len(prompt))], model.dtype, device)
        tree_logits = (
            model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                past_key_values=cache,
            )
            .logits[0]
            .float()
        )
        alone = (
            model(input_ids=torch.tensor([[*prompt, pending, siblings[1]]], device=device))
            .logits[0, -1]
            .float()
        )
    except Exception as exc:
        raise RuntimeError(
            f"model {model_id} cannot run tree verification (4D attention mask): {exc}"
        ) from exc
    scale = alone.abs().max().clamp_min(1.0)
    if not torch.allclose(tree_logits[2], alone, atol=float(5e-2 * scale), rtol=0):
        raise RuntimeError(
            f"model {model_id} ignores custom 4D attention masks, so candidates would see each other; "
            "use a model whose attention accepts a 4D mask (e.g. Qwen2, Llama) with attn_implementation sdpa or eager"
        )


class Verifier:
    def __init__(self, loaded: LoadedModel, config: TargetConfig) -> None:
        self.model = loaded.model
        self.model_id = loaded.model_id
        self.fingerprint = tokenizer_fingerprint(loaded.tokenizer)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.eos_token_id = loaded.tokenizer.eos_token_id
        self.config = config
        model_limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 31
        self.max_context = min(config.max_context_tokens or model_limit, model_limit)
        self.device = next(self.model.parameters()).device
        self.sessions = SessionStore(config.max_sessions, config.session_ttl_s)
        self._forward_lock = threading.Lock()  # one forward at a time: they compete for the same cores
        self.batcher = VerifyBatcher(
            self.model,
            self._forward_lock,
            config.max_batch_size,
            config.batch_wait_ms / 1000,
            config.pad_verify_rows,
        )

    def info(self) -> target_pb2.InfoResponse:
        return target_pb2.InfoResponse(
            model_id=self.model_id,
            tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.vocab_size,
            strategies=sorted(STRATEGIES),
            lossy_strategies=sorted(name for name, cls in STRATEGIES.items() if not cls.lossless),
            limits=target_pb2.Limits(
                max_prompt_tokens=self.config.max_prompt_tokens,
                max_context_tokens=self.max_context,
                max_tree_nodes=self.config.max_tree_nodes,
                max_sessions=self.config.max_sessions,
                session_ttl_s=self.config.session_ttl_s,
            ),
            eos_token_id=self.eos_token_id,
        )

    def open_session(self, request: target_pb2.OpenSessionRequest) -> target_pb2.OpenSessionResponse:
        if not request.tokenizer_fingerprint:
            raise InvalidArgument("tokenizer_fingerprint is required (see TargetService.Info)")
        if request.tokenizer_fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"tokenizer mismatch: the draft's tokenizer fingerprint {request.tokenizer_fingerprint[:12]}… "
                f"differs from the target's {self.fingerprint[:12]}… ({self.model_id}); "
                "draft and target must share one vocabulary"
            )
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgument("prompt_token_ids is empty")
        if len(prompt) > self.config.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt has {len(prompt)} tokens; the limit is {self.config.max_prompt_tokens}"
            )
        if len(prompt) >= self.max_context:
            raise OutOfRange(f"prompt has {len(prompt)} tokens; the context limit is {self.max_context}")
        if bad := [t for t in prompt if t >= self.vocab_size]:
            raise InvalidArgument(f"prompt token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        strategy = make_strategy(request.strategy, request.sampling, request.strategy_params)
        seed = request.sampling.seed if request.sampling.HasField("seed") else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)

        cache = DynamicCache()
        with torch.inference_mode(), self._forward_lock:
            out = self.model(
                input_ids=torch.tensor([prompt], device=self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        first = strategy.first_token(out.logits[0, -1].float(), generator)
        session = Session(SessionStore.new_id(), cache, first, strategy, generator)
        self.sessions.add(session)
        return target_pb2.OpenSessionResponse(
            session_id=session.session_id, first_token_id=first, context_length=session.context_length
        )

    def verify(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        session = self.sessions.get(request.session_id)
        with session.lock:
            if request.round_id != session.next_round:
                raise FailedPrecondition(
                    f"session {request.session_id}: expected round {session.next_round}, got {request.round_id}"
                )
            tree = CandidateTree.from_proto(request.tree)
            tree.validate(self.vocab_size, self.config.max_tree_nodes)
            prefix = session.context_length
            needed = prefix + 1 + max(tree.depths(), default=0)
            if needed > self.max_context:
                raise OutOfRange(f"round needs {needed} positions; the context limit is {self.max_context}")

            start = time.perf_counter()
            try:
                logits, batch_size = self.batcher.forward(
                    session.cache, build_tree_query(session.pending_token, tree, prefix)
                )
                decision = session.strategy.evaluate_posterior(logits, tree, session.generator)
            except BaseException:
                compact_kv(session.cache, range(prefix))  # leave the session as it was before the round
                raise
            compact_kv(
                session.cache, [*range(prefix + 1), *(prefix + 1 + n for n in decision.accepted_nodes)]
            )
            session.pending_token = decision.next_token
            session.next_round += 1
            return target_pb2.VerifyResponse(
                session_id=session.session_id,
                round_id=request.round_id,
                accepted_node_ids=decision.accepted_nodes,
                accepted_token_ids=[tree.token_ids[n] for n in decision.accepted_nodes],
                next_token_id=decision.next_token,
                next_is_bonus=decision.next_is_bonus,
                context_length=session.context_length,
                tree_nodes=len(tree),
                verify_seconds=time.perf_counter() - start,
                candidates=candidate_results(tree, decision, node_logprobs(logits, tree).tolist()),
                batch_size=batch_size,
            )

    def close_session(self, session_id: str) -> bool:
        return self.sessions.remove(session_id)

    def stop(self) -> None:
        self.batcher.stop()
        self.sessions.stop()
