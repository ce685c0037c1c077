"""Self-describing checkpoints, written atomically and loaded safely.

A checkpoint is one `torch.save` file holding only tensors and plain values, so it is
read with `weights_only=True` (a file crafted to run code when unpickled is refused):

    format        "nmt-checkpoint-1"
    model_config  the Seq2Seq constructor arguments (rebuilds the model alone)
    model         the state dict
    src_spm       serialized sentencepiece model of the source side (bytes)
    trg_spm       same for the target side (equal bytes when the vocabulary is joint)
    max_src_len   longest source (in pieces) translated whole; longer ones are truncated
    recipe        the fully resolved recipe (plain dict)
    versions      nmt, torch, sentencepiece, sacrebleu versions that wrote it
    step, epoch   training progress when it was written
    metrics       validation scores at that step (may be empty)
    train_state   optimizer, schedule, RNG and data-order state (last checkpoint only)
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "nmt-checkpoint-1"
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file."""


def package_versions() -> dict[str, str]:
    import sacrebleu
    import sentencepiece

    import nmt

    return {
        "nmt": nmt.__version__,
        "torch": str(torch.__version__),
        "sentencepiece": str(sentencepiece.__version__),
        "sacrebleu": str(sacrebleu.__version__),
    }


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see half a file.
    Errors name `path`, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "versions": package_versions(), **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle
            raise CheckpointError(f"{path}: not a checkpoint (not a file that torch.save writes)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the class or function it refused
        what = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values{what}; "
                              "nmt checkpoints hold nothing else") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nmt checkpoint")
    for key in ("model_config", "model", "src_spm", "trg_spm", "max_src_len", "recipe"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return payload


@dataclass
class LoadedModel:
    """What decoding needs: a model in eval mode and its tokenizers (from a checkpoint
    by `load_model`, or the live model during training)."""

    model: torch.nn.Module
    src_tok: Any
    trg_tok: Any
    max_src_len: int
    recipe: Any = None
    path: Path | None = None
    payload: dict | None = None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild model and tokenizers from a checkpoint file, or from a folder written by
    `nmt export` (eval mode, on `device`)."""
    if Path(path).is_dir():
        from nmt.export import load_exported

        return load_exported(path, device)
    from nmt.data.tokenizer import Tokenizer
    from nmt.model import Seq2Seq
    from nmt.recipe import RecipeError, recipe_from_dict

    payload = load_checkpoint(path)
    try:
        model = Seq2Seq(**payload["model_config"])
        model.load_state_dict(payload["model"])
        recipe = recipe_from_dict(payload["recipe"], where=f"{path} (stored recipe)")
        src_tok = Tokenizer.from_bytes(payload["src_spm"])
        trg_tok = src_tok if payload["trg_spm"] == payload["src_spm"] else Tokenizer.from_bytes(payload["trg_spm"])
    except (TypeError, ValueError, RuntimeError, RecipeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot rebuild the model: {first[:200]}") from None
    model.to(device).eval()
    return LoadedModel(
        model=model,
        src_tok=src_tok,
        trg_tok=trg_tok,
        max_src_len=int(payload["max_src_len"]),
        recipe=recipe,
        path=Path(path),
        payload=payload,
    )
