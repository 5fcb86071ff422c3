"""The study pages (docs/reproduction.md, docs/beyond.md, docs/cifar.md, docs/certified.md,
docs/certified-passes.md, docs/certified-gpu.md) are what their experiments/ scripts write from
the committed metrics."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: pytest -m "not slow" skips them

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "study, figures",
    [
        ("reproduction", 6),
        ("beyond", 2),
        ("cifar", 9),
        ("certified", 2),
        ("certified-passes", 2),
        ("certified-gpu", 2),
    ],
)
def test_committed_study_doc_regenerates_identically(tmp_path, study, figures):
    script = {
        "reproduction": ["reproduce.py"],
        "beyond": ["beyond.py"],
        "cifar": ["cifar.py"],
        "certified": ["certified.py"],
        "certified-passes": ["certified.py", "--study", "passes"],
        "certified-gpu": ["certified.py", "--study", "gpu"],
    }[study]
    doc = tmp_path / f"{study}.md"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script[0]), *script[1:], "--stages", "doc"]
        + ["--results", str(ROOT / "docs" / "results" / study), "--doc", str(doc)],
        check=True,
        capture_output=True,
    )
    assert doc.read_text() == (ROOT / "docs" / f"{study}.md").read_text()
    made = {p.name for p in (tmp_path / study).glob("*.png")}
    assert made == {p.name for p in (ROOT / "docs" / study).glob("*.png")}
    assert len(made) == figures
