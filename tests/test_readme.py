"""The README's code for your own model runs as printed."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_your_own_model_loop_runs_as_printed():
    text = README.read_text()
    section = text[text.index("## Your own model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]
    scope = {"loader": loader * 3}
    exec(compile(code, str(README), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["parts"]["logits"].shape == (16, 10)


def test_the_smoothing_losses_loop_runs_as_printed_and_trains():
    text = README.read_text()
    code = next(
        c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "consistency_loss(" in c
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    scope = {"loader": [(x, y)] * 3}
    exec(compile(code, str(README), "exec"), scope)
    model, split = scope["model"], scope["split"]
    assert torch.isfinite(scope["loss"]) and scope["logits"].shape == (16, 10)
    torch.testing.assert_close(split[1](torch.relu(split[0](x))), model(x))  # the model's halves
    params = list(model.parameters())
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    assert all("momentum_buffer" in scope["optimizer"].state[p] for p in params)  # it stepped
