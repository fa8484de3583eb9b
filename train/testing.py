"""Tiny synthetic datasets written in the official file formats, and small configs: for the tests and quick checks."""
import gzip
import os
import pickle
import struct

import torch


def write_idx(path, tensor: torch.Tensor):
    """Write a uint8 tensor as an IDX file (gzip-compressed when ``path`` ends in .gz)."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload = header + tensor.to(torch.uint8).contiguous().numpy().tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def synthetic_images(n, num_classes, shape, seed=0):
    """Images whose brightness pattern depends on the label, so that a model can learn them quickly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    noise = torch.randint(0, 60, (n, *shape), generator=g)
    stripe = torch.zeros(n, *shape, dtype=torch.long)
    for c in range(num_classes):
        stripe[labels == c, ..., (c * 2) % shape[-1]:(c * 2) % shape[-1] + 2] = 190
    return (noise + stripe).clamp(0, 255).to(torch.uint8), labels


def write_fashion_mnist(folder, n_train=512, n_test=256, gz=True):
    os.makedirs(folder, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, 10, (28, 28), seed)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    return folder


def write_cifar100(root, n_train=200, n_test=100, bytes_keys=False):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, 100, (3, 32, 32), seed)
        entry = {"data": images.reshape(n, -1).numpy(), "fine_labels": labels.tolist(),
                 "coarse_labels": (labels // 5).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(entry, f)
    return root


def run_cfg(tmp_path, data_dir, name, **keys):
    """A validated small config writing to tmp_path/name."""
    from train import config

    base = {"dataset": "fashion_mnist", "data_dir": str(data_dir), "model": "cnn_student", "epochs": 1,
            "batch_size": 64, "test_batch_size": 128, "lr": 0.05, "threads": 1, "progress": False,
            "tensorboard": False, "out_dir": os.path.join(str(tmp_path), name)}
    base.update(keys)
    cfg = config.defaults()
    cfg.update(base)
    return config.validate(cfg)
