"""The recurrent encoder-decoder with attention: cells, encoder, attention, decoder, Seq2Seq."""

from nmt.model.attention import AdditiveAttention
from nmt.model.decoder import Decoder
from nmt.model.encoder import Encoder
from nmt.model.gru import ExactGRUCell, FusedGRUCell
from nmt.model.lstm import LSTMCell
from nmt.model.seq2seq import EncoderOutput, Seq2Seq

__all__ = [
    "AdditiveAttention",
    "Decoder",
    "Encoder",
    "EncoderOutput",
    "ExactGRUCell",
    "FusedGRUCell",
    "LSTMCell",
    "Seq2Seq",
]
