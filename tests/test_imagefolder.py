"""Image-folder datasets, on folders of PNG/JPEG/BMP files that the tests write."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from momentreg.cli.main import main
from momentreg.data.datasets import load_dataset
from momentreg.data.imagefolder import cache_dir, load_imagefolder
from momentreg.models.zoo import build_model, input_spec
from momentreg.runs.run import RunConfig, load_splits

CLASSES = ("cat", "ant", "bee")  # written unsorted: labels must follow the sorted names


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOMENTREG_CACHE_DIR", str(tmp_path / "cache"))


def write_folder(root, per_class=4, size=8, mode="RGB", seed=0, suffix=".png"):
    """root/{train,test}/<class>/<i>.png with random pixels; returns {(split, class): arrays}."""
    rng = np.random.default_rng(seed)
    written = {}
    channels = 3 if mode == "RGB" else 1
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            arrays = []
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
                pixels = array if mode == "RGB" else array[..., 0]
                Image.fromarray(pixels, mode).save(folder / f"{i:03d}{suffix}")
                arrays.append(array.transpose(2, 0, 1))
            written[split, name] = arrays
    return written


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_png_round_trip_is_exact_and_classes_are_sorted(tmp_path, mode):
    written = write_folder(tmp_path, mode=mode)
    for split in ("train", "test"):
        images, labels, classes = load_imagefolder(tmp_path, split)
        assert classes == sorted(CLASSES)
        assert images.dtype == torch.uint8 and images.shape == (12, 3 if mode == "RGB" else 1, 8, 8)
        expected = np.stack([a for name in sorted(CLASSES) for a in written[split, name]])
        assert np.array_equal(images.numpy(), expected)
        assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_jpeg_and_bmp_decode_like_pillow(tmp_path):
    write_folder(tmp_path / "jpeg", suffix=".jpg")
    images, _, _ = load_imagefolder(tmp_path / "jpeg", "train")
    first = np.asarray(Image.open(tmp_path / "jpeg/train/ant/000.jpg").convert("RGB"))
    assert np.array_equal(images[0].numpy(), first.transpose(2, 0, 1))
    written = write_folder(tmp_path / "bmp", suffix=".bmp")
    images, _, _ = load_imagefolder(tmp_path / "bmp", "test")
    assert np.array_equal(images[0].numpy(), written["test", "ant"][0])


def test_cache_is_used_and_invalidated_by_a_changed_file(tmp_path):
    root = tmp_path / "data"
    write_folder(root)
    first, _, _ = load_imagefolder(root, "train")
    cached = list(cache_dir().glob("*.npz"))
    assert len(cached) == 1
    # the cache is what the second call reads: damage the folder's pixels behind its back...
    with np.load(cached[0]) as npz:
        assert np.array_equal(npz["images"], first.numpy())
    again, _, _ = load_imagefolder(root, "train")
    assert torch.equal(again, first)
    # ...and a rewritten image (new size and time stamp) makes a new entry with its pixels
    new = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(new).save(root / "train/bee/001.png", compress_level=0)
    changed, _, _ = load_imagefolder(root, "train")
    assert np.array_equal(changed[5].numpy(), new.transpose(2, 0, 1))
    assert len(list(cache_dir().glob("*.npz"))) == 2


def test_a_damaged_cache_entry_is_decoded_again(tmp_path):
    write_folder(tmp_path / "data")
    first, _, _ = load_imagefolder(tmp_path / "data", "test")
    (entry,) = cache_dir().glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    again, _, _ = load_imagefolder(tmp_path / "data", "test")
    assert torch.equal(again, first)


def test_load_dataset_and_models_shaped_by_the_folder(tmp_path):
    write_folder(tmp_path, size=16, mode="L")
    images, labels = load_dataset("imagefolder", tmp_path, "train")
    spec = input_spec(images, 3)
    assert spec[:3] == (1, 16, 3)
    pixels = images.double() / 255
    assert spec[3][0] == pytest.approx(pixels.mean().item())
    assert spec[4][0] == pytest.approx(pixels.std(unbiased=False).item())
    model = build_model("lenet", "imagefolder", spec)
    assert model(images.float() / 255).shape == (12, 3)


def _break_truncated(root):
    path = root / "train/bee/002.png"
    path.write_bytes(path.read_bytes()[:40])
    return path


def _break_empty_class(root):
    folder = root / "train/dog"
    folder.mkdir()
    return folder


def _break_mixed_sizes(root):
    path = root / "test/cat/001.png"
    Image.fromarray(np.zeros((10, 8, 3), dtype=np.uint8)).save(path)
    return path


def _break_mixed_channels(root):
    path = root / "train/cat/003.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "L").save(path)
    return path


def _break_not_an_image(root):
    path = root / "train/ant/notes.txt"
    path.write_text("not a picture")
    return path


def _break_renamed_text(root):
    path = root / "test/ant/000.png"
    path.write_text("not a picture either")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [
        _break_truncated,
        _break_empty_class,
        _break_mixed_sizes,
        _break_mixed_channels,
        _break_not_an_image,
        _break_renamed_text,
    ],
)
def test_a_bad_folder_is_one_line_naming_the_file_exit_2_nothing_written(tmp_path, damage):
    root = tmp_path / "data"
    write_folder(root)
    culprit = damage(root)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "momentreg", "train", "--dataset", "imagefolder"]
        + ["--data-dir", str(root), "--epochs", "1", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momentreg: error: ")
    assert str(culprit) in lines[0]
    assert not out.exists()


def test_train_and_evaluate_a_folder_from_the_cli(tmp_path, capsys):
    root = tmp_path / "data"
    write_folder(root, per_class=20, size=12, mode="L")
    out = tmp_path / "run"
    common = ["--dataset", "imagefolder", "--data-dir", str(root), "--quiet"]
    args = ["train", *common, "--model", "lenet", "--epochs", "1", "--batch-size", "10"]
    assert main([*args, "--gnr-limit", "6", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["input_spec"][:3] == [1, 12, 3]  # what the run needs to rebuild its model
    assert main(["evaluate", str(out), "--quiet"]) == 0
    assert "on 60 images" in capsys.readouterr().out


def test_evaluate_stride_takes_a_class_balanced_subset(tmp_path):
    root = tmp_path / "data"
    write_folder(root, per_class=20, size=12, mode="L")
    out = tmp_path / "run"
    common = ["--dataset", "imagefolder", "--data-dir", str(root), "--quiet"]
    train = ["train", *common, "--epochs", "1", "--batch-size", "10", "--gnr-limit", "3"]
    assert main([*train, "--out", str(out)]) == 0
    certify = [
        "--certify",
        "--n0",
        "10",
        "--n",
        "20",
        "--batch",
        "20",
        "--failure-probability",
        "0.1",
    ]
    assert main(["evaluate", str(out), "--quiet", *certify, "--limit", "6", "--stride", "10"]) == 0
    rows = (out / "certify-sigma0.25.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[1]) for r in rows] == [0, 0, 1, 1, 2, 2]  # test images 0, 10, ..., 50
    assert [int(r.split("\t")[0]) for r in rows] == [0, 10, 20, 30, 40, 50]  # their test indices
    assert json.loads((out / "certify.json").read_text())["0.25"]["stride"] == 10


def test_train_limit_on_a_class_sorted_folder_draws_from_every_class(tmp_path):
    write_folder(tmp_path, per_class=20, size=12, mode="L")
    settings = {"dataset": "imagefolder", "data_dir": str(tmp_path), "train_limit": 30}
    (_, train_y), (_, val_y), _ = load_splits(RunConfig.from_settings(settings))
    labels = torch.cat([train_y, val_y])
    assert len(labels) == 30 and set(labels.tolist()) == {0, 1, 2}  # the first 30 are 2 classes
