"""Dataset readers and loaders on small files written in the official formats."""
import pytest
import torch

from train import data
from train.errors import DatasetNotFoundError, MissingDependencyError

from train.testing import run_cfg, write_cifar100, write_fashion_mnist, write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    x = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    path = str(tmp_path / ("x.idx" + (".gz" if gz else "")))
    write_idx(path, x)
    assert torch.equal(data.read_idx(path), x)


def test_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(tmp_path / "bad"))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loader(tmp_path, gz):
    folder = write_fashion_mnist(str(tmp_path / "fm"), n_train=300, n_test=70, gz=gz)
    d = data.build_data(run_cfg(tmp_path, folder, "r", train_subset=200, batch_size=64))
    assert (d.num_classes, d.input_shape, d.train_size, d.test_size) == (10, (1, 28, 28), 200, 70)
    assert torch.bincount(d.train.labels).tolist() == [20] * 10  # class-balanced subset
    batches = list(d.train)
    assert [len(y) for _, y in batches] == [64, 64, 64, 8]
    assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (64, 1, 28, 28)


def test_split_training_images_balanced_disjoint_nested():
    labels = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(1))  # unequal class sizes
    train, val = data.split_training_images(labels, 10, 0.1, 0)
    assert len(val) == 300 and torch.bincount(labels[val]).tolist() == [30] * 10
    assert len(train) == 2700 and not set(train.tolist()) & set(val.tolist())
    subset, same_val = data.split_training_images(labels, 10, 0.1, 500)
    assert torch.equal(same_val, val) and torch.equal(subset, train[:500])  # nested in the larger training sets
    assert torch.bincount(labels[subset]).tolist() == [50] * 10
    # Without validation, train_subset picks the images it always picked.
    assert torch.equal(data.split_training_images(labels, 10, 0.0, 500)[0], data.balanced_subset(labels, 500, 10))


def test_eval_split_val_evaluates_on_the_held_out_training_images(tmp_path):
    folder = write_fashion_mnist(str(tmp_path / "fm"), n_train=400, n_test=70)
    d = data.build_data(run_cfg(tmp_path, folder, "r", val_fraction=0.25, eval_split="val", train_subset=200))
    assert (d.train_size, d.test_size) == (200, 100)
    train_images = {tuple(x.flatten().tolist()) for x in d.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_images for x in d.test.images)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as exc:
        data.build_data(run_cfg(tmp_path, tmp_path / "nowhere", "r"))
    assert str(tmp_path / "nowhere") in str(exc.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.tar.gz"):
        data.build_data(run_cfg(tmp_path, tmp_path / "nowhere", "r", dataset="cifar100", model="resnet8"))


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar100_pickles(tmp_path, bytes_keys):
    root = write_cifar100(str(tmp_path / "c"), n_train=120, n_test=50, bytes_keys=bytes_keys)
    cfg = run_cfg(tmp_path, root, "r", dataset="cifar100", model="resnet8", batch_size=32)
    d = data.build_data(cfg)
    assert (d.num_classes, d.input_shape, d.train_size, d.test_size) == (100, (3, 32, 32), 120, 50)
    assert d.train.augment == "crop_flip"
    assert d.test.labels.tolist() == [i % 100 for i in range(50)]  # fine labels
    images, _ = next(iter(d.test))
    mean = torch.tensor(data.CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR100_STD).view(1, 3, 1, 1)
    assert torch.allclose(images, (d.test.images.float() / 255 - mean) / std, atol=1e-5)


def test_crop_flip_moves_whole_windows():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    out = data.crop_flip(x, torch.Generator().manual_seed(0), crop=True, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    flips = data.crop_flip(x, torch.Generator().manual_seed(0), crop=False)
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(2)) for f, a in zip(flips, x))


def test_shards_cover_the_test_set_once(tmp_path):
    folder = write_fashion_mnist(str(tmp_path / "fm"), n_train=100, n_test=75)
    cfg = run_cfg(tmp_path, folder, "r", batch_size=10, test_batch_size=8)
    labels = [data.build_data(cfg, rank, 2) for rank in range(2)]
    assert sorted(sum((list(d.test.sampler) for d in labels), [])) == list(range(75))
    epoch_orders = [list(d.train.sampler) for d in labels]
    assert not set(epoch_orders[0]) & set(epoch_orders[1])  # distinct training shards


def test_imagenet_without_torchvision_is_a_clear_error(tmp_path):
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision is installed")
    for split in ("train", "val"):
        (tmp_path / "inet" / split).mkdir(parents=True)
    with pytest.raises(MissingDependencyError, match="needs torchvision"):
        data.build_data(run_cfg(tmp_path, tmp_path / "inet", "r", dataset="imagenet", model="tv_resnet18"))
