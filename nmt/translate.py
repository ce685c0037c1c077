"""Text in, text out: tokenize, batch by length, search, detokenize, restore order.

Used by validation during training, `nmt translate` and `nmt evaluate`. Every input line
gives exactly one output line, in input order; an empty or blank line gives "".
"""

from __future__ import annotations

import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, TextIO

import torch

from nmt.data.batching import EOS_ID, pad
from nmt.search import Hypothesis, beam_search, greedy_search


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 5
    length_penalty: float = 1.0
    length_norm: str = "gnmt"
    max_len_a: float = 1.5
    max_len_b: int = 10
    nbest: int = 1
    batch_size: int = 64
    precision: str = "fp32"  # or "bf16": search under bfloat16 autocast

    @classmethod
    def from_recipe(cls, decode, **overrides) -> "SearchOptions":
        """Options from a recipe's decode section; None-valued overrides are ignored."""
        fields = dict(
            beam_size=decode.beam_size,
            length_penalty=decode.length_penalty,
            length_norm=decode.length_norm,
            max_len_a=decode.max_len_a,
            max_len_b=decode.max_len_b,
            batch_size=decode.batch_size,
            precision=decode.precision,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


def search_batch(model, src: torch.Tensor, src_lengths: torch.Tensor, opts: SearchOptions) -> list[list[Hypothesis]]:
    """Greedy search for beam 1 with one hypothesis, beam search otherwise."""
    if opts.beam_size == 1 and opts.nbest == 1:
        return greedy_search(model, src, src_lengths, max_len_a=opts.max_len_a, max_len_b=opts.max_len_b)
    return beam_search(
        model,
        src,
        src_lengths,
        beam_size=max(opts.beam_size, opts.nbest),
        length_penalty=opts.length_penalty,
        length_norm=opts.length_norm,
        max_len_a=opts.max_len_a,
        max_len_b=opts.max_len_b,
        nbest=opts.nbest,
    )


def translate_ids(
    model,
    sources: list[list[int]],
    opts: SearchOptions,
    device: torch.device | str = "cpu",
    workers: int | None = None,
) -> list[list[Hypothesis]]:
    """Search for every source (piece ids, no eos); results in input order.

    Sources are sorted by length and cut into batches of ``opts.batch_size``. On a CPU
    the batches are searched side by side, one thread each, by as many workers as there
    are intra-op threads (and batches), as Marian's and CTranslate2's CPU workers do: a
    decoder step's operations are too small to keep several threads busy at once. Empty
    sources get an empty hypothesis without running the model.

    :param workers: batches searched at once (default: as above; 1 on a GPU)
    """
    if opts.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {opts.precision!r}")
    device = torch.device(device)
    order = sorted((i for i, s in enumerate(sources) if len(s)), key=lambda i: len(sources[i]), reverse=True)
    batches = [order[start : start + opts.batch_size] for start in range(0, len(order), opts.batch_size)]
    bf16 = opts.precision == "bf16"

    def search(batch: list[int]) -> list[list[Hypothesis]]:
        # grad mode and autocast are per thread: set them in the worker
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            src, src_lengths = pad([sources[i] for i in batch], suffix=EOS_ID)
            return search_batch(model, src.to(device), src_lengths.to(device), opts)

    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    workers = max(1, min(workers, len(batches)))
    with model.reusing_decoding_weights():  # made once for all the batches
        if workers == 1:
            found = [search(batch) for batch in batches]
        else:
            with _intra_op_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
                found = list(pool.map(search, batches))
    results: list[list[Hypothesis] | None] = [None] * len(sources)
    for batch, hyps in zip(batches, found):
        for i, h in zip(batch, hyps):
            results[i] = h
    empty = [Hypothesis(tokens=[], score=0.0, attention=torch.zeros(1, 1))] * max(1, opts.nbest)  # as many as asked
    return [r if r is not None else empty for r in results]


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op thread count (process-wide) set to ``n`` for the block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class Translator:
    """A loaded model with its tokenizers, turning raw lines into detokenized lines."""

    def __init__(self, loaded, opts: SearchOptions, device: torch.device | str = "cpu", warn=None):
        self.model = loaded.model
        self.src_tok = loaded.src_tok
        self.trg_tok = loaded.trg_tok
        self.max_src_len = loaded.max_src_len
        self.opts = opts
        self.device = device
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))

    def encode(self, lines: list[str], first_line_no: int = 1) -> list[list[int]]:
        ids = self.src_tok.encode([normalize_input(line) for line in lines])
        for k, seq in enumerate(ids):
            if len(seq) > self.max_src_len:
                self.warn(
                    f"line {first_line_no + k}: {len(seq)} pieces, truncated to the model's "
                    f"maximum source length of {self.max_src_len}"
                )
                ids[k] = seq[: self.max_src_len]
        return ids

    def translate(
        self, lines: list[str], first_line_no: int = 1, opts: SearchOptions | None = None, on_result=None
    ) -> list[list[tuple[str, Hypothesis]]]:
        """n-best (text, hypothesis) pairs per input line, with `opts` or the translator's own.

        :param on_result: if given, called as ``on_result(line_no, source_ids, nbest)``
            for every line, e.g. :class:`nmt.plot.AttentionPlots`
        """
        sources = self.encode(lines, first_line_no)
        hyps = translate_ids(self.model, sources, opts or self.opts, self.device)
        out = []
        for k, nbest in enumerate(hyps):
            texts = self.trg_tok.decode([h.tokens for h in nbest])
            out.append(list(zip(texts, nbest)))
            if on_result is not None:
                on_result(first_line_no + k, sources[k], out[-1])
        return out

    def translate_lines(self, lines: list[str], on_result=None) -> list[str]:
        """The best translation of every line (``on_result`` as in :meth:`translate`)."""
        return [nbest[0][0] for nbest in self.translate(lines, on_result=on_result)]


def format_nbest(index: int, nbest: list[tuple[str, Hypothesis]]) -> list[str]:
    """n-best lines: `input index <TAB> rank <TAB> score <TAB> translation` (0-based index)."""
    return [f"{index}\t{rank}\t{hyp.score:.4f}\t{one_line(text)}" for rank, (text, hyp) in enumerate(nbest, 1)]


def read_lines(stream) -> Iterator[str]:
    """Lines of a binary stream as text: invalid UTF-8 replaced (with one warning per line),
    CR/LF stripped, NUL bytes removed."""
    for number, raw in enumerate(stream, 1):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            print(f"warning: line {number}: invalid UTF-8 replaced with U+FFFD", file=sys.stderr)
        yield text.replace("\x00", "")


def windows(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Group a stream of lines into lists of at most `size` lines."""
    window: list[str] = []
    for line in lines:
        window.append(line)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def translate_stream(translator: Translator, lines: Iterable[str], out: TextIO, *, window: int = 1000, nbest: int = 1,
                     on_result=None) -> int:
    """Translate a stream window by window, writing each window's results as it finishes.
    ``on_result`` is passed on to :meth:`Translator.translate`.

    Returns the number of input lines translated (= the number of output lines, or of
    n-best groups).
    """
    count = 0
    for chunk in windows(lines, window):
        results = translator.translate(chunk, first_line_no=count + 1, on_result=on_result)
        for k, result in enumerate(results):
            if nbest > 1:
                out.write("\n".join(format_nbest(count + k, result)) + "\n")
            else:
                out.write(one_line(result[0][0]) + "\n")
        out.flush()
        count += len(chunk)
    return count


def one_line(text: str) -> str:
    """Guard the one-line-per-input invariant against pieces that decode to line breaks."""
    return text.replace("\r", " ").replace("\n", " ")


def normalize_input(line: str) -> str:
    """The normalisation training text had: Unicode NFC, single spaces, no outer spaces."""
    return " ".join(unicodedata.normalize("NFC", line).split())
