"""Long runs: checkpoints inside an epoch and an exact --resume from them, Ctrl-C (one line, exit code 130, the
rerun goes on), never a non-finite checkpoint, and the time estimates."""
import contextlib
import csv
import io
import itertools
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train import checkpoint, logs
from train.__main__ import main
from train.tasks import ClassificationTask
from train.testing import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # training steps per epoch: 256 images in batches of 64
TRAIN_STEP = ClassificationTask.train_step


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return write_fashion_mnist(str(tmp_path_factory.mktemp("fashion")), n_train=256, n_test=64)


def cli(fm, out, *overrides):
    """Two epochs with random crops and flips (the data generator's state is part of a mid-epoch checkpoint), the
    loss read at every step, and a checkpoint after every step but an epoch's last (every 6 microseconds)."""
    return ["--config", "train/configs/smoke.yaml", f"data_dir={fm}", f"out_dir={out}", "test_subset=64", "epochs=2",
            "augment=crop_flip", "deterministic=true", "log_every=1", "checkpoint_every_min=1e-7", *overrides]


@pytest.fixture(scope="module")
def straight(fm, tmp_path_factory):
    """An uninterrupted run, without checkpoints inside its epochs: (its folder, its output)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(cli(fm, out, "checkpoint_every_min=0")) == 0
    return out, stdout.getvalue()


def interrupt_at(monkeypatch, call):
    """Ctrl-C during training step number ``call`` (counted from 0 over the run's steps)."""
    counter = itertools.count()

    def train_step(self, *args):
        if next(counter) == call:
            raise KeyboardInterrupt
        return TRAIN_STEP(self, *args)

    monkeypatch.setattr(ClassificationTask, "train_step", train_step)


def assert_same_run(straight_dir, out):
    """The weights and the CSV rows (but their times) of the run in ``out`` are those of the uninterrupted run."""
    straight_state, resumed = (checkpoint.load(str(folder / checkpoint.LAST)) for folder in (straight_dir, out))
    assert resumed["epoch"] == 2 and "partial" not in resumed
    for name, value in straight_state["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    rows = []
    for folder in (straight_dir, out):
        with open(folder / logs.CSV_NAME) as f:
            rows.append([{k: v for k, v in row.items() if not k.endswith("time_s")} for row in csv.DictReader(f)])
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_resume_from_inside_an_epoch_is_bitwise_identical(tmp_path, fm, straight, monkeypatch, capsys):
    out = tmp_path / "run"
    last = out / checkpoint.LAST
    interrupt_at(monkeypatch, STEPS + 2)  # epoch 2, its third step: checkpoints were written after the first two
    assert main(cli(fm, out)) == 130
    captured = capsys.readouterr()
    assert captured.err == (f"interrupted: rerun the same command with --resume to resume from epoch 2, step 2 of "
                            f"{STEPS} ({last})\n")
    state = checkpoint.load(str(last))
    assert state["epoch"] == 1 and state["partial"]["step"] == 2 and len(state["history"]) == 1
    assert not [name for name in os.listdir(out) if ".tmp" in name]

    monkeypatch.setattr(ClassificationTask, "train_step", TRAIN_STEP)
    assert main(cli(fm, out, "--resume")) == 0
    assert f"resumed from {last} at epoch 2, step 2 of {STEPS}" in capsys.readouterr().out
    assert_same_run(straight[0], out)


def test_time_estimates(straight):
    """One line after the first steps (the steps after a warm-up step), and after each epoch but the last the time
    left."""
    lines = straight[1].splitlines()
    estimates = [line for line in lines if line.startswith("training: about ")]
    assert len(estimates) == 1 and estimates[0].endswith(" on this machine (measured over the first 3 steps)")
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert " left" in epochs[0] and " left" not in epochs[1]


def test_ctrl_c_on_the_command_line_then_the_advised_rerun_resumes(tmp_path, fm, straight):
    """A real SIGINT, and SIGTERM alike, to ``python -m train`` blocked inside a step: one line on stderr, exit code
    130, no traceback; the advised rerun ends with the weights and rows of an uninterrupted run."""
    script, ready = tmp_path / "run.py", tmp_path / "ready"
    script.write_text(f"""
import itertools, sys, time
sys.path.insert(0, {ROOT!r})
from train.__main__ import main
from train.tasks import ClassificationTask

real, calls = ClassificationTask.train_step, itertools.count()

def train_step(self, *args):
    if next(calls) == {STEPS + 1}:  # epoch 2, step 2: wait there for the signal
        open({str(ready)!r}, "w").close()
        while True:
            time.sleep(0.01)
    return real(self, *args)

ClassificationTask.train_step = train_step
sys.exit(main(sys.argv[1:]))
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for number in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / number.name
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), *cli(fm, out)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(number)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130, err
        assert err == (f"interrupted: rerun the same command with --resume to resume from epoch 2, step 1 of {STEPS} "
                       f"({out / checkpoint.LAST})\n")
        assert main(cli(fm, out, "--resume")) == 0
        assert_same_run(straight[0], out)


def test_a_checkpoint_inside_an_epoch_is_never_nonfinite(tmp_path, fm, monkeypatch, capsys):
    """A NaN loss (the flags are read before every checkpoint) and a weight or buffer gone infinite with finite
    losses (the weights are checked before every checkpoint) stop the run at the step, and checkpoint_last.pt keeps
    the last good one; --resume on_nonfinite=skip, as advised, goes on from it."""
    out = tmp_path / "nan"
    last = out / checkpoint.LAST
    calls = itertools.count()

    def nan_step(self, model, teacher, batch, autocast):
        images, labels = batch
        return TRAIN_STEP(self, model, teacher, (images * math.nan if next(calls) in (2, 3) else images, labels),
                          autocast)

    monkeypatch.setattr(ClassificationTask, "train_step", nan_step)  # the first run's third step, then the resumed's
    assert main(cli(fm, out)) == 3
    assert capsys.readouterr().err == (
        f"error: non-finite training loss or gradient at epoch 1, step 3 of {STEPS}: the run stopped; {last} (epoch 1, "
        "step 2 of 4) is the last good state. Continue from it without such steps (--resume on_nonfinite=skip), or "
        "start a new run in another out_dir with a lower lr or beta, or amp=off\n")
    state = checkpoint.load(str(last))
    assert state["partial"]["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                  if v.is_floating_point())
    assert main(cli(fm, out, "--resume", "on_nonfinite=skip")) == 0
    assert "skipped 1 non-finite step(s)" in capsys.readouterr().out

    out = tmp_path / "buffer"
    calls = itertools.count()

    def overflowing_step(self, model, *args):
        if next(calls) == 1:  # a running variance, which neither the loss nor the gradients read in training mode
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(math.inf)
        return TRAIN_STEP(self, model, *args)

    monkeypatch.setattr(ClassificationTask, "train_step", overflowing_step)
    assert main(cli(fm, out)) == 3
    assert capsys.readouterr().err.startswith(
        f"error: the model's weights became non-finite in epoch 1 (an update overflowed): the run stopped; "
        f"{out / checkpoint.LAST} (epoch 1, step 1 of 4) is the last good state.")
    state = checkpoint.load(str(out / checkpoint.LAST))
    assert state["partial"]["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                  if v.is_floating_point())
