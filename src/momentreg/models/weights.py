"""Models momentreg did not train: built from the zoo or a user factory, given weights from a plain
``state_dict`` file, and (for a model that expects normalized inputs) wrapped to take images in
[0, 1] as every momentreg model does."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from momentreg.errors import UsageError
from momentreg.models.zoo import Normalize

__all__ = ["load_weights", "sha256_of", "with_normalization"]


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain ``state_dict`` into ``model`` with ``weights_only=True`` (no pickled code
    runs). A missing file, a file that needs code to load, something other than a state dict,
    and a missing or unexpected key or a shape mismatch are each one ``UsageError``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UsageError(
            f"--weights {path}: not a plain state_dict; loading it would run code, which "
            f"weights_only=True refuses ({first}). Save model.state_dict() instead"
        ) from None
    except Exception as e:
        raise UsageError(f"--weights {path}: not a readable weights file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: expected a state_dict (names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise UsageError(f"--weights {path}: {kind} keys for this model: {_few(keys)}")
    if wrong:
        k = wrong[0]
        raise UsageError(
            f"--weights {path}: {k} has shape {tuple(state[k].shape)}, the model's is "
            f"{tuple(own[k].shape)} ({len(wrong)} such)"
        )
    model.load_state_dict(state)
    return model


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def with_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` behind a per-channel ``(x - mean) / std``: a model trained on normalized inputs,
    taking images in [0, 1]. An ``nn.Sequential`` whose first layer is then affine, so the
    regularizer can still split it."""
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise UsageError("--normalize takes one mean and one positive std per channel")
    return nn.Sequential(Normalize(mean, std), model)
