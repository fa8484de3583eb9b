"""python -m train teacher-topk (the top-k store) and teacher_topk: DIR in the LM task: round trip, resume after
a kill or Ctrl-C, one writer per store (the run lock), refusal of a mismatched or corrupt store, distillation from
it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train import engine, run_lock, teacher_topk, topk_store
from train.__main__ import main
from train.errors import ConfigError, DataError, RunDirBusyError
from train.models import gpt

from test_train_lm import lm_cfg, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "train/configs/lm_smoke.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A gpt_tiny teacher's checkpoint (random weights: what is checked is the plumbing) and a corpus."""
    folder = tmp_path_factory.mktemp("topk")
    torch.manual_seed(0)
    path = folder / "teacher.pt"
    torch.save({"model": gpt.build("gpt_tiny", 257).state_dict()}, path)
    return {"checkpoint": str(path), "text": write_text(folder / "corpus.txt", n=30), "folder": folder}


def write_store(teacher, out_dir, *extra):
    return main(["teacher-topk", "--config", SMOKE, f"data_dir={teacher['text']}", f"out_dir={out_dir}",
                 "teacher=gpt_tiny", f"teacher_checkpoint={teacher['checkpoint']}", "k=8", "windows_per_shard=7",
                 "progress=false", *extra])


def training_windows(teacher):
    from train.tasks import LanguageModelTask

    cfg = lm_cfg(teacher["folder"], teacher["text"], "unused")
    return LanguageModelTask(cfg, torch.device("cpu")).build_data(0, 1).train


def expected_topk(teacher, k=8):
    """The teacher's top-k over the training windows, recomputed directly."""
    inputs = training_windows(teacher).inputs
    model = gpt.build("gpt_tiny", 257)
    model.load_state_dict(torch.load(teacher["checkpoint"])["model"])
    with torch.no_grad():
        logits = model.lm_head(model(inputs)).float()
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return inputs, top.indices.int(), top.values


def test_teacher_topk_store_round_trip(teacher, tmp_path, capsys):
    assert write_store(teacher, tmp_path / "store") == 0
    estimates = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher top-k: about ")]
    assert len(estimates) == 1 and estimates[0].endswith(" on this machine (measured over the first 2 batches)")
    store = topk_store.TopkStore(str(tmp_path / "store"))
    inputs, ids, logprobs = expected_topk(teacher)
    m = store.manifest
    assert m["complete"] and m["k"] == 8 and m["vocab"] == 257 and m["seq_len"] == 32
    assert m["windows"] == len(inputs) and m["tokens"] == inputs.numel() and len(m["shards"]) == -(-len(inputs) // 7)
    assert m["corpus"] == topk_store.corpus_fingerprint(inputs)
    windows = torch.tensor([len(inputs) - 1, 0, 7, 6, 13])  # across shards, in any order
    got_ids, got_logprobs = store.read(windows)
    assert torch.equal(got_ids, ids[windows])
    torch.testing.assert_close(got_logprobs, logprobs[windows], rtol=0, atol=1e-6)
    assert write_store(teacher, tmp_path / "store") == 0  # complete: nothing to do


def test_teacher_topk_resumes_after_a_kill(teacher, tmp_path, monkeypatch, capsys):
    """A writer stopped by Ctrl-C inside its third shard (a partial temporary file left, as a kill leaves it) says
    where a rerun resumes, which goes on after the second shard and ends with the same store as an uninterrupted
    one."""
    real_save, calls = np.save, []

    def dying_save(f, array):
        calls.append(1)
        if len(calls) == 5:  # the ids of the third shard
            f.write(b"partial")
            raise KeyboardInterrupt
        real_save(f, array)

    monkeypatch.setattr(np, "save", dying_save)
    assert write_store(teacher, tmp_path / "store") == 130
    monkeypatch.setattr(np, "save", real_save)
    manifest = json.loads((tmp_path / "store" / topk_store.MANIFEST).read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert capsys.readouterr().err == (f"interrupted: rerun the same command to resume from window 14 of "
                                       f"{manifest['windows']} of the store: the complete shards in "
                                       f"{tmp_path / 'store'} are kept\n")
    assert (tmp_path / "store" / "ids-00002.npy.tmp").exists()
    with pytest.raises(ConfigError, match="incomplete"):
        topk_store.TopkStore(str(tmp_path / "store"))
    assert write_store(teacher, tmp_path / "store") == 0
    assert write_store(teacher, tmp_path / "fresh") == 0
    resumed = json.loads((tmp_path / "store" / topk_store.MANIFEST).read_text())
    fresh = json.loads((tmp_path / "fresh" / topk_store.MANIFEST).read_text())
    assert resumed["shards"] == fresh["shards"] and resumed["complete"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "store"))


def test_a_second_writer_is_refused_and_the_first_ones_store_stays_whole(teacher, store, tmp_path, capsys):
    """The first writer holds the store's run lock, here blocked while it writes its second shard; a second writer
    on the same out_dir is refused before it touches anything (it would delete the first one's temporary files),
    naming the first; SIGTERM stops the first with its one line, and the rerun it advises completes the store."""
    script, ready, out = tmp_path / "writer.py", tmp_path / "ready", tmp_path / "store"
    script.write_text(f"""
import sys, time
import numpy as np
sys.path.insert(0, {ROOT!r})
from train.__main__ import main

real_save, calls = np.save, []

def blocking_save(f, array):
    calls.append(1)
    real_save(f, array)
    if len(calls) == 3:  # the second shard's ids, written to their temporary file
        open({str(ready)!r}, "w").close()
        while True:
            time.sleep(0.01)

np.save = blocking_save
sys.exit(main(sys.argv[1:]))
""")
    args = ["teacher-topk", "--config", SMOKE, f"data_dir={teacher['text']}", f"out_dir={out}", "teacher=gpt_tiny",
            f"teacher_checkpoint={teacher['checkpoint']}", "k=8", "windows_per_shard=7", "progress=false"]
    first = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready.exists(), first.stderr.read()
        files = sorted(os.listdir(out))
        assert "ids-00001.npy.tmp" in files
        assert main(args) == 2
        assert capsys.readouterr().err == (f"error: out_dir {out} is in use by another run (PID {first.pid} on "
                                           f"{socket.gethostname()}): wait for it to end, or choose another out_dir\n")
        assert sorted(os.listdir(out)) == files  # nothing deleted, nothing written
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=60)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130
    windows = topk_store.TopkStore(store).manifest["windows"]
    assert err == (f"interrupted: rerun the same command to resume from window 7 of {windows} of the store: the "
                   f"complete shards in {out} are kept\n")
    assert main(args) == 0
    assert topk_store.TopkStore(str(out)).manifest["shards"] == topk_store.TopkStore(store).manifest["shards"]


def test_write_store_holds_the_run_lock(teacher, tmp_path):
    """The writer the demo calls (write_store) takes the lock itself, before it touches the folder."""
    cfg = lm_cfg(tmp_path, teacher["text"], "store", teacher="gpt_tiny", teacher_checkpoint=teacher["checkpoint"])
    with run_lock.hold(cfg["out_dir"]):
        with pytest.raises(RunDirBusyError, match=f"PID {os.getpid()} on"):
            teacher_topk.write_store(cfg, {"k": 8, "logprobs_dtype": "float32", "windows_per_shard": 7})
        assert os.listdir(cfg["out_dir"]) == [run_lock.LOCK_NAME]


def test_teacher_topk_refuses_another_store_in_out_dir(teacher, tmp_path, capsys):
    assert write_store(teacher, tmp_path / "store") == 0
    assert write_store(teacher, tmp_path / "store", "k=4") == 2
    assert "other k" in capsys.readouterr().err
    assert main(["teacher-topk", "--config", SMOKE, "k=4"]) == 2
    assert "out_dir" in capsys.readouterr().err


@pytest.fixture(scope="module")
def store(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    assert write_store(teacher, path) == 0
    return str(path)


def test_lm_distils_from_a_topk_store(teacher, store, tmp_path):
    summary = engine.train(lm_cfg(tmp_path, teacher["text"], "student", loss="wttm", teacher_topk=store,
                                  topk_tail="renormalize", epochs=1))
    assert summary["loss_backend"] == "cpu" and 1 < summary["best_ppl"] < 1e4


@pytest.mark.parametrize("change,match", [
    ({"seq_len": 16}, "seq_len 32, the run 16"),
    ({"test_fraction": 0.2}, "another corpus"),
])
def test_lm_refuses_a_mismatched_store(teacher, store, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        engine.train(lm_cfg(tmp_path, teacher["text"], "student", loss="wttm", teacher_topk=store, **change))


def test_lm_refuses_a_store_of_another_vocabulary(teacher, store, tmp_path):
    copy = tmp_path / "store"
    os.makedirs(copy)
    for name in os.listdir(store):
        (copy / name).write_bytes(open(os.path.join(store, name), "rb").read())
    manifest = json.loads((copy / topk_store.MANIFEST).read_text())
    manifest["vocab"] = 50257
    (copy / topk_store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="vocabulary of 50257"):
        engine.train(lm_cfg(tmp_path, teacher["text"], "student", loss="wttm", teacher_topk=str(copy)))


def test_lm_names_a_corrupt_shard(teacher, store, tmp_path, capsys):
    copy = tmp_path / "store"
    os.makedirs(copy)
    for name in os.listdir(store):
        (copy / name).write_bytes(open(os.path.join(store, name), "rb").read())
    data = bytearray((copy / "logprobs-00001.npy").read_bytes())
    data[-3] ^= 0x40
    (copy / "logprobs-00001.npy").write_bytes(bytes(data))
    assert main(["--config", SMOKE, f"data_dir={teacher['text']}", f"out_dir={tmp_path / 'run'}", "seq_len=32",
                 "loss=wttm", f"teacher_topk={copy}", "tensorboard=false"]) == 2
    err = capsys.readouterr().err
    assert "logprobs-00001.npy is corrupt" in err and err.startswith("error:")
    with pytest.raises(DataError, match="logprobs-00001.npy"):
        topk_store.TopkStore(str(copy))


def test_config_teacher_topk_needs_a_distillation_loss(tmp_path):
    with pytest.raises(ConfigError, match="teacher_topk"):
        lm_cfg(tmp_path, "x", "run", teacher_topk="somewhere")  # loss ce


def served_jsonl(teacher, path, seq_len=32):
    """The teacher's output for the corpus as a served teacher returns it: one JSON line per file, top-8
    {id: logprob} per position, scored with the training windows' context (seq_len tokens from 0)."""
    model = gpt.build("gpt_tiny", 257)
    model.load_state_dict(torch.load(teacher["checkpoint"])["model"])
    tokens = list(open(teacher["text"], "rb").read())
    with torch.no_grad():
        logits = torch.cat([model.lm_head(model(torch.tensor([tokens[i:i + seq_len]])))[0]
                            for i in range(0, len(tokens), seq_len)])
    top = torch.log_softmax(logits.float(), -1).topk(8, -1)
    entries = [{str(i): lp for i, lp in zip(ids, lps)} for ids, lps in zip(top.indices.tolist(), top.values.tolist())]
    path.write_text(json.dumps({"token_ids": tokens, "top_logprobs": entries[:-1]}) + "\n")
    return path


def test_teacher_topk_imports_a_served_teacher(teacher, store, tmp_path):
    """The JSON lines of a served teacher give the store the teacher itself writes (up to the log-probabilities'
    rounding through JSON's decimal floats); a file of another text is refused."""
    jsonl = served_jsonl(teacher, tmp_path / "served.jsonl")
    assert write_store(teacher, tmp_path / "imported", f"import={jsonl}") == 0
    imported, written = topk_store.TopkStore(str(tmp_path / "imported")), topk_store.TopkStore(store)
    assert imported.manifest["corpus"] == written.manifest["corpus"]
    windows = torch.arange(imported.manifest["windows"])
    (ids, logprobs), (ids_w, logprobs_w) = imported.read(windows), written.read(windows)
    counts = training_windows(teacher).targets != -100  # past the text's end the import pads with -1
    assert (ids[counts] >= 0).all() and torch.equal(ids[counts], ids_w[counts])
    torch.testing.assert_close(logprobs[counts], logprobs_w[counts], rtol=0, atol=1e-6)

    jsonl.write_text(jsonl.read_text().replace('"token_ids": [', '"token_ids": [116, '))
    assert write_store(teacher, tmp_path / "bad", f"import={jsonl}") == 2


def test_teacher_topk_import_follows_the_split_and_the_subset(teacher, tmp_path):
    """val_fraction cuts each file's training part short and train_subset keeps a random choice of its windows:
    the import takes the same windows of the served output as the teacher itself writes."""
    from train.tasks import LanguageModelTask

    jsonl = served_jsonl(teacher, tmp_path / "served.jsonl")
    split = ("val_fraction=0.2", "train_subset=5")
    assert write_store(teacher, tmp_path / "written", *split) == 0
    assert write_store(teacher, tmp_path / "imported", f"import={jsonl}", *split) == 0
    imported, written = (topk_store.TopkStore(str(tmp_path / name)) for name in ("imported", "written"))
    assert imported.manifest["corpus"] == written.manifest["corpus"] and imported.manifest["windows"] == 5
    (ids, logprobs), (ids_w, logprobs_w) = imported.read(torch.arange(5)), written.read(torch.arange(5))
    cfg = lm_cfg(teacher["folder"], teacher["text"], "unused", val_fraction=0.2, train_subset=5)
    counts = LanguageModelTask(cfg, torch.device("cpu")).build_data(0, 1).train.targets != -100
    assert counts.sum() > 0 and (ids[counts] >= 0).all() and torch.equal(ids[counts], ids_w[counts])
    torch.testing.assert_close(logprobs[counts], logprobs_w[counts], rtol=0, atol=1e-6)
