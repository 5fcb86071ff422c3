"""The prepared device calls (experiments/gpu/, with scripts/gpu_data.py and benchmarks/gpu.py):
their data pieces, and their --smoke modes, which run the same steps on the CPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_data  # noqa: E402


def _folder(root: Path, per_class: dict[str, int], classes: int = 10) -> Path:
    """A CIFAR-shaped image folder: 32x32 RGB PNGs, ``per_class[split]`` images per class."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2  # a class signal to learn
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_packed_folder_comes_back_byte_for_byte_from_its_pieces(tmp_path):
    folder = _folder(tmp_path / "set", {"train": 3, "test": 1})
    pieces = gpu_data.pack(folder, tmp_path / "pieces", piece_mib=0.02)
    assert len(pieces) > 1 and all(p.stat().st_size <= 0.02 * 2**20 for p in pieces)
    gpu_data.unpack(tmp_path / "pieces", tmp_path / "back")
    assert _files(tmp_path / "back") == _files(folder)


def test_a_missing_or_damaged_piece_is_named_and_nothing_is_extracted(tmp_path):
    folder = _folder(tmp_path / "set", {"train": 3, "test": 1})
    pieces = gpu_data.pack(folder, tmp_path / "pieces", piece_mib=0.02)
    pieces[1].write_bytes(pieces[1].read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="part-01 is damaged"):
        gpu_data.unpack(tmp_path / "pieces", tmp_path / "back")
    pieces[1].unlink()
    with pytest.raises(SystemExit, match="part-01 is missing"):
        gpu_data.unpack(tmp_path / "pieces", tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.slow
def test_the_measuring_call_runs_its_steps_on_the_cpu(tmp_path):
    out = tmp_path / "measure.json"
    script = ROOT / "benchmarks" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    cells = {(r["model"], r["method"], r["precision"]) for r in result["single"]}
    assert len(cells) == 2 * 3 * 2  # two models, three methods, fp32 and bf16 on the CPU
    assert all(r["steps_per_s"] > 0 for r in result["single"])
    assert [r["runs"] for r in result["concurrent"]] == [1, 2]
    assert all(len(r["steps_per_s_per_run"]) == r["runs"] for r in result["concurrent"])


@pytest.mark.slow
def test_a_grid_call_runs_its_steps_on_the_cpu_and_gives_back_what_finished(tmp_path):
    folder = _folder(tmp_path / "cifar10", {"train": 6, "test": 2})
    gpu_data.pack(folder, tmp_path / "pieces" / "cifar10", piece_mib=0.1)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_DATA": str(tmp_path / "data"),
           "GPU_PIECES": str(tmp_path / "pieces"), "GPU_RUNS": str(tmp_path / "runs"),
           "MOMENTREG_CACHE_DIR": str(tmp_path / "cache"), "PYTHON": sys.executable}  # fmt: skip
    script = ROOT / "experiments" / "gpu" / "cifar.sh"
    done = subprocess.run([str(script), "cifar10-lenet", "--smoke"], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _files(tmp_path / "data" / "cifar10") == _files(folder)  # unpacked from the pieces
    with tarfile.open(tmp_path / "out" / "cifar10-lenet.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("/metrics.json") for n in names) == 4  # the whole tiny grid
    assert not any(n.endswith(".pt") for n in names)
    assert any(n.endswith("/attacks.json") for n in names)  # the winners were evaluated
    assert (tmp_path / "out" / "cifar10-lenet.log").exists()
