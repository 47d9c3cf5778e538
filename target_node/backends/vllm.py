"""vLLM backend (greedy): every candidate path becomes one prompt scored with prompt logprobs.

All root-to-leaf paths of all concurrent sessions go into ONE `LLM.generate` call (one engine
step). For each path the engine returns the target's top-1 token at every position and samples
one token after the leaf, which is exactly what greedy verification needs.

Limitation (vLLM 0.32): a request that asks for prompt logprobs skips the prefix cache (vLLM
recomputes the whole prompt to produce them), so every round recomputes the session's context;
the V2 model runner's `prompt_logprob_start` would lift that but needs Triton, i.e. a GPU.
"""

from __future__ import annotations

from services.candidate_tree import ROOT, CandidateTree
from services.vllm_engine import VllmEngine
from target_node.backends.base import RoundResult, VerifyBackend
from target_node.config import TargetConfig
from target_node.session import Session
from target_node.strategies import DeterministicStrategy
from target_node.strategies.base import decision_for


def top1(entry: dict) -> int:
    """The most likely token of one prompt-logprobs position, by services.sampling.top1's rule: vLLM
    gives tied tokens the same rank, so the lowest token id among them wins (not the dict's order).
    Only the tokens vLLM returned are known (its top-1 and the prompt's own token): a lower-id tie
    outside them cannot be seen."""
    return min(entry.items(), key=lambda item: (item[1].rank, item[0]))[0]


class VllmBackend(VerifyBackend):
    strategies = (DeterministicStrategy.name,)

    def __init__(self, model_dir: str, config: TargetConfig) -> None:
        from vllm import SamplingParams

        self.engine = VllmEngine(
            model_dir,
            config.dtype,
            config.max_context_tokens or 4096,
            config.vllm_block_size,
            config.max_batch_size,
            config.batch_wait_ms / 1000,
            name="vllm-verify-batcher",
        )
        self.max_context = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self._prefill_params = SamplingParams(max_tokens=1, temperature=0.0)
        self._score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)

    def prefill(self, session: Session) -> int:
        outputs, _ = self.engine.generate([(session.token_ids, self._prefill_params)])
        return outputs[0].outputs[0].token_ids[0]

    def verify(self, session: Session, tree: CandidateTree) -> RoundResult:
        leaves = sorted(set(range(len(tree))) - set(tree.parents)) or [ROOT]
        paths = [tree.path_to(leaf) for leaf in leaves]
        context = [*session.token_ids, session.pending_token]
        prompts = [context + [tree.token_ids[n] for n in path] for path in paths]
        outputs, batch_size = self.engine.generate([(prompt, self._score_params) for prompt in prompts])
        after: dict[int, int] = {}  # the target's greedy token after each node (ROOT: after pending)
        logprobs = [0.0] * len(tree)
        for path, prompt, out in zip(paths, prompts, outputs, strict=True):
            # prompt_logprobs[i] scores prompt[i]; its top-1 is the greedy token after prompt[i - 1]
            after[ROOT] = top1(out.prompt_logprobs[len(context)]) if path else out.outputs[0].token_ids[0]
            for depth, node in enumerate(path):
                position = len(context) + depth
                logprobs[node] = out.prompt_logprobs[position][prompt[position]].logprob
                last = depth + 1 == len(path)
                after[node] = out.outputs[0].token_ids[0] if last else top1(out.prompt_logprobs[position + 1])
        acceptable = [tree.token_ids[n] == after[p] for n, p in enumerate(tree.parents)]
        end = tree.longest_accepted_path_end(acceptable)
        return RoundResult(decision_for(tree, end, after[end], acceptable), logprobs, batch_size)

    def describe(self) -> dict[str, str]:
        return {
            "backend": "vllm",
            "attention": "vllm",
            "kernels": "vllm",
            "device": "cuda" if self.engine.on_gpu else "cpu",
        }

    def stop(self) -> None:
        self.engine.stop()
