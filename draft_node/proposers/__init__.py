"""Proposers (one per file: hf, vllm, ngram) and the drafter that makes one per generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from draft_node.config import DraftConfig
from draft_node.proposers.base import DraftNoise, Proposer
from services.hf_runtime import HFRuntime
from services.limits import mb_to_bytes
from services.model_loading import (
    LoadedModel,
    gguf_source,
    load_model,
    load_tokenizer,
    model_id_of,
    resolve_device,
    resolve_model_dir,
    resolve_weights,
)
from services.prefix_cache import PrefixCache
from services.rpc.specwire.v1 import target_pb2

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


def load_gguf_drafter(config: DraftConfig) -> Drafter:
    from draft_node.proposers.gguf import GGUFProposer
    from services.forward_loop import ForwardLoop
    from services.gguf_decoder import GGUFDecoder
    from services.gguf_file import GGUFFile
    from services.prefix_cache import KVBufferCopies

    file = GGUFFile(gguf_source(config.model, config.cache_dir))
    tokenizer = file.tokenizer(config.cache_dir)
    eos = eos_token_ids(tokenizer, None) | file.eos_token_ids()
    loop: ForwardLoop = ForwardLoop(
        lambda: GGUFDecoder(file, output_rows=config.draft_vocab or None), "gguf-draft", max_rows=config.prefill_chunk_tokens
    )
    decoder = loop.decoder
    prefix_cache = PrefixCache(mb_to_bytes(config.prefix_cache_mb), KVBufferCopies(decoder.new_cache))
    return Drafter(
        model_id_of(config.model),
        tokenizer,
        eos,
        lambda sampling, noise: GGUFProposer(
            loop,
            sampling,
            noise,
            config.confidence_threshold,
            config.min_chain_probability,
            prefix_cache,
            config.prefill_chunk_tokens,
        ),
        max_candidates=1,
        stop=loop.stop,
    )


def draft_weights(config: DraftConfig, loaded: LoadedModel | None) -> str:
    """The hf proposer's weights: `auto` is gguf for a GGUF model on a CPU, else int8 on a CPU
    (the int8 kernel), else fp32."""
    if loaded is not None and config.weights == "auto":  # a transformers model given by the caller
        return "int8" if loaded.model.device.type == "cpu" else "fp32"
    weights = resolve_weights(config.weights, config.model, config.device)
    if config.weights == "auto" and weights == "fp32" and resolve_device(config.device).type == "cpu":
        return "int8"
    return weights


def load_drafter(config: DraftConfig, loaded: LoadedModel | None = None) -> Drafter:
    weights = draft_weights(config, loaded) if config.proposer == "hf" else "fp32"
    if weights == "gguf":
        return load_gguf_drafter(config)
    if config.proposer == "hf":
        from draft_node.proposers.hf import HFProposer

        loaded = loaded or load_model(config.model, config.dtype, config.cache_dir, config.device)
        # concurrent generations take turns on the one model
        runtime = HFRuntime.start(
            loaded.model, config.small_row_linear, config.prefix_cache_mb, "hf-draft-compute", int8=weights == "int8"
        )
        eos = eos_token_ids(loaded.tokenizer, loaded.model.generation_config)
        return Drafter(
            loaded.model_id,
            loaded.tokenizer,
            eos,
            lambda sampling, noise: HFProposer(
                loaded.model,
                runtime.compute,
                sampling,
                noise,
                config.confidence_threshold,
                config.min_chain_probability,
                runtime.prefix_cache,
                runtime.small_row_limit,
            ),
            max_candidates=1,
            stop=runtime.compute.stop,
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
