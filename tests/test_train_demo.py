"""The demos' machinery on tiny synthetic data (never the full-length demos): results.json and what is made from
it, the teacher cache (reuse, config and data fingerprints), hyper-parameter selection on the validation split,
Ctrl-C and the rerun that goes on, and the LM demo's cached BPE vocabulary."""
import glob
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from train import checkpoint, config, demo, engine, text_data
from train.__main__ import main
from train.errors import ConfigError, Interrupted
from train.tasks import ClassificationTask
from train.testing import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEEDS = [0, 1, 2]
IMAGE_PLAN = f"""
title: tiny image demo
seeds: {SEEDS}
common: {{dataset: fashion_mnist, epochs: 1, batch_size: 64, threads: 1, tensorboard: false, val_fraction: 0.25}}
teacher: {{model: cnn_student, loss: ce, progress: false}}
students:
  ce: {{model: cnn_tiny, loss: ce}}
  wttm: {{model: cnn_tiny, loss: wttm, gamma: 0.5, beta: 1.0}}
select:
  seeds: [0]
  grid:
    wttm: {{gamma: [0.2, 0.5], beta: [1.0]}}
"""


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TTM_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fm(tmp_path):
    return write_fashion_mnist(str(tmp_path / "fm"), n_train=512, n_test=256)


def write_plan(tmp_path, text, name="plan.yaml"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def run_demo(tmp_path, plan, name, *args, command="demo"):
    assert main([command, "--plan", plan, "--out-dir", str(tmp_path / name), "--jobs", "1", *args]) == 0
    with open(tmp_path / name / demo.RESULTS) as f:
        return json.load(f)


def test_demo_results_json_table_and_plot(tmp_path, fm, capsys):
    results = run_demo(tmp_path, write_plan(tmp_path, IMAGE_PLAN), "out", f"data_dir={fm}")
    out = capsys.readouterr().out
    assert "training once" in out and "reusing" not in out
    assert results["metric"] == "test_top1" and results["higher_is_better"] is True
    assert 0 <= results["teacher"]["test_top1"] <= 100 and results["teacher"]["cached"] is False
    assert [r["name"] for r in results["runs"]] == ["CE only", "WTTM"]
    ce, wttm = results["runs"]
    assert (ce["loss"], ce["hyperparameters"]) == ("ce", {})
    assert (wttm["loss"], wttm["hyperparameters"]) == ("wttm", {"gamma": 0.5, "beta": 1.0, "ce_weight": 1.0})
    for run in results["runs"]:
        assert run["seeds"] == SEEDS and len(run["values"]) == 3
        assert run["mean"] == pytest.approx(statistics.fmean(run["values"]))
        assert run["std"] == pytest.approx(statistics.stdev(run["values"]))
        for folder, value in zip(run["out_dirs"], run["values"]):  # each value is its run's last epoch
            assert json.loads(open(os.path.join(folder, engine.SUMMARY_NAME)).read())["last_top1"] == value
    table = (tmp_path / "out" / demo.TABLE).read_text()
    assert table.count("| run ") == 1 and f"{wttm['mean']:.2f} +- {wttm['std']:.2f}" in table
    assert f"{wttm['mean'] - ce['mean']:+.2f}" in table and "seeds 0, 1, 2" in table
    assert (tmp_path / "out" / demo.PLOT).stat().st_size > 10_000

    # The table and the plot are made from results.json: --report remakes them from an edited copy.
    results["runs"][1].update(mean=12.345, std=0.5)
    (tmp_path / "out" / demo.RESULTS).write_text(json.dumps(results))
    os.remove(tmp_path / "out" / demo.PLOT)
    assert main(["demo", "--report", str(tmp_path / "out")]) == 0
    assert "12.35 +- 0.50" in capsys.readouterr().out and (tmp_path / "out" / demo.PLOT).is_file()


ONE_RUN_PLAN = """
seeds: [0]
common: {dataset: fashion_mnist, epochs: 1, batch_size: 64, threads: 1, tensorboard: false, val_fraction: 0.25}
teacher: {model: cnn_student, loss: ce, progress: false}
students:
  kd: {model: cnn_tiny, loss: kd}
"""


def test_teacher_cache_reuse_and_fingerprints(tmp_path, fm, cache_dir, capsys, monkeypatch):
    plan = write_plan(tmp_path, ONE_RUN_PLAN)
    first = run_demo(tmp_path, plan, "first", f"data_dir={fm}")
    folder = first["teacher"]["path"]
    assert folder.startswith(str(cache_dir)) and "training once" in capsys.readouterr().out
    stamp = os.stat(os.path.join(folder, checkpoint.LAST)).st_mtime_ns

    again = run_demo(tmp_path, plan, "again", f"data_dir={fm}", "threads=1")  # threads: not in the key
    out = capsys.readouterr().out
    assert f"reusing the cached run {folder}" in out and "measured now (when trained:" in out
    assert os.stat(os.path.join(folder, checkpoint.LAST)).st_mtime_ns == stamp  # not retrained
    assert again["teacher"]["cached"] is True and again["teacher"]["path"] == folder
    assert again["teacher"]["test_top1"] == first["teacher"]["test_top1"]  # measured again, same weights and data
    assert "cached" in (tmp_path / "again" / demo.TABLE).read_text()
    # A config key that a later version adds, at its default: the same teacher.
    monkeypatch.setitem(config.KEYS, "added_later", config.Key(0, int, "a key a later version adds"))
    assert run_demo(tmp_path, plan, "upgraded", f"data_dir={fm}")["teacher"]["path"] == folder

    other_data = write_fashion_mnist(str(tmp_path / "fm2"), n_train=512, n_test=256, gz=False)  # same images, raw
    assert run_demo(tmp_path, plan, "raw", f"data_dir={other_data}")["teacher"]["path"] != folder
    changed = write_fashion_mnist(str(tmp_path / "fm3"), n_train=520, n_test=256)
    assert run_demo(tmp_path, plan, "changed", f"data_dir={changed}")["teacher"]["path"] != folder
    longer = write_plan(tmp_path, ONE_RUN_PLAN.replace("ce, progress", "ce, epochs: 2, progress"), "p2.yaml")
    assert run_demo(tmp_path, longer, "longer", f"data_dir={fm}")["teacher"]["path"] != folder
    assert capsys.readouterr().out.count("training once") == 3


def test_interrupted_teacher_is_resumed(tmp_path, fm, capsys):
    plan = write_plan(tmp_path, ONE_RUN_PLAN)
    cfg = demo.cached_teacher_config(demo.read_plan(plan), [f"data_dir={fm}"], "demo")
    engine.train({**cfg, "epochs": 1})  # as if stopped before writing its summary: no summary.json
    os.remove(os.path.join(cfg["out_dir"], engine.SUMMARY_NAME))
    run_demo(tmp_path, plan, "out", f"data_dir={fm}")
    assert "resuming the interrupted" in capsys.readouterr().out


def test_ctrl_c_in_the_teacher_then_the_same_command_goes_on_inside_its_epoch(tmp_path, fm, monkeypatch, capsys):
    """Ctrl-C while the teacher trains: one line naming the teacher's checkpoint inside its epoch; the same command
    resumes the teacher from it (not from its start) and finishes the demo, with a time estimate for the teacher and
    one for the students. The checkpoint keys leave the teacher's cache key as it is."""
    plan = write_plan(tmp_path, ONE_RUN_PLAN)
    keys = [f"data_dir={fm}", "log_every=1", "checkpoint_every_min=1e-7"]  # a checkpoint after each step
    folder = demo.cached_teacher_config(demo.read_plan(plan), keys, "demo")["out_dir"]
    assert folder == demo.cached_teacher_config(demo.read_plan(plan), keys[:1], "demo")["out_dir"]
    real_step, calls = ClassificationTask.train_step, itertools.count()

    def interrupted_step(self, *args):
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(ClassificationTask, "train_step", interrupted_step)
    args = ["demo", "--plan", plan, "--out-dir", str(tmp_path / "out"), "--jobs", "1", *keys]
    assert main(args) == 130
    last = os.path.join(folder, checkpoint.LAST)
    assert capsys.readouterr().err == (f"interrupted: rerun the same command to resume from the teacher at epoch 1, "
                                       f"step 3 of 6 ({last}); the student runs have not started\n")
    monkeypatch.setattr(ClassificationTask, "train_step", real_step)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming the interrupted" in out and f"resumed from {last} at epoch 1, step 3 of 6" in out
    assert out.count("teacher: about ") == 1 and out.count("students: about ") == 1


def test_ctrl_c_while_the_top_k_store_is_written(tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_store", stopped)
    job = demo.Job("KD top-4", 0, {"teacher_topk": str(tmp_path / "store")}, top_k=4)
    with pytest.raises(Interrupted) as exc:
        demo.ensure_topk_store(job, {"model": "gpt_tiny", "out_dir": str(tmp_path)})
    assert str(exc.value) == (f"rerun the same command to resume from the start of the teacher's top-4 store (nothing "
                              f"was written to {tmp_path / 'store'} yet)")


TWO_WORKERS_PLAN = """
seeds: [0, 1]
common: {dataset: fashion_mnist, epochs: 3, batch_size: 64, threads: 1, tensorboard: false, val_fraction: 0.25}
teacher: {model: cnn_tiny, loss: ce, epochs: 1, progress: false}
students:
  ce: {model: cnn_tiny, loss: ce}
"""


def children(pid):
    kids = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/children") as f:
            kids += [int(kid) for kid in f.read().split()]
    return kids


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_the_demo_and_its_worker_processes(tmp_path, fm):
    """Ctrl-C in a terminal signals the whole process group: while two student runs train in worker processes, the
    demo prints one line (the workers nothing: no traceback), exits with 130 and leaves no process behind; the
    command goes on in the same folder and finishes."""
    out = tmp_path / "out"
    plan = write_plan(tmp_path, TWO_WORKERS_PLAN)

    def command(jobs):
        return ["demo", "--plan", plan, "--out-dir", str(out), "--jobs", str(jobs), f"data_dir={fm}"]

    proc = subprocess.Popen([sys.executable, "-m", "train", *command(2)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(glob.glob(str(out / "*" / "log.txt"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        workers = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert len(workers) >= 2 and err.count("interrupted:") == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"interrupted: rerun the same command to resume from {out}: ")
    deadline = time.time() + 20
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if running(pid)]
    assert (out / demo.INTERRUPTED).exists()

    assert main(command(jobs=1)) == 0  # in this process: no workers to start again (they take seconds to import torch)
    results = json.loads((out / demo.RESULTS).read_text())
    assert results["runs"][0]["seeds"] == [0, 1] and None not in results["runs"][0]["values"]
    assert not (out / demo.INTERRUPTED).exists()


def test_select_runs_the_grid_on_the_validation_split(tmp_path, fm, capsys):
    plan = write_plan(tmp_path, IMAGE_PLAN)
    assert main(["demo", "--plan", plan, "--select", "--out-dir", str(tmp_path / "sel"), "--jobs", "2",
                 f"data_dir={fm}"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "sel" / demo.RESULTS).read_text())
    assert results["metric"] == "val_top1" and results["seeds"] == [0]
    assert [r["name"] for r in results["runs"]] == ["CE only", "WTTM gamma=0.2 beta=1", "WTTM gamma=0.5 beta=1"]
    summary = json.loads(open(os.path.join(results["runs"][1]["out_dirs"][0], engine.SUMMARY_NAME)).read())
    assert summary["train_images"] == 384 and summary["test_images"] == 128  # evaluated on the 25% held out
    best = max(results["runs"][1:], key=lambda r: r["mean"])
    assert f"  wttm: {{gamma: {best['hyperparameters']['gamma']:g}, beta: 1, ce_weight: 1}}" in out


def test_out_dir_that_holds_anything_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.json").write_text("{}")
    assert main(["demo", "--out-dir", str(tmp_path / "o")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cache")  # no teacher, no data read


@pytest.mark.parametrize("text, message", [
    ("common: {}\nteacher: {}\nstudents: {}\n", "needs 'seeds', a list of integers"),
    ("seeds: [0]\ncommon: {}\nteacher: {}\n", "needs a mapping 'students'"),
    ("seeds: [0]\ncommon: {}\nteacher: {model: cnn_teacher}\nstudents: {ce: {}}\n", "--select needs a 'select'"),
    ("seeds: [0]\ncommon: {}\nteacher: {}\nstudents: {ce: {}}\nselect: {seeds: [0], grid: {kd: {beta: [1]}}}\n",
     "select grid 'kd' must name a student"),
    ("seeds: [0]\ncommon: {}\nteacher: {}\nstudents: {ce: {}}\nselect: {grid: {}}\n", "'select' needs 'seeds'"),
    ("seeds: [0]\ncommon: {}\nteacher: {}\nstudents: {kd: {teacher_topk_k: 0}}\n",
     "student 'kd': teacher_topk_k must be an integer >= 1"),
], ids=["no-seeds", "no-students", "no-select", "grid-of-no-student", "select-without-seeds", "topk-k-zero"])
def test_bad_plans_are_one_error_line(tmp_path, capsys, text, message):
    assert main(["demo", "--plan", write_plan(tmp_path, text), "--select", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------- LM demo

WORDS = ["def", "return", "self", "import", "class", "value", "None", "for", "in", "if", "else", "print", "(", ")",
         ":", "=", "+", "x", "y", "items", "append", "#", "é"]


def write_code(folder, files=3, words=1500, seed=0):
    """Files of pseudo-code (a fixed vocabulary of words in random order, some non-ASCII)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(files):
        picks = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
        text = " ".join(WORDS[p] + ("\n" if j % 12 == 11 else "") for j, p in enumerate(picks))
        with open(os.path.join(folder, f"m{i}.py"), "w", encoding="utf-8") as f:
            f.write(text)
    return str(folder)


LM_PLAN = """
title: tiny LM demo
seeds: [0, 1, 2]
common: {task: lm, dataset: text, tokenizer: bpe, vocab_size: 512, seq_len: 32, val_fraction: 0.1, epochs: 1,
         batch_size: 16, optimizer: adamw, lr: 3.0e-3, threads: 1, tensorboard: false}
teacher: {model: gpt_tiny, loss: ce, progress: false}
students:
  ce: {model: gpt_tiny, loss: ce}
  ttm: {model: gpt_tiny, loss: ttm, gamma: 0.8, beta: 1.0}
  ttm_top16: {model: gpt_tiny, loss: ttm, gamma: 0.8, beta: 1.0, teacher_topk_k: 16}
"""


def test_lm_demo_with_a_cached_bpe_vocabulary(tmp_path, cache_dir, capsys):
    code = write_code(tmp_path / "code")
    results = run_demo(tmp_path, write_plan(tmp_path, LM_PLAN), "lm", f"data_dir={code}", command="demo-lm")
    assert results["metric"] == "heldout_ppl" and results["higher_is_better"] is False
    assert 1 < results["teacher"]["heldout_ppl"] < 512
    teacher = results["teacher"]
    assert teacher["heldout_ce"] == pytest.approx(torch.tensor(teacher["heldout_ppl"]).log().item())
    for run in results["runs"]:
        assert run["seeds"] == [0, 1, 2] and all(1 < v < 512 for v in run["values"])
        assert run["std"] == pytest.approx(statistics.stdev(run["values"]))
        assert all(v == pytest.approx(torch.tensor(ce).exp().item(), rel=1e-4)
                   for v, ce in zip(run["values"], run["heldout_ce"]))
    out = capsys.readouterr().out
    assert "training a BPE vocabulary of 512 tokens on 3 files" in out
    # The sparse student: the cached teacher's top-16 store, written once for its three seeds.
    sparse = results["runs"][2]
    assert sparse["name"] == "TTM top-16" and sparse["hyperparameters"]["teacher_top_k"] == 16
    assert out.count("== teacher top-16 store") == 1 and out.count("wrote ") == 1
    assert len(os.listdir(cache_dir / "tokenizers")) == 2  # the vocabulary and its lock
    # Every run keeps the vocabulary its ids mean, beside its checkpoints.
    vocabulary = open(os.path.join(results["teacher"]["path"], text_data.TOKENIZER_FILE)).read()
    assert open(os.path.join(results["runs"][1]["out_dirs"][0], text_data.TOKENIZER_FILE)).read() == vocabulary


def test_bpe_vocabulary_and_encoding_are_cached_by_corpus_and_size(tmp_path, monkeypatch):
    from train import config

    def corpus_of(folder, **keys):
        cfg = config.load(None, ["task=lm", "dataset=text", f"data_dir={folder}", "tokenizer=bpe"]
                          + [f"{k}={v}" for k, v in keys.items()])
        return text_data.read_corpus(cfg)

    corpus = corpus_of(write_code(tmp_path / "a"))
    tokenizer = text_data.bpe_tokenizer(corpus, 600)
    assert 300 < tokenizer.vocab_size <= 600 and tokenizer.pad_id is not None
    ids = text_data.encode_corpus(tokenizer, corpus)
    assert [len(ids[s]) for s in text_data.SPLITS] == [3, 3, 3]
    text = b"".join(corpus.parts["train"][:1]).decode()
    assert tokenizer.tokenizer.decode(ids["train"][0].tolist()) == text  # byte-level: lossless

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(text_data.BPETokenizer, "train", refuse)
    monkeypatch.setattr(text_data.BPETokenizer, "encode", refuse)
    again = text_data.bpe_tokenizer(corpus_of(tmp_path / "a"), 600)
    assert again.path == tokenizer.path and again.fingerprint == tokenizer.fingerprint
    cached = text_data.encode_corpus(again, corpus)
    assert all(torch.equal(a, b) for s in text_data.SPLITS for a, b in zip(cached[s], ids[s]))
    for other in (corpus_of(write_code(tmp_path / "b", seed=1)), corpus_of(tmp_path / "a", test_fraction=0.2)):
        with pytest.raises(AssertionError, match="recomputed"):  # another corpus or split: another vocabulary
            text_data.bpe_tokenizer(other, 600)
    with pytest.raises(AssertionError, match="recomputed"):
        text_data.bpe_tokenizer(corpus, 700)


def test_teacher_trained_with_another_vocabulary_is_refused(tmp_path):
    from train import config

    code = write_code(tmp_path / "code")
    keys = ["task=lm", "dataset=text", f"data_dir={code}", "tokenizer=bpe", "vocab_size=512", "seq_len=32",
            "epochs=1", "batch_size=16", "threads=1", "tensorboard=false", "progress=false"]
    engine.train(config.load(None, keys + ["model=gpt_tiny", f"out_dir={tmp_path / 't'}"]))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.replace(tmp_path / "t" / checkpoint.LAST, moved / checkpoint.LAST)  # without its tokenizer.json
    student = keys + ["model=gpt_tiny", "loss=wttm", "teacher=gpt_tiny", f"out_dir={tmp_path / 's'}"]
    with pytest.raises(ConfigError, match="not trained with the student's BPE vocabulary .*missing"):
        engine.train(config.load(None, student + [f"teacher_checkpoint={moved / checkpoint.LAST}"]))
    (moved / text_data.TOKENIZER_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="another vocabulary"):
        engine.train(config.load(None, student + [f"teacher_checkpoint={moved / checkpoint.LAST}"]))


def test_students_option_keeps_only_the_named_students(tmp_path, capsys):
    """--students runs a part of the plan (e.g. one grid of --select); a name the plan lacks is one error line."""
    plan = demo.read_plan("train/configs/demo_lm.yaml")
    part = demo.only_students(plan, "wttm_vocab,ce")
    assert list(part["students"]) == ["wttm_vocab", "ce"] and part["select"] == plan["select"]
    assert len(plan["students"]) > 2  # the plan itself is left whole
    assert main(["demo-lm", "--students", "wttm,nosuch", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --students: 'nosuch' not in the plan's students") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "cache")  # no teacher, no data read


def test_select_reports_the_best_point_per_loss_and_weight_norm():
    """WTTM with weight_norm=vocab is its own candidate set: its best point is not compared with the paper's U."""
    def run(loss, mean, **hyper):
        return {"loss": loss, "mean": mean, "std": 1.0, "values": [mean], "hyperparameters": hyper}
    results = {"higher_is_better": False, "metric": "validation perplexity", "runs": [
        run("wttm", 180.0, gamma=0.8, beta=0.5), run("wttm", 170.0, gamma=0.9, beta=2.0),
        run("wttm", 150.0, gamma=0.5, beta=8.0, weight_norm="vocab"),
        run("wttm", 160.0, gamma=0.2, beta=32.0, weight_norm="vocab")]}
    lines = demo.best_points(results).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  wttm: {gamma: 0.9, beta: 2}")
    assert lines[1].startswith("  wttm: {gamma: 0.5, beta: 8, weight_norm: vocab}")
