"""A run's checkpoint folder during training: last.pt and its predecessor prev.pt, the
best `keep_best` checkpoints by validation BLEU (best.pt links to the best), their
average, and resuming from the newest readable one.

    checkpoints/last.pt       the newest state, with optimizer and RNG (resume)
    checkpoints/prev.pt       the one before it: the fallback when last.pt is damaged
    checkpoints/step-N.pt     the kept best, model only
    checkpoints/best.pt       a hard link to the best of them (or to average.pt)
    checkpoints/average.pt    the average of the best (train.average_best)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nmt.recipe import RecipeError, load_recipe
from nmt.runs import checkpoint_dir
from nmt.train_utils import MetricsLog, TrainError, link_or_copy, log

if TYPE_CHECKING:
    from nmt.train import TrainState


def save(path: Path, payload: dict) -> None:
    """save_checkpoint with a message that says what a failed write leaves behind."""
    try:
        save_checkpoint(path, payload)
    except OSError as e:
        raise TrainError(f"cannot write {path}: {e.strerror or e}; the checkpoints written before are intact") from None


def save_last(ckpts: Path, state: TrainState, payload) -> None:
    """Write last.pt; the one it replaces stays as prev.pt (unless it holds this same
    update), a fallback should last.pt be damaged later."""
    last = ckpts / "last.pt"
    if last.exists() and state.saved_step != state.step:
        link_or_copy(last, ckpts / "prev.pt")
    state.saved_step = state.step
    save(last, payload())


def average_best(ckpts: Path, state: TrainState, n: int, model, valid_bleu, metrics: MetricsLog) -> None:
    """Average the n best checkpoints into average.pt and validate it; best.pt becomes
    the average when its BLEU beats the best single checkpoint's."""
    from nmt.average import average_payloads

    chosen = [step for _, step in state.best[:n]]
    files = [ckpts / f"step-{step}.pt" for step in chosen]
    averaged = average_payloads([load_checkpoint(p) for p in files], [p.name for p in files])
    model.load_state_dict(averaged["model"])  # training is over: decode with the average
    model.eval()
    bleu = valid_bleu()
    averaged["metrics"] = {"valid_bleu": bleu}
    save(ckpts / "average.pt", averaged)
    metrics.write(kind="average", step=state.step, valid_bleu=bleu, averaged_steps=chosen)
    single = state.best[0][0]
    if bleu > single:
        link_or_copy(ckpts / "average.pt", ckpts / "best.pt")
    log(f"average of the {len(chosen)} best checkpoints (updates {', '.join(map(str, chosen))}): validation BLEU "
        f"{bleu:.2f} against {single:.2f} for the best single one; best.pt is "
        + ("the average" if bleu > single else f"step-{state.best[0][1]}.pt"))


def remove_partial_writes(ckpts: Path) -> None:
    """Delete the temporary files of writes that a killed run left unfinished."""
    if ckpts.is_dir():
        for tmp in ckpts.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            log(f"removed {tmp.name}, an unfinished write of a run that was killed")


def keep_best(ckpts: Path, state: TrainState, bleu: float, keep: int, write) -> None:
    """Save this step if it is among the `keep` best by BLEU; drop the one it displaces."""
    ranked = sorted(state.best + [[bleu, state.step]], key=lambda x: (-x[0], x[1]))
    kept, dropped = ranked[:keep], ranked[keep:]
    if [bleu, state.step] in kept:
        write(ckpts / f"step-{state.step}.pt")
    for _, step in dropped:
        (ckpts / f"step-{step}.pt").unlink(missing_ok=True)
    state.best = kept
    link_or_copy(ckpts / f"step-{kept[0][1]}.pt", ckpts / "best.pt")


def resume(ckpts: Path, model, optimizer, schedule, state: TrainState, dev) -> Path | None:
    """Restore model, optimizer, schedule, progress and RNG state from last.pt, or from
    prev.pt when last.pt is unreadable (a damaged file is renamed *.corrupt)."""
    candidates = [p for p in (ckpts / "last.pt", ckpts / "prev.pt") if p.exists()]
    if not candidates:
        return None
    problems = []
    for last in candidates:
        try:
            payload = load_checkpoint(last, map_location=dev)
            break
        except CheckpointError as e:
            problems.append(str(e))
            aside = last.with_name(last.name + ".corrupt")
            os.replace(last, aside)
            log(f"warning: {e}; moved it to {aside.name}")
    else:
        raise TrainError(f"no usable checkpoint to resume from ({'; '.join(problems)}); use --restart")
    if problems:
        log(f"falling back to {last} (update {payload['step']})")
    if payload["model_config"] != model.config or "train_state" not in payload:
        raise TrainError(f"{last} holds a different model than the recipe describes; "
                         "use --restart (or another --run-dir) to train this one")
    model.load_state_dict(payload["model"])
    ts = payload["train_state"]
    optimizer.load_state_dict(ts["optimizer"])
    for group in optimizer.param_groups:  # the saved groups carry the saving device's choice
        group["fused"] = optimizer.defaults["fused"]
    schedule.load_state_dict(ts["schedule"])
    state.restore(ts["progress"], accum_steps=schedule.cfg.accum_steps)
    torch.set_rng_state(ts["torch_rng"].cpu())
    if ts["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ts["cuda_rng"]])
    return last


def check_resumable(recipe, run_dir: Path) -> None:
    """Refuse, before anything in the run folder changes, a recipe whose tokenizer or model
    differs from those of the checkpoints it would resume (:func:`resume` would find out
    only after preprocessing had replaced the run's data)."""
    ckpts, trained = checkpoint_dir(run_dir), Path(run_dir) / "recipe.yaml"
    if not trained.is_file() or not any((ckpts / name).is_file() for name in ("last.pt", "prev.pt")):
        return
    try:
        before = load_recipe(trained)
    except RecipeError:
        return  # resume() compares the checkpoint's model itself
    changed = [s for s in ("tokenizer", "model") if before.section_hash(s) != recipe.section_hash(s)]
    if changed:
        raise TrainError(f"{run_dir} holds checkpoints of a run with another {' and '.join(changed)} section "
                         f"({trained}); use --restart (or another --run-dir) to train this recipe")
