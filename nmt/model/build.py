"""The one place where a recipe's model section becomes model arguments."""

from __future__ import annotations

from nmt.model.seq2seq import Seq2Seq


def build_model(cfg, src_vocab_size: int, trg_vocab_size: int) -> Seq2Seq:
    """A Seq2Seq from `recipe.model` (a ModelConfig) and the two vocabulary sizes."""
    return Seq2Seq(
        src_vocab_size=src_vocab_size,
        trg_vocab_size=trg_vocab_size,
        emb_dim=cfg.emb_dim,
        enc_hidden=cfg.enc_hidden,
        enc_layers=cfg.enc_layers,
        dec_hidden=cfg.dec_hidden,
        dec_layers=cfg.dec_layers,
        attn_dim=cfg.attn_dim,
        out_dim=cfg.out_dim,
        maxout=cfg.maxout,
        cell=cfg.cell,
        init_state=cfg.init_state,
        tie_output=cfg.tie_output,
        tie_all=cfg.tie_all,
        dropout_emb=cfg.dropout_emb,
        dropout_hidden=cfg.dropout_hidden,
        dropout_word=cfg.dropout_word,
    )
