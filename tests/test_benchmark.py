"""tools/benchmark.py runs end to end on the toy task and reports every figure."""

import json
import sys
from pathlib import Path

from toy import make_recipe

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import benchmark  # noqa: E402



def test_benchmark_reports_training_decoding_memory_and_mfu(tmp_path, trained_run, capsys, monkeypatch):
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)  # the toy corpus, not a mirror
    make_recipe(tmp_path, steps=10)
    out = tmp_path / "bench.json"
    result = benchmark.main([
        "--recipe", str(tmp_path / "toy.yaml"), "--device", "cpu", "--steps", "3", "--warmup", "1",
        "--run-dir", str(tmp_path / "run"), "--checkpoint", str(trained_run / "checkpoints" / "best.pt"),
        "--json", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    t = result["training"]
    assert t["trg_tokens_per_s"] > 0 and t["trg_tokens_per_s_no_loading"] > 0 and t["seconds_per_epoch"] > 0
    assert 0 < t["mfu"] < 1.5
    assert [(d["beam_size"], d["precision"]) for d in result["decoding"]] == [(1, "fp32"), (5, "fp32")]
    assert all(d["bleu"] > 50 and d["sentences_per_s"] > 0 for d in result["decoding"])
    assert result["peak_rss_mb"] > 0
    table = capsys.readouterr().out
    assert "MFU" in table and "decode beam 5" in table


def test_flops_count_grows_with_the_vocabulary():
    from nmt.recipe import ModelConfig

    small = benchmark.matmul_shapes(ModelConfig(), 100, 1000, 10, 10.0, 10.0)
    large = benchmark.matmul_shapes(ModelConfig(), 100, 8000, 10, 10.0, 10.0)
    per_token = lambda shapes: benchmark.flops_per_target_token(shapes, 10.0)  # noqa: E731
    # The output layer adds 3 x 2 x out_dim x vocabulary FLOPs per target token.
    assert abs(per_token(large) - per_token(small) - 3 * 2 * 256 * 7000) < 1


def test_tune_decoding_grid_on_the_validation_split(trained_run, tmp_path, capsys):
    import tune_decoding

    rows = tune_decoding.main(["--model", str(trained_run), "--beam", "1,2", "--length-penalty", "0,1",
                               "--json", str(tmp_path / "rows.json")])
    assert sorted((r["beam_size"], r["length_penalty"]) for r in rows) == [(1, None), (2, 0.0), (2, 1.0)]
    assert rows == sorted(rows, key=lambda r: -r["bleu"]) and rows[0]["bleu"] > 50
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "BLEU" in capsys.readouterr().out
