"""HF transformers backend: per-session preallocated KV cache, tree attention, padded batches across sessions.

Concurrent sessions' verify forwards are stacked: their KV caches are right-padded into one
batch cache, the forward runs once, and each session gets its own logits and new KV entries back.
All torch work (prefill, forwards, decisions, compaction) runs on the backend's compute thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from services.batching import MicroBatcher
from services.candidate_tree import CandidateTree
from services.hf_runtime import HFRuntime
from services.kv_cache import GROWTH_POSITIONS, kv_buffers, kv_bytes_per_token, kv_nbytes, truncate_kv
from services.model_loading import LoadedModel
from target_node.backends.base import RoundResult, VerifyBackend
from target_node.config import TargetConfig
from target_node.kernels import load_kernels
from target_node.session import Session
from target_node.strategies import STRATEGIES
from target_node.strategies.base import node_logprobs
from target_node.tree_attention import TreeQuery, batch_inputs, build_tree_query


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


@dataclass
class VerifyJob:
    """One round: forward, decision and compaction run as one job on the compute thread."""

    session: Session
    tree: CandidateTree
    query: TreeQuery

    @property
    def cache(self) -> DynamicCache:  # the session's cache; grows by len(query.token_ids) entries
        return self.session.cache


class HFBackend(VerifyBackend):
    strategies = tuple(sorted(STRATEGIES))

    def __init__(self, loaded: LoadedModel, config: TargetConfig) -> None:
        self.model = loaded.model
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 31
        self.device = next(self.model.parameters()).device
        runtime = HFRuntime.start(self.model, config.small_row_linear, config.prefix_cache_mb, "hf-compute")
        self.compute, self.small_row_limit, self.prefix_cache = runtime.compute, runtime.small_row_limit, runtime.prefix_cache
        self.min_rows = config.pad_verify_rows
        self._live: set[int] = set()  # sessions that may send a round: the batcher waits for them, not for ghosts
        self.kv_bytes_per_token = kv_bytes_per_token(self.model.config, self.model.dtype)
        self.kernels = self.compute.run(load_kernels, config.kernels, self.device)
        self.compute.run(check_tree_attention, self.model, loaded.model_id)
        self.batcher: MicroBatcher[VerifyJob, RoundResult] = MicroBatcher(
            self._verify_batch,
            config.max_batch_size,
            config.batch_wait_ms / 1000,
            on_retry_alone=lambda job: truncate_kv(job.cache, job.query.prefix_length),
            name="hf-verify-batcher",
            expected=lambda: len(self._live),
        )

    def prefill(self, session: Session) -> int:
        token = self.compute.run(self._prefill, session)
        self._live.add(id(session))
        return token

    @torch.inference_mode()
    def _prefill(self, session: Session) -> int:
        session.cached_prefix, session.cache = self.prefix_cache.lookup(session.token_ids)
        out = self.model(
            input_ids=torch.tensor([session.token_ids[session.cached_prefix :]], device=self.device),
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.prefix_cache.store(session.token_ids, session.cache)
        return session.strategy.sample_token(out.logits[0, -1].float(), session.noise, session.context_length)

    def verify(self, session: Session, tree: CandidateTree) -> RoundResult:
        prefix = session.context_length
        try:
            query = build_tree_query(session.pending_token, tree, prefix)
            result, _ = self.batcher.submit(VerifyJob(session, tree, query))
            return result
        except BaseException:
            # compaction writes only past the prefix, so truncating to it still restores the session
            truncate_kv(session.cache, prefix)
            raise

    @torch.inference_mode()
    def _decide(self, session: Session, tree: CandidateTree, logits: torch.Tensor, batch_size: int) -> RoundResult:
        """The strategy's decision on the tree's logits, and the cache compacted to its path."""
        prefix = session.context_length
        decision = session.strategy.evaluate_posterior(logits, tree, session.noise, prefix + 1)
        self.compact_kv_cache(session.cache, prefix + 1, decision.accepted_nodes)
        end_row = decision.accepted_nodes[-1] + 1 if decision.accepted_nodes else 0
        next_logprob = float(logits[end_row].float().log_softmax(-1)[decision.next_token])
        return RoundResult(decision, node_logprobs(logits, tree).tolist(), batch_size, next_logprob)

    @torch.inference_mode()
    def compact_kv_cache(self, cache: DynamicCache, kept: int, accepted_nodes: list[int]) -> None:
        """Keep the first `kept` cache positions and the accepted path's nodes, dropping the rest
        of the trie (node i sits at position kept + i). Nodes already in place (a chain's leading
        nodes, every accepted node of a single candidate) are not moved."""
        in_place = next((j for j, node in enumerate(accepted_nodes) if node != j), len(accepted_nodes))
        if in_place < len(accepted_nodes):
            src = torch.tensor([kept + node for node in accepted_nodes[in_place:]], dtype=torch.int32)
            self.kernels.compact_kv(kv_buffers(cache), src.to(self.device), kept + in_place)
        truncate_kv(cache, kept + len(accepted_nodes))

    def describe(self) -> dict[str, str]:
        return {
            "backend": "hf",
            "attention": str(self.model.config._attn_implementation),
            "kernels": self.kernels.name,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "small_row_linear": str(self.small_row_limit),
        }

    def session_bytes(self, session: Session) -> int:
        cache = session.cache  # read once: a close on another thread may set it to None meanwhile
        return kv_nbytes(cache) if cache is not None else 0

    def prefill_bytes(self, num_tokens: int) -> int:
        return self.kv_bytes_per_token * (num_tokens + GROWTH_POSITIONS)  # a buffer's spare room included

    def shared_cache_bytes(self) -> int:
        return self.prefix_cache.nbytes

    def shrink_shared_caches(self, nbytes: int) -> int:
        return self.prefix_cache.shrink(nbytes)

    def free_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return super().free_memory_bytes()

    def close(self, session: Session) -> None:
        self._live.discard(id(session))
        session.cache = None

    def stop(self) -> None:
        self.batcher.stop()
        self.compute.stop()

    def _verify_batch(self, jobs: list[VerifyJob]) -> list[RoundResult]:
        return self.compute.run(self._forward_and_decide, jobs)

    def _forward_and_decide(self, jobs: list[VerifyJob]) -> list[RoundResult]:
        logits = self._batched_forward(jobs) if len(jobs) > 1 else [self._single_forward(jobs[0])]
        return [self._decide(job.session, job.tree, rows, len(jobs)) for job, rows in zip(jobs, logits, strict=True)]

    @torch.inference_mode()
    def _single_forward(self, job: VerifyJob) -> torch.Tensor:
        inputs = batch_inputs([job.query], self.model.dtype, self.device, self.min_rows)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=inputs.attention_mask,
            past_key_values=job.cache,
            use_cache=True,
        )
        return out.logits[0].float()

    @torch.inference_mode()
    def _batched_forward(self, jobs: list[VerifyJob]) -> list[torch.Tensor]:
        inputs = batch_inputs([job.query for job in jobs], self.model.dtype, self.device, self.min_rows)
        width = inputs.prefix_width
        batch_cache = DynamicCache()
        for layer_idx, layers in enumerate(zip(*(job.cache.layers for job in jobs), strict=True)):
            first = layers[0].keys
            keys = first.new_zeros((len(jobs), *first.shape[1:-2], width, first.shape[-1]))
            values = torch.zeros_like(keys)
            for b, layer in enumerate(layers):
                keys[b, ..., : layer.keys.shape[-2], :] = layer.keys[0]
                values[b, ..., : layer.values.shape[-2], :] = layer.values[0]
            batch_cache.update(keys, values, layer_idx)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=inputs.attention_mask,
            past_key_values=batch_cache,
            use_cache=True,
        )
        results = []
        for b, job in enumerate(jobs):
            new = slice(width, width + len(job.query.token_ids))
            for layer, batched in zip(job.cache.layers, batch_cache.layers, strict=True):
                layer.update(batched.keys[b : b + 1, ..., new, :], batched.values[b : b + 1, ..., new, :])
            results.append(out.logits[b, : len(job.query.token_ids)].float())
        return results
