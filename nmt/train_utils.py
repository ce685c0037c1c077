"""The pieces of training that are not the loop: optimizer, schedule, logs, signals."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.torch_version import TorchVersion
from tqdm import tqdm

from nmt.checkpoint import atomic_write
from nmt.distributed import is_main_process


class TrainError(Exception):
    """Training cannot start or go on; the message says why."""


def log(msg: str) -> None:
    """A line on stderr above the progress bar (from rank 0 only, under torchrun)."""
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU. Asking for cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # One fused kernel per update instead of several passes per parameter (on a CPU, from
    # torch 2.4: an update of the recipe's model in a quarter of the time).
    device = next(model.parameters()).device.type
    fused = device == "cuda" or (device == "cpu" and TorchVersion(torch.__version__) >= (2, 4))
    return cls(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
               fused=fused or None)


def setup_precision(precision: str, dev: torch.device) -> bool:
    """Whether training runs under bf16 autocast (``train.precision``).

    ``auto`` is the faster of the two that train to the same BLEU. On CUDA it keeps fp32
    tensors and runs their matmuls on TF32 tensor cores (the decoder's small per-step
    kernels are bound by launch overhead, and bf16 would only add casts). On a CPU that
    multiplies bf16 matrices itself (:func:`cpu_has_bf16_matmuls`) it is bf16 autocast,
    2.2x fp32's speed with AMX and about 1.6x with AVX-512 bf16; on other CPUs, which
    would emulate bf16, plain fp32. ``fp32`` is strict fp32 everywhere.
    """
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "auto"
        torch.backends.cudnn.allow_tf32 = precision == "auto"
    if precision == "auto":
        return dev.type == "cpu" and cpu_has_bf16_matmuls()
    return precision == "bf16"


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmuls() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX's ``amx_bf16`` or AVX-512's
    ``avx512_bf16`` among the flags of ``/proc/cpuinfo``; False where there is none)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that training frees, for the next update, rather
    than hand it back to the operating system; whether it could (False off glibc).

    Each CPU update allocates and frees tensors of megabytes (activations, gradients,
    concatenated steps). By default glibc returns big freed blocks to the system (blocks
    over a dynamic threshold are mapped and unmapped, and the heap's free top is trimmed),
    so the next update faults the same memory in again, page by page: 7,000-10,500 page
    faults an update of the multi30k recipe. Blocks up to 32 MB from the heap, no trimming
    below 1 GB and the heap grown 256 MB at a time leave about 3,000, and bf16 updates take
    2-7% less time; peak memory is unchanged, as freed memory is reused, not added to.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    except (OSError, AttributeError, TypeError):  # (TypeError: Windows, which has no CDLL(None))
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])


def precision_name(bf16: bool, dev: torch.device) -> str:
    """How training computes, for the log: after :func:`setup_precision` has set TF32 up."""
    if bf16:
        return "bf16 autocast"
    return "fp32, TF32 matmuls" if dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


class LRSchedule:
    """Learning rate per update: linear warm-up, then constant, inverse square root, or
    reduced by `plateau_factor` when validation BLEU stalls for `plateau_patience`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.scale = 1.0  # plateau decay so far
        self.best = None  # best validation BLEU seen (plateau)
        self.stalled = 0
        self.lr = cfg.lr

    def value(self, step: int) -> float:
        cfg, n = self.cfg, step + 1
        warm = min(1.0, n / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "inverse_sqrt":
            decay = (max(cfg.warmup_steps, 1) / max(n, cfg.warmup_steps, 1)) ** 0.5
            return cfg.lr * warm * decay
        return cfg.lr * warm * self.scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        self.lr = self.value(step)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def on_validation(self, bleu: float, optimizer) -> None:
        if self.cfg.schedule != "plateau":
            return
        if self.best is None or bleu > self.best:
            self.best, self.stalled = bleu, 0
            return
        self.stalled += 1
        if self.stalled > self.cfg.plateau_patience and self.cfg.lr * self.scale * self.cfg.plateau_factor >= self.cfg.min_lr:
            self.scale *= self.cfg.plateau_factor
            self.stalled = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "stalled": self.stalled}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.stalled = state["scale"], state["best"], state["stalled"]


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, and mirrors scalars to
    TensorBoard when the optional `tensorboard` package is installed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            pass

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (and any half-written line): a resumed run replays
        those updates, so the log keeps exactly one history."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))

    def write(self, *, kind: str, step: int, **values) -> None:
        record = {"time": round(time.time(), 3), "kind": kind, "step": step, **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next update
    boundary instead of killing it; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if is_main_process():  # under torchrun every rank gets the signal; one message
            print(f"\n{self.signal_name}: finishing this update, then saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def link_or_copy(src: Path, dst: Path) -> None:
    """Point dst at src's content atomically: a hard link where possible, else a copy."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already the same file (renaming a link onto itself would leave tmp behind)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class RunLockedError(Exception):
    """Another process is training in this run folder."""


class RunLock:
    """An exclusive lock on a run folder for the whole of `nmt train` (and of `nmt
    preprocess`, which would replace the data a training run reads).

    The lock is `flock` on run_dir/train.lock, so the kernel releases it when its holder
    dies, however it dies: a lock left by a killed run is simply taken over. The file
    names the holder (process id, host, start time) for the message the next run prints.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "train.lock"
        self.file = None
        self.taken_over = ""  # the holder a killed run left in the file, if any

    def __enter__(self):
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunLockedError(f"{self.path.parent} is in use: {holder} is training or preprocessing there; "
                                 "wait for it to finish, stop it, or use another --run-dir") from None
        self.file.seek(0)
        self.taken_over = self.file.read().strip()
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} "
                        f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        self.file.seek(0)
        self.file.truncate()  # an empty file: released cleanly
        self.file.flush()
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
        return False


def set_aside(run_dir: Path) -> Path | None:
    """Move a run's checkpoints, logs and evaluations into run_dir/old-<time>/ (the
    preprocessed data stays). Returns the folder, or None when there was nothing."""
    run_dir = Path(run_dir)
    movable = [run_dir / n for n in ("checkpoints", "metrics.jsonl", "eval", "tensorboard", "recipe.yaml")]
    movable = [p for p in movable if p.exists()]
    if not movable:
        return None
    aside = run_dir / time.strftime("old-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=False)
    for p in movable:
        p.rename(aside / p.name)
    return aside
