"""Generate a synthetic parallel corpus and time `nmt preprocess` on it (a scale test).

    python tools/make_synthetic_corpus.py --pairs 5000000 --out /tmp/synthetic

Writes OUT/corpus/{train,valid,test}.{xx,yy}.gz (or plain with --plain): two made-up
"languages" with Zipf-distributed, word-like tokens, sentences of 5-30 words, the target
a noisy word-by-word translation of the source (different lengths, local reordering).
Then writes OUT/recipe.yaml (local source, dedup on, an 8,000-piece vocabulary sampled
from at most 1,000,000 sentences), runs preprocess into OUT/run with force=True, and
prints the time, pairs per second and the peak resident memory (this process and its
children, from getrusage). Generation streams in chunks; so does preprocess, which is
meant to stay well under 4 GB for 5M pairs.
"""

from __future__ import annotations

import argparse
import gzip
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from nmt.data import preprocess  # noqa: E402
from nmt.recipe import load_recipe  # noqa: E402

LANGS = ("xx", "yy")
LEXICON = 30_000
CHUNK = 50_000
RECIPE = """\
name: synthetic
data:
  src_lang: xx
  trg_lang: yy
  source: local
  path: {corpus}/{{split}}.{{lang}}{suffix}
  train_split: train
  valid_split: valid
  test_splits: [test]
  dedup: true
tokenizer:
  type: {tokenizer_type}
  vocab_size: {vocab_size}
  input_sentence_size: 1000000
"""


def lexicon(rng: np.random.Generator, consonants: str, vowels: str) -> np.ndarray:
    """Distinct word-like strings, shortest first (so frequent words come out short)."""
    pick = random.Random(int(rng.integers(2**31)))
    words: set[str] = set()
    while len(words) < LEXICON:
        syllables = pick.randint(1, 4)
        words.add("".join(pick.choice(consonants) + pick.choice(vowels) for _ in range(syllables)))
    return np.array(sorted(words, key=lambda w: (len(w), w)), dtype=object)


def sentence_pairs(n: int, rng: np.random.Generator):
    """Yield (source lines, target lines) chunks of synthetic parallel sentences."""
    src_words = lexicon(rng, "bdfgklmnprstvz", "aeiou")
    trg_words = lexicon(rng, "bcdfghjklmnprstwßç", "aeiouäöüé")
    zipf = 1.0 / np.arange(1, LEXICON + 1) ** 1.1
    zipf /= zipf.sum()
    translation = rng.permutation(LEXICON)
    # frequent source words translate to frequent target words, roughly
    translation = np.sort(translation[:2000]).tolist() + translation[2000:].tolist()
    translation = np.array(translation)
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        ids = rng.choice(LEXICON, size=(size, 34), p=zipf)
        lengths = rng.integers(5, 31, size=size)
        trg_ids = translation[ids]
        swap = rng.random((size, 16)) < 0.3  # local reordering of adjacent word pairs
        even, odd = trg_ids[:, 0:32:2].copy(), trg_ids[:, 1:32:2].copy()
        trg_ids[:, 0:32:2] = np.where(swap, odd, even)
        trg_ids[:, 1:32:2] = np.where(swap, even, odd)
        trg_lengths = np.clip(lengths + rng.integers(-2, 4, size=size), 3, 34)
        yield _join(src_words, ids, lengths), _join(trg_words, trg_ids, trg_lengths)


def _join(words: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Sentence strings from rows of word ids, row i cut to lengths[i] words."""
    flat = words[ids[np.arange(ids.shape[1]) < lengths[:, None]]].tolist()
    ends = np.cumsum(lengths).tolist()
    return [" ".join(flat[start:end]) for start, end in zip([0, *ends[:-1]], ends)]


def write_split(folder: Path, split: str, n: int, rng: np.random.Generator, plain: bool) -> None:
    suffix = "" if plain else ".gz"
    outputs = [
        open(folder / f"{split}.{lang}", "w", encoding="utf-8") if plain  # noqa: SIM115
        else gzip.open(folder / f"{split}.{lang}{suffix}", "wt", encoding="utf-8", compresslevel=1)
        for lang in LANGS
    ]
    for chunk in sentence_pairs(n, rng):
        for out, lines in zip(outputs, chunk):
            out.write("\n".join(lines) + "\n")
    for out in outputs:
        out.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5_000_000, help="training pairs (default 5,000,000)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--plain", action="store_true", help="write plain text instead of gzip")
    parser.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    parser.add_argument(
        "--tokenizer-type", choices=["unigram", "bpe"], default="unigram", help="sentencepiece model type"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the corpus (the recipe keeps its default)")
    parser.add_argument("--reuse", action="store_true", help="keep an existing corpus of the same size")
    args = parser.parse_args()

    corpus = args.out.resolve() / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    marker = corpus / "PAIRS"
    suffix = "" if args.plain else ".gz"
    wanted = f"{args.pairs}{suffix}"
    if args.reuse and marker.is_file() and marker.read_text().strip() == wanted:
        print(f"reusing the corpus in {corpus}", file=sys.stderr)
    else:
        started = time.time()
        rng = np.random.default_rng(args.seed)
        for split, n in (("train", args.pairs), ("valid", 2000), ("test", 2000)):
            write_split(corpus, split, n, rng, args.plain)
        marker.write_text(wanted + "\n")
        print(f"generated {args.pairs:,} pairs in {time.time() - started:.1f} s", file=sys.stderr)

    recipe_path = args.out.resolve() / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(
        corpus=corpus, suffix=suffix, vocab_size=args.vocab_size, tokenizer_type=args.tokenizer_type
    ))
    recipe = load_recipe(recipe_path)
    started = time.time()
    manifest = preprocess(recipe, args.out.resolve() / "run", force=True)
    seconds = time.time() - started

    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    read = manifest["cleaning"]["read"]
    train = manifest["splits"]["train"]
    print(
        f"preprocess: {read:,} pairs in {seconds:.1f} s = {read / seconds:,.0f} pairs/s; "
        f"kept {manifest['cleaning']['kept']:,}; peak RSS {peak_self:,.0f} MiB "
        f"(children {peak_children:,.0f} MiB); pieces per sentence: "
        f"src {train['src_tokens'] / train['pairs']:.1f}, trg {train['trg_tokens'] / train['pairs']:.1f}"
    )


if __name__ == "__main__":
    main()
