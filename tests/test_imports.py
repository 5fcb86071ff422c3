"""Importing momentreg has no side effects on the user's process."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil
import matplotlib
matplotlib.use("svg")
import momentreg
for module in pkgutil.walk_packages(momentreg.__path__, "momentreg."):
    if module.name != "momentreg.__main__":
        importlib.import_module(module.name)
print(matplotlib.get_backend())
"""


def test_importing_every_module_leaves_the_matplotlib_backend_as_it_was():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"


def test_no_module_of_the_package_is_ignored_by_git():
    """A module the ignore rules hide (a rule for run folders once matched src/momentreg/runs/)
    works here and is missing from every clone."""
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "src"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [p for p in ignored if p.endswith(".py")] == []
