import os

# Tests run eager kernels (compiling costs seconds per shape); test_compile_matches_eager checks
# the compiled path once.
os.environ.setdefault("MOMENTREG_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
