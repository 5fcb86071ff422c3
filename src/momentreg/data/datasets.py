"""Datasets in their official formats, held in memory as uint8 tensors.

``load_dataset(name, data_dir, split)`` -> (images uint8 [N, C, H, W], labels int64 [N]).
MNIST and Fashion-MNIST: the IDX gzip files. CIFAR-10/100: the official "python version"
``cifar-*-python.tar.gz`` or its extracted ``cifar-*-batches-py`` / ``cifar-100-python``
folder, read with a restricted unpickler. ``imagefolder``: ``DIR/{train,test}/<class>/<image>``
(momentreg.data.imagefolder). ``mnist-sample``: a class-balanced subset of real MNIST shipped inside
the package (built by ``scripts/make_mnist_sample.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from momentreg.errors import ConfigError, DatasetError

__all__ = ["DatasetError", "load_dataset", "to_float", "train_val_split", "DATASET_NAMES"]


# file -> (sha256 of the decompressed IDX content, md5 of the official .gz archive)
_IDX = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "files": {
            "train-images-idx3-ubyte.gz": (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ),
            "train-labels-idx1-ubyte.gz": (
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "d53e105ee54ea40749a09fcbcd1e9432",
            ),
            "t10k-images-idx3-ubyte.gz": (
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "9fb629c4189551a2d022fa330f9573f3",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ),
            "train-labels-idx1-ubyte.gz": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "25c81989df183df01b3e8a0aad5dffbe",
            ),
            "t10k-images-idx3-ubyte.gz": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "bef4ecab320f06d8554ea6380940ec79",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        },
    },
}

# name -> (archive, md5 of the archive, extracted folder, train members, test members, label key)
_CIFAR = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
    ),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
SAMPLE = "mnist-sample"
IMAGEFOLDER = "imagefolder"
DATASET_NAMES = (SAMPLE, *_IDX, *_CIFAR, IMAGEFOLDER)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float32 in [0, 1]; float images are only cast to float32."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def train_val_split(
    images: torch.Tensor, labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random split into (train, validation), 90/10 by default as in the paper."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(labels)))
    val, train = perm[:n_val], perm[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def load_dataset(
    name: str, data_dir: str | Path | None = None, split: str = "train", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's images and labels, as published (its official split).

    Args:
        name: one of ``DATASET_NAMES``: mnist, fashion-mnist, cifar10, cifar100 (their official
            files), imagefolder (a folder of class folders, or train/ and test/ of them) or
            mnist-sample (bundled: 1,000 training and 200 test digits per class).
        data_dir: the folder holding the files (not needed for mnist-sample).
        split: "train" or "test".
        download: fetch the official files into ``data_dir`` where they are missing.

    Returns:
        ``(images, labels)``: uint8 images in [0, 255] and int64 labels.

    Shape:
        images: [N, C, H, W]; labels: [N].

    Example:
        >>> images, labels = load_dataset("mnist-sample", split="test")
        >>> images.shape, images.dtype, labels.shape
        (torch.Size([2000, 1, 28, 28]), torch.uint8, torch.Size([2000]))
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if name == SAMPLE:
        return _load_sample(split)
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir (add --download to fetch it there)")
    data_dir = Path(data_dir)
    if name in _IDX:
        return _load_idx(name, data_dir, split, download)
    if name == IMAGEFOLDER:
        if download:
            raise DatasetError("--download does not apply to imagefolder: it reads your folder")
        from momentreg.data.imagefolder import load_imagefolder

        images, labels, _ = load_imagefolder(data_dir, split)
        return images, labels
    return _load_cifar(name, data_dir, split, download)


def _load_sample(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref = resources.files("momentreg") / "data_files" / "mnist_sample.npz"
    with resources.as_file(ref) as path, np.load(path) as npz:
        return torch.from_numpy(npz[f"{split}_images"]), torch.from_numpy(npz[f"{split}_labels"])


# -- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------


def _fetch(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(
            f"download of {url} failed ({e}); put the file into {dest.parent} yourself and rerun "
            "without --download"
        ) from None
    tmp.replace(dest)


def _idx_bytes(name: str, data_dir: Path, file: str, download: bool) -> bytes:
    sha_raw, md5_gz = _IDX[name]["files"][file]
    path = data_dir / file
    if not path.exists() and download:
        _fetch(_IDX[name]["url"] + file, path)
    if not path.exists():
        raise DatasetError(
            f"{path} is missing: put the official {name} file {file} there "
            f"(decompressed SHA-256 {sha_raw}), or pass --download"
        )
    packed = path.read_bytes()
    try:
        raw = gzip.decompress(packed)
    except (OSError, EOFError) as e:
        raise DatasetError(
            f"{path} is not a valid gzip file ({e}): delete it, fetch it again"
        ) from None
    if hashlib.sha256(raw).hexdigest() != sha_raw and hashlib.md5(packed).hexdigest() != md5_gz:
        raise DatasetError(
            f"{path} has the wrong content: expected decompressed SHA-256 {sha_raw} (or archive "
            f"MD5 {md5_gz}), got SHA-256 {hashlib.sha256(raw).hexdigest()}; delete it and fetch "
            "the official file again"
        )
    return raw


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """An uncompressed IDX file (unsigned-byte data) -> numpy array of its declared shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{source} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise DatasetError(
            f"{source} has {len(raw) - header} data bytes, its header declares {size}: "
            "truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx(name: str, data_dir: Path, split: str, download: bool):
    prefix = "train" if split == "train" else "t10k"
    img_file, lbl_file = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    images = parse_idx(_idx_bytes(name, data_dir, img_file, download), str(data_dir / img_file))
    labels = parse_idx(_idx_bytes(name, data_dir, lbl_file, download), str(data_dir / lbl_file))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# -- CIFAR ---------------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's pickles hold: dicts, lists, bytes/str and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(data: bytes, source: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (uint8 [N, 3, 32, 32], int64 [N])."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as e:  # any malformed content: report which file, never a traceback
        raise DatasetError(
            f"{source} is not a valid CIFAR batch ({type(e).__name__}: {e})"
        ) from None
    if len(images) != len(labels):
        raise DatasetError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _load_cifar(name: str, data_dir: Path, split: str, download: bool):
    archive, md5, folder, train_members, test_members, label_key = _CIFAR[name]
    members = train_members if split == "train" else test_members
    extracted, tar_path = data_dir / folder, data_dir / archive
    if not extracted.is_dir() and not tar_path.exists() and download:
        _fetch(_CIFAR_URL + archive, tar_path)
    parts = []
    if extracted.is_dir():
        for member in members:
            path = extracted / member
            if not path.exists():
                raise DatasetError(f"{path} is missing from the extracted {name} folder")
            parts.append(read_cifar_batch(path.read_bytes(), str(path), label_key))
    elif tar_path.exists():
        if hashlib.md5(tar_path.read_bytes()).hexdigest() != md5:
            raise DatasetError(
                f"{tar_path} has the wrong MD5 (expected {md5}): delete it and fetch it again"
            )
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in members:
                f = tar.extractfile(f"{folder}/{member}")
                parts.append(read_cifar_batch(f.read(), f"{tar_path}:{member}", label_key))
    else:
        raise DatasetError(
            f"neither {tar_path} nor {extracted}/ exists: put the official {archive} "
            f"(MD5 {md5}) into {data_dir}, or pass --download"
        )
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
