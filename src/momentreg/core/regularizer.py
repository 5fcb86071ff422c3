"""The analytic moment regularizer: loss = CE(f(x), y) + alpha * CE(E[f(x + n)], y).

Two weightings of the terms: "sum" (the paper's Eq. 2, above) and "convex", the sum divided by
1 + alpha (the authors' code, (1 - a) CE + a CE_moment with a = alpha / (1 + alpha)). Adam's step
does not depend on the loss's scale, so the two train alike under Adam; under SGD the sum's step
is 1 + alpha times a clean step, and the convex weighting's is a clean step's size.

The network is split at its first ReLU, f = tail(relu(head(x))) with ``head`` affine. For
n ~ N(0, diag(sigma^2)) the pre-activation head(x + n) is Gaussian with mean head(x) and variance
head_variance(sigma^2) (the head with squared weights, no bias), so E[relu(.)] is exact and
E[f(x + n)] ~ tail(relu_mean(head(x), head_variance)): one extra pass through the tail.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from momentreg.core.moments import affine_moments, network_moments, relu_and_mean, relu_mean
from momentreg.core.normalize import Normalize
from momentreg.core.split import graph_moments, trace_split
from momentreg.errors import ConfigError

__all__ = [
    "MomentRegularizer",
    "check_regularizable",
    "split_at_first_relu",
    "head_moments",
    "head_variance",
    "expected_logits",
    "output_moments",
    "expected_cross_entropy",
    "moment_loss",
    "WEIGHTINGS",
]

AFFINE_HEAD_LAYERS = (Normalize, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten, nn.Identity)
Split = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def split_at_first_relu(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` into (affine head, tail) around its first ReLU: model = tail(relu(head)).

    An ``nn.Sequential`` (nested ones too) is split between its layers; any other module is traced
    with torch.fx (:func:`momentreg.core.split.trace_split`: ReLU as module, function or method,
    heads of affine layers, shape operations and constant arithmetic). The two halves share the
    model's modules (and so its parameters). Raises ``ValueError`` naming the first operation
    before the ReLU that is not affine, a skip connection over the ReLU, or the lack of a ReLU.
    """
    if not isinstance(model, nn.Sequential):
        return trace_split(model)
    leaves = _leaves(model)
    for i, layer in enumerate(leaves):
        if isinstance(layer, nn.ReLU):
            if i == 0:
                raise ConfigError("the model starts with a ReLU: there is no affine head before it")
            return nn.Sequential(*leaves[:i]), nn.Sequential(*leaves[i + 1 :])
        if not isinstance(layer, AFFINE_HEAD_LAYERS):
            raise ConfigError(
                f"layer {i} ({layer!r}) before the first ReLU is not affine; the head may only "
                f"hold {', '.join(t.__name__ for t in AFFINE_HEAD_LAYERS)}"
            )
    raise ConfigError("the model has no nn.ReLU to split at")


def checked_sigma(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """sigma as a float (a number, checked on the host) or a tensor; ValueError unless finite and
    >= 0 everywhere.

    A tensor is checked where it lives, one host-device sync on an accelerator, and only once
    while it is unchanged: the check is remembered for that tensor object and its version counter
    (which an in-place write bumps), so a per-pixel sigma made once costs no sync per step.
    """
    if isinstance(sigma, numbers.Real):
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"sigma must be finite and >= 0, got {sigma}")
        return float(sigma)
    sigma = torch.as_tensor(sigma)
    version = None if sigma.is_inference() else sigma._version
    if version is None or _CHECKED.get(sigma) != version:
        if (sigma.lt(0) | ~torch.isfinite(sigma)).any():
            raise ConfigError("sigma must be finite and >= 0 everywhere")
        if version is not None:
            _CHECKED[sigma] = version
    return sigma


# tensor sigmas already checked, and their version then; an entry goes with its tensor
_CHECKED = WeakIdKeyDictionary()


def _input_variance(sigma: float | torch.Tensor, input_shape: torch.Size, like: torch.Tensor):
    """sigma^2 as a tensor [1, *input_shape] on ``like``'s device and dtype.

    A number is checked on the host and filled on the device: no host-device sync, which on a
    busy GPU costs a training step more than its arithmetic. A tensor is checked where it lives
    (one sync on an accelerator, the first time it is seen unchanged: ``checked_sigma``).
    """
    sigma = checked_sigma(sigma)
    if isinstance(sigma, float):
        # squared on the device, in ``like``'s dtype, as a tensor sigma is: the same bits
        full = torch.full((1, *input_shape), sigma, dtype=like.dtype, device=like.device)
        return full * full
    try:
        shape = torch.broadcast_shapes(sigma.shape, input_shape)
    except RuntimeError:
        shape = None
    if shape != input_shape:
        raise ConfigError(
            f"sigma of shape {tuple(sigma.shape)} does not broadcast to one input of shape "
            f"{tuple(input_shape)}"
        )
    return (sigma.to(like.device, like.dtype) ** 2).expand(input_shape).unsqueeze(0)


def head_variance(head: nn.Module, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Variance of head(x + n), n ~ N(0, diag(sigma^2)); shape [1, *head output shape].

    Computed once at batch size 1: it does not depend on x, only on its shape [B, *input_shape].
    """
    var = _input_variance(sigma, x.shape[1:], x)
    if isinstance(head, fx.GraphModule):  # a traced head: the mean pass comes along
        return graph_moments(head, x, var)[1]
    for layer in _leaves(head):
        _, var = affine_moments(layer, None, var)
    return var


def head_moments(
    head: nn.Module, sigma: float | torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head(x) [B, ...], variance of head(x + n) [1, ...]) in one pass through the head.

    The variance is propagated at batch size 1 next to the mean; a BatchNorm2d in training mode
    uses the statistics of this batch as its affine map (eval mode: its running statistics).
    """
    mean, var = x, _input_variance(sigma, x.shape[1:], x)
    if isinstance(head, fx.GraphModule):
        return graph_moments(head, mean, var)
    for layer in _leaves(head):
        mean, var = affine_moments(layer, mean, var)
    return mean, var


def _split(model: nn.Module, split: Split | None) -> Split:
    return split_at_first_relu(model) if split is None else split


DEPTHS = ("first", "all")


def expected_logits(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    split: Split | None = None,
    depth: str = "first",
) -> torch.Tensor:
    """Approximate E[model(x + n)], n ~ N(0, diag(sigma^2)).

    depth="first" (the paper): tail(relu_mean(head(x), head variance)), exact up to the first ReLU.
    depth="all": the mean of :func:`output_moments`, moments pushed through every layer.

    Args:
        model: an ``nn.Sequential``, or any module with ``split`` given (or found by
            :func:`split_at_first_relu`).
        x: clean inputs in the model's input units.
        sigma: the noise std, a float or a tensor broadcastable to the input shape (per pixel).
        split: ``(head, tail)`` for non-Sequential models (depth="first" only): ``head`` an affine
            module (or Sequential of them) as accepted by :func:`split_at_first_relu`, ``tail``
            any callable.
        depth: "first" or "all".

    Returns:
        The expected logits.

    Shape:
        x: [B, *input_shape]; returns [B, classes].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> expected_logits(net, x, sigma=0.5).shape
        torch.Size([2, 3])
        >>> torch.allclose(expected_logits(net, x, sigma=0.0), net(x))  # no noise: f(x)
        True
    """
    if depth == "all":
        return output_moments(model, x, sigma)[0]
    if depth != "first":
        raise ConfigError(f"depth must be one of {DEPTHS}, got {depth!r}")
    head, tail = _split(model, split)
    return tail(relu_mean(*head_moments(head, sigma, x)))


def output_moments(
    model: nn.Module, x: torch.Tensor, sigma: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance [B, classes] of model(x + n) by assumed density filtering through every
    layer of an ``nn.Sequential`` (see :func:`momentreg.core.moments.network_moments`)."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError("moments through every layer need an nn.Sequential model")
    var = _input_variance(sigma, x.shape[1:], x)
    mean, var = network_moments(_leaves(model), x, var)
    return mean, var.expand_as(mean)


MOMENT_LOSSES = ("mean", "expected-ce")
WEIGHTINGS = ("sum", "convex")


def expected_cross_entropy(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E[CE(z, y)] for logits z ~ N(mean, diag(var)) [B, K], to second order (delta method):
    CE(mean, y) + 1/2 sum_k var_k p_k (1 - p_k), p = softmax(mean); averaged over the batch."""
    p = mean.softmax(1)
    return F.cross_entropy(mean, y) + 0.5 * (var * p * (1 - p)).sum(1).mean()


def moment_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    alpha: float,
    split: Split | None = None,
    *,
    depth: str = "first",
    loss: str = "mean",
    noisy: torch.Tensor | None = None,
    weighting: str = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(model(x), y) + alpha * CE(expected_logits(model, x, sigma), y); with
    weighting="convex" that divided by 1 + alpha (see the module's docstring).

    depth="first" (the paper): the head runs once; the clean and expected activations go through
    the tail in one batched call of size 2B (a BatchNorm in train mode inside the tail sees both
    halves as one batch). depth="all": the expected logits come from moments through every layer
    (:func:`output_moments`, about one more pass of the network).

    Args:
        model, x, sigma, split, depth: as for :func:`expected_logits`.
        y: class indices.
        alpha: the weight of the moment term (>= 0).
        loss: "mean" (the paper), or "expected-ce" (needs depth="all"): the second term becomes
            the expected cross-entropy under the output variance (:func:`expected_cross_entropy`).
        noisy: noise added to the first term's input (a hybrid with noise training): it sees
            ``x + noisy`` instead of x.
        weighting: "sum" (the paper's Eq. 2) or "convex" (divided by 1 + alpha).

    Returns:
        ``(total, parts)``: the scalar loss, and ``{"clean": ..., "moment": ..., "logits": ...}``,
        the two cross-entropies and the first term's logits.

    Shape:
        x: [B, *input_shape]; y: [B]; noisy: like x; parts["logits"]: [B, classes].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> total, parts = moment_loss(net, x, y, sigma=0.5, alpha=2.0)
        >>> bool(torch.isclose(total, parts["clean"] + 2.0 * parts["moment"]))
        True
        >>> parts["logits"].shape
        torch.Size([5, 3])
    """
    if alpha < 0:
        raise ConfigError("alpha must be >= 0")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if depth not in DEPTHS or loss not in MOMENT_LOSSES:
        raise ConfigError(f"depth must be one of {DEPTHS} and loss one of {MOMENT_LOSSES}")
    if loss == "expected-ce" and depth != "all":
        raise ConfigError("loss='expected-ce' needs the output variance: use depth='all'")
    seen = x if noisy is None else x + noisy
    if depth == "first":
        head, tail = _split(model, split)
        h, var = head_moments(head, sigma, x)
        if noisy is None:
            stacked = relu_and_mean(h, var)  # [relu(h); E[relu]], fused
        else:
            stacked = torch.cat([torch.relu(head(seen)), relu_mean(h, var)])
        logits, expected = tail(stacked).split(x.shape[0])
        moment = F.cross_entropy(expected, y)
    else:
        logits = model(seen)
        mean, var = output_moments(model, x, sigma)
        moment = (
            F.cross_entropy(mean, y) if loss == "mean" else expected_cross_entropy(mean, var, y)
        )
    clean = F.cross_entropy(logits, y)
    total = clean + alpha * moment
    if weighting == "convex":
        total = total / (1 + alpha)
    return total, {"clean": clean, "moment": moment, "logits": logits}


def check_regularizable(model: nn.Module, depth: str = "first") -> Split | None:
    """Raise ``ValueError`` now if the regularizer cannot handle ``model`` at ``depth``; returns
    the (head, tail) split that depth "first" uses (None for "all")."""
    if depth == "all" and not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"moments through every layer need an nn.Sequential model, not "
            f"{type(model).__name__}: use --moment-depth first"
        )
    return split_at_first_relu(model) if depth == "first" else None


class MomentRegularizer(nn.Module):
    """The paper's loss for any training loop: ``(loss, parts) = reg(x, y)`` with
    loss = CE(model(x), y) + alpha * CE(E[model(x + n)], y), n ~ N(0, diag(sigma^2)).

    ``model`` is any ``nn.Module`` with an affine head before its first ReLU (split once, here,
    by :func:`split_at_first_relu`, so a model it cannot split fails now, not mid-training); x
    [B, *input_shape] in the model's input units, y [B] class indices; parts holds the clean and
    moment terms and the first term's logits [B, classes] (for accuracy). ``split``, ``depth``,
    ``loss`` and ``weighting`` are :func:`moment_loss`'s: under SGD, weighting="convex" keeps
    the step of a clean step's size (the paper's sum takes 1 + alpha times it, which can make a
    network of SGD's protocol, such as AlexNet at lr 0.1, diverge or collapse).

    The module's only child is ``model`` and it keeps no other state, so it works as a plain
    loss: under ``torch.compile``, under autocast (the ReLU-mean kernels compute in float32), and
    with DistributedDataParallel by wrapping the regularizer itself,
    ``DDP(MomentRegularizer(model, ...))``, so that its forward is the one DDP synchronizes.

    Args:
        model: the network to train.
        sigma: the noise std (a float, or a tensor broadcastable to the input shape).
        alpha: the moment term's weight.
        split, depth, loss, weighting: as for :func:`moment_loss`.

    Returns:
        Called as ``reg(x, y)``: ``(loss, parts)`` as :func:`moment_loss` returns them.

    Shape:
        x: [B, *input_shape]; y: [B].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> reg = MomentRegularizer(net, sigma=0.5, alpha=1.0)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> loss, parts = reg(x, y)
        >>> loss.backward(); opt.step()
        >>> sorted(parts)
        ['clean', 'logits', 'moment']
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float | torch.Tensor,
        alpha: float = 1.0,
        *,
        split: Split | None = None,
        depth: str = "first",
        loss: str = "mean",
        weighting: str = "sum",
    ):
        super().__init__()
        if alpha < 0:
            raise ConfigError("alpha must be >= 0")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        checked_sigma(sigma)  # now, not at the first batch
        self.model = model
        self.sigma, self.alpha, self.depth, self.loss = sigma, alpha, depth, loss
        self.weighting = weighting
        # a plain tuple: the halves share the model's modules and are not registered twice
        self.split = split or check_regularizable(model, depth)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return moment_loss(
            self.model,
            x,
            y,
            self.sigma,
            self.alpha,
            self.split,
            depth=self.depth,
            loss=self.loss,
            weighting=self.weighting,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma={self.sigma}, alpha={self.alpha}, depth={self.depth!r}, loss={self.loss!r}, "
            f"weighting={self.weighting!r}"
        )
