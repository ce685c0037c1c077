"""The output layer and the label-smoothed cross-entropy, in one autograd function.

The value and gradients are those of
`F.cross_entropy(F.linear(features, weight, bias), target, ignore_index=pad,
label_smoothing=eps, reduction="sum")`, but the [tokens x vocabulary] logits, the
largest matrix in training, are never held whole. A block of rows at a time, the forward
pass computes the block's logits, its losses and its gradient `softmax(logits) - q` (q:
the smoothed target distribution), and keeps only that gradient, in the logits' dtype; the
backward pass is then two matmuls with it (features and weight) and the bias gradient
summed block by block in float32.

On a CPU a block stays in the cache across its log-softmax, exponential and subtractions;
composed from PyTorch operations over the whole matrix, each of those is a pass over
memory, as are, under bfloat16, the cast of the logits to float32 and of their gradient
back, the bias broadcast into the logits and the bias gradient's sum over the rows. A GPU
takes all rows in one block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from nmt.model.loop_weight import autocast_dtype
from nmt.model.native import KERNEL_DTYPES, kernels

_BLOCK_ROWS = 128  # 128 x 8,000 float32 is 4 MB: fits a CPU's L3 cache
_COMPILED_BLOCK_ROWS = 256  # with the kernel, a block is read back from L2 once: bigger matmuls pay
# ... in bf16. In float32 the logits' matmul runs faster whole (K = 256 is a short inner
# dimension for MKL's blocks) than the kernel loses reading them back from memory: one
# block, into the gradient buffer that is there anyway (3,500 x 8,000 rows, forward: 65-66
# -> 55.6-55.9 ms on 2 cores).

# The gradient buffer of the last backward pass, handed to the next forward pass. At 4,096
# tokens x 8,000 words in bfloat16 it is 60 MB: a new one each update is memory the
# operating system maps afresh and faults in page by page (on a CPU, 14 ms an update, 4x
# the time of writing the gradient into it). A buffer is held by one forward pass until
# its backward ends, so an update whose graph is dropped unused merely allocates a new one.
_spare: list[Tensor] = []


def _buffer(rows: int, cols: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A ``[rows, cols]`` tensor of ``like``'s dtype and device, and the buffer it is a view of."""
    if _spare and _spare[0].numel() >= rows * cols and _spare[0].dtype == like.dtype \
            and _spare[0].device == like.device:
        buffer = _spare.pop()
    else:
        _spare.clear()
        buffer = like.new_empty(rows * cols)
    return buffer[: rows * cols].view(rows, cols), buffer


class _LinearSmoothedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Tensor, target: Tensor, smoothing: float,
                ignore_index: int) -> Tensor:
        rows, vocab = features.size(0), weight.size(0)
        compiled = kernels() if features.device.type == "cpu" and features.dtype in KERNEL_DTYPES else None
        if compiled is not None and features.dtype == torch.bfloat16:
            # Rows padded to whole blocks (zero features, ignored targets): every bf16 matmul
            # of the loss then has one of a few shapes. oneDNN compiles a kernel for every
            # new shape, 2-16 ms each for these; every batch would bring new ones.
            padding = -rows % _COMPILED_BLOCK_ROWS
            features = F.pad(features, (0, 0, 0, padding))
            target = F.pad(target, (0, padding), value=ignore_index)
        n = features.size(0)
        ctx.rows = rows
        keep = target != ignore_index  # tokens
        need_grad = any(ctx.needs_input_grad[:3])
        grad, ctx.buffer = _buffer(n, vocab, features) if need_grad else (None, None)  # d loss / d logits
        accumulate = torch.promote_types(features.dtype, torch.float32)  # float32, or float64
        bias_grad = torch.zeros(vocab, dtype=accumulate, device=features.device) if need_grad else None
        losses = torch.empty(n, dtype=accumulate, device=features.device)
        # A GPU reads memory fast and launches kernels slowly: there, one block of all rows.
        block = _BLOCK_ROWS if features.device.type == "cpu" else max(n, 1)
        if compiled is not None:
            target = target.long().contiguous()
            block = _COMPILED_BLOCK_ROWS if features.dtype == torch.bfloat16 or grad is None else max(n, 1)
            scratch = None if grad is not None else features.new_empty(min(block, n), vocab)
            bias32 = bias.float().contiguous()
        for start in range(0, n, block):
            rows = slice(start, start + block)
            if compiled is not None:  # the logits, then in place their gradient: one pass in the cache
                logits = grad[rows] if grad is not None else scratch[: min(block, n - start)]
                torch.mm(features[rows], weight.t(), out=logits)  # the kernel adds the bias
                compiled.smoothed_ce_(logits, bias32, target[rows], ignore_index, smoothing, losses[rows], bias_grad)
                continue
            logits = torch.addmm(bias, features[rows], weight.t())  # rows x vocab
            log_probs = torch.log_softmax(logits, dim=1, dtype=accumulate)
            gold = target[rows].unsqueeze(1)
            loss = log_probs.gather(1, gold).squeeze(1).neg_()  # nll
            if smoothing:
                loss.mul_(1 - smoothing).sub_(log_probs.mean(dim=1), alpha=smoothing)
            losses[rows] = loss
            if grad is not None:  # softmax - q, zero on ignored rows
                probs = log_probs.exp_()
                if smoothing:
                    probs.sub_(smoothing / vocab)
                probs.scatter_add_(1, gold, probs.new_full(gold.shape, -(1 - smoothing)))
                probs.mul_(keep[rows].unsqueeze(1))
                bias_grad += probs.sum(0)
                grad[rows] = probs
        ctx.save_for_backward(grad, features, weight, bias_grad)
        return (losses * keep).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad, features, weight, bias_grad = ctx.saved_tensors
        # grad_output scales the small products, not grad
        grad_features = (grad @ weight)[: ctx.rows].mul_(grad_output) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ features).mul_(grad_output) if ctx.needs_input_grad[1] else None
        grad_bias = (bias_grad * grad_output).to(weight.dtype) if ctx.needs_input_grad[2] else None
        _spare[:] = [ctx.buffer]  # for the next forward pass (a second backward pass is not supported)
        return grad_features, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(features: Tensor, weight: Tensor, bias: Tensor, target: Tensor, *,
                         smoothing: float = 0.0, ignore_index: int = 0) -> Tensor:
    """Summed label-smoothed cross-entropy of the logits ``features W^T + b`` over the
    tokens that are not ``ignore_index``, without holding the logits whole.

    Under autocast the products run in its dtype, as ``F.linear`` would; the
    log-softmax and the loss in at least float32.

    Args:
        features: [tokens, dim] the output layer's input
        weight: [vocab, dim]; bias: [vocab]
        target: [tokens] gold ids
    Returns:
        a scalar (float32, or float64 for float64 inputs): the sum over kept tokens of (1 - eps) * nll + eps * mean_k(-log p_k)
    """
    dtype = autocast_dtype(features.device.type) or torch.promote_types(features.dtype, weight.dtype)
    features, weight, bias = features.to(dtype), weight.to(dtype), bias.to(dtype)
    return _LinearSmoothedCE.apply(features, weight, bias, target, smoothing, ignore_index)
