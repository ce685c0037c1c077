"""A toy translation task that a tiny model learns in seconds, shared by the tests."""

from pathlib import Path

from nmt.recipe import load_recipe


def toy_corpus(folder: Path, n_train: int = 600, seed: int = 0) -> None:
    """A word-for-word 'translation': source word wN becomes target word vN."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(10)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", 40), ("test", 40)):
        src, trg = [], []
        for _ in range(n):
            sent = [rng.choice(words) for _ in range(rng.randint(2, 7))]
            src.append(" ".join(sent))
            trg.append(" ".join(w.replace("w", "v") for w in sent))
        (folder / f"{split}.xx").write_text("\n".join(src) + "\n")
        (folder / f"{split}.yy").write_text("\n".join(trg) + "\n")


TOY_RECIPE = """
name: toy
seed: 7
data:
  src_lang: xx
  trg_lang: yy
  source: local
  path: {folder}/{{split}}.{{lang}}
  valid_split: val
  test_splits: [test]
tokenizer:
  vocab_size: 19
  type: bpe
model:
  emb_dim: 32
  enc_hidden: 64
  dec_hidden: 128
  attn_dim: 32
  out_dim: 32
  dropout_emb: 0.0
  dropout_hidden: 0.0
train:
  batch_tokens: 1200
  lr: 0.002
  max_epochs: 0
  max_steps: {steps}
  valid_every: {valid_every}
  log_every: 5
  label_smoothing: 0.0
  threads: 1
  precision: fp32  # the same arithmetic on every machine (auto depends on the CPU)
decode:
  beam_size: 2
"""


def make_recipe(tmp_path: Path, steps: int, valid_every: int = 1000, extra: list[str] = ()):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        toy_corpus(corpus)
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_RECIPE.format(folder=corpus, steps=steps, valid_every=valid_every))
    return load_recipe(path, list(extra))


def train_toy(folder: Path, steps: int = 300, extra: list[str] = ()) -> Path:
    """Train the toy model into folder/run (about 5 s) and return the run folder.

    :param extra: recipe overrides, e.g. ``["model.cell=lstm"]``
    """
    from nmt.train import train

    recipe = make_recipe(folder, steps=steps, valid_every=steps, extra=extra)
    train(recipe, folder / "run", device="cpu", evaluate_at_end=False)
    return folder / "run"
