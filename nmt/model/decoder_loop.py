"""The decoder's teacher-forcing loop as one autograd function, for training.

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
On a CPU the attention and the GRU gates are the compiled kernels of
:mod:`nmt.model.native` (float32 or bfloat16). On a GPU (float32) they are PyTorch
operations, the gates CUDA's fused GRU-cell kernel: there a step costs what launching its
kernels costs, and the loop launches fewer than autograd did, with none of its per-node
bookkeeping. Elsewhere the decoder steps through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nmt.model.gru import FusedGRUCell, gates_backward, gates_forward
from nmt.model.native import KERNEL_DTYPES, kernels
from nmt.model.shapes import ROW_QUANTUM


def runs_loop(decoder, dtype: torch.dtype, keys: Tensor, annotations: Tensor) -> bool:
    """Whether :func:`loop_pass` runs this pass of ``decoder`` (an
    :class:`~nmt.model.decoder.Decoder`): in training, for one layer of the fused GRU, with
    keys and annotations in the dtype of the gates: on a CPU one that the compiled kernels
    take (and they are built), on a GPU float32."""
    if not (torch.is_grad_enabled() and decoder.layers == 1 and isinstance(decoder.cells[0], FusedGRUCell)):
        return False
    if not keys.dtype == annotations.dtype == dtype:
        return False
    if keys.device.type == "cpu":
        return dtype in KERNEL_DTYPES and kernels() is not None
    return keys.is_cuda and dtype == torch.float32


def loop_pass(decoder, emb: Tensor, state: Tensor, keys: Tensor, annotations: Tensor,
              src_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The decoder's steps 1 and 2 for every target word (``Decoder._loop``) by
    :func:`decoder_loop`, from the embeddings ``[batch, trg_len, emb_dim]`` in the gates'
    dtype and the initial state ``[1, batch, hidden]``: the states ``[batch, trg_len,
    hidden]`` and contexts ``[batch, trg_len, annotation_size]``."""
    cell, attention, dtype = decoder.cells[0], decoder.attention, emb.dtype
    compiled = kernels() if keys.device.type == "cpu" else None
    emb_gates = cell.project_input(emb.transpose(0, 1))  # trg_len x batch x gates*hidden: time-major
    states, contexts = decoder_loop(
        compiled, emb_gates, state[0].to(dtype), attention.query_layer.weight.to(dtype),
        cell.weight_ih[:, decoder.emb_dim :].to(dtype), cell.weight_hh.to(dtype), cell.bias_hh.to(dtype),
        keys, annotations, attention.energy_layer.weight.squeeze(0), src_mask,
    )
    return states.transpose(0, 1), contexts.transpose(0, 1)


def decoder_loop(compiled, emb_gates: Tensor, s0: Tensor, w_query: Tensor, w_context: Tensor, w_hh: Tensor,
                 b_hh: Tensor, keys: Tensor, annotations: Tensor, v_a: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Run the loop (see the module's docstring); every tensor but ``v_a`` (float32) and
    ``mask`` in one dtype: the kernels', or float32 without them.

    :param compiled: :func:`nmt.model.native.kernels`, or None for PyTorch operations
    :param emb_gates: ``[T, batch, 3 * hidden]`` e_i, time-major
    :param s0: ``[batch, hidden]`` initial state
    :param w_query: ``[attn_dim, hidden]`` W_a
    :param w_context: ``[3 * hidden, key_size]`` W_c, the context's columns of W_ih
    :param w_hh: ``[3 * hidden, hidden]`` and ``b_hh`` ``[3 * hidden]``
    :param keys: ``[batch, src_len, attn_dim]`` U_a h_j; ``annotations`` ``[batch, src_len, key_size]``
    :param v_a: ``[attn_dim]``; ``mask`` ``[batch, src_len]`` bool, True on real tokens
    :return: states s_1..s_T ``[T, batch, hidden]`` and contexts c_1..c_T ``[T, batch, key_size]``
    """
    if compiled is None:
        return _PlainDecoderLoop.apply(emb_gates, s0, w_query, w_context, w_hh, b_hh, keys, annotations, v_a, mask)
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
            # the steps add their products into these in place: e_i and b_hh copied in at once
            gates_h = b_hh.expand(steps, batch, gates).clone()
            gates_x = emb_gates.clone()
            weights = torch.empty(steps, batch, keys.size(1))
            s, c = states[: rows + batch].view(steps + 1, batch, -1), contexts[:rows].view(steps, batch, -1)
            s[0] = s0
            for i in range(steps):
                torch.mm(s[i], w_query.t(), out=queries[i])
                gates_h[i].addmm_(s[i], w_hh.t())
                compiled.attention_forward(queries[i], keys, v, mask, annotations, out=(c[i], weights[i]))
                gates_x[i].addmm_(c[i], w_context.t())
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
            grad_c = torch.empty(steps, batch, annotations.size(2), dtype=dtype)  # d/d c_i, every step's
            sums = (torch.zeros(keys.shape), None, torch.zeros(v.shape))  # the annotations' after the loop
            grad_s = torch.zeros(batch, s.size(2), dtype=dtype)  # d/d s_i from the steps after i
            grad_s_direct = torch.empty_like(grad_s)  # the GRU's own d/d s_{i-1}
            for i in range(steps - 1, -1, -1):
                grad = grad_s if grad_states is None else grad_s.add_(grad_states[i])
                compiled.gru_backward(gates_x[i], gates_h[i], s[i], None, grad, out=(gx[i], gh[i], grad_s_direct))
                if grad_contexts is None:
                    torch.mm(gx[i], w_context, out=grad_c[i])
                else:
                    torch.addmm(grad_contexts[i], gx[i], w_context, out=grad_c[i])
                compiled.attention_backward(queries[i], keys, v, mask, annotations, weights[i], grad_c[i], None, sums,
                                            out=gq[i] if scratch is None else scratch)
                if scratch is not None:
                    gq[i].copy_(scratch)
                grad_s = torch.addmm(grad_s_direct, gh[i], w_hh).addmm_(gq[i], w_query)
            padded = grad_x.size(0)
            inputs = states[:padded]  # s_{i-1} of every step, then rows that meet zero gradients
            grad_w_context = grad_x.t() @ contexts[:padded]
            grad_w_hh, grad_w_query = grad_h.t() @ inputs, grad_q.t() @ inputs
            grad_b_hh = grad_h.sum(0)
            # sum_i a_i grad_c_i^T, per sentence: [src_len x steps] by [steps x key_size], in float32
            grad_annotations = torch.bmm(weights.permute(1, 2, 0), grad_c.transpose(0, 1).float())
        grad_keys, _, grad_v = sums
        return (gx, grad_s, grad_w_query, grad_w_context, grad_w_hh, grad_b_hh, grad_keys.to(dtype),
                grad_annotations.to(dtype), grad_v.to(ctx.v_dtype), None, None)


class _PlainDecoderLoop(torch.autograd.Function):
    """:func:`decoder_loop` by PyTorch operations (float32): each step's attention by its
    formulas, the gates by CUDA's fused GRU-cell kernel on a GPU (:func:`_gates`)."""

    @staticmethod
    def forward(ctx, emb_gates, s0, w_query, w_context, w_hh, b_hh, keys, annotations, v_a, mask):
        steps, batch, gates = emb_gates.shape
        with torch.autocast(emb_gates.device.type, enabled=False):
            states = emb_gates.new_empty(steps + 1, batch, s0.size(1))
            contexts = emb_gates.new_empty(steps, batch, annotations.size(2))
            queries = emb_gates.new_empty(steps, batch, w_query.size(0))
            gates_h = torch.empty_like(emb_gates)
            gates_x = torch.empty_like(emb_gates)
            states[0] = s0
            padding, v = ~mask, v_a.detach()
            hidden, weights, saved = [], [], []  # each step's tanh(q_i + k_j), a_i and gates
            for i in range(steps):
                torch.mm(states[i], w_query.t(), out=queries[i])
                torch.addmm(b_hh, states[i], w_hh.t(), out=gates_h[i])
                hidden.append(torch.add(keys, queries[i].unsqueeze(1)).tanh_())  # batch x src_len x attn_dim
                weights.append(torch.softmax((hidden[i] @ v).masked_fill_(padding, float("-inf")), dim=1))
                torch.bmm(weights[i].unsqueeze(1), annotations, out=contexts[i].unsqueeze(1))
                torch.addmm(emb_gates[i], contexts[i], w_context.t(), out=gates_x[i])
                new, step_saved = _gates(gates_x[i], gates_h[i], states[i])
                states[i + 1] = new
                saved.append(step_saved)
        ctx.save_for_backward(states, contexts, w_query, w_context, w_hh, annotations, v)
        ctx.hidden, ctx.weights, ctx.saved = hidden, weights, saved
        return states[1:], contexts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states, grad_contexts):
        states, contexts, w_query, w_context, w_hh, annotations, v = ctx.saved_tensors
        hidden, weights, saved = ctx.hidden, ctx.weights, ctx.saved
        steps, batch, size = states.size(0) - 1, states.size(1), states.size(2)
        with torch.autocast(states.device.type, enabled=False):
            grad_x = states.new_empty(steps, batch, w_context.size(0))
            grad_h = torch.empty_like(grad_x)
            grad_q = states.new_empty(steps, batch, w_query.size(0))
            grad_c = torch.empty_like(contexts)  # d/d c_i: the annotations' gradient needs them all
            grad_keys, grad_v = torch.zeros_like(hidden[0]), torch.zeros_like(v)
            grad_s = states.new_zeros(batch, size)
            for i in range(steps - 1, -1, -1):
                grad = grad_s if grad_states is None else grad_s + grad_states[i]
                step_x, step_h, grad_s_direct = _gates_backward(saved[i], grad)
                grad_x[i], grad_h[i] = step_x, step_h
                if grad_contexts is None:
                    torch.mm(grad_x[i], w_context, out=grad_c[i])
                else:
                    torch.addmm(grad_contexts[i], grad_x[i], w_context, out=grad_c[i])
                grad_weights = torch.bmm(annotations, grad_c[i].unsqueeze(2)).squeeze(2)  # batch x src_len
                grad_e = torch._softmax_backward_data(grad_weights, weights[i], 1, weights[i].dtype)
                grad_pre = torch.ops.aten.tanh_backward(grad_e.unsqueeze(2) * v, hidden[i])  # d/d (q_i + k_j)
                grad_keys += grad_pre
                grad_v.addmv_(hidden[i].flatten(0, 1).t(), grad_e.flatten())
                torch.sum(grad_pre, dim=1, out=grad_q[i])
                grad_s = torch.addmm(grad_s_direct, grad_h[i], w_hh).addmm_(grad_q[i], w_query)
            # sum_i a_i c_i's gradient, per sentence: [src_len x steps] by [steps x key_size]
            grad_annotations = torch.bmm(torch.stack(weights, dim=2), grad_c.transpose(0, 1))
            inputs = states[:-1].flatten(0, 1)  # s_{i-1} of every step
            grad_x2, grad_h2 = grad_x.flatten(0, 1), grad_h.flatten(0, 1)
            grad_w_context = grad_x2.t() @ contexts.flatten(0, 1)
            grad_w_hh, grad_w_query = grad_h2.t() @ inputs, grad_q.flatten(0, 1).t() @ inputs
        return (grad_x, grad_s, grad_w_query, grad_w_context, grad_w_hh, grad_h2.sum(0), grad_keys, grad_annotations,
                grad_v, None)


def _gates(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, object]:
    """A step's GRU gates, and what :func:`_gates_backward` reads: on a GPU, CUDA's fused
    GRU-cell kernel and its workspace; elsewhere :func:`nmt.model.gru.gates_forward`."""
    if h.is_cuda:
        return torch.ops.aten._thnn_fused_gru_cell(gates_x, gates_h, h)
    return gates_forward(gates_x, gates_h, h)


def _gates_backward(saved, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`_gates`' gates_x, gates_h and h."""
    if isinstance(saved, Tensor):  # CUDA's workspace
        return torch.ops.aten._thnn_fused_gru_cell_backward(grad.contiguous(), saved, False)[:3]
    return gates_backward(saved, grad)
