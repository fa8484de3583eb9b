"""Run configuration: one flat mapping of keys with defaults, read from YAML and ``key=value`` overrides.

Every key is declared once in ``KEYS`` (default, type, help); anything else is an error naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import yaml

from .errors import ConfigError
from .models import LOW_LR_STUDENTS


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) that also reads YAML 1.2's float notations: 1e-3, 1E+9, 2e5 and -.5 are
    numbers, where YAML 1.1 wants a dot and a signed exponent (1.0e-3) and reads the others as strings."""


_Loader.add_implicit_resolver(  # tried after YAML 1.1's int and float patterns: it only adds notations
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
    list("-+.0123456789"))


def load_yaml(stream, source: str):
    """YAML text or file as Python values (every float notation is a float); a syntax error names ``source``
    and the line and column, on one line."""
    try:
        return yaml.load(stream, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or exc
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from exc
    except ValueError as exc:  # a scalar PyYAML resolves but cannot convert, e.g. 0x_
        raise ConfigError(f"{source}: {exc}") from exc


LOSSES = ("ce", "kd", "ttm", "wttm")
# Per-loss defaults for keys left null: the CIFAR-100 recipes of RepDistiller (KD) and the public TTM code.
LOSS_DEFAULTS = {
    "ce": {"ce_weight": 1.0, "beta": 0.0, "gamma": None},
    "kd": {"ce_weight": 0.1, "beta": 0.9, "gamma": None},  # RepDistiller -r 0.1 -a 0.9, T = 4
    "ttm": {"ce_weight": 1.0, "beta": 45.0, "gamma": 0.1},  # TTM README: --ttm_l 0.1 -r 1 -b 45
    # WTTM weight 4 at gamma 0.2 is the public code's CRD+WTTM example; the paper's per-pair betas
    # (appendix A.4) were not available.
    "wttm": {"ce_weight": 1.0, "beta": 4.0, "gamma": 0.2},
}


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any
    type: Any  # a type or a tuple of types the value must have (None always allowed when default is None)
    help: str
    choices: tuple = ()


NUM = (int, float)
KEYS: dict[str, Key] = {
    # what to run
    "task": Key("classification", str, "task from the task registry (train/tasks.py): classification, or lm "
                "(causal language models on dataset text)"),
    "dataset": Key("fashion_mnist", str, "dataset; text = local text for task lm",
                   ("fashion_mnist", "cifar100", "imagenet", "text")),
    "data_dir": Key(None, str, "dataset folder; null = the dataset's default location. text: a text file or a "
                    "folder of .txt/.md/.py files; null = the running Python's standard-library sources"),
    "train_subset": Key(0, int, "train on a class-balanced random subset of this many images (0 = all); lm: on a "
                        "random subset of this many token windows"),
    "test_subset": Key(0, int, "evaluate on the first N test images (0 = all); lm: on a random subset of this many "
                       "held-out token windows"),
    "val_fraction": Key(0.0, NUM, "hold this fraction of the training data out of training as a validation set: "
                        "class-balanced images, or for lm the part of each file's text just before its test part"),
    "eval_split": Key("test", str, "what each epoch is evaluated on (the test_* columns of the CSV and summary): the "
                      "test set, or the validation set of val_fraction (to choose hyper-parameters)", ("test", "val")),
    "augment": Key("auto", str, "train augmentation; auto = crop_flip for CIFAR, none for Fashion-MNIST",
                   ("auto", "none", "flip", "crop_flip")),
    "model": Key("cnn_student", str, "the model trained (teacher or student); lm: gpt_tiny, gpt_small, "
                 "gpt_medium or hf:<local Hugging Face model folder>"),
    # language models (task lm)
    "seq_len": Key(128, int, "lm: tokens per sample (inputs; the targets are the next tokens)"),
    "prompt_tokens": Key(0, int, "lm: the first N targets of every sample are ignored (a prompt to condition on)"),
    "test_fraction": Key(0.1, NUM, "lm: the last fraction of each text file (in bytes) is held out for evaluation"),
    "tokenizer": Key("bytes", str, "lm, built-in models: bytes (UTF-8 bytes, 257 ids) or bpe (a byte-level BPE "
                     "vocabulary of vocab_size trained on the training text with Hugging Face tokenizers, cached)",
                     ("bytes", "bpe")),
    "vocab_size": Key(8192, int, "lm, tokenizer bpe: the size of the BPE vocabulary"),
    "vocab_mismatch": Key("error", str, "lm: a teacher LM head with another vocabulary size is an error, or is "
                          "truncated / padded to the student's (ttm_kernels' vocab_mismatch)",
                          ("error", "truncate_teacher")),
    # distillation
    "loss": Key("ce", str, "ce trains without a teacher (teachers, baselines); kd/ttm/wttm distil", LOSSES),
    "teacher": Key(None, str, "teacher architecture (for kd/ttm/wttm)"),
    "teacher_checkpoint": Key(None, str, "teacher weights: a {'model': state_dict} checkpoint (RepDistiller, "
                              "mdistiller or this trainer) or a bare state_dict; optional for an hf:<path> teacher"),
    "teacher_topk": Key(None, str, "lm: distil from a store of the teacher's top-k log-probabilities (written by "
                        "`python -m train teacher-topk`) instead of a teacher model, which is then not loaded"),
    "topk_tail": Key("bucket", str, "lm with teacher_topk: the teacher's mass outside its top k is one more outcome "
                     "(bucket), or the top k are renormalised (ttm_kernels' tail)", ("bucket", "renormalize")),
    "loss_backend": Key("auto", str, "ttm_kernels backend", ("auto", "torch", "cpu", "triton")),
    "ce_weight": Key(None, NUM, "weight of the hard-label CE; null = per-loss default (ce 1, kd 0.1, ttm/wttm 1)"),
    "beta": Key(None, NUM, "weight of the distillation term; null = per-loss default (kd 0.9, ttm 45, wttm 4)"),
    "gamma": Key(None, NUM, "TTM/WTTM power exponent 1/T; null = per-loss default (ttm 0.1, wttm 0.2)"),
    "temperature": Key(4.0, NUM, "KD temperature T (the T^2 factor is inside the loss)"),
    "weight_norm": Key("none", str, "wttm: the KL's weight; none = the paper's U = sum(softmax(v)^gamma), which grows "
                       "with the vocabulary V up to V^(1-gamma); vocab = U / V^(1-gamma), in (0, 1] at every V, so "
                       "that beta means the same at another vocabulary (ttm_kernels' weight_norm)", ("none", "vocab")),
    "eval_teacher": Key(True, bool, "report the teacher's test accuracy before distilling"),
    # optimisation
    "epochs": Key(240, int, "number of epochs"),
    "batch_size": Key(64, int, "global batch size (split across DDP ranks)"),
    "test_batch_size": Key(256, int, "evaluation batch size per rank"),
    "optimizer": Key("sgd", str, "optimizer", ("sgd", "adamw")),
    "lr": Key(None, NUM, f"learning rate; null = 0.05, or 0.01 for {', '.join(LOW_LR_STUDENTS)} (RepDistiller)"),
    "momentum": Key(0.9, NUM, "SGD momentum"),
    "weight_decay": Key(5e-4, NUM, "weight decay"),
    "lr_schedule": Key("multistep", str, "multistep: x lr_decay after each milestone epoch; cosine: to 0",
                       ("multistep", "cosine")),
    "lr_milestones": Key([150, 180, 210], list, "epochs after which the lr is multiplied by lr_decay"),
    "lr_decay": Key(0.1, NUM, "multistep decay factor"),
    "on_nonfinite": Key("error", str, "a training step whose loss or gradient is NaN or infinite never updates the "
                        "model; error: the run stops at the next check (exit code 3, the last good checkpoint is "
                        "kept, --resume continues from it); skip: it goes on without such steps and logs their count",
                        ("error", "skip")),
    "log_every": Key(20, int, "training steps between host reads of the loss: the progress bar's loss and the "
                     "non-finite check (on GPU each read waits for the device); every epoch's end is checked too"),
    # reproducibility and hardware
    "seed": Key(0, int, "seed of the model init, the data order and the augmentation"),
    "deterministic": Key(False, bool, "deterministic algorithms only (bitwise reproducible runs and resumes)"),
    "device": Key("auto", str, "auto = cuda when available", ("auto", "cpu", "cuda")),
    "parallel": Key("ddp", str, "several processes (torchrun): ddp = a replica and a share of every batch per rank; "
                    "task lm also fsdp = FSDP2-sharded student, a share of every batch per rank; tp = "
                    "vocabulary-parallel LM heads (and tied embeddings) of student and teacher, the rest "
                    "replicated, the whole batch on every rank (train/parallel.py)", ("ddp", "fsdp", "tp")),
    "amp": Key("auto", str, "autocast: auto = bf16 on CUDA, off on CPU", ("auto", "off", "bf16", "fp16")),
    "num_workers": Key(4, int, "data-loader workers (ImageNet only; the other datasets live in memory)"),
    "threads": Key(0, int, "torch CPU threads (0 = torch's default)"),
    "channels_last": Key(True, bool, "channels-last tensors for convolutional models: faster convolutions and "
                         "pooling (2.5x for the Fashion-MNIST CNNs on CPU)"),
    # output
    "out_dir": Key(None, str, "where the run writes; null = runs/<dataset>-<model>-<loss>-seed<seed>"),
    "checkpoint_every_min": Key(5, NUM, "also save checkpoint_last.pt inside an epoch when this many minutes have "
                                "passed since the last save (looked at every log_every steps), for an exact --resume "
                                "from that step; 0 = at the end of each epoch only"),
    "tensorboard": Key(True, bool, "also write TensorBoard events when tensorboard is installed"),
    "progress": Key(True, bool, "tqdm progress bars"),
}

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("epochs", "out_dir", "num_workers", "threads", "channels_last", "tensorboard", "progress",
                     "test_batch_size", "eval_teacher", "data_dir", "device", "log_every", "on_nonfinite",
                     "checkpoint_every_min")


def defaults() -> dict:
    return {name: (list(key.default) if isinstance(key.default, list) else key.default) for name, key in KEYS.items()}


def _check(name: str, value):
    if name not in KEYS:
        raise ConfigError(f"unknown config key {name!r}; run `python -m train --help` for the list of keys")
    key = KEYS[name]
    if value is None:
        if key.default is not None:
            raise ConfigError(f"config key {name!r} cannot be null (default {key.default!r})")
        return value
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"config key {name!r} must be {want}, got {value!r} ({type(value).__name__})")
    if key.choices and value not in key.choices:
        raise ConfigError(f"config key {name!r} must be one of {key.choices}, got {value!r}")
    if types != NUM:
        return value
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"config key {name!r} must be a finite number, got {value}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name not in KEYS:
        raise ConfigError(f"unknown config key {name!r}; run `python -m train --help` for the list of keys")
    value = load_yaml(raw, f"the value of {name!r} ({raw!r})") if raw.strip() else None
    if KEYS[name].type is str and value is not None and not isinstance(value, str):
        value = raw  # e.g. out_dir=2024 stays the string "2024"
    return name, value


def load(path: str | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, updated by the YAML file at ``path`` and then by ``key=value`` overrides, validated."""
    cfg = defaults()
    if path:
        try:
            with open(path) as f:
                data = load_yaml(f, f"config file {path}") or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        for name, value in data.items():
            if name not in KEYS:
                raise ConfigError(f"unknown config key {name!r} in {path}; run `python -m train --help` for "
                                  "the list of keys")
            cfg[name] = value
    for text in overrides:
        name, value = parse_override(text)
        cfg[name] = value
    return validate(cfg)


def validate(cfg: dict) -> dict:
    cfg = {name: _check(name, value) for name, value in cfg.items()}
    missing = set(KEYS) - set(cfg)
    if missing:
        raise ConfigError(f"config is missing keys {sorted(missing)}")
    for name in ("epochs", "batch_size", "test_batch_size", "log_every"):
        if cfg[name] < 1:
            raise ConfigError(f"config key {name!r} must be >= 1, got {cfg[name]}")
    if (cfg["task"] == "lm") != (cfg["dataset"] == "text"):
        raise ConfigError(f"task {cfg['task']!r} does not go with dataset {cfg['dataset']!r}: task lm takes dataset "
                          "text, and dataset text only task lm")
    if not 0 <= cfg["val_fraction"] < 1:
        raise ConfigError(f"config key 'val_fraction' must be in [0, 1), got {cfg['val_fraction']}")
    if cfg["eval_split"] == "val" and not cfg["val_fraction"]:
        raise ConfigError("eval_split 'val' evaluates on the validation set: set val_fraction > 0 too")
    if cfg["parallel"] != "ddp" and cfg["task"] != "lm":
        raise ConfigError(f"parallel {cfg['parallel']!r} is for task lm; task {cfg['task']!r} runs with parallel ddp")
    if cfg["parallel"] == "fsdp" and cfg["optimizer"] == "sgd":
        # The fused optimizers honour the non-finite flag on the device (nonfinite.py); torch 2.13 runs fused
        # AdamW on FSDP2's DTensor parameters but has no DTensor implementation of fused SGD.
        raise ConfigError("parallel fsdp trains with optimizer adamw (torch has no fused SGD for FSDP2's sharded "
                          "parameters)")
    if cfg["parallel"] == "tp" and cfg["vocab_mismatch"] != "error":
        raise ConfigError("parallel tp shards the student's and the teacher's LM heads alike: it needs one "
                          "vocabulary (vocab_mismatch error)")
    if cfg["seq_len"] < 1:
        raise ConfigError(f"config key 'seq_len' must be >= 1, got {cfg['seq_len']}")
    if not 0 <= cfg["prompt_tokens"] < cfg["seq_len"]:
        raise ConfigError(f"config key 'prompt_tokens' must be in [0, seq_len={cfg['seq_len']}), got "
                          f"{cfg['prompt_tokens']}")
    if not 0 < cfg["test_fraction"] < 1:
        raise ConfigError(f"config key 'test_fraction' must be in (0, 1), got {cfg['test_fraction']}")
    if cfg["task"] == "lm" and cfg["val_fraction"] + cfg["test_fraction"] >= 1:
        raise ConfigError(f"config keys 'val_fraction' + 'test_fraction' must be < 1 (the rest trains), got "
                          f"{cfg['val_fraction']} + {cfg['test_fraction']}")
    if cfg["vocab_size"] < 512:
        raise ConfigError(f"config key 'vocab_size' must be >= 512 (the 256 bytes, a pad and merges), got "
                          f"{cfg['vocab_size']}")
    for name in ("train_subset", "test_subset", "num_workers", "threads", "checkpoint_every_min"):
        if cfg[name] < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {cfg[name]}")
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in cfg["lr_milestones"]):
        raise ConfigError(f"config key 'lr_milestones' must be a list of epoch numbers, got {cfg['lr_milestones']}")
    if cfg["teacher_topk"] and (cfg["task"] != "lm" or cfg["loss"] == "ce"):
        raise ConfigError("config key 'teacher_topk' distils a language model (task lm, loss kd, ttm or wttm) from a "
                          f"top-k store, got task {cfg['task']!r} with loss {cfg['loss']!r}")
    if cfg["loss"] != "ce" and not cfg["teacher"] and not cfg["teacher_topk"]:
        raise ConfigError(f"loss {cfg['loss']!r} distils from a teacher: set 'teacher' (and 'teacher_checkpoint'), "
                          "or 'teacher_topk' (task lm)")
    if (cfg["loss"] != "ce" and not cfg["teacher_topk"] and not cfg["teacher_checkpoint"]
            and not cfg["teacher"].startswith("hf:")):
        raise ConfigError(f"loss {cfg['loss']!r} needs trained teacher weights: set 'teacher_checkpoint'")
    if cfg["weight_norm"] != "none" and cfg["loss"] != "wttm":
        raise ConfigError(f"config key 'weight_norm' normalises WTTM's weight U, and loss {cfg['loss']!r} has no "
                          "weight: set loss=wttm, or weight_norm=none")
    for name, value in LOSS_DEFAULTS[cfg["loss"]].items():
        if cfg[name] is None:
            cfg[name] = value
    if cfg["lr"] is None:
        cfg["lr"] = 0.01 if cfg["model"] in LOW_LR_STUDENTS else 0.05
    for name in ("lr", "lr_decay", "temperature") + (("gamma",) if cfg["loss"] in ("ttm", "wttm") else ()):
        if cfg[name] <= 0:
            raise ConfigError(f"config key {name!r} must be > 0, got {cfg[name]}")
    for name in ("momentum", "weight_decay", "ce_weight", "beta"):
        if cfg[name] < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {cfg[name]}")
    if cfg["out_dir"] is None:
        model = os.path.basename(cfg["model"].removeprefix("hf:").rstrip("/"))  # hf:<path>: the folder's name
        cfg["out_dir"] = f"runs/{cfg['dataset']}-{model}-{cfg['loss']}-seed{cfg['seed']}"
    return cfg


def help_text() -> str:
    lines = ["config keys (set them in the YAML file or as key=value after it), with defaults:"]
    for name, key in KEYS.items():
        default = "null" if key.default is None else key.default
        choices = f" [{' | '.join(map(str, key.choices))}]" if key.choices else ""
        lines.append(f"  {name} = {default}{choices}\n      {key.help}")
    return "\n".join(lines)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
