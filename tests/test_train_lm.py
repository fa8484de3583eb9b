"""Task lm: causal LMs on local text through the fused linear loss (CPU, tiny models and texts)."""
import csv
import json
import math
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from train import checkpoint, config, engine, logs, text_data
from train.__main__ import main
from train.errors import CheckpointError, ConfigError, DatasetNotFoundError, MissingDependencyError
from train.losses import Objective
from train.models import gpt
from train.tasks import LanguageModelTask
from ttm_kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = text_data.IGNORE_INDEX
SENTENCES = [b"the cat sat on the mat. ", b"a dog ran to the park! ", b"we distil a small model. ",
             b"teachers know more tokens. "]


def write_text(path, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.write_bytes(b"".join(SENTENCES[i] for i in torch.randint(0, len(SENTENCES), (n,), generator=g).tolist()))
    return str(path)


def lm_cfg(tmp_path, text, name, **keys):
    overrides = [f"data_dir={text}", f"out_dir={tmp_path / name}", "tensorboard=false", "seq_len=32",
                 "batch_size=8"] + [f"{k}={v}" for k, v in keys.items()]
    return config.load("train/configs/lm_smoke.yaml", overrides)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "corpus.txt")


def test_windows_pad_and_ignore_prompt_targets():
    x, y = text_data.windows(torch.arange(10), seq_len=4, pad_id=99, prompt_tokens=1)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert y.tolist() == [[IGNORE, 2, 3, 4], [IGNORE, 6, 7, 8], [IGNORE, IGNORE, IGNORE, IGNORE]]
    x, y = text_data.windows(torch.arange(9), seq_len=4, pad_id=99)
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # no padding needed


def test_teacher_then_wttm_student_end_to_end(tmp_path, text, capsys):
    teacher_dir = tmp_path / "teacher"
    assert main(["--config", "train/configs/lm_smoke.yaml", f"data_dir={text}", f"out_dir={teacher_dir}",
                 "tensorboard=false", "epochs=2", "model=gpt_small"]) == 0
    out = capsys.readouterr().out
    assert "lm on text" in out and "test perplexity" in out and "best test perplexity" in out
    for name in ("config.yaml", logs.CSV_NAME, logs.PLOT_NAME, checkpoint.LAST, checkpoint.BEST,
                 engine.SUMMARY_NAME):
        assert (teacher_dir / name).is_file(), name
    with open(teacher_dir / logs.CSV_NAME) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(logs.columns(LanguageModelTask)) and len(rows) == 2
    assert float(rows[0]["train_ce"]) == float(rows[0]["train_loss"])  # loss ce: the total is the CE
    assert float(rows[-1]["test_ppl"]) == pytest.approx(math.exp(float(rows[-1]["test_loss"])), rel=1e-4)
    assert float(rows[-1]["test_ppl"]) < float(rows[0]["test_ppl"]) < 257  # learns; below uniform over bytes

    summary = engine.train(lm_cfg(tmp_path, text, "student", loss="wttm", teacher="gpt_small",
                                  teacher_checkpoint=teacher_dir / checkpoint.LAST, epochs=1))
    teacher_summary = json.loads((teacher_dir / engine.SUMMARY_NAME).read_text())
    assert summary["teacher_ppl"] == pytest.approx(teacher_summary["last_ppl"], rel=1e-4)
    assert summary["loss_backend"] == "cpu" and 1 < summary["best_ppl"] < 257
    assert summary["train_tokens"] > 0 and summary["test_tokens"] > 0


@pytest.mark.parametrize("loss", ["wttm", "ttm", "kd", "ce"])
def test_loss_on_hidden_states_matches_reference_on_logits(loss):
    """The trainer's fused loss (C++ kernel, fp32) vs ttm_kernels.reference on float64 materialised logits."""
    torch.manual_seed(0)
    student, teacher = gpt.build("gpt_tiny", 257), gpt.build("gpt_small", 257)
    tokens = torch.randint(0, 256, (43,))
    x, y = text_data.windows(tokens, seq_len=16, pad_id=256, prompt_tokens=3)  # padded last window
    keys = {"loss": loss, "ce_weight": 0.7, "beta": 2.0, "gamma": 0.3, "temperature": 2.0, "loss_backend": "auto",
            "vocab_mismatch": "error"}
    with torch.no_grad():
        t_hidden = teacher(x)
    hidden = student(x)
    weight = student.lm_head.weight
    fused, parts = Objective(keys).linear(hidden, student.lm_head, y, t_hidden, teacher.lm_head)
    logits = hidden.double() @ weight.double().T
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), y.reshape(-1))
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=2e-6, atol=0)
    t_logits = t_hidden.double() @ teacher.lm_head.weight.double().T
    if loss == "ce":
        ref = 0.7 * ce
    else:
        fn = {"wttm": reference.wttm_loss, "ttm": reference.ttm_loss, "kd": reference.kd_loss}[loss]
        scale = {"temperature": 2.0} if loss == "kd" else {"gamma": 0.3}
        ref = fn(logits, t_logits, y, beta=2.0, ce_weight=0.7, **scale)
    torch.testing.assert_close(fused.double(), ref, rtol=2e-6, atol=0)
    fused_grads = torch.autograd.grad(fused, [hidden, weight], retain_graph=True)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    # Ignored targets (the prompt, the padding) contribute nothing: no gradient reaches their positions.
    ignored = y == IGNORE
    assert ignored.sum() > 3 * len(y) and fused_grads[0][ignored].abs().max() == 0


def test_objective_weight_norm_reaches_the_loss():
    """Config key weight_norm=vocab: the fused linear WTTM loss with U / V^(1-gamma), against the float64
    reference on the materialised logits, and the logged kl_weight is that normalised weight."""
    torch.manual_seed(1)
    student, teacher = gpt.build("gpt_tiny", 257), gpt.build("gpt_small", 257)
    x, y = text_data.windows(torch.randint(0, 256, (40,)), seq_len=16, pad_id=256, prompt_tokens=2)
    keys = {"loss": "wttm", "ce_weight": 0.7, "beta": 2.0, "gamma": 0.3, "loss_backend": "auto",
            "vocab_mismatch": "error", "weight_norm": "vocab"}
    with torch.no_grad():
        t_hidden = teacher(x)
        hidden = student(x)
        fused, parts = Objective(keys).linear(hidden, student.lm_head, y, t_hidden, teacher.lm_head)
    logits = hidden.double() @ student.lm_head.weight.double().T
    t_logits = t_hidden.double() @ teacher.lm_head.weight.double().T
    ref = reference.wttm_loss(logits, t_logits, y, gamma=0.3, beta=2.0, ce_weight=0.7, weight_norm="vocab")
    torch.testing.assert_close(fused.double(), ref, rtol=2e-6, atol=0)
    rows = reference.loss_rows(logits, t_logits, y, teacher_scale=0.3, weighted=True, weight_norm="vocab")
    torch.testing.assert_close(parts["kl_weight"].double(), reference.reduce_rows(rows["weight"], rows["valid"],
                                                                                 "mean"), rtol=1e-5, atol=0)
    assert parts["kl_weight"] <= 1


def test_resume_is_bitwise_identical(tmp_path, text):
    keys = dict(deterministic=True, lr_schedule="multistep", lr_milestones=[1])
    engine.train(lm_cfg(tmp_path, text, "straight", epochs=2, **keys))
    engine.train(lm_cfg(tmp_path, text, "resumed", epochs=1, **keys))
    engine.train(lm_cfg(tmp_path, text, "resumed", epochs=2, **keys), resume=True)
    straight, resumed = (checkpoint.load(str(tmp_path / n / checkpoint.LAST)) for n in ("straight", "resumed"))
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert strip(straight["history"]) == strip(resumed["history"])


def test_folder_of_texts(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    write_text(tmp_path / "docs" / "a.txt", seed=1)
    write_text(tmp_path / "docs" / "sub" / "b.md", seed=2)
    (tmp_path / "docs" / "skipped.bin").write_bytes(b"\x00" * 10_000)
    assert [os.path.basename(p) for p in text_data.text_files(str(tmp_path / "docs"))] == ["a.txt", "b.md"]
    task = LanguageModelTask(lm_cfg(tmp_path, tmp_path / "docs", "r", test_batch_size=1000), torch.device("cpu"))
    data = task.build_data(0, 1)
    inputs, targets = next(iter(data.test))
    tails = [round(os.path.getsize(p) * 0.1) for p in (tmp_path / "docs" / "a.txt", tmp_path / "docs" / "sub" / "b.md")]
    assert len(inputs) == sum(-(-(n - 1) // 32) for n in tails)  # windows do not cross files
    assert (inputs == text_data.ByteTokenizer.pad_id).any(1).sum() == 2  # each file's last window is padded
    assert data.test_size == (targets != IGNORE).sum() == sum(n - 1 for n in tails) - 4 * len(inputs)


def test_default_text_is_the_python_standard_library():
    files = text_data.text_files(None)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 500 and all(f.endswith(".py") for f in files)
    assert os.path.join(stdlib, "os.py") in files and os.path.join(stdlib, "json", "decoder.py") in files
    assert not any(part in f.split(os.sep) for f in files for part in text_data.NOT_STDLIB)
    assert sum(os.path.getsize(f) for f in files) > 10e6  # tens of MB of real code


def test_split_text_cuts_at_character_boundaries():
    raw = ("a" * 10 + "é" * 10).encode()  # 30 bytes, the last 20 two-byte characters
    train, val, test = text_data.split_text(raw, 0.3, 0.1)  # cuts at bytes 27 and 19, both inside a character
    assert train + val + test == raw
    assert (len(train), len(val), len(test)) == (20, 8, 2) and val.decode() == "éééé" and test.decode() == "é"


@pytest.mark.parametrize("overrides, message", [
    (["task=lm"], "task 'lm' does not go with dataset 'fashion_mnist'"),
    (["dataset=text"], "task 'classification' does not go with dataset 'text'"),
    (["task=lm", "dataset=text", "seq_len=8", "prompt_tokens=8"], "'prompt_tokens' must be in \\[0, seq_len=8\\)"),
    (["task=lm", "dataset=text", "test_fraction=1"], "'test_fraction' must be in \\(0, 1\\)"),
    (["task=lm", "dataset=text", "vocab_mismatch=pad"], "'vocab_mismatch' must be one of"),
    (["task=lm", "dataset=text", "seq_lenn=8"], "unknown config key 'seq_lenn'"),
    (["task=lm", "dataset=text", "val_fraction=0.5", "test_fraction=0.5"],
     "'val_fraction' \\+ 'test_fraction' must be < 1"),
    (["task=lm", "dataset=text", "eval_split=val"], "eval_split 'val' evaluates on the validation set: set val_"),
    (["task=lm", "dataset=text", "tokenizer=bpe", "vocab_size=300"], "'vocab_size' must be >= 512"),
    (["task=lm", "dataset=text", "loss=ttm", "teacher=gpt_small", "teacher_checkpoint=t.pt", "weight_norm=vocab"],
     "config key 'weight_norm' normalises WTTM's weight U, and loss 'ttm' has no weight"),
    (["task=lm", "dataset=text", "loss=wttm", "teacher=gpt_small", "teacher_checkpoint=t.pt", "weight_norm=batch"],
     "'weight_norm' must be one of"),
])
def test_bad_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_errors_name_the_problem(tmp_path, text):
    with pytest.raises(ConfigError, match="config key 'model': 'resnet8' is not a language model"):
        engine.train(lm_cfg(tmp_path, text, "a", model="resnet8"))
    with pytest.raises(DatasetNotFoundError, match="text not found: .*nowhere.txt is neither a file nor a folder"):
        engine.train(lm_cfg(tmp_path, tmp_path / "nowhere.txt", "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .txt, .md, .py files in the folder"):
        engine.train(lm_cfg(tmp_path, tmp_path / "empty", "c"))
    (tmp_path / "short.txt").write_bytes(b"too short")
    with pytest.raises(ConfigError, match="test split of .*short.txt has no target tokens"):
        engine.train(lm_cfg(tmp_path, tmp_path / "short.txt", "d"))
    # A teacher checkpoint of another vocabulary (300 tokens, not bytes + pad).
    torch.save({"model": gpt.build("gpt_tiny", 300).state_dict()}, tmp_path / "vocab300.pt")
    with pytest.raises(CheckpointError, match="does not fit the teacher 'gpt_tiny' with vocabulary 257.*"
                                              "tok_emb.weight \\(300, 64\\) in the checkpoint vs \\(257, 64\\)"):
        engine.train(lm_cfg(tmp_path, text, "e", loss="wttm", teacher="gpt_tiny",
                            teacher_checkpoint=tmp_path / "vocab300.pt"))


def test_hf_model_without_transformers_is_a_clear_error(tmp_path, text):
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("transformers is installed")
    (tmp_path / "hf_model").mkdir()
    with pytest.raises(MissingDependencyError, match="need transformers"):
        engine.train(lm_cfg(tmp_path, text, "hf", model=f"hf:{tmp_path / 'hf_model'}"))


def test_torchrun_two_processes(tmp_path, text):
    """DDP with the LM head applied outside the model's forward (by the fused loss): a whole run on 2 ranks."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
         "--config", "train/configs/lm_smoke.yaml", f"data_dir={text}", f"out_dir={tmp_path}/ddp", "epochs=2",
         "tensorboard=false", "device=cpu"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1 and "2 process(es)" in proc.stdout
    single = LanguageModelTask(lm_cfg(tmp_path, text, "one"), torch.device("cpu")).build_data(0, 1)
    summary = json.loads((tmp_path / "ddp" / engine.SUMMARY_NAME).read_text())
    assert summary["test_tokens"] == single.test_size  # every held-out token evaluated once over the ranks


def write_hf_models(folder):
    """Two tiny GPT-2s sharing a byte-level tokenizer; the teacher's LM head has 7 padding rows (264 vs 257)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    for name, width, rows in (("student", 32, 257), ("teacher", 64, 264)):
        torch.manual_seed(0)
        config_ = transformers.GPT2Config(vocab_size=rows, n_embd=width, n_layer=2, n_head=2, n_positions=64,
                                          bos_token_id=256, eos_token_id=256)
        transformers.GPT2LMHeadModel(config_).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return f"hf:{folder / 'student'}", f"hf:{folder / 'teacher'}"


def test_hugging_face_models_from_a_local_folder(tmp_path, text):
    student, teacher = write_hf_models(tmp_path)
    keys = dict(model=student, teacher=teacher, loss="wttm", gamma=0.8)
    with pytest.raises(ConfigError, match="LM head of 264 tokens, the student .* of 257: set vocab_mismatch"):
        engine.train(lm_cfg(tmp_path, text, "mismatch", **keys))
    summary = engine.train(lm_cfg(tmp_path, text, "hf", vocab_mismatch="truncate_teacher", **keys))
    assert summary["epochs"] == 1 and summary["teacher_ppl"] is not None and summary["best_ppl"] < 264
    with pytest.raises(ConfigError, match="tokenise differently"):
        engine.train(lm_cfg(tmp_path, text, "mixed", model=student, teacher="gpt_tiny", loss="wttm",
                            teacher_checkpoint=tmp_path / "unused.pt"))
