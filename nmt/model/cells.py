"""The recurrent cells a model can be built with, chosen by name."""

from nmt.model.gru import ExactGRUCell, FusedGRUCell, make_gru_cell
from nmt.model.lstm import LSTMCell

CELLS = ("exact", "fused", "lstm")

Cell = ExactGRUCell | FusedGRUCell | LSTMCell


def make_cell(cell: str, input_size: int, hidden_size: int) -> Cell:
    """The cell named by ``cell``: ``"exact"`` or ``"fused"`` GRU, or ``"lstm"``."""
    if cell == "lstm":
        return LSTMCell(input_size, hidden_size)
    if cell in ("exact", "fused"):
        return make_gru_cell(cell, input_size, hidden_size)
    raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")


def gate_count(cell: str) -> int:
    """Gates per unit: the rows of a cell's weights are ``gate_count * hidden``."""
    return 4 if cell == "lstm" else 3
