"""A stable hash of a tokenizer's vocabulary, so draft and target can prove they agree on ids."""

from __future__ import annotations

import hashlib

from transformers import PreTrainedTokenizerBase


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over every (id, token) pair and the special-token ids."""
    digest = hashlib.sha256()
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{token_id}\t{token}\n".encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        digest.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    return digest.hexdigest()
