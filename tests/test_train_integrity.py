"""A run never saves a broken state: non-finite steps stop the run (or are skipped) before anything is written,
and two runs never share an out_dir."""
import csv
import itertools
import math
import os
import re
import signal
import socket
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


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return write_fashion_mnist(str(tmp_path_factory.mktemp("fashion")), n_train=256, n_test=64)


def cli(fm, out, *overrides):
    return ["--config", "train/configs/smoke.yaml", f"data_dir={fm}", f"out_dir={out}", "test_subset=64",
            *overrides]


def poison_batches(monkeypatch, calls):
    """The training steps number ``calls`` (counted from 0 in each run) get NaN images."""
    real, counter = ClassificationTask.train_step, itertools.count()

    def train_step(self, model, teacher, batch, autocast):
        images, labels = batch
        return real(self, model, teacher, (images * math.nan if next(counter) in calls else images, labels), autocast)

    monkeypatch.setattr(ClassificationTask, "train_step", train_step)


def finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def test_diverging_lr_stops_before_any_checkpoint(tmp_path, fm, capsys):
    out = tmp_path / "run"
    assert main(cli(fm, out, "lr=1.0e+9")) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite training loss or gradient at epoch 1, step ") and err.count("\n") == 1
    assert "before writing a checkpoint" in err
    assert not (out / checkpoint.LAST).exists() and not (out / checkpoint.BEST).exists()


def test_nonfinite_step_keeps_the_last_good_checkpoint_and_resume_skips_it(tmp_path, fm, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_batches(monkeypatch, {STEPS + 1})  # epoch 2, step 2
    assert main(cli(fm, out, "epochs=3")) == 3
    err = capsys.readouterr().err
    last = out / checkpoint.LAST
    assert err == (f"error: non-finite training loss or gradient at epoch 2, step 2 of {STEPS}: the run stopped; "
                   f"{last} (epoch 1) is the last good state. Continue from it without such steps (--resume "
                   "on_nonfinite=skip), or start a new run in another out_dir with a lower lr or beta, or amp=off\n")
    state = checkpoint.load(str(last))
    assert state["epoch"] == 1 and finite(state["model"])
    assert finite(checkpoint.load(str(out / checkpoint.BEST))["model"])

    poison_batches(monkeypatch, {1})  # the resumed run starts at epoch 2 and meets the same fault; as advised:
    assert main(cli(fm, out, "epochs=3", "--resume", "on_nonfinite=skip")) == 0
    stdout = capsys.readouterr().out
    assert f"resumed from {last} after epoch 1" in stdout and "skipped 1 non-finite step(s)" in stdout
    state = checkpoint.load(str(last))
    assert state["epoch"] == 3 and finite(state["model"])
    with open(out / logs.CSV_NAME) as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3]


@pytest.mark.parametrize("optimizer, bad_step, fault, amp", [
    ("sgd", 0, "nan_images", "off"), ("adamw", 0, "nan_images", "off"), ("sgd", 2, "nan_images", "off"),
    ("adamw", 2, "nan_images", "off"), ("sgd", 2, "inf_loss", "off"), ("sgd", 2, "inf_loss", "fp16"),
], ids=["sgd-first_step", "adamw-first_step", "sgd-third_step", "adamw-third_step", "inf_loss", "inf_loss-fp16"])
def test_skip_leaves_the_model_as_before_a_nonfinite_step(tmp_path, fm, monkeypatch, capsys, optimizer, bad_step,
                                                          fault, amp):
    """NaN images poison the loss, every gradient and the BatchNorm statistics; an infinite constant added to the
    loss leaves the gradients finite (under fp16, GradScaler decides which steps the optimizer skips)."""
    # Memory torch allocates uninitialised is NaN here (as torch.empty in conftest): state a skipped step
    # leaves unwritten, e.g. fused SGD's first momentum buffers, would show.
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(math.nan))
    real_step, states = ClassificationTask.train_step, []

    def train_step(self, model, teacher, batch, autocast):
        states.append({k: v.clone() for k, v in model.state_dict().items()})  # the model as the step finds it
        images, labels = batch
        bad = len(states) == bad_step + 1
        loss, sums = real_step(self, model, teacher, (images * math.nan if bad and fault == "nan_images" else images,
                                                      labels), autocast)
        return (loss + math.inf if bad and fault == "inf_loss" else loss), sums

    monkeypatch.setattr(ClassificationTask, "train_step", train_step)
    out = tmp_path / "run"
    assert main(cli(fm, out, "on_nonfinite=skip", f"optimizer={optimizer}", f"amp={amp}")) == 0
    assert "skipped 1 non-finite step(s)" in capsys.readouterr().out
    saved = checkpoint.load(str(out / checkpoint.LAST))
    states.append(saved["model"])
    for name in states[bad_step]:  # the skipped step changed nothing, the next one trained on
        assert torch.equal(states[bad_step][name], states[bad_step + 1][name]), name
    assert any(not torch.equal(v, states[bad_step + 2][k]) for k, v in states[bad_step + 1].items())
    assert finite(saved["model"])
    if optimizer == "adamw":
        assert all(s["step"] == STEPS - 1 for s in saved["optimizer"]["state"].values())
    with open(out / logs.CSV_NAME) as f:
        assert math.isfinite(float(next(csv.DictReader(f))["train_loss"]))  # the mean leaves the skipped step out


def test_no_host_sync_per_step(tmp_path, fm, monkeypatch):
    """The loss and the non-finite flags are read on the host every log_every steps and at the end of an epoch,
    never per step: a run twice as long makes no more tensor-to-host reads."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads.append(1)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for n_train in (128, 256):  # 2 and 4 steps
        reads.clear()
        assert main(cli(fm, tmp_path / str(n_train), f"train_subset={n_train}", "log_every=1000")) == 0
        counts[n_train] = len(reads)
    assert counts[128] == counts[256]
    reads.clear()
    assert main(cli(fm, tmp_path / "every_step", "log_every=1")) == 0
    assert len(reads) == counts[256] + STEPS - 1  # one more read at each step after the first


def test_torchrun_ranks_skip_the_same_steps(tmp_path, fm):
    """A loss that is infinite on rank 1 only, with finite gradients: both ranks must skip the step, or the
    replicas drift apart. Each rank prints a digest of its weights at the end of every epoch."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import hashlib, itertools, os, sys
import torch
sys.path.insert(0, {ROOT!r})
from train.__main__ import main
from train.nonfinite import StepGuard
from train.tasks import ClassificationTask

real_step, real_check, counter = ClassificationTask.train_step, StepGuard.check_weights, itertools.count()

def train_step(self, *args):
    loss, sums = real_step(self, *args)
    if next(counter) == 1 and os.environ["RANK"] == "1":
        loss = loss + torch.tensor(float("inf"))  # a constant: the gradients stay finite
    return loss, sums

def check_weights(self, model):
    real_check(self, model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    digest = hashlib.sha1(weights.numpy().tobytes()).hexdigest()
    sys.stdout.write(" ".join(["rank", os.environ["RANK"], "epoch", str(self.epoch), "weights", digest]) + "\\n")
    sys.stdout.flush()  # one write: the ranks share the pipe

ClassificationTask.train_step, StepGuard.check_weights = train_step, check_weights
sys.exit(main(sys.argv[1:]))
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *cli(fm, tmp_path / "ddp", "epochs=2", "device=cpu", "on_nonfinite=skip")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped 1 non-finite step(s)") == 1  # epoch 1, reported by rank 0
    digests = re.findall(r"rank (\d) epoch (\d) weights ([0-9a-f]{40})", proc.stdout)
    assert sorted(d[:2] for d in digests) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], proc.stdout
    for epoch in ("0", "1"):
        assert len({digest for _, e, digest in digests if e == epoch}) == 1, digests


def test_second_run_on_a_live_runs_out_dir_is_refused(tmp_path, fm, capsys):
    """The first run holds out_dir while it works (here: blocked reading a teacher checkpoint from a FIFO); a
    second run is refused, naming the first's PID; the lock goes when the first run dies, even by SIGKILL."""
    out, fifo = tmp_path / "run", tmp_path / "teacher.fifo"
    os.mkfifo(fifo)
    args = cli(fm, out, "loss=wttm", "teacher=cnn_teacher", f"teacher_checkpoint={fifo}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    holder = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        lock, deadline = out / "run.lock", time.time() + 60
        while not (lock.exists() and lock.read_text()) and holder.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read().decode()
        assert main(cli(fm, out)) == 2
        err = capsys.readouterr().err
        assert err == (f"error: out_dir {out} is in use by another run (PID {holder.pid} on {socket.gethostname()}): "
                       "wait for it to end, or choose another out_dir\n")
        assert not (out / "config.yaml").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(cli(fm, out)) == 0
