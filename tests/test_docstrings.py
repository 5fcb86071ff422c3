"""The public entry points document their arguments, return value and shapes, and their
examples run (as doctests, here, in every test run)."""

import doctest

import pytest

from momentreg.core.regularizer import MomentRegularizer, expected_logits, moment_loss
from momentreg.core.split import trace_split
from momentreg.data.datasets import load_dataset
from momentreg.evaluation.attacks import minimal_perturbations
from momentreg.evaluation.certify import certify
from momentreg.evaluation.robustness import gaussian_robustness
from momentreg.models.zoo import build_model
from momentreg.runs.export import export_sweep
from momentreg.training.loop import train

ENTRY_POINTS = [
    MomentRegularizer,
    moment_loss,
    expected_logits,
    trace_split,
    gaussian_robustness,
    certify,
    minimal_perturbations,
    train,
    load_dataset,
    build_model,
]


# Other functions whose docstrings hold an example (no tensors: no Shape section).
EXAMPLES = [export_sweep]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.__name__)
def test_the_docstring_has_args_returns_shape_and_an_example_that_runs(entry):
    doc = entry.__doc__ or ""
    missing = [s for s in ("Args:", "Returns:", "Shape:", "Example:") if s not in doc]
    assert missing == [], f"{entry.__name__} lacks {missing}"
    _run_examples(entry)


@pytest.mark.parametrize("entry", EXAMPLES, ids=lambda e: e.__name__)
def test_the_examples_of_other_documented_functions_run(entry):
    _run_examples(entry)


def _run_examples(entry) -> None:
    module = __import__(entry.__module__, fromlist=["_"])
    tests = doctest.DocTestFinder(recurse=False).find(entry, globs=vars(module).copy())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0, runner.summarize()
