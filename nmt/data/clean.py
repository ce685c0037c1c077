"""Cleaning of training pairs, with a count for every rule.

Only the training split is cleaned; validation and test text is used exactly as read.
The rules, in the order they apply:

1. normalisation (`normalize`): Unicode NFC, then every run of whitespace (spaces, tabs,
   no-break spaces, ideographic spaces, ...) becomes one space, and both ends are stripped;
2. `empty`: a pair whose source or target is empty (or only whitespace);
3. `duplicate` (`dedup`): an exact repeat of an earlier pair, remembered by an 8-byte
   BLAKE2b digest per pair (about 60 bytes of memory per kept pair);
4. after tokenization, `too_long`: more than `max_len` pieces on either side;
5. after tokenization, `ratio`: (longer + 1) / (shorter + 1) > `max_len_ratio`, counted
   in pieces; the +1 keeps one-piece sentences from being judged on a ratio of 1:3.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class CleanStats:
    """How many training pairs were read, dropped by each rule, and kept."""

    read: int = 0
    empty: int = 0
    duplicate: int = 0
    too_long: int = 0
    ratio: int = 0
    kept: int = 0

    RULES = ("empty", "duplicate", "too_long", "ratio")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CleanStats:
        return cls(**{k: int(values.get(k, 0)) for k in ("read", *cls.RULES, "kept")})


def normalize(text: str) -> str:
    """Unicode NFC with whitespace runs collapsed to one space and the ends stripped."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def clean_text_pairs(
    pairs: Iterable[tuple[str, str]], stats: CleanStats, *, normalize_text: bool, dedup: bool
) -> Iterator[tuple[str, str]]:
    """Apply rules 1-3 to a stream of pairs, counting into `stats` (read, empty, duplicate).

    `stats.kept` is left alone: the length rules still apply after tokenization.
    """
    seen: set[bytes] = set()
    for src, trg in pairs:
        stats.read += 1
        if normalize_text:
            src, trg = normalize(src), normalize(trg)
        if not src.strip() or not trg.strip():
            stats.empty += 1
            continue
        if dedup:
            digest = hashlib.blake2b(src.encode(), digest_size=8)
            digest.update(b"\0")
            digest.update(trg.encode())
            key = digest.digest()
            if key in seen:
                stats.duplicate += 1
                continue
            seen.add(key)
        yield src, trg


def length_filter(
    src_lengths: np.ndarray, trg_lengths: np.ndarray, *, max_len: int, max_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rules 4 and 5 for a chunk of pairs, given their piece counts.

    Returns boolean masks `(too_long, bad_ratio)`, disjoint: a pair that is too long is
    not also counted as a bad ratio. Keep the pairs where both are False.
    """
    src_lengths = np.asarray(src_lengths, dtype=np.int64)
    trg_lengths = np.asarray(trg_lengths, dtype=np.int64)
    too_long = (src_lengths > max_len) | (trg_lengths > max_len)
    longer = np.maximum(src_lengths, trg_lengths) + 1
    shorter = np.minimum(src_lengths, trg_lengths) + 1
    bad_ratio = ~too_long & (longer > max_ratio * shorter)
    return too_long, bad_ratio
