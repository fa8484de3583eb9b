"""Checkpoints: atomic writes, the full training state for --resume, and loading teacher weights."""
from __future__ import annotations

import os
import random

import torch

from .errors import CheckpointError

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"


def save_atomic(obj, path: str):
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``: a run killed
    at any moment leaves either the old or the new checkpoint, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C, a full disk: no half-written file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # a torn, foreign or non-torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def state_dict_of(obj, path: str) -> dict:
    """The model state dict in a checkpoint: ``obj['model']`` (RepDistiller, mdistiller, this trainer),
    ``obj['state_dict']`` or a bare state dict (torchvision); DDP's 'module.' prefix removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict (expected {{'model': state_dict}} or "
                              "a state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: torch.nn.Module, path: str, description: str):
    """Load ``path`` into ``model`` strictly, or raise a CheckpointError saying what does not fit."""
    obj = load(path)
    weights = state_dict_of(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
              for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        trained_as = ""
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            c = obj["config"]
            trained_as = f" (it was trained as {c.get('model')!r} on {c.get('dataset')!r})"
        problems = []
        if shapes:
            problems.append(f"shape mismatches: {'; '.join(shapes[:3])}")
        if missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {path}{trained_as} does not fit the {description}: "
                              + "; ".join(problems) + ". Check the architecture name and the class count.")
    model.load_state_dict(weights)
