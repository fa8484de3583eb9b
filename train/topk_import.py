"""``python -m train teacher-topk --config FILE out_dir=DIR import=SERVED.jsonl [k=64] [vocab=N]``: a top-k store
(``train/topk_store.py``) from the per-token top-k log-probabilities of a served teacher (vLLM, SGLang), for
the LM task's corpus, with no teacher run here.

SERVED.jsonl holds one JSON object per corpus file, in the order the task reads the files (``data_dir``: the
file itself, or the folder's text files sorted by path; null: the standard library's sources)::

    {"token_ids": [t_0, ..., t_{n-1}], "top_logprobs": [entry_0, ..., entry_{n-1}]}

``token_ids``: the file's tokens, as the config's ``model`` tokenises it (checked against the corpus).
``entry_t``: the teacher's top log-probabilities for the token after t_0..t_t, as ``[[id, logprob], ...]`` or
``{"id": logprob, ...}``; the last entry may be empty or left out. (vLLM's ``prompt_logprobs`` score token t
from the tokens before it: drop their first entry.) Entries with more than k ids keep their k most likely,
fewer are padded with -1. The training windows (each file's training part, then ``train_subset``) are cut
from these positions exactly as from the text.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ttm_kernels.topk import validate_topk

from . import run_lock, text_data
from .errors import DataError
from .tasks import LanguageModelTask
from .topk_store import LOGPROB_DTYPES, StoreWriter, corpus_fingerprint


def _entry(entry, k, where):
    """One position's (ids, logprobs) of k slots, the k most likely first."""
    pairs = list(entry.items()) if isinstance(entry, dict) else list(entry or [])
    try:
        pairs = sorted(((int(i), float(lp)) for i, lp in pairs), key=lambda pair: -pair[1])[:k]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: an entry of top_logprobs must be [[id, logprob], ...] or {{id: logprob}}, got "
                        f"{str(entry)[:80]}") from exc
    ids = np.full(k, -1, dtype=np.int32)
    logprobs = np.zeros(k, dtype=np.float32)
    ids[:len(pairs)] = [i for i, _ in pairs]
    logprobs[:len(pairs)] = [lp for _, lp in pairs]
    return ids, logprobs


def _documents(path, k):
    """Each line's token ids (n,) and top-k (n, k) ids and log-probabilities."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
            tokens, entries = record["token_ids"], record["top_logprobs"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where}: not a JSON object with token_ids and top_logprobs ({exc})") from exc
        if not len(tokens) - 1 <= len(entries) <= len(tokens):
            raise DataError(f"{where}: {len(entries)} top_logprobs entries for {len(tokens)} token_ids (one per "
                            "token, the last one optional)")
        slots = [_entry(entry, k, where) for entry in entries] + [_entry(None, k, where)] * (len(tokens) - len(entries))
        yield (torch.tensor(tokens, dtype=torch.long), np.stack([s[0] for s in slots]),
               np.stack([s[1] for s in slots]))


def import_jsonl(cfg, options, log=print):
    """The store in ``cfg['out_dir']`` from the served output ``options['import']``, holding the folder's run lock."""
    with run_lock.hold(cfg["out_dir"]):
        return _import_jsonl(cfg, options, log)


def _import_jsonl(cfg, options, log):
    path, k = options["import"], options["k"]
    task = LanguageModelTask(cfg, torch.device("cpu"))
    data = task.build_data(0, 1)
    corpus = text_data.read_corpus(cfg)
    files = corpus.files
    documents = list(_documents(path, k))
    if len(documents) != len(files):
        raise DataError(f"{path} holds {len(documents)} documents, the corpus {len(files)} files ({files[0]}"
                        f"{' ...' if len(files) > 1 else ''}): one line per file, in the same order")
    # Each file's training part is its first tokens (val_fraction and test_fraction cut the text's end): the
    # windows of their positions, then the same random choice of windows as the task's, index the served output.
    train_lengths = [len(ids) for ids in text_data.encode_corpus(task.tokenizer, corpus)["train"]]
    for (tokens, _, _), n_train, file in zip(documents, train_lengths, files):
        if len(tokens) < n_train:
            raise DataError(f"{path}: {len(tokens)} token_ids for {file}, whose training part alone is {n_train} "
                            f"tokens as {cfg['model']!r} tokenises it: import a served teacher's output for the same "
                            "text and tokenizer")
    starts = np.cumsum([0] + [len(tokens) for tokens, _, _ in documents])
    positions, _ = text_data.split_windows([torch.arange(start, start + n) for start, n in zip(starts, train_lengths)],
                                           cfg, -1, cfg["train_subset"])
    tokens = torch.cat([tokens for tokens, _, _ in documents])
    doc_ids = np.concatenate([ids for _, ids, _ in documents])
    doc_logprobs = np.concatenate([logprobs for _, _, logprobs in documents])
    present = (positions >= 0).numpy()[..., None]
    at = positions.clamp_min(0).numpy()
    inputs = torch.where(positions >= 0, tokens[positions.clamp_min(0)], task.tokenizer.pad_id)
    ids = np.where(present, doc_ids[at], -1)
    logprobs = np.where(present, doc_logprobs[at], 0.0).astype(np.float32)
    if not torch.equal(inputs, data.train.inputs):
        raise DataError(f"{path}: its token_ids differ from the corpus as {cfg['model']!r} tokenises it (data_dir "
                        f"{cfg['data_dir']}): import a served teacher's output for the same text and tokenizer")
    vocab = options["vocab"] or data.num_classes
    try:
        validate_topk(torch.from_numpy(ids), torch.from_numpy(logprobs), ids.shape[:-1], vocab,
                      torch.device("cpu"), "bucket")
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc
    writer = StoreWriter(cfg["out_dir"], {
        "teacher": f"import:{os.path.basename(path)}", "teacher_checkpoint": None, "vocab": vocab, "k": k,
        "ids_dtype": "int32", "logprobs_dtype": options["logprobs_dtype"], "corpus": corpus_fingerprint(inputs),
        "seq_len": cfg["seq_len"], "windows": len(inputs), "windows_per_shard": options["windows_per_shard"]})
    dtype = LOGPROB_DTYPES[options["logprobs_dtype"]]
    for first in range(writer.next_window, len(inputs), options["windows_per_shard"]):
        last = first + options["windows_per_shard"]
        writer.write_shard(ids[first:last], logprobs[first:last].astype(dtype))
    log(f"imported {writer.manifest['tokens']} tokens x top-{k} from {path} into {cfg['out_dir']}")
    return writer.manifest
