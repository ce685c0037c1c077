"""`python -m nmt` (and `torchrun -m nmt`) run the command-line interface."""

from nmt.cli import app

app()
