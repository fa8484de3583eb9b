"""Config files, key=value overrides and the command line: bad input gives one clear error."""
import pytest

from train import config
from train.__main__ import main
from train.errors import ConfigError
from train.testing import write_fashion_mnist


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
