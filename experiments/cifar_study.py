"""What the CIFAR study is: its tasks (spec, model, dataset), the fair comparison's
accuracy window and the certification setting. Read by the runner (cifar.py), the verdicts and
the page."""

from __future__ import annotations

from study import ROOT

# name -> (spec, model label, dataset label)
TASKS = {
    "cifar10-lenet": (ROOT / "experiments/cifar10-lenet.toml", "LeNet", "CIFAR-10 (JPEG copy)"),
    "cifar10-alexnet": (
        ROOT / "experiments/cifar10-alexnet.toml",
        "AlexNet",
        "CIFAR-10 (JPEG copy)",
    ),
    "mnist-paper": (ROOT / "experiments/mnist-paper.toml", "LeNet", "MNIST"),
}

CIFAR_TASKS = ("cifar10-lenet", "cifar10-alexnet")

TOLERANCE = 0.39  # accuracy points below the clean mean that still compete (paper, Fig. 3b)

SMOOTHING = {"sigma": 0.25, "n0": 100, "alpha": 0.001}
