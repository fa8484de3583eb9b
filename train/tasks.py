"""Task registry. A task owns its data, models and per-batch loss and metrics; the engine (engine.py) owns
the loop, optimisation, precision, DDP, checkpoints and logging. A new task (e.g. ``lm``, LLM distillation)
subclasses ``Task`` and is added to ``TASKS``."""
from __future__ import annotations

import torch

from . import checkpoint, data, models
from .errors import ConfigError
from .losses import Objective, topk_correct


class Task:
    """Interface the engine relies on. Metric dicts hold sums over samples (tensors), with the sample count
    under "n"; the engine all-reduces them across ranks and divides by n."""

    train_metrics: tuple = ()
    eval_metrics: tuple = ()

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.objective = Objective(cfg)

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


TASKS = {"classification": ClassificationTask}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (LLM distillation, 'lm', is "
                          "not implemented yet)")
    return TASKS[name]
