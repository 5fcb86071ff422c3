import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from momentreg.data import datasets as data
from momentreg.data.datasets import DatasetError, load_dataset, parse_idx, to_float, train_val_split
from tests.helpers import SHARED_MNIST, cifar_batch, idx_bytes, needs_mnist, write_gz


def test_parse_idx_roundtrip_and_truncation():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(array)
    assert np.array_equal(parse_idx(raw), array)
    with pytest.raises(DatasetError, match="truncated"):
        parse_idx(raw[:-1], "x.idx")
    with pytest.raises(DatasetError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x01" + raw[4:])


def test_missing_file_names_the_file_and_checksum(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path, "test")
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and "--download" in str(e.value)
    assert data._IDX["mnist"]["files"]["t10k-images-idx3-ubyte.gz"][0] in str(e.value)


def test_wrong_content_is_refused_with_the_expected_checksum(tmp_path):
    fake = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", fake)
    with pytest.raises(DatasetError, match="wrong content: expected decompressed SHA-256 0fa7898d"):
        load_dataset("mnist", tmp_path, "test")


def test_not_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a valid gzip"):
        load_dataset("mnist", tmp_path, "test")


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data._IDX["mnist"], "url", "http://127.0.0.1:9/")
    with pytest.raises(DatasetError, match="download of http://127.0.0.1:9/t10k-images.* failed"):
        load_dataset("mnist", tmp_path / "new", "test", download=True)
    assert not list((tmp_path / "new").glob("*"))  # no partial file left


def test_unknown_dataset_and_missing_data_dir():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("svhn", ".", "train")
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist", None, "train")


@needs_mnist
def test_real_mnist_loads_and_verifies():
    images, labels = load_dataset("mnist", SHARED_MNIST, "test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert labels.bincount().tolist()[:2] == [980, 1135]


@needs_mnist
def test_sample_is_a_balanced_subset_of_real_mnist():
    images, labels = load_dataset("mnist-sample", split="train")
    assert images.shape == (10000, 1, 28, 28)
    assert labels.bincount().tolist() == [1000] * 10
    test_images, test_labels = load_dataset("mnist-sample", split="test")
    assert test_labels.bincount().tolist() == [200] * 10
    full, _ = load_dataset("mnist", SHARED_MNIST, "test")
    full_hashes = {hashlib.sha1(im.numpy().tobytes()).digest() for im in full}
    assert all(hashlib.sha1(im.numpy().tobytes()).digest() in full_hashes for im in test_images)


def test_train_val_split_is_seeded_disjoint_90_10():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100)
    (tr_x, tr_y), (va_x, va_y) = train_val_split(images, labels, 0.1, seed=3)
    assert len(tr_y) == 90 and len(va_y) == 10
    assert set(tr_y.tolist()).isdisjoint(va_y.tolist())
    assert torch.equal(train_val_split(images, labels, 0.1, seed=3)[1][1], va_y)
    assert not torch.equal(train_val_split(images, labels, 0.1, seed=4)[1][1], va_y)
    assert torch.equal(tr_x.flatten().long(), tr_y)


def test_to_float_range():
    x = to_float(torch.tensor([0, 128, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x[0] == 0 and x[-1] == 1


def _cifar_dir(root, name="cifar-10-batches-py"):
    folder = root / name
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(cifar_batch(4, i))
    (folder / "test_batch").write_bytes(cifar_batch(3, 9))
    return folder


def test_cifar10_from_extracted_folder_and_from_tar(tmp_path, monkeypatch):
    folder = _cifar_dir(tmp_path)
    images, labels = load_dataset("cifar10", tmp_path, "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and len(labels) == 20
    raw = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())[b"data"], np.uint8)
    assert np.array_equal(images[0].numpy().ravel(), raw[:3072])

    tar_root = tmp_path / "tar"
    tar_root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    (tar_root / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DatasetError, match="wrong MD5"):
        load_dataset("cifar10", tar_root, "test")
    entry = data._CIFAR["cifar10"]
    monkeypatch.setitem(
        data._CIFAR, "cifar10", (entry[0], hashlib.md5(buf.getvalue()).hexdigest(), *entry[2:])
    )
    test_images, _ = load_dataset("cifar10", tar_root, "test")
    assert test_images.shape == (3, 3, 32, 32)


def test_cifar_pickle_cannot_execute_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = _cifar_dir(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="forbidden global"):
        load_dataset("cifar10", tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


def test_truncated_cifar_batch_is_a_clear_error(tmp_path):
    folder = _cifar_dir(tmp_path)
    (folder / "test_batch").write_bytes(cifar_batch(3, 1)[:100])
    with pytest.raises(DatasetError, match="not a valid CIFAR batch"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(cifar_batch(5, 1, b"fine_labels"))
    _, labels = load_dataset("cifar100", tmp_path, "train")
    assert len(labels) == 5
