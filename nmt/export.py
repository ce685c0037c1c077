"""`nmt export`: a self-contained model folder, with a model card.

    OUT_DIR/
        model.safetensors      the weights (a tied matrix is stored once)
        model.json             format, the model's constructor arguments, maximum source
                               length, file names, the checkpoint's step and scores, versions
        spm.model              the sentencepiece model (spm.src.model and spm.trg.model
                               when the vocabularies are separate)
        recipe.yaml            the resolved recipe the model was trained with
        README.md              the model card

Nothing in the folder is pickled: safetensors, JSON, YAML and sentencepiece's own format
load without running code. `nmt translate --model OUT_DIR` (and `nmt evaluate`) load it
through :func:`nmt.checkpoint.load_model`, which calls :func:`load_exported`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from nmt.checkpoint import _UMASK, CheckpointError, LoadedModel, load_model
from nmt.runs import RunError, data_dir_of, metrics_path, read_metrics, resolve_model, run_dir_of

EXPORT_FORMAT = "nmt-export-1"
WEIGHTS, META, RECIPE, CARD = "model.safetensors", "model.json", "recipe.yaml", "README.md"


def export_model(model: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Write the model of a run folder (its best checkpoint) or of a checkpoint file to
    `out_dir`, built in a temporary folder beside it and renamed into place.

    :param force: replace a non-empty `out_dir` (refused otherwise)
    :raises RunError: a bad source or destination; CheckpointError: an unusable checkpoint
    """
    from safetensors.torch import save_model

    from nmt.recipe import dump_recipe

    checkpoint = resolve_model(model)
    if checkpoint.is_dir():
        raise RunError(f"{checkpoint}: already an exported model; copy the folder instead")
    out_dir = Path(out_dir)
    _check_destination(out_dir, checkpoint, force)
    loaded = load_model(checkpoint)
    payload = loaded.payload
    scores = _test_scores(run_dir_of(checkpoint), checkpoint, loaded.recipe)
    joint = payload["src_spm"] == payload["trg_spm"]
    spm = {"src": "spm.model", "trg": "spm.model"} if joint else {"src": "spm.src.model", "trg": "spm.trg.model"}
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": loaded.model.config,
        "max_src_len": loaded.max_src_len,
        "files": {"weights": WEIGHTS, "recipe": RECIPE, "spm": spm},
        "step": payload.get("step"),
        "epoch": payload.get("epoch"),
        "metrics": payload.get("metrics", {}),
        "test_scores": scores,  # what the card shows, and `nmt serve`'s /info from this folder
        "versions": payload.get("versions", {}),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_model(loaded.model, str(tmp / WEIGHTS), metadata={"format": EXPORT_FORMAT})
        (tmp / spm["src"]).write_bytes(payload["src_spm"])
        (tmp / spm["trg"]).write_bytes(payload["trg_spm"])
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / RECIPE).write_text(dump_recipe(loaded.recipe), encoding="utf-8")
        card = model_card(loaded, checkpoint, out_dir.name, scores)
        (tmp / CARD).write_text(card, encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~_UMASK)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the usual mode
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_exported(folder: Path, device="cpu") -> LoadedModel:
    """Rebuild model and tokenizers from an exported folder (eval mode, on `device`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights

    from nmt.data.tokenizer import Tokenizer
    from nmt.model import Seq2Seq
    from nmt.recipe import RecipeError, load_recipe

    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / META}: unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{folder / META}: not an exported nmt model (format {EXPORT_FORMAT})")
    try:
        files = meta["files"]
        model = Seq2Seq(**meta["model_config"])
        load_weights(model, folder / files["weights"])
        src_tok = Tokenizer.from_file(folder / files["spm"]["src"])
        trg_tok = src_tok if files["spm"]["trg"] == files["spm"]["src"] else Tokenizer.from_file(folder / files["spm"]["trg"])
        recipe = load_recipe(folder / files["recipe"])
        max_src_len = int(meta["max_src_len"])
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, SafetensorError, RecipeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: cannot rebuild the model: {first[:200]}") from None
    model.to(device).eval()
    return LoadedModel(model=model, src_tok=src_tok, trg_tok=trg_tok, max_src_len=max_src_len,
                       recipe=recipe, path=folder, payload=meta)


def _check_destination(out_dir: Path, checkpoint: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir}: exists and is not a folder")
    if checkpoint.resolve().is_relative_to(out_dir.resolve()):
        raise RunError(f"{out_dir}: holds the checkpoint being exported; choose another folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise RunError(f"{out_dir}: not empty; use --force to replace it")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first, then removed."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / "previous")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "previous", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- the model card


def model_card(loaded: LoadedModel, checkpoint: Path, folder_name: str, test_scores: list[dict]) -> str:
    """README.md of an exported model: data, model, training, evaluation, use and limits."""
    r, payload = loaded.recipe, loaded.payload
    run_dir = run_dir_of(checkpoint)
    manifest = _read_json(data_dir_of(run_dir) / "manifest.json") or {}
    d, m, t, dec = r.data, r.model, r.train, r.decode
    n_params = sum(p.numel() for p in loaded.model.parameters())
    kept = manifest.get("splits", {}).get("train", {}).get("pairs")
    cell = {"exact": "GRU (the equations of Cho et al. 2014)", "fused": "GRU (PyTorch's fused cell)",
            "lstm": "LSTM (PyTorch's cell)"}[m.cell]
    scores = payload.get("metrics") or {}
    lines = [
        f"# {r.name}: {d.src_lang} -> {d.trg_lang} translation model",
        "",
        f"An attention-based recurrent translation model: a bidirectional encoder and a decoder built "
        f"of {cell} cells, the additive attention of Bahdanau et al. (2015) and a deep output layer. "
        f"Trained with the `nmt` toolkit; exported by `nmt export` from `{checkpoint}` "
        f"(update {payload.get('step')}).",
        "",
        "## Use",
        "",
        f"    nmt translate --model {folder_name} < input.{d.src_lang} > output.{d.trg_lang}",
        "",
        f"Input: raw {d.src_lang} text, one sentence per line; output: detokenized, cased "
        f"{d.trg_lang} text, one line per input line. Decoding defaults (from the recipe): beam "
        f"{dec.beam_size}, length penalty {dec.length_penalty} ({dec.length_norm}), at most "
        f"{dec.max_len_a} x source length + {dec.max_len_b} pieces.",
        "",
        "## Data",
        "",
        f"- corpus: `{d.path}` ({d.source}{', ' + d.hub_config if d.hub_config else ''})"
        + (f", read from a {manifest['source']}" if "mirror" in str(manifest.get("source", "")) else ""),
        f"- splits: training `{d.train_split}`, validation `{d.valid_split}`, test "
        + (", ".join(f"`{s}`" for s in d.test_splits) or "none"),
        f"- training pairs: {kept:,}" if kept is not None else "- training pairs: (no manifest in the run folder)",
        f"- cleaning: {'NFC and whitespace normalisation, ' if d.normalize else ''}"
        f"{'exact duplicates dropped, ' if d.dedup else ''}pairs longer than {d.max_len} pieces or with "
        f"a length ratio above {d.max_len_ratio} dropped"
        + (f"; the first {d.max_train_pairs:,} pairs only" if d.max_train_pairs else ""),
        f"- tokenizer: sentencepiece {r.tokenizer.type}, {r.tokenizer.vocab_size:,} pieces "
        f"({'joint' if r.tokenizer.joint else 'per language'})",
        "",
        "## Model",
        "",
        f"- {n_params:,} parameters; cell: {m.cell}",
        f"- embeddings {m.emb_dim}; encoder {m.enc_layers} x bidirectional {m.enc_hidden}; decoder "
        f"{m.dec_layers} x {m.dec_hidden}; attention {m.attn_dim}; deep output {m.out_dim}"
        f"{' (maxout)' if m.maxout else ''}; initial state: {m.init_state}"
        + ("; all embeddings tied" if m.tie_all else "; output tied to target embeddings" if m.tie_output else ""),
        f"- dropout: embeddings {m.dropout_emb}, hidden {m.dropout_hidden}, words {m.dropout_word}",
        f"- longest source translated whole: {loaded.max_src_len} pieces (longer input is truncated)",
        "",
        "## Training",
        "",
        f"- this checkpoint: update {payload.get('step')} (epoch {(payload.get('epoch') or 0) + 1})"
        + (f"; validation BLEU {scores['valid_bleu']:.2f} "
           f"({'greedy' if t.valid_beam_size == 1 else f'beam {t.valid_beam_size}'}), "
           f"validation loss {scores['valid_loss']:.3f}" if "valid_bleu" in scores else ""),
        f"- {t.optimizer} at learning rate {t.lr} ({t.schedule}, {t.warmup_steps} warm-up updates), batches of "
        f"{t.batch_tokens:,} padded tokens x {t.accum_steps}, label smoothing {t.label_smoothing}, "
        f"seed {r.seed}",
        *_training_time(run_dir),
        "- software: " + ", ".join(f"{k} {v}" for k, v in payload.get("versions", {}).items()),
        "",
        "## Evaluation",
        "",
        *_evaluation(run_dir, checkpoint, test_scores),
        "",
        "## Intended use and limits",
        "",
        f"- For research, teaching and drafts: translating {d.src_lang} sentences of the kind the "
        f"training corpus holds into {d.trg_lang}. Quality outside that domain (other topics, registers, "
        "long documents, noisy user text) has not been measured and is likely much lower.",
        "- Sentence by sentence: no document context; sentences longer than "
        f"{loaded.max_src_len} pieces are cut.",
        "- Like any neural translation model it can produce fluent output that is wrong, omits or "
        "invents content, and it reproduces the biases of its training data (e.g. gender). Do not use "
        "it unreviewed where errors matter (legal, medical, safety).",
        "- The scores above are corpus-level automatic metrics on the listed test sets only.",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights), `model.json` (model arguments, for `nmt.model.Seq2Seq(**model_config)`), "
        "the sentencepiece model(s), `recipe.yaml` (the resolved recipe), this card.",
        "",
    ]
    return "\n".join(lines)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _training_time(run_dir: Path) -> list[str]:
    try:
        metrics = read_metrics(metrics_path(run_dir))
    except RunError:
        return []
    records = metrics["train"] + metrics["valid"]
    times = [rec["time"] for rec in records if isinstance(rec.get("time"), (int, float))]
    last_step = max(rec["step"] for rec in records)
    if len(times) < 2:
        return [f"- trained for {last_step} updates"]
    span = max(times) - min(times)
    return [f"- trained for {last_step} updates in {span / 60:.1f} min (wall clock from the first to the "
            "last line of the metrics log; validation included)"]


def _test_scores(run_dir: Path, checkpoint: Path, recipe) -> list[dict]:
    """The run's test scores of this checkpoint alone with the recipe's decoding settings."""
    from nmt.evaluate import scores_of
    from nmt.translate import SearchOptions

    return scores_of(run_dir / "eval" / "report.json", checkpoint, SearchOptions.from_recipe(recipe.decode))


def _evaluation(run_dir: Path, checkpoint: Path, rows: list[dict]) -> list[str]:
    """The card's evaluation section from ``rows`` (:func:`_test_scores`)."""
    report = run_dir / "eval" / "report.json"
    if not rows:
        return [f"Not evaluated: {report} has no scores of this checkpoint alone with the recipe's decoding "
                f"settings; run `nmt evaluate --model {checkpoint}`, then export again."]
    try:
        lines = [
            "sacreBLEU on detokenized output against the raw references (`nmt evaluate`, the recipe's "
            "decoding settings):",
            "",
            "| split | sentences | BLEU | chrF2 | TER | BLEU (lowercased) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {x['split']} | {x['sentences']} | {x['bleu']:.2f} | {x['chrf']:.2f} | {x['ter']:.2f} | "
                  f"{x['bleu_lc']:.2f} |" for x in rows]
        first = rows[0]
        lines += [
            "",
            f"Signatures: BLEU `{first['bleu_signature']}`; chrF2 `{first['chrf_signature']}`; "
            f"TER `{first['ter_signature']}`; lowercased BLEU `{first['bleu_lc_signature']}`.",
        ]
    except (KeyError, TypeError, ValueError):
        return [f"The run's evaluation ({report}) is not readable; run `nmt evaluate` again."]
    return lines
