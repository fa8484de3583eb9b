"""Task registry. A task owns its data, models and per-batch loss and metrics; the engine (engine.py) owns
the loop, optimisation, precision, DDP, checkpoints and logging. A new task subclasses ``Task`` and is added
to ``TASKS``: ``classification`` (images) and ``lm`` (causal language models on local text)."""
from __future__ import annotations

import math
import os
import shutil

import torch
import torch.nn.functional as F

from . import cache, checkpoint, data, models, parallel, text_data, topk_store
from .errors import ConfigError
from .losses import Objective, topk_correct
from .models import gpt, hf


class Task:
    """Interface the engine relies on. Metric dicts hold sums over samples (tensors), with the sample count
    under "n"; the engine all-reduces them across ranks and divides by n, then calls ``finalize``."""

    train_metrics: tuple = ()
    eval_metrics: tuple = ()
    percent_metrics: tuple = ()  # sums of hits, reported in % of n
    # The held-out metric that picks checkpoint_best.pt and the summary's best_<metric> / last_<metric>.
    best_metric, higher_is_better = "", True
    train_shown: tuple = ()  # the metrics of each epoch's log line, with their labels
    eval_shown: tuple = ()
    labels: dict = {}
    plot_panel: tuple = ("", ())  # title and (CSV column, legend) pairs of the curves' metric panel

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.objective = Objective(cfg)

    def finalize(self, means: dict, training: bool) -> dict:
        for name in self.percent_metrics:
            if means.get(name) is not None:
                means[name] *= 100
        return means

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)

    def format(self, name: str, value: float) -> str:
        return f"{self.labels.get(name, name)} {value:.2f}{'%' if name in self.percent_metrics else ''}"

    def loss_backend(self) -> str | None:
        """The ttm_kernels backend the loss runs with (ConfigError when loss_backend cannot run on the device);
        None when the loss does not go through ttm_kernels (loss ce on images)."""
        return self.objective.backend_on(self.device) if self.objective.needs_teacher else None

    def build_data(self, rank: int, world: int):
        raise NotImplementedError

    def build_student(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_teacher(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_step(self, model, teacher, batch, autocast) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def eval_step(self, model, batch, autocast) -> dict:
        raise NotImplementedError


class ClassificationTask(Task):
    train_metrics = ("loss", "ce", "kl", "kl_weight", "top1", "top5")
    eval_metrics = ("loss", "top1", "top5")
    percent_metrics = ("top1", "top5")
    best_metric = "top1"
    train_shown, eval_shown = ("top1",), ("top1", "top5")
    labels = {"top1": "top-1", "top5": "top-5"}
    plot_panel = ("accuracy (%)", (("train_top1", "train top-1"), ("test_top1", "test top-1"),
                                   ("test_top5", "test top-5")))

    def build_data(self, rank, world):
        self.data = data.build_data(self.cfg, rank, world)
        return self.data

    @property
    def memory_format(self):
        return torch.channels_last if self.cfg["channels_last"] else torch.contiguous_format

    def build_student(self):
        model = models.build_model(self.cfg["model"], self.data.num_classes, self.data.input_shape)
        return model.to(self.device, memory_format=self.memory_format)

    def build_teacher(self):
        teacher = models.build_model(self.cfg["teacher"], self.data.num_classes, self.data.input_shape)
        checkpoint.load_weights(teacher, self.cfg["teacher_checkpoint"], f"teacher {self.cfg['teacher']!r} with "
                                f"{self.data.num_classes} classes ({self.cfg['dataset']})")
        teacher.eval().requires_grad_(False)
        return teacher.to(self.device, memory_format=self.memory_format)

    def _to_device(self, batch):
        images, labels = batch
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def train_step(self, model, teacher, batch, autocast):
        images, labels = self._to_device(batch)
        with autocast():
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            logits = model(images)
            loss, parts = self.objective(logits, labels, teacher_logits)
        n = labels.shape[0]
        top1, top5 = topk_correct(logits.detach(), labels)
        sums = {"n": n, "loss": loss.detach() * n, "top1": top1, "top5": top5}
        sums.update({name: value * n for name, value in parts.items()})
        return loss, sums

    def eval_step(self, model, batch, autocast):
        images, labels = self._to_device(batch)
        with autocast():
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        return {"n": labels.shape[0], "loss": loss, "top1": top1, "top5": top5}


def lm_head(model) -> torch.nn.Linear:
    return getattr(model, "module", model).lm_head  # through DDP


class LanguageModelTask(Task):
    """Causal LMs on local text (text_data.py): next-token CE (loss ce) or distillation (kd/ttm/wttm) with the
    fused linear loss on the final hidden states and the LM heads, a mean over the target tokens.

    Held out: CE per token (test_loss), perplexity exp(test_loss) and top-1 token accuracy."""

    train_metrics = ("loss", "ce", "kl", "kl_weight")
    eval_metrics = ("loss", "ppl", "acc")
    percent_metrics = ("acc",)
    best_metric, higher_is_better = "ppl", False
    eval_shown = ("ppl", "acc")
    labels = {"ppl": "perplexity", "acc": "token accuracy"}
    plot_panel = ("held-out perplexity", (("test_ppl", "perplexity"),))
    EVAL_ROWS = 4096  # tokens per logits chunk in evaluation: bounds its (rows, V) memory

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        for key in ("model",) + (("teacher",) if self.objective.needs_teacher and not cfg["teacher_topk"] else ()):
            name = cfg[key]
            if name not in gpt.SPECS and not name.startswith(hf.PREFIX):
                raise ConfigError(f"config key {key!r}: {name!r} is not a language model; task lm takes "
                                  f"{', '.join(gpt.SPECS)} or {hf.PREFIX}<local model folder>")
        if cfg["tokenizer"] == "bpe" and cfg["model"].startswith(hf.PREFIX):
            raise ConfigError(f"tokenizer 'bpe' is for the built-in models; {cfg['model']!r} brings its own tokenizer")
        if cfg["model"] in gpt.SPECS and cfg["seq_len"] > gpt.MAX_LEN:
            raise ConfigError(f"config key 'seq_len' must be <= {gpt.MAX_LEN} for {cfg['model']}, got {cfg['seq_len']}")

    def loss_backend(self):
        return self.objective.backend_on(self.device)  # loss ce too runs the fused linear loss

    def _tokenizer(self, name, corpus=None):
        if name.startswith(hf.PREFIX):
            return text_data.HFTokenizer(hf.load_tokenizer(name))
        if self.cfg["tokenizer"] == "bpe":
            return text_data.bpe_tokenizer(corpus, self.cfg["vocab_size"])
        return text_data.ByteTokenizer()

    def build_data(self, rank, world):
        corpus = text_data.read_corpus(self.cfg)
        self.tokenizer = self._tokenizer(self.cfg["model"], corpus)
        if rank == 0 and isinstance(self.tokenizer, text_data.BPETokenizer):
            # Beside the run's checkpoints, as Hugging Face saves a model's tokenizer: its ids mean nothing without it.
            os.makedirs(self.cfg["out_dir"], exist_ok=True)
            shutil.copyfile(self.tokenizer.path, os.path.join(self.cfg["out_dir"], text_data.TOKENIZER_FILE))
        self.data = text_data.build_text_data(self.cfg, self.tokenizer, corpus, rank, world)
        if self.cfg["teacher_topk"]:
            # Its checksums are checked here; its vocabulary once the student's is known (build_teacher).
            store = topk_store.TopkStore(self.cfg["teacher_topk"])
            self.data.train = topk_store.TopkWindowLoader(self.data.train, store)
        return self.data

    def _check_teacher_vocabulary(self):
        """A BPE vocabulary is learnt from the text: a teacher trained with another one (other text, vocab_size or
        split) reads the same ids as other tokens, which no shape check would notice."""
        folder = os.path.dirname(os.path.abspath(self.cfg["teacher_checkpoint"]))
        path = os.path.join(folder, text_data.TOKENIZER_FILE)
        if not os.path.isfile(path) or cache.hash_content(path) != self.tokenizer.fingerprint:
            state = "another vocabulary" if os.path.isfile(path) else "missing"
            raise ConfigError(f"teacher checkpoint {self.cfg['teacher_checkpoint']} was not trained with the student's "
                              f"BPE vocabulary {self.tokenizer.path} ({path}: {state}): train the teacher on the same "
                              "text with the same vocab_size, val_fraction and test_fraction")

    def _build(self, name):
        if name.startswith(hf.PREFIX):
            return hf.HFCausalLM(name)
        return gpt.build(name, self.data.num_classes)

    def build_student(self):
        model = self._build(self.cfg["model"])
        self.student_vocab = lm_head(model).weight.shape[0]
        return model.to(self.device)

    def build_teacher(self):
        if self.cfg["teacher_topk"]:  # the store stands for the teacher: no model is loaded
            self.data.train.store.check(vocab=self.student_vocab, seq_len=self.cfg["seq_len"],
                                        corpus=topk_store.corpus_fingerprint(self.data.train.inputs))
            return None
        name, student = self.cfg["teacher"], self.cfg["model"]
        # The teacher reads the student's token ids: both must tokenise alike.
        if name.startswith(hf.PREFIX) != student.startswith(hf.PREFIX) or (
                name.startswith(hf.PREFIX) and self._tokenizer(name).tokenizer.get_vocab()
                != self.tokenizer.tokenizer.get_vocab()):
            raise ConfigError(f"teacher {name!r} and model {student!r} tokenise differently; distillation needs "
                              "one tokenizer (the built-in gpt_* models read bytes or the config's BPE vocabulary)")
        if isinstance(self.tokenizer, text_data.BPETokenizer):
            self._check_teacher_vocabulary()
        teacher = self._build(name)
        if self.cfg["teacher_checkpoint"]:
            checkpoint.load_weights(teacher, self.cfg["teacher_checkpoint"], f"teacher {name!r} with vocabulary "
                                    f"{self.data.num_classes} (task lm)")
        rows = lm_head(teacher).weight.shape[0]
        if rows != self.student_vocab and self.cfg["vocab_mismatch"] == "error":
            raise ConfigError(f"teacher {name!r} has an LM head of {rows} tokens, the student {student!r} of "
                              f"{self.student_vocab}: set vocab_mismatch=truncate_teacher to align the teacher to the "
                              "student's vocabulary")
        teacher.eval().requires_grad_(False)
        return teacher.to(self.device)

    def _batch(self, batch):
        return (t.to(self.device, non_blocking=True) for t in batch)

    def train_step(self, model, teacher, batch, autocast):
        tokens, targets, *topk = self._batch(batch)
        with autocast():
            amp = torch.is_autocast_enabled(self.device.type)
            dtype = torch.get_autocast_dtype(self.device.type) if amp else None
            teacher_hidden = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_hidden = teacher(tokens)
            hidden = model(tokens)
        # Outside autocast: the fused loss runs its GEMMs in one given dtype (autocast's, when on).
        if topk:  # teacher_topk: the store's ids and log-probabilities of these windows
            loss, parts = self.objective.linear_topk(hidden, lm_head(model), targets, *topk, dtype,
                                                     tail=self.cfg["topk_tail"])
        else:
            loss, parts = self.objective.linear(hidden, lm_head(model), targets, teacher_hidden,
                                                None if teacher is None else lm_head(teacher), dtype)
        n = (targets != text_data.IGNORE_INDEX).sum()
        sums = {"n": n, "loss": loss.detach() * n}
        sums.update({name: value * n for name, value in parts.items()})
        return loss, sums

    def eval_step(self, model, batch, autocast):
        tokens, targets = self._batch(batch)
        with autocast():
            hidden = model(tokens)
        head = lm_head(model)
        # A vocabulary-parallel head (parallel tp) is gathered: the metrics need whole rows of logits.
        weight, bias = head.full() if isinstance(head, parallel.VocabShardLinear) else (head.weight, head.bias)
        valid = targets.reshape(-1) != text_data.IGNORE_INDEX
        hidden = hidden.reshape(-1, hidden.shape[-1])[valid].to(weight.dtype)
        targets = targets.reshape(-1)[valid]
        loss = hits = 0
        for start in range(0, len(targets), self.EVAL_ROWS):
            logits = F.linear(hidden[start:start + self.EVAL_ROWS], weight, bias).float()
            y = targets[start:start + self.EVAL_ROWS]
            loss = loss + F.cross_entropy(logits, y, reduction="sum")
            hits = hits + (logits.argmax(-1) == y).sum()
        return {"n": len(targets), "loss": loss, "acc": hits}

    def finalize(self, means, training):
        means = super().finalize(means, training)
        if not training and means.get("loss") is not None:
            means["ppl"] = math.exp(means["loss"]) if means["loss"] < 700 else math.inf  # exp overflows past 709
        return means


TASKS = {"classification": ClassificationTask, "lm": LanguageModelTask}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
