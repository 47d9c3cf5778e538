"""The target node's verifier, assembled from its configuration: model, backend, metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.model_loading import (
    LoadedModel,
    gguf_source,
    load_model,
    load_tokenizer,
    model_id_of,
    resolve_model_dir,
    resolve_weights,
)
from services.tokenizer_fingerprint import tokenizer_fingerprint
from target_node.config import TargetConfig
from target_node.metrics import TargetMetrics
from target_node.verifier import Verifier


def build_verifier(config: TargetConfig, loaded: LoadedModel | None = None) -> Verifier:
    """Load the target model on the configured backend and wrap it in a Verifier."""
    if config.backend == "vllm":
        from target_node.backends.vllm import VllmBackend  # imports vllm: only when asked for

        model_dir = resolve_model_dir(config.model, config.cache_dir)
        tokenizer = load_tokenizer(model_dir)
        backend = VllmBackend(str(model_dir), config)
        model_id = config.model
    elif loaded is None and resolve_weights(config.weights, config.model, config.device) == "gguf":
        from services.gguf_decoder import GGUFDecoder
        from services.gguf_file import GGUFFile
        from target_node.backends.gguf import GGUFBackend

        file = GGUFFile(gguf_source(config.model, config.cache_dir))
        tokenizer, model_id = file.tokenizer(config.cache_dir), model_id_of(config.model)
        backend = GGUFBackend(lambda: GGUFDecoder(file), config)
    else:
        from target_node.backends.hf import HFBackend

        loaded = loaded or load_model(config.model, config.dtype, config.cache_dir, config.device)
        tokenizer, model_id = loaded.tokenizer, loaded.model_id
        backend = HFBackend(loaded, config)
    return Verifier(backend, model_id, tokenizer_fingerprint(tokenizer), config, TargetMetrics(CollectorRegistry()))
