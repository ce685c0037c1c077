"""Label-smoothed cross-entropy in one fused autograd function.

The same value and gradient as
`F.cross_entropy(logits, target, ignore_index=pad, label_smoothing=eps, reduction="sum")`,
but the backward pass writes the gradient `softmax(logits) - q` (q: the smoothed target
distribution) directly, instead of composing log_softmax, nll and the smoothing term:
on a [tokens x vocabulary] matrix each of those is a full pass over memory, and that
matrix is the largest one in training.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _SmoothedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, smoothing: float, ignore_index: int) -> Tensor:
        log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32)  # tokens x vocab
        loss = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)  # nll, tokens
        if smoothing:
            loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1)
        keep = target != ignore_index  # tokens
        ctx.save_for_backward(log_probs, target, keep)
        ctx.smoothing = smoothing
        ctx.logits_dtype = logits.dtype
        return (loss * keep).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        log_probs, target, keep = ctx.saved_tensors
        eps = ctx.smoothing
        weight = keep.float() * grad_output  # tokens
        grad = log_probs.exp_()  # softmax, in place: log_probs is not needed again
        if eps:
            grad.sub_(eps / grad.size(1))
        grad.mul_(weight.unsqueeze(1))
        grad.scatter_add_(1, target.unsqueeze(1), (-(1 - eps) * weight).unsqueeze(1))
        return grad.to(ctx.logits_dtype), None, None, None


def smoothed_cross_entropy(logits: Tensor, target: Tensor, *, smoothing: float = 0.0, ignore_index: int = 0) -> Tensor:
    """Summed label-smoothed cross-entropy over the tokens that are not `ignore_index`.

    Args:
        logits: [tokens, vocab] (float32 or bfloat16; computed in float32)
        target: [tokens] gold ids
    Returns:
        a scalar: the sum over kept tokens of (1 - eps) * nll + eps * mean_k(-log p_k)
    """
    return _SmoothedCE.apply(logits, target, smoothing, ignore_index)
