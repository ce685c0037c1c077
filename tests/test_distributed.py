"""Data-parallel training on CPU with gloo and 2 processes: one DDP update equals one
single-process update on the union of the ranks' batches; rank 0 alone writes; a torchrun
run learns; a run resumes on another number of processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from nmt.cli import app
from nmt.data.batching import collate, token_batches
from nmt.data.corpus import EncodedCorpus
from nmt.distributed import DistributedError, setup
from nmt.model import Seq2Seq
from nmt.model.build import build_model
from nmt.train import train, train_step

from toy import make_recipe

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int) -> None:
    """Set the environment torchrun gives rank `rank` of WORLD processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def toy_recipe(folder: Path, steps: int):
    """The toy recipe with small batches (about 30 per epoch), validating every 3 updates."""
    return make_recipe(folder, steps=steps, valid_every=3, extra=["train.batch_tokens=200"])


def one_update(recipe, data: Path, groups: list, world=None) -> dict:
    """Parameters after one SGD update (lr 1: the change is the clipped gradient)."""
    from nmt.distributed import Dist

    world = world or Dist()
    corpus = EncodedCorpus.open(data, "train")
    torch.manual_seed(0)
    model = build_model(recipe.model, 19, 19)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = [collate(corpus, idx) for idx in groups]
    train_step(world.wrap(model), optimizer, batches, recipe.train, torch.device("cpu"), False, world)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rank(rank: int, port: int, folder: Path, recipes: dict) -> None:
    """One rank: single DDP updates with accumulation 1 and 2 (rank 0 saves the
    parameters), then DDP training runs that resume a 1-process run, are stopped, and
    meet an infinite loss, counting every file this rank writes."""
    import nmt.checkpoint
    import nmt.train
    import nmt.train_utils

    join(rank, port)
    world = setup("cpu")
    recipe = recipes[10]
    data = folder / "run" / "data"
    corpus = EncodedCorpus.open(data, "train")
    for accum in (1, 2):
        shard = token_batches(corpus.src_lengths, corpus.trg_lengths, batch_tokens=recipe.train.batch_tokens,
                              seed=recipe.seed, epoch=0, rank=rank, world_size=WORLD)
        params = one_update(recipe, data, shard[:accum], world)
        if rank == 0:
            torch.save(params, folder / f"accum{accum}.pt")

    writes = []
    original = nmt.checkpoint.atomic_write

    def counting(path, write):
        writes.append(Path(path).name)
        original(path, write)

    nmt.checkpoint.atomic_write = nmt.train.atomic_write = counting
    log_write = nmt.train_utils.MetricsLog.write
    nmt.train_utils.MetricsLog.write = lambda self, **kw: (writes.append("metrics"), log_write(self, **kw))
    result = train(recipe, folder / "run", device="cpu", evaluate_at_end=False)
    report = {"writes": list(writes), "steps": result.steps, "best_bleu": result.best_bleu}

    # On to 16 updates, but rank 1 alone is asked to stop during its 2nd update: every
    # rank stops after update 12, and rank 0 saves last.pt.
    class StopOnRank1(nmt.train_utils.StopRequest):
        checks = 0

        @property
        def requested(self):
            self.checks += 1
            return rank == 1 and self.checks >= 2

        @requested.setter
        def requested(self, value):
            pass

    stop_request = nmt.train.StopRequest
    nmt.train.StopRequest = StopOnRank1
    writes.clear()
    result = train(recipes[16], folder / "run", device="cpu", evaluate_at_end=False)
    report.update(stopped={"writes": list(writes), "steps": result.steps, "interrupted": result.interrupted})
    nmt.train.StopRequest = stop_request

    # On to 14 updates, with an infinite loss (and a finite gradient) on rank 1 alone in
    # the 2nd: every rank skips that update.
    calls, skipped = [], []
    forward, skip_fn = Seq2Seq.forward, nmt.train._skip_nonfinite

    def infinite_once(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        if not (torch.is_grad_enabled() and len(args) > 3):  # not the training loss
            return loss
        calls.append(1)
        return loss + float("inf") if rank == 1 and len(calls) == 2 else loss

    def skip(state, *args):
        skipped.append(state.step + 1)
        skip_fn(state, *args)

    Seq2Seq.forward, nmt.train._skip_nonfinite = infinite_once, skip
    writes.clear()
    result = train(recipes[14], folder / "run", device="cpu", evaluate_at_end=False)
    report.update(nonfinite={"skipped": skipped, "steps": result.steps, "rank1_writes": list(writes)})
    (folder / f"rank{rank}.json").write_text(json.dumps(report))
    world.close()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """4 updates on 1 process, then 2 processes (gloo) run `_rank` (one start for both tests)."""
    folder = tmp_path_factory.mktemp("ddp")
    train(toy_recipe(folder, steps=4), folder / "run", device="cpu", evaluate_at_end=False)
    recipes = {steps: toy_recipe(folder, steps) for steps in (10, 14, 16)}  # written here, not by 2 ranks at once
    job = mp.spawn(_rank, args=(free_port(), folder, recipes), nprocs=WORLD, join=False)
    for _ in range(300):  # ranks that disagree wait for each other forever: give up after 5 minutes
        if job.join(timeout=1):
            return folder
    for process in job.processes:
        process.kill()
    pytest.fail("the 2-process job did not finish in 5 minutes (ranks waiting for each other?)")


def test_ddp_update_equals_single_update_on_union(ddp):
    recipe = toy_recipe(ddp, steps=10)
    data = ddp / "run" / "data"
    corpus = EncodedCorpus.open(data, "train")
    full = token_batches(corpus.src_lengths, corpus.trg_lengths, batch_tokens=recipe.train.batch_tokens,
                         seed=recipe.seed, epoch=0)
    torch.manual_seed(0)
    before = build_model(recipe.model, 19, 19).state_dict()
    for accum in (1, 2):
        # One update on WORLD ranks with accumulation A consumes the first WORLD x A batches.
        single = one_update(recipe, data, full[: WORLD * accum])
        parallel = torch.load(ddp / f"accum{accum}.pt")
        assert parallel.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(parallel[key], single[key], rtol=1e-5, atol=1e-7, msg=key)
        assert any(not torch.equal(single[k], before[k]) for k in single)


def test_checkpoints_written_once_and_resume_on_another_world_size(ddp):
    run = ddp / "run"
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[1]["writes"] == []
    assert "last.pt" in ranks[0]["writes"] and "recipe.yaml" in ranks[0]["writes"] and "metrics" in ranks[0]["writes"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 10
    assert ranks[0]["best_bleu"] == ranks[1]["best_bleu"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid_steps = [r["step"] for r in records if r["kind"] == "valid"]
    assert valid_steps[:5] == [3, 4, 6, 9, 10]  # once each: 3 and 4 (1 process: its end), 6, 9, 10
    stopped = [r["stopped"] for r in ranks]
    assert stopped[0]["steps"] == stopped[1]["steps"] == 12
    assert stopped[0]["interrupted"] and stopped[1]["interrupted"]
    assert stopped[0]["writes"][-1] == "last.pt" and stopped[1]["writes"] == []

    nonfinite = [r["nonfinite"] for r in ranks]
    assert nonfinite[0]["skipped"] == nonfinite[1]["skipped"] == [14]
    assert nonfinite[0]["steps"] == nonfinite[1]["steps"] == 14 and nonfinite[1]["rank1_writes"] == []

    # Back to 1 process: 2 more updates.
    recipe = toy_recipe(ddp, steps=16)
    result = train(recipe, run, device="cpu", evaluate_at_end=False)
    assert result.steps == 16
    progress = torch.load(run / "checkpoints" / "last.pt")["train_state"]["progress"]
    corpus = EncodedCorpus.open(run / "data", "train")
    n_batches = len(token_batches(corpus.src_lengths, corpus.trg_lengths, batch_tokens=200, seed=recipe.seed, epoch=0))
    assert n_batches > 4 + 11 * 2 + 2  # still inside the first epoch
    # The position in the epoch's order carried across: 4 x 1 + (8 + 3) x 2 + 2 x 1 batches
    # (the skipped update consumed its batches too).
    assert (progress["epoch"], progress["batches_in_epoch"]) == (0, 28)


def test_checkpoint_from_before_batches_in_epoch_resumes_in_place(tmp_path):
    """Older checkpoints (one process) counted updates in the epoch, not batches."""
    recipe = make_recipe(tmp_path, steps=2, extra=["train.batch_tokens=200", "train.accum_steps=2"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(last)
    progress = payload["train_state"]["progress"]
    assert progress.pop("batches_in_epoch") == 4
    progress["group_in_epoch"] = 2
    torch.save(payload, last)
    recipe = make_recipe(tmp_path, steps=3, extra=["train.batch_tokens=200", "train.accum_steps=2"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    assert torch.load(last)["train_state"]["progress"]["batches_in_epoch"] == 6


def test_torchrun_trains_tiny_recipe(tmp_path):
    """`torchrun --nproc-per-node 2 -m nmt train RECIPE`: finishes, learns, logs once."""
    make_recipe(tmp_path, steps=40, valid_every=20)
    env = {**os.environ, "NMT_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    env.pop("NMT_DATA_DIR", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun script runs
    cmd = [*torchrun, "--standalone", "--nproc-per-node", str(WORLD), "-m", "nmt", "train",
           str(tmp_path / "toy.yaml"), "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1,200 padded tokens x 2 rank(s) x 1 accumulation = 2,400 padded tokens per update (DDP, gloo)" in done.stderr
    assert done.stderr.count("valid | update 20 |") == 1 and done.stderr.count("model: ") == 1
    assert done.stdout.count("BLEU-lc:") == 1  # the test table, from rank 0 only
    records = [json.loads(line) for line in (tmp_path / "runs/toy/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, 41, 5))
    assert losses[-1] < 0.6 * losses[0]


def test_no_torchrun_environment_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = setup("cpu")
    assert (world.rank, world.world_size, world.is_main, world.enabled) == (0, 1, True, False)
    assert world.sum(3, 4.5) == [3, 4.5] and world.broadcast("x") == "x" and world.any(False) is False


def test_incomplete_torchrun_environment_is_one_line_error(tmp_path, monkeypatch):
    make_recipe(tmp_path, steps=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="start distributed training with torchrun"):
        setup("cpu")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "toy.yaml"), "--device", "cpu",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "error: WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not" in result.output
    assert "Traceback" not in result.output

