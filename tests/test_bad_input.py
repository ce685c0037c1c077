"""Bad input everywhere: whatever bytes `nmt translate` reads it writes one line per
input line; whatever a recipe holds it is loaded or refused in one line (exit 2); a
checkpoint crafted to run code when unpickled is refused, not executed."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nmt.checkpoint import CheckpointError, load_checkpoint, load_model
from nmt.cli import app
from nmt.recipe import RecipeError, load_recipe
from nmt.translate import SearchOptions, Translator, read_lines, translate_stream

runner = CliRunner()

# Lines chosen to hurt: invalid UTF-8, the UTF-8 byte forms of lone surrogates, control
# characters, Unicode line separators, BOMs, whitespace only, NULs, a 100,000-character line.
NASTY_LINES = [
    b"", b" ", b"\t \x0b\x0c ", b"\xff\xfe\xfd", b"\xed\xa0\x80 w1 \xed\xbf\xbf", b"\xc3", b"\xe2\x80",
    b"w1 \x00 w2", b"\x1b[31mw3\x1b[0m", b"w4\xe2\x80\xa8w5\xc2\x85w6", b"\xef\xbb\xbfw7", b"\r", b"w8\r",
    b"\x7f\x01\x02\x03", "w9 ⁇ ♥ 🙂 ǅ".encode(), b"w1 " * 33_334,
]


def count_lines(data: bytes) -> int:
    """Input lines as `nmt translate` counts them: '\n'-terminated, plus an unterminated last one."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@pytest.fixture(scope="module")
def translator(trained_run):
    loaded = load_model(trained_run / "checkpoints" / "best.pt")
    return Translator(loaded, SearchOptions(beam_size=2, batch_size=4), "cpu", warn=lambda msg: None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.one_of(st.binary(max_size=60), st.sampled_from(NASTY_LINES),
                             st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass"))), max_size=12),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
def test_any_bytes_give_one_output_line_per_input_line(translator, lines, crlf, final_newline):
    sep = b"\r\n" if crlf else b"\n"
    data = sep.join(lines) + (sep if final_newline and lines else b"")
    out = io.StringIO()
    n = translate_stream(translator, read_lines(io.BytesIO(data)), out, window=5)
    text = out.getvalue()
    assert n == count_lines(data)
    assert text.count("\n") == n and (not text or text.endswith("\n"))


def test_nasty_lines_through_the_command(trained_run):
    """The same through a real `nmt translate` process: stdin to stdout, exit 0."""
    data = b"\n".join(NASTY_LINES) + b"\r\nw1 w2"  # CRLF once, no final newline
    done = subprocess.run([sys.executable, "-m", "nmt", "translate", "-m", str(trained_run), "-b", "1"],
                          input=data, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.count(b"\n") == count_lines(data)
    assert done.stdout.split(b"\n")[-2] == b"v1 v2"
    assert b"Traceback" not in done.stderr


# ------------------------------------------------------------------------ recipes

SECTIONS = ["data", "tokenizer", "model", "train", "decode", "name", "seed", "modle", ""]
KEYS = ["lr", "batch_tokens", "cell", "beam_size", "vocab_size", "src_lang", "path", "dropout_emb",
        "max_steps", "test_splits", "bogus", "", "0"]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTIONS),
                       st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3) | VALUES, max_size=4))
def test_any_recipe_mapping_loads_or_is_one_clear_line(tmp_path_factory, recipe):
    import yaml

    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path)
    except RecipeError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message.strip()


@pytest.mark.parametrize("content", [
    b"", b"\n\n", b"# only a comment\n", b"just some words\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"{{{{", b"train: [1, 2\n", b"train:\n\tlr: 1\n", b"- 1\n- 2\n", b"train: !!python/object/apply:os.system [echo hi]\n",
    b"a: &a [x]\n" + b"".join(b"k%d: &k%d [*%s, *%s, *%s, *%s]\n" % (i, i, p, p, p, p)
                              for i, p in enumerate([b"a"] + [b"k%d" % j for j in range(30)])),
])
def test_files_that_are_not_recipes_exit_2_in_one_line(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["recipe", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------ checkpoints


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_runs_code_is_refused_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    payload = {"format": "nmt-checkpoint-1", "model": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=f"{bad}: (refused to load|corrupt or truncated)"):
        load_checkpoint(bad)
    assert not marker.exists()
    done = subprocess.run([sys.executable, "-m", "nmt", "translate", "-m", str(bad)], input=b"w1\n",
                          capture_output=True, timeout=120)
    assert done.returncode == 1 and done.stderr.decode().startswith("error: ")
    assert not marker.exists()


def test_a_text_file_given_as_a_model_is_named_as_such(tmp_path):
    text = tmp_path / "in.de"
    text.write_text("Ein Hund läuft.\n")
    with pytest.raises(CheckpointError, match=f"^{text}: not a checkpoint \\(not a file that torch.save writes\\)$"):
        load_checkpoint(text)


def test_writing_over_a_directory_names_the_directory(trained_run, tmp_path):
    """`-o` naming a folder: the error names it, not the temporary file written beside it."""
    done = subprocess.run([sys.executable, "-m", "nmt", "translate", "-m", str(trained_run), "-o", str(tmp_path)],
                          input=b"w1\n", capture_output=True, timeout=120)
    assert done.returncode == 1 and done.stderr.decode().splitlines()[-1] == f"error: {tmp_path}: Is a directory"
    assert list(tmp_path.iterdir()) == []  # no temporary file left
