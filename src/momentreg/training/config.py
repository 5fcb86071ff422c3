"""Every training setting (``TrainConfig``, checked by its ``validate``) and the paper's protocol
per model (``PROTOCOLS``), which a run starts from."""

from __future__ import annotations

import dataclasses
import math

from momentreg.core.regularizer import DEPTHS, MOMENT_LOSSES, WEIGHTINGS
from momentreg.core.smoothing_losses import MACER_BETA, MACER_GAMMA
from momentreg.errors import ConfigError
from momentreg.training.methods import COPIES, METHODS

__all__ = ["TrainConfig", "Optimizer", "Schedule", "Budget", "MethodSettings", "PROTOCOLS"]

LR_SCHEDULES = ("plateau", "step", "budget-step")
KEEP = ("best", "last")


@dataclasses.dataclass
class Optimizer:
    """The optimizer (``name``: adam or sgd, with SGD's ``momentum`` and ``nesterov``) and the
    batch it steps on."""

    name: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 1000


@dataclasses.dataclass
class Schedule:
    """How a run proceeds: its epochs and early stop, the learning rate's schedule ("plateau" on
    the validation loss, "step" every ``lr_step`` epochs, or "budget-step" every
    ``lr_step_budget`` share of the budget), the noise's linear warm-up over ``sigma_warmup``
    steps, the regularizer's deferral (``alpha_delay`` epochs or an ``alpha_delay_budget`` share
    of the budget: MACER's), and which weights it keeps ("best" validation loss, or the "last"
    epoch's)."""

    epochs: int = 100
    early_stop: int = 10
    lr_schedule: str = "plateau"
    plateau_factor: float = 0.9
    plateau_patience: int = 3
    lr_step: int = 30
    lr_step_budget: float = 1 / 3
    lr_gamma: float = 0.1
    sigma_warmup: int = 100
    alpha_delay: int = 0
    alpha_delay_budget: float = 0.0
    keep: str = "best"


@dataclasses.dataclass
class Budget:
    """At most one budget a run (0: none). With ``seconds`` it ends inside the epoch in which its
    training steps (timed on the host, the step's loss read back) have taken that many seconds
    (the first step of the call, which compiles, is not counted); that partial epoch is validated
    and checkpointed like any other. Where it stops depends on the clock, so such a run is not
    bit-for-bit repeatable; with ``steps`` it ends after that many steps on any machine (and on
    the CPU, with the same threads, repeats bit for bit); with ``passes`` after the steps whose
    counted compute (steps x batch x passes per image) fits in that many clean epochs of the
    training set: every method the same FLOPs, on any machine."""

    seconds: float = 0.0
    steps: int = 0
    passes: float = 0.0

    def kinds(self) -> list[str]:
        """The flat names of the budgets set."""
        return [
            FLAT_NAMES[("budget", k)] for k in ("seconds", "steps", "passes") if getattr(self, k)
        ]


@dataclasses.dataclass
class MethodSettings:
    """The settings of particular methods: N of N-fold augmentation (``folds``; 1 is clean); the
    moment regularizer's depth ("first" layer, the paper's, or "all" layers), loss ("mean" or
    "expected-ce", which needs all layers), noisy first term (a hybrid) and weighting ("sum", the
    paper's Eq. 2, or "convex", divided by 1 + alpha); the noisy copies per image of consistency
    and MACER (``samples``; None: the method's own default, ``Method.copies``: consistency 2,
    MACER 16, macer-analytic 0, which trains its NLL on none), consistency's entropy weight
    ``eta``, and MACER's inverse temperature and hinge margin."""

    folds: int = 1
    moment_depth: str = "first"
    moment_loss: str = "mean"
    moment_noise: bool = False
    moment_weighting: str = "sum"
    samples: int | None = None
    eta: float = 0.5
    macer_beta: float = MACER_BETA
    macer_gamma: float = MACER_GAMMA


GROUPS = {
    "optimizer": Optimizer,
    "schedule": Schedule,
    "budget": Budget,
    "method_settings": MethodSettings,
}
# A grouped field -> its name in the flat form (config.json, sweep specs, ``train`` options), where
# the two differ; every other field keeps its name.
FLAT_NAMES = {("optimizer", "name"): "optimizer", ("budget", "seconds"): "time_budget",
              ("budget", "steps"): "step_budget", ("budget", "passes"): "pass_budget"}  # fmt: skip


@dataclasses.dataclass
class TrainConfig:
    """Every training setting: the method, its noise level ``sigma`` and weight ``alpha`` (where
    it weighs a term), the seed, and four groups: ``optimizer``, ``schedule``, ``budget`` and the
    ``method_settings`` of particular methods.

    Its flat form (``flat()``, ``from_flat``) names every field at one level, as config.json,
    sweep specs and the command line do: ``TrainConfig.from_flat({"method": "moment", "lr":
    1e-3})`` is ``TrainConfig(method="moment", optimizer=Optimizer(lr=1e-3))``."""

    method: str = "clean"
    sigma: float = 0.0
    alpha: float = 1.0
    seed: int = 0
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)
    schedule: Schedule = dataclasses.field(default_factory=Schedule)
    budget: Budget = dataclasses.field(default_factory=Budget)
    method_settings: MethodSettings = dataclasses.field(default_factory=MethodSettings)

    @property
    def copies(self) -> int:
        """The noisy copies per image the method draws: ``samples``, or the method's default (0
        for a method that draws none)."""
        samples = self.method_settings.samples
        return samples if samples is not None else (METHODS[self.method].copies or 0)

    def flat(self, resolved: bool = True) -> dict:
        """Every setting at one level; ``resolved``: ``samples`` as the copies the method draws
        (``copies``), else as set (None where it is not)."""
        out = {"method": self.method, "sigma": self.sigma, "alpha": self.alpha}
        for group in GROUPS:
            for key, value in dataclasses.asdict(getattr(self, group)).items():
                out[FLAT_NAMES.get((group, key), key)] = value
        if resolved and self.method in METHODS:
            out["samples"] = self.copies
        return {**out, "seed": self.seed}

    @classmethod
    def from_flat(cls, settings: dict) -> TrainConfig:
        """The TrainConfig of flat settings (any subset); an unknown name is a ConfigError."""
        unknown = set(settings) - set(FLAT_FIELDS)
        if unknown:
            raise ConfigError(f"unknown training setting {sorted(unknown)[0]!r}")
        groups = {g: {} for g in GROUPS}
        top = {}
        for name, value in settings.items():
            group, field = FLAT_FIELDS[name]
            (groups[group] if group else top)[field] = value
        return cls(**top, **{g: GROUPS[g](**kw) for g, kw in groups.items()})

    def replace(self, **flat) -> TrainConfig:
        """This config with the flat settings ``flat`` changed."""
        return TrainConfig.from_flat({**self.flat(resolved=False), **flat}) if flat else self

    def validate(self) -> None:
        o, sc, m = self.optimizer, self.schedule, self.method_settings
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        choices = [
            ("moment depth", m.moment_depth, DEPTHS),
            ("moment weighting", m.moment_weighting, WEIGHTINGS),
            ("moment loss", m.moment_loss, MOMENT_LOSSES),
            ("lr schedule", sc.lr_schedule, LR_SCHEDULES),
            ("keep", sc.keep, KEEP),
            ("optimizer", o.name, ("adam", "sgd")),
        ]
        for what, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if m.moment_loss == "expected-ce" and m.moment_depth != "all":
            raise ConfigError(
                "moment loss expected-ce needs moment depth all (the output variance)"
            )
        bad = [k for k, ok in self._checks().items() if not ok]
        if bad:
            raise ConfigError(f"invalid {bad[0].replace('_', '-')}: {self.flat()[bad[0]]}")
        self._check_copies()
        budgets = [k.replace("_", "-") for k in self.budget.kinds()]
        if len(budgets) > 1:
            raise ConfigError(f"a run has one budget; {' and '.join(budgets)} are both set")
        if (sc.alpha_delay_budget or sc.lr_schedule == "budget-step") and not budgets:
            raise ConfigError(
                "alpha-delay-budget and the budget-step schedule are shares of the budget: "
                "set time-budget, step-budget or pass-budget"
            )

    def _checks(self) -> dict[str, bool]:
        """Flat name -> whether its value is in range."""
        f, finite = self.flat(), math.isfinite
        return {
            "sigma": f["sigma"] >= 0 and finite(f["sigma"]),
            "alpha": f["alpha"] >= 0 and finite(f["alpha"]),
            "folds": f["folds"] >= 1,
            "lr": f["lr"] > 0 and finite(f["lr"]),
            "batch_size": f["batch_size"] >= 1,
            "epochs": f["epochs"] >= 1,
            "weight_decay": f["weight_decay"] >= 0,
            "momentum": f["momentum"] >= 0,
            "plateau_factor": 0 < f["plateau_factor"] < 1,
            "plateau_patience": f["plateau_patience"] >= 0,
            "early_stop": f["early_stop"] >= 1,
            "eta": f["eta"] >= 0 and finite(f["eta"]),
            "macer_beta": f["macer_beta"] > 0 and finite(f["macer_beta"]),
            "macer_gamma": f["macer_gamma"] > 0 and finite(f["macer_gamma"]),
            "alpha_delay": f["alpha_delay"] >= 0,
            "alpha_delay_budget": 0 <= f["alpha_delay_budget"] < 1,
            "lr_step_budget": 0 < f["lr_step_budget"] <= 1,
            "sigma_warmup": f["sigma_warmup"] >= 0,
            "lr_step": f["lr_step"] >= 1,
            "lr_gamma": 0 < f["lr_gamma"] <= 1,
            "time_budget": f["time_budget"] >= 0 and finite(f["time_budget"]),
            "step_budget": f["step_budget"] >= 0,
            "pass_budget": f["pass_budget"] >= 0 and finite(f["pass_budget"]),
        }

    def _check_copies(self) -> None:
        """``samples`` only where the method draws noisy copies; at least one where its loss is
        a mean over them (sampled consistency and MACER)."""
        samples, default = self.method_settings.samples, METHODS[self.method].copies
        if samples is None:
            return
        if default is None and samples:
            raise ConfigError(
                f"samples sets the noisy copies of {', '.join(COPIES)}; {self.method} has none "
                "to set"
            )
        if samples < (1 if default else 0):
            least = "at least one noisy copy" if default else "no noisy copies or more"
            raise ConfigError(
                f"invalid samples: {samples}; {self.method} draws {least} "
                f"(leave it unset for its default, {default})"
            )

    def pass_budget_steps(self, passes: float, images: int) -> int:
        """The steps the pass budget allows: as many steps of the batch, each image costing
        ``passes`` clean passes (momentreg.training.cost), as fit in ``budget.passes`` clean
        epochs of ``images`` training images, rounded down (at least one)."""
        batch = self.optimizer.batch_size
        return max(1, math.floor(self.budget.passes * images / (batch * passes) + 1e-9))

    def budget_share(self, steps: int, seconds: float) -> float:
        """How much of the run's budget ``steps`` training steps that took ``seconds`` have
        used: seconds over the budget of seconds, or steps over the budget of steps (0 without a
        budget; the trainer turns a pass budget into a step budget before its first step)."""
        if self.budget.seconds:
            return seconds / self.budget.seconds
        return steps / self.budget.steps if self.budget.steps else 0.0


# flat name -> (its group, or None for a top-level field; its field name)
FLAT_FIELDS = {name: (None, name) for name in ("method", "sigma", "alpha", "seed")} | {
    FLAT_NAMES.get((g, f.name), f.name): (g, f.name)
    for g, group in GROUPS.items()
    for f in dataclasses.fields(group)
}


def upgrade_recorded(settings: dict) -> dict:
    """Flat settings recorded by an earlier momentreg (a config.json, a checkpoint's identity),
    read as this one means them: ``samples`` 0 meant the method's default copies where the
    method has a default of some (sampled consistency and MACER), and nothing where it takes
    none."""
    method = METHODS.get(settings.get("method", "clean"))
    if settings.get("samples") == 0 and method is not None and method.copies != 0:
        return {**settings, "samples": None}
    return settings


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
