"""The README's Python runs as printed, in a fresh folder; its findings quote the pages it links;
the guide's loops for your own model run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_every_python_block_of_the_readme_runs_as_printed_in_a_fresh_folder(tmp_path, block):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[block])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_readme_has_python_blocks_and_stays_short():
    assert len(BLOCKS) >= 2
    assert len(README.read_text().split()) <= 1800


def test_every_number_in_the_findings_table_is_on_the_page_it_links():
    text = README.read_text()
    table = text[text.index("## Findings") : text.index("## Documentation")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "](docs/" in line]
    assert rows
    for row in rows:
        page = (ROOT / re.search(r"\]\((docs/[^)]+)\)", row).group(1)).read_text()
        claim, ours = row.split(" | ")[:2]
        missing = [n for n in re.findall(r"\d+\.\d+", ours) if n not in page]
        assert not missing, f"{row}: {missing} not in the page"


def test_your_own_model_loop_runs_as_printed():
    text = GUIDE.read_text()
    section = text[text.index("## Your own model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]
    scope = {"loader": loader * 3}
    exec(compile(code, str(GUIDE), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["parts"]["logits"].shape == (16, 10)


def test_the_smoothing_losses_loop_runs_as_printed_and_trains():
    text = GUIDE.read_text()
    code = next(
        c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "consistency_loss(" in c
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    scope = {"loader": [(x, y)] * 3}
    exec(compile(code, str(GUIDE), "exec"), scope)
    model, split = scope["model"], scope["split"]
    assert torch.isfinite(scope["loss"]) and scope["logits"].shape == (16, 10)
    torch.testing.assert_close(split[1](torch.relu(split[0](x))), model(x))  # the model's halves
    params = list(model.parameters())
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    assert all("momentum_buffer" in scope["optimizer"].state[p] for p in params)  # it stepped


def test_the_cli_reference_is_what_the_parser_says():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_cli_doc.py"), "--check"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_grouped_config_example_runs_as_printed():
    text = GUIDE.read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "Optimizer(" in c)
    scope = {}
    exec(compile(code, str(GUIDE), "exec"), scope)
    scope["config"].validate()
    assert scope["config"].optimizer.lr == 0.01 and scope["config"].schedule.keep == "last"
