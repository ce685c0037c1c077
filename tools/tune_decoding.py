"""Tune beam size and length penalty on the validation split (never on a test split).

    python tools/tune_decoding.py [--model RUN_DIR|CKPT]... [--beam 1,5,10]
                                  [--length-penalty 0.6,1.0,1.4] [--length-norm gnmt]
                                  [--batch-size N] [--json OUT]

Translates the run's validation text (data/valid.src.txt, as preprocessed) once per
setting and prints BLEU and chrF2 against data/valid.trg.txt, best first; the best
setting is what to put into the recipe's `decode` section. Several --model give an
ensemble. The model is loaded once; greedy search (beam 1) ignores the penalty, so it
runs once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nmt.ensemble import load_ensemble
from nmt.evaluate import read_text, score
from nmt.runs import data_dir_of, resolve_model, run_dir_of
from nmt.translate import SearchOptions, Translator


def numbers(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="run folder or checkpoint (repeat: ensemble)")
    parser.add_argument("--beam", type=numbers(int), default=[1, 5, 10], help="beam sizes, e.g. 1,5,10")
    parser.add_argument("--length-penalty", type=numbers(float), default=[0.6, 1.0, 1.4],
                        help="length-penalty alphas, e.g. 0.6,1.0,1.4")
    parser.add_argument("--length-norm", default=None, choices=["gnmt", "average", "none"],
                        help="score normalisation [default: the recipe's]")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch [default: the recipe's]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not args.beam or min(args.beam) < 1 or not args.length_penalty or min(args.length_penalty) < 0:
        parser.error("beam sizes must be >= 1 and length penalties >= 0")

    paths = [resolve_model(m) for m in args.model] or [resolve_model(None)]
    loaded = load_ensemble(paths, args.device)
    data = data_dir_of(run_dir_of(paths[0]))
    if not (data / "valid.src.txt").is_file():
        parser.error(f"{data / 'valid.src.txt'} not found: --model must be (a checkpoint of) a run folder")
    src, ref = read_text(data / "valid.src.txt"), read_text(data / "valid.trg.txt")
    print(f"tuning {' + '.join(map(str, paths))} on {len(src):,} validation sentences", file=sys.stderr)

    rows = []
    for beam in sorted(set(args.beam)):
        for alpha in sorted(set(args.length_penalty)) if beam > 1 else [0.0]:
            opts = SearchOptions.from_recipe(loaded.recipe.decode, beam_size=beam, length_penalty=alpha,
                                             length_norm=args.length_norm, batch_size=args.batch_size)
            start = time.perf_counter()
            hyps = Translator(loaded, opts, args.device, warn=lambda msg: None).translate_lines(src)
            seconds = time.perf_counter() - start
            scores = score("valid", hyps, ref)
            rows.append({"beam_size": beam, "length_penalty": alpha if beam > 1 else None,
                         "length_norm": opts.length_norm, "bleu": scores.bleu, "chrf2": scores.chrf,
                         "sentences_per_s": len(src) / seconds})
            print(f"  beam {beam:>2}  alpha {alpha:.2f}  BLEU {rows[-1]['bleu']:.2f}", file=sys.stderr)
    rows.sort(key=lambda r: (-r["bleu"], r["beam_size"]))
    print(f"{'beam':>4} {'alpha':>6} {'BLEU':>6} {'chrF2':>6} {'sent/s':>7}")
    for r in rows:
        alpha = "-" if r["length_penalty"] is None else f"{r['length_penalty']:.2f}"
        print(f"{r['beam_size']:>4} {alpha:>6} {r['bleu']:>6.2f} {r['chrf2']:>6.2f} {r['sentences_per_s']:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
