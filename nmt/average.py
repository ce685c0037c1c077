"""Checkpoint averaging: the element-wise mean of several checkpoints' parameters.

Averaging the last or best checkpoints of one run (Junczys-Dowmunt et al., 2016;
Vaswani et al., 2017) smooths the noise of the final updates and usually adds a
fraction of a BLEU point at no decoding cost. Only checkpoints of one model (same
constructor arguments, same vocabularies) can be averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nmt.runs import checkpoint_dir

# What an averaged checkpoint keeps from its inputs; training state and scores belong to one step.
_KEPT = ("model_config", "src_spm", "trg_spm", "max_src_len", "recipe", "step", "epoch")


def expand(paths: list[Path]) -> list[Path]:
    """Checkpoint files from files and run folders (a run folder gives its kept step-N.pt)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            kept = sorted(checkpoint_dir(path).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
            if not kept:
                raise CheckpointError(f"{path}: no checkpoints/step-N.pt in this run folder")
            files.extend(kept)
        else:
            files.append(path)
    return files


def _same_vocabulary(a: bytes, b: bytes) -> bool:
    """The same pieces and scores (sentencepiece files of two runs of one recipe differ
    in their metadata only)."""
    from nmt.data.tokenizer import Tokenizer

    return a == b or Tokenizer.from_bytes(a).same_vocabulary(Tokenizer.from_bytes(b))


def average_payloads(payloads: list[dict], names: list[str]) -> dict:
    """The mean of the payloads' parameters, accumulated in float64 (so averaging copies
    of one checkpoint gives it back bit for bit); the rest from the newest (highest step)."""
    if not payloads:
        raise CheckpointError("nothing to average")
    first, first_name = payloads[0], names[0]
    for payload, name in zip(payloads[1:], names[1:]):
        if payload["model_config"] != first["model_config"]:
            raise CheckpointError(f"{name}: a different model than {first_name}; only checkpoints of one "
                                  "model can be averaged")
        if not all(_same_vocabulary(payload[k], first[k]) for k in ("src_spm", "trg_spm")):
            raise CheckpointError(f"{name}: a different vocabulary than {first_name}")
    state = {}
    for key, tensor in first["model"].items():
        if tensor.is_floating_point():
            total = torch.zeros_like(tensor, dtype=torch.float64)
            for payload in payloads:
                total += payload["model"][key].to(torch.float64)
            state[key] = (total / len(payloads)).to(tensor.dtype)
        else:
            state[key] = tensor.clone()
    newest = max(payloads, key=lambda p: p.get("step", 0))
    out = {k: newest[k] for k in _KEPT if k in newest}
    out.update(model=state, metrics={}, averaged=[{"path": n, "step": p.get("step")} for n, p in zip(names, payloads)])
    return out


def average_checkpoints(paths: list[Path], output: Path) -> list[Path]:
    """Average the checkpoints (files or run folders) into `output`; returns the inputs used."""
    files = expand(paths)
    seen: dict[tuple, Path] = {}
    for path in files:
        try:
            info = path.stat()
        except OSError:
            continue  # load_checkpoint says what is wrong with it
        same = (info.st_dev, info.st_ino)  # one file under two names too (best.pt is a hard link)
        if same in seen:
            raise CheckpointError(f"{path}: given twice (as {seen[same]}); each checkpoint counts once")
        seen[same] = path
    payloads = [load_checkpoint(p) for p in files]
    if len(files) < 2:
        raise CheckpointError(f"{files[0]}: one checkpoint; averaging needs at least 2")
    save_checkpoint(Path(output), average_payloads(payloads, [str(p) for p in files]))
    return files
