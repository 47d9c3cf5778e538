"""vLLM backend (greedy): every candidate path becomes one prompt scored with prompt logprobs.

All root-to-leaf paths of all concurrent sessions go into ONE `LLM.generate` call (one engine
step). For each path the engine returns the target's top-1 token at every position and samples
one token after the leaf, which is exactly what greedy verification needs.

Limitation (vLLM 0.32): a request that asks for prompt logprobs skips the prefix cache (vLLM
recomputes the whole prompt to produce them), so every round recomputes the session's context;
the V2 model runner's `prompt_logprob_start` would lift that but needs Triton, i.e. a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from services.candidate_tree import ROOT, CandidateTree
from target_node.backends.base import RoundResult, VerifyBackend
from target_node.batching import MicroBatcher
from target_node.config import TargetConfig
from target_node.session import Session
from target_node.strategies import DeterministicStrategy
from target_node.strategies.base import decision_for, longest_acceptable_path

CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCH_COMPILE_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


@dataclass
class ScoreJob:
    prompts: list[list[int]]
    score_from: int  # first prompt index whose top-1 prediction is needed (0: none, a prefill)


@dataclass
class PathScores:
    top1: list[int]  # target's greedy token after each prompt position >= score_from - 1, then after the last
    logprobs: list[float]  # logprob of each prompt token from score_from on


class VllmBackend(VerifyBackend):
    strategies = (DeterministicStrategy.name,)

    def __init__(self, model_dir: str, config: TargetConfig) -> None:
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            for key, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM, SamplingParams

        self.max_context = config.max_context_tokens or 4096
        self.llm = LLM(
            model=model_dir,
            dtype=config.dtype,
            max_model_len=self.max_context,
            seed=0,
            enable_prefix_caching=True,
            block_size=config.vllm_block_size,
            enforce_eager=not on_gpu,
            distributed_executor_backend="uni" if not on_gpu else None,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self._prefill_params = SamplingParams(max_tokens=1, temperature=0.0)
        self._score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        self.batcher: MicroBatcher[ScoreJob, list[PathScores]] = MicroBatcher(
            self._score_batch, config.max_batch_size, config.batch_wait_ms / 1000, name="vllm-verify-batcher"
        )

    def prefill(self, session: Session) -> int:
        scores, _ = self.batcher.submit(ScoreJob([session.token_ids], 0))
        return scores[0].top1[-1]

    def verify(self, session: Session, tree: CandidateTree) -> RoundResult:
        leaves = sorted(set(range(len(tree))) - set(tree.parents)) or [ROOT]
        paths = [tree.path_to(leaf) for leaf in leaves]
        context = [*session.token_ids, session.pending_token]
        prompts = [context + [tree.token_ids[n] for n in path] for path in paths]
        scores, batch_size = self.batcher.submit(ScoreJob(prompts, len(context)))
        after = {ROOT: scores[0].top1[0]}  # the target's greedy token after each node
        logprobs = [0.0] * len(tree)
        for path, score in zip(paths, scores, strict=True):
            for depth, node in enumerate(path):
                after[node] = score.top1[depth + 1]
                logprobs[node] = score.logprobs[depth]
        acceptable = [tree.token_ids[n] == after[p] for n, p in enumerate(tree.parents)]
        end = longest_acceptable_path(tree, acceptable, logprobs)
        return RoundResult(decision_for(tree, end, after[end], acceptable), logprobs, batch_size)

    def describe(self) -> dict[str, str]:
        return {
            "backend": "vllm",
            "attention": "vllm",
            "kernels": "vllm",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }

    def stop(self) -> None:
        self.batcher.stop()

    def _score_batch(self, jobs: list[ScoreJob]) -> list[list[PathScores]]:
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for job in jobs:
            for prompt in job.prompts:
                prompts.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(self._score_params if job.score_from else self._prefill_params)
        outputs = iter(self.llm.generate(prompts, params, use_tqdm=False))
        results = []
        for job in jobs:
            job_scores = []
            for prompt in job.prompts:
                out = next(outputs)
                top1, logprobs = [], []
                if job.score_from:
                    for position in range(job.score_from, len(prompt)):
                        entry = out.prompt_logprobs[position]  # logprobs of prompt[position] and the top-1
                        top1.append(min(entry.items(), key=lambda item: item[1].rank)[0])
                        logprobs.append(entry[prompt[position]].logprob)
                job_scores.append(PathScores([*top1, out.outputs[0].token_ids[0]], logprobs))
            results.append(job_scores)
        return results
