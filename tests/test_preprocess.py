"""The data stage end to end: artifacts, caching, atomic failure, and the real Multi30k."""

from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, synthetic_pairs, write_split
from nmt.data import DataError, EncodedCorpus, is_fresh, load_tokenizers, preprocess, read_text_split
from nmt.data.corpus import TokenArrayWriter, clean_text_file, token_dtype


def _local(make_recipe, folder: Path, tokenizer=None, **data):
    fields = {"source": "local", "path": str(folder / "{split}.{lang}"), "valid_split": "val",
              "test_splits": ["test"], "max_len_ratio": 10.0, **data}
    return make_recipe(fields, tokenizer)


def _listing(folder: Path) -> dict[str, int]:
    """Every file under `folder` (hidden ones too) with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_artifacts_and_manifest(corpus_dir, make_recipe, tmp_path):
    manifest = preprocess(_local(make_recipe, corpus_dir), tmp_path / "run")
    data = tmp_path / "run" / "data"
    expected = {"manifest.json", "spm.model", "train.clean.src.txt", "train.clean.trg.txt"}
    for split in ("train", "valid", "test"):
        for side in ("src", "trg"):
            expected |= {f"{split}.{side}.ids.npy", f"{split}.{side}.offsets.npy"}
            if split != "train":
                expected.add(f"{split}.{side}.txt")
    assert {p.name for p in data.iterdir()} == expected
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]  # no leftovers
    assert manifest["test_splits"] == ["test"]
    assert manifest["vocab_size"] == {"src": 100, "trg": 100}
    assert {k: v["pairs"] for k, v in manifest["splits"].items()} == {"train": 300, "valid": 20, "test": 20}
    assert manifest["splits"]["valid"]["source_split"] == "val"
    assert {"nmt", "sentencepiece", "numpy"} <= set(manifest["versions"])
    assert manifest["seconds"] >= 0 and manifest["created"]
    assert is_fresh(_local(make_recipe, corpus_dir), tmp_path / "run")


def test_encoded_corpus_matches_the_tokenizer(corpus_dir, make_recipe, tmp_path):
    preprocess(_local(make_recipe, corpus_dir), tmp_path / "run")
    data = tmp_path / "run" / "data"
    src_tok, trg_tok = load_tokenizers(data)
    src_lines, trg_lines = read_text_split(data, "valid")
    corpus = EncodedCorpus.open(data, "valid")
    assert len(corpus) == len(src_lines) == 20
    assert [corpus.src(i).tolist() for i in range(20)] == src_tok.encode(src_lines)
    assert [corpus.trg(i).tolist() for i in range(20)] == trg_tok.encode(trg_lines)
    assert corpus.src_lengths.dtype == np.int32
    assert corpus.trg_lengths.tolist() == [len(x) for x in trg_tok.encode(trg_lines)]
    train = EncodedCorpus.open(data, "train")
    assert trg_tok.decode([train.trg(0).tolist()]) == [synthetic_pairs(1)[0][1]]
    assert np.load(data / "train.src.ids.npy", mmap_mode="r").dtype == np.uint16
    with pytest.raises(IndexError):
        train.src(len(train))


def test_valid_and_test_text_is_kept_byte_identical_and_uncleaned(tmp_path, make_recipe):
    folder = tmp_path / "c"
    write_split(folder, "train", synthetic_pairs(200))
    odd = [("  Zwei\tLeerzeichen ", "two\u00a0spaces "), ("", "empty source"), ("Cafe\u0301", "x"), ("a", "")]
    write_split(folder, "val", odd)
    (folder / "test.de").write_bytes(gzip.compress("ä\nb\n".encode()))  # gzip under a plain name
    (folder / "test.en").write_bytes(b"A\nB\n")
    preprocess(_local(make_recipe, folder), tmp_path / "run")
    data = tmp_path / "run" / "data"
    assert (data / "valid.src.txt").read_bytes() == (folder / "val.de").read_bytes()
    assert (data / "valid.trg.txt").read_bytes() == (folder / "val.en").read_bytes()
    assert (data / "test.src.txt").read_bytes() == gzip.decompress((folder / "test.de").read_bytes())
    valid = EncodedCorpus.open(data, "valid")
    assert len(valid) == 4 and valid.src_lengths[1] == 0 and valid.trg_lengths[3] == 0


def test_missing_test_split_is_skipped_with_a_warning(corpus_dir, make_recipe, tmp_path, capsys):
    recipe = _local(make_recipe, corpus_dir, test_splits=["test", "test_2099"])
    manifest = preprocess(recipe, tmp_path / "run")
    assert manifest["test_splits"] == ["test"]
    assert "warning: skipping test split 'test_2099'" in capsys.readouterr().err


def test_empty_validation_split_is_an_error_and_empty_test_split_skipped(corpus_dir, make_recipe, tmp_path, capsys):
    for lang in ("de", "en"):
        (corpus_dir / f"nothing.{lang}").write_bytes(b"")
    with pytest.raises(DataError, match=r"validation split 'nothing' is empty \(.*nothing\.de"):
        preprocess(_local(make_recipe, corpus_dir, valid_split="nothing"), tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []
    manifest = preprocess(_local(make_recipe, corpus_dir, test_splits=["test", "nothing"]), tmp_path / "run")
    assert manifest["test_splits"] == ["test"]  # no BLEU to compute on nothing
    assert not (tmp_path / "run" / "data" / "nothing.src.txt").exists()
    assert "warning: skipping test split 'nothing': it is empty" in capsys.readouterr().err


def test_max_train_pairs_and_separate_vocabularies(corpus_dir, make_recipe, tmp_path):
    recipe = _local(make_recipe, corpus_dir, {"joint": False, "vocab_size": 80, "type": "bpe"}, max_train_pairs=120)
    manifest = preprocess(recipe, tmp_path / "run")
    data = tmp_path / "run" / "data"
    assert manifest["cleaning"]["read"] == 120 and manifest["splits"]["train"]["pairs"] == 120
    assert (data / "spm.src.model").is_file() and (data / "spm.trg.model").is_file()
    assert not (data / "spm.model").exists()
    src, trg = load_tokenizers(data)
    assert src is not trg and src != trg and src.vocab_size == trg.vocab_size == 80


def test_caching_redoes_only_what_changed(corpus_dir, make_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _local(make_recipe, corpus_dir)
    preprocess(recipe, run)
    before = _listing(run)
    capsys.readouterr()

    preprocess(recipe, run)  # nothing changed: nothing done
    assert "up to date" in capsys.readouterr().err
    assert _listing(run) == before

    shutil.rmtree(corpus_dir)  # from here on the source is gone: stages must reuse text
    new_tokenizer = _local(make_recipe, corpus_dir, {"vocab_size": 90})
    assert not is_fresh(new_tokenizer, run)
    manifest = preprocess(new_tokenizer, run)
    err = capsys.readouterr().err
    assert "reusing the cleaned training text" in err and "training sentencepiece" in err
    assert manifest["vocab_size"]["src"] == 90 and is_fresh(new_tokenizer, run)

    shorter = _local(make_recipe, corpus_dir, {"vocab_size": 90}, max_len=8)
    manifest = preprocess(shorter, run)
    err = capsys.readouterr().err
    assert "reusing the sentencepiece model" in err and manifest["cleaning"]["too_long"] > 0

    with pytest.raises(DataError, match="file not found"):  # force re-reads the (gone) source
        preprocess(shorter, run, force=True)
    assert is_fresh(shorter, run)  # ... and the failed run left the good output alone


def test_missing_or_changed_text_files_are_read_again_not_reused(corpus_dir, make_recipe, tmp_path, capsys):
    """A run folder whose cleaned text was deleted or edited (by hand, or a copy that left
    it out) is read from the source again when another stage must be redone."""
    run = tmp_path / "run"
    preprocess(_local(make_recipe, corpus_dir), run)
    for broken in ("deleted", "edited"):
        victim = run / "data" / clean_text_file("src")
        if broken == "deleted":
            victim.unlink()
        else:
            victim.write_text("ein anderer Text\n", encoding="utf-8")
        capsys.readouterr()
        recipe = _local(make_recipe, corpus_dir, {"vocab_size": 90 if broken == "deleted" else 95})
        manifest = preprocess(recipe, run)
        err = capsys.readouterr().err
        assert "reading de-en" in err and "reusing the cleaned training text" not in err, broken
        assert is_fresh(recipe, run) and manifest["splits"]["train"]["pairs"] > 1


def test_force_redoes_everything(corpus_dir, make_recipe, tmp_path, capsys):
    recipe = _local(make_recipe, corpus_dir)
    preprocess(recipe, tmp_path / "run")
    capsys.readouterr()
    preprocess(recipe, tmp_path / "run", force=True)
    err = capsys.readouterr().err
    assert "reading de-en" in err and "training sentencepiece" in err and "up to date" not in err


def test_changed_data_section_rereads(corpus_dir, make_recipe, tmp_path, capsys):
    preprocess(_local(make_recipe, corpus_dir), tmp_path / "run")
    capsys.readouterr()
    manifest = preprocess(_local(make_recipe, corpus_dir, dedup=True), tmp_path / "run")
    assert "reading de-en" in capsys.readouterr().err and manifest["cleaning"]["read"] == 300


def _bad_inputs():
    """(name, how to break the corpus folder, the file the message must name, message)."""
    def write(name, data):
        return lambda folder: (folder / name).write_bytes(data)

    def remove(name):
        return lambda folder: (folder / name).unlink()

    return [
        ("missing file", remove("train.en"), "train.en", "file not found"),
        ("unreadable gz", write("val.de", b"\x1f\x8b\x08\x00 not really gzip"), "val.de", "unreadable gzip"),
        ("invalid utf-8", write("test.en", b"ok\nok\n\xff\n" + b"x\n" * 17), "test.en", "line 3: invalid UTF-8"),
        ("not text", write("train.de", bytes(range(256)) * 4), "train.de", "not a text file"),
        ("unequal counts", write("val.en", b"one\n"), "val.en", "val.de has 20 lines, .*val.en has 1$"),
        ("10 MB line", write("train.en", b"a sentence\n" * 3 + b"word " * 2_000_000 + b"\n"), "train.en",
         "line 4: longer than 1,048,576 bytes; not a file of one sentence per line"),
        ("binary file", write("test.de", bytes(random.Random(0).getrandbits(8) for _ in range(100_000))), "test.de",
         "line [0-9]+: (invalid UTF-8|NUL byte)"),
    ]


@pytest.mark.parametrize("name, breakage, culprit, message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_names_the_file_and_leaves_nothing(
    corpus_dir, make_recipe, tmp_path, name, breakage, culprit, message
):
    breakage(corpus_dir)
    run = tmp_path / "run"
    with pytest.raises(DataError, match=message) as error:
        preprocess(_local(make_recipe, corpus_dir), run)
    assert culprit in str(error.value)
    assert list(run.iterdir()) == []  # not even a hidden staging folder


def test_failure_keeps_the_previous_output(corpus_dir, make_recipe, tmp_path):
    run = tmp_path / "run"
    preprocess(_local(make_recipe, corpus_dir), run)
    before = _listing(run)
    (corpus_dir / "train.de").write_bytes(b"\xff\n" * 300)
    with pytest.raises(DataError, match="train.de: line 1: invalid UTF-8"):
        preprocess(_local(make_recipe, corpus_dir, dedup=True), run)
    assert _listing(run) == before


def test_unreachable_url_is_a_clean_error(make_recipe, tmp_path):
    recipe = make_recipe({"source": "url", "path": "http://127.0.0.1:9/{split}.{lang}.gz"})
    with pytest.raises(DataError, match="cannot reach http://127.0.0.1:9/train.de.gz"):
        preprocess(recipe, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


def test_url_source_through_preprocess(corpus_dir, make_recipe, tmp_path):
    recipe = make_recipe({"source": "url", "path": corpus_dir.as_uri() + "/{split}.{lang}", "test_splits": ["test"]})
    manifest = preprocess(recipe, tmp_path / "run")
    assert manifest["splits"]["test"]["pairs"] == 20


def test_hub_source_through_preprocess(make_recipe, tmp_path):
    import json

    folder = tmp_path / "hub"
    folder.mkdir()
    for split, pairs in (("train", synthetic_pairs(200)), ("validation", synthetic_pairs(5, seed=1))):
        rows = "".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in pairs)
        (folder / f"{split}.jsonl").write_text(rows)
    recipe = make_recipe({"source": "hub", "path": str(folder), "valid_split": "validation", "test_splits": ["test"]})
    manifest = preprocess(recipe, tmp_path / "run")
    assert manifest["splits"]["valid"]["pairs"] == 5 and manifest["test_splits"] == []
    assert "datasets" in manifest["versions"]


def test_wide_vocabularies_use_int32(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.int32
    writer = TokenArrayWriter(tmp_path, "x", "src", vocab_size=70_000)
    writer.append(np.array([69_999, 5]), np.array([2, 0]))
    writer.append(np.array([1, 2, 3]), np.array([3]))
    writer.append(np.array([], dtype=np.int32), np.array([], dtype=np.int64))
    writer.close()
    offsets = np.load(tmp_path / "x.src.offsets.npy")
    ids = np.load(tmp_path / "x.src.ids.npy", mmap_mode="r")
    assert ids.dtype == np.int32 and ids.tolist() == [69_999, 5, 1, 2, 3]
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 2, 2, 5]


# ------------------------------------------------------------------ real Multi30k


def _multi30k() -> Path:
    value = os.environ.get("NMT_DATA_DIR")
    if not value:
        pytest.skip("NMT_DATA_DIR is not set")
    path = Path(value)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def test_multi30k_full_read_counts(make_recipe):
    from nmt.data.sources import open_split

    recipe = make_recipe({"test_splits": ["test_2016_flickr"]})  # the default URL recipe
    counts = {split: sum(1 for _ in open_split(recipe.data, split, data_dir=_multi30k()).pairs())
              for split in ("train", "val", "test_2016_flickr")}
    assert counts == {"train": 29000, "val": 1014, "test_2016_flickr": 1000}


def test_multi30k_preprocess(make_recipe, tmp_path):
    recipe = make_recipe({"test_splits": ["test_2016_flickr", "test_2017_mscoco"], "max_train_pairs": 2000},
                         {"vocab_size": 300})
    manifest = preprocess(recipe, tmp_path / "run", data_dir=_multi30k())
    assert manifest["test_splits"] == ["test_2016_flickr"]  # mscoco is not in the mirror
    assert manifest["cleaning"]["read"] == 2000
    assert manifest["splits"]["valid"]["pairs"] == 1014 and manifest["splits"]["test_2016_flickr"]["pairs"] == 1000
    data = tmp_path / "run" / "data"
    reference = gzip.decompress((_multi30k() / "val.en.gz").read_bytes())
    assert (data / "valid.trg.txt").read_bytes() == reference
