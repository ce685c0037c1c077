"""The data stage behind `nmt preprocess`: recipe -> run_dir/data/ artifacts.

Outputs in `run_dir/data/`:

    manifest.json                 hashes, counts per split and cleaning rule, vocabulary
                                  sizes, test splits, package versions, time
    spm.model                     joint sentencepiece model (or spm.src.model + spm.trg.model)
    train.clean.{src,trg}.txt     cleaned training text, before the length rules
    {valid,<test>}.{src,trg}.txt  raw text exactly as read (BLEU sources and references)
    {split}.{src,trg}.ids.npy     encoded splits (see `nmt.data.corpus`)
    {split}.{src,trg}.offsets.npy

The work runs in three stages, each redone only when what it depends on changed:
text (read and clean; the `data` section minus the length rules), tokenizer (the
`tokenizer` section) and encoding (everything). Nothing changed: nothing is done.

Outputs are written into a fresh hidden folder next to `data/` and swapped in only once
complete, so an error or an interrupt leaves `data/` exactly as it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nmt.data import DataError
from nmt.data.clean import CleanStats, clean_text_pairs, length_filter
from nmt.data.corpus import SIDES, TokenArrayWriter, clean_text_file, text_file
from nmt.data.sources import MissingSplit, SplitSource, describe, open_split, read_parallel
from nmt.data.tokenizer import TRAIN_THREADS, Tokenizer, tokenizer_files, train_tokenizer

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 100_000  # pairs per encoding / writing chunk
LENGTH_RULES = ("max_len", "max_len_ratio")  # applied at encoding; the text stage ignores them


def preprocess(recipe, run_dir: Path, *, data_dir: Path | None = None, force: bool = False) -> dict:
    """Run the data stage into `run_dir/data`; return the manifest dict.

    `data_dir` is a local mirror replacing downloads (see `nmt.data.sources`);
    `force` redoes every stage. Logs, progress bars and the summary go to stderr.
    """
    started = time.time()
    out = Path(run_dir) / "data"
    keys = _stage_keys(recipe)
    old = None if force else _read_manifest(out)
    if old is not None and _is_current(old, keys, out):
        _log(f"{out} is up to date (data and tokenizer sections unchanged); nothing to do")
        return old
    reuse_text = (old is not None and old.get("text_hash") == keys["text_hash"]
                  and _intact(old, out, _text_files(old.get("splits") or {})))
    reuse_tokenizer = reuse_text and old.get("tokenizer_hash") == keys["tokenizer_hash"]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_folder(out.parent, ".partial")
    try:
        if reuse_text:
            _log("reusing the cleaned training text and the valid/test text")
            _link(out, staging, _text_files(old["splits"]))
            stats = CleanStats.from_dict(old["cleaning"])
            source_splits = {name: info["source_split"] for name, info in old["splits"].items()}
        else:
            stats, source_splits = _read_text(recipe.data, staging, data_dir)
        tokenizers = _tokenizers(recipe, staging, out if reuse_tokenizer else None)
        splits = _encode_all(recipe.data, staging, tokenizers, stats, source_splits)
        manifest = _manifest(recipe, keys, stats, splits, tokenizers, staging, data_dir, started)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log_summary(manifest, out)
    return manifest


def is_fresh(recipe, run_dir: Path) -> bool:
    """True when run_dir/data is complete and matches the recipe's data and tokenizer sections."""
    out = Path(run_dir) / "data"
    manifest = _read_manifest(out)
    return manifest is not None and _is_current(manifest, _stage_keys(recipe), out)


# ---------------------------------------------------------------------------- stages


def _read_text(config, staging: Path, data_dir: Path | None) -> tuple[CleanStats, dict[str, str]]:
    """Stage 1: read every split, clean the training pairs, write all text files.

    Returns the cleaning counts so far and {artifact split name: source split name}.
    """
    _log(f"reading {config.src_lang}-{config.trg_lang} from {describe(config, data_dir)}")
    train = open_split(config, config.train_split, data_dir=data_dir)
    valid = open_split(config, config.valid_split, data_dir=data_dir)
    tests: dict[str, SplitSource] = {}
    for name in config.test_splits:
        try:
            tests[name] = open_split(config, name, data_dir=data_dir)
        except MissingSplit as e:
            _log(f"warning: skipping test split '{name}': {e}")

    stats = CleanStats()
    pairs: Iterable[tuple[str, str]] = train.pairs()
    if config.max_train_pairs:
        pairs = itertools.islice(pairs, config.max_train_pairs)
    pairs = _progress(pairs, f"read {config.train_split}")
    cleaned = clean_text_pairs(pairs, stats, normalize_text=config.normalize, dedup=config.dedup)
    kept = _write_text(cleaned, staging, [clean_text_file(side) for side in SIDES])
    if stats.read == 0:
        raise DataError(f"training split '{config.train_split}' is empty ({train.where})")
    if kept == 0:
        raise DataError(f"no training pairs left after cleaning: {_dropped(stats)}")

    source_splits = {"train": config.train_split, "valid": config.valid_split}
    for name, split in [("valid", valid), *tests.items()]:
        names = [text_file(name, side) for side in SIDES]
        if _write_text(split.pairs(), staging, names) == 0:  # nothing to score BLEU on
            if name == "valid":
                raise DataError(f"validation split '{config.valid_split}' is empty ({split.where})")
            _log(f"warning: skipping test split '{name}': it is empty ({split.where})")
            for file in names:
                (staging / file).unlink()
            continue
        source_splits[name] = split.split
    return stats, source_splits


def _tokenizers(recipe, staging: Path, reuse_from: Path | None) -> tuple[Tokenizer, Tokenizer]:
    """Stage 2: train the sentencepiece model(s) on the cleaned text, or reuse them."""
    config = recipe.tokenizer
    src_name, trg_name = tokenizer_files(config.joint)
    texts = [staging / clean_text_file(side) for side in SIDES]
    inputs = {src_name: texts} if config.joint else {src_name: texts[:1], trg_name: texts[1:]}
    if reuse_from is not None and all((reuse_from / name).is_file() for name in inputs):
        _log("reusing the sentencepiece model(s)")
        _link(reuse_from, staging, list(inputs))
    else:
        what = "joint" if config.joint else "one per language"
        _log(f"training sentencepiece ({config.type}, {config.vocab_size} pieces, {what})")
        for name, files in inputs.items():
            (staging / name).write_bytes(train_tokenizer(files, config, seed=recipe.seed))
    src = Tokenizer.from_file(staging / src_name)
    return (src, src) if config.joint else (src, Tokenizer.from_file(staging / trg_name))


def _encode_all(config, staging: Path, tokenizers, stats: CleanStats, source_splits: dict) -> dict:
    """Stage 3: encode every split; the length rules apply to the training split only."""
    splits = {}
    for name in source_splits:
        if name == "train":
            files = [staging / clean_text_file(side) for side in SIDES]
        else:
            files = [staging / text_file(name, side) for side in SIDES]
        rules = (config.max_len, config.max_len_ratio) if name == "train" else None
        counts = _encode_split(files, staging, name, tokenizers, stats if rules else None, rules)
        splits[name] = {"source_split": source_splits[name], **counts}
    if splits["train"]["pairs"] == 0:
        raise DataError(f"no training pairs left after cleaning: {_dropped(stats)}")
    return splits


def _encode_split(files, staging, name, tokenizers, stats, rules) -> dict:
    writers = [TokenArrayWriter(staging, name, side, tok.vocab_size) for side, tok in zip(SIDES, tokenizers)]
    if stats is not None:
        stats.too_long = stats.ratio = 0
    lines = 0
    for src_texts, trg_texts in _chunks(read_parallel(*files), CHUNK, f"encode {name}"):
        lines += len(src_texts)
        encoded = [tok.encode_flat(texts) for tok, texts in zip(tokenizers, (src_texts, trg_texts))]
        if rules is not None:
            too_long, bad_ratio = length_filter(encoded[0][1], encoded[1][1], max_len=rules[0], max_ratio=rules[1])
            stats.too_long += int(too_long.sum())
            stats.ratio += int(bad_ratio.sum())
            keep = ~(too_long | bad_ratio)
            encoded = [(ids[np.repeat(keep, lengths)], lengths[keep]) for ids, lengths in encoded]
        for writer, (ids, lengths) in zip(writers, encoded):
            writer.append(ids, lengths)
    for writer in writers:
        writer.close()
    if stats is not None:
        stats.kept = writers[0].sentences
    return {
        "lines": lines,
        "pairs": writers[0].sentences,
        "src_tokens": writers[0].tokens,
        "trg_tokens": writers[1].tokens,
    }


# ---------------------------------------------------------------------------- helpers


def _stage_keys(recipe) -> dict[str, str]:
    data = recipe.to_dict()["data"]
    text = {k: v for k, v in data.items() if k not in LENGTH_RULES}
    blob = json.dumps(text, sort_keys=True)
    return {
        "data_hash": recipe.section_hash("data"),
        "tokenizer_hash": recipe.section_hash("tokenizer"),
        "text_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
    }


def _read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def _is_current(manifest: dict, keys: dict, out: Path) -> bool:
    if manifest.get("data_hash") != keys["data_hash"] or manifest.get("tokenizer_hash") != keys["tokenizer_hash"]:
        return False
    return _intact(manifest, out, list(manifest.get("files") or {}))


def _intact(manifest: dict, out: Path, names: list[str]) -> bool:
    """True when each of `names` is in `out` with the size the manifest recorded for it."""
    files = manifest.get("files") or {}
    return bool(names) and all(
        name in files and (out / name).is_file() and (out / name).stat().st_size == files[name] for name in names
    )


def _text_files(splits: dict) -> list[str]:
    names = [clean_text_file(side) for side in SIDES]
    return names + [text_file(split, side) for split in splits if split != "train" for side in SIDES]


def _write_text(pairs: Iterable[tuple[str, str]], folder: Path, names: list[str]) -> int:
    """Write pairs as two sentence-per-line UTF-8 files; return the number of pairs."""
    count = 0
    with open(folder / names[0], "w", encoding="utf-8", newline="\n") as src_out, open(
        folder / names[1], "w", encoding="utf-8", newline="\n"
    ) as trg_out:
        for src_chunk, trg_chunk in _chunks(pairs, CHUNK):
            src_out.write("\n".join(src_chunk) + "\n")
            trg_out.write("\n".join(trg_chunk) + "\n")
            count += len(src_chunk)
    return count


def _chunks(pairs: Iterable[tuple[str, str]], size: int, desc: str | None = None) -> Iterator[tuple[list, list]]:
    """Group a pair stream into (sources, targets) lists of at most `size`."""
    iterator = iter(pairs)
    with tqdm(desc=desc, unit=" pairs", file=sys.stderr, disable=None if desc else True) as bar:
        while chunk := list(itertools.islice(iterator, size)):
            bar.update(len(chunk))
            yield [p[0] for p in chunk], [p[1] for p in chunk]


def _progress(items: Iterable, desc: str) -> Iterator:
    return tqdm(items, desc=desc, unit=" pairs", file=sys.stderr, disable=None, miniters=1000)


def _link(source: Path, target: Path, names: list[str]) -> None:
    """Hard-link (else copy) files that a stage reuses from the previous output."""
    for name in names:
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def _hidden_folder(parent: Path, suffix: str) -> Path:
    """A new uniquely named `.data-*` folder, with the usual (umask) permissions."""
    path = Path(tempfile.mkdtemp(prefix=".data-", suffix=suffix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the completed `staging` folder."""
    previous = None
    if out.exists():
        previous = _hidden_folder(out.parent, ".old")
        os.replace(out, previous / "data")
    os.replace(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _manifest(recipe, keys, stats, splits, tokenizers, staging, data_dir, started) -> dict:
    config = recipe.data
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    return {
        "format": FORMAT,
        **keys,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 2),
        "source": describe(config, data_dir),
        "src_lang": config.src_lang,
        "trg_lang": config.trg_lang,
        "tokenizer": {
            "type": recipe.tokenizer.type,
            "joint": recipe.tokenizer.joint,
            "files": dict(zip(SIDES, tokenizer_files(recipe.tokenizer.joint))),
            "sample_seed": recipe.seed,
            "train_threads": TRAIN_THREADS,
            "ids": {"pad": Tokenizer.pad_id, "unk": Tokenizer.unk_id, "bos": Tokenizer.bos_id, "eos": Tokenizer.eos_id},
        },
        "vocab_size": {side: tok.vocab_size for side, tok in zip(SIDES, tokenizers)},
        "cleaning": stats.to_dict(),
        "splits": splits,
        "test_splits": [name for name in splits if name not in ("train", "valid")],
        "files": {name: (staging / name).stat().st_size for name in files},
        "versions": _versions(hub=config.source == "hub"),
    }


def _versions(*, hub: bool) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("nmt", "numpy", "sentencepiece", *(("datasets",) if hub else ())):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _dropped(stats: CleanStats) -> str:
    rules = ", ".join(f"{rule} {getattr(stats, rule)}" for rule in CleanStats.RULES)
    return f"read {stats.read}, dropped {rules}"


def _log(message: str) -> None:
    print(f"preprocess: {message}", file=sys.stderr, flush=True)


def _log_summary(manifest: dict, out: Path) -> None:
    cleaning = manifest["cleaning"]
    rules = CleanStats.RULES
    name_width = max(8, *(len(name) for name in manifest["splits"]))
    header = f"{'split':<{name_width}} {'read':>9} {'kept':>9}" + "".join(f" {r:>9}" for r in rules)
    rows = [header, "-" * len(header)]
    for name, info in manifest["splits"].items():
        if name == "train":
            counts = [f"{n:,}" for n in (cleaning["read"], info["pairs"], *(cleaning[r] for r in rules))]
        else:
            counts = [f"{info['lines']:,}", f"{info['pairs']:,}", *("-" * len(rules))]
        rows.append(f"{name:<{name_width}}" + "".join(f" {c:>9}" for c in counts))
    sizes = manifest["vocab_size"]
    vocab = f"{sizes['src']} (joint)" if manifest["tokenizer"]["joint"] else f"src {sizes['src']}, trg {sizes['trg']}"
    rows.append(f"vocabulary: {vocab}; wrote {out} in {manifest['seconds']:.1f} s")
    print("\n".join(rows), file=sys.stderr, flush=True)
