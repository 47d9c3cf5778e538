"""Verify forwards for concurrent sessions, run together as one padded batch.

Requests that arrive while a forward runs (or within `max_wait_s` of each other) are stacked:
their KV caches are right-padded into one batch cache, the forward runs once, and each session
gets its own logits and its own new KV entries back. If a batched forward fails, every request
is retried alone, so no session fails because of another one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from services.kv_cache import compact_kv
from target_node.tree_attention import TreeQuery, batch_inputs

log = logging.getLogger(__name__)


@dataclass
class ForwardJob:
    cache: DynamicCache  # the session's cache; grows by len(query.token_ids) entries
    query: TreeQuery
    result: Future = field(default_factory=Future)  # -> (logits [1 + n, vocab], batch size)


class VerifyBatcher:
    def __init__(
        self,
        model: PreTrainedModel,
        forward_lock: threading.Lock,
        max_batch_size: int,
        max_wait_s: float,
        min_rows: int = 1,
    ) -> None:
        self.model = model
        self.min_rows = min_rows
        self.forward_lock = forward_lock
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.device = next(model.parameters()).device
        self._jobs: queue.Queue[ForwardJob | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="verify-batcher", daemon=True)
        self._worker.start()

    def forward(self, cache: DynamicCache, query: TreeQuery) -> tuple[torch.Tensor, int]:
        """Blocking: logits for the query's rows and the size of the batch it ran in."""
        job = ForwardJob(cache, query)
        self._jobs.put(job)
        return job.result.result()

    def stop(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def _loop(self) -> None:
        while (first := self._jobs.get()) is not None:
            jobs = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(jobs) < self.max_batch_size:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)
                    break
                jobs.append(job)
            self._run(jobs)

    def _run(self, jobs: list[ForwardJob]) -> None:
        try:
            logits = self._batched_forward(jobs) if len(jobs) > 1 else [self._single_forward(jobs[0])]
        except BaseException as exc:  # noqa: BLE001 - a failure goes back to the request(s)
            if len(jobs) == 1:
                jobs[0].result.set_exception(exc)
                return
            log.warning("batched forward of %d failed (%s); running them one by one", len(jobs), exc)
            for job in jobs:
                compact_kv(job.cache, range(job.query.prefix_length))  # undo any partial append
                self._run([job])
            return
        for job, rows in zip(jobs, logits, strict=True):
            job.result.set_result((rows, len(jobs)))

    @torch.inference_mode()
    def _single_forward(self, job: ForwardJob) -> torch.Tensor:
        inputs = batch_inputs([job.query], self.model.dtype, self.device, self.min_rows)
        with self.forward_lock:
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                past_key_values=job.cache,
                use_cache=True,
            )
        return out.logits[0].float()

    @torch.inference_mode()
    def _batched_forward(self, jobs: list[ForwardJob]) -> list[torch.Tensor]:
        queries = [job.query for job in jobs]
        inputs = batch_inputs(queries, self.model.dtype, self.device, self.min_rows)
        width = inputs.prefix_width
        batch_cache = DynamicCache()
        for layer_idx, layers in enumerate(zip(*(job.cache.layers for job in jobs), strict=True)):
            keys = layers[0].keys.new_zeros(
                (len(jobs), *layers[0].keys.shape[1:-2], width, layers[0].keys.shape[-1])
            )
            values = torch.zeros_like(keys)
            for b, layer in enumerate(layers):
                keys[b, ..., : layer.keys.shape[-2], :] = layer.keys[0]
                values[b, ..., : layer.values.shape[-2], :] = layer.values[0]
            batch_cache.update(keys, values, layer_idx)
        with self.forward_lock:
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                past_key_values=batch_cache,
                use_cache=True,
            )
        results = []
        for b, job in enumerate(jobs):
            size = len(job.query.token_ids)
            for layer, batched in zip(job.cache.layers, batch_cache.layers, strict=True):
                layer.keys = torch.cat(
                    [layer.keys, batched.keys[b : b + 1, ..., width : width + size, :]], dim=-2
                )
                layer.values = torch.cat(
                    [layer.values, batched.values[b : b + 1, ..., width : width + size, :]], dim=-2
                )
            results.append(out.logits[b, :size].float())
        return results
