"""A per-user cache for what is slow to make and safe to reuse: trained demo teachers, BPE tokenizers and the
corpus tokenised with them. Each entry is named by a hash of everything it depends on (its config and the
fingerprint of its data), so a changed config or dataset makes a new entry instead of reusing a stale one.

Location: ``$TTM_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/ttm-kernels``, else ``~/.cache/ttm-kernels``. Deleting
it is always safe (everything in it is remade on demand).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os


def cache_dir(*parts: str) -> str:
    root = os.environ.get("TTM_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ttm-kernels")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def hash_content(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths, root: str) -> str:
    """sha256 of the files' names relative to ``root`` and their contents, in the given order."""
    return hash_json([(os.path.relpath(path, root), hash_content(path)) for path in paths])


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock on ``path + '.lock'`` for the block: concurrent processes (DDP ranks, two demos) make a
    cache entry once and the others wait, then read it."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
