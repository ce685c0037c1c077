"""sacreBLEU scores with their signatures, and the evaluation of a run's test splits.

BLEU is computed on detokenized output against the raw references, exactly as
`sacrebleu REF < HYP` computes it (13a tokenization, mixed case); lowercased BLEU is
reported beside it for comparison with older papers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.checkpoint import atomic_write


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
    """Cased, detokenized corpus BLEU (13a), as validation uses it."""
    return BLEU().corpus_score(hyps, [refs]).score


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
    """Lines of a text file, invalid UTF-8 replaced, line ends stripped."""
    with open(path, "rb") as f:
        return [raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace") for raw in f]


def evaluate_pairs(translator, pairs: list[tuple[str, Path, Path]], out_dir: Path | None,
                   on_result: dict | None = None) -> list[Scores]:
    """Translate each (name, source file, reference file) and score it.

    Hypotheses go to out_dir/<name>.hyp and all scores to out_dir/report.json.
    ``on_result`` maps a name to a hook for :meth:`nmt.translate.Translator.translate`.
    """
    rows = []
    for name, src_path, ref_path in pairs:
        sources, refs = read_text(src_path), read_text(ref_path)
        if len(sources) != len(refs):
            raise ValueError(f"{src_path} has {len(sources)} lines but {ref_path} has {len(refs)}")
        start = time.perf_counter()
        hyps = translator.translate_lines(sources, on_result=(on_result or {}).get(name))
        rows.append(score(name, hyps, refs, time.perf_counter() - start))
        if out_dir is not None:
            text = "".join(h + "\n" for h in hyps)
            atomic_write(out_dir / f"{name}.hyp", lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    if out_dir is not None:
        report = json.dumps([asdict(r) for r in rows], indent=2)
        atomic_write(out_dir / "report.json", lambda tmp: tmp.write_text(report + "\n", encoding="utf-8"))
    return rows
