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
