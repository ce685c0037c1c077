"""`nmt export`: a self-contained model folder that translates exactly like its run
folder, is written atomically, refuses to overwrite, and carries a model card."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from nmt.checkpoint import load_checkpoint, load_model, save_checkpoint
from nmt.cli import app
from nmt.export import export_model
from nmt.model import Seq2Seq

runner = CliRunner()

LINES = "w1 w2 w3\n\nw4 w5 w6 w7 w8 w9\nw0\nw3 w3 w3 w1\n"


def translate(model, tmp_path, *args) -> str:
    src = tmp_path / "in.txt"
    src.write_text(LINES)
    result = runner.invoke(app, ["translate", "-m", str(model), "-i", str(src), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "toy-model"
    result = runner.invoke(app, ["export", str(trained_run), str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_exported_model_translates_identically(trained_run, exported, tmp_path):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "model.json", "model.safetensors", "recipe.yaml", "spm.model"]
    for args in (["-b", "1"], ["--nbest", "3"]):  # n-best lines carry the scores too
        assert translate(exported, tmp_path, *args) == translate(trained_run, tmp_path, *args)
    meta = json.loads((exported / "model.json").read_text())
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert meta["model_config"] == checkpoint["model_config"] and meta["step"] == checkpoint["step"]


def test_export_holds_no_pickle_and_moves_anywhere(exported, tmp_path):
    moved = shutil.copytree(exported, tmp_path / "elsewhere")
    assert not any(p.suffix == ".pt" for p in moved.iterdir())
    loaded = load_model(moved)
    assert loaded.recipe.name == "toy" and loaded.path == moved


def test_export_refuses_a_non_empty_folder_unless_forced(trained_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    refused = runner.invoke(app, ["export", str(trained_run), str(out)])
    assert refused.exit_code == 1 and f"error: {out}: not empty; use --force" in refused.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    forced = runner.invoke(app, ["export", str(trained_run), str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["export", str(trained_run), str(tmp_path / "empty")]).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/run", "OUT"], "no such checkpoint or run folder"),
    (["RUN", "RUN"], "holds the checkpoint being exported"),
    (["RUN", "FILE"], "exists and is not a folder"),
])
def test_export_errors_are_one_line(trained_run, tmp_path, args, message):
    (tmp_path / "file").write_text("")
    names = {"RUN": str(trained_run), "OUT": str(tmp_path / "o"), "FILE": str(tmp_path / "file")}
    result = runner.invoke(app, ["export", *[names.get(a, a) for a in args], "--force"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert (trained_run / "checkpoints" / "best.pt").is_file()


def test_tied_lstm_model_round_trips(trained_run, tmp_path):
    """safetensors stores a tied matrix once; loading ties it again."""
    payload = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    config = {**payload["model_config"], "cell": "lstm", "tie_output": True}
    torch.manual_seed(3)
    model = Seq2Seq(**config)
    save_checkpoint(tmp_path / "tied.pt", {**payload, "model_config": config, "model": model.state_dict()})
    export_model(tmp_path / "tied.pt", tmp_path / "tied")
    loaded = load_model(tmp_path / "tied").model
    assert loaded.decoder.output_layer.weight is loaded.decoder.embed.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_model_card_reports_data_model_training_and_evaluation(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval", ignore_errors=True)
    export_model(run, tmp_path / "before")
    assert "Not evaluated" in (tmp_path / "before" / "README.md").read_text()

    assert runner.invoke(app, ["evaluate", "-m", str(run)]).exit_code == 0  # the recipe's settings
    # other evaluations (greedy, an ensemble) are recorded beside it, not shown as the model's
    assert runner.invoke(app, ["evaluate", "-m", str(run), "-b", "1"]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "-m", str(run), "-m", str(run)]).exit_code == 0
    export_model(run, tmp_path / "after")
    card = (tmp_path / "after" / "README.md").read_text()
    entries = json.loads((run / "eval" / "report.json").read_text())
    assert len(entries) == 3
    report = entries[0]
    assert report["decode"]["beam_size"] == 2 and len(report["models"]) == 1
    meta = json.loads((tmp_path / "after" / "model.json").read_text())
    assert meta["test_scores"] == [report]  # what `nmt serve` shows from the exported folder
    for expected in ("# toy: xx -> yy translation model", "## Data", "training pairs: 600", "## Model",
                     "parameters; cell: fused", "## Training", "trained for 300 updates",
                     f"| test | 40 | {report['bleu']:.2f} |", report["bleu_signature"], report["chrf_signature"],
                     "## Intended use and limits", "nmt translate --model after"):
        assert expected in card, expected
    assert card.count("| test | 40 |") == 1
    # another checkpoint of the run has not been evaluated: its card says so
    export_model(run / "checkpoints" / "last.pt", tmp_path / "other")
    assert "Not evaluated" in (tmp_path / "other" / "README.md").read_text()


def test_evaluate_and_errors_with_an_exported_model(exported, tmp_path):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("w1 w2\nw3\n")
    ref.write_text("v1 v2\nv3\n")
    scored = runner.invoke(app, ["evaluate", "-m", str(exported), "--src", str(src), "--ref", str(ref), "-b", "1"])
    assert scored.exit_code == 0 and "s.txt" in scored.stdout, scored.output
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "model.json").write_text('{"format": "something else"}')
    result = runner.invoke(app, ["translate", "-m", str(broken)], input="w1\n")
    assert result.exit_code == 1 and "not an exported nmt model" in result.output
    (broken / "model.json").write_text((exported / "model.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    result = runner.invoke(app, ["translate", "-m", str(broken)], input="w1\n")
    assert result.exit_code == 1 and "cannot rebuild the model" in result.output and "Traceback" not in result.output
