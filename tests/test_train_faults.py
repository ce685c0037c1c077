"""Training survives faults: SIGKILL at any moment, damaged checkpoints, NaN/inf
updates, a second training on the same run folder, and a disk that fills up."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nmt.checkpoint
import nmt.train
from nmt.checkpoint import load_checkpoint
from nmt.model import Seq2Seq
from nmt.train import TrainError, train

from toy import make_recipe

ROOT = Path(__file__).parent.parent


def params(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_every_checkpoint_loads(ckpts: Path) -> None:
    for path in ckpts.glob("*.pt"):
        load_checkpoint(path)  # raises CheckpointError on a damaged file


def nmt_env(tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NMT_RUNS_DIR", None)
    return env


@pytest.mark.skipif(not os.environ.get("NMT_DATA_DIR"), reason="needs the Multi30k mirror (NMT_DATA_DIR)")
def test_sigkill_at_random_moments_resumes_to_the_same_parameters(tmp_path):
    """`nmt train recipes/multi30k-tiny.yaml` (shortened) killed with SIGKILL 6 times, two
    of them while a checkpoint is being written, ends with the parameters of a run that
    was never interrupted; no checkpoint in the run folder is ever unreadable."""
    # Shortened: 60 updates on 3,000 pairs; short validation outputs; no test-split evaluation.
    # Kills come 1-5 s after a start (about 2.5 s of it starting up), so that the six
    # attempts end before the run does also on a fast machine: the check below needs them.
    args = ["--set", "train.max_steps=60", "--set", "train.valid_every=20", "--set", "train.save_every=3",
            "--set", "train.threads=1", "--set", "data.max_train_pairs=3000", "--set", "data.test_splits=[]",
            "--set", "decode.max_len_a=0.2", "--set", "decode.max_len_b=2", "--device", "cpu"]

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "nmt", "train", str(ROOT / "recipes/multi30k-tiny.yaml"), "--run-dir", str(run),
                *args]

    env = nmt_env(tmp_path)
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    rng = random.Random(0)
    kills, mid_write = 0, 0
    for attempt in range(6):
        proc = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if attempt in (2, 4):  # wait for a checkpoint write to be under way, then kill
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    if ckpts.is_dir() and any(p.name.startswith((".last.pt.", ".step-")) for p in ckpts.iterdir()):
                        break
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(1.0, 5.0))
            if proc.poll() is None:
                proc.kill()
                kills += 1
                if ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir()):
                    mid_write += 1
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
        if ckpts.is_dir():
            assert_every_checkpoint_loads(ckpts)
    assert kills >= 5 and mid_write >= 1, (kills, mid_write)

    done = subprocess.run(command(run), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert_same_params(params(ckpts / "last.pt"), params(reference / "checkpoints" / "last.pt"))
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert_every_checkpoint_loads(ckpts)
    # One history in the log: every update logged once, however often it was replayed.
    import json

    steps = [(r["kind"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    recipe = make_recipe(tmp_path, steps=6, extra=["train.save_every=2"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpts / "prev.pt")["step"] == 4
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk

    longer = make_recipe(tmp_path, steps=8, extra=["train.save_every=2"])
    train(longer, tmp_path / "run", device="cpu", evaluate_at_end=False)
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "falling back to" in err and "prev.pt (update 4)" in err
    assert (ckpts / "last.pt.corrupt").exists()
    train(longer, tmp_path / "straight", device="cpu", evaluate_at_end=False)
    assert_same_params(params(ckpts / "last.pt"), params(tmp_path / "straight" / "checkpoints" / "last.pt"))


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    recipe = make_recipe(tmp_path, steps=4, extra=["train.save_every=2"])
    train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("last.pt", "prev.pt"):
        (ckpts / name).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="no usable checkpoint to resume from.*last.pt.*prev.pt.*--restart"):
        train(make_recipe(tmp_path, steps=6), tmp_path / "run", device="cpu", evaluate_at_end=False)


def wrap_training_loss(monkeypatch, change) -> None:
    """Pass the training loss (``Seq2Seq.forward`` with a target, with gradients) through
    ``change(loss, call)``, calls counted from 1."""
    real = Seq2Seq.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        if not (torch.is_grad_enabled() and (len(args) > 3 or "trg_out" in kwargs)):
            return value
        calls[0] += 1
        return change(value, calls[0])

    monkeypatch.setattr(Seq2Seq, "forward", forward)


def nan_on_calls(monkeypatch, bad) -> None:
    """Make the training loss NaN on the given calls (counted from 1)."""
    wrap_training_loss(monkeypatch, lambda loss, call: loss * float("nan") if bad(call) else loss)


def test_nonfinite_updates_are_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, lambda n: n in (3, 4))
    recipe = make_recipe(tmp_path, steps=10, valid_every=100)
    result = train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    err = capsys.readouterr().err
    assert "warning: update 3 skipped: NaN or infinite loss or gradient (1 in a row" in err
    assert "(2 in a row, 2 in all)" in err
    assert result.steps == 10  # skipped batches are not updates
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["train_state"]["progress"]["skipped"] == 2
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_repeated_nonfinite_updates_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, lambda n: n > 4)
    recipe = make_recipe(tmp_path, steps=50, extra=["train.save_every=2", "train.max_nonfinite=3"])
    with pytest.raises(TrainError, match="3 updates in a row had a NaN or infinite loss.*last good checkpoint"):
        train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["step"] == 4
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_inf_gradient_is_skipped_too(tmp_path, monkeypatch, capsys):
    """A finite loss with an infinite gradient: the parameters stay as they were."""
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    wrap_training_loss(monkeypatch, lambda loss, call: InfGrad.apply(loss))
    recipe = make_recipe(tmp_path, steps=50, extra=["train.save_every=1", "train.max_nonfinite=2"])
    with pytest.raises(TrainError, match="2 updates in a row"):
        train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    assert "no checkpoint had been written yet" not in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # no update ever happened


def test_second_training_on_a_run_folder_names_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nmt.train_utils import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = make_recipe(tmp_path, steps=2)
        with pytest.raises(TrainError, match=f"is in use: process {holder.pid} on .* is training or preprocessing there"):
            train(recipe, run, device="cpu", evaluate_at_end=False)
        # nor may `nmt preprocess --force` replace the data under a training run
        done = subprocess.run([sys.executable, "-m", "nmt", "preprocess", str(tmp_path / "toy.yaml"), "--run-dir",
                               str(run), "--force"], capture_output=True, text=True)
        assert done.returncode == 1 and f"is in use: process {holder.pid}" in done.stderr, done.stderr
        assert not (run / "data").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file still names it, but the lock is free
        holder.wait()
    assert f"process {holder.pid}" in (run / "train.lock").read_text()
    train(recipe, run, device="cpu", evaluate_at_end=False)
    assert f"taking over the lock of a run that ended without releasing it (process {holder.pid}" in capsys.readouterr().err
    assert (run / "train.lock").read_text() == ""  # released cleanly


def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 1:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(nmt.checkpoint.torch, "save", save)
    recipe = make_recipe(tmp_path, steps=6, extra=["train.save_every=2"])
    with pytest.raises(TrainError, match=r"cannot write .*last.pt: No space left on device; the checkpoints"):
        train(recipe, tmp_path / "run", device="cpu", evaluate_at_end=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_run_folder_is_one_line(tmp_path):
    make_recipe(tmp_path, steps=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = nmt_env(tmp_path)
    env.pop("NMT_DATA_DIR", None)
    done = subprocess.run([sys.executable, "-m", "nmt", "train", str(tmp_path / "toy.yaml"), "--run-dir",
                           str(blocker / "run"), "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "a-file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_sigterm_saves_a_checkpoint_and_says_so(tmp_path):
    make_recipe(tmp_path, steps=100000)
    env = nmt_env(tmp_path)
    env.pop("NMT_DATA_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "train", str(tmp_path / "toy.yaml"), "--run-dir",
                             str(tmp_path / "run"), "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] >= 5
