"""The decoder's teacher-forcing loop as one autograd function, for training on a CPU.

Step by step through autograd, each of the T decoder steps is five nodes forward and
five backward (the query, recurrent and context products, the attention, the GRU gates),
and the weights' gradients need every step's inputs and output gradients joined into
matrices after the loop (:mod:`nmt.model.loop_weight`). Here, as cuDNN does for its
recurrent layers, the whole loop is one function with a hand-written backward loop: each
step writes its products, states and contexts into one time-major buffer each, the
backward writes each step's gradients into buffers of the same layout, and the weights'
gradients are one matmul each over those buffers, which are already the joined matrices.

The equations are the decoder's (:meth:`nmt.model.decoder.Decoder.forward`) for one
layer of :class:`~nmt.model.gru.FusedGRUCell`: for i = 1..T, from s_0,

    q_i = W_a s_{i-1}                       attention query
    c_i, a_i = attention(q_i)               compiled kernel (keys U_a h_j, v_a, mask)
    x_i = e_i + W_c c_i                     e_i: the embeddings' share of the gates, with b_ih
    s_i = GRU(x_i, W_hh s_{i-1} + b_hh, s_{i-1})   compiled kernel

and the function returns every s_i and c_i (the deep output reads them after the loop).
It runs where the compiled kernels of :mod:`nmt.model.native` do (a CPU, float32 or
bfloat16); elsewhere the decoder steps through autograd as before.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nmt.model.shapes import ROW_QUANTUM


def decoder_loop(compiled, emb_gates: Tensor, s0: Tensor, w_query: Tensor, w_context: Tensor, w_hh: Tensor,
                 b_hh: Tensor, keys: Tensor, annotations: Tensor, v_a: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Run the loop (see the module's docstring); every tensor but ``v_a`` (float32) and
    ``mask`` in one dtype, the kernels'.

    :param compiled: :func:`nmt.model.native.kernels`
    :param emb_gates: ``[T, batch, 3 * hidden]`` e_i, time-major
    :param s0: ``[batch, hidden]`` initial state
    :param w_query: ``[attn_dim, hidden]`` W_a
    :param w_context: ``[3 * hidden, key_size]`` W_c, the context's columns of W_ih
    :param w_hh: ``[3 * hidden, hidden]`` and ``b_hh`` ``[3 * hidden]``
    :param keys: ``[batch, src_len, attn_dim]`` U_a h_j; ``annotations`` ``[batch, src_len, key_size]``
    :param v_a: ``[attn_dim]``; ``mask`` ``[batch, src_len]`` bool, True on real tokens
    :return: states s_1..s_T ``[T, batch, hidden]`` and contexts c_1..c_T ``[T, batch, key_size]``
    """
    return _DecoderLoop.apply(emb_gates, s0, w_query, w_context, w_hh, b_hh, keys, annotations, v_a, mask, compiled)


def _rows_buffer(rows: int, width: int, dtype: torch.dtype, extra: int = 0) -> Tensor:
    """``[rows + extra, width]`` rows to be written, then zero rows up to a multiple of
    ROW_QUANTUM in bfloat16 (so that the products over all rows repeat their shapes from
    batch to batch, as :mod:`nmt.model.shapes` explains)."""
    pad = -rows % ROW_QUANTUM if dtype == torch.bfloat16 else 0
    buffer = torch.empty(max(rows + extra, rows + pad), width, dtype=dtype)
    buffer[rows + extra :].zero_()
    return buffer


class _DecoderLoop(torch.autograd.Function):
    """:func:`decoder_loop`: forward and backward, each one loop over the steps."""

    @staticmethod
    def forward(ctx, emb_gates, s0, w_query, w_context, w_hh, b_hh, keys, annotations, v_a, mask, compiled):
        steps, batch, gates = emb_gates.shape
        rows, dtype = steps * batch, emb_gates.dtype
        keys, annotations, mask = keys.contiguous(), annotations.contiguous(), mask.contiguous()
        v = v_a.detach().float().contiguous()
        with torch.autocast("cpu", enabled=False):
            # s_0 .. s_T: rows (i - 1) * batch .. of states are the input s_{i-1} of step i
            states = _rows_buffer(rows, s0.size(1), dtype, extra=batch)
            contexts = _rows_buffer(rows, annotations.size(2), dtype)
            queries = torch.empty(steps, batch, w_query.size(0), dtype=dtype)
            gates_h = torch.empty(steps, batch, gates, dtype=dtype)
            gates_x = torch.empty(steps, batch, gates, dtype=dtype)
            weights = torch.empty(steps, batch, keys.size(1))
            s, c = states[: rows + batch].view(steps + 1, batch, -1), contexts[:rows].view(steps, batch, -1)
            s[0] = s0
            for i in range(steps):
                torch.mm(s[i], w_query.t(), out=queries[i])
                torch.addmm(b_hh, s[i], w_hh.t(), out=gates_h[i])
                compiled.attention_forward(queries[i], keys, v, mask, annotations, out=(c[i], weights[i]))
                torch.addmm(emb_gates[i], c[i], w_context.t(), out=gates_x[i])
                compiled.gru_forward(gates_x[i], gates_h[i], s[i], None, out=s[i + 1])
        ctx.save_for_backward(states, contexts, queries, gates_h, gates_x, weights, w_query, w_context, w_hh,
                              keys, annotations, v, mask)
        ctx.compiled = compiled
        ctx.v_dtype = v_a.dtype
        return s[1:], c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states, grad_contexts):
        states, contexts, queries, gates_h, gates_x, weights, w_query, w_context, w_hh, keys, annotations, v, mask = (
            ctx.saved_tensors
        )
        compiled = ctx.compiled
        steps, batch, gates = gates_x.shape
        rows, dtype = steps * batch, gates_x.dtype
        with torch.autocast("cpu", enabled=False):
            # [T, batch, ...], their rows wherever the deep output's backward left them
            grad_states = grad_states.to(dtype) if grad_states is not None else None
            grad_contexts = grad_contexts.to(dtype) if grad_contexts is not None else None
            s = states[: rows + batch].view(steps + 1, batch, -1)
            grad_x = _rows_buffer(rows, gates, dtype)  # the gates' gradients, time-major
            grad_h = _rows_buffer(rows, gates, dtype)
            grad_q = _rows_buffer(rows, queries.size(2), dtype)
            gx, gh, gq = (g[:rows].view(steps, batch, -1) for g in (grad_x, grad_h, grad_q))
            scratch = torch.empty(batch, queries.size(2)) if dtype != torch.float32 else None  # float32 d/d q_i
            sums = tuple(torch.zeros(t.shape) for t in (keys, annotations, v))
            grad_s = torch.zeros(batch, s.size(2), dtype=dtype)  # d/d s_i from the steps after i
            grad_s_direct = torch.empty_like(grad_s)  # the GRU's own d/d s_{i-1}
            for i in range(steps - 1, -1, -1):
                grad = grad_s if grad_states is None else grad_s.add_(grad_states[i])
                compiled.gru_backward(gates_x[i], gates_h[i], s[i], None, grad, out=(gx[i], gh[i], grad_s_direct))
                grad_c = gx[i] @ w_context if grad_contexts is None else torch.addmm(grad_contexts[i], gx[i], w_context)
                compiled.attention_backward(queries[i], keys, v, mask, annotations, weights[i], grad_c.contiguous(),
                                            None, sums, out=gq[i] if scratch is None else scratch)
                if scratch is not None:
                    gq[i].copy_(scratch)
                grad_s = torch.addmm(grad_s_direct, gh[i], w_hh).addmm_(gq[i], w_query)
            padded = grad_x.size(0)
            inputs = states[:padded]  # s_{i-1} of every step, then rows that meet zero gradients
            grad_w_context = grad_x.t() @ contexts[:padded]
            grad_w_hh, grad_w_query = grad_h.t() @ inputs, grad_q.t() @ inputs
            grad_b_hh = grad_h.sum(0)
        grad_keys, grad_annotations, grad_v = sums
        return (gx, grad_s, grad_w_query, grad_w_context, grad_w_hh, grad_b_hh, grad_keys.to(dtype),
                grad_annotations.to(dtype), grad_v.to(ctx.v_dtype), None, None)
