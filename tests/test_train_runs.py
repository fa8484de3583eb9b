"""End-to-end runs on tiny synthetic Fashion-MNIST files: smoke, distillation, resume, SIGKILL, torchrun."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train import checkpoint, engine, logs
from train.errors import CheckpointError, ConfigError
from train.models import build_model
from train.tasks import ClassificationTask
from train.testing import run_cfg, write_cifar100, write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return write_fashion_mnist(str(tmp_path_factory.mktemp("fashion")), n_train=512, n_test=256)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, fm):
    out = tmp_path_factory.mktemp("teacher")
    engine.train(run_cfg(out, fm, "t", model="cnn_teacher", epochs=2, deterministic=True))
    return str(out / "t" / checkpoint.LAST)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_config_end_to_end(tmp_path, fm):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/smoke.yaml", f"data_dir={fm}",
                           f"out_dir={tmp_path}/smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "best test top-1" in proc.stdout and "seed 0" in proc.stdout
    out = tmp_path / "smoke"
    for name in ("config.yaml", logs.CSV_NAME, logs.PLOT_NAME, checkpoint.LAST, checkpoint.BEST,
                 engine.SUMMARY_NAME):
        assert (out / name).is_file(), name
    summary = json.loads((out / engine.SUMMARY_NAME).read_text())
    assert summary["seed"] == 0 and summary["epochs"] == 1 and 0 <= summary["best_top1"] <= 100


@pytest.mark.parametrize("loss", ["kd", "ttm", "wttm"])
def test_distillation_logs_loss_components(tmp_path, fm, teacher_ckpt, loss):
    summary = engine.train(run_cfg(tmp_path, fm, loss, loss=loss, teacher="cnn_teacher",
                                   teacher_checkpoint=teacher_ckpt, loss_backend="torch"))
    assert summary["teacher_top1"] > 50  # the synthetic classes are easy
    row = read_csv(tmp_path / loss / logs.CSV_NAME)[0]
    assert list(row) == list(logs.columns(ClassificationTask))
    weight = float(row["train_kl_weight"])
    if loss in ("kd", "ttm"):
        assert weight == pytest.approx(1.0)  # ttm_kernels reports the KD factor T^2 inside the KL term
    else:
        assert 1.0 < weight < 10 ** 0.8  # U = sum(p^0.2) in [1, N^0.8]
    assert float(row["train_kl"]) > 0 and float(row["train_ce"]) > 0


def test_cifar100_distillation_from_a_repdistiller_checkpoint(tmp_path):
    root = write_cifar100(str(tmp_path / "c"), n_train=64, n_test=32)
    teacher = build_model("resnet8", 100, (3, 32, 32))
    torch.save({"model": teacher.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    summary = engine.train(run_cfg(tmp_path, root, "cifar", dataset="cifar100", model="resnet8", teacher="resnet8",
                                   teacher_checkpoint=str(tmp_path / "ckpt_epoch_240.pth"), loss="wttm",
                                   batch_size=32))
    assert summary["epochs"] == 1 and summary["teacher_top1"] is not None


def test_resume_is_bitwise_identical(tmp_path, fm, teacher_ckpt):
    keys = dict(loss="wttm", teacher="cnn_teacher", teacher_checkpoint=teacher_ckpt, deterministic=True,
                augment="crop_flip", lr_schedule="multistep", lr_milestones=[1])
    engine.train(run_cfg(tmp_path, fm, "straight", epochs=2, **keys))
    engine.train(run_cfg(tmp_path, fm, "resumed", epochs=1, **keys))
    engine.train(run_cfg(tmp_path, fm, "resumed", epochs=2, **keys), resume=True)
    straight, resumed = (checkpoint.load(str(tmp_path / n / checkpoint.LAST)) for n in ("straight", "resumed"))
    assert straight["epoch"] == resumed["epoch"] == 2
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert strip(straight["history"]) == strip(resumed["history"])
    assert len(read_csv(tmp_path / "resumed" / logs.CSV_NAME)) == 2


def test_resume_refuses_other_settings_and_reuse_of_out_dir(tmp_path, fm):
    engine.train(run_cfg(tmp_path, fm, "r"))
    with pytest.raises(ConfigError, match="already holds a run"):
        engine.train(run_cfg(tmp_path, fm, "r"))
    with pytest.raises(ConfigError, match="lr: 0.05 -> 0.1"):
        engine.train(run_cfg(tmp_path, fm, "r", lr=0.1, epochs=2), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        engine.train(run_cfg(tmp_path, fm, "never"), resume=True)


def test_sigkill_mid_epoch_then_resume(tmp_path):
    data_dir = write_fashion_mnist(str(tmp_path / "fm"), n_train=2000, n_test=64)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "train", "--config", "train/configs/smoke.yaml", f"data_dir={data_dir}",
            f"out_dir={out}", "train_subset=0", "epochs=3", "batch_size=32", "model=cnn_teacher"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / checkpoint.LAST
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2 (an epoch takes over a second)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert checkpoint.load(str(last))["epoch"] in (1, 2)  # intact, from the last finished epoch
    done = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "Traceback" not in done.stderr
    assert [int(r["epoch"]) for r in read_csv(out / logs.CSV_NAME)] == [1, 2, 3]


def test_torchrun_two_processes_gloo(tmp_path, fm):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
         "--config", "train/configs/smoke.yaml", f"data_dir={fm}", f"out_dir={tmp_path}/ddp", "epochs=2",
         "train_subset=0", "device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # rank 0 reports and writes
    assert "2 process(es)" in proc.stdout
    rows = read_csv(tmp_path / "ddp" / logs.CSV_NAME)
    assert len(rows) == 2
    # Top-1 over the whole test set (256 images, 128 per rank): a multiple of 100/256.
    assert float(rows[-1]["test_top1"]) * 256 / 100 == pytest.approx(round(float(rows[-1]["test_top1"]) * 2.56))


def test_teacher_checkpoint_errors(tmp_path):
    wrong_arch = tmp_path / "student.pt"
    torch.save({"model": build_model("cnn_student", 10, (1, 28, 28)).state_dict()}, wrong_arch)
    teacher = build_model("cnn_teacher", 10, (1, 28, 28))
    with pytest.raises(CheckpointError, match="does not fit the teacher: shape mismatches: features.0.weight"):
        checkpoint.load_weights(teacher, str(wrong_arch), "teacher")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_weights(teacher, str(tmp_path / "none.pt"), "teacher")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.load_weights(teacher, str(tmp_path / "junk.pt"), "teacher")
    # RepDistiller format with DDP prefixes loads.
    sd = {f"module.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"model": sd, "epoch": 240, "accuracy": torch.tensor(75.0)}, tmp_path / "repdistiller.pth")
    checkpoint.load_weights(build_model("cnn_teacher", 10, (1, 28, 28)), str(tmp_path / "repdistiller.pth"), "t")
