"""Offline datasets: Fashion-MNIST (IDX files), CIFAR-100 (python pickles), ImageNet (ImageFolder, torchvision).

Fashion-MNIST and CIFAR-100 live in memory as uint8 tensors; batches are drawn and augmented in torch with a
generator seeded by (seed, epoch, rank), so the data stream of an epoch is a pure function of those three and
a resumed run sees exactly the batches it would have seen. Inside an epoch, ``position()`` says how many batches
were drawn and where the generator stands; ``set_epoch(epoch, position)`` goes on from there (a mid-epoch
checkpoint).
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib
import itertools
import math
import os
import pickle
import struct
import zlib

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .errors import ConfigError, DataError, DatasetNotFoundError, MissingDependencyError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR100_DIR = "data"
IMAGENET_DIR = "data/imagenet"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
              0x0E: torch.float64}


@dataclasses.dataclass
class Data:
    train: object  # iterable of (images, labels) batches with set_epoch(epoch, position), position() and len()
    test: object
    num_classes: int
    input_shape: tuple
    train_size: int
    test_size: int
    unit: str = "images"  # what train_size and test_size count


# ---------------------------------------------------------------------------------------------------- readers

def read_idx(path: str) -> torch.Tensor:
    """An IDX file (the MNIST format), gzip-compressed or raw, as a tensor of its dtype and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated or corrupt gzip stream
        raise DataError(f"cannot read {path} ({exc}): replace it with an intact copy") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    body = 4 + 4 * ndim
    if len(raw) < body:
        raise DataError(f"{path} ends inside its IDX header: replace it with an intact copy")
    shape = struct.unpack(f">{ndim}I", raw[4:body])
    expected = dtype.itemsize * math.prod(shape)
    if len(raw) - body != expected:
        raise DataError(f"{path}: its header says shape {shape} ({expected} bytes) but {len(raw) - body} bytes "
                        "follow: replace it with an intact copy")
    data = torch.frombuffer(bytearray(raw[body:]), dtype=torch.uint8)
    if dtype != torch.uint8:  # multi-byte IDX values are big-endian
        data = data.view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    return data.reshape(shape)


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def fashion_mnist_files(data_dir: str | None) -> list:
    folder = data_dir or FASHION_MNIST_DIR
    paths = [_find_idx(folder, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair]
    if None in paths:
        wanted = ", ".join(stem + "[.gz]" for pair in FASHION_MNIST_FILES.values() for stem in pair)
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: looked for {wanted} in {os.path.abspath(folder)}. Get it with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to {FASHION_MNIST_DIR}) or put "
            "the four IDX files from https://github.com/zalandoresearch/fashion-mnist into data_dir")
    return paths


def load_fashion_mnist(data_dir: str | None):
    files = fashion_mnist_files(data_dir)
    splits = {}
    for split, paths in zip(FASHION_MNIST_FILES, (files[:2], files[2:])):
        images, labels = (read_idx(p) for p in paths)
        if images.dim() != 3 or labels.shape != images.shape[:1]:
            raise DataError(f"Fashion-MNIST files {paths} hold images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)}; expected (N, 28, 28) and (N,)")
        splits[split] = (images.unsqueeze(1), labels.long())
    return splits, 10


def _read_cifar_pickle(path: str):
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # a truncated or foreign file raises any of several unpickling errors
        raise DataError(f"cannot read the CIFAR-100 pickle {path} ({type(exc).__name__}: {exc}): replace it with "
                        "an intact copy") from exc
    if isinstance(entry, dict):
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if not isinstance(entry, dict) or "data" not in entry or "fine_labels" not in entry:
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{path} is not a CIFAR-100 python pickle (it holds {keys}; expected 'data' and "
                        "'fine_labels')")
    images = torch.as_tensor(entry["data"], dtype=torch.uint8)
    labels = torch.as_tensor(entry["fine_labels"], dtype=torch.long)
    if images.numel() != len(labels) * 3 * 32 * 32:
        raise DataError(f"{path} holds {len(labels)} labels but {images.numel()} pixel values, not "
                        f"{len(labels)} x 3 x 32 x 32: replace it with an intact copy")
    return images.reshape(-1, 3, 32, 32), labels


def cifar100_files(data_dir: str | None) -> list:
    base = data_dir or CIFAR100_DIR
    candidates = [os.path.join(base, "cifar-100-python"), base]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, s)) for s in ("train", "test")):
            return [os.path.join(folder, s) for s in ("train", "test")]
    raise DatasetNotFoundError(
        f"CIFAR-100 not found: looked for the python pickles 'train' and 'test' in "
        f"{' and '.join(os.path.abspath(c) for c in candidates)}. Download "
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into data_dir "
        "(it creates cifar-100-python/)")


def load_cifar100(data_dir: str | None):
    train, test = cifar100_files(data_dir)
    return {"train": _read_cifar_pickle(train), "test": _read_cifar_pickle(test)}, 100


# ---------------------------------------------------------------------------------------------------- loaders

def balanced_subset(labels: torch.Tensor, size: int, num_classes: int) -> torch.Tensor:
    """Indices of ``size`` images, classes taken in turn from a fixed (seed 0) random order: every run of a
    comparison trains on the same images."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(labels[order], num_classes)
    rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    return order[torch.sort(rank_in_class, stable=True).indices[:size]]


def split_training_images(labels: torch.Tensor, num_classes: int, val_fraction: float, train_subset: int):
    """(train, validation) indices in the class-balanced order of ``balanced_subset``: the first ``val_fraction``
    validate, the next ``train_subset`` (0 = all the rest) train. Both are class-balanced, they never meet,
    train subsets are nested, and without validation they are ``balanced_subset``'s."""
    order = balanced_subset(labels, len(labels), num_classes)
    n_val = round(len(labels) * val_fraction)
    val, pool = order[:n_val], order[n_val:]
    return (pool[:train_subset] if train_subset else pool), val


def crop_flip(images: torch.Tensor, generator: torch.Generator, crop: bool, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` (when ``crop``) and a random horizontal flip, per image."""
    n, c, h, w = images.shape
    if crop:
        padded = F.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(h))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w))[:, None, None, :]
        images = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class ShardedBatches:
    """Batches of in-memory samples, shuffled and sharded over DDP ranks for training (torch's
    DistributedSampler, seeded), contiguous shards without padding for evaluation. Subclasses turn a batch
    of indices into tensors (``batch``)."""

    def __init__(self, n_samples, batch_size, *, train, seed=0, rank=0, world=1):
        self.batch_size, self.train, self.seed, self.rank = batch_size, train, seed, rank
        self.epoch, self.start = 0, None
        self.generator = torch.Generator()
        self.drawn = 0  # batches of the epoch drawn so far
        if train:
            self.sampler = DistributedSampler(range(n_samples), num_replicas=world, rank=rank, shuffle=True,
                                              seed=seed)
        else:
            self.sampler = range(rank, n_samples, world)

    def set_epoch(self, epoch: int, position: dict | None = None):
        """The next iteration yields epoch ``epoch``'s batches, from the one after ``position`` (``position()`` of
        an iteration of that epoch) when given."""
        self.epoch, self.start = epoch, position
        if self.train:
            self.sampler.set_epoch(epoch)

    def position(self) -> dict:
        """Where the current iteration stands: the batches drawn and the generator's state after them."""
        return {"batches": self.drawn, "generator": self.generator.get_state()}

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        indices = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        self.generator.manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        self.drawn = 0
        if self.start is not None:  # the batches before it were drawn (and augmented) in an earlier process
            self.drawn = self.start["batches"]
            self.generator.set_state(self.start["generator"])
            self.start = None
        for start in range(self.drawn * self.batch_size, len(indices), self.batch_size):
            batch = self.batch(indices[start:start + self.batch_size], self.generator)
            self.drawn += 1
            yield batch

    def batch(self, idx, generator):
        raise NotImplementedError


class InMemoryLoader(ShardedBatches):
    """Normalised float images from uint8 tensors, augmented for training."""

    def __init__(self, images, labels, batch_size, mean, std, *, train, augment="none", seed=0, rank=0, world=1):
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world=world)
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def batch(self, idx, generator):
        images = self.images[idx]
        if self.train and self.augment != "none":
            images = crop_flip(images, generator, crop=self.augment == "crop_flip")
        return (images.float() - self.mean) / self.std, self.labels[idx]


class ImageFolderLoader:
    """ImageNet-style train/val folders through torchvision with the usual ResNet transforms."""

    def __init__(self, folder, batch_size, *, train, seed, rank, world, num_workers):
        tv = _torchvision()
        t = tv.transforms
        normalize = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        transform = (t.Compose([t.RandomResizedCrop(224), t.RandomHorizontalFlip(), t.ToTensor(), normalize])
                     if train else t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(), normalize]))
        self.dataset = tv.datasets.ImageFolder(folder, transform)
        self.train, self.seed, self.batch_size = train, seed, batch_size
        self.sampler = (DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                        if train else list(range(rank, len(self.dataset), world)))
        self.order = _Skipping(self.sampler)
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=self.order,
                                                  num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                                  generator=self.generator)
        self.drawn = 0

    def set_epoch(self, epoch, position=None):
        """As ``ShardedBatches.set_epoch``. Resumed inside an epoch, the images that follow come in the same order,
        but their random crops and flips are not those of an uninterrupted run (the workers' RNG streams are not
        replayed)."""
        self.generator.manual_seed(self.seed * 100_003 + epoch)  # seeds the workers' augmentation
        self.order.skip = position["batches"] * self.batch_size if position else 0
        if self.train:
            self.sampler.set_epoch(epoch)

    def position(self) -> dict:
        return {"batches": self.drawn}

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)  # the whole epoch's, also when resumed inside it

    def __iter__(self):
        self.drawn = self.order.skip // self.batch_size
        for batch in self.loader:
            self.drawn += 1
            yield batch


class _Skipping(torch.utils.data.Sampler):
    """``sampler``'s indices without the first ``skip`` (those of the batches a resumed epoch already trained on)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip


def _torchvision():
    try:
        return importlib.import_module("torchvision")
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise MissingDependencyError(f"dataset 'imagenet' needs torchvision, which failed to import ({exc}); install "
                                     "the torchvision build matching your torch (pip install torchvision)") from exc


# ---------------------------------------------------------------------------------------------------- registry

def _in_memory(loader_fn, mean, std, default_augment):
    def build(cfg, rank, world):
        splits, num_classes = loader_fn(cfg["data_dir"])
        (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        if cfg["train_subset"] or cfg["val_fraction"]:
            idx, val_idx = split_training_images(train_y, num_classes, cfg["val_fraction"], cfg["train_subset"])
            if cfg["eval_split"] == "val":
                test_x, test_y = train_x[val_idx], train_y[val_idx]
            train_x, train_y = train_x[idx], train_y[idx]
        if cfg["test_subset"]:
            test_x, test_y = test_x[:cfg["test_subset"]], test_y[:cfg["test_subset"]]
        augment = default_augment if cfg["augment"] == "auto" else cfg["augment"]
        train = InMemoryLoader(train_x, train_y, _per_rank_batch(cfg, world), mean, std, train=True,
                               augment=augment, seed=cfg["seed"], rank=rank, world=world)
        test = InMemoryLoader(test_x, test_y, cfg["test_batch_size"], mean, std, train=False, rank=rank,
                              world=world)
        return Data(train, test, num_classes, tuple(train_x.shape[1:]), len(train_y), len(test_y))
    return build


def build_imagenet(cfg, rank, world):
    folder = cfg["data_dir"] or IMAGENET_DIR
    if not all(os.path.isdir(os.path.join(folder, s)) for s in ("train", "val")):
        raise DatasetNotFoundError(f"ImageNet not found: expected the class folders train/ and val/ (ImageFolder "
                                   f"layout) in {os.path.abspath(folder)}; set data_dir to your ILSVRC-2012 copy")
    common = dict(seed=cfg["seed"], rank=rank, world=world, num_workers=cfg["num_workers"])
    train = ImageFolderLoader(os.path.join(folder, "train"), _per_rank_batch(cfg, world), train=True, **common)
    test = ImageFolderLoader(os.path.join(folder, "val"), cfg["test_batch_size"], train=False, **common)
    return Data(train, test, len(train.dataset.classes), (3, 224, 224), len(train.dataset), len(test.dataset))


def _per_rank_batch(cfg, world):
    if cfg["batch_size"] % world:
        raise ConfigError(f"batch_size {cfg['batch_size']} must be divisible by the number of processes {world}")
    return cfg["batch_size"] // world


DATASETS = {
    "fashion_mnist": _in_memory(load_fashion_mnist, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "none"),
    "cifar100": _in_memory(load_cifar100, CIFAR100_MEAN, CIFAR100_STD, "crop_flip"),
    "imagenet": build_imagenet,
}


SOURCE_FILES = {"fashion_mnist": fashion_mnist_files, "cifar100": cifar100_files}


def source_files(cfg) -> list:
    """The files an in-memory dataset is read from (their contents fingerprint it)."""
    if cfg["dataset"] not in SOURCE_FILES:
        raise ConfigError(f"dataset {cfg['dataset']!r} is not read into memory from a few files; only "
                          f"{', '.join(SOURCE_FILES)} can be fingerprinted")
    return SOURCE_FILES[cfg["dataset"]](cfg["data_dir"])


def build_data(cfg, rank=0, world=1) -> Data:
    return DATASETS[cfg["dataset"]](cfg, rank, world)
