"""`nmt average` and `train.average_best`: the mean of checkpoints' parameters."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from nmt.average import average_checkpoints
from nmt.checkpoint import load_checkpoint, load_model, save_checkpoint
from nmt.cli import app
from nmt.data.tokenizer import Tokenizer
from nmt.recipe import RecipeError
from nmt.train import train

from toy import make_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A toy run that kept its two best checkpoints (the older one first)."""
    folder = tmp_path_factory.mktemp("avg")
    recipe = make_recipe(folder, steps=40, valid_every=20, extra=["train.keep_best=2"])
    train(recipe, folder / "run", device="cpu", evaluate_at_end=False)
    ckpts = folder / "run" / "checkpoints"
    state = load_checkpoint(ckpts / "last.pt")["train_state"]["progress"]
    first, second = sorted(step for _, step in state["best"])
    return folder / "run", ckpts / f"step-{first}.pt", ckpts / f"step-{second}.pt"


def test_averaging_copies_of_one_checkpoint_is_the_identity(two_steps, tmp_path):
    _, a, _ = two_steps
    copies = [shutil.copy(a, tmp_path / f"copy{i}.pt") for i in range(3)]
    average_checkpoints(copies, tmp_path / "avg.pt")
    original, averaged = load_checkpoint(a), load_checkpoint(tmp_path / "avg.pt")
    for name, tensor in original["model"].items():
        assert torch.equal(averaged["model"][name], tensor), name
    assert averaged["model_config"] == original["model_config"] and "train_state" not in averaged
    load_model(tmp_path / "avg.pt")  # a usable checkpoint


def test_average_is_the_mean_and_a_run_folder_gives_its_kept_checkpoints(two_steps, tmp_path):
    run, a, b = two_steps
    result = runner.invoke(app, ["average", str(run), "-o", str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    assert f"averaged 2 checkpoints ({a.name}, {b.name})" in result.output
    pa, pb, avg = (load_checkpoint(p)["model"] for p in (a, b, tmp_path / "avg.pt"))
    for name in pa:
        assert torch.allclose(avg[name], (pa[name] + pb[name]) / 2, atol=1e-7), name
    steps = [load_checkpoint(p)["step"] for p in (a, b)]
    assert load_checkpoint(tmp_path / "avg.pt")["step"] == max(steps)
    assert [x["step"] for x in load_checkpoint(tmp_path / "avg.pt")["averaged"]] == steps


def test_two_runs_of_one_recipe_have_one_vocabulary(two_steps, tmp_path):
    """sentencepiece files of separately trained runs differ in their metadata only."""
    _, a, b = two_steps
    other = load_checkpoint(b)
    # another run's model names another training-text folder (same length: a valid protobuf still)
    other["src_spm"] = other["src_spm"].replace(b".partial/", b".partiaL/")
    assert other["src_spm"] != load_checkpoint(a)["src_spm"]
    assert Tokenizer.from_bytes(other["src_spm"]).same_vocabulary(Tokenizer.from_bytes(load_checkpoint(a)["src_spm"]))
    save_checkpoint(tmp_path / "other.pt", other)
    result = runner.invoke(app, ["average", str(a), str(tmp_path / "other.pt"), "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 0, result.output


def test_checkpoints_of_different_models_are_refused(two_steps, tmp_path):
    _, a, _ = two_steps
    other = load_checkpoint(a)
    other["model_config"] = {**other["model_config"], "dropout_emb": 0.5}
    save_checkpoint(tmp_path / "other.pt", other)
    result = runner.invoke(app, ["average", str(a), str(tmp_path / "other.pt"), "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'other.pt'}: a different model than {a}" in result.output
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("args,message", [
    (["missing.pt"], "missing.pt: checkpoint not found"),
    (["."], "no checkpoints/step-N.pt in this run folder"),
    (["one.pt"], "one.pt: one checkpoint; averaging needs at least 2"),
    (["one.pt", "./one.pt"], "one.pt: given twice (as one.pt); each checkpoint counts once"),
    (["one.pt", "link.pt"], "link.pt: given twice (as one.pt); each checkpoint counts once"),
])
def test_bad_inputs_are_one_line(two_steps, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    shutil.copy(two_steps[1], tmp_path / "one.pt")
    os.link(tmp_path / "one.pt", tmp_path / "link.pt")  # as best.pt is to its step-N.pt
    result = runner.invoke(app, ["average", *args, "-o", "out.pt"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists()


def test_average_best_in_a_recipe(tmp_path, capsys):
    recipe = make_recipe(tmp_path, steps=60, valid_every=20, extra=["train.keep_best=3", "train.average_best=3"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    ckpts = tmp_path / "run" / "checkpoints"
    err = capsys.readouterr().err
    assert "average of the 3 best checkpoints (updates" in err
    averaged = load_checkpoint(ckpts / "average.pt")
    kept = sorted(ckpts.glob("step-*.pt"))
    assert len(averaged["averaged"]) == len(kept) == 3
    bleu = averaged["metrics"]["valid_bleu"]
    single = max(load_checkpoint(p)["metrics"]["valid_bleu"] for p in kept)
    best = load_checkpoint(ckpts / "best.pt")
    assert ("averaged" in best) == (bleu > single)
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"kind": "average"' in records


@pytest.mark.parametrize("extra,message", [
    (["train.average_best=1"], "--set train.average_best: averaging needs at least 2"),
    (["train.keep_best=2", "train.average_best=3"], "cannot exceed train.keep_best \\(2\\)"),
])
def test_average_best_recipe_errors(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(tmp_path, steps=10, extra=extra)
