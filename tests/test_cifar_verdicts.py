"""The verdicts of docs/cifar.md: each rule gives the answer it states on rows made to test it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import cifar_verdicts as verdicts  # noqa: E402


def row(method, acc, gnr, sigma=0.0, folds=1, seed=0, stopped_by="early stopping"):
    return {
        "method": method,
        "sigma": sigma,
        "alpha": 1.0,
        "folds": folds,
        "seed": seed,
        "test_accuracy": acc,
        "gnr": gnr,
        "classes": 10,
        "stopped_by": stopped_by,
        "epochs": 10,
        "best_epoch": 5,
    }


CLEAN = [row("clean", 70.0, 40.0), row("clean", 70.2, 42.0, seed=1)]


@pytest.mark.parametrize(
    "moment_gnr, verdict",
    [
        (90.0, "reproduced"),
        (81.0, "partly: more robust, but not twice"),
        (60.0, "partly: more robust, but not twice"),
        (40.0, "not reproduced"),
    ],
)
def test_fig3b_rule_is_the_gnr_ratio_among_accurate_runs(moment_gnr, verdict):
    rows = [*CLEAN, row("moment", 69.9, moment_gnr, 0.25), row("augment", 69.8, 45.0, 0.25, 2)]
    rows.append(row("augment", 60.0, 99.0, 0.5, 2))  # too inaccurate to compete
    result = verdicts.verdict_fig3b(rows)
    assert result[2].startswith(verdict + " (rule: GNR ratio >= 2")
    assert "provisional" not in result[2]


def test_fig3b_without_an_accurate_regularizer_run_is_not_reproduced_and_flags_cut_runs():
    rows = [*CLEAN, row("moment", 60.0, 90.0, 1.0, stopped_by="time budget")]
    rows.append(row("augment", 69.8, 45.0, 0.25, 2))
    claim, ours, verdict = verdicts.verdict_fig3b(rows)
    assert ours == "no regularizer run is that accurate"
    assert verdict.startswith("not reproduced") and "provisional: 1 of the 2" in verdict


def test_fig7_compares_with_the_11_fold_run_by_gnr_points():
    rows = [*CLEAN, row("moment", 69.0, 80.0, 0.25), row("augment", 69.0, 66.0, 0.25, 11)]
    rows.append(row("augment", 69.0, 79.0, 0.25, 2))  # another N does not count
    assert verdicts.verdict_fig7(rows)[2].startswith("partly: it wins, by less")
    rows[-2] = row("augment", 69.0, 64.0, 0.25, 11)
    assert verdicts.verdict_fig7(rows)[2].startswith("reproduced")


def test_pareto_finds_a_dominated_and_an_undominated_regularizer():
    dominated = [*CLEAN, row("moment", 65.0, 70.0, 1.0), row("augment", 66.0, 75.0, 0.25, 2)]
    assert verdicts.verdict_pareto("cifar10-lenet", dominated)[2].startswith("not reproduced")
    free = [*dominated, row("moment", 64.0, 80.0, 2.0)]
    claim, ours, verdict = verdicts.verdict_pareto("cifar10-lenet", free)
    assert verdict.startswith("reproduced") and "moment sigma=2.0" in ours
    far = [*CLEAN, row("moment", 55.0, 95.0, 5.0)]  # more than 10 points below clean
    assert verdicts.verdict_pareto("cifar10-lenet", far)[1].startswith("no regularizer run")


def test_table4_counts_failed_and_chance_rows_as_not_robust():
    rows = [*CLEAN, row("moment", 68.0, 60.0, 0.125), row("moment", 67.0, 61.0, 0.25)]
    rows += [row("moment", 66.0, 62.0, 0.325), row("moment", 65.0, 63.0, 1.0)]
    assert verdicts.verdict_table4("cifar10-lenet", rows)[2].startswith("reproduced")
    rows[-1] = row("moment", 10.0, 100.0, 1.0)  # a constant classifier
    claim, ours, verdict = verdicts.verdict_table4("cifar10-lenet", rows[:-2] + rows[-1:])
    assert verdict.startswith("partly: 2 of 4 rows")
    assert "training failed at sigma 0.325" in ours and "chance accuracy at sigma 1" in ours


def test_growth_rule_is_a_third_of_the_papers_factor():
    growth = {"pgd": 10.0, "fgsm": 0.6, "deepfool": 200.0}
    verdict = verdicts.verdict_growth(growth, row("moment", 68.0, 60.0, 0.25))[2]
    assert verdict.startswith("partly: 2 of 3 attacks (PGD, DF2)")


def test_the_recipes_conclusions_cite_only_numbers_of_the_generated_tables():
    """The hand-written conclusions under the recipes' tables quote what the tables hold."""
    import re

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "cifar.md").read_text()
    notes = (root / "experiments" / "cifar-recipes.md").read_text()
    section = page[page.index("## The paper's recipes on a CPU") :]
    tables = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    cited = re.findall(r"\d+\.\d+", notes)
    assert cited and [n for n in cited if n not in tables] == []
