"""tools/compare_cells.py fills the GRU-versus-LSTM table from real (tiny) runs."""

import json
import sys
from pathlib import Path

from toy import make_recipe

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import compare_cells  # noqa: E402


def test_compare_cells_measures_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)  # the toy corpus, not a mirror
    make_recipe(tmp_path, steps=10)
    out = tmp_path / "cells.json"
    result = compare_cells.main(["--recipe", str(tmp_path / "toy.yaml"), "--steps", "2", "--device", "cpu",
                                 "--run-dir", str(tmp_path / "run"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["budget"] == {"steps": 2, "minutes": None} and result["machine"]
    assert result["threads"] == 1  # the toy recipe's train.threads, as the rows ran it
    rows = {row["cell"]: row for row in result["rows"]}
    assert list(rows) == ["exact", "fused", "lstm"]
    assert rows["lstm"]["parameters"] > rows["fused"]["parameters"]  # four gates against three
    for row in rows.values():
        assert row["training"]["steps"] == 2 and row["training"]["trg_tokens_per_s"] > 0
        assert row["training"]["trg_tokens_per_cpu_s"] > 0 and row["training"]["train_cpu_seconds"] > 0
        assert [d["beam_size"] for d in row["decoding"]] == [1, 2]  # validation greedy, recipe beam
        assert all(d["sentences_per_s"] > 0 and 0 <= d["bleu"] <= 100 for d in row["decoding"])
        assert row["peak_rss_mb"] > 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| cell | parameters | training target tok/s (per CPU-s)")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| GRU (exact equations)", "| GRU (fused)", "| LSTM"]


def test_minutes_budget_stops_training(tmp_path, monkeypatch):
    from nmt.data.preprocess import preprocess

    monkeypatch.delenv("NMT_DATA_DIR", raising=False)
    preprocess(make_recipe(tmp_path, steps=10), tmp_path / "run")
    row = compare_cells.measure_cell(str(tmp_path / "toy.yaml"), [], "lstm", tmp_path / "run", "cpu",
                                     steps=10_000, minutes=0.0005)  # 30 ms
    assert 1 <= row["training"]["steps"] < 10_000
    assert row["cell"] == "lstm" and row["training"]["train_seconds"] >= 0.03
