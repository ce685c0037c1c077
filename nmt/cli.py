"""The `nmt` command: parses options, calls one library function, prints.

Data goes to stdout; logs, warnings and progress to stderr. Every expected failure is a
one-line `error: ...` on stderr with a non-zero exit: 2 for a bad recipe or option,
1 for anything else (missing data, corrupt checkpoint, ...).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

def _version(value: bool):
    if value:
        from nmt import __version__

        print(f"nmt {__version__}")
        raise typer.Exit()


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Attention-based recurrent neural machine translation (GRU or LSTM encoder-decoder, Bahdanau attention).",
)

DEFAULT_RECIPE = Path("recipes/multi30k.yaml")

RecipeArg = typer.Argument(DEFAULT_RECIPE, help="recipe YAML file", show_default=True)
SetOpt = typer.Option([], "--set", metavar="KEY=VALUE", help="override a recipe key, e.g. train.lr=0.0005 (repeatable)")
RunDirOpt = typer.Option(None, "--run-dir", help="run folder [default: runs/<recipe name>]")
DataDirOpt = typer.Option(
    None, "--data-dir", envvar="NMT_DATA_DIR",
    help="local mirror of the corpus: files {split}.{lang}[.gz] (env NMT_DATA_DIR)",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA if available), cpu or cuda")
PrecisionOpt = typer.Option(
    None, "--precision", help="fp32, or bf16: decode under bfloat16 autocast (faster on a CPU with AVX-512 bf16 "
    "or AMX) [default: recipe]")


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
):
    """Attention-based recurrent neural machine translation (GRU or LSTM encoder-decoder, Bahdanau attention)."""


def fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _load(recipe_path: Path, overrides: list[str]):
    from nmt.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe_path, overrides)
    except RecipeError as e:
        fail(str(e), 2)


def _run_dir(recipe, run_dir: Optional[Path]) -> Path:
    from nmt.runs import default_run_dir

    return run_dir if run_dir is not None else default_run_dir(recipe)


def _device(name: str):
    from nmt.train_utils import pick_device

    if name not in ("auto", "cpu", "cuda"):
        fail(f"--device: expected auto, cpu or cuda, got {name!r}", 2)
    try:
        return pick_device(name)
    except ValueError as e:
        fail(str(e), 2)


def _precision(name: Optional[str]) -> Optional[str]:
    if name not in (None, "fp32", "bf16"):
        fail(f"--precision: expected fp32 or bf16, got {name!r}", 2)
    return name


def _guard(fn):
    """Run fn, turning the toolkit's own errors into one-line messages."""
    from nmt.checkpoint import CheckpointError
    from nmt.data import DataError
    from nmt.distributed import DistributedError
    from nmt.runs import RunError
    from nmt.train import TrainError

    try:
        return fn()
    except (DataError, CheckpointError, RunError, TrainError, DistributedError) as e:
        fail(str(e))
    except BrokenPipeError:  # the reader went away (`nmt translate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing more to flush at exit)
        raise typer.Exit(141) from None  # 128 + SIGPIPE
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


@app.command()
def recipe(recipe_path: Path = RecipeArg, overrides: List[str] = SetOpt):
    """Print the fully resolved recipe (every key, defaults filled in, with its help)."""
    from nmt.recipe import dump_recipe

    sys.stdout.write(dump_recipe(_load(recipe_path, overrides)))


@app.command()
def preprocess(
    recipe_path: Path = RecipeArg,
    overrides: List[str] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
    data_dir: Optional[Path] = DataDirOpt,
    force: bool = typer.Option(False, "--force", help="redo every step even if up to date"),
):
    """Fetch the corpus, clean it, train sentencepiece and encode every split."""
    from nmt.data.preprocess import preprocess as run
    from nmt.train_utils import RunLock, RunLockedError

    r = _load(recipe_path, overrides)
    folder = _guard(lambda: _run_dir(r, run_dir))

    def locked():
        new = not folder.exists()
        try:
            with RunLock(folder):  # not while `nmt train` reads the data there
                return run(r, folder, data_dir=data_dir, force=force)
        except RunLockedError as e:
            fail(str(e))
        except BaseException:
            if new:  # leave no empty run folder behind (the data stage cleans up its own files)
                (folder / "train.lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise

    _guard(locked)


@app.command()
def train(
    recipe_path: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: List[str] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    restart: bool = typer.Option(False, "--restart", help="start afresh; earlier checkpoints are moved to old-<time>/"),
):
    """Train a model (preprocessing first if needed); resumes a run folder's last checkpoint.

    On several GPUs or machines, start it with torchrun (data-parallel, DDP):
    torchrun --nproc-per-node N -m nmt train RECIPE
    """
    from nmt.train import train as run

    r = _load(recipe_path, overrides)
    dev = _device(device)
    result = _guard(lambda: run(r, _run_dir(r, run_dir), device=str(dev), restart=restart, data_dir=data_dir))
    if result.interrupted:
        raise typer.Exit(130)


ModelOpt = typer.Option(
    [], "--model", "-m",
    help="run folder or checkpoint; repeat for an ensemble (log-probabilities averaged) [default: the latest trained run]",
)


def _load_models(models: list[Path], dev):
    """One model, or an ensemble of several, from run folders or checkpoint files."""
    from nmt.ensemble import load_ensemble
    from nmt.runs import resolve_model

    paths = _guard(lambda: [resolve_model(m) for m in models] or [resolve_model(None)])
    loaded = _guard(lambda: load_ensemble(paths, dev))
    print(f"model: {' + '.join(map(str, paths))}", file=sys.stderr)
    return paths, loaded


@app.command()
def translate(
    model: List[Path] = ModelOpt,
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="read this file instead of stdin"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write this file instead of stdout"),
    beam_size: Optional[int] = typer.Option(None, "--beam-size", "-b", min=1, help="beam size, 1 = greedy [default: recipe]"),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", min=0.0, help="GNMT alpha [default: recipe]"),
    max_len_ratio: Optional[float] = typer.Option(None, "--max-len-ratio", min=0.0, help="output length limit = ratio x source length + recipe's max_len_b [default: recipe]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="sentences per batch [default: recipe]"),
    nbest: int = typer.Option(1, "--nbest", min=1, help="write N hypotheses per line as INDEX<TAB>RANK<TAB>SCORE<TAB>TEXT"),
    attention_dir: Optional[Path] = typer.Option(
        None, "--attention-dir", help="also draw the attention of each line's best translation: DIR/000001.png, ..."),
    precision: Optional[str] = PrecisionOpt,
    device: str = DeviceOpt,
):
    """Translate lines from stdin (or --input) to stdout (or --output), one line per line."""
    from nmt.checkpoint import atomic_write
    from nmt.translate import SearchOptions, Translator, read_lines, translate_stream

    dev = _device(device)
    _, loaded = _load_models(model, dev)
    opts = SearchOptions.from_recipe(
        loaded.recipe.decode, beam_size=beam_size, length_penalty=length_penalty,
        max_len_a=max_len_ratio, batch_size=batch_size, nbest=nbest, precision=_precision(precision),
    )
    if nbest > opts.beam_size:
        opts = SearchOptions(**{**vars(opts), "beam_size": nbest})
    translator = Translator(loaded, opts, dev)
    plots = _attention_plots(attention_dir, loaded) if attention_dir is not None else None

    if input is None and output is None and sys.stdin.isatty():
        _interactive(translator, plots)
        return

    def run(out) -> int:
        if input is None:
            return translate_stream(translator, read_lines(sys.stdin.buffer), out, nbest=nbest, on_result=plots)
        with open(input, "rb") as f:
            return translate_stream(translator, read_lines(f), out, nbest=nbest, on_result=plots)

    if output is None:
        _guard(lambda: run(sys.stdout))
    else:
        def write(tmp: Path):
            with open(tmp, "w", encoding="utf-8", newline="\n") as out:
                run(out)

        _guard(lambda: atomic_write(output, write))
    if plots is not None:
        print(f"attention: {len(plots.written)} PNG files in {attention_dir}", file=sys.stderr)


def _attention_plots(folder: Path, loaded, first: Optional[int] = None):
    """A translate hook that draws attention heatmaps into `folder` (created here)."""
    from nmt.plot import AttentionPlots

    _guard(lambda: folder.mkdir(parents=True, exist_ok=True))
    return AttentionPlots(folder, loaded.src_tok, loaded.trg_tok, first=first)


def _interactive(translator, plots=None) -> None:
    """A prompt on stderr, translations on stdout, one line at a time."""
    print("Type a sentence and press Enter; Ctrl-D to quit.", file=sys.stderr)
    line_no = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            print(file=sys.stderr)
            return
        line_no += 1
        [nbest] = translator.translate([line.rstrip("\r\n")], first_line_no=line_no, on_result=plots)
        print(nbest[0][0], flush=True)


@app.command()
def evaluate(
    model: List[Path] = ModelOpt,
    split: List[str] = typer.Option([], "--split", help="test split to evaluate (repeatable) [default: all the run has]"),
    src: Optional[Path] = typer.Option(None, "--src", help="score on this source file (with --ref)"),
    ref: Optional[Path] = typer.Option(None, "--ref", help="reference translations of --src"),
    beam_size: Optional[int] = typer.Option(None, "--beam-size", "-b", min=1, help="beam size [default: recipe]"),
    attention: int = typer.Option(
        0, "--attention", min=0, metavar="N",
        help="draw the attention of the first N sentences of each split into the run's eval/attention/<split>/"),
    precision: Optional[str] = PrecisionOpt,
    device: str = DeviceOpt,
):
    """Translate test splits (or --src) and print BLEU, chrF2, TER with sacreBLEU signatures."""
    from nmt.evaluate import evaluate_pairs, format_table
    from nmt.runs import data_dir_of, run_dir_of, test_splits_of
    from nmt.translate import SearchOptions, Translator

    if (src is None) != (ref is None):
        fail("--src and --ref go together", 2)
    if src is not None and split:
        fail("--split names the run's test splits; --src and --ref score other files: give one or the other", 2)
    dev = _device(device)
    paths, loaded = _load_models(model, dev)
    run_dir = run_dir_of(paths[0])  # test splits and the eval/ folder: the first model's run
    opts = SearchOptions.from_recipe(loaded.recipe.decode, beam_size=beam_size, precision=_precision(precision))
    translator = Translator(loaded, opts, dev)
    if src is not None:
        pairs = [(src.name, src, ref)]
        out_dir = None
    else:
        data = data_dir_of(run_dir)
        available = test_splits_of(run_dir)
        chosen = split or available
        missing = [s for s in chosen if s not in available]
        if missing:
            fail(f"split {missing[0]!r} not in {data} (available: {', '.join(available) or 'none'})", 2)
        if not chosen:
            fail(f"no test splits in {data}; use --src FILE --ref FILE", 2)
        pairs = [(s, data / f"{s}.src.txt", data / f"{s}.trg.txt") for s in chosen]
        out_dir = run_dir / "eval"
    plots = {name: _attention_plots(run_dir / "eval" / "attention" / name, loaded, first=attention)
             for name, _, _ in pairs} if attention else {}

    def run():
        try:
            return evaluate_pairs(translator, pairs, out_dir, on_result=plots, models=paths)
        except ValueError as e:
            fail(str(e))

    rows = _guard(run)
    print(format_table(rows))
    for name, p in plots.items():
        print(f"attention: {len(p.written)} PNG files in {p.folder}", file=sys.stderr)


@app.command()
def average(
    checkpoints: List[Path] = typer.Argument(..., help="checkpoint files, or run folders (their kept step-N.pt)"),
    output: Path = typer.Option(..., "--output", "-o", help="write the averaged checkpoint here"),
):
    """Average the parameters of several checkpoints of one model into one checkpoint."""
    from nmt.average import average_checkpoints

    used = _guard(lambda: average_checkpoints(checkpoints, output))
    print(f"averaged {len(used)} checkpoints ({', '.join(p.name for p in used)}) into {output}", file=sys.stderr)


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="run folder or checkpoint [default: the latest trained run]"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed on stderr)"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="sentences per decoding batch"),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0.0, help="longest wait for a batch to fill, in milliseconds"),
    max_sentences: int = typer.Option(100, "--max-sentences", min=1, help="sentences per request; more is a 413"),
    max_chars: int = typer.Option(1000, "--max-chars", min=1, help="characters per sentence; more is a 413"),
    device: str = DeviceOpt,
):
    """Serve a model over HTTP: POST /translate, GET /health, GET /info (needs the `serve` extra)."""
    try:
        from nmt.serve import ServeLimits, serve as run_server
    except ImportError as e:
        fail(f"nmt serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'nmt[serve]'")

    dev = _device(device)
    limits = ServeLimits(max_sentences=max_sentences, max_chars=max_chars, max_batch=max_batch, max_wait_ms=max_wait_ms)

    def run():
        try:
            run_server(model, host=host, port=port, limits=limits, device=dev)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
            raise typer.Exit(130)

    _guard(run)


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., metavar="RUN_DIR", help="run folders (or their metrics.jsonl files), drawn on one chart"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PNG file to write [default: learning-curves.png in the first run folder]"),
):
    """Draw learning curves: training loss, validation loss, validation BLEU and learning rate against updates."""
    from nmt.plot import plot_learning_curves
    from nmt.runs import metrics_path, read_metrics, run_labels

    metrics = _guard(lambda: [read_metrics(metrics_path(run)) for run in runs])
    out = output if output is not None else metrics_path(runs[0]).parent / "learning-curves.png"
    _guard(lambda: plot_learning_curves(list(zip(run_labels(runs), metrics)), out))
    print(f"wrote {out}", file=sys.stderr)


@app.command()
def export(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder (its best checkpoint) or checkpoint file"),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="folder to write the model into"),
    force: bool = typer.Option(False, "--force", help="replace OUT_DIR if it is not empty"),
):
    """Write a self-contained model folder: safetensors weights, model.json, sentencepiece model, recipe, model card."""
    from nmt.export import export_model

    _guard(lambda: export_model(run, out_dir, force=force))
    print(f"exported to {out_dir}; translate with: nmt translate --model {out_dir}", file=sys.stderr)
