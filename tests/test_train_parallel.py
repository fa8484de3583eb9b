"""Task lm under torchrun with ``parallel`` ddp, fsdp and tp (2 gloo processes on the CPU) against one process:
the same losses and final weights, within the tolerances below; the fsdp and tp runs are resumed half-way.

Tolerances: the logged losses (rounded to 5 decimals) within 2e-5; the weights within 1e-4 after 4 AdamW steps
at lr 1e-3. The modes sum in other orders, and AdamW turns float noise in gradients that are zero in exact
arithmetic (the attention's key bias) into steps of up to lr * noise / eps: 1.1e-5 (ddp, fsdp) and 2.0e-5 (tp)
were measured.
"""
import os
import subprocess
import sys

import pytest
import torch

from train import checkpoint, config, engine
from train.errors import ConfigError
from train.models import gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [b"the cat sat on the mat. ", b"a dog ran to the park! ", b"we distil a small model. ",
             b"teachers know more tokens. "]
# 570 bytes: 513 train tokens = 16 whole windows of 32 (2 global batches of 8, the same tokens on either rank
# under ddp and fsdp, whose gradients are means of per-rank means), 57 held out.
TEXT_BYTES = 570
LOSS_TOL, WEIGHT_TOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    gen = torch.Generator().manual_seed(0)
    text = b"".join(SENTENCES[i] for i in torch.randint(0, len(SENTENCES), (60,), generator=gen).tolist())
    (folder / "corpus.txt").write_bytes(text[:TEXT_BYTES])
    torch.manual_seed(3)
    torch.save({"model": gpt.build("gpt_tiny", 257).state_dict()}, folder / "teacher.pt")
    return folder


def keys(folder, name, **extra):
    values = dict(data_dir=folder / "corpus.txt", out_dir=folder / name, tensorboard="false", device="cpu",
                  loss="wttm", teacher="gpt_tiny", teacher_checkpoint=folder / "teacher.pt", seq_len=32,
                  batch_size=8, epochs=2)
    return [f"{k}={v}" for k, v in {**values, **extra}.items()]


def torchrun(folder, name, *args):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "train", "--config", "train/configs/lm_smoke.yaml", *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def one_process(run_files):
    engine.train(config.load("train/configs/lm_smoke.yaml", keys(run_files, "one")))
    return checkpoint.load(str(run_files / "one" / checkpoint.LAST))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "tp"])
def test_train_parallel_matches_one_process(run_files, one_process, mode):
    if mode == "ddp":
        out = torchrun(run_files, mode, *keys(run_files, mode, parallel=mode))
    else:  # sharded checkpoints: resumed half-way
        torchrun(run_files, mode, *keys(run_files, mode, parallel=mode, epochs=1))
        out = torchrun(run_files, mode, *keys(run_files, mode, parallel=mode), "--resume")
        assert "resumed from" in out
    assert f"2 process(es) ({mode})" in out
    state = checkpoint.load(str(run_files / mode / checkpoint.LAST))
    for ours, theirs in zip(state["history"], one_process["history"], strict=True):
        for key in ("train_loss", "train_kl", "test_loss"):
            assert abs(ours[key] - theirs[key]) <= LOSS_TOL, (key, ours[key], theirs[key])
    assert state["model"].keys() == one_process["model"].keys()
    for name, weight in one_process["model"].items():
        assert state["model"][name].shape == weight.shape, name  # whole tensors, whatever the mode
        torch.testing.assert_close(state["model"][name], weight, rtol=0, atol=WEIGHT_TOL, msg=name)


@pytest.mark.parametrize("extra,match", [
    (dict(parallel="fsdp"), "parallel 'fsdp' is for task lm"),
    (dict(parallel="tp", task="lm", dataset="text", optimizer="adamw", vocab_mismatch="truncate_teacher"),
     "needs one vocabulary"),
    (dict(parallel="fsdp", task="lm", dataset="text", optimizer="sgd"), "trains with optimizer adamw"),
], ids=["fsdp-classification", "tp-vocab-mismatch", "fsdp-sgd"])
def test_train_parallel_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, [f"{k}={v}" for k, v in extra.items()])
