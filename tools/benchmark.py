"""Measure training and decoding speed, memory and model FLOP utilisation (MFU).

    python tools/benchmark.py [--recipe R] [--device cpu|cuda] [--json OUT]
                              [--steps N] [--warmup N] [--checkpoint CKPT] [--set k=v]...

Training: target (and source) tokens per second over `--steps` updates after `--warmup`,
with and without the time spent collating each batch (data loading); seconds per epoch
of the recipe's training split.
Decoding: sentences and target tokens per second on the recipe's first test split, greedy
and beam 5 (the recipe's batch size and `decode.precision`: `--set decode.precision=bf16`
for bfloat16), with the BLEU of each, so that a speed-up cannot hide a quality loss.
Decoding uses `--checkpoint` when given (a trained model decodes realistic lengths);
otherwise the briefly trained benchmark model, whose BLEU means nothing.
Memory: peak RSS (and peak GPU memory on a GPU).
MFU: the model's FLOPs per target token (from its shapes, forward + backward = 3x
forward) times the measured tokens/s, divided by the matmul throughput measured in this
run, on this device, at the model's own matrix shapes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from nmt.checkpoint import LoadedModel, load_model
from nmt.data.batching import collate, token_batches
from nmt.data.corpus import EncodedCorpus
from nmt.data.preprocess import is_fresh, preprocess
from nmt.data.tokenizer import load_tokenizers
from nmt.evaluate import bleu_score, read_text
from nmt.model.build import build_model
from nmt.model.cells import gate_count
from nmt.recipe import load_recipe
from nmt.runs import test_splits_of
from nmt.train import train_step
from nmt.train_utils import keep_freed_memory, make_optimizer, pick_device, precision_name, setup_precision
from nmt.translate import SearchOptions, Translator


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_shapes(cfg, src_vocab: int, trg_vocab: int, batch: int, src_len: float, trg_len: float):
    """(m, k, n, count per sentence) of every forward matmul of one sentence pair.

    m is the rows of a typical batched call; count is how many (1 x k) @ (k x n)
    products one sentence contributes (per token, times its length).
    """
    E, H, D, A, O = cfg.emb_dim, cfg.enc_hidden, cfg.dec_hidden, cfg.attn_dim, cfg.out_dim
    pool = 2 if cfg.maxout else 1
    g = gate_count(cfg.cell)  # 3 for a GRU, 4 for an LSTM
    S, T = src_len, trg_len
    shapes = []
    for layer in range(cfg.enc_layers):
        inp = E if layer == 0 else 2 * H
        shapes += [(batch * S, inp, g * H, 2 * S), (batch, H, g * H, 2 * S)]  # input, recurrent; 2 directions
    shapes += [(batch * S, 2 * H, A, S)]  # attention keys U h_j
    shapes += [(batch * T, E, g * D, T), (batch, 2 * H, g * D, T), (batch, D, g * D, T)]  # decoder layer 1
    for _ in range(cfg.dec_layers - 1):
        shapes += [(batch, D, g * D, T), (batch, D, g * D, T)]
    shapes += [(batch, D, A, T)]  # attention query W s
    shapes += [(batch, A, int(round(S)), T), (batch, int(round(S)), 2 * H, T)]  # energies v^T, context
    shapes += [(batch * T, D + E + 2 * H, pool * O, T), (batch * T, O, trg_vocab, T)]  # deep output, softmax layer
    if cfg.init_state != "zero":
        shapes += [(batch, H if cfg.init_state == "bridge" else 2 * H, cfg.dec_layers * D, 1)]
    return shapes


def matmul_throughput(shapes, device: torch.device, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s that torch.mm reaches on this model's mix of shapes (FLOP-weighted).

    Into one output tensor: a new [rows x 8,000] output at every call would time the
    operating system's page faults too (on a CPU, for the output layer's product, more
    than the product itself: 580 against 3,166 GFLOP/s in bf16 on a 2-core Xeon with AMX).
    """
    total_flops, total_time = 0.0, 0.0
    for m, k, n, count in shapes:
        m = max(int(m), 1)
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=out)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync(device)
        per_call = (time.perf_counter() - start) / repeats
        weight = 2.0 * k * n * count  # this shape's share of the model's FLOPs per sentence
        total_flops += weight
        total_time += weight / (2.0 * m * k * n / per_call)
    return total_flops / total_time


def flops_per_target_token(shapes, trg_len: float) -> float:
    forward = sum(2.0 * k * n * count for _, k, n, count in shapes)
    return 3.0 * forward / trg_len  # backward costs twice the forward


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_training(model, optimizer, corpus, batches, cfg, device, use_bf16, warmup: int, steps: int) -> dict:
    needed = warmup + steps
    if len(batches) < needed:
        batches = (batches * (needed // max(len(batches), 1) + 1))[:needed]
    for idx in batches[:warmup]:
        train_step(model, optimizer, [collate(corpus, idx)], cfg, device, use_bf16)

    # One pass, each update timed with and without its batch's collation: two passes (one
    # with, one without) would compare a first sight of the batches with a second.
    trg = src = 0
    with_loading = without_loading = 0.0
    for idx in batches[warmup:needed]:
        sync(device)
        start = time.perf_counter()
        batch = collate(corpus, idx)
        loaded = time.perf_counter()
        _, n_trg, n_src = train_step(model, optimizer, [batch], cfg, device, use_bf16)
        sync(device)
        end = time.perf_counter()
        with_loading, without_loading = with_loading + end - start, without_loading + end - loaded
        trg, src = trg + n_trg, src + n_src
    return {
        "steps": steps,
        "trg_tokens": trg,
        "trg_tokens_per_s": trg / with_loading,
        "src_tokens_per_s": src / with_loading,
        "trg_tokens_per_s_no_loading": trg / without_loading,
        "src_tokens_per_s_no_loading": src / without_loading,
        "seconds_per_step": with_loading / steps,
    }


def bench_decoding(loaded, sources, refs, recipe, device, beam_size: int) -> dict:
    opts = SearchOptions.from_recipe(recipe.decode, beam_size=beam_size)
    translator = Translator(loaded, opts, device, warn=lambda msg: None)
    translator.translate_lines(sources[:opts.batch_size])  # warm-up
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    hyps = translator.translate_lines(sources)
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out_tokens = sum(len(ids) + 1 for ids in loaded.trg_tok.encode(hyps))
    return {
        "beam_size": beam_size,
        "precision": opts.precision,
        "sentences": len(sources),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads of this process: robust to other load
        "sentences_per_s": len(sources) / seconds,
        "trg_tokens_per_s": out_tokens / seconds,
        "bleu": bleu_score(hyps, refs),
        "pieces_per_sentence": out_tokens / len(sources) - 1,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/multi30k.yaml")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--steps", type=int, default=20, help="timed training updates")
    parser.add_argument("--warmup", type=int, default=5, help="untimed updates first")
    parser.add_argument("--checkpoint", type=Path, help="decode with this trained checkpoint")
    parser.add_argument("--run-dir", type=Path, help="preprocessed run folder to read data from")
    parser.add_argument("--data-dir", type=Path, help="local corpus mirror (else $NMT_DATA_DIR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-decode", action="store_true", help="measure training only")
    args = parser.parse_args(argv)

    import os

    recipe = load_recipe(args.recipe, args.overrides)
    data_dir = args.data_dir or (Path(os.environ["NMT_DATA_DIR"]) if os.environ.get("NMT_DATA_DIR") else None)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="nmt-bench-"))
    if not is_fresh(recipe, run_dir):
        preprocess(recipe, run_dir, data_dir=data_dir)
    device = pick_device(args.device)
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":  # as nmt train does
        keep_freed_memory()
    use_bf16 = setup_precision(cfg.precision, device)

    data = run_dir / "data"
    src_tok, trg_tok = load_tokenizers(data)
    corpus = EncodedCorpus.open(data, "train")
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, src_tok.vocab_size, trg_tok.vocab_size).to(device).train()
    optimizer = make_optimizer(model, cfg)
    batches = token_batches(corpus.src_lengths, corpus.trg_lengths, batch_tokens=cfg.batch_tokens,
                            seed=recipe.seed, epoch=0)
    training = bench_training(model, optimizer, corpus, batches, cfg, device, use_bf16, args.warmup, args.steps)
    epoch_trg_tokens = int(corpus.trg_lengths.sum()) + len(corpus)  # with eos
    training["seconds_per_epoch"] = epoch_trg_tokens / training["trg_tokens_per_s"]

    mean_batch = len(corpus) / len(batches)
    src_len = float(corpus.src_lengths.mean()) + 1
    trg_len = float(corpus.trg_lengths.mean()) + 1
    shapes = matmul_shapes(recipe.model, src_tok.vocab_size, trg_tok.vocab_size, mean_batch, src_len, trg_len)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    peak = matmul_throughput(shapes, device, dtype)
    flops = flops_per_target_token(shapes, trg_len)
    training.update(
        flops_per_trg_token=flops,
        achieved_flops_per_s=flops * training["trg_tokens_per_s_no_loading"],
        matmul_flops_per_s=peak,
        mfu=flops * training["trg_tokens_per_s_no_loading"] / peak,
    )

    decoding = []
    splits = test_splits_of(run_dir)
    if not args.no_decode and splits:
        split = splits[0]
        sources, refs = read_text(data / f"{split}.src.txt"), read_text(data / f"{split}.trg.txt")
        if args.checkpoint:
            loaded = load_model(args.checkpoint, device)
        else:
            model.eval()
            loaded = LoadedModel(model, src_tok, trg_tok, 2 * recipe.data.max_len)
        for beam in (1, 5):
            decoding.append({"split": split, **bench_decoding(loaded, sources, refs, recipe, device, beam)})

    result = {
        "recipe": str(args.recipe),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "precision": precision_name(use_bf16, device),
        "torch": str(torch.__version__),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_tokens": cfg.batch_tokens,
        "sentences_per_batch": mean_batch,
        "training": training,
        "decoding": decoding,
        "decoding_checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(r: dict) -> None:
    t = r["training"]
    rows = [
        ("device", f"{r['device_name']} ({r['precision']}, torch {r['torch']})"),
        ("parameters", f"{r['parameters']:,}"),
        ("batch", f"{r['batch_tokens']} tokens, {r['sentences_per_batch']:.0f} sentences"),
        ("train target tok/s", f"{t['trg_tokens_per_s']:,.0f} (no data loading: {t['trg_tokens_per_s_no_loading']:,.0f})"),
        ("train source tok/s", f"{t['src_tokens_per_s']:,.0f} (no data loading: {t['src_tokens_per_s_no_loading']:,.0f})"),
        ("seconds per update", f"{t['seconds_per_step']:.3f}"),
        ("seconds per epoch", f"{t['seconds_per_epoch']:.1f}"),
        ("FLOPs per target token", f"{t['flops_per_trg_token'] / 1e6:.1f} M"),
        ("achieved / matmul FLOP/s", f"{t['achieved_flops_per_s'] / 1e9:.1f} / {t['matmul_flops_per_s'] / 1e9:.1f} G"),
        ("MFU", f"{100 * t['mfu']:.1f}%"),
    ]
    for d in r["decoding"]:
        name = "greedy" if d["beam_size"] == 1 else f"beam {d['beam_size']}"
        rows.append((f"decode {name} ({d['precision']})", f"{d['sentences_per_s']:,.1f} sent/s, {d['trg_tokens_per_s']:,.0f} tok/s, "
                                       f"{d['seconds']:.2f} s, BLEU {d['bleu']:.2f} ({d['split']})"))
    rows.append(("peak RSS", f"{r['peak_rss_mb']:,.0f} MB"))
    if r["peak_gpu_mb"] is not None:
        rows.append(("peak GPU memory", f"{r['peak_gpu_mb']:,.0f} MB"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
