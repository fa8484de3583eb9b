"""Local text for the ``lm`` task: a file or a folder of ``*.txt`` / ``*.md`` files, tokenised byte-level (the
built-in GPTs) or with a Hugging Face model's tokenizer, cut into fixed-length next-token samples.

Each document is split by position: its first ``1 - test_fraction`` of tokens train, the rest is held out.
Each part is cut into windows of ``seq_len`` inputs whose targets are the next tokens; the last window of a
part is padded (pad inputs, ignored targets), and the first ``prompt_tokens`` targets of every window are
ignored too. Ignored targets are ``IGNORE_INDEX`` and contribute nothing to the loss or the metrics.
"""
from __future__ import annotations

import os

import torch

from .data import Data, ShardedBatches, _per_rank_batch
from .errors import ConfigError, DatasetNotFoundError

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md")
# The text when data_dir is null: this repository's README.md. It is always there, offline: train/ runs from
# the checkout (it is not installed), and setup.py reads the README to build the package.
DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, and a pad id 256 (an input only: its targets are ignored)."""

    vocab_size = 257
    pad_id = 256

    def encode(self, text: bytes) -> list:
        return list(text)


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        # Any id does as padding (it follows the real tokens and its targets are ignored).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad

    def encode(self, text: bytes) -> list:
        return self.tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]


def text_files(path: str | None) -> list:
    """The files read for ``data_dir``: the file itself, or the folder's *.txt and *.md files (recursive,
    sorted); null: DEFAULT_TEXT."""
    path = path or DEFAULT_TEXT
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"text not found: {os.path.abspath(path)} is neither a file nor a folder (set "
                                   "data_dir to a text file or a folder of .txt / .md files)")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(TEXT_SUFFIXES))
    if not files:
        raise DatasetNotFoundError(f"no {' or '.join(TEXT_SUFFIXES)} files in the folder {os.path.abspath(path)}")
    return files


def windows(tokens: torch.Tensor, seq_len: int, pad_id: int, prompt_tokens: int = 0):
    """(inputs, targets), each (n, seq_len): inputs ``tokens[i*L : i*L+L]``, targets the next tokens; the last
    window padded, pad and the first ``prompt_tokens`` targets of each window set to IGNORE_INDEX."""
    n = max(0, -(-(len(tokens) - 1) // seq_len))
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long)
    padded = torch.full((n * seq_len + 1,), pad_id, dtype=torch.long)
    padded[:len(tokens)] = tokens
    inputs = padded[:-1].view(n, seq_len)
    targets = padded[1:].clone()
    targets[len(tokens) - 1:] = IGNORE_INDEX  # past the last real token
    targets = targets.view(n, seq_len)
    targets[:, :prompt_tokens] = IGNORE_INDEX
    return inputs.clone(), targets


class WindowLoader(ShardedBatches):
    """Batches of (inputs, targets) token windows."""

    def __init__(self, inputs, targets, batch_size, *, train, seed=0, rank=0, world=1):
        super().__init__(len(inputs), batch_size, train=train, seed=seed, rank=rank, world=world)
        self.inputs, self.targets = inputs, targets

    def batch(self, idx, generator):
        return self.inputs[idx], self.targets[idx]


def build_text_data(cfg, tokenizer, rank=0, world=1) -> Data:
    seq_len, prompt = cfg["seq_len"], cfg["prompt_tokens"]
    parts = {"train": [], "test": []}
    files = text_files(cfg["data_dir"])
    for path in files:
        with open(path, "rb") as f:
            tokens = torch.tensor(tokenizer.encode(f.read()), dtype=torch.long)
        n_test = round(len(tokens) * cfg["test_fraction"])
        for split, part in (("train", tokens[:len(tokens) - n_test]), ("test", tokens[len(tokens) - n_test:])):
            parts[split].append(windows(part, seq_len, tokenizer.pad_id, prompt))
    split_data = {}
    for split, pieces in parts.items():
        inputs, targets = (torch.cat(x) for x in zip(*pieces))
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise ConfigError(f"the {split} split of {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} has no "
                              f"target tokens at seq_len={seq_len}, prompt_tokens={prompt}, test_fraction="
                              f"{cfg['test_fraction']}: use more text or shorter windows")
        split_data[split] = (inputs, targets, count)
    (train_x, train_y, n_train), (test_x, test_y, n_test) = split_data["train"], split_data["test"]
    train = WindowLoader(train_x, train_y, _per_rank_batch(cfg, world), train=True, seed=cfg["seed"], rank=rank,
                         world=world)
    test = WindowLoader(test_x, test_y, cfg["test_batch_size"], train=False, rank=rank, world=world)
    # The sizes count the target tokens that are not ignored.
    return Data(train, test, tokenizer.vocab_size, (seq_len,), n_train, n_test, unit="tokens")
