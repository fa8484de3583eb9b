"""Hugging Face causal LMs from a local folder (``model: hf:<path>``), optional: needs ``transformers``.

The wrapper's ``forward`` returns the base model's last hidden states (after its final norm) and ``lm_head``
is the model's output embedding, so the trainer applies the fused linear loss exactly as to the built-in GPT.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError

PREFIX = "hf:"
# Config attributes of models whose logits are more than ``lm_head(hidden)``: the fused loss would not see them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"models named {PREFIX}<path> need transformers, which failed to import "
                                     f"({exc}); pip install transformers, or use a built-in gpt_* model") from exc
    return transformers


def local_path(name: str) -> str:
    path = name[len(PREFIX):]
    if not os.path.isdir(path):
        raise ConfigError(f"model {name!r}: {os.path.abspath(path)} is not a folder (expected a local Hugging Face "
                          "model saved with save_pretrained; nothing is downloaded)")
    return path


class HFCausalLM(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        path = local_path(name)
        self.lm = _transformers().AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        head = self.lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"model {name!r}: its output embedding is {type(head).__name__}, not an nn.Linear "
                              "that the fused linear loss can take")
        for attr in LOGIT_TRANSFORMS:
            if getattr(self.lm.config, attr, None):
                raise ConfigError(f"model {name!r} transforms its logits ({attr}={getattr(self.lm.config, attr)}), "
                                  "which the fused linear loss on lm_head(hidden) would leave out")

    @property
    def lm_head(self) -> nn.Linear:
        return self.lm.get_output_embeddings()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # No attention mask: padding only ever follows the real tokens, which causal attention keeps from them.
        return self.lm.base_model(input_ids=tokens, use_cache=False).last_hidden_state


def load_tokenizer(name: str):
    return _transformers().AutoTokenizer.from_pretrained(local_path(name), local_files_only=True)
