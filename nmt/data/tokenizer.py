"""Sentencepiece subword models: training, and the `Tokenizer` that models and search use.

Every model this toolkit trains reserves the same four ids, so that embeddings, padding
masks and search never need to ask the tokenizer:

    0 <pad>  padding (never produced by encode)
    1 <unk>  unknown piece (characters outside `character_coverage`)
    2 <s>    beginning of sentence (bos): the decoder's first input
    3 </s>   end of sentence (eos): the decoder's last output

`encode` adds neither bos nor eos; the batching code adds them where they belong.
Training is reproducible: the sentence sample is drawn with the recipe's seed, and the
thread count is fixed (see TRAIN_THREADS).
Training keeps sentencepiece's hard vocabulary limit: a model always has exactly
`vocab_size` pieces, and a corpus too small for that size is a DataError that names the
largest size it allows.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.data import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Sentencepiece's unigram result depends on how many threads trained it; a fixed count
# makes a recipe give the same model on any machine (encoding uses every core).
TRAIN_THREADS = 16
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


def num_threads() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Tokenizer:
    """A trained sentencepiece model with the fixed special ids above.

    Build it with `from_file` or `from_bytes`; `model_bytes` is the serialized model, so a
    checkpoint can embed it and rebuild the tokenizer without the run folder.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_bytes: bytes, *, where: str = "<bytes>"):
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError) as e:
            raise DataError(f"{where}: not a sentencepiece model ({e})") from None
        for piece_id, piece in SPECIAL_PIECES.items():
            if piece_id >= processor.get_piece_size() or processor.id_to_piece(piece_id) != piece:
                raise DataError(f"{where}: id {piece_id} is not {piece}; not a model trained by nmt")
        self._sp = processor
        self._bytes = bytes(model_bytes)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read tokenizer model: {e.strerror or e}") from None
        return cls(data, where=str(path))

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        return cls(data)

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model proto."""
        return self._bytes

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Piece ids for each text, without bos/eos (batched over all cores)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads())

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Like `encode`, flattened: (all ids concatenated as int32, each text's length as
        int64). The fast path for encoding a corpus."""
        ids = self.encode(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text for each id sequence; pad, bos and eos ids are dropped first. No outer
        spaces, as in the training text: a word-boundary piece ``▁`` generated last (before
        eos) decodes to a trailing space."""
        special = (PAD_ID, BOS_ID, EOS_ID)
        clean = [[int(i) for i in seq if int(i) not in special] for seq in ids]
        return [text.strip() for text in self._sp.decode(clean, num_threads=num_threads())]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The piece string of each id (for inspection and attention plots)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """True when both give every text the same ids: the same pieces and scores, in the
        same order (model files of separately trained runs differ in their metadata)."""
        def table(tok):
            sp = tok._sp
            return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

        return self._bytes == other._bytes or table(self) == table(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._bytes == other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def tokenizer_files(joint: bool) -> tuple[str, str]:
    """The model file names in a data folder for (source, target)."""
    return ("spm.model", "spm.model") if joint else ("spm.src.model", "spm.trg.model")


def load_tokenizers(data_dir: Path) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) tokenizers of a preprocessed data folder; one object twice if joint."""
    data_dir = Path(data_dir)
    if (data_dir / "spm.model").is_file():
        joint = Tokenizer.from_file(data_dir / "spm.model")
        return joint, joint
    src_name, trg_name = tokenizer_files(joint=False)
    if not (data_dir / src_name).is_file():
        raise DataError(f"{data_dir}: no spm.model or {src_name}; run `nmt preprocess` first")
    return Tokenizer.from_file(data_dir / src_name), Tokenizer.from_file(data_dir / trg_name)


def train_tokenizer(text_files: list[Path], config, *, seed: int) -> bytes:
    """Train one sentencepiece model on the given text files (one sentence per line).

    `config` is a recipe's TokenizerConfig. When the files hold more than
    `input_sentence_size` lines, that many are sampled first, seeded by `seed`
    (sentencepiece's own sampling ignores its seed). Returns the serialized model.
    """
    with tempfile.TemporaryDirectory(prefix=".spm-", dir=Path(text_files[0]).parent) as work:
        inputs = sample_lines(text_files, config.input_sentence_size, seed, Path(work) / "sample.txt")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                input=[str(p) for p in inputs],
                model_writer=out,
                model_type=config.type,
                vocab_size=config.vocab_size,
                character_coverage=config.character_coverage,
                input_sentence_size=0,  # already sampled
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                num_threads=TRAIN_THREADS,
                minloglevel=2,  # errors still arrive, as exceptions
            )
        except RuntimeError as e:
            raise _training_error(str(e)) from None
    return out.getvalue()


def sample_lines(files: list[Path], size: int, seed: int, sample_path: Path) -> list[Path]:
    """`files` if they hold at most `size` lines in all, else a seeded sample of that many.

    The sample keeps file order and is written to `sample_path`; it is drawn over the
    lines of all files together, as sentencepiece itself would.
    """
    total = 0
    for path in files:
        with open(path, "rb") as f:
            total += sum(1 for _ in f)
    if total <= size:
        return list(files)
    wanted = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False)).tolist()
    wanted.append(total)  # sentinel
    position, index = 0, 0
    with open(sample_path, "wb") as out:
        for path in files:
            with open(path, "rb") as f:
                for line in f:
                    if index == wanted[position]:
                        out.write(line if line.endswith(b"\n") else line + b"\n")
                        position += 1
                    index += 1
    return [sample_path]


def _training_error(message: str) -> DataError:
    limit = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if limit:
        return DataError(
            f"tokenizer.vocab_size {limit.group(1)} is too large for this training text "
            f"(at most {limit.group(2)}); set a smaller tokenizer.vocab_size"
        )
    return DataError(f"sentencepiece training failed: {message.splitlines()[0]}")
