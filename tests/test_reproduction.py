"""docs/reproduction.md is what experiments/reproduce.py writes from the committed metrics."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_reproduction_doc_regenerates_identically(tmp_path):
    doc = tmp_path / "reproduction.md"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--stages", "doc"]
        + ["--results", str(ROOT / "docs" / "results" / "reproduction"), "--doc", str(doc)],
        check=True,
        capture_output=True,
    )
    assert doc.read_text() == (ROOT / "docs" / "reproduction.md").read_text()
    figures = {p.name for p in (tmp_path / "reproduction").glob("*.png")}
    assert figures == {p.name for p in (ROOT / "docs" / "reproduction").glob("*.png")}
    assert len(figures) == 6
