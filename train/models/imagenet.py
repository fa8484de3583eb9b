"""ImageNet models from torchvision (an optional dependency): ``tv_<name>`` is ``torchvision.models.<name>``,
e.g. tv_resnet34 -> tv_resnet18. Weights come from checkpoints on disk only (``teacher_checkpoint``), never
downloaded."""
import importlib

from ..errors import ConfigError, MissingDependencyError

PREFIX = "tv_"


def build(name, num_classes=1000):
    try:
        models = importlib.import_module("torchvision.models")
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise MissingDependencyError(f"model {name!r} needs torchvision, which failed to import ({exc}); install the "
                           "torchvision build matching your torch (pip install torchvision)") from exc
    arch = name[len(PREFIX):]
    try:
        return models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise ConfigError(f"model {name!r}: torchvision has no classification model {arch!r}") from exc
