"""Corpus sources: local files, file:// URLs with the download cache, hub datasets, mirrors."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest

from conftest import synthetic_pairs, write_split
from nmt.data import DataError
from nmt.data.sources import MissingSplit, cache_dir, open_split, read_lines, read_parallel

PAIRS = synthetic_pairs(30)


def _read(config, split, **kw):
    return list(open_split(config, split, **kw).pairs())


# ------------------------------------------------------------------------ text files


@pytest.mark.parametrize("gz", [False, True])
def test_local_source_reads_plain_and_gzip(tmp_path, make_recipe, gz):
    write_split(tmp_path, "train", PAIRS, gz=gz)
    suffix = ".gz" if gz else ""
    recipe = make_recipe({"source": "local", "path": str(tmp_path / f"{{split}}.{{lang}}{suffix}")})
    assert _read(recipe.data, "train") == PAIRS


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path):
    (tmp_path / "a.txt").write_bytes(gzip.compress("eins\nzwei\n".encode()))
    (tmp_path / "b.gz").write_bytes(b"one\ntwo\n")
    assert list(read_lines(tmp_path / "a.txt")) == ["eins", "zwei"]
    assert list(read_lines(tmp_path / "b.gz")) == ["one", "two"]


@pytest.mark.parametrize(
    "data, lines",
    [
        (b"a\nb\n", ["a", "b"]),
        (b"a\r\nb\r\n", ["a", "b"]),
        (b"a\nb", ["a", "b"]),  # no final newline
        (b"\xef\xbb\xbfa\n", ["a"]),  # byte-order mark on line 1
        (b"\n  x \t\n\n", ["", "  x \t", ""]),  # nothing else is touched
        ("a\u2028b\n".encode(), ["a\u2028b"]),  # only \n ends a line
        (b"", []),
    ],
)
def test_read_lines_table(tmp_path, data, lines):
    (tmp_path / "f").write_bytes(data)
    assert list(read_lines(tmp_path / "f")) == lines


@pytest.mark.parametrize(
    "data, message",
    [
        (b"ok\n\xff\xfe bad\n", "line 2: invalid UTF-8"),
        (b"ok\nfine\nx\x00y\n", "line 3: NUL byte; not a text file"),
        (b"\x1f\x8b\x08\x00garbage-not-deflate", "unreadable gzip data"),
        (gzip.compress(b"a\nb\nc\n" * 100)[:-30], "unreadable gzip data"),  # truncated
        (gzip.compress(b"ok\n\xc3\x28\n"), "line 2: invalid UTF-8"),
        (b"ok\n" + b"x" * 2_500_000, "line 2: longer than"),
    ],
)
def test_read_lines_errors_name_file_and_line(tmp_path, data, message):
    path = tmp_path / "broken.de"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as error:
        list(read_lines(path))
    assert str(path) in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.de'}: file not found"):
        list(read_lines(tmp_path / "nope.de"))


def test_unequal_line_counts_name_both_files_and_counts(tmp_path):
    (tmp_path / "a.de").write_text("1\n2\n3\n")
    (tmp_path / "a.en").write_text("1\n2\n3\n4\n5\n")
    with pytest.raises(DataError) as error:
        list(read_parallel(tmp_path / "a.de", tmp_path / "a.en"))
    message = str(error.value)
    assert f"{tmp_path / 'a.de'} has 3 lines" in message and f"{tmp_path / 'a.en'} has 5" in message


def test_missing_local_split_is_missing_split(tmp_path, make_recipe):
    recipe = make_recipe({"source": "local", "path": str(tmp_path / "{split}.{lang}")})
    with pytest.raises(MissingSplit, match="test.de: file not found"):
        open_split(recipe.data, "test")


# ----------------------------------------------------------------------------- URLs


def test_url_source_downloads_once_and_reuses_the_cache(tmp_path, make_recipe):
    write_split(tmp_path / "remote", "train", PAIRS, gz=True)
    template = (tmp_path / "remote").as_uri() + "/{split}.{lang}.gz"
    recipe = make_recipe({"source": "url", "path": template})
    assert _read(recipe.data, "train") == PAIRS
    cached = sorted(p.name for p in cache_dir().iterdir())
    assert len(cached) == 2 and all(name.endswith(("-train.de.gz", "-train.en.gz")) for name in cached)
    for path in (tmp_path / "remote").iterdir():  # the "server" goes away: the cache answers
        path.unlink()
    assert _read(recipe.data, "train") == PAIRS
    assert sorted(p.name for p in cache_dir().iterdir()) == cached


def test_url_missing_file_is_missing_split(tmp_path, make_recipe):
    recipe = make_recipe({"source": "url", "path": tmp_path.as_uri() + "/{split}.{lang}.gz"})
    with pytest.raises(MissingSplit, match="cannot reach .*test.de.gz"):
        open_split(recipe.data, "test")
    assert not any(cache_dir().iterdir())  # nothing half-downloaded


def test_unreachable_url_says_so_quickly(make_recipe):
    url = "http://127.0.0.1:9/{split}.{lang}.gz"  # the discard port: connection refused
    recipe = make_recipe({"source": "url", "path": url})
    started = time.time()
    with pytest.raises(DataError, match=r"cannot reach http://127\.0\.0\.1:9/train\.de\.gz: .*--data-dir"):
        open_split(recipe.data, "train")
    assert time.time() - started < 10


# --------------------------------------------------------------------------- mirrors


def test_mirror_replaces_url_source_and_prefers_gz(tmp_path, make_recipe):
    write_split(tmp_path / "mirror", "train", PAIRS, gz=True)
    write_split(tmp_path / "mirror", "train", PAIRS[:3])  # plain copies are ignored
    write_split(tmp_path / "mirror", "val", PAIRS[:5])  # only plain: used
    recipe = make_recipe({"source": "url", "path": "http://127.0.0.1:9/{split}.{lang}"})
    assert _read(recipe.data, "train", data_dir=tmp_path / "mirror") == PAIRS
    assert _read(recipe.data, "val", data_dir=tmp_path / "mirror") == PAIRS[:5]
    with pytest.raises(MissingSplit, match="test.de.gz: file not found"):
        open_split(recipe.data, "test", data_dir=tmp_path / "mirror")


def test_mirror_does_not_redirect_a_local_source(tmp_path, make_recipe):
    write_split(tmp_path / "mine", "train", PAIRS[:4])
    write_split(tmp_path / "mirror", "train", PAIRS)
    recipe = make_recipe({"source": "local", "path": str(tmp_path / "mine" / "{split}.{lang}")})
    assert _read(recipe.data, "train", data_dir=tmp_path / "mirror") == PAIRS[:4]


# ------------------------------------------------------------------------------- hub


def _jsonl(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    """A local dataset folder with a `translation` dict column, as many hub datasets have."""
    folder = tmp_path / "hub"
    _jsonl(folder, "train", [{"translation": {"de": s, "en": t}} for s, t in PAIRS])
    _jsonl(folder, "validation", [{"translation": {"de": "ein\nzwei", "en": "one\r\ntwo"}}])
    return folder


def test_hub_translation_dict(hub_folder, make_recipe):
    recipe = make_recipe({"source": "hub", "path": str(hub_folder)})
    assert _read(recipe.data, "train") == PAIRS
    assert _read(recipe.data, "validation") == [("ein zwei", "one two")]  # one sentence per line


def test_hub_language_columns_and_hub_columns(tmp_path, make_recipe):
    folder = tmp_path / "hub"
    _jsonl(folder, "train", [{"de": s, "en": t, "src": t, "tgt": s} for s, t in PAIRS])
    recipe = make_recipe({"source": "hub", "path": str(folder)})
    assert _read(recipe.data, "train") == PAIRS
    mapped = make_recipe({"source": "hub", "path": str(folder), "hub_columns": ["src", "tgt"]})
    assert _read(mapped.data, "train") == [(t, s) for s, t in PAIRS]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"hub_columns": ["src", "nope"]}, r"no column 'nope' \(columns: src, de, en\)"),
        ({"src_lang": "fr"}, r"no column 'fr' and no 'translation' column \(columns: src, de, en\)"),
    ],
)
def test_hub_missing_column_names_it(tmp_path, make_recipe, data, message):
    _jsonl(tmp_path / "hub", "train", [{"src": s, "de": s, "en": t} for s, t in PAIRS])
    recipe = make_recipe({"source": "hub", "path": str(tmp_path / "hub"), **data})
    with pytest.raises(DataError, match=message):
        open_split(recipe.data, "train")


def test_hub_translation_without_language(hub_folder, make_recipe):
    recipe = make_recipe({"source": "hub", "path": str(hub_folder), "src_lang": "fr"})
    with pytest.raises(DataError, match="column 'translation' has no 'fr'"):
        open_split(recipe.data, "train")


def test_hub_missing_split_is_missing_split(hub_folder, make_recipe):
    recipe = make_recipe({"source": "hub", "path": str(hub_folder)})
    with pytest.raises(MissingSplit, match="Unknown split"):
        open_split(recipe.data, "test")


def test_unreachable_hub_name_fails_fast(make_recipe):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    recipe = make_recipe({"source": "hub", "path": "no-such-user/no-such-dataset"})
    started = time.time()
    with pytest.raises(DataError, match="cannot reach hub dataset no-such-user/no-such-dataset: .*--data-dir"):
        open_split(recipe.data, "train")
    assert time.time() - started < 5


def test_hub_source_reads_a_text_mirror(tmp_path, make_recipe):
    write_split(tmp_path / "mirror", "train", PAIRS)
    recipe = make_recipe({"source": "hub", "path": "no-such-user/no-such-dataset"})
    assert _read(recipe.data, "train", data_dir=tmp_path / "mirror") == PAIRS
