"""Whole-batch matmuls with their row counts rounded up, so that bf16 matmuls on a CPU
repeat their shapes from batch to batch.

oneDNN, which runs PyTorch's bf16 matmuls on a CPU, compiles a kernel for every new
matmul shape and keeps the last 1,024 (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``): 2-16 ms for
each of this model's whole-batch products (measured with ``ONEDNN_VERBOSE=profile_create``).
Their rows are the batch's sentences x words, new in almost every batch, so without
rounding a bf16 update on a CPU spent about 50 ms of its 330 compiling. Padded with zero
rows to a multiple of :data:`ROW_QUANTUM`, a product has one of a few shapes; the zero
rows cost at most 127 rows of work. Float32 (MKL) and GPU matmuls compile nothing per
shape, and are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nmt.model.loop_weight import autocast_dtype

ROW_QUANTUM = 128


def _padded(x: Tensor) -> bool:
    """Whether products of ``x`` run as bf16 oneDNN matmuls on a CPU."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or autocast_dtype("cpu") == torch.bfloat16


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` over ``x`` ``[..., in]``, its rows padded as above in bf16 on a CPU."""
    if not _padded(x):
        return F.linear(x, weight, bias)
    rows = x[..., 0].numel()
    flat = F.pad(x.reshape(rows, x.size(-1)), (0, 0, 0, -rows % ROW_QUANTUM))
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.size(0))


def concatenate(tensors: list[Tensor]) -> Tensor:
    """``torch.cat(tensors, dim=-2)``; in bf16 on a CPU, with zero rows after them up to a
    multiple of :data:`ROW_QUANTUM` (for products that sum over the rows)."""
    first = tensors[0]
    if first.dtype != torch.bfloat16 or first.device.type != "cpu":
        return torch.cat(tensors, dim=-2)
    rows = sum(t.size(-2) for t in tensors)
    out = first.new_empty(*first.shape[:-2], rows + (-rows % ROW_QUANTUM), first.size(-1))
    torch.cat(tensors, dim=-2, out=out[..., :rows, :])
    out[..., rows:, :].zero_()
    return out
