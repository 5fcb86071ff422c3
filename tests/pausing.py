"""``python -m tests.pausing ARGS...``: the momentreg command with a pause point for crash tests.

MOMENTREG_TEST_PAUSE=point[:match][#n] freezes the process at the n-th (default first) time it
reaches ``point`` at a place whose description contains ``match``, after writing that place to
MOMENTREG_TEST_PAUSE_FILE, so the test can SIGKILL it exactly there. The points:

- ``mid-epoch``: after a training step; place ``<out>/epoch<E>/step<S>/``;
- ``after-epoch``: once an epoch's checkpoint and history are written; place ``<out>/epoch<E>``;
- ``in-write``: inside ``files.atomic_write``, the temporary file complete and about to replace
  the old one; place: the file's path.

The library holds no hook for this: the points are wrapped around its functions here.
"""

import os
import sys
import time
from pathlib import Path

from momentreg import files
from momentreg.cli.main import main
from momentreg.training import loop as training

_hits = 0


def _pause(point: str, place) -> None:
    global _hits
    spec, _, nth = os.environ["MOMENTREG_TEST_PAUSE"].partition("#")
    want, _, match = spec.partition(":")
    if want == point and match in str(place):
        _hits += 1
        if _hits == int(nth or 1):
            Path(os.environ["MOMENTREG_TEST_PAUSE_FILE"]).write_text(f"{point} {place}")
            time.sleep(3600)


def _install(out: str) -> None:
    step, write_history, replace = training._train_step, training._write_history, os.replace
    counter = {"epoch": None, "step": 0}

    def train_step(state, *args, **kwargs):
        result = step(state, *args, **kwargs)
        epoch = state.epoch + 1
        counter["step"] = counter["step"] + 1 if counter["epoch"] == epoch else 1
        counter["epoch"] = epoch
        _pause("mid-epoch", f"{out}/epoch{epoch}/step{counter['step']}/")
        return result

    def history(path, rows):
        write_history(path, rows)
        _pause("after-epoch", f"{out}/epoch{len(rows)}")

    def atomic_replace(src, dst):
        _pause("in-write", dst)
        replace(src, dst)

    training._train_step, training._write_history = train_step, history
    files.os.replace = atomic_replace  # the os module: every os.replace of this process


if __name__ == "__main__":
    argv = sys.argv[1:]
    _install(argv[argv.index("--out") + 1] if "--out" in argv else "")
    sys.exit(main(argv))
