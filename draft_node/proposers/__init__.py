"""Proposers (one per file: hf, vllm, ngram) and the drafter that makes one per generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from draft_node.config import DraftConfig
from draft_node.proposers.base import DraftNoise, Proposer
from services.compute_thread import ComputeThread
from services.limits import mb_to_bytes
from services.model_loading import LoadedModel, load_model, load_tokenizer, resolve_model_dir
from services.prefix_cache import PrefixCache
from services.rpc.specwire.v1 import target_pb2
from services.small_row_linear import small_row_setting, use_small_row_linears

ProposerFactory = Callable[[target_pb2.SamplingParams, DraftNoise], Proposer]


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> set[int]:
    """EOS ids from the tokenizer and the generation config (instruct models often list several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


@dataclass
class Drafter:
    """What the draft node needs from its draft side: tokenizer, EOS ids, a proposer per generation."""

    model_id: str
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]
    new_proposer: ProposerFactory
    max_candidates: int  # the largest N this drafter makes per round
    stop: Callable[[], None] = field(default=lambda: None)


def _generation_config(model_dir: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


def load_drafter(config: DraftConfig, loaded: LoadedModel | None = None) -> Drafter:
    if config.proposer == "hf":
        from draft_node.proposers.hf import HFProposer

        loaded = loaded or load_model(config.model, config.dtype, config.cache_dir, config.device)
        compute = ComputeThread("hf-draft-compute")  # concurrent generations take turns on the one model
        step_rows = compute.run(
            use_small_row_linears, loaded.model, small_row_setting(config.small_row_linear), int8=config.weights == "int8"
        )
        eos = eos_token_ids(loaded.tokenizer, loaded.model.generation_config)
        prefix_cache = PrefixCache(mb_to_bytes(config.prefix_cache_mb))
        return Drafter(
            loaded.model_id,
            loaded.tokenizer,
            eos,
            lambda sampling, noise: HFProposer(
                loaded.model,
                compute,
                sampling,
                noise,
                config.confidence_threshold,
                config.min_chain_probability,
                prefix_cache,
                step_rows,
            ),
            max_candidates=1,
            stop=compute.stop,
        )
    model_dir = resolve_model_dir(config.model, config.cache_dir)  # ngram: the tokenizer's source
    tokenizer = load_tokenizer(model_dir)
    eos = eos_token_ids(tokenizer, _generation_config(model_dir))
    if config.proposer == "ngram":
        from draft_node.proposers.ngram import NgramProposer

        return Drafter(
            f"ngram:{model_dir.name}",
            tokenizer,
            eos,
            lambda sampling, noise: NgramProposer(config.ngram_min, config.ngram_max),
            max_candidates=config.num_candidates,
        )
    from draft_node.proposers.vllm import VllmDraftModel, VllmProposer

    engine = VllmDraftModel(str(model_dir), config)
    return Drafter(
        model_dir.name,
        tokenizer,
        eos,
        lambda sampling, noise: VllmProposer(engine, sampling, noise),
        max_candidates=config.num_candidates,
        stop=engine.stop,
    )
