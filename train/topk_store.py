"""A teacher's top-k token ids and log-probabilities for every position of the LM task's training windows, on
disk: what ``python -m train teacher-topk`` writes and ``teacher_topk: DIR`` distils from, with no teacher in
memory.

Layout of DIR:

* ``manifest.json``: the format, the teacher, the vocabulary size, k, the dtypes, the corpus fingerprint (a
  SHA-256 of the training windows' token ids), the sequence length, the window and token counts, and the
  shards written so far with each file's SHA-256. ``complete`` turns true with the last shard.
* ``ids-NNNNN.npy`` (int32) and ``logprobs-NNNNN.npy`` (float32 or float16), each of shape
  (windows, seq_len, k): memory-mapped when read. Window i of the corpus is row i - first of its shard.

Every file is written under a temporary name and renamed into place, and the manifest is rewritten (also by a
rename) only after a shard's files are: a killed writer leaves whole shards and a manifest that lists exactly
them, and the next run resumes after the last one.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from . import cache
from .errors import ConfigError, DataError
from .text_data import WindowLoader

FORMAT = "ttm-kernels-topk-store/1"
MANIFEST = "manifest.json"
LOGPROB_DTYPES = {"float32": np.float32, "float16": np.float16}
# The fields of the manifest that a resumed writer must find unchanged.
IDENTITY = ("format", "teacher", "teacher_checkpoint", "vocab", "k", "ids_dtype", "logprobs_dtype", "corpus",
            "seq_len", "windows", "windows_per_shard")


def corpus_fingerprint(inputs: torch.Tensor) -> str:
    """SHA-256 of the training windows' token ids (int64, (windows, seq_len)) and their shape."""
    digest = hashlib.sha256(repr(tuple(inputs.shape)).encode())
    digest.update(inputs.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _shard_files(index: int) -> dict:
    return {"ids": f"ids-{index:05d}.npy", "logprobs": f"logprobs-{index:05d}.npy"}


def _write_atomically(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"teacher_topk: {path} holds no {MANIFEST}: write a store with `python -m train "
                          "teacher-topk --config FILE out_dir=DIR k=64`") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"teacher_topk: cannot read {os.path.join(path, MANIFEST)} ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"teacher_topk: {os.path.join(path, MANIFEST)} is not a {FORMAT} manifest")
    return manifest


def written(path: str) -> tuple[int, int] | None:
    """(windows in the complete shards, windows in all) of the store in ``path``; None when it has no manifest."""
    try:
        manifest = _read_manifest(path)
    except (ConfigError, DataError):
        return None
    return sum(shard["windows"] for shard in manifest["shards"]), manifest["windows"]


class StoreWriter:
    """Writes a store shard by shard (see the module docstring); resumes the shards of an interrupted writer
    with the same identity (``meta``), after checking their checksums. Its caller holds the folder's run lock
    (run_lock.hold): it removes the partial files a killed writer left, which would be a live writer's."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT, **meta}
        if os.path.exists(os.path.join(path, MANIFEST)):
            manifest = _read_manifest(path)
            changed = [key for key in IDENTITY if manifest.get(key) != meta.get(key)]
            if changed:
                raise ConfigError(f"{path} already holds a top-k store with other {', '.join(changed)} "
                                  f"({', '.join(f'{k}={manifest.get(k)!r}' for k in changed)}): choose another "
                                  "out_dir, or delete it")
            for shard in manifest["shards"]:
                _check_shard(path, shard)
            self.manifest = manifest
        else:
            self.manifest = {**meta, "tokens": meta["windows"] * meta["seq_len"], "complete": False, "shards": []}
            self._save_manifest()
        for name in os.listdir(path):  # a killed writer's partial files
            if name.endswith(".tmp"):
                os.remove(os.path.join(path, name))

    @property
    def next_window(self) -> int:
        return sum(shard["windows"] for shard in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def write_shard(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Appends the next windows' (n, seq_len, k) ids and log-probabilities as one shard."""
        files = _shard_files(len(self.manifest["shards"]))
        sums = {}
        for key, array in (("ids", ids), ("logprobs", logprobs)):
            target = os.path.join(self.path, files[key])
            _write_atomically(target, lambda f: np.save(f, array))
            sums[key] = cache.hash_content(target)
        self.manifest["shards"].append({"first": self.next_window, "windows": int(ids.shape[0]), "files": files,
                                        "sha256": sums})
        self.manifest["complete"] = self.next_window == self.manifest["windows"]
        self._save_manifest()

    def _save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1).encode()
        _write_atomically(os.path.join(self.path, MANIFEST), lambda f: f.write(text))


def _check_shard(path: str, shard: dict) -> None:
    for key, name in shard["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DataError(f"teacher_topk: shard file {file} is missing: restore it, or delete the folder and write "
                            "the store again")
        if cache.hash_content(file) != shard["sha256"][key]:
            raise DataError(f"teacher_topk: shard file {file} is corrupt (its SHA-256 differs from the manifest's): "
                            "rewrite the store, or restore the file")


class TopkStore:
    """A complete store, read-only: the shards memory-mapped after their checksums are checked."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = manifest = _read_manifest(path)
        if not manifest["complete"]:
            written = sum(shard["windows"] for shard in manifest["shards"])
            raise ConfigError(f"teacher_topk: the store in {path} is incomplete ({written} of {manifest['windows']} "
                              "windows): run `python -m train teacher-topk` again with the same config to finish it")
        self.ids, self.logprobs, self.first = [], [], []
        shape = (manifest["seq_len"], manifest["k"])
        for shard in manifest["shards"]:
            _check_shard(path, shard)
            arrays = [np.load(os.path.join(path, shard["files"][key]), mmap_mode="r") for key in ("ids", "logprobs")]
            if any(a.shape != (shard["windows"], *shape) for a in arrays):
                raise DataError(f"teacher_topk: shard {shard['files']['ids']} of {path} has shape {arrays[0].shape}, "
                                f"the manifest says {(shard['windows'], *shape)}")
            self.ids.append(arrays[0])
            self.logprobs.append(arrays[1])
            self.first.append(shard["first"])
        self.bounds = np.array(self.first + [manifest["windows"]])

    def check(self, *, vocab: int, corpus: str, seq_len: int) -> None:
        """ConfigError unless the store was written for this run's vocabulary, training windows and length."""
        m = self.manifest
        if m["seq_len"] != seq_len:
            raise ConfigError(f"teacher_topk: the store in {self.path} has seq_len {m['seq_len']}, the run {seq_len}")
        if m["corpus"] != corpus:
            raise ConfigError(f"teacher_topk: the store in {self.path} was written for another corpus (its training "
                              "windows' token ids differ: data_dir, test_fraction, prompt_tokens or the tokenizer "
                              "changed); write a store for this run")
        if m["vocab"] != vocab:
            raise ConfigError(f"teacher_topk: the store in {self.path} holds ids of a vocabulary of {m['vocab']}, the "
                              f"student's LM head has {vocab} rows")

    def read(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n, seq_len, k) int32 ids and fp32 log-probabilities of the given windows."""
        index = windows.numpy()
        shard = np.searchsorted(self.bounds, index, side="right") - 1
        ids = np.stack([self.ids[s][i - self.first[s]] for s, i in zip(shard, index)])
        logprobs = np.stack([self.logprobs[s][i - self.first[s]] for s, i in zip(shard, index)])
        # numpy's float16 -> float32 is ~8x faster than torch's on the CPU
        return torch.from_numpy(ids), torch.from_numpy(logprobs.astype(np.float32, copy=False))


class TopkWindowLoader(WindowLoader):
    """``text_data.WindowLoader``'s training batches with the store's top-k of each window:
    (inputs, targets, ids, logprobs)."""

    def __init__(self, loader: WindowLoader, store: TopkStore):
        super().__init__(loader.inputs, loader.targets, loader.batch_size, train=True, seed=loader.seed,
                         rank=loader.rank, world=loader.sampler.num_replicas)
        self.store = store

    def batch(self, idx, generator):
        return (*super().batch(idx, generator), *self.store.read(idx))
