"""Every flag of `nmt preprocess`, `nmt train` and `nmt evaluate` does what --help says."""

import gzip

import pytest
from typer.testing import CliRunner

from nmt.cli import app
from toy import make_recipe

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)


def url_recipe(tmp_path):
    """The toy corpus behind an unreachable URL, so only --data-dir can supply it."""
    make_recipe(tmp_path, steps=2)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for path in (tmp_path / "corpus").iterdir():
        (mirror / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    text = (tmp_path / "toy.yaml").read_text()
    text = text.replace("source: local", "source: url").replace(
        f"path: {tmp_path / 'corpus'}/{{split}}.{{lang}}", "path: http://127.0.0.1:9/{split}.{lang}.gz")
    recipe = tmp_path / "url.yaml"
    recipe.write_text(text)
    return recipe, mirror


def test_failed_preprocess_leaves_no_run_folder(tmp_path):
    recipe, _ = url_recipe(tmp_path)  # the URL is unreachable and no --data-dir is given
    run_dir = tmp_path / "new"
    result = runner.invoke(app, ["preprocess", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 1 and "error:" in result.output
    assert not run_dir.exists()


def test_preprocess_flags(tmp_path):
    recipe, mirror = url_recipe(tmp_path)
    run_dir = tmp_path / "somewhere"
    args = ["preprocess", str(recipe), "--run-dir", str(run_dir), "--data-dir", str(mirror)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (run_dir / "data" / "manifest.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0 and "up to date" not in forced.output
    changed = runner.invoke(app, [*args, "--set", "tokenizer.vocab_size=18"])
    assert changed.exit_code == 0 and "reusing the cleaned training text" in changed.output
    unreachable = runner.invoke(app, ["preprocess", str(recipe), "--run-dir", str(tmp_path / "x")])
    assert unreachable.exit_code == 1
    assert "cannot reach http://127.0.0.1:9/train.xx.gz" in unreachable.output
    assert "use --data-dir" in unreachable.output and "Traceback" not in unreachable.output


def test_train_flags_run_dir_restart_device(tmp_path):
    make_recipe(tmp_path, steps=2)
    recipe, run_dir = str(tmp_path / "toy.yaml"), tmp_path / "r"
    base = ["train", recipe, "--run-dir", str(run_dir), "--device", "cpu"]
    assert runner.invoke(app, base).exit_code == 0
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    more = runner.invoke(app, [*base, "--set", "train.max_steps=3"])
    assert more.exit_code == 0 and "resuming from" in more.output
    restarted = runner.invoke(app, [*base, "--restart"])
    assert restarted.exit_code == 0 and "moved to" in restarted.output
    assert len(list(run_dir.glob("old-*"))) == 1
    bad = runner.invoke(app, [*base, "--device", "gpu"])
    assert bad.exit_code == 2 and "--device: expected auto, cpu or cuda" in bad.output


def test_evaluate_split_and_device(trained_run):
    result = runner.invoke(app, ["evaluate", "-m", str(trained_run), "--split", "test", "--device", "cpu", "-b", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("test ")
