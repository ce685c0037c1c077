"""Shared test setup: no network, caches in temporary folders, and a tiny parallel corpus."""

from __future__ import annotations

import atexit
import gzip
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before anything imports `datasets`/`huggingface_hub`, which read them at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_HF_CACHE = tempfile.mkdtemp(prefix="nmt-tests-hf-")
os.environ["HF_DATASETS_CACHE"] = _HF_CACHE
atexit.register(shutil.rmtree, _HF_CACHE, True)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline_and_private_caches(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path_factory.mktemp("downloads")))


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Deterministic word-salad pairs: the target is a word-by-word 'translation'."""
    rng = random.Random(seed)
    syllables = ["ka", "ber", "lin", "to", "mu", "sen", "da", "rei", "haus", "ün", "ße", "ach"]
    source_words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(80)})
    target_words = [w[::-1] + "e" for w in source_words]
    pairs = []
    for _ in range(n):
        idx = [rng.randrange(len(source_words)) for _ in range(rng.randint(3, 12))]
        pairs.append((" ".join(source_words[i] for i in idx), " ".join(target_words[i] for i in idx)))
    return pairs


def write_split(folder: Path, split: str, pairs, *, langs=("de", "en"), gz: bool = False) -> None:
    """Write one split as `{split}.{lang}` (or `.gz`) files, one sentence per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for side, lang in enumerate(langs):
        data = "".join(pair[side] + "\n" for pair in pairs).encode("utf-8")
        path = folder / f"{split}.{lang}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A tiny de-en corpus: train (300 pairs), val (20), test (20), plain files."""
    folder = tmp_path / "corpus"
    pairs = synthetic_pairs(340)
    write_split(folder, "train", pairs[:300])
    write_split(folder, "val", pairs[300:320])
    write_split(folder, "test", pairs[320:])
    return folder


@pytest.fixture
def make_recipe():
    """Build a validated recipe from section dicts; a small tokenizer by default."""
    from nmt.recipe import recipe_from_dict

    def make(data: dict, tokenizer: dict | None = None, **top):
        small = {"vocab_size": 100, "input_sentence_size": 1000}
        return recipe_from_dict({"data": data, "tokenizer": {**small, **(tokenizer or {})}, **top})

    return make


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A preprocessed run's data folder (tiny corpus, joint vocabulary of 100), shared."""
    from nmt.data import preprocess
    from nmt.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("tiny")
    pairs = synthetic_pairs(340)
    write_split(root / "corpus", "train", pairs[:300])
    write_split(root / "corpus", "val", pairs[300:320])
    write_split(root / "corpus", "test", pairs[320:])
    recipe = recipe_from_dict({
        "data": {"source": "local", "path": str(root / "corpus" / "{split}.{lang}"), "test_splits": ["test"]},
        "tokenizer": {"vocab_size": 100, "input_sentence_size": 1000},
    })
    preprocess(recipe, root / "run")
    return root / "run" / "data"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run folder with a toy model trained to translate wN -> vN (shared, ~5 s)."""
    from toy import train_toy

    return train_toy(tmp_path_factory.mktemp("toy"))
