"""`nmt train`: one training loop, read top to bottom.

    preprocess (if stale) -> build model -> resume from checkpoints/last.pt if present ->
    for each epoch: token batches (a pure function of seed and epoch) -> update ->
    log / validate / keep the best checkpoints -> evaluate the best on the test splits.

Faults: a run killed at any moment (Ctrl-C and SIGTERM save first; SIGKILL does not)
resumes from checkpoints/last.pt, or from prev.pt when last.pt is unreadable
(`nmt.run_checkpoints`), with the same data order and RNG state: on CPU a resumed run
ends bit-identical to an uninterrupted one. Checkpoints are written atomically (never half a file), one process
at a time may train in a run folder (RunLock), and updates with a non-finite loss or
gradient are skipped.

Under torchrun the same loop runs in every process (`nmt.distributed`): DDP averages the
gradients, each rank trains on its own shard of every epoch's batches, and rank 0 alone
holds the lock, preprocesses, validates and writes checkpoints, metrics and logs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nmt.checkpoint import LoadedModel, atomic_write
from nmt.data.batching import collate, token_batches
from nmt.data.corpus import EncodedCorpus
from nmt.data.preprocess import is_fresh, preprocess
from nmt.data.tokenizer import load_tokenizers
from nmt.distributed import Dist
from nmt.distributed import setup as setup_distributed
from nmt.evaluate import bleu_score, evaluate_run, read_text
from nmt.model.build import build_model
from nmt.recipe import Recipe, dump_recipe
from nmt.runs import checkpoint_dir, data_dir_of
from nmt.run_checkpoints import (average_best, check_resumable, keep_best, remove_partial_writes, resume, save,
                                  save_last)
from nmt.train_utils import (LRSchedule, MetricsLog, RunLock, RunLockedError, StopRequest, TrainError, log,
                             keep_freed_memory, make_optimizer, precision_name, set_aside, setup_precision)
from nmt.translate import SearchOptions, Translator


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs besides model and optimizer."""

    step: int = 0  # updates done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # batches of this epoch's order trained on (all ranks together)
    best: list = field(default_factory=list)  # [[bleu, step], ...] best first
    bad_validations: int = 0  # validations since the best BLEU improved
    last_valid_step: int = -1
    skipped: int = 0  # updates skipped for a non-finite loss or gradient, in all
    nonfinite_in_a_row: int = 0
    saved_step: int = -1  # the update checkpoints/last.pt holds

    @property
    def update_epoch(self) -> int:
        """The epoch (1-based) of the last update: the one just completed at an epoch's end,
        when ``epoch`` has already moved on to the next."""
        return self.epoch + 1 if self.batches_in_epoch or not self.epoch else self.epoch

    def restore(self, progress: dict, accum_steps: int) -> None:
        progress = dict(progress)
        if "group_in_epoch" in progress:  # written by one process before batches_in_epoch
            progress["batches_in_epoch"] = progress.pop("group_in_epoch") * accum_steps
        for key, value in progress.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_bleu: float | None
    best_checkpoint: Path | None
    stopped_early: bool
    interrupted: bool


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    device: str = "auto",
    restart: bool = False,
    data_dir: Path | None = None,
    evaluate_at_end: bool = True,
) -> TrainResult:
    """Train one run; started by torchrun, this process is one rank of a DDP job."""
    run_dir = Path(run_dir)
    world = setup_distributed(device)
    try:
        with contextlib.ExitStack() as held:
            lock = RunLock(run_dir)
            world.main_first(lambda: held.enter_context(lock))  # rank 0 holds it for the whole job
            if lock.taken_over:
                log(f"{lock.path}: taking over the lock of a run that ended without releasing it ({lock.taken_over})")
            return _train_locked(recipe, run_dir, world, restart=restart, data_dir=data_dir,
                                 evaluate_at_end=evaluate_at_end)
    except RunLockedError as e:
        raise TrainError(str(e)) from None
    finally:
        world.close()


def _train_locked(recipe: Recipe, run_dir: Path, world: Dist, *, restart: bool, data_dir: Path | None,
                  evaluate_at_end: bool) -> TrainResult:
    cfg = recipe.train

    def prepare() -> None:  # rank 0 only, while the others wait
        if restart:
            aside = set_aside(run_dir)
            if aside:
                log(f"--restart: earlier checkpoints and logs moved to {aside}")
        else:
            check_resumable(recipe, run_dir)  # before preprocessing replaces the run's data
        if not is_fresh(recipe, run_dir):
            preprocess(recipe, run_dir, data_dir=data_dir)

    world.main_first(prepare)
    world.check_same(is_fresh(recipe, run_dir), "preprocessed data")
    dev = world.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if dev.type == "cpu":
        keep_freed_memory()
    bf16 = setup_precision(cfg.precision, dev)

    # Data: encoded corpora (memory-mapped) and the raw validation text for BLEU.
    data = data_dir_of(run_dir)
    src_tok, trg_tok = load_tokenizers(data)
    train_set = EncodedCorpus.open(data, "train")
    valid_set = EncodedCorpus.open(data, "valid")
    valid_src = read_text(data / "valid.src.txt")
    valid_ref = read_text(data / "valid.trg.txt")

    # Model and optimisation.
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, src_tok.vocab_size, trg_tok.vocab_size).to(dev)
    optimizer = make_optimizer(model, cfg)
    schedule = LRSchedule(cfg)
    state = TrainState()
    ckpts = checkpoint_dir(run_dir)
    if world.is_main:
        remove_partial_writes(ckpts)
    # Rank 0 first (it moves a damaged last.pt aside), then the others load what it loaded.
    resumed = world.main_first(lambda: resume(ckpts, model, optimizer, schedule, state, dev), then_others=True)
    world.check_same(state.step, "checkpoints (last.pt)")
    metrics = MetricsLog(run_dir / "metrics.jsonl") if world.is_main else None
    if resumed:
        log(f"resuming from {resumed} at update {state.step} (epoch {state.epoch + 1})")
        if world.is_main:
            metrics.truncate_after(state.step)  # the updates after it are replayed
    world.seed_rank(recipe.seed, state.step)
    net = world.wrap(model)  # what the training step calls; `model` is what is saved and validated
    if world.is_main:
        atomic_write(run_dir / "recipe.yaml", lambda tmp: tmp.write_text(dump_recipe(recipe), encoding="utf-8"))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; device {dev}; {precision_name(bf16, dev)}; "
        f"{torch.get_num_threads()} threads; {len(train_set):,} training pairs")
    log(f"batch: {cfg.batch_tokens:,} padded tokens x {world.world_size} rank(s) x {cfg.accum_steps} "
        f"accumulation = {cfg.batch_tokens * world.world_size * cfg.accum_steps:,} padded tokens per update"
        + (f" (DDP, {world.backend})" if world.enabled else ""))

    decode_opts = SearchOptions.from_recipe(recipe.decode, beam_size=cfg.valid_beam_size)
    # Inputs may be up to twice as long as the longest training sentence; longer ones are
    # truncated (silently in validation, with a warning in `nmt translate`).
    max_src_len = 2 * recipe.data.max_len
    valid_translator = Translator(LoadedModel(model, src_tok, trg_tok, max_src_len), decode_opts, dev,
                                  warn=lambda msg: None)

    def payload(with_train_state: bool, scores: dict) -> dict:
        out = {
            "model_config": model.config,
            "model": model.state_dict(),
            "src_spm": src_tok.model_bytes,
            "trg_spm": trg_tok.model_bytes,
            "max_src_len": max_src_len,
            "recipe": recipe.to_dict(),
            "step": state.step,
            "epoch": state.update_epoch - 1,  # 0-based
            "metrics": scores,
        }
        if with_train_state:
            out["train_state"] = {
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "progress": vars(state).copy(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        return out

    def validate() -> None:
        """Rank 0 validates and writes; every rank goes on with its decisions (best BLEU,
        patience, plateau learning rate), so that all of them stop at the same update."""
        if world.is_main:
            validate_here()
        if world.enabled:
            progress, schedule_state = world.broadcast((vars(state), schedule.state_dict()))
            state.restore(progress, cfg.accum_steps)
            schedule.load_state_dict(schedule_state)

    def validate_here() -> dict:
        """Loss, perplexity and BLEU on the validation split; keep the best checkpoints."""
        model.eval()
        start = time.perf_counter()
        loss_sum, n_tok = 0.0, 0
        with torch.inference_mode():
            for idx in token_batches(valid_set.src_lengths, valid_set.trg_lengths, batch_tokens=cfg.batch_tokens,
                                     seed=0, epoch=0, shuffle=False):
                b = {k: v.to(dev) for k, v in collate(valid_set, idx).items()}
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    loss_sum += model(b["src"], b["src_lengths"], b["trg_in"], b["trg_out"]).item()
                n_tok += int((b["trg_out"] != 0).sum())
            hyps = valid_translator.translate_lines(valid_src)
        model.train()
        bleu = bleu_score(hyps, valid_ref)
        loss = loss_sum / max(n_tok, 1)
        scores = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50)), "valid_bleu": bleu,
                  "valid_seconds": time.perf_counter() - start}
        state.last_valid_step = state.step
        improved = not state.best or bleu > state.best[0][0]
        state.bad_validations = 0 if improved else state.bad_validations + 1
        schedule.on_validation(bleu, optimizer)
        keep_best(ckpts, state, bleu, cfg.keep_best, lambda path: save(path, payload(False, scores)))
        # The log first: if killed before last.pt is written, the resumed run drops this
        # record and writes it again, so each step is logged once.
        metrics.write(kind="valid", step=state.step, epoch=state.update_epoch, **scores,
                      best_bleu=state.best[0][0], lr=schedule.lr)
        save_last(ckpts, state, lambda: payload(True, scores))
        log(f"valid | update {state.step} | loss {loss:.3f} | ppl {scores['valid_ppl']:.2f} | "
            f"BLEU {bleu:.2f} | best {state.best[0][0]:.2f} (update {state.best[0][1]}) | "
            f"{scores['valid_seconds']:.1f}s" + ("" if improved else f" | no improvement x{state.bad_validations}"))
        return scores

    def finished() -> bool:
        return bool((cfg.max_steps and state.step >= cfg.max_steps)
                    or (cfg.max_epochs and state.epoch >= cfg.max_epochs)
                    or (cfg.patience and state.bad_validations >= cfg.patience))

    # The loop.
    model.train()
    stop = StopRequest()
    batches_per_epoch = len(token_batches(train_set.src_lengths, train_set.trg_lengths,
                                          batch_tokens=cfg.batch_tokens, seed=recipe.seed, epoch=0,
                                          rank=world.rank, world_size=world.world_size))
    if not batches_per_epoch:
        raise TrainError(f"{len(train_set):,} training pairs make fewer batches of train.batch_tokens "
                         f"({cfg.batch_tokens:,}) than there are processes ({world.world_size})")
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)
    total = min(x for x in (cfg.max_steps or math.inf, (cfg.max_epochs or math.inf) * updates_per_epoch))
    bar = tqdm(total=None if math.isinf(total) else int(total), initial=state.step, unit="upd",
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0, disable=None if world.is_main else True)

    def train_loop() -> bool:
        """Updates and validations until finished; True if a signal stopped them."""
        interrupted = False
        window = {"loss": 0.0, "tokens": 0, "src_tokens": 0, "time": time.perf_counter()}
        while not finished() and not interrupted:
            batches = token_batches(train_set.src_lengths, train_set.trg_lengths, batch_tokens=cfg.batch_tokens,
                                    seed=recipe.seed, epoch=state.epoch, rank=world.rank,
                                    world_size=world.world_size, skip=state.batches_in_epoch)
            groups = [batches[i : i + cfg.accum_steps] for i in range(0, len(batches), cfg.accum_steps)]
            for group in groups:
                lr = schedule.apply(optimizer, state.step)
                batches_in_group = [collate(train_set, idx) for idx in group]
                loss, n_tok, n_src = train_step(net, optimizer, batches_in_group, cfg, dev, bf16, world)
                state.batches_in_epoch += len(group) * world.world_size
                if not math.isfinite(loss):  # on every rank alike: train_step agrees on it
                    _skip_nonfinite(state, cfg, ckpts)
                    if world.any(stop.requested):
                        interrupted = True
                        break
                    continue
                state.nonfinite_in_a_row = 0
                state.step += 1
                window["loss"] += loss * n_tok
                window["tokens"] += n_tok
                window["src_tokens"] += n_src
                if state.step % cfg.log_every == 0:
                    elapsed = time.perf_counter() - window["time"]
                    loss_sum, tokens, src_tokens = world.sum(window["loss"], window["tokens"], window["src_tokens"])
                    avg = loss_sum / max(tokens, 1)
                    tps = tokens / max(elapsed, 1e-9)
                    if world.is_main:
                        metrics.write(kind="train", step=state.step, epoch=state.update_epoch, loss=avg, lr=lr,
                                      trg_tokens_per_s=tps, src_tokens_per_s=src_tokens / max(elapsed, 1e-9))
                    bar.set_postfix_str(f"ep {state.epoch + 1} loss {avg:.3f} lr {lr:.2e} {tps:,.0f} tok/s", refresh=False)
                    window = {"loss": 0.0, "tokens": 0, "src_tokens": 0, "time": time.perf_counter()}
                bar.update(1)
                if state.step % cfg.valid_every == 0:
                    validate()
                elif cfg.save_every and state.step % cfg.save_every == 0 and world.is_main:
                    save_last(ckpts, state, lambda: payload(True, {}))
                if world.any(stop.requested):  # every rank stops after the same update
                    interrupted = True
                    break
                if finished():
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                if state.last_valid_step != state.step:
                    validate()
                interrupted = world.any(stop.requested)  # (as after every update)
        return interrupted

    with stop:
        try:
            interrupted = train_loop()
        except RuntimeError:  # (torch.distributed's errors are RuntimeErrors)
            # A signal reaches every rank, and one that stops first closes its connections:
            # a collective failing after a signal means another rank has stopped.
            if not (world.enabled and stop.requested):
                raise
            interrupted = True
    bar.close()
    if interrupted and world.is_main:
        save_last(ckpts, state, lambda: payload(True, {}))
        log(f"stopped by {stop.signal_name or 'a signal to another rank'} at update {state.step}; "
            f"checkpoint saved to {ckpts / 'last.pt'}; "
            "run the same command again to resume")
    elif state.last_valid_step != state.step:
        validate()
    stopped_early = bool(cfg.patience and state.bad_validations >= cfg.patience)
    if stopped_early:
        log(f"early stopping: no BLEU improvement in {cfg.patience} validations")

    if cfg.average_best and not interrupted and len(state.best) >= 2 and world.is_main:
        average_best(ckpts, state, cfg.average_best, model, lambda: bleu_score(
            valid_translator.translate_lines(valid_src), valid_ref), metrics)
    best_path = ckpts / "best.pt"
    if evaluate_at_end and not interrupted and world.is_main and best_path.is_file():
        evaluate_run(best_path, run_dir, dev)
    return TrainResult(run_dir=run_dir, steps=state.step,
                       best_bleu=state.best[0][0] if state.best else None,
                       best_checkpoint=best_path if best_path.is_file() else None,
                       stopped_early=stopped_early, interrupted=interrupted)


def train_step(model, optimizer, batches: list[dict], cfg, dev, bf16: bool,
               world: Dist = Dist()) -> tuple[float, int, int]:
    """One optimizer update over a group of collated batches (gradient accumulation).

    The loss is summed over target tokens and divided by the update's token count (all
    ranks together), so an update is the same whether the group is one batch or several,
    on one process or on several: DDP averages the ranks' gradients, and the factor
    world_size makes that average the gradient of the loss summed over every rank's
    tokens, as one process computes it on the union of the batches.
    Returns the mean per-token loss, target tokens and source tokens of this rank's group.
    When the loss (on any rank) or the gradient is NaN or infinite the parameters are left
    untouched and the loss returned is NaN.
    """
    n_tok = sum(int((b["trg_out"] != 0).sum()) for b in batches)
    n_src = sum(int(b["src_lengths"].sum()) for b in batches)
    n_tok_all = world.sum(n_tok)[0]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, b in enumerate(batches):
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        # DDP decides at the forward whether this backward all-reduces: only the last batch's does.
        with (world.no_sync(model, skip=i + 1 < len(batches)),
              torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)):
            loss = model(b["src"], b["src_lengths"], b["trg_in"], b["trg_out"], label_smoothing=cfg.label_smoothing)
        (loss / n_tok_all * world.world_size).backward()
        total += loss.item()
    if cfg.clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if world.any(not (math.isfinite(total) and math.isfinite(norm.item()))):
        optimizer.zero_grad(set_to_none=True)
        return math.nan, n_tok, n_src
    optimizer.step()
    return total / max(n_tok, 1), n_tok, n_src


def _skip_nonfinite(state: TrainState, cfg, ckpts: Path) -> None:
    """Count a skipped update; too many in a row end training, keeping the last good checkpoint."""
    state.skipped += 1
    state.nonfinite_in_a_row += 1
    log(f"warning: update {state.step + 1} skipped: NaN or infinite loss or gradient "
        f"({state.nonfinite_in_a_row} in a row, {state.skipped} in all)")
    if state.nonfinite_in_a_row >= cfg.max_nonfinite:
        last = ckpts / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        raise TrainError(f"stopped: {state.nonfinite_in_a_row} updates in a row had a NaN or infinite loss or "
                         f"gradient (train.max_nonfinite); {kept}. Try a lower train.lr, train.clip_norm, "
                         "or train.precision fp32")
