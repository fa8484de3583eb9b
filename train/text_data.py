"""Local text for the ``lm`` task, tokenised and cut into fixed-length next-token samples.

Text (``data_dir``): a text file, or a folder's ``*.txt`` / ``*.md`` / ``*.py`` files (recursive, sorted); null: the
source files of the running Python's standard library (``*.py`` under ``sysconfig``'s stdlib path, without
site-packages), tens of MB of real code that is present, offline, wherever Python is.

Each file is split by position (in bytes, at a character boundary): the last ``test_fraction`` is held out for
evaluation, the ``val_fraction`` before it is held out for validation, the rest trains. Each part is cut into
windows of ``seq_len`` inputs whose targets are the next tokens; the last window of a part is padded (pad inputs,
ignored targets), and the first ``prompt_tokens`` targets of every window are ignored too. Ignored targets are
``IGNORE_INDEX`` and contribute nothing to the loss or the metrics.

Tokenizers: UTF-8 bytes (``tokenizer: bytes``), a byte-level BPE vocabulary of ``vocab_size`` trained on the
training part with Hugging Face ``tokenizers`` (``tokenizer: bpe``; cached with the corpus it tokenised, see
cache.py), or a local Hugging Face model's own (``model: hf:<path>``).
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig

import torch

from . import cache
from .data import Data, ShardedBatches, _per_rank_batch
from .errors import ConfigError, DatasetNotFoundError, MissingDependencyError

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md", ".py")
SPLITS = ("train", "val", "test")
# Folders under the stdlib path that hold installed packages, not the standard library.
NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")
TOKENIZER_FILE = "tokenizer.json"  # the BPE vocabulary, saved beside the runs that use it


def stdlib_files() -> list:
    """The running Python's standard-library sources, sorted: the default corpus."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in NOT_STDLIB]
        files += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    if not files:
        raise DatasetNotFoundError(f"no .py files in the standard library folder {root}: set data_dir to a text "
                                   "file or a folder of text")
    return sorted(files)


def text_files(path: str | None) -> list:
    """The files read for ``data_dir``: the file itself, or the folder's text files (recursive, sorted); null:
    the standard library's sources."""
    if path is None:
        return stdlib_files()
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"text not found: {os.path.abspath(path)} is neither a file nor a folder (set "
                                   f"data_dir to a text file or a folder of {' / '.join(TEXT_SUFFIXES)} files)")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(TEXT_SUFFIXES))
    if not files:
        raise DatasetNotFoundError(f"no {', '.join(TEXT_SUFFIXES)} files in the folder {os.path.abspath(path)}")
    return files


def _char_boundary(raw: bytes, cut: int) -> int:
    while cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut += 1
    return cut


def split_text(raw: bytes, val_fraction: float, test_fraction: float) -> tuple:
    """(train, val, test) parts of one file's bytes, cut at character boundaries."""
    test_start = _char_boundary(raw, len(raw) - round(len(raw) * test_fraction))
    val_start = _char_boundary(raw, test_start - round(len(raw) * val_fraction))
    return raw[:val_start], raw[val_start:test_start], raw[test_start:]


@dataclasses.dataclass
class Corpus:
    files: list
    parts: dict  # split -> the split's bytes of each file, in file order
    fingerprint: str  # of the files' names and contents, and the split


def read_corpus(cfg) -> Corpus:
    files = text_files(cfg["data_dir"])
    root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    parts = {split: [] for split in SPLITS}
    for path in files:
        with open(path, "rb") as f:
            for split, part in zip(SPLITS, split_text(f.read(), cfg["val_fraction"], cfg["test_fraction"])):
                parts[split].append(part)
    fingerprint = cache.hash_json([cache.hash_files(files, root), cfg["val_fraction"], cfg["test_fraction"]])
    return Corpus(files, parts, fingerprint)


def _decoded(texts: list) -> list:
    return [text.decode("utf-8", errors="replace") for text in texts]


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, and a pad id 256 (an input only: its targets are ignored)."""

    vocab_size = 257
    pad_id = 256

    def encode(self, texts: list) -> list:
        # frombuffer refuses empty buffers (an empty file, or val_fraction 0).
        return [torch.frombuffer(bytearray(text), dtype=torch.uint8).long() if text
                else torch.zeros(0, dtype=torch.long) for text in texts]


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        # Any id does as padding (it follows the real tokens and its targets are ignored).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad

    def encode(self, texts: list) -> list:
        return [torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
                for text in _decoded(texts)]


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise MissingDependencyError(f"tokenizer 'bpe' needs Hugging Face tokenizers, which failed to import ({exc}); "
                                     "pip install tokenizers (scripts/bootstrap.sh does)") from exc
    return tokenizers


class BPETokenizer:
    """A byte-level BPE vocabulary (GPT-2's pre-tokenisation; every byte sequence encodes) with a pad token."""

    PAD = "<|pad|>"

    def __init__(self, path: str):
        self.path = path
        self.tokenizer = _tokenizers().Tokenizer.from_file(path)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = self.tokenizer.token_to_id(self.PAD)
        self.fingerprint = cache.hash_content(path)

    @classmethod
    def train(cls, texts: list, vocab_size: int, path: str):
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.PAD], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
        tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)

    def encode(self, texts: list) -> list:
        encodings = self.tokenizer.encode_batch(_decoded(texts), add_special_tokens=False)
        return [torch.tensor(e.ids, dtype=torch.long) for e in encodings]


def bpe_tokenizer(corpus: Corpus, vocab_size: int) -> BPETokenizer:
    """The BPE vocabulary of ``vocab_size`` trained on the corpus's training part, from the cache or trained
    (tens of seconds for the standard library) and cached."""
    path = os.path.join(cache.cache_dir("tokenizers"), f"bpe{vocab_size}-{corpus.fingerprint[:16]}.json")
    with cache.locked(path):
        if not os.path.exists(path):
            print(f"training a BPE vocabulary of {vocab_size} tokens on {len(corpus.files)} files -> {path}")
            BPETokenizer.train(_decoded(corpus.parts["train"]), vocab_size, path)
    return BPETokenizer(path)


def encode_corpus(tokenizer, corpus: Corpus) -> dict:
    """split -> token ids of each file's part. BPE encodings are cached: the standard library takes about half a
    minute to encode, and every run of a demo reads it."""
    if not isinstance(tokenizer, BPETokenizer):
        return {split: tokenizer.encode(texts) for split, texts in corpus.parts.items()}
    path = os.path.join(cache.cache_dir("tokens"), f"{tokenizer.fingerprint[:16]}-{corpus.fingerprint[:16]}.pt")
    with cache.locked(path):
        if not os.path.exists(path):
            packed = {}
            for split, texts in corpus.parts.items():
                ids = tokenizer.encode(texts)
                packed[split] = (torch.cat(ids).int(), torch.tensor([len(x) for x in ids]))
            torch.save(packed, path + ".tmp")
            os.replace(path + ".tmp", path)
    packed = torch.load(path, weights_only=True)
    return {split: list(ids.long().split(lengths.tolist())) for split, (ids, lengths) in packed.items()}


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


def split_windows(parts: list, cfg, pad_id: int, size: int):
    """The windows (inputs, targets) of one split: each file's part cut into windows, then a fixed (seed 0)
    random choice of ``size`` of them (0 = all), nested across sizes and the same for every run. The top-k
    import cuts token positions the same way (``parts`` of position ids, ``pad_id`` -1)."""
    pieces = [windows(part, cfg["seq_len"], pad_id, cfg["prompt_tokens"]) for part in parts]
    inputs, targets = (torch.cat(x) for x in zip(*pieces))
    if not size or size >= len(inputs):
        return inputs, targets
    keep = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return inputs[keep], targets[keep]


def build_text_data(cfg, tokenizer, corpus: Corpus, rank=0, world=1) -> Data:
    seq_len, prompt = cfg["seq_len"], cfg["prompt_tokens"]
    ids = encode_corpus(tokenizer, corpus)
    eval_split = cfg["eval_split"]
    split_data = {}
    for split, size in (("train", cfg["train_subset"]), (eval_split, cfg["test_subset"])):
        inputs, targets = split_windows(ids[split], cfg, tokenizer.pad_id, size)
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            files = corpus.files
            raise ConfigError(f"the {split} split of {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} has no "
                              f"target tokens at seq_len={seq_len}, prompt_tokens={prompt}, val_fraction="
                              f"{cfg['val_fraction']}, test_fraction={cfg['test_fraction']}: use more text or "
                              "shorter windows")
        split_data[split] = (inputs, targets, count)
    (train_x, train_y, n_train), (test_x, test_y, n_test) = split_data["train"], split_data[eval_split]
    train = WindowLoader(train_x, train_y, _per_rank_batch(cfg, world), train=True, seed=cfg["seed"], rank=rank,
                         world=world)
    test = WindowLoader(test_x, test_y, cfg["test_batch_size"], train=False, rank=rank, world=world)
    # The sizes count the target tokens that are not ignored.
    return Data(train, test, tokenizer.vocab_size, (seq_len,), n_train, n_test, unit="tokens")
