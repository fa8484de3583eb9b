"""Config files, key=value overrides and the command line: bad input gives one clear error."""
import gzip
import os
import re
import shutil

import pytest
import torch

from train import checkpoint, config
from train.__main__ import main
from train.errors import ConfigError
from train.models import build_model
from train.testing import write_cifar100, write_fashion_mnist


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} = " in out for name in config.KEYS)
    assert "lr_milestones = [150, 180, 210]" in out


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: cnn_teacher\nepochs: 3\nlr_milestones: [1, 2]\n")
    cfg = config.load(str(path), ["epochs=5", "lr=0.1", "loss=ce", "out_dir=2024"])
    assert (cfg["model"], cfg["epochs"], cfg["lr"], cfg["lr_milestones"], cfg["out_dir"]) == (
        "cnn_teacher", 5, 0.1, [1, 2], "2024")


def test_loss_defaults():
    kd = config.load(None, ["loss=kd", "teacher=cnn_teacher", "teacher_checkpoint=t.pt"])
    assert (kd["ce_weight"], kd["beta"], kd["temperature"]) == (0.1, 0.9, 4.0)
    ttm = config.load(None, ["loss=ttm", "teacher=cnn_teacher", "teacher_checkpoint=t.pt"])
    assert (ttm["ce_weight"], ttm["beta"], ttm["gamma"]) == (1.0, 45.0, 0.1)
    assert config.load(None, ["model=ShuffleV1"])["lr"] == 0.01


@pytest.mark.parametrize("overrides, message", [
    (["epochz=3"], "unknown config key 'epochz'"),
    (["epochs=three"], "'epochs' must be int"),
    (["loss=dkd"], "'loss' must be one of"),
    (["loss=wttm"], "loss 'wttm' distils from a teacher"),
    (["deterministic=1"], "'deterministic' must be bool"),
    (["epochs"], "expected key=value"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_unknown_task_is_named():
    from train.tasks import get_task

    assert get_task("classification") and get_task("lm")
    with pytest.raises(ConfigError, match="unknown task 'seq2seq'; known tasks: classification, lm"):
        get_task("seq2seq")


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: cnn_student\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'learning_rate' in {path}"):
        config.load(str(path))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["--config", "train/configs/smoke.yaml", "bogus=1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown config key 'bogus'; run `python -m train --help` "
                                               "for the list of keys")
    assert main(["--config", "train/configs/smoke.yaml", f"data_dir={tmp_path}", f"out_dir={tmp_path}/o"]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and str(tmp_path) in err and "Traceback" not in err


def test_cli_teacher_of_wrong_class_count(tmp_path, capsys):
    """A teacher trained with 10 classes, used where the student is configured for... 10 classes but another
    architecture: the error names the checkpoint, the architecture and what does not fit."""
    import torch

    from train.models import build_model

    folder = write_fashion_mnist(str(tmp_path / "fm"), n_train=64, n_test=32)
    ckpt = tmp_path / "teacher100.pt"
    torch.save({"model": build_model("cnn_teacher", 100, (1, 28, 28)).state_dict()}, ckpt)
    args = ["--config", "train/configs/smoke.yaml", f"data_dir={folder}", f"out_dir={tmp_path}/o", "loss=wttm",
            "teacher=cnn_teacher", f"teacher_checkpoint={ckpt}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}" in err and "teacher 'cnn_teacher' with 10 classes" in err
    assert "classifier.3.weight (100, 256) in the checkpoint vs (10, 256) in the model" in err


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("1e-03", 1e-3), ("+1e-3", 1e-3), ("2e1", 20.0), ("1E+1", 10.0),
    ("1.0e-3", 1e-3), ("1.e-3", 1e-3), (".5e-2", 5e-3), (".001", 1e-3), ("5.", 5.0), ("1_000.5", 1000.5), ("3", 3.0),
], ids=lambda x: str(x))
def test_every_float_notation_is_a_number(tmp_path, text, value):
    """YAML 1.1 reads 1e-3 (no dot, or an unsigned exponent) as a string; the config reads it as YAML 1.2 does."""
    path = tmp_path / "c.yaml"
    path.write_text(f"lr: {text}\n")
    assert config.load(str(path))["lr"] == value
    assert config.load(None, [f"lr={text}"])["lr"] == value


@pytest.mark.parametrize("key, text, message", [
    ("lr", ".nan", "'lr' must be a finite number, got nan"),
    ("lr", ".inf", "'lr' must be a finite number, got inf"),
    ("beta", "-.inf", "'beta' must be a finite number, got -inf"),
    ("weight_decay", ".NaN", "'weight_decay' must be a finite number, got nan"),
    ("temperature", "1e999", "'temperature' must be a finite number, got inf"),
    ("lr", "-1e-3", "'lr' must be > 0, got -0.001"),
    ("lr", "0", "'lr' must be > 0, got 0.0"),
    ("momentum", "-0.9", "'momentum' must be >= 0, got -0.9"),
    ("weight_decay", "-5e-4", "'weight_decay' must be >= 0, got -0.0005"),
    ("log_every", "0", "'log_every' must be >= 1, got 0"),
], ids=lambda x: str(x))
def test_non_finite_and_out_of_range_numbers_are_refused(tmp_path, key, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {text}\n")
    for path_and_overrides in ((str(path), []), (None, [f"{key}={text}"])):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.load(*path_and_overrides)


# User errors of the command line: setup(tmp_path, fashion_mnist_dir, monkeypatch) -> (extra arguments, what the
# error says).
def checkpoint_without_config(tmp_path, fm, monkeypatch):
    (tmp_path / "o").mkdir()
    torch.save({"model": build_model("cnn_student", 10, (1, 28, 28)).state_dict()}, tmp_path / "o" / checkpoint.LAST)
    return ["--resume"], "is not a checkpoint_last.pt of this trainer (it lacks config"


def yaml_syntax_error(tmp_path, fm, monkeypatch):
    (tmp_path / "c.yaml").write_text("model: cnn_student\nlr_milestones: [1, 2\n")
    return ["--config", str(tmp_path / "c.yaml")], f"config file {tmp_path / 'c.yaml'} is not valid YAML at line 3"


def override_syntax_error(tmp_path, fm, monkeypatch):
    return ["lr_milestones=[1,"], "the value of 'lr_milestones' ('[1,') is not valid YAML at line 1, column 4"


def corrupt_file(name, corrupt):
    def setup(tmp_path, fm, monkeypatch):
        shutil.copytree(fm, tmp_path / "data")
        path = tmp_path / "data" / name
        path.write_bytes(corrupt(path.read_bytes()))
        return [f"data_dir={tmp_path / 'data'}"], f"{path}"
    return setup


def corrupt_cifar(tmp_path, fm, monkeypatch):
    root = write_cifar100(str(tmp_path / "c"), n_train=20, n_test=10)
    path = os.path.join(root, "cifar-100-python", "train")
    with open(path, "r+b") as f:
        f.truncate(1000)
    return [f"data_dir={root}", "dataset=cifar100", "model=resnet8", "train_subset=0", "test_subset=0"], (
        f"cannot read the CIFAR-100 pickle {path}")


def out_dir_under_a_file(tmp_path, fm, monkeypatch):
    (tmp_path / "file").write_text("")
    return [f"out_dir={tmp_path / 'file' / 'run'}"], "cannot create or write out_dir"


def unwritable_out_dir(tmp_path, fm, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere but in kernel file systems
        return ["out_dir=/sys/ttm-kernels-test"], "cannot create or write out_dir /sys/ttm-kernels-test"
    (tmp_path / "ro").mkdir(mode=0o500)
    return [f"out_dir={tmp_path / 'ro'}"], f"cannot create or write out_dir {tmp_path / 'ro'}"


def triton_on_cpu(tmp_path, fm, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conftest runs Triton in its CPU interpreter
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("cnn_student", 10, (1, 28, 28)).state_dict()}, teacher)
    return ["device=cpu", "loss=wttm", "teacher=cnn_student", f"teacher_checkpoint={teacher}", "loss_backend=triton"], (
        "loss_backend 'triton' cannot run on cpu")


@pytest.mark.parametrize("setup", [
    checkpoint_without_config, yaml_syntax_error, override_syntax_error,
    corrupt_file("train-images-idx3-ubyte.gz", lambda raw: raw[:len(raw) // 2]),
    corrupt_file("t10k-labels-idx1-ubyte.gz", lambda raw: raw[:10] + bytes(16) + raw[26:]),
    corrupt_file("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(b"\0\0\x08\x01" + bytes(8))),
    corrupt_cifar, out_dir_under_a_file, unwritable_out_dir,
    lambda tmp_path, fm, monkeypatch: (["lr=-0.05"], "config key 'lr' must be > 0, got -0.05"),
    triton_on_cpu,
], ids=["checkpoint_without_config", "yaml_syntax", "override_syntax", "truncated_gzip", "corrupt_gzip",
        "idx_size", "corrupt_cifar", "out_dir_under_a_file", "unwritable_out_dir", "negative_lr", "triton_on_cpu"])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, setup):
    fm = write_fashion_mnist(str(tmp_path / "fm"), n_train=64, n_test=32)
    extra, message = setup(tmp_path, fm, monkeypatch)
    args = ["--config", "train/configs/smoke.yaml", f"data_dir={fm}", f"out_dir={tmp_path / 'o'}", "train_subset=64",
            "test_subset=32"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
