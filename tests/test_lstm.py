"""The LSTM cell against torch.nn.LSTMCell, and the LSTM encoder against a packed nn.LSTM."""

import pytest
import torch

from nmt.model.cells import make_cell
from nmt.model.encoder import Encoder
from nmt.model.lstm import LSTMCell


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lstm_cell_matches_torch_lstmcell(batch_size):
    torch.manual_seed(0)
    reference = torch.nn.LSTMCell(5, 4).double()
    cell = LSTMCell(5, 4).double()
    cell.load_state_dict(reference.state_dict())  # same parameter layout
    xs = torch.randn(6, batch_size, 5, dtype=torch.float64)
    state = state_ref = (torch.randn(batch_size, 4, dtype=torch.float64), torch.randn(batch_size, 4, dtype=torch.float64))
    gates_x = cell.project_input(xs)  # whole sequence at once, outside the loop
    for t in range(xs.size(0)):
        state, state_ref = cell.step(gates_x[t], state), reference(xs[t], state_ref)
        torch.testing.assert_close(state, state_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(cell(xs[0], state), reference(xs[0], state), atol=1e-12, rtol=0)


def test_lstm_project_input_splits_concatenated_input():
    torch.manual_seed(0)
    cell = make_cell("lstm", 7, 3).double()
    x = torch.randn(2, 7, dtype=torch.float64)
    pieces = cell.project_input(x[:, :4]) + cell.project_input(x[:, 4:], offset=4, bias=False)
    torch.testing.assert_close(pieces, cell.project_input(x), atol=1e-12, rtol=0)
    assert pieces.shape == (2, 12)


def test_make_cell_names_the_choices():
    assert isinstance(make_cell("lstm", 3, 2), LSTMCell)
    with pytest.raises(ValueError, match="exact.*fused.*lstm"):
        make_cell("rnn", 3, 2)


def test_lstm_encoder_padding_and_backward_state():
    """Annotations of a padded sentence equal those of the sentence alone; the state
    handed to the bridge is the backward LSTM's output h at the first word."""
    torch.manual_seed(0)
    encoder = Encoder(vocab_size=10, emb_dim=6, hidden_size=4, cell="lstm").eval()
    alone = torch.tensor([[4, 5, 6]])
    batch = torch.tensor([[4, 5, 6, 0, 0], [7, 8, 9, 4, 5]])
    annotations_alone, backward_alone = encoder(alone, torch.tensor([3]))
    annotations, backward = encoder(batch, torch.tensor([3, 5]))
    torch.testing.assert_close(annotations[:1, :3], annotations_alone)
    assert torch.all(annotations[0, 3:] == 0)
    torch.testing.assert_close(backward[:1], backward_alone)
    torch.testing.assert_close(backward, annotations[:, 0, 4:])  # backward half at j = 1
