"""A vLLM `LLM` engine that lives on its own micro-batching thread (shared by both nodes).

vLLM's CPU kernels bind to the thread that built the engine, and `LLM` is not thread-safe, so
the engine is created on the batcher's worker thread and every call goes through that thread;
concurrent callers are batched into one `generate` call.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from services.batching import MicroBatcher

CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCH_COMPILE_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}

Job = list[tuple[list[int], Any]]  # (prompt token ids, vllm.SamplingParams) pairs of one caller


class VllmEngine:
    def __init__(
        self,
        model_dir: str,
        dtype: str,
        max_model_len: int,
        block_size: int,
        max_batch_size: int,
        batch_wait_s: float,
        name: str,
        **engine_args: Any,
    ) -> None:
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            for key, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(key, value)
        self.max_model_len = max_model_len

        def start() -> None:
            from vllm import LLM

            self.llm = LLM(
                model=model_dir,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=0,
                enable_prefix_caching=True,
                block_size=block_size,
                enforce_eager=not self.on_gpu,
                distributed_executor_backend=None if self.on_gpu else "uni",
                **engine_args,
            )

        self.batcher: MicroBatcher[Job, list[Any]] = MicroBatcher(
            self._generate_batch, max_batch_size, batch_wait_s, name=name, on_start=start
        )

    @property
    def vocab_size(self) -> int:
        return self.llm.llm_engine.model_config.get_vocab_size()

    def generate(self, job: Job) -> tuple[list[Any], int]:
        """RequestOutputs for the job's prompts (in order) and the number of callers batched together."""
        return self.batcher.submit(job)

    def stop(self) -> None:
        self.batcher.stop()

    def _generate_batch(self, jobs: list[Job]) -> list[list[Any]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for job in jobs for ids, _ in job]
        params = [p for job in jobs for _, p in job]
        outputs = iter(self.llm.generate(prompts, params, use_tqdm=False))
        return [[next(outputs) for _ in job] for job in jobs]
