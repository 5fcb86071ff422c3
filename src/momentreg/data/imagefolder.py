"""Image-folder datasets: ``ROOT/train/<class>/<image>`` and ``ROOT/test/<class>/<image>``.

The layout of torchvision's ``ImageFolder`` and of the Hugging Face ``imagefolder`` loader: classes
are the folder names of ``ROOT/train``, sorted, and label ``k`` is the ``k``-th of them. Images are
PNG, JPEG or BMP files, decoded with Pillow. One dataset has one image size and one channel count
(grayscale "L"/"1" gives 1 channel, RGB and palette images 3); anything else is a
``DatasetError`` that names the file. Hidden files (``.name``) are skipped.

Decoding 60,000 files takes a while, so each split is decoded once and cached as an uncompressed
``.npz`` under ``$MOMENTREG_CACHE_DIR`` (default ``~/.cache/momentreg``). The cache key covers the
folder's absolute path and every file's name, size and modification time, so adding, removing or
rewriting an image makes a new cache entry.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from momentreg.errors import DatasetError

__all__ = ["load_imagefolder", "imagefolder_classes", "cache_dir", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_GRAY, _COLOR = {"1", "L"}, {"RGB", "P", "CMYK", "YCbCr"}
_CACHE_FORMAT = "imagefolder-v1"


def cache_dir() -> Path:
    """Where decoded splits are cached: $MOMENTREG_CACHE_DIR, else $XDG_CACHE_HOME/momentreg."""
    if os.environ.get("MOMENTREG_CACHE_DIR"):
        return Path(os.environ["MOMENTREG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "momentreg"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def imagefolder_classes(root: str | Path) -> list[str]:
    """The class names: the sorted folder names of ``root/train``."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise DatasetError(f"{train} is not a folder: an imagefolder dataset has train/<class>/")
    classes = [p.name for p in _visible(train) if p.is_dir()]
    if not classes:
        raise DatasetError(f"{train} has no class folders: expected train/<class>/<image>")
    return classes


def _files(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image of ``split``, in class then file-name order."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: an imagefolder dataset has {split}/<class>/")
    index = {name: k for k, name in enumerate(classes)}
    files = []
    for entry in _visible(folder):
        if not entry.is_dir():
            raise DatasetError(f"{entry} is not inside a class folder ({split}/<class>/<image>)")
        if entry.name not in index:
            raise DatasetError(f"{entry} is a class that {root / 'train'} does not have")
        images = _visible(entry)
        if not images:
            raise DatasetError(f"{entry} is an empty class: it holds no images")
        for path in images:
            if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"{path} is not an image file (PNG, JPEG or BMP)")
            files.append((path, index[entry.name]))
    if not files:
        raise DatasetError(f"{folder} has no class folders: expected {split}/<class>/<image>")
    return files


def _decode(path: Path) -> np.ndarray:
    """One image -> uint8 [C, H, W] (C = 1 for grayscale, 3 for color)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _GRAY:
                img = img.convert("L")
            elif img.mode in _COLOR and "transparency" not in img.info:
                img = img.convert("RGB")
            else:
                raise DatasetError(
                    f"{path} has pixel mode {img.mode} (alpha or high bit depth): save it as "
                    "8-bit grayscale or RGB"
                )
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path} cannot be decoded ({e})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _key(root: Path, split: str, files: list[tuple[Path, int]], classes: list[str]) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{root.resolve()}\n{split}\n".encode())
    digest.update("\n".join(classes).encode())
    for path, label in files:
        stat = path.stat()
        line = f"\n{path.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}"
        digest.update(line.encode())
    return digest.hexdigest()[:24]


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"], npz["labels"]
    except Exception:  # absent, or damaged in any way (bad zip, missing array): decode again
        return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Best effort: an unwritable cache folder only costs the next call a decode."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def load_imagefolder(
    root: str | Path, split: str = "train", cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images uint8 [N, C, H, W], labels int64 [N], class names) of ``root/split``.

    Every image must have the size and channel count of the first training image (the dataset's
    shape); the first file that differs is named in the error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (expected {root}/train/<class>/<image>)")
    classes = imagefolder_classes(root)
    files = _files(root, split, classes)
    cached = cache_dir() / f"{_key(root, split, files, classes)}.npz" if cache else None
    found = _read_cache(cached) if cached is not None else None
    if found is not None:
        images, labels = found
    else:
        reference = _files(root, "train", classes)[0][0] if split != "train" else files[0][0]
        shape = _decode(reference).shape
        images = np.empty((len(files), *shape), dtype=np.uint8)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            decoded = pool.map(_decode, [path for path, _ in files])
            bar = tqdm(
                decoded, total=len(files), desc=f"decoding {split}", leave=False, disable=None
            )
            for i, (array, (path, _)) in enumerate(zip(bar, files, strict=True)):
                if array.shape != shape:
                    raise DatasetError(
                        f"{path} is {_describe(array.shape)}, but the dataset's images are "
                        f"{_describe(shape)} (first: {reference}); one size and channel count "
                        "per dataset"
                    )
                images[i] = array
        labels = np.array([label for _, label in files], dtype=np.int64)
        if cached is not None:
            _write_cache(cached, images, labels)
    return torch.from_numpy(images), torch.from_numpy(labels), classes


def _describe(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    return f"{width}x{height} with {channels} channel{'s' if channels > 1 else ''}"
