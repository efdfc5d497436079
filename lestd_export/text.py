"""Token ids of a text and their digests, shared by evaluation, calibration, sweep and bench.

Text is tokenised without special tokens (no BOS); a digest of token ids is the SHA-256 of the ids
written as comma-separated decimals, so every report names the tokens it scored the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .errors import CheckpointError


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, cut to ``max_tokens``.

    With ``max_tokens``, only a prefix of the text is tokenised when that is enough (a generous
    number of characters per token, with a margin so that the cut never changes a kept token).
    """
    if tokenizer is None:
        raise CheckpointError("the model has no tokenizer files: save the tokenizer next to the model "
                              "(tokenizer.json / tokenizer_config.json) to evaluate on text")

    def encode(part: str) -> list[int]:
        return list(tokenizer(part, add_special_tokens=False, return_attention_mask=False,
                              verbose=False)["input_ids"])

    if max_tokens is not None:
        margin = 64
        chars = (max_tokens + margin) * 16
        if chars < len(text):
            ids = encode(text[:chars])
            if len(ids) >= max_tokens + margin:
                return ids[:max_tokens]
    ids = encode(text)
    return ids if max_tokens is None else ids[:max_tokens]


def tokens_sha256(token_ids: Sequence[int]) -> str:
    """SHA-256 of token ids written as comma-separated decimals (recorded by eval and calibration)."""
    return hashlib.sha256(",".join(map(str, list(token_ids))).encode()).hexdigest()


def tokens_digest(token_ids: Sequence[int]) -> str:
    """A short hash of a token sequence (for cache keys): the first 16 hex digits of :func:`tokens_sha256`."""
    return tokens_sha256(token_ids)[:16]
