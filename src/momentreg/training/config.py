"""Every training setting (``TrainConfig``, checked by its ``validate``) and the paper's protocol
per model (``PROTOCOLS``), which a run starts from."""

from __future__ import annotations

import dataclasses
import math

from momentreg.core.regularizer import DEPTHS, MOMENT_LOSSES, WEIGHTINGS
from momentreg.core.smoothing_losses import MACER_BETA, MACER_GAMMA
from momentreg.errors import ConfigError
from momentreg.training.methods import COPIES, METHODS

__all__ = ["TrainConfig", "PROTOCOLS", "LR_SCHEDULES", "KEEP"]

LR_SCHEDULES = ("plateau", "step", "budget-step")
KEEP = ("best", "last")
BUDGETS = ("time_budget", "step_budget", "pass_budget")  # a run has at most one


@dataclasses.dataclass
class TrainConfig:
    """Every training setting. ``folds`` is N of N-fold augmentation (N = 1 is clean).

    A run has at most one budget. With ``time_budget`` it ends inside the epoch in which its
    training steps (timed on the host, the step's loss read back) have taken that many seconds
    (the first step of the call, which compiles, is not counted); that partial epoch is validated
    and checkpointed like any other. Where it stops depends on the clock, so such a run is not
    bit-for-bit repeatable; with ``step_budget`` it ends after that many steps on any machine
    (and on the CPU, with the same threads, repeats bit for bit); with ``pass_budget`` after the
    steps whose counted compute (steps x batch x passes per image) fits in that many clean epochs
    of the training set: every method the same FLOPs, on any machine."""

    method: str = "clean"
    sigma: float = 0.0
    alpha: float = 1.0
    folds: int = 1
    moment_depth: str = "first"  # moment: "first" (the paper) or "all" layers
    moment_loss: str = "mean"  # moment: "mean" or "expected-ce" (needs moment_depth="all")
    moment_noise: bool = False  # moment: the first term sees a freshly noised batch (hybrid)
    moment_weighting: str = "sum"  # moment: "sum" (the paper's Eq. 2) or "convex" (/ (1 + alpha))
    samples: int = 0  # consistency, macer: noisy copies per image (0: theirs, 2 and 16;
    # macer-analytic: copies for its NLL term, 0 for none)
    eta: float = 0.5  # consistency: the weight of the mean prediction's entropy
    macer_beta: float = MACER_BETA  # macer: the inverse temperature of the soft smoothed classifier
    macer_gamma: float = MACER_GAMMA  # macer: the hinge's margin
    alpha_delay: int = 0  # epochs trained with the regularizer off (MACER's deferral)
    alpha_delay_budget: float = 0.0  # the same, as a share of the budget (a budget run's deferral)
    sigma_warmup: int = 100  # steps over which the noise rises linearly to sigma (0: none)
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 1000
    epochs: int = 100
    lr_schedule: str = "plateau"  # "plateau" (on the validation loss), "step" or "budget-step"
    lr_step: int = 30  # step schedule: epochs between decays
    lr_step_budget: float = 1 / 3  # budget-step schedule: share of the budget between decays
    lr_gamma: float = 0.1  # step schedule: the decay factor
    plateau_factor: float = 0.9
    plateau_patience: int = 3
    early_stop: int = 10
    time_budget: float = 0.0  # stop once the training steps took this many seconds (0: no limit)
    step_budget: int = 0  # stop after this many training steps (0: no limit)
    pass_budget: float = 0.0  # stop once the steps' counted compute reaches this many clean epochs
    # (steps x batch x passes per image over the training images; 0: no limit); one budget a run
    keep: str = "best"  # the weights a run ends with: "best" validation loss, or the "last" epoch's
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.moment_depth not in DEPTHS:
            raise ConfigError(f"unknown moment depth {self.moment_depth!r}; choose from {DEPTHS}")
        if self.moment_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown moment weighting {self.moment_weighting!r}; choose from {WEIGHTINGS}"
            )
        if self.moment_loss not in MOMENT_LOSSES:
            raise ConfigError(f"unknown moment loss {self.moment_loss!r}; choose {MOMENT_LOSSES}")
        if self.moment_loss == "expected-ce" and self.moment_depth != "all":
            raise ConfigError(
                "moment loss expected-ce needs moment depth all (the output variance)"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.lr_schedule!r}; choose {LR_SCHEDULES}")
        if self.keep not in KEEP:
            raise ConfigError(f"unknown keep {self.keep!r}; choose {' or '.join(KEEP)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        checks = {
            "sigma": self.sigma >= 0 and math.isfinite(self.sigma),
            "alpha": self.alpha >= 0 and math.isfinite(self.alpha),
            "folds": self.folds >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1,
            "weight_decay": self.weight_decay >= 0,
            "momentum": self.momentum >= 0,
            "plateau_factor": 0 < self.plateau_factor < 1,
            "plateau_patience": self.plateau_patience >= 0,
            "early_stop": self.early_stop >= 1,
            "samples": self.samples >= 0,
            "eta": self.eta >= 0 and math.isfinite(self.eta),
            "macer_beta": self.macer_beta > 0 and math.isfinite(self.macer_beta),
            "macer_gamma": self.macer_gamma > 0 and math.isfinite(self.macer_gamma),
            "alpha_delay": self.alpha_delay >= 0,
            "alpha_delay_budget": 0 <= self.alpha_delay_budget < 1,
            "lr_step_budget": 0 < self.lr_step_budget <= 1,
            "sigma_warmup": self.sigma_warmup >= 0,
            "lr_step": self.lr_step >= 1,
            "lr_gamma": 0 < self.lr_gamma <= 1,
            "time_budget": self.time_budget >= 0 and math.isfinite(self.time_budget),
            "step_budget": self.step_budget >= 0,
            "pass_budget": self.pass_budget >= 0 and math.isfinite(self.pass_budget),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid {bad[0].replace('_', '-')}: {getattr(self, bad[0])}")
        if self.samples and self.method not in COPIES:
            raise ConfigError(
                f"samples sets the noisy copies of {', '.join(COPIES)}; {self.method} has none "
                "to set"
            )
        budgets = [k.replace("_", "-") for k in BUDGETS if getattr(self, k)]
        if len(budgets) > 1:
            raise ConfigError(f"a run has one budget; {' and '.join(budgets)} are both set")
        if (self.alpha_delay_budget or self.lr_schedule == "budget-step") and not budgets:
            raise ConfigError(
                "alpha-delay-budget and the budget-step schedule are shares of the budget: "
                "set time-budget, step-budget or pass-budget"
            )

    def pass_budget_steps(self, passes: float, images: int) -> int:
        """The steps ``pass_budget`` allows: as many steps of ``batch_size`` images, each image
        costing ``passes`` clean passes (momentreg.training.cost), as fit in ``pass_budget`` clean
        epochs of ``images`` training images, rounded down (at least one)."""
        return max(1, math.floor(self.pass_budget * images / (self.batch_size * passes) + 1e-9))

    def budget_share(self, steps: int, seconds: float) -> float:
        """How much of the run's budget ``steps`` training steps that took ``seconds`` have
        used: seconds over ``time_budget``, or steps over ``step_budget`` (0 without a budget;
        the trainer turns a pass budget into a step budget before its first step)."""
        if self.time_budget:
            return seconds / self.time_budget
        return steps / self.step_budget if self.step_budget else 0.0


# The paper's protocol per model; any field can be overridden. The SGD protocols of the paper's
# models weigh the moment term as the authors' code does ("convex": the paper's sum / (1 + alpha)):
# with the sum, SGD's step is 1 + alpha times a clean one, and AlexNet at lr 0.1 collapses to one
# class or diverges (docs/cifar.md). Under Adam the two weightings train alike.
PROTOCOLS: dict[str, dict] = {
    "lenet": dict(
        optimizer="adam",
        lr=1e-4,
        batch_size=1000,
        weight_decay=0.0,
        plateau_factor=0.9,
        plateau_patience=3,
        early_stop=10,
    ),
    "smoothing-lenet": dict(  # the baselines' MNIST recipe: 90 epochs, lr / 10 every 30
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        batch_size=256,
        lr_schedule="step",
        lr_step=30,
        lr_gamma=0.1,
        early_stop=90,
    ),
    "alexnet": dict(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        batch_size=128,
        moment_weighting="convex",
        plateau_factor=0.5,
        plateau_patience=5,
        early_stop=20,
    ),
    "resnet18": dict(  # the usual CIFAR recipe, with the plateau schedule of the other models
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        batch_size=128,
        plateau_factor=0.1,
        plateau_patience=10,
        early_stop=30,
    ),
    "resnet20": dict(  # He et al. 2016, with the plateau schedule of the other models
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        batch_size=128,
        plateau_factor=0.1,
        plateau_patience=10,
        early_stop=30,
    ),
}
