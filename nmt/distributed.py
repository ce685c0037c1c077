"""Data-parallel training on several processes: torch.distributed, set up from torchrun.

`torchrun --nproc-per-node N -m nmt train RECIPE` starts N copies of `nmt train` with
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in their environment;
`setup()` reads them and joins the copies into one process group. Without them (a plain
`nmt train`) it returns a single-process `Dist` whose collectives do nothing, so the
training loop reads the same either way.

Two process groups:

- the default group (nccl on GPUs, gloo on CPUs) carries the gradients: DDP averages
  them during backward;
- a gloo group on the CPU carries control: token counts, stop requests, rank 0's
  validation results and errors. Its timeout is long because the other ranks wait in it
  while rank 0 alone preprocesses the corpus or validates.

Rank 0 does everything that writes (preprocessing, checkpoints, metrics, logs, progress);
the run folder must therefore be on a filesystem that every node can read.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(hours=6)  # longer than preprocessing a WMT-sized corpus
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(Exception):
    """The process group cannot be set up, or the ranks disagree; the message says why."""


@dataclass
class Dist:
    """This process's place in the job, and the collectives the training loop needs.

    With world_size 1 every collective returns its input unchanged.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "nccl" or "gloo"; "" when not distributed
    control: Any = None  # the gloo process group for control messages
    owns_group: bool = False  # setup() created the process group, close() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the training step should call it: under DDP when distributed."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=self.device.index if ids else None)

    def sum(self, *values: float) -> list[float]:
        """Sum each number over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when the flag is true on at least one."""
        return bool(self.sum(float(flag))[0]) if self.enabled else flag

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a picklable value)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def main_first(self, fn: Callable[[], Any], *, then_others: bool = False) -> Any:
        """Run fn on rank 0 while the other ranks wait, then (then_others) on them too;
        returns fn's result where it ran. An exception on rank 0 is re-raised there and
        reaches the others as a DistributedError with its message."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # relayed below, then re-raised
                error = e
        message = self.broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"rank 0 failed: {message}")
        if then_others and not self.is_main:
            result = fn()
        return result

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every rank unless every rank holds rank 0's `value`."""
        if not self.enabled:
            return
        differs = self.any(self.broadcast(value) != value)
        if differs:
            raise DistributedError(
                f"the ranks see different {what}; the run folder must be on a filesystem that every node shares"
            )

    def seed_rank(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own dropout stream. Rank 0 keeps the stream it
        started or resumed with, so a single-process run is unaffected."""
        if self.rank > 0:
            import numpy as np

            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Skip DDP's gradient all-reduce for this backward (all but the last batch of an
        accumulated update: the gradients add up locally and are averaged once)."""
        if skip and self.enabled and hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def is_main_process() -> bool:
    """False on the ranks other than 0 of a process group: they do not log."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group that torchrun's environment describes, or run alone.

    device: auto (cuda when available, else cpu), cuda or cpu. Distributed on CUDA, rank
    r uses cuda:LOCAL_RANK with nccl; on CPU every rank uses gloo.
    """
    from nmt.train_utils import pick_device

    if not dist.is_initialized() and not launched_by_torchrun():
        return Dist(device=pick_device(device))
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    owns = not dist.is_initialized()
    if owns:
        missing = [name for name in _ENV if name not in os.environ]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE is set but {', '.join(missing)} is not; start distributed training with torchrun"
            )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda: no CUDA GPU is available")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "use --nproc-per-node <= the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not owns:
        backend = dist.get_backend()
    else:
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"cannot join the process group at {where}: {first}") from None
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                device=dev, backend=backend, control=control, owns_group=owns)
