"""`nmt evaluate`: scores equal the sacrebleu command line's on the same files."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nmt.cli import app
from nmt.evaluate import score

runner = CliRunner()


def sacrebleu_cli(ref, hyp, *extra) -> float:
    done = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b", "-w", "4", *extra],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def test_evaluate_run_agrees_with_sacrebleu_cli(trained_run):
    result = runner.invoke(app, ["evaluate", "--model", str(trained_run)])
    assert result.exit_code == 0, result.output
    assert "test" in result.stdout and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in result.stdout
    report = json.loads((trained_run / "eval" / "report.json").read_text())
    row = report[-1]  # this evaluation's (other tests evaluate the shared run with other settings)
    hyp = trained_run / "eval" / "test.hyp"
    ref = trained_run / "data" / "test.trg.txt"
    assert row["bleu"] == round(sacrebleu_cli(ref, hyp), 2)
    assert row["chrf"] == round(sacrebleu_cli(ref, hyp, "-m", "chrf"), 2)
    assert row["bleu_lc"] == round(sacrebleu_cli(ref, hyp, "-lc"), 2)
    assert row["bleu"] > 50


def test_report_keeps_each_models_and_settings_scores(trained_run, tmp_path):
    import shutil

    from nmt.evaluate import read_report, scores_of
    from nmt.translate import SearchOptions

    run = shutil.copytree(trained_run, tmp_path / "run")
    report = run / "eval" / "report.json"
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps([{"split": "test", "bleu": 1.0}]))  # without models and settings: ignored
    assert read_report(report) == []
    for args in (["-b", "1"], [], ["-m", str(run)], []):
        result = runner.invoke(app, ["evaluate", "-m", str(run), *args])
        assert result.exit_code == 0, result.output
    entries = json.loads(report.read_text())[1:]
    best = str((run / "checkpoints" / "best.pt").resolve())
    assert [(e["models"], e["decode"]["beam_size"]) for e in entries] == [([best], 1), ([best, best], 2), ([best], 2)]
    entries = json.loads(report.read_text())
    assert json.loads(report.read_text())[0] == {"split": "test", "bleu": 1.0}  # kept in the file
    recipe = SearchOptions(beam_size=2)
    mine = scores_of(report, run / "checkpoints" / "best.pt", recipe)
    assert mine == entries[3:]
    assert scores_of(report, run / "checkpoints" / "best.pt", SearchOptions(beam_size=3)) == []
    moved = shutil.move(run, tmp_path / "moved")  # found by content, wherever the run folder is
    assert scores_of(moved / "eval" / "report.json", moved / "checkpoints" / "best.pt", recipe) == mine
    (moved / "checkpoints" / "best.pt").unlink()  # a newer best checkpoint: not evaluated yet
    shutil.copy(moved / "checkpoints" / "last.pt", moved / "checkpoints" / "best.pt")
    assert scores_of(moved / "eval" / "report.json", moved / "checkpoints" / "best.pt", recipe) == []


def test_validation_bleu_does_not_warn_about_tokenized_periods(caplog):
    from nmt.evaluate import bleu_score

    hyps, refs = ["a dog runs ."] * 120, ["a dog runs."] * 120  # an early model's output
    reported = score("x", hyps, refs).bleu  # `nmt evaluate` keeps sacreBLEU's warning
    assert "detokenize" in caplog.text
    caplog.clear()
    assert bleu_score(hyps, refs) == pytest.approx(reported, abs=0.005)
    assert "detokenize" not in caplog.text


def test_split_and_src_exclude_each_other(trained_run, tmp_path):
    src = tmp_path / "s.txt"
    src.write_text("w1\n")
    result = runner.invoke(app, ["evaluate", "-m", str(trained_run), "--src", str(src), "--ref", str(src),
                                 "--split", "test"])
    assert result.exit_code == 2 and "give one or the other" in result.output


def test_evaluations_finishing_at_once_all_reach_the_report(tmp_path):
    code = ("import sys; from pathlib import Path; from nmt.evaluate import add_to_report, score\n"
            "from nmt.translate import SearchOptions\n"
            "for i in range(10):\n"
            "    add_to_report(Path(sys.argv[1]), [score(f'{sys.argv[2]}-{i}', ['a'], ['a'])], [Path(sys.argv[3])],"
            " SearchOptions())\n")
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    report = tmp_path / "eval" / "report.json"
    workers = [subprocess.Popen([sys.executable, "-c", code, str(report), str(k), str(model)]) for k in range(4)]
    assert all(w.wait(timeout=120) == 0 for w in workers)
    assert len(json.loads(report.read_text())) == 40


def test_evaluate_reads_gzipped_files_as_the_corpora_are(trained_run, tmp_path):
    import gzip

    plain, packed = [], []
    for name, text in (("s", "w1 w2\nw3\n"), ("r", "v1 v2\nv3\n")):
        (tmp_path / f"{name}.txt").write_text(text)
        (tmp_path / f"{name}.txt.gz").write_bytes(gzip.compress(text.encode()))
        plain.append(str(tmp_path / f"{name}.txt"))
        packed.append(str(tmp_path / f"{name}.txt.gz"))
    results = [runner.invoke(app, ["evaluate", "-m", str(trained_run), "--src", src, "--ref", ref, "-b", "1"])
               for src, ref in (plain, packed)]
    assert all(r.exit_code == 0 for r in results), results[1].output
    assert results[0].stdout.split()[7:12] == results[1].stdout.split()[7:12]  # sentences and scores
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    result = runner.invoke(app, ["evaluate", "-m", str(trained_run), "--src", str(tmp_path / "bad.gz"),
                                 "--ref", plain[1]])
    assert result.exit_code == 1 and "bad.gz: unreadable gzip file" in result.output


def test_evaluate_empty_files_is_an_error(trained_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(app, ["evaluate", "-m", str(trained_run), "--src", str(empty), "--ref", str(empty)])
    assert result.exit_code == 1 and f"error: {empty} is empty: nothing to score" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("precision", [[], ["--precision", "bf16"]])
def test_evaluate_src_ref_files(trained_run, tmp_path, precision):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("w1 w2\nw3\n")
    ref.write_text("v1 v2\nv3\n")
    args = ["evaluate", "-m", str(trained_run), "--src", str(src), "--ref", str(ref), "--beam-size", "1", *precision]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "s.txt" in result.stdout and "100.0" in result.stdout  # BLEU of the toy task


def test_evaluate_errors(trained_run, tmp_path):
    src = tmp_path / "s.txt"
    src.write_text("a\nb\n")
    ref = tmp_path / "r.txt"
    ref.write_text("a\n")
    cases = [
        (["--src", str(src)], "--src and --ref go together", 2),
        (["--split", "nope"], "split 'nope' not in", 2),
        (["--precision", "half"], "--precision: expected fp32 or bf16", 2),
        (["--src", str(src), "--ref", str(ref)], "has 2 lines but", 1),
    ]
    for args, message, code in cases:
        result = runner.invoke(app, ["evaluate", "-m", str(trained_run), *args])
        assert result.exit_code == code and message in result.output, result.output


def test_score_table_fields():
    row = score("x", ["a b c d"], ["a b c d"])
    assert row.bleu == 100.0 and row.ter == 0.0 and row.bleu_signature.startswith("nrefs:1")


def test_end_of_training_evaluation_skips_an_empty_test_split(trained_run, tmp_path, capsys):
    """Data preprocessed before empty test splits were skipped may hold one."""
    import shutil

    import torch

    from nmt.evaluate import evaluate_run

    run = shutil.copytree(trained_run, tmp_path / "run")
    for side in ("src", "trg"):
        (run / "data" / f"test.{side}.txt").write_text("")
    evaluate_run(run / "checkpoints" / "best.pt", run, torch.device("cpu"))
    assert "warning: test split 'test' is empty; not evaluated" in capsys.readouterr().err
