"""Build the bundled MNIST sample: a class-balanced, seeded subset of the official files.

    python scripts/make_mnist_sample.py ../shared/datasets/mnist

writes src/momentreg/data_files/mnist_sample.npz (1,000 training and 200 test digits per class).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from momentreg.data.datasets import load_dataset

OUT = Path(__file__).resolve().parents[1] / "src" / "momentreg" / "data_files" / "mnist_sample.npz"


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = load_dataset("mnist", args.mnist_dir, split)
        keep = balanced_subset(labels, per_class, args.seed)
        arrays[f"{split}_images"] = images[keep].numpy()
        arrays[f"{split}_labels"] = labels[keep].numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
