"""Attention heatmaps (`nmt translate --attention-dir`, `nmt evaluate --attention N`) and
learning curves (`nmt plot`): real PNG files of a sensible size, and one-line errors."""

import json
import shutil
import struct
from pathlib import Path

import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from nmt.cli import app
from nmt.plot import plot_attention
from nmt.runs import read_metrics

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path, min_bytes: int = 5000) -> None:
    """A PNG with content: not tiny, and not a blank canvas."""
    assert path.stat().st_size > min_bytes
    pixels = imread(path)[..., :3]
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.005


def test_translate_writes_one_heatmap_per_line(trained_run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2\n\nw1 w2 w3 w4 w5 w6 w7\n")
    out_dir = tmp_path / "attention"
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(src), "-b", "1",
                                 "--attention-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    # one output line per input line (the toy model, BLEU about 82, may get a word of
    # the long line wrong: which one follows the rounding of its training)
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "v1 v2" and lines[1] == "" and lines[2].startswith("v1 v2 v3")
    assert sorted(p.name for p in out_dir.iterdir()) == ["000001.png", "000003.png"]  # none for the empty line
    for name in ("000001.png", "000003.png"):
        assert_drawn(out_dir / name)
    (w1, h1), (w3, h3) = png_size(out_dir / "000001.png"), png_size(out_dir / "000003.png")
    assert w3 > w1 and h3 > h1  # the picture grows with the sentence


def test_a_40_piece_sentence_gets_room_for_every_label(tmp_path):
    weights = torch.softmax(torch.randn(40, 41), dim=1).numpy()
    src = [f"▁src{i}" for i in range(40)] + ["</s>"]
    trg = [f"▁trg{i}" for i in range(39)] + ["</s>"]
    plot_attention(tmp_path / "long.png", weights, src, trg, title="forty pieces")
    width, height = png_size(tmp_path / "long.png")
    assert width >= 41 * 20 and height >= 40 * 20  # at least 20 pixels per piece: 8-point labels fit
    assert_drawn(tmp_path / "long.png")


def test_evaluate_draws_the_first_n_sentences(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    result = runner.invoke(app, ["evaluate", "-m", str(run), "-b", "1", "--attention", "3"])
    assert result.exit_code == 0, result.output
    folder = run / "eval" / "attention" / "test"
    assert sorted(p.name for p in folder.iterdir()) == ["000001.png", "000002.png", "000003.png"]
    assert_drawn(folder / "000002.png")


def test_plot_reads_a_real_metrics_log(trained_run, tmp_path):
    result = runner.invoke(app, ["plot", str(trained_run), "-o", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "curves.png") == (1100, 750)
    assert_drawn(tmp_path / "curves.png", min_bytes=20000)
    metrics = read_metrics(trained_run / "metrics.jsonl")
    assert metrics["train"] and metrics["valid"][-1]["valid_bleu"] > 50


def test_plot_compares_runs_and_defaults_to_the_run_folder(trained_run, tmp_path):
    other = tmp_path / "other" / trained_run.name  # same folder name: the legend tells them apart
    other.mkdir(parents=True)
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.update({k: v * 1.5 for k, v in r.items() if k in ("loss", "valid_loss")})
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.invoke(app, ["plot", str(other), str(trained_run / "metrics.jsonl")])
    assert result.exit_code == 0, result.output
    assert_drawn(other / "learning-curves.png", min_bytes=20000)


def test_resumed_log_keeps_the_last_record_of_each_update(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": 5, "loss": 3.0}, {"kind": "train", "step": 10, "loss": 2.0},
             {"kind": "train", "step": 5, "loss": 2.9}, {"kind": "other", "step": 1}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    metrics = read_metrics(log)
    assert [(r["step"], r["loss"]) for r in metrics["train"]] == [(5, 2.9), (10, 2.0)]
    assert metrics["valid"] == []
    with open(log, "a") as f:  # a line a training run is writing (or a crash cut short): left out
        f.write('{"kind": "train", "step": 15, "lo')
    assert read_metrics(log) == metrics


def test_plot_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\nnot json\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    cases = [
        ([str(tmp_path / "missing")], "no metrics log"),
        ([str(bad)], f"{bad / 'metrics.jsonl'}:2: not a JSON record"),
        ([str(empty)], "no training or validation records yet"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["plot", *args, "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 1 and "error: " in result.output and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


def test_attention_dir_that_is_a_file_is_an_error(trained_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "--attention-dir", str(blocker)], input="w1\n")
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output

