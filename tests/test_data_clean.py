"""Cleaning rules, one count each: normalisation, empty, duplicate, too long, ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import synthetic_pairs, write_split
from nmt.data import DataError, preprocess
from nmt.data.clean import CleanStats, clean_text_pairs, length_filter, normalize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a  b", "a b"),
        ("\ta\tb \n", "a b"),
        ("a\u00a0b", "a b"),  # no-break space
        ("a\u3000\u2009b", "a b"),  # ideographic and thin spaces
        ("Cafe\u0301", "Café"),  # NFC composes
        ("  ", ""),
        ("plain", "plain"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def _clean(pairs, **options):
    stats = CleanStats()
    kept = list(clean_text_pairs(pairs, stats, **{"normalize_text": True, "dedup": False, **options}))
    return kept, stats


def test_empty_pairs_are_dropped_and_counted():
    kept, stats = _clean([("a", "b"), ("", "b"), ("a", " \t "), ("c", "d")])
    assert kept == [("a", "b"), ("c", "d")]
    assert (stats.read, stats.empty, stats.duplicate) == (4, 1 + 1, 0)


def test_whitespace_only_is_empty_even_without_normalisation():
    kept, stats = _clean([(" ", "b"), (" a", "b ")], normalize_text=False)
    assert kept == [(" a", "b ")] and stats.empty == 1


@pytest.mark.parametrize("dedup, expected_kept, expected_dupes", [(True, 2, 2), (False, 4, 0)])
def test_duplicates_counted_after_normalisation(dedup, expected_kept, expected_dupes):
    pairs = [("a b", "x"), ("a  b", "x"), ("a b", "y"), ("a b", "x")]
    kept, stats = _clean(pairs, dedup=dedup)
    assert len(kept) == expected_kept and stats.duplicate == expected_dupes
    assert kept[0] == ("a b", "x")  # the first occurrence stays


def test_dedup_does_not_confuse_the_side_boundary():
    kept, _ = _clean([("a b", "c"), ("a", "b c")], dedup=True, normalize_text=False)
    assert len(kept) == 2


@pytest.mark.parametrize(
    "src_len, trg_len, too_long, bad_ratio",
    [
        (5, 5, False, False),
        (10, 9, False, False),  # 10 is the limit
        (10, 11, True, False),
        (11, 3, True, False),  # too long wins; never counted twice
        (1, 3, False, False),  # (3+1)/(1+1) = 2 <= 3: the +1 spares short pairs
        (1, 6, False, True),  # 7/2 = 3.5 > 3
        (0, 2, False, False),  # 3/1 = 3, not above 3
        (2, 8, False, False),  # 9/3 = 3
        (2, 9, False, True),  # 10/3 > 3
    ],
)
def test_length_filter_table(src_len, trg_len, too_long, bad_ratio):
    masks = length_filter(np.array([src_len]), np.array([trg_len]), max_len=10, max_ratio=3.0)
    assert (bool(masks[0][0]), bool(masks[1][0])) == (too_long, bad_ratio)


def test_preprocess_counts_every_rule(tmp_path, make_recipe):
    good = synthetic_pairs(200)
    long_src = " ".join(["kaber"] * 150)
    bad = [
        ("", "leer"), ("leer", "  "),  # empty: 2
        good[0], good[1],  # duplicate: 2
        (long_src, long_src),  # too_long: 1
        ("ka", " ".join(["ebrek"] * 30)),  # ratio: 1
    ]
    write_split(tmp_path / "c", "train", good + bad)
    write_split(tmp_path / "c", "val", good[:5])
    recipe = make_recipe(
        {"source": "local", "path": str(tmp_path / "c" / "{split}.{lang}"), "dedup": True,
         "max_len": 100, "max_len_ratio": 4.0}
    )
    manifest = preprocess(recipe, tmp_path / "run")
    assert manifest["cleaning"] == {
        "read": 206, "empty": 2, "duplicate": 2, "too_long": 1, "ratio": 1, "kept": 200
    }
    assert manifest["splits"]["train"]["pairs"] == 200
    on_disk = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert on_disk["cleaning"] == manifest["cleaning"]


def test_corpus_empty_after_cleaning_is_an_error(tmp_path, make_recipe):
    write_split(tmp_path / "c", "train", [("", "a"), ("b", " ")] * 5)
    write_split(tmp_path / "c", "val", [("a", "b")])
    recipe = make_recipe({"source": "local", "path": str(tmp_path / "c" / "{split}.{lang}")})
    with pytest.raises(DataError, match="no training pairs left after cleaning: read 10, dropped empty 10"):
        preprocess(recipe, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # no partial output at all


def test_corpus_empty_after_length_rules_is_an_error(tmp_path, make_recipe):
    write_split(tmp_path / "c", "train", synthetic_pairs(100))
    write_split(tmp_path / "c", "val", [("a", "b")])
    recipe = make_recipe({"source": "local", "path": str(tmp_path / "c" / "{split}.{lang}"), "max_len": 1})
    with pytest.raises(DataError, match="no training pairs left after cleaning: .*too_long 100"):
        preprocess(recipe, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []
