"""Recipes: one YAML file describes one run, parsed once into frozen, validated objects.

Every field carries its help text and its range in its metadata; a wrong key (with a
"did you mean" hint), a wrong type or an out-of-range value raises `RecipeError` with a
one-line message naming the file and the dotted key. `--set key=value` overrides are
parsed as YAML scalars and validated exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmt.recipe_file import RecipeError, Scientific, read_yaml, yaml_value


def _f(default, help: str, *, min=None, max=None, choices=None, min_open: bool = False):
    """A dataclass field with help text and range checks in its metadata."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_open": min_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


MULTI30K_URL = (
    "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{split}.{lang}.gz"
)


@dataclass(frozen=True)
class DataConfig:
    src_lang: str = _f("de", "source language code, as in the file names / hub columns")
    trg_lang: str = _f("en", "target language code")
    source: str = _f("url", "where the corpus comes from", choices=["url", "local", "hub"])
    path: str = _f(
        MULTI30K_URL,
        "url/local: file template with {split} and {lang} (plain or .gz); hub: dataset name",
    )
    hub_config: str = _f("", "hub: dataset configuration name (e.g. de-en); empty for none")
    hub_columns: list = _f(
        [], "hub: [source column, target column]; empty: a 'translation' dict or language columns"
    )
    train_split: str = _f("train", "name of the training split in the source")
    valid_split: str = _f("val", "name of the validation split in the source")
    test_splits: list = _f([], "test splits to evaluate; missing ones are skipped with a warning")
    max_train_pairs: int = _f(0, "use only the first N training pairs (0: all)", min=0)
    normalize: bool = _f(True, "training text: Unicode NFC and whitespace normalisation")
    dedup: bool = _f(False, "training text: drop exact duplicate pairs")
    max_len: int = _f(100, "drop training pairs with more pieces than this on either side", min=1)
    max_len_ratio: float = _f(3.0, "drop training pairs whose piece-count ratio exceeds this", min=1.0)


@dataclass(frozen=True)
class TokenizerConfig:
    type: str = _f("unigram", "sentencepiece model type", choices=["unigram", "bpe"])
    joint: bool = _f(True, "one vocabulary for both languages (needed for model.tie_all)")
    vocab_size: int = _f(8000, "vocabulary size (per language when not joint)", min=16)
    character_coverage: float = _f(1.0, "sentencepiece character coverage", min=0.9, max=1.0)
    input_sentence_size: int = _f(
        2_000_000, "sample at most this many sentences to train sentencepiece", min=1000
    )


@dataclass(frozen=True)
class ModelConfig:
    cell: str = _f(
        "fused", "recurrent cell: exact GRU (Cho et al. equations), fused GRU (PyTorch) or lstm (PyTorch LSTM)",
        choices=["exact", "fused", "lstm"],
    )
    emb_dim: int = _f(256, "embedding size (source and target)", min=1)
    enc_hidden: int = _f(256, "encoder state size per direction", min=1)
    enc_layers: int = _f(1, "encoder layers (bidirectional)", min=1)
    dec_hidden: int = _f(512, "decoder state size", min=1)
    dec_layers: int = _f(1, "decoder layers", min=1)
    attn_dim: int = _f(512, "additive attention size", min=1)
    out_dim: int = _f(256, "deep output layer size (= emb_dim to tie)", min=1)
    maxout: bool = _f(False, "maxout (pool 2) in the deep output layer instead of tanh")
    init_state: str = _f("bridge", "decoder initial state", choices=["bridge", "mean", "zero"])
    tie_output: bool = _f(False, "share target embeddings and output projection")
    tie_all: bool = _f(False, "share source, target embeddings and output (joint vocabulary)")
    dropout_emb: float = _f(0.3, "dropout on embeddings", min=0.0, max=0.99)
    dropout_hidden: float = _f(0.3, "dropout on the deep output and between layers", min=0.0, max=0.99)
    dropout_word: float = _f(0.0, "probability of replacing an input token by <unk>", min=0.0, max=0.99)


@dataclass(frozen=True)
class TrainConfig:
    batch_tokens: int = _f(
        4096, "padded tokens per batch (sentences x longest side), per process: an update trains on "
        "batch_tokens x processes (torchrun) x accum_steps", min=1,
    )
    accum_steps: int = _f(1, "batches per process whose gradients are summed per update", min=1)
    optimizer: str = _f("adam", "optimizer", choices=["adam", "adamw"])
    lr: float = _f(0.0005, "peak learning rate", min=0.0, min_open=True)
    adam_betas: list = _f([0.9, 0.999], "Adam beta1, beta2")
    weight_decay: float = _f(0.0, "weight decay", min=0.0)
    schedule: str = _f(
        "constant", "learning-rate schedule (each with linear warm-up)",
        choices=["constant", "inverse_sqrt", "plateau"],
    )
    warmup_steps: int = _f(0, "linear warm-up updates", min=0)
    plateau_factor: float = _f(0.5, "plateau: multiply lr by this when BLEU stalls", min=0.0, max=1.0, min_open=True)
    plateau_patience: int = _f(
        2, "plateau: validations without improvement tolerated; the next one decays the lr (as ReduceLROnPlateau)",
        min=0,
    )
    min_lr: float = _f(1e-6, "plateau: stop decaying below this", min=0.0)
    label_smoothing: float = _f(0.1, "label smoothing", min=0.0, max=0.99)
    clip_norm: float = _f(1.0, "gradient-norm clipping (0: off)", min=0.0)
    max_epochs: int = _f(30, "stop after this many epochs (0: no limit)", min=0)
    max_steps: int = _f(0, "stop after this many updates (0: no limit)", min=0)
    valid_every: int = _f(500, "validate every N updates (and at each epoch's end)", min=1)
    valid_beam_size: int = _f(1, "beam size for validation BLEU (1: greedy)", min=1)
    keep_best: int = _f(2, "keep this many best checkpoints by validation BLEU", min=1)
    average_best: int = _f(
        0, "at the end, average the N best checkpoints into checkpoints/average.pt; best.pt becomes "
        "whichever of it and the best single checkpoint has the higher validation BLEU (0: off)", min=0,
    )
    save_every: int = _f(0, "also save checkpoints/last.pt every N updates (0: at validations only)", min=0)
    max_nonfinite: int = _f(
        5, "stop after this many updates in a row with a NaN/inf loss or gradient (each is skipped)", min=1,
    )
    patience: int = _f(0, "stop after N validations without BLEU improvement (0: off)", min=0)
    log_every: int = _f(50, "write a metrics line every N updates", min=1)
    precision: str = _f(
        "auto", "auto (GPU: fp32 with TF32 matmuls; CPU: bf16 autocast where it has bf16 matrix instructions, "
        "AMX or AVX-512 bf16, else fp32), fp32 (strict), or bf16 autocast",
        choices=["auto", "fp32", "bf16"],
    )
    threads: int = _f(0, "CPU threads (0: all cores)", min=0)


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = _f(5, "beam size (1: greedy)", min=1)
    length_penalty: float = _f(1.0, "GNMT length-penalty alpha", min=0.0)
    length_norm: str = _f(
        "gnmt", "score normalisation: gnmt ((5+len)/6)^alpha, average (per token), none",
        choices=["gnmt", "average", "none"],
    )
    max_len_a: float = _f(1.5, "maximum output length = a * source length + b", min=0.0)
    max_len_b: int = _f(10, "maximum output length = a * source length + b", min=0)
    batch_size: int = _f(64, "sentences per decoding batch", min=1)
    precision: str = _f(
        "fp32", "fp32, or bf16: search under bfloat16 autocast (faster on a CPU with AVX-512 "
        "bf16 or AMX)", choices=["fp32", "bf16"],
    )


@dataclass(frozen=True)
class Recipe:
    name: str = _f("", "run name; runs/<name>/ is the default run folder (default: file name)")
    seed: int = _f(1234, "random seed for initialisation, data order and dropout", min=0)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "corpus and cleaning"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig, metadata={"help": "sentencepiece"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the network"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata={"help": "search"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections, to tell whether an artifact is stale."""
        blob = json.dumps({s: self.to_dict()[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, f: dataclasses.Field, tp, key: str, where: str) -> Any:
    """Type- and range-check one leaf value; ints are accepted where floats are expected,
    and integral numbers where ints are. ``where``: the file, or ``--set`` for an override."""
    def fail(msg: str):
        raise RecipeError(f"{where}: key '{key}': {msg}" if where != "--set" else f"--set {key}: {msg}")

    if tp is bool:
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e5, as scientific notation reads
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"expected a number, got {value!r}")
        value = float(value)  # (a plain float, also from a Scientific)
        if value != value or value in (float("inf"), float("-inf")):
            fail(f"expected a finite number, got {value!r}")
    elif tp is str:
        if isinstance(value, Scientific):
            value = value.text
        if not isinstance(value, str):
            fail(f"expected a string, got {value!r}")
    elif tp is list:
        if not isinstance(value, list):
            fail(f"expected a list, got {value!r}")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            fail(f"expected a list of plain values, got {value!r}")
        value = [float(v) if isinstance(v, Scientific) else v for v in value]
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        fail(f"expected one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        fail(f"must be {'>' if meta.get('min_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        fail(f"must be <= {hi}, got {value!r}")
    return value


def _build(cls, raw: Any, prefix: str, where: str, overridden: frozenset = frozenset()):
    """``cls`` from ``raw``, checked; errors name ``where``, or ``--set`` for the keys in
    ``overridden`` (dotted)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = f"key '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise RecipeError(f"{where}: {what}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            source = f"--set {dotted}" if dotted in overridden else where
            raise RecipeError(f"{source}: unknown key '{dotted}'{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], f"{key}.", where, overridden)
        else:
            values[name] = _check_value(raw[name], f, tp, key, "--set" if key in overridden else where)
    obj = cls(**values)
    _check_cross(obj, where, overridden)
    return obj


def _check_cross(obj, where: str, overridden: frozenset) -> None:
    """Rules that involve more than one key (or a list's items)."""
    def fail(key, msg):
        raise RecipeError(f"--set {key}: {msg}" if key in overridden else f"{where}: key '{key}': {msg}")

    if isinstance(obj, DataConfig):
        if obj.src_lang == obj.trg_lang:
            fail("data.trg_lang", f"must differ from data.src_lang ({obj.src_lang!r})")
        if obj.source in ("url", "local") and ("{split}" not in obj.path or "{lang}" not in obj.path):
            fail("data.path", "a file template needs both {split} and {lang}")
        if obj.hub_columns and len(obj.hub_columns) != 2:
            fail("data.hub_columns", "expected [source column, target column]")
        names = obj.test_splits
        for name in names:
            if not isinstance(name, str) or name in ("train", "valid") or names.count(name) > 1 \
                    or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
                fail("data.test_splits", f"{name!r} is a duplicate or not usable as a file name (letters, digits, "
                     "'.', '_', '-'; not 'train' or 'valid', which name the training and validation files)")
    if isinstance(obj, TrainConfig):
        betas = obj.adam_betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            fail("train.adam_betas", f"expected [beta1, beta2], each in [0, 1), got {betas!r}")
    if isinstance(obj, TrainConfig) and obj.average_best:
        if obj.average_best == 1:
            fail("train.average_best", "averaging needs at least 2 checkpoints (0: off)")
        if obj.average_best > obj.keep_best:
            fail("train.average_best", f"cannot exceed train.keep_best ({obj.keep_best}), the checkpoints kept")
    if isinstance(obj, Recipe):
        if obj.model.tie_all and not obj.tokenizer.joint:
            fail("model.tie_all", "needs a joint vocabulary (tokenizer.joint: true)")
        if (obj.model.tie_output or obj.model.tie_all) and obj.model.out_dim != obj.model.emb_dim:
            fail("model.out_dim", f"must equal model.emb_dim ({obj.model.emb_dim}) to tie embeddings")


def _apply_override(raw: dict, override: str, where: str) -> None:
    if "=" not in override:
        raise RecipeError(f"{where}: --set {override!r}: expected key=value, e.g. train.lr=0.0005")
    key, _, text = override.partition("=")
    key = key.strip()
    value = yaml_value(text)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: --set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if raw is None:
        raise RecipeError(f"{where}: recipe is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, where)
    overridden = frozenset(o.partition("=")[0].strip() for o in overrides)
    recipe = _build(Recipe, raw, "", where, overridden)
    if not recipe.name:
        recipe = dataclasses.replace(recipe, name=path.stem)
    return recipe


def recipe_from_dict(raw: dict, where: str = "<checkpoint>") -> Recipe:
    """Rebuild a recipe stored as a plain dict (e.g. inside a checkpoint)."""
    return _build(Recipe, raw, "", where)


def _yaml_scalar(value) -> str:
    """A value as YAML that PyYAML reads back with the same type (1e-06 needs a dot)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, with each key's help text as a comment."""
    lines: list[str] = []

    def emit(obj, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            help_text = f.metadata.get("help", "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:  # {help_text}")
                emit(value, indent + "  ")
            else:
                rendered = _yaml_scalar(value)
                lines.append(f"{indent}{f.name}: {rendered}  # {help_text}")

    emit(recipe, "")
    return "\n".join(lines) + "\n"
