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
