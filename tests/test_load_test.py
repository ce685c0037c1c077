"""tools/load_test.py drives a real `nmt serve` on the toy model and reports every figure."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import load_test  # noqa: E402


def test_load_test_reports_throughput_latency_and_the_batch_comparison(trained_run, tmp_path, capsys):
    sentences = tmp_path / "in.txt"
    sentences.write_text("w1 w2 w3\nw4 w5\n\nw6\nw7 w8 w9 w0\n")
    out = tmp_path / "load.json"
    result = load_test.main([
        "--model", str(trained_run), "--input", str(sentences), "--clients", "3", "--duration", "1",
        "--sentences-per-request", "2", "--beam-size", "1", "--max-batch", "4", "--max-wait-ms", "5",
        "--json", str(out),
    ])
    assert json.loads(out.read_text()) == result
    server, batch = result["server"], result["batch"]
    assert server["errors"] == 0 and server["requests"] > 0 and server["sentences_per_s"] > 0
    assert server["latency_ms"]["p50"] <= server["latency_ms"]["p95"] <= server["latency_ms"]["p99"]
    assert 1 <= server["mean_batch"] <= 4
    assert batch["sentences"] == 5 and batch["sentences_per_s"] > 0
    assert batch["served_sentences_compared"] == 5 and batch["identical"] == 5
    printed = capsys.readouterr().out
    assert "requests/s" in printed and "p99" in printed and "5 of 5 served translations identical" in printed


def test_load_test_refuses_a_non_loopback_url(trained_run):
    with pytest.raises(SystemExit) as stop:
        load_test.main(["--model", str(trained_run), "--url", "http://10.0.0.1:8000", "--input", "x"])
    assert stop.value.code == 2
