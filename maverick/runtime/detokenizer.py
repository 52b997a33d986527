"""Incremental detokenization: decode a short window per new token instead of the whole output
(the whole output each step is O(n^2) over a long generation)."""
from __future__ import annotations


def detokenize_step(tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                    skip_special_tokens: bool) -> tuple[str, int, int]:
    """New text for ids[read_offset:], decoded with ids[prefix_offset:read_offset] as context so that
    merges across the boundary decode right. Holds back a partial UTF-8 character (decoded as U+FFFD)
    until the tokens that complete it arrive. Returns (new text, prefix_offset, read_offset)."""
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset
