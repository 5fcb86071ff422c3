"""The rules behind the verdicts of docs/certified.md and docs/certified-gpu.md, each on rows made
to test it."""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import certified  # noqa: E402
from certified_budgets import budget_line, budget_pairs, budget_table, draw_line  # noqa: E402
from certified_page import anchor_table, hinge_lines, kept_weights, soft_table, tightness_table  # noqa: E402
from certified_results import certified as tsv_summary  # noqa: E402
from certified_results import (  # noqa: E402
    load_rows,
    methods_option,
    missing_runs,
    read_tsv,
    uncertified_runs,
)
from certified_seeds import at_seconds, at_steps, seed_lines, seed_spread, seed_table  # noqa: E402
from certified_setting import _macer_budgets, later_batches, setting  # noqa: E402
from certified_study import CLEAN_EPOCHS, STUDIES  # noqa: E402
from certified_verdict import (  # noqa: E402
    acr_gap,
    anchor_check,
    goal_pairs,
    over_a_quarter,
    resolved,
    same_passes,
)
from study import export  # noqa: E402

from momentreg.runs.sweep import expand, load_spec, run_dir_name  # noqa: E402


def row(method, sigma, acr, se=0.02, budget=90, compute=1.0, label=None, copies=0, passes=1.0):
    return {
        "method": method,
        "label": label or method,
        "sigma": sigma,
        "acr": acr,
        "se": se,
        "budget": budget,
        "compute": compute,
        "copies": copies,
        "passes": passes,
        "run": f"{label or method}-{sigma:g}-{budget:g}",
        "steps": 100,
        "seed": 0,
    }


def test_a_gap_between_runs_on_the_same_images_has_the_standard_error_of_their_differences(
    tmp_path,
):
    """Two runs certified on the same 20 images, radii spread from 0 to 2, one run 0.10 or 0.11
    above the other on every image: the per-image differences (mean 0.105, standard deviation
    0.00513) resolve what the runs' own standard errors (about 0.17 each) cannot. On other
    images the two standard errors add in quadrature."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{20 * i}\t3\t3\t{0.5 * (i % 5)}\t1\t0:00:01" for i in range(20)]
    (tmp_path / "b.tsv").write_text("\n".join(lines) + "\n")
    b = tsv_summary(read_tsv(tmp_path / "b.tsv"))
    assert b["radii"] == {20 * i: 0.5 * (i % 5) for i in range(20)}
    a = tsv_summary([{"idx": i, "radius": r + 0.1 + 0.01 * (i % 40 == 20), "correct": 1}
                   for i, r in b["radii"].items()])  # fmt: skip
    gap, two_se = acr_gap(a, b)
    assert gap == pytest.approx(0.105)
    assert two_se == pytest.approx(2 * 0.005130 / 20**0.5, rel=1e-3)
    assert resolved(a, b) and not resolved(b, a)
    elsewhere = {**a, "radii": {i + 1: r for i, r in a["radii"].items()}}
    assert acr_gap(elsewhere, b)[1] == pytest.approx(2 * (a["se"] ** 2 + b["se"] ** 2) ** 0.5)
    assert a["se"] > 0.15 and not resolved(elsewhere, b)


def test_consistency_is_set_against_the_best_analytic_variant_at_its_budget():
    rows = [
        row("consistency", 1.0, 1.7),
        row("consistency-analytic", 1.0, 1.6),
        row("stability-analytic", 1.0, 1.65),
        row("noise", 1.0, 1.8),  # sampled: never the analytic side
        row("stability-analytic", 1.0, 1.9, budget=30),  # another budget
    ]
    pairs = goal_pairs(rows, "epochs", 1)
    assert [(a["method"], a["acr"], b["method"]) for _, a, b in pairs] == [
        ("stability-analytic", 1.65, "consistency")
    ]
    assert pairs[0][0] == "sigma 1, 90 epochs, against consistency (the best of 2 analytic runs)"


def test_macer_analytic_meets_macer_only_at_a_quarter_of_its_compute_or_less():
    macer = row("macer", 0.5, 1.5, compute=16.0)
    cheap = row("macer-analytic", 0.5, 1.6, compute=1.0)
    dear = row("macer-analytic", 0.5, 1.6, compute=5.0, label="macer-analytic (all layers)")
    pairs = goal_pairs([macer, cheap, dear], "epochs", 1)
    assert [(a["label"], b["label"]) for _, a, b in pairs] == [("macer-analytic", "macer")]
    # the study of seconds: MACER at 4x the analytic run's budget
    runs = [{**macer, "budget": 240}, {**cheap, "budget": 60}, {**cheap, "budget": 15}]
    assert [a["budget"] for _, a, _ in goal_pairs(runs, "s", 4)] == [60]
    # a run left out for its compute is named, with its share of MACER's
    (line,) = over_a_quarter([macer, cheap, dear], "epochs", 1)
    assert "macer-analytic (all layers) at 90 epochs is not compared" in line
    assert "0.31x MACER's" in line
    assert over_a_quarter(runs, "s", 4) == []


def test_a_study_of_pass_budgets_compares_macer_by_its_budgets():
    """Pass budgets of 3 and 12 clean epochs: each run's steps fill its budget to within one
    step, so a measured share of 0.2502 is a step's rounding, not a dearer run; it is compared.
    The same share in a study of seconds leaves the run out."""
    macer = row("macer", 0.5, 1.5, budget=12, compute=16.0)
    rounded = row("macer-analytic", 0.5, 1.6, budget=3, compute=4.003)
    pairs = goal_pairs([macer, rounded], CLEAN_EPOCHS, 4)
    assert [(what, a["budget"]) for what, a, _ in pairs] == [
        ("sigma 0.5, MACER's ACR at a quarter of its compute", 3)
    ]
    assert over_a_quarter([macer, rounded], CLEAN_EPOCHS, 4) == []
    seconds = [{**macer, "budget": 240}, {**rounded, "budget": 60}]
    assert goal_pairs(seconds, "s", 4) == []
    assert len(over_a_quarter(seconds, "s", 4)) == 1


def test_the_study_of_counted_compute_gives_every_run_a_pass_budget():
    """Every run of experiments/certified-passes.toml has a pass budget and no other; MACER's (with
    its 16 copies) is 4x one of its analytic variants', the largest's among them, as the goal's
    quarter of MACER's compute needs."""
    configs = expand(load_spec(str(STUDIES["passes"].spec)))
    assert all(c["pass_budget"] for c in configs)
    assert not any(c.get("time_budget") or c.get("step_budget") for c in configs)
    macer = {c["pass_budget"] for c in configs if c["method"] == "macer" and not c.get("samples")}
    analytic = {c["pass_budget"] for c in configs if c["method"] == "macer-analytic"}
    assert macer <= {4 * b for b in analytic} and 4 * max(analytic) in macer
    assert STUDIES["passes"].macer_factor == 4


def test_the_runs_of_two_studies_pair_by_the_rank_of_their_budgets():
    def at(method, budget, acr, steps, **kw):
        return {**row(method, 0.5, acr, budget=budget, **kw), "steps": steps, "depth": "first"}

    passes = [at("noise", 0.75, 0.7, 158), at("noise", 3, 1.2, 632),
              at("macer", 12, 0.9, 158), at("macer-analytic", 3, 1.0, 632)]  # fmt: skip
    seconds = [at("noise", 15, 0.6, 144), at("noise", 60, 1.0, 612), at("macer", 240, 1.0, 157),
               at("macer-analytic", 60, 1.0, 525),
               at("macer-analytic", 60, 0.8, 300, copies=1)]  # fmt: skip
    pairs = budget_pairs(passes, seconds)
    assert [(a["budget"], b["budget"], a["method"]) for a, b in pairs] == [
        (12, 240, "macer"), (0.75, 15, "noise"), (3, 60, "noise"), (3, 60, "macer-analytic")
    ]  # fmt: skip
    # two budgets against three: the smallest two pair, MACER's 12 has no partner
    assert [(a["budget"], b["budget"]) for a, b in budget_pairs(passes, seconds[:2])] == [
        (0.75, 15), (3, 60)
    ]  # fmt: skip
    table = budget_table(pairs, CLEAN_EPOCHS, "s")
    assert (
        "| macer-analytic | 0.5 | 3 | 632 | 1.000 ± 0.020 | 60 | 525 | 1.000 ± 0.020 | 1.20 |"
        in table
    )
    line = budget_line(pairs, "certified.md")
    assert "took 1.01x to 1.20x the steps" in line
    assert "most, macer-analytic at sigma 0.5, 632 steps against 525" in line
    # moves -0.1, 0.1, 0.2, 0: rms 0.122; 2 SE of each is 0.057, so three are beyond it
    assert "root mean square of 0.122 (most, noise at sigma 0.5: 1.200 against 1.000)" in line
    assert "3 of 4 moves beyond" in line


def test_the_other_studys_second_seeds_are_counted_at_the_budgets_of_their_rank():
    """The study of counted compute trains no second seed; the seconds study's seeds at their
    first seed's steps stand in, their budgets renamed by rank (15 s -> 0.75 clean epochs)."""
    cons = {**row("consistency", 0.5, 0.4, se=0.03, budget=0.75), "depth": "first"}
    ana = {**row("macer-analytic", 0.5, 0.8, se=0.03, budget=0.75), "depth": "first"}
    passes = [cons, ana, {**cons, "budget": 3}]
    first = {**row("noise", 0.5, 0.7, budget=15), "depth": "first"}
    seconds = [first, {**first, "budget": 60}]
    calm = [(first, {**first, "acr": 0.69, "seed": 1, "step_budget": 100})]
    goal = goal_pairs(passes, CLEAN_EPOCHS, 4)
    line = draw_line(passes, goal, seconds, calm, 0, CLEAN_EPOCHS, "certified.md")
    assert "(budgets paired by rank; this page has none)" in line
    assert "up to 0.010 at 0.75 clean epochs (1 run, root mean square 0.010)" in line
    assert "1 of the 1 goal comparisons" in line  # gap 0.4 against 2 SE of about 0.09
    wild = [(first, {**first, "acr": 0.3, "seed": 1, "step_budget": 100})]
    assert "0 of the 1 goal comparisons" in draw_line(
        passes, goal, seconds, wild, 3, CLEAN_EPOCHS, "c"
    )
    assert "1 run against this page's 3" in draw_line(
        passes, goal, seconds, wild, 3, CLEAN_EPOCHS, "c"
    )
    # a seed at a budget past this study's largest has no rank here: it is left out
    past = [({**first, "budget": 60}, {**first, "budget": 60, "seed": 1, "step_budget": 100})]
    assert draw_line([cons, ana], goal, seconds, past, 0, CLEAN_EPOCHS, "c") is None
    at_seconds = [(first, {**first, "acr": 0.3, "seed": 1, "step_budget": 0})]
    assert draw_line(passes, goal, seconds, at_seconds, 0, CLEAN_EPOCHS, "c") is None


def test_sampled_macer_with_few_copies_is_a_control_beside_the_goal_not_its_reference():
    macer = row("macer", 0.5, 1.0, budget=240, compute=16.0, passes=16.0)
    two = row("macer", 0.5, 1.2, budget=60, compute=2.0, copies=2, passes=2.0,
              label="macer (2 noisy copies)")  # fmt: skip
    one = row("macer", 0.5, 0.9, budget=15, compute=0.2, copies=1, label="macer (1 noisy copy)")
    plain = row("macer-analytic", 0.5, 1.1, budget=60, compute=1.0)
    copy = row("macer-analytic", 0.5, 1.05, budget=60, compute=2.0, copies=1, passes=2.0,
               label="macer-analytic (1 noisy copy)")  # fmt: skip
    early = row("macer-analytic", 0.5, 0.8, se=0.01, budget=15, compute=0.25)
    rows = [macer, two, one, plain, copy, early]
    # the goal's MACER is the authors' 16 copies only: a few-copy MACER at 4x the budget of
    # macer-analytic at 15 s is no pair, nor is it the anchors' row
    pairs = [(a["label"], b["budget"]) for _, a, b in goal_pairs(rows, "s", 4)]
    assert pairs == [("macer-analytic", 240), ("macer-analytic (1 noisy copy)", 240)]
    lines, summary = same_passes(rows, "s")
    assert lines == [
        "- **sigma 0.5, 15 s, against sampled MACER at the same passes:** macer-analytic (1.00 "
        "passes per image) against macer (1 noisy copy) (1.00): 0.800 < 0.900 (resolved: gap "
        "-0.100, 2 SE 0.045).",
        "- **sigma 0.5, 60 s, against sampled MACER at the same passes:** macer-analytic (1 noisy "
        "copy) (2.00 passes per image) against macer (2 noisy copies) (2.00): 1.050 < 1.200 "
        "(resolved: gap -0.150, 2 SE 0.057).",
    ]  # plain macer-analytic at 60 s has no 1-copy MACER beside it
    assert summary.endswith("at least as good in 0 of 2 pairs, 0 of them by more than two "
                            "standard errors; behind by more than two in 2.")  # fmt: skip
    assert same_passes([macer, plain], "s") == ([], None)
    longer = {**two, "budget": 480, "acr": 1.3}  # the anchors' row is MACER's 16 copies
    assert "| macer | 1.590 | 1.000 (240 s) |" in anchor_table([macer, longer], [0.5], {}, "s", {})


def test_the_setting_names_the_budgets_of_macer_and_of_each_few_copy_control():
    runs = [(0, 12), (0, 48), (1, 0.75), (1, 3), (1, 12), (2, 0.75), (2, 3)]
    rows = [row("macer", s, 1.0, budget=b, copies=c) for c, b in runs for s in (0.5, 1.0)]
    rows.append(row("noise", 0.5, 1.0, budget=0.75))
    assert _macer_budgets(rows) == (
        "MACER with its 16 noisy copies at 12 and 48, and, labelled so, with 1 noisy copy at "
        "0.75, 3 and 12 and with 2 noisy copies at 0.75 and 3"
    )
    assert _macer_budgets(rows[:4]) == "MACER with its 16 noisy copies at 12 and 48"


@pytest.mark.parametrize(
    "ours, words",
    [
        (1.540, "gap -0.018, within 0.03; within two of our standard errors"),
        (1.520, "gap -0.038, outside 0.03; within two of our standard errors"),
        (1.450, "gap -0.108, outside 0.03; more than two of our standard errors"),
        (1.600, "gap +0.042, outside 0.03; more than two of our standard errors"),
    ],
)
def test_noise_training_is_checked_against_the_published_cohen_acr(ours, words):
    (line,) = anchor_check([row("noise", 0.5, ours, se=0.02)], [0.5])
    assert "published 1.558" in line and words in line


def _run(folder, name, config, kept, certified_tsv=True, epochs=90):
    run = folder / name
    run.mkdir()
    metrics = {"kept_epoch": kept, "best_epoch": kept, "epochs": epochs}
    metrics.update(test_accuracy=99.0, gnr=98.0)
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    if certified_tsv:
        (run / f"certify-sigma{config['sigma']:g}.tsv").write_text("idx\n")
    return {"run": name, "label": config["method"], "method": config["method"], "budget": 90}


def test_runs_that_keep_weights_from_before_their_regularizer_are_named(tmp_path):
    noise = _run(tmp_path, "noise", {"method": "noise", "sigma": 0.5}, kept=74)
    rows = [{**noise, "sigma": 0.5, "kept_epoch": 74, "epochs": 90, "delay": 0, "keep": "best"}]
    config = {"method": "macer", "sigma": 0.5, "alpha_delay": 31}
    _run(tmp_path, "macer", config, kept=25, certified_tsv=False)
    waiting = uncertified_runs(tmp_path)
    text = "\n".join(kept_weights(rows, waiting, "epochs"))
    assert "2 of 2 runs keep an earlier epoch than their last" in text
    assert "macer at sigma 0.5 (epoch 25 of 90; regularizer from epoch 32)" in text
    assert "should keep the last epoch" in text
    assert "noise at sigma 0.5 (epoch" not in text  # no regularizer to miss
    text = "\n".join(kept_weights(rows, waiting, "epochs", spec_keep="last"))
    assert "the spec keeps the last epoch now" in text and "`--methods macer` trains" in text


def test_the_runs_of_the_spec_never_trained_are_named_cell_by_cell(tmp_path):
    """A variant added to the spec after the runs (macer-analytic with a noisy copy beside the
    one without) is named as untrained, though a run of its method and sigma exists."""
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'model = "smoothing-lenet"\ndataset = "mnist"\nsigma = 0.5\nepochs = 90\n\n'
        '[[methods]]\nmethod = "noise"\n\n[[methods]]\nmethod = "macer-analytic"\n\n'
        '[[methods]]\nmethod = "macer-analytic"\nsamples = 1\n'
    )
    study = dataclasses.replace(STUDIES["gpu"], spec=spec)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for config in expand(load_spec(str(spec))):
        if not config.get("samples"):  # trained elsewhere: another data_dir, same cell
            _run(folder, run_dir_name({**config, "data_dir": "/data"}), config, kept=90)
    untrained = ["macer-analytic (1 noisy copy) at sigma 0.5"]
    assert missing_runs(study, folder, []) == ([], untrained)


def test_a_run_that_keeps_its_last_epoch_is_not_flagged(tmp_path):
    config = {"method": "macer", "sigma": 1.0, "alpha_delay": 31, "keep": "last"}
    _run(tmp_path, "macer", config, kept=90, certified_tsv=False)
    (line,) = kept_weights([], uncertified_runs(tmp_path), "epochs")
    assert "keeps its `last` weights" in line
    assert line.endswith("0 of 1 runs keep an earlier epoch than their last.")


def test_a_run_shorter_than_its_regularizer_delay_is_named_without_the_keep_advice(tmp_path):
    config = {"method": "macer", "sigma": 1.0, "alpha_delay": 31, "keep": "last"}
    _run(tmp_path, "macer", config, kept=2, epochs=2, certified_tsv=False)
    text = "\n".join(kept_weights([], uncertified_runs(tmp_path), "epochs"))
    assert "macer at sigma 1 (epoch 2 of 2; regularizer from epoch 32)" in text
    assert "keep=last" not in text  # it keeps its last epoch already


def _certified_run(folder, name, method="noise", sigma=0.5):
    """A run folder as export leaves it: config, metrics, history and per-image TSV."""
    _run(folder, name, {"method": method, "sigma": sigma, "epochs": 90, "batch_size": 256}, 90)
    metrics = json.loads((folder / name / "metrics.json").read_text())
    metrics.update(steps=100, step_seconds=10.0, passes_per_image=1.0)
    (folder / name / "metrics.json").write_text(json.dumps(metrics))
    (folder / name / "history.csv").write_text("epoch,val_loss\n1,0.5\n")
    tsv = "idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\t0.8\t1\n1\t2\t0\t0.3\t0\n"
    (folder / name / "certify-sigma0.5.tsv").write_text(tsv)


def test_rows_read_the_acr_from_the_tsv_and_refuse_two_runs_of_one_method(tmp_path):
    _certified_run(tmp_path, "noise-a")
    (row,), _ = load_rows(tmp_path, "epochs")
    assert row["acr"] == pytest.approx(0.4) and row["budget"] == 90  # (0.8 + 0) / 2
    # certified accuracy counts correct predictions only, at r = 0 too (the wrong one has 0.3)
    assert row["at"] == {0.0: 50.0, 0.5: 50.0, 1.0: 0.0, 1.5: 0.0, 2.0: 0.0}
    _certified_run(tmp_path, "noise-b")  # a rerun's twin left beside it
    with pytest.raises(SystemExit, match="two runs of noise at sigma 0.5, budget 90"):
        load_rows(tmp_path, "epochs")


def test_a_second_seed_is_paired_with_its_first_and_kept_out_of_the_rows(tmp_path):
    _certified_run(tmp_path, "noise-a")
    _certified_run(tmp_path, "noise-b")
    config = json.loads((tmp_path / "noise-b" / "config.json").read_text())
    (tmp_path / "noise-b" / "config.json").write_text(json.dumps({**config, "seed": 1}))
    (tmp_path / "noise-b" / "certify-sigma0.5.tsv").write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\t0.6\t1\n1\t2\t2\t0.6\t1\n"
    )
    (row,), ((first, again),) = load_rows(tmp_path, "epochs")  # the second seed is no row
    assert row["run"] == "noise-a" and row["step_cost"] == 1.0
    assert (first["run"], again["run"], again["label"]) == ("noise-a", "noise-b", "noise (seed 1)")
    assert (first["acr"], again["acr"]) == pytest.approx((0.4, 0.6))


def test_a_second_seed_with_a_step_budget_is_paired_with_the_first_seed_of_those_steps(tmp_path):
    _certified_run(tmp_path, "noise-a")  # 100 steps (_certified_run's metrics)
    for name, steps in (("noise-b", 100), ("noise-c", 99)):
        _certified_run(tmp_path, name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config.update(seed=1, epochs=100, step_budget=steps)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (row,), pairs = load_rows(tmp_path, "epochs")  # noise-c has no first seed of 99 steps
    assert [(a["run"], b["run"], b["step_budget"], b["budget"]) for a, b in pairs] == [
        ("noise-a", "noise-b", 100, 90)  # the budget its first seed had
    ]


def test_a_second_seed_with_a_pass_budget_is_drawn_again_at_its_first_seeds_steps(tmp_path):
    """In a study of pass budgets a second seed of the same budget has its first seed's steps:
    it is paired by the budget, and counted with the seeds at their steps, not at the seconds."""
    for name, seed, budget in (("noise-a", 0, 3), ("noise-b", 1, 3), ("noise-c", 1, 0.75)):
        _certified_run(tmp_path, name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config.update(seed=seed, pass_budget=budget)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (row,), pairs = load_rows(tmp_path, CLEAN_EPOCHS)  # noise-c has no first seed at 0.75
    assert [(a["run"], b["run"], b["budget"]) for a, b in pairs] == [("noise-a", "noise-b", 3)]
    assert at_steps(pairs) == pairs and at_seconds(pairs) == []


def test_the_goals_pairs_are_compared_again_between_second_seeds_at_their_steps():
    cons, analytic = (
        row("consistency", 0.5, 0.4, se=0.05, budget=15),
        row("macer-analytic", 0.5, 0.8, se=0.05, budget=15),
    )
    for r, name in ((cons, "c0"), (analytic, "m0")):
        r.update(run=name, steps=80, seed=0)
    again = {
        "c0": {**cons, "run": "c1", "seed": 1, "acr": 0.6, "step_budget": 80},
        "m0": {**analytic, "run": "m1", "seed": 1, "acr": 0.5, "step_budget": 80},
    }
    pairs = [(cons, again["c0"]), (analytic, again["m0"])]
    *_, head, line = seed_lines(pairs, goal_pairs([cons, analytic], "s", 4), "s")
    assert head.endswith("of the 1 goal comparisons whose two runs both have a second seed at "
                         "their steps, 1 hold with seed 0 and 0 with seed 1:")  # fmt: skip
    assert line == (
        "  - sigma 0.5: macer-analytic at 15 s against consistency at "
        "15 s: seed 0 0.800 against 0.400, holds (gap +0.400, 2 SE 0.141); seed 1 at the same "
        "steps 0.500 against 0.600, fails (gap -0.100, 2 SE 0.141); the two seeds' mean gap is "
        "+0.150."
    )
    # a second seed at the same seconds is no retraining at the same steps
    pairs[0] = (cons, {**again["c0"], "step_budget": 0, "steps": 60, "acr": 0.1})
    lines = seed_lines(pairs, goal_pairs([cons, analytic], "s", 4), "s")
    assert not any("drawn again" in x for x in lines)
    assert "took 0.75x to 0.75x their first seed's steps" in lines[1]
    assert not lines[1].endswith("at the same seconds.")  # no run drawn again both ways
    lines = seed_lines([*pairs, (cons, again["c0"])], goal_pairs([cons, analytic], "s", 4), "s")
    assert lines[1].endswith(
        "The 1 runs drawn again both ways moved by a root mean square of 0.200 at their first "
        "seed's steps and 0.300 at the same seconds."
    )


def test_the_spec_stops_each_second_seed_after_its_committed_first_seeds_steps():
    """The CPU spec's step budgets are typed in; each must be the steps its seed-0 run took."""
    results = ROOT / "docs" / "results" / "certified" / "mnist"
    first = {}
    for run in results.iterdir():
        config = json.loads((run / "config.json").read_text())
        if not config.get("seed") and config.get("time_budget"):
            key = (config["method"], config["sigma"], config.get("samples", 0),
                   config.get("moment_depth", "first"))  # fmt: skip
            steps = json.loads((run / "metrics.json").read_text())["steps"]
            first.setdefault(key, set()).add(steps)
    budgets = [c for c in expand(load_spec(ROOT / "experiments" / "certified.toml"))
               if c.get("step_budget")]  # fmt: skip
    assert len(budgets) == 24
    for c in budgets:
        key = (c["method"], c["sigma"], c.get("samples", 0), c.get("moment_depth", "first"))
        assert c["seed"] == 1 and c["step_budget"] in first.get(key, ()), c


def test_the_second_seeds_spread_is_counted_into_the_goals_resolved_pairs():
    pairs = [
        (row("noise", 0.5, 1.0, se=0.05, budget=60), row("noise", 0.5, 1.1, se=0.05, budget=60)),
        (row("moment", 0.5, 0.8, se=0.05, budget=60), row("moment", 0.5, 0.7, se=0.05, budget=60)),
    ]
    for _, again in pairs:
        again.update(seed=1, step_budget=100)
    assert seed_spread(pairs) == pytest.approx(0.1)
    rows = [
        row("consistency", 0.5, 0.5, se=0.05, budget=60),
        row("stability-analytic", 0.5, 0.8, se=0.05, budget=60),  # +0.30: over 2 x 0.122
        row("consistency", 0.5, 0.5, se=0.05, budget=15),
        row("stability-analytic", 0.5, 0.68, se=0.05, budget=15),  # +0.18: over 0.141 only
        row("consistency", 0.5, 0.5, se=0.05, budget=30),
        row("stability-analytic", 0.5, 0.55, se=0.05, budget=30),  # within 2 SE of the images
    ]
    (line,) = seed_lines(pairs, goal_pairs(rows, "s", 4), "s")
    assert line.startswith("- **A second seed at the first seed's steps** (the draw of the ")
    assert "moved the ACR by up to 0.100 at 60 s (2 runs, root mean square 0.100); a " in line
    assert "per-image differences) is 0.071 at the median, and 0 of 2 moves exceed" in line
    assert "1 of the 2 goal comparisons that hold by more than two standard errors still do" in line
    # a second seed at 15 s with no move: the 15 s pair is judged by that spread, and holds
    calm = row("noise", 0.5, 0.6, se=0.05, budget=15)
    (line,) = seed_lines(
        [*pairs, (calm, {**calm, "seed": 1, "step_budget": 100})], goal_pairs(rows, "s", 4), "s"
    )
    assert "up to 0.000 at 15 s (1 run, root mean square 0.000) and up to 0.100 at 60 s" in line
    assert "2 of the 2 goal comparisons" in line
    moment = "| moment | 0.5 | 60 | 1 | 100 | 100 | 0.800 ± 0.050 | 0.700 ± 0.050 | -0.100 | 0.141"
    assert moment in seed_table(pairs, "s")
    assert seed_lines([], goal_pairs(rows, "s", 4), "s") == []


@pytest.mark.parametrize("study, beside", [("cpu", False), ("gpu", True)])
def test_a_study_of_seconds_evaluates_only_after_training(tmp_path, monkeypatch, study, beside):
    """Budgets of seconds: a certification beside a training run would take CPU time from its
    budget, so none starts before training ends; budgets of epochs: each starts at once."""
    stamp = tmp_path / "started"
    job = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(stamp)!r})"
           ".write_text(repr(time.monotonic()))"]  # fmt: skip
    monkeypatch.setattr(certified, "evaluation_jobs", lambda *args: ([job], []))
    monkeypatch.setattr(certified, "POLL", 0.05)
    ended = []
    monkeypatch.setattr(
        certified, "train", lambda *args: (time.sleep(1.5), ended.append(time.monotonic()))
    )
    args = argparse.Namespace(
        stages={"train", "evaluate"}, deadline=0, runs=tmp_path, device="cpu", workers=1, set=[],
        certify_images=1, certify_n=1, eval_workers=1, methods=None,
    )  # fmt: skip
    certified.train_and_evaluate(STUDIES[study], args, tmp_path)  # SystemExit if the job failed
    assert (float(stamp.read_text()) < ended[0]) == beside


def _study_folder(folder, command, date, runs):
    """A study's runs (or results) folder: its command, environment and run folders."""
    (folder / "mnist").mkdir(parents=True)
    (folder / "command.txt").write_text(command + "\n")
    made = {"date": date, "python": "3", "torch": "2", "gpu": None, "cpus": 2, "platform": "x"}
    (folder / "environment.json").write_text(json.dumps(made))
    for name, method, seconds in runs:
        _certified_run(folder / "mnist", name, method)
        metrics = json.loads((folder / "mnist" / name / "metrics.json").read_text())
        metrics.update(step_seconds=seconds, environment=made)
        (folder / "mnist" / name / "metrics.json").write_text(json.dumps(metrics))


def test_a_partial_rerun_replaces_the_runs_of_its_cells_and_keeps_the_others(tmp_path, capsys):
    first = "python experiments/certified.py --study gpu --deadline 500"
    results = tmp_path / "results"
    old = [
        ("noise-s0.5-aaaaaaaa", "noise", 10.0),
        ("consistency-s0.5-a5.0-bbbbbbbb", "consistency", 20.0),
    ]
    _study_folder(results, first, "2026-11-30", old)
    again = "python experiments/certified.py --study gpu --methods noise,macer --deadline 540"
    runs = tmp_path / "runs"
    new = [("noise-s0.5-cccccccc", "noise", 5.0), ("macer-s0.5-a16.0-dddddddd", "macer", 40.0)]
    _study_folder(runs, again, "2026-12-01", [])
    for name, method, seconds in new:  # the runs folder: <task>/runs/<run>
        (runs / "mnist" / "runs").mkdir(exist_ok=True)
        _certified_run(runs / "mnist" / "runs", name, method)
        path = runs / "mnist" / "runs" / name / "metrics.json"
        metrics = json.loads(path.read_text())
        made = {**json.loads((runs / "environment.json").read_text()), "gpu": "GPU X"}
        path.write_text(json.dumps({**metrics, "step_seconds": seconds, "environment": made}))

    export(runs, results, ["mnist"])
    names = sorted(p.name for p in (results / "mnist").iterdir())
    assert names == [
        "consistency-s0.5-a5.0-bbbbbbbb",
        "macer-s0.5-a16.0-dddddddd",
        "noise-s0.5-cccccccc",
    ]
    assert "replaced mnist/noise-s0.5-aaaaaaaa" in capsys.readouterr().out
    assert (results / "command.txt").read_text().splitlines() == [first, again]
    assert json.loads((results / "environment.json").read_text())["date"] == "2026-11-30"

    rows = {r["method"]: r for r in load_rows(results / "mnist", "epochs")[0]}
    assert rows["noise"]["batch"] == rows["macer"]["batch"] == "noise,macer"
    assert rows["consistency"]["batch"] == ""
    assert methods_option(again.replace("--methods ", "--methods=")) == "noise,macer"
    assert rows["macer"]["step_cost"] == pytest.approx(8.0)  # against the noise run beside it
    assert rows["consistency"]["step_cost"] is None  # its noise run was replaced
    configs = [{"method": m} for m in ("noise", "macer", "consistency")]
    (line,) = later_batches(
        list(rows.values()), configs, {"noise": "noise,macer", "macer": "noise,macer"}
    )
    assert "`--methods noise,macer` trained the runs of those methods again, 2 at once" in line
    assert "on GPU X (torch 2, Python 3, 2026-12-01)" in line
    bullets = "\n".join(setting(STUDIES["gpu"], results, list(rows.values()), [0.5], 2, 100))
    assert (
        "The first calls' 1 runs here trained at once with the earlier runs of macer, noise"
        in bullets
    )
    assert line in bullets

    # a rerun of every cell: the results are the new runs alone, made where they say
    _certified_run(runs / "mnist" / "runs", "consistency-s0.5-a5.0-eeeeeeee", "consistency")
    export(runs, results, ["mnist"])
    assert (results / "command.txt").read_text().splitlines() == [again]
    assert json.loads((results / "environment.json").read_text())["date"] == "2026-12-01"


def test_the_gpu_rerun_of_the_macer_comparison_is_thirteen_runs_keeping_their_last_epoch():
    spec = load_spec(str(STUDIES["gpu"].spec))
    runs = expand(certified.chosen(spec, ["macer", "macer-analytic", "noise"]))
    assert sorted((r["method"], r["sigma"], r.get("samples", 0)) for r in runs) == [
        ("macer", 0.5, 0), ("macer", 0.5, 1), ("macer", 0.5, 2),
        ("macer", 1.0, 0), ("macer", 1.0, 1), ("macer", 1.0, 2),
        ("macer-analytic", 0.5, 0), ("macer-analytic", 0.5, 1),
        ("macer-analytic", 1.0, 0), ("macer-analytic", 1.0, 1),
        ("noise", 0.25, 0), ("noise", 0.5, 0), ("noise", 1.0, 0),
    ]  # fmt: skip
    assert {r["keep"] for r in runs} == {"last"} and len(expand(spec)) == 21


def test_the_few_copy_macer_control_is_certified_after_the_goals_runs(tmp_path):
    folder = tmp_path / "mnist" / "runs"
    for name, method, samples in [("a-control", "macer", 2), ("b-macer", "macer", 0),
                                  ("c-analytic", "macer-analytic", 1), ("d-noise", "noise", 0),
                                  ("e-moment", "moment", 0)]:  # fmt: skip
        run = folder / name
        run.mkdir(parents=True)
        config = {"method": method, "sigma": 0.5, "samples": samples}
        (run / "config.json").write_text(json.dumps(config))
        (run / "metrics.json").write_text(json.dumps({"constant_predictions": False}))
    certify, tightness = certified.evaluation_jobs(STUDIES["gpu"], tmp_path, 500, 100, "cpu")
    order = [Path(argv[4]).name for argv in certify]
    assert order == ["d-noise", "c-analytic", "b-macer", "e-moment", "a-control"]
    assert [Path(argv[4]).name for argv in tightness] == order


def test_an_unknown_method_is_a_usage_error(tmp_path):
    script = Path(certified.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--study", "gpu", "--methods", "macer,macr",
         "--stages", "doc", "--doc", str(tmp_path / "page.md")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--methods: macr not in certified-gpu.toml" in result.stderr
    assert not (tmp_path / "page.md").exists()


def test_the_soft_classifier_table_shows_the_runs_measured_with_it(tmp_path):
    logits = {"analytic_error_median": 0.1, "analytic_argmax_agreement": 100.0,
              "all_layers_error_median": 0.05, "all_layers_argmax_agreement": 98.0,
              "mc_relative_se": 0.005}  # fmt: skip
    soft = {"analytic_tv_beta16_median": 0.25, "all_layers_tv_beta16_median": 0.125,
            "mc_tv_floor_beta16": 0.01, "mc_hinge_share": 100.0, "analytic_hinge_share": 4.0,
            "all_layers_hinge_share": 24.0}  # fmt: skip
    rows = []
    for name, measured in (("new", {**logits, **soft}), ("old", logits)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tightness.json").write_text(json.dumps({"rows": [measured]}))
        rows.append({"run": name, "label": name, "method": "noise", "sigma": 0.5, "budget": 90})
    lines = soft_table(tmp_path, rows, 0.5, "epochs", 0).splitlines()
    assert lines[2:] == ["| new | 90 | 0.250 | 0.125 | 0.010 | 100% | 4% | 24% |"]
    assert len(tightness_table(tmp_path, rows, 0.5, "epochs", 0).splitlines()) == 4  # both
    assert soft_table(tmp_path, rows[1:], 0.5, "epochs", 0) == ""


def test_the_hinge_share_is_read_at_the_depth_each_macer_analytic_model_trains_with(tmp_path):
    shares = {"mc_hinge_share": 100.0, "analytic_hinge_share": 0.0, "all_layers_hinge_share": 30.0}
    rows = []
    for label, depth in (("macer-analytic", "first"), ("macer-analytic (all layers)", "all"),
                         ("noise", "first")):  # fmt: skip
        (tmp_path / label).mkdir()
        (tmp_path / label / "tightness.json").write_text(json.dumps({"rows": [shares]}))
        method = label.split()[0]
        rows.append({"run": label, "label": label, "method": method, "depth": depth,
                     "sigma": 1.0, "budget": 60})  # fmt: skip
    (line,) = hinge_lines(tmp_path, rows, "s", 0)
    assert line.startswith("- **sigma 1, MACER's hinge under the analytic expectation:**")
    assert line.endswith(
        ": macer-analytic at 60 s, 0% against 100%; macer-analytic (all layers) at 60 s, 30% "
        "against 100%."
    )
