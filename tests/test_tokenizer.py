"""The sentencepiece wrapper: fixed special ids, round trips, serialisation, training errors."""

from __future__ import annotations

import pytest

from conftest import synthetic_pairs
from nmt.data import DataError, Tokenizer, load_tokenizers
from nmt.data.tokenizer import sample_lines, train_tokenizer
from nmt.recipe import TokenizerConfig

SENTENCES = [s for pair in synthetic_pairs(300) for s in pair]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "train.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer(request, text_file) -> Tokenizer:
    config = TokenizerConfig(type=request.param, vocab_size=120, input_sentence_size=1000)
    return Tokenizer.from_bytes(train_tokenizer([text_file], config, seed=1))


def test_reserved_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.vocab_size == 120


def test_encode_has_no_specials_and_round_trips(tokenizer):
    ids = tokenizer.encode(SENTENCES[:50])
    assert len(ids) == 50 and all(isinstance(i, int) for seq in ids for i in seq)
    assert all(min(seq) > 3 for seq in ids)
    assert tokenizer.decode(ids) == SENTENCES[:50]
    flat, lengths = tokenizer.encode_flat(SENTENCES[:50])
    assert lengths.tolist() == [len(seq) for seq in ids] and flat.tolist() == sum(ids, [])


def test_decode_ignores_pad_bos_eos(tokenizer):
    ids = tokenizer.encode(SENTENCES[:2])
    padded = [[2, *ids[0], 3, 0, 0], [2, *ids[1], 3]]
    assert tokenizer.decode(padded) == SENTENCES[:2]
    assert tokenizer.encode([""]) == [[]] and tokenizer.decode([[]]) == [""]


def test_unknown_characters_map_to_unk(tokenizer):
    assert 1 in tokenizer.encode(["漢字"])[0]


def test_from_bytes_equals_from_file(tokenizer, tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(tokenizer.model_bytes)
    loaded = Tokenizer.from_file(path)
    assert loaded == tokenizer == Tokenizer.from_bytes(loaded.model_bytes)
    assert loaded.encode(SENTENCES[:20]) == tokenizer.encode(SENTENCES[:20])


def test_not_a_model(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model at all")
    with pytest.raises(DataError, match="bad.model: not a sentencepiece model"):
        Tokenizer.from_file(tmp_path / "bad.model")
    with pytest.raises(DataError, match="missing.model: cannot read"):
        Tokenizer.from_file(tmp_path / "missing.model")


def test_vocab_too_large_suggests_a_smaller_size(text_file):
    config = TokenizerConfig(vocab_size=5000, input_sentence_size=1000)
    with pytest.raises(DataError, match=r"tokenizer.vocab_size 5000 is too large .*at most \d+.*smaller"):
        train_tokenizer([text_file], config, seed=1)


def test_training_is_reproducible(text_file):
    config = TokenizerConfig(vocab_size=100, input_sentence_size=1000)
    assert train_tokenizer([text_file], config, seed=3) == train_tokenizer([text_file], config, seed=3)


def test_sample_is_seeded_and_sized(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("".join(f"a{i}\n" for i in range(300)))
    files[1].write_text("".join(f"b{i}\n" for i in range(300)))

    def sample(seed, size, name):
        paths = sample_lines(files, size, seed, tmp_path / name)
        return "".join(p.read_text() for p in paths).splitlines()

    first, again, other = sample(1, 100, "1"), sample(1, 100, "2"), sample(2, 100, "3")
    assert first == again and first != other and len(first) == 100 == len(set(first))
    assert any(x.startswith("a") for x in first) and any(x.startswith("b") for x in first)
    assert len(sample(1, 600, "4")) == 600  # everything: the files themselves


def test_load_tokenizers_joint_is_one_object(tiny_data_dir):
    src, trg = load_tokenizers(tiny_data_dir)
    assert src is trg and src.vocab_size == 100


def test_load_tokenizers_without_models(tmp_path):
    with pytest.raises(DataError, match="run `nmt preprocess` first"):
        load_tokenizers(tmp_path)
