"""The run folder: where every stage of one run reads and writes.

    runs/<recipe name>/
        recipe.yaml              the fully resolved recipe of the last `nmt train`
        data/                    `nmt preprocess` output (tokenizer, encoded corpus, manifest)
        checkpoints/last.pt      newest checkpoint, with the full training state (resume)
        checkpoints/step-N.pt    the best `train.keep_best` checkpoints by validation BLEU
        checkpoints/best.pt      the best of them (a hard link, or a copy)
        metrics.jsonl            one JSON object per log line / validation
        eval/                    `nmt evaluate` hypotheses and report.json

Runs live under ./runs unless NMT_RUNS_DIR says otherwise. "The most recently trained
run" is the run folder under it whose checkpoints/best.pt was modified last.
"""

from __future__ import annotations

import os
from pathlib import Path


class RunError(Exception):
    """A run folder or model path that cannot be used."""


def runs_root() -> Path:
    return Path(os.environ.get("NMT_RUNS_DIR", "runs"))


def default_run_dir(recipe) -> Path:
    return runs_root() / recipe.name


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
    """A checkpoint file from a checkpoint path, a run folder, or nothing (the latest run)."""
    if path is None:
        return checkpoint_dir(latest_run()) / "best.pt"
    path = Path(path)
    if path.is_dir():
        for candidate in (checkpoint_dir(path) / "best.pt", path / "best.pt", checkpoint_dir(path) / "last.pt"):
            if candidate.is_file():
                return candidate
        raise RunError(f"{path}: no checkpoints/best.pt in this run folder; has it been trained?")
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint or run folder")
    return path


def test_splits_of(run_dir: Path) -> list[str]:
    """The test splits that `nmt preprocess` wrote for this run (from its manifest)."""
    import json

    manifest = data_dir_of(run_dir) / "manifest.json"
    if not manifest.is_file():
        return []
    return list(json.loads(manifest.read_text(encoding="utf-8")).get("test_splits", []))
