"""Datasets in their published formats (MNIST and Fashion-MNIST IDX, CIFAR pickles, image
folders) as uint8 tensors, and the bundled MNIST sample."""

from momentreg.data.datasets import DATASET_NAMES, load_dataset, to_float, train_val_split

__all__ = ["DATASET_NAMES", "load_dataset", "to_float", "train_val_split"]
