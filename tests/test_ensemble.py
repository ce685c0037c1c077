"""Ensembles: log-probabilities averaged over models; an ensemble of one is the model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nmt.checkpoint import CheckpointError, load_model
from nmt.data.batching import EOS_ID, pad
from nmt.ensemble import Ensemble, load_ensemble
from nmt.search import beam_search, greedy_search
from nmt.train import train

from toy import make_recipe


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, trained_run):
    """Another toy model on the same data and vocabulary (another seed)."""
    import shutil

    folder = tmp_path_factory.mktemp("second")
    shutil.copytree(trained_run / "data", folder / "run" / "data")  # the same tokenizer
    shutil.copytree(trained_run.parent / "corpus", folder / "corpus")
    recipe = make_recipe(folder, steps=300, valid_every=300, extra=["seed=11"])
    train(recipe, folder / "run", device="cpu", evaluate_at_end=False)
    return folder / "run"


def batch(loaded, lines):
    src, lengths = pad(loaded.src_tok.encode(lines), suffix=EOS_ID)
    return src, lengths


def same(hyps_a, hyps_b):
    for nbest_a, nbest_b in zip(hyps_a, hyps_b, strict=True):
        for a, b in zip(nbest_a, nbest_b, strict=True):
            assert a.tokens == b.tokens and a.score == b.score and torch.equal(a.attention, b.attention)


@pytest.mark.parametrize("copies", [1, 2])
def test_an_ensemble_of_one_model_is_the_model(trained_run, copies):
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    src, lengths = batch(loaded, ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w0"])
    ensemble = Ensemble([loaded.model] * copies)
    same(beam_search(ensemble, src, lengths, beam_size=3, nbest=3), beam_search(loaded.model, src, lengths,
                                                                                beam_size=3, nbest=3))
    same(greedy_search(ensemble, src, lengths), greedy_search(loaded.model, src, lengths))


def test_ensemble_step_is_the_mean_of_its_members(trained_run, second_run):
    a = load_model(trained_run / "checkpoints" / "best.pt")
    b = load_model(second_run / "checkpoints" / "best.pt")
    ensemble = Ensemble([a.model, b.model])
    src, lengths = batch(a, ["w1 w2 w3", "w4"])
    with torch.inference_mode():
        enc = ensemble.encode(src, lengths)
        state = ensemble.init_state(enc)
        prev = torch.full((2,), a.model.bos_id)
        log_probs, _, attention = ensemble.decode_step(prev, state, enc)
        la, _, wa = a.model.decode_step(prev, a.model.init_state(a.model.encode(src, lengths)), a.model.encode(src, lengths))
        lb, _, wb = b.model.decode_step(prev, b.model.init_state(b.model.encode(src, lengths)), b.model.encode(src, lengths))
    assert torch.allclose(log_probs, (la + lb) / 2) and torch.allclose(attention, (wa + wb) / 2)
    assert not torch.allclose(la, lb)  # two genuinely different models


def test_translate_and_evaluate_with_two_models(trained_run, second_run):
    done = subprocess.run([sys.executable, "-m", "nmt", "translate", "-m", str(trained_run), "-m", str(second_run),
                           "-b", "1"], input=b"w1 w2 w3\n\nw4 w5\n", capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split("\n") == ["v1 v2 v3", "", "v4 v5", ""]
    assert " + " in done.stderr.decode()
    done = subprocess.run([sys.executable, "-m", "nmt", "evaluate", "-m", str(trained_run), "-m", str(second_run),
                           "-b", "2"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert "BLEU" in done.stdout.decode()


def test_members_must_share_the_vocabulary(trained_run, tmp_path):
    recipe = make_recipe(tmp_path, steps=5, extra=["tokenizer.vocab_size=18"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    with pytest.raises(CheckpointError, match="its vocabulary differs from"):
        load_ensemble([trained_run / "checkpoints" / "best.pt", tmp_path / "run" / "checkpoints" / "best.pt"])
