"""nmt: attention-based recurrent neural machine translation (Cho et al. 2014; Bahdanau et al. 2015)."""

__version__ = "0.1.0"
