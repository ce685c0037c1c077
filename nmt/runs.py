"""The run folder: where every stage of one run reads and writes.

    runs/<recipe name>/
        recipe.yaml              the fully resolved recipe of the last `nmt train`
        data/                    `nmt preprocess` output (tokenizer, encoded corpus, manifest)
        checkpoints/last.pt      newest checkpoint, with the full training state (resume)
        checkpoints/step-N.pt    the best `train.keep_best` checkpoints by validation BLEU
        checkpoints/best.pt      the best of them (a hard link, or a copy)
        metrics.jsonl            one JSON object per log line / validation
        eval/                    `nmt evaluate` hypotheses and report.json (attention/: heatmaps)

Runs live under ./runs unless NMT_RUNS_DIR says otherwise. "The most recently trained
run" is the run folder under it whose checkpoints/best.pt was modified last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunError(Exception):
    """A run folder or model path that cannot be used."""


def runs_root() -> Path:
    return Path(os.environ.get("NMT_RUNS_DIR", "runs"))


def default_run_dir(recipe) -> Path:
    """runs/<recipe name>; a name that is not one folder's is an error (use --run-dir)."""
    name = recipe.name
    if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
        raise RunError(f"recipe name {name!r} is not a folder name (no '/', no leading '.'), so it cannot "
                       "name runs/<name>/: change the recipe's name or give --run-dir")
    return runs_root() / name


def data_dir_of(run_dir: Path) -> Path:
    return Path(run_dir) / "data"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_run() -> Path:
    """The run folder whose best checkpoint is newest, under runs_root()."""
    root = runs_root()
    candidates = [p for p in root.glob("*/checkpoints/best.pt") if p.is_file()]
    if not candidates:
        raise RunError(f"no trained model found under {root}/; train one with `nmt train RECIPE` or pass --model")
    return max(candidates, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_model(path: str | Path | None) -> Path:
    """A checkpoint file from a checkpoint path, a run folder, or nothing (the latest run);
    or an exported model folder (`nmt export`), which is returned as it is."""
    if path is None:
        return checkpoint_dir(latest_run()) / "best.pt"
    path = Path(path)
    if path.is_dir():
        for candidate in (checkpoint_dir(path) / "best.pt", path / "best.pt", checkpoint_dir(path) / "last.pt"):
            if candidate.is_file():
                return candidate
        if (path / "model.json").is_file():
            return path
        raise RunError(f"{path}: no checkpoints/best.pt in this run folder; has it been trained?")
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint or run folder")
    return path


def run_dir_of(model: Path) -> Path:
    """The folder a resolved model belongs to: the run folder of `checkpoints/X.pt`, the
    folder of any other checkpoint file, or an exported model folder itself."""
    model = Path(model)
    if model.is_dir():
        return model
    return model.parent.parent if model.parent.name == "checkpoints" else model.parent


def test_splits_of(run_dir: Path) -> list[str]:
    """The test splits that `nmt preprocess` wrote for this run (from its manifest)."""
    manifest = data_dir_of(run_dir) / "manifest.json"
    if not manifest.is_file():
        return []
    return list(json.loads(manifest.read_text(encoding="utf-8")).get("test_splits", []))


def metrics_path(run: Path) -> Path:
    """A run folder's metrics log (or the path itself when it names the file)."""
    run = Path(run)
    return run / "metrics.jsonl" if run.is_dir() else run


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """The records of a metrics log by kind, one per update (a later line for the same
    update, written after a resume, replaces the earlier), in update order.

    :raises RunError: a missing or unreadable log, a line that is not a JSON record, or
        a log without a single training or validation record. A last line without its
        line end (being written by a training run, or cut short by a crash) is left out.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no metrics log (is this a trained run folder?)")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "valid": {}}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                if not raw.endswith(b"\n") and not f.read(1):  # the unfinished last line
                    break
                raise RunError(f"{path}:{number}: not a JSON record") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise RunError(f"{path}:{number}: a metrics record needs a 'kind' and an integer 'step'")
            if record.get("kind") in by_kind:
                by_kind[record["kind"]][record["step"]] = record
    if not any(by_kind.values()):
        raise RunError(f"{path}: no training or validation records yet")
    return {kind: [records[s] for s in sorted(records)] for kind, records in by_kind.items()}


def run_labels(paths: list[Path]) -> list[str]:
    """Short legend names: each run folder's name, or as many trailing parts of its path
    as tell it apart from the others (``a/run``, ``b/run``)."""
    parts = [metrics_path(p).resolve().parent.parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        labels = ["/".join(x[-depth:]) for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]
