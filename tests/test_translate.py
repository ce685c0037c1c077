"""`nmt translate`: one output line per input line, in order, whatever the input."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nmt.checkpoint import load_model
from nmt.cli import app
from nmt.translate import SearchOptions, Translator, read_lines, translate_ids, translate_stream

runner = CliRunner()


def run_cli(args, input_bytes: bytes, env=None):
    return subprocess.run([sys.executable, "-m", "nmt", "translate", *args], input=input_bytes,
                          capture_output=True, timeout=300, env={**os.environ, **(env or {})})


def test_translates_the_toy_task(trained_run):
    done = run_cli(["--model", str(trained_run), "--beam-size", "3"], b"w1 w2 w3\nw4 w5\n")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == ["v1 v2 v3", "v4 v5"]


def test_awkward_input_keeps_line_count_and_order(trained_run):
    lines = [b"w1 w2", b"", b"   ", b"w3\r", b"\xff\xfe w4 \xc3", b"w5 " * 5000, b"\x00w6\x00", b"w7 w8"]
    data = b"\n".join(lines)  # no final newline
    done = run_cli(["--model", str(trained_run), "--batch-size", "2"], data)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[1] == "" and out[2] == ""
    assert out[0] and out[3] and out[7]
    err = done.stderr.decode()
    assert "line 5: invalid UTF-8" in err and "line 6:" in err and "truncated" in err


def test_a_closed_pipe_ends_quietly(trained_run):
    """`nmt translate ... | head -1`: the reader goes away; no error message, as Unix tools."""
    done = subprocess.run(f"{sys.executable} -m nmt translate --model {trained_run} | head -c 1",
                          shell=True, input=b"w1 w2 w3\n" * 20000, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.stdout == b"v" and "error" not in done.stderr.decode() and "Traceback" not in done.stderr.decode()


def test_empty_input_gives_empty_output(trained_run):
    done = run_cli(["--model", str(trained_run)], b"")
    assert done.returncode == 0 and done.stdout == b""


def test_latest_run_is_the_default(trained_run):
    done = run_cli([], b"w1\n", env={"NMT_RUNS_DIR": str(trained_run.parent)})
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == "v1\n"


def test_input_output_files_and_nbest(trained_run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2\nw3\n")
    out = tmp_path / "out.txt"
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(src), "-o", str(out), "--nbest", "3"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("0", "1"), ("0", "2"), ("0", "3"), ("1", "1"), ("1", "2"), ("1", "3")]
    assert rows[0][3] == "v1 v2"
    scores = [float(r[2]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)
    src.write_text("w1\n\nw3\n")  # an empty line gets its N (empty) hypotheses too
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(src), "-o", str(out), "--nbest", "3"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert [r[0] for r in rows] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3 and rows[3][1:] == ["1", "0.0000", ""]


@pytest.mark.parametrize("option", [
    ["--beam-size", "1"], ["--beam-size", "4"], ["--length-penalty", "0"], ["--max-len-ratio", "0.5"],
    ["--batch-size", "1"], ["--device", "cpu"], ["--precision", "bf16"], ["--precision", "fp32"],
])
def test_every_option_works(trained_run, tmp_path, option):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2 w3\n\nw4\n")
    result = runner.invoke(app, ["translate", "-m", str(trained_run), "-i", str(src), *option])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3


def test_bf16_decoding_translates_like_fp32(trained_run):
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    lines = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w3"]
    fp32 = Translator(loaded, SearchOptions(beam_size=3), "cpu").translate_lines(lines)
    bf16 = Translator(loaded, SearchOptions(beam_size=3, precision="bf16"), "cpu").translate_lines(lines)
    assert bf16 == fp32 == ["v1 v2 v3", "v4 v5", "v6 v7 v8 v9", "v3"]


def test_batches_searched_in_parallel_give_the_same_results_in_order(trained_run):
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    lines = ["w1 w2 w3", "", "w4 w5", "w6 w7 w8 w9", "w3", "w2 w1", "w9 w8 w7", "w5"]
    sources = loaded.src_tok.encode(lines)
    opts = SearchOptions(beam_size=3, nbest=2, batch_size=2)  # 4 batches
    one = translate_ids(loaded.model, sources, opts, workers=1)
    three = translate_ids(loaded.model, sources, opts, workers=3)
    assert [[h.tokens for h in nbest] for nbest in three] == [[h.tokens for h in nbest] for nbest in one]
    assert [h.score for nbest in three for h in nbest] == pytest.approx([h.score for nbest in one for h in nbest])
    assert loaded.trg_tok.decode([nbest[0].tokens for nbest in three])[:3] == ["v1 v2 v3", "", "v4 v5"]


def test_max_len_ratio_limits_output(trained_run, tmp_path):
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    short = Translator(loaded, SearchOptions(beam_size=2, max_len_a=0.0, max_len_b=1), "cpu")
    assert all(len(t.split()) <= 1 for t in short.translate_lines(["w1 w2 w3 w4 w5 w6"]))


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/run"], "no such checkpoint or run folder"),
    (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    (["--precision", "fp16"], "--precision: expected fp32 or bf16"),
])
def test_bad_options_are_one_line_errors(trained_run, args, message):
    done = run_cli(args, b"w1\n", env={"NMT_RUNS_DIR": str(trained_run.parent)})
    err = done.stderr.decode()
    assert done.returncode != 0 and message in err and "Traceback" not in err


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    done = run_cli(["--model", str(bad)], b"w1\n")
    assert done.returncode == 1
    assert f"error: {bad}: corrupt or truncated checkpoint" in done.stderr.decode()


def test_no_trained_run_is_a_clear_error(tmp_path):
    done = run_cli([], b"w1\n", env={"NMT_RUNS_DIR": str(tmp_path)})
    assert done.returncode == 1 and "no trained model found" in done.stderr.decode()


def test_stream_writes_each_window_before_input_ends(trained_run):
    """A pipe sees the first window's output before the rest of the input arrives."""
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    translator = Translator(loaded, SearchOptions(beam_size=1), "cpu")
    written = []

    class Out:
        def write(self, text):
            written.append(text)

        def flush(self):
            pass

    def lines():
        yield from ["w1", "w2"]
        assert written, "the first window was not written before more input was read"
        yield "w3"

    assert translate_stream(translator, lines(), Out(), window=2) == 3
    assert "".join(written).splitlines() == ["v1", "v2", "v3"]


def test_read_lines_handles_crlf_and_bad_bytes(capsys):
    import io

    got = list(read_lines(io.BytesIO(b"a\r\nb\xff\n\nc")))
    assert got == ["a", "b\ufffd", "", "c"]
    assert "line 2: invalid UTF-8" in capsys.readouterr().err


def test_interactive_prompt_on_a_terminal(trained_run):
    """With a terminal on stdin, a prompt (on stderr) translates line by line."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "translate", "-m", str(trained_run), "-b", "1"],
                            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(follower)
    os.write(leader, b"w1 w2\n")
    os.write(leader, b"\x04")  # Ctrl-D: end of input
    out, err = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, err.decode()
    assert b"Ctrl-D to quit" in err and b"> " in err
    assert len(out.decode().splitlines()) == 1


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("nmt ")
