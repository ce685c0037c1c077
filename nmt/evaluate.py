"""sacreBLEU scores with their signatures, and the evaluation of a run's test splits.

BLEU is computed on detokenized output against the raw references, exactly as
`sacrebleu REF < HYP` computes it (13a tokenization, mixed case); lowercased BLEU is
reported beside it for comparison with older papers.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.checkpoint import atomic_write, load_model
from nmt.runs import data_dir_of, test_splits_of
from nmt.train_utils import log
from nmt.translate import SearchOptions, Translator


@dataclass
class Scores:
    split: str
    sentences: int
    bleu: float
    chrf: float
    ter: float
    bleu_lc: float
    bleu_signature: str
    chrf_signature: str
    ter_signature: str
    bleu_lc_signature: str
    seconds: float = 0.0


def bleu_score(hyps: list[str], refs: list[str]) -> float:
    """Cased, detokenized corpus BLEU (13a), as validation uses it. (``force``: no warning
    that the output looks tokenized, which an early model's output often does; the score is
    the same.)"""
    return BLEU(force=True).corpus_score(hyps, [refs]).score


def score(split: str, hyps: list[str], refs: list[str], seconds: float = 0.0) -> Scores:
    if len(hyps) != len(refs):
        raise ValueError(f"{split}: {len(hyps)} hypotheses for {len(refs)} references")
    metrics = {"bleu": BLEU(), "chrf": CHRF(), "ter": TER(), "bleu_lc": BLEU(lowercase=True)}
    values, signatures = {}, {}
    for name, metric in metrics.items():
        values[name] = round(metric.corpus_score(hyps, [refs]).score, 2)
        signatures[f"{name}_signature"] = str(metric.get_signature())
    return Scores(split=split, sentences=len(hyps), seconds=round(seconds, 2), **values, **signatures)


def format_table(rows: list[Scores]) -> str:
    """A plain-text table: split, BLEU, chrF2, TER, lowercased BLEU; then the signatures."""
    lines = [f"{'split':<20} {'sents':>6} {'BLEU':>6} {'chrF2':>6} {'TER':>6} {'BLEU-lc':>7}"]
    for r in rows:
        lines.append(f"{r.split:<20} {r.sentences:>6} {r.bleu:>6.2f} {r.chrf:>6.2f} {r.ter:>6.2f} {r.bleu_lc:>7.2f}")
    if rows:
        r = rows[0]
        lines += [
            f"BLEU:    {r.bleu_signature}",
            f"chrF2:   {r.chrf_signature}",
            f"TER:     {r.ter_signature}",
            f"BLEU-lc: {r.bleu_lc_signature}",
        ]
    return "\n".join(lines)


def read_text(path: Path) -> list[str]:
    """Lines of a text file, gzipped or not (as the corpora are), invalid UTF-8 replaced,
    line ends stripped."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return [raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace") for raw in f]
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: unreadable gzip file ({e})") from None


def evaluate_pairs(translator, pairs: list[tuple[str, Path, Path]], out_dir: Path | None,
                   on_result: dict | None = None, models: list[Path] = ()) -> list[Scores]:
    """Translate each (name, source file, reference file) and score it.

    Hypotheses go to out_dir/<name>.hyp and the scores into out_dir/report.json, with
    ``models`` (the checkpoints translating) and the decoding settings (:func:`add_to_report`).
    ``on_result`` maps a name to a hook for :meth:`nmt.translate.Translator.translate`.
    """
    rows = []
    for name, src_path, ref_path in pairs:
        sources, refs = read_text(src_path), read_text(ref_path)
        if not sources:
            raise ValueError(f"{src_path} is empty: nothing to score")
        if len(sources) != len(refs):
            raise ValueError(f"{src_path} has {len(sources)} lines but {ref_path} has {len(refs)}")
        start = time.perf_counter()
        hyps = translator.translate_lines(sources, on_result=(on_result or {}).get(name))
        rows.append(score(name, hyps, refs, time.perf_counter() - start))
        if out_dir is not None:
            text = "".join(h + "\n" for h in hyps)
            atomic_write(out_dir / f"{name}.hyp", lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    if out_dir is not None:
        add_to_report(out_dir / "report.json", rows, models, translator.opts)
    return rows


def evaluate_run(best_path: Path, run_dir: Path, dev) -> None:
    """Evaluate a run's best checkpoint on its test splits with the recipe's decoding
    settings (what `nmt train` does at its end), and print the table."""
    splits = test_splits_of(run_dir)
    if not splits:
        return
    loaded = load_model(best_path, dev)
    translator = Translator(loaded, SearchOptions.from_recipe(loaded.recipe.decode), dev)
    data = data_dir_of(run_dir)
    pairs = [(s, data / f"{s}.src.txt", data / f"{s}.trg.txt") for s in splits]
    empty = [s for s, src, _ in pairs if src.stat().st_size == 0]  # (data preprocessed before they were skipped)
    for split in empty:
        log(f"warning: test split '{split}' is empty; not evaluated")
    pairs = [p for p in pairs if p[0] not in empty]
    if not pairs:
        return
    rows = evaluate_pairs(translator, pairs, run_dir / "eval", models=[best_path])
    print(format_table(rows))


def decode_settings(opts) -> dict:
    """What decides a translation's text among search options (not the batch size or n-best)."""
    keys = ("beam_size", "length_penalty", "length_norm", "max_len_a", "max_len_b", "precision")
    return {k: getattr(opts, k) for k in keys}


def add_to_report(path: Path, rows: list[Scores], models: list[Path], opts) -> None:
    """Record ``rows`` in the report at ``path``, each with the checkpoints that translated
    (``models``, more than one for an ensemble: their paths, and their contents' SHA-256 in
    ``checkpoints``), the decoding settings of ``opts`` and the time. An entry for the same
    split, checkpoints and settings is replaced; the others stay, so that evaluating an
    ensemble, another beam or one split does not erase the scores of the run's own model
    (which the model card and ``/info`` show: :func:`scores_of`). Evaluations that finish
    at once take turns (a lock beside the report)."""
    def key(entry: dict) -> str:
        return json.dumps([entry.get("split"), entry.get("checkpoints"), entry.get("decode")], sort_keys=True)

    decode = decode_settings(opts)
    paths = [str(Path(m).resolve()) for m in models]
    digests = [content_digest(Path(m)) for m in models]
    entries = [{**asdict(r), "models": paths, "checkpoints": digests, "decode": decode, "time": time.time()}
               for r in rows]
    replaced = {key(e) for e in entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        kept = [e for e in _entries(path) if not (isinstance(e, dict) and key(e) in replaced)]
        text = json.dumps(kept + entries, indent=2) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _entries(path: Path) -> list:
    """Whatever list the report holds (entries of older versions of nmt included)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def read_report(path: Path) -> list[dict]:
    """The report's entries that name their checkpoints and settings; none if it is missing
    or unreadable. (Entries that nmt wrote before it recorded them are kept in the file but
    left out here.)"""
    return [e for e in _entries(path) if isinstance(e, dict) and isinstance(e.get("split"), str)
            and isinstance(e.get("checkpoints"), list) and isinstance(e.get("decode"), dict)]


def scores_of(path: Path, checkpoint: Path, opts) -> list[dict]:
    """The report's entries for ``checkpoint`` alone (by content: the run folder may have
    moved, and a newer best.pt is another checkpoint), with the decoding settings of ``opts``."""
    try:
        digest = content_digest(Path(checkpoint))
    except OSError:
        return []
    decode = decode_settings(opts)
    return [e for e in read_report(path) if e["checkpoints"] == [digest] and e["decode"] == decode]


def content_digest(path: Path) -> str:
    """SHA-256 of a checkpoint file, or of an exported model folder's files (names and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
