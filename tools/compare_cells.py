"""The GRU-versus-LSTM table, measured: one recipe, one budget, three recurrent cells.

    python tools/compare_cells.py [--recipe R] [--steps N] [--minutes M] [--device D]
                                  [--run-dir DIR] [--data-dir DIR] [--json OUT] [--set k=v]...

Rows: GRU with the exact equations of Cho et al. (2014) (`model.cell: exact`), PyTorch's
fused GRU (`fused`) and PyTorch's LSTM (`lstm`). Each row trains a fresh model from the
recipe's seed with the recipe's optimiser, schedule and batches (the updates of `nmt
train`, without its checkpoints and intermediate validations) for the budget: `--steps`
updates (default: the recipe's `train.max_steps`), or `--minutes` of training time,
whichever ends first. Then it measures:

* parameters;
* training target tokens per second (data loading included, validation excluded);
* decoding sentences per second on the validation split, greedy and with the recipe's
  beam, each with its BLEU (the greedy one is what `nmt train` reports as validation BLEU);
* on a CPU also per CPU-second (the process's CPU time, all its threads): on a machine
  that other work shares, wall-clock rates fall with the load, CPU-time rates much less;
* peak memory: the process's peak RSS (and peak GPU memory on a GPU).

Every row runs in a child process of its own, so that its peak memory is its own and no
row inherits another's warm caches. The data is preprocessed once, into `--run-dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nmt.checkpoint import LoadedModel
from nmt.data.batching import collate, token_batches
from nmt.data.corpus import EncodedCorpus
from nmt.data.preprocess import is_fresh, preprocess
from nmt.data.tokenizer import load_tokenizers
from nmt.evaluate import read_text
from nmt.model.build import build_model
from nmt.recipe import load_recipe
from nmt.train import train_step
from nmt.train_utils import LRSchedule, make_optimizer, pick_device

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import bench_decoding, peak_rss_mb, sync  # noqa: E402

ROWS = [("exact", "GRU (exact equations)"), ("fused", "GRU (fused)"), ("lstm", "LSTM")]


def train_for_budget(model, recipe, corpus, device, steps: int, seconds: float) -> dict:
    """The training updates of `nmt train` until `steps` updates or `seconds` of training."""
    cfg = recipe.train
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    optimizer = make_optimizer(model, cfg)
    schedule = LRSchedule(cfg)
    model.train()
    step, epoch, trg_tokens, elapsed, cpu, loss = 0, 0, 0, 0.0, 0.0, math.nan
    while step < steps and elapsed < seconds:
        batches = token_batches(corpus.src_lengths, corpus.trg_lengths, batch_tokens=cfg.batch_tokens,
                                seed=recipe.seed, epoch=epoch)
        for start in range(0, len(batches), cfg.accum_steps):
            schedule.apply(optimizer, step)
            sync(device)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            group = [collate(corpus, idx) for idx in batches[start : start + cfg.accum_steps]]
            loss, n_tok, _ = train_step(model, optimizer, group, cfg, device, use_bf16)
            sync(device)
            elapsed += time.perf_counter() - begin
            cpu += time.process_time() - cpu_begin
            step, trg_tokens = step + 1, trg_tokens + n_tok
            if step % 50 == 0:
                print(f"  {model.config['cell']}: update {step}, loss {loss:.3f}, {elapsed:.0f} s", file=sys.stderr, flush=True)
            if step >= steps or elapsed >= seconds:
                break
        epoch += 1
    return {"steps": step, "epochs": epoch, "trg_tokens": trg_tokens, "train_seconds": elapsed,
            "train_cpu_seconds": cpu, "final_loss": loss, "trg_tokens_per_s": trg_tokens / elapsed,
            "trg_tokens_per_cpu_s": trg_tokens / cpu}


def measure_cell(recipe_path: str, overrides: list[str], cell: str, run_dir: Path, device_name: str,
                 steps: int, minutes: float) -> dict:
    """One row of the table, measured in this process."""
    recipe = load_recipe(recipe_path, [*overrides, f"model.cell={cell}"])
    device = pick_device(device_name)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    data = run_dir / "data"
    src_tok, trg_tok = load_tokenizers(data)
    corpus = EncodedCorpus.open(data, "train")
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, src_tok.vocab_size, trg_tok.vocab_size).to(device)
    training = train_for_budget(model, recipe, corpus, device, steps, minutes * 60 if minutes else math.inf)

    model.eval()
    loaded = LoadedModel(model, src_tok, trg_tok, 2 * recipe.data.max_len)
    sources, refs = read_text(data / "valid.src.txt"), read_text(data / "valid.trg.txt")
    beams = sorted({recipe.train.valid_beam_size, recipe.decode.beam_size})
    decoding = [bench_decoding(loaded, sources, refs, recipe, device, beam) for beam in beams]
    return {
        "cell": cell,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": training,
        "decoding": decoding,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown_table(result: dict) -> str:
    """The README table: one row per cell; on a CPU, rates per CPU-second in brackets."""
    first = result["rows"][0]
    on_cpu = first["peak_gpu_mb"] is None
    beams = [d["beam_size"] for d in first["decoding"]]
    name = lambda b: "greedy" if b == 1 else f"beam {b}"  # noqa: E731
    per_cpu = " (per CPU-s)" if on_cpu else ""
    head = (["cell", "parameters", f"training target tok/s{per_cpu}"]
            + [f"decoding sent/s, {name(b)}{per_cpu}" for b in beams]
            + ["peak RSS" + ("" if on_cpu else " / GPU")]
            + [f"validation BLEU, {name(b)}" for b in beams])

    def rate(count: float, seconds: float, cpu_seconds: float, digits: int) -> str:
        text = f"{count / seconds:,.{digits}f}"
        return f"{text} ({count / cpu_seconds:,.{digits}f})" if on_cpu else text

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        t = row["training"]
        memory = f"{row['peak_rss_mb']:,.0f} MB"
        if not on_cpu:
            memory += f" / {row['peak_gpu_mb']:,.0f} MB"
        cells = ([row["label"], f"{row['parameters']:,}", rate(t["trg_tokens"], t["train_seconds"], t["train_cpu_seconds"], 0)]
                 + [rate(d["sentences"], d["seconds"], d["cpu_seconds"], 1) for d in row["decoding"]]
                 + [memory]
                 + [f"{d['bleu']:.2f}" for d in row["decoding"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/multi30k-tiny.yaml")
    parser.add_argument("--steps", type=int, default=0, help="updates per cell [default: the recipe's train.max_steps]")
    parser.add_argument("--minutes", type=float, default=0.0, help="or: minutes of training per cell")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--run-dir", type=Path, help="run folder to preprocess into [default: a temporary one]")
    parser.add_argument("--data-dir", type=Path, help="local corpus mirror (else $NMT_DATA_DIR)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cell", choices=[c for c, _ in ROWS], help=argparse.SUPPRESS)  # one row, in a child
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)
    steps = args.steps or recipe.train.max_steps or (0 if args.minutes else None)
    if steps is None:
        parser.error("the recipe has no train.max_steps: give --steps or --minutes")
    steps = steps or sys.maxsize
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="nmt-cells-"))

    if args.cell:  # a child: measure one row, write it as JSON
        row = measure_cell(args.recipe, args.overrides, args.cell, run_dir, args.device, steps, args.minutes)
        args.json.write_text(json.dumps(row) + "\n")
        return None

    data_dir = args.data_dir or (Path(os.environ["NMT_DATA_DIR"]) if os.environ.get("NMT_DATA_DIR") else None)
    if not is_fresh(recipe, run_dir):
        preprocess(recipe, run_dir, data_dir=data_dir)
    rows = []
    for cell, label in ROWS:
        print(f"{label}: training ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            command = [sys.executable, __file__, "--recipe", str(args.recipe), "--cell", cell,
                       "--steps", str(steps), "--minutes", str(args.minutes), "--device", args.device,
                       "--run-dir", str(run_dir), "--json", str(out)]
            for override in args.overrides:
                command += ["--set", override]
            subprocess.run(command, check=True)
            rows.append({"label": label, **json.loads(out.read_text())})
        t = rows[-1]["training"]
        print(f"{label}: {t['steps']} updates in {t['train_seconds']:.0f} s", file=sys.stderr, flush=True)

    device = pick_device(args.device)
    result = {
        "recipe": str(args.recipe),
        "budget": {"steps": steps if steps != sys.maxsize else None, "minutes": args.minutes or None},
        "machine": machine(device),
        "threads": rows[0]["threads"],
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print(markdown_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
