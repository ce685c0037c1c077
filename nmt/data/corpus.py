"""The encoded corpus: what training reads, memory-mapped, never raw text again.

Each split and side is two .npy files in the data folder:

    {split}.{side}.ids.npy      every sentence's piece ids, concatenated (uint16 when the
                                vocabulary has fewer than 65,536 pieces, else int32)
    {split}.{side}.offsets.npy  int64, length pairs + 1: sentence i is ids[offsets[i]:offsets[i+1]]

with `side` "src" or "trg" and `split` "train", "valid" or a test split's name. Ids carry
no bos/eos. `TokenArrayWriter` writes them in chunks, so a corpus of millions of pairs is
never in memory at once; `EncodedCorpus.open` maps them with `np.load(mmap_mode="r")`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from nmt.data import DataError

SIDES = ("src", "trg")


def ids_file(split: str, side: str) -> str:
    return f"{split}.{side}.ids.npy"


def offsets_file(split: str, side: str) -> str:
    return f"{split}.{side}.offsets.npy"


def text_file(split: str, side: str) -> str:
    """Raw text of a valid/test split, exactly as read (BLEU sources and references)."""
    return f"{split}.{side}.txt"


def clean_text_file(side: str) -> str:
    """Cleaned training text (before the length rules), kept to retrain the tokenizer."""
    return f"train.clean.{side}.txt"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<i4")


class EncodedCorpus:
    """One encoded split: source and target id sequences, memory-mapped.

    `src(i)` / `trg(i)` return sentence i's ids as an int64 array (no bos/eos);
    `src_lengths` / `trg_lengths` are int32 arrays of piece counts.
    """

    def __init__(self, split: str, ids: dict[str, np.ndarray], offsets: dict[str, np.ndarray]):
        self.split = split
        self._ids = ids
        self._offsets = offsets
        self._lengths: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, data_dir: Path, split: str) -> EncodedCorpus:
        data_dir = Path(data_dir)
        ids, offsets = {}, {}
        for side in SIDES:
            ids[side] = _load(data_dir / ids_file(split, side))
            offsets[side] = _load(data_dir / offsets_file(split, side))
        if len(offsets["src"]) != len(offsets["trg"]):
            raise DataError(f"{data_dir}: split '{split}' has unequal source and target counts")
        return cls(split, ids, offsets)

    def __len__(self) -> int:
        return len(self._offsets["src"]) - 1

    def _side_lengths(self, side: str) -> np.ndarray:
        if side not in self._lengths:
            self._lengths[side] = np.diff(self._offsets[side]).astype(np.int32)
        return self._lengths[side]

    @property
    def src_lengths(self) -> np.ndarray:
        return self._side_lengths("src")

    @property
    def trg_lengths(self) -> np.ndarray:
        return self._side_lengths("trg")

    def _positions(self, indices) -> np.ndarray:
        """``indices`` (negative ones count from the end) as positions ``0 .. n-1``;
        IndexError naming the first out of range."""
        indices = np.asarray(indices, dtype=np.int64)
        n = len(self)
        bad = indices[(indices < -n) | (indices >= n)]
        if len(bad):
            raise IndexError(f"{self.split}: sentence {bad.flat[0]} out of range ({n} pairs)")
        return indices % max(n, 1)

    def _sentence(self, side: str, i: int) -> np.ndarray:
        i = int(self._positions(i))
        offsets = self._offsets[side]
        return np.asarray(self._ids[side][offsets[i] : offsets[i + 1]], dtype=np.int64)

    def padded(self, side: str, indices: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentences ``indices`` of one side as one right-padded matrix, in a few numpy ops.

        Returns:
            ids: [B, L] int64, ``pad_id`` after each sentence's end (L: the longest)
            lengths: [B] int64 piece counts
        """
        indices = self._positions(indices)
        offsets = self._offsets[side]
        starts = offsets[indices].astype(np.int64)
        lengths = offsets[indices + 1].astype(np.int64) - starts
        columns = np.arange(int(lengths.max()) if len(indices) else 0)
        real = columns < lengths[:, None]  # B x L
        positions = np.where(real, starts[:, None] + columns, 0)
        ids = np.where(real, self._ids[side][positions], pad_id)
        return ids.astype(np.int64), lengths

    def src(self, i: int) -> np.ndarray:
        return self._sentence("src", i)

    def trg(self, i: int) -> np.ndarray:
        return self._sentence("trg", i)

    def __repr__(self) -> str:
        return f"EncodedCorpus({self.split!r}, {len(self)} pairs)"


def read_text_split(data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """The raw (source, target) lines of a valid or test split, as preprocess stored them.

    Lines are split on "\\n" only, so a sentence holding another Unicode line break
    (U+2028, U+0085, ...) stays one sentence, as it was in the source.
    """
    data_dir = Path(data_dir)
    sides = []
    for side in SIDES:
        path = data_dir / text_file(split, side)
        try:
            data = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: file not found; run `nmt preprocess` first") from None
        sides.append(data.split("\n")[:-1] if data else [])
    return sides[0], sides[1]


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run `nmt preprocess` first") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None


class TokenArrayWriter:
    """Streams one split side into its ids/offsets .npy pair, chunk by chunk.

    The .npy headers are written last, once the lengths are known: each file starts with
    a fixed-size placeholder that `close()` overwrites.
    """

    def __init__(self, folder: Path, split: str, side: str, vocab_size: int):
        self._ids = _NpyAppender(folder / ids_file(split, side), token_dtype(vocab_size))
        self._offsets = _NpyAppender(folder / offsets_file(split, side), np.dtype("<i8"))
        self._offsets.append(np.zeros(1, dtype=np.int64))
        self._end = 0
        self.sentences = 0

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append sentences in order: their ids concatenated, and each one's length."""
        if len(lengths) == 0:
            return
        self._offsets.append(self._end + np.cumsum(lengths, dtype=np.int64))
        self._ids.append(ids)
        self._end += int(np.sum(lengths))
        self.sentences += len(lengths)

    @property
    def tokens(self) -> int:
        return self._end

    def close(self) -> None:
        self._ids.close()
        self._offsets.close()


class _NpyAppender:
    """A 1-D .npy file written by appending; the header is fixed once the length is known."""

    HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + dict padded with spaces + "\n"

    def __init__(self, path: Path, dtype: np.dtype):
        self.dtype = dtype
        self.count = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(b"\0" * self.HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.data)
        self.count += len(values)

    def close(self) -> None:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({self.count},), }}"
        body = text.ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1"))
        self._file.close()
