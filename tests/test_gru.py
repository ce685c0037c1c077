"""The two GRU cells against their equations, and the masked time loop against nn.GRU."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.model.gru import ExactGRUCell, FusedGRUCell, fused_gru_gates, make_gru_cell, run_gru


def cho_gru_reference(cell: ExactGRUCell, xs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Cho et al. (2014) eq. 5-8 written out with explicit loops over units.

    :param xs: ``[steps, batch, input]``; :param h: ``[batch, hidden]``
    :return: ``[steps, batch, hidden]``
    """
    n = cell.hidden_size
    w_x, w_h, b = cell.weight_ih.detach(), cell.weight_hh.detach(), cell.bias.detach()
    # W_z [h, x] = W_z^h h + W_z^x x: the rows of each gate, split into recurrent and input columns
    zs, rs, ns = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)  # gate rows: z, r, candidate
    outputs = []
    for x in xs:
        new_h = torch.empty_like(h)
        for batch in range(h.size(0)):
            hb, xb = h[batch], x[batch]
            z = torch.sigmoid(w_h[zs] @ hb + w_x[zs] @ xb + b[zs])
            r = torch.sigmoid(w_h[rs] @ hb + w_x[rs] @ xb + b[rs])
            candidate = torch.tanh(w_h[ns] @ (r * hb) + w_x[ns] @ xb + b[ns])
            for j in range(n):
                new_h[batch, j] = (1 - z[j]) * hb[j] + z[j] * candidate[j]
        h = new_h
        outputs.append(h)
    return torch.stack(outputs)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_exact_cell_matches_cho_equations(batch_size):
    torch.manual_seed(0)
    cell = ExactGRUCell(5, 4).double()
    with torch.no_grad():
        cell.bias.normal_()
    xs = torch.randn(6, batch_size, 5, dtype=torch.float64)
    h0 = torch.randn(batch_size, 4, dtype=torch.float64)

    expected = cho_gru_reference(cell, xs, h0)
    gates_x = cell.project_input(xs)  # whole sequence at once, outside the loop
    h, outputs = h0, []
    for t in range(xs.size(0)):
        h = cell.step(gates_x[t], h)
        outputs.append(h)
    torch.testing.assert_close(torch.stack(outputs), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(cell(xs[0], h0), expected[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fused_cell_matches_torch_grucell(batch_size):
    torch.manual_seed(0)
    reference = torch.nn.GRUCell(5, 4).double()
    cell = FusedGRUCell(5, 4).double()
    cell.load_state_dict(reference.state_dict())  # same parameter layout
    xs = torch.randn(6, batch_size, 5, dtype=torch.float64)
    h_ref = h = torch.randn(batch_size, 4, dtype=torch.float64)
    gates_x = cell.project_input(xs)
    for t in range(xs.size(0)):
        h, h_ref = cell.step(gates_x[t], h), reference(xs[t], h_ref)
        torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_gates_own_backward_matches_the_formulas_and_numerical_gradients(masked):
    """With gradients on a CPU, fused_gru_gates runs its own autograd function: the same
    values as the plain formulas (used without gradients), gradients that pass gradcheck,
    and on padding rows the old state, with its gradient passed straight through."""
    torch.manual_seed(0)
    gates_x, gates_h = (torch.randn(5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    real = torch.tensor([[True], [False], [True], [True], [False]]) if masked else None
    with torch.no_grad():
        plain = fused_gru_gates(gates_x, gates_h, h, real)
    torch.testing.assert_close(fused_gru_gates(gates_x, gates_h, h, real), plain, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda gx, gh, hh: fused_gru_gates(gx, gh, hh, real), (gates_x, gates_h, h))
    if masked:
        grads = torch.autograd.grad(fused_gru_gates(gates_x, gates_h, h, real)[1].sum(), (gates_x, gates_h, h))
        assert grads[0].abs().sum() == grads[1].abs().sum() == 0 and grads[2][1].eq(1).all()


@pytest.mark.parametrize("kind", ["exact", "fused"])
def test_project_input_splits_concatenated_input(kind):
    torch.manual_seed(0)
    cell = make_gru_cell(kind, 7, 3).double()
    x = torch.randn(2, 7, dtype=torch.float64)
    pieces = cell.project_input(x[:, :4]) + cell.project_input(x[:, 4:], offset=4, bias=False)
    torch.testing.assert_close(pieces, cell.project_input(x), atol=1e-12, rtol=0)


def test_make_gru_cell_rejects_unknown_cell():
    with pytest.raises(ValueError, match="cell"):
        make_gru_cell("lstm", 3, 3)


def test_masked_loop_matches_packed_nn_gru_in_both_directions():
    """run_gru with the fused cell reproduces a packed bidirectional nn.GRU."""
    torch.manual_seed(0)
    rnn = torch.nn.GRU(5, 4, bidirectional=True, batch_first=True).double()
    forward_cell, backward_cell = FusedGRUCell(5, 4).double(), FusedGRUCell(5, 4).double()
    for cell, suffix in ((forward_cell, "l0"), (backward_cell, "l0_reverse")):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(rnn, f"{name}_{suffix}"))
    lengths = torch.tensor([6, 2, 4, 1])
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    mask = torch.arange(6) < lengths.unsqueeze(1)

    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, h_n = rnn(packed)
    expected, _ = pad_packed_sequence(expected, batch_first=True, total_length=6)

    forward_states, forward_final = run_gru(forward_cell.step, forward_cell.project_input(x), mask)
    backward_states, backward_final = run_gru(
        backward_cell.step, backward_cell.project_input(x), mask, reverse=True
    )
    torch.testing.assert_close(torch.cat([forward_states, backward_states], 2), expected)
    torch.testing.assert_close(forward_final, h_n[0])
    torch.testing.assert_close(backward_final, h_n[1])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encoder_cpu_loop_matches_packed_nn_gru_with_gradients(layers, dtype):
    """On a CPU the fused encoder runs nn.GRU's parameters in a time loop, both directions
    as one batch: the same annotations, final backward state and parameter gradients as the
    packed nn.GRU. (In float32 the loop's gates run in the compiled kernels, where there are
    any; float64 takes PyTorch's operations.)"""
    from nmt.model.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder(vocab_size=11, emb_dim=5, hidden_size=4, layers=layers).to(dtype)
    lengths = torch.tensor([6, 2, 4, 1])
    x = torch.randn(4, 6, 5, dtype=dtype)
    mask = torch.arange(6) < lengths.unsqueeze(1)
    probe = torch.randn(4, 6, 8, dtype=dtype)
    results = []
    for run in (lambda: encoder._encode_packed(x, lengths), lambda: encoder._encode_loop(x, mask)):
        annotations, backward_h1 = run()
        loss = (annotations * probe).sum() + backward_h1.sum()
        results.append((annotations, backward_h1, torch.autograd.grad(loss, list(encoder.rnn.parameters()))))
    (a0, h0, g0), (a1, h1, g1) = results
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(h1, h0)
    for expected, got in zip(g0, g1):
        torch.testing.assert_close(got, expected)
