"""The study pages under docs/: each is what experiments/pages.py makes of its committed results,
its conclusions cite only numbers of its tables, and the certified study's rows and comparisons
follow their rules on runs made to test them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import pages  # noqa: E402
from certified import CLEAN_EPOCHS  # noqa: E402
from certified_tables import acr_gap, batches, comparisons, load_rows  # noqa: E402
from study import export  # noqa: E402

from momentreg.runs.sweep import expand, load_spec  # noqa: E402


@pytest.mark.slow
def test_every_study_page_is_what_its_committed_results_make():
    """Regenerating every page's blocks from docs/results/ changes nothing, and each page's
    conclusions cite only numbers its tables hold."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "pages.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("page", list(pages.PAGES))
def test_every_figure_a_page_shows_is_made_by_its_generator(tmp_path, page):
    pages.render(page, tmp_path)
    made = {p.name for p in tmp_path.glob("*.png")}
    shown = set(
        pages.re.findall(rf"\]\({page}/([^)]+\.png)\)", (pages.DOCS / f"{page}.md").read_text())
    )
    assert made and shown == made == {p.name for p in (pages.DOCS / page).glob("*.png")}


PAGE = """# A page

<!-- begin made -->
old
<!-- end made -->

## What we conclude

The gain is 1.65 points on CIFAR-10 (Fig. 3b; Table 4), over 10,000 images{extra}.

<!-- begin table -->
<!-- end table -->
"""


def test_a_page_places_exactly_the_blocks_its_generator_makes():
    text = pages.fill(PAGE.format(extra=""), {"made": "| a |", "table": "| 1.65 | 10000 |"})
    assert "<!-- begin made -->\n| a |\n<!-- end made -->" in text and "old" not in text
    with pytest.raises(pages.PageError, match="generated"):
        pages.fill(PAGE, {"made": "x"})  # a block without a generator
    with pytest.raises(pages.PageError, match="generated"):
        pages.fill(PAGE, {"made": "x", "table": "y", "new": "z"})  # a table the page drops


def test_a_number_in_the_conclusions_that_no_table_holds_is_found():
    """References to the paper's figures and tables, and numbers inside names (CIFAR-10), are
    not results; thousands separators do not matter; a number outside the blocks is found."""
    filled = pages.fill(PAGE.format(extra=""), {"made": "x", "table": "| -1.65 | 10000 |"})
    assert pages.stray_numbers(filled) == []
    filled = pages.fill(PAGE.format(extra=", 97.5% of clean"), {"made": "x", "table": "| 1.65 |"})
    assert pages.stray_numbers(filled) == ["10000", "97.5"]
    with pytest.raises(pages.PageError, match="What we conclude"):
        pages.stray_numbers("# A page without conclusions\n")


# -- the certified study's rows and comparisons ---------------------------------------------------


def _certified_run(folder, name, method="noise", sigma=0.5, radii=(0.8, 0.3), **config):
    """A run folder as export leaves it: config, metrics, history and per-image TSV (the second
    image predicted wrong)."""
    run = folder / name
    run.mkdir(parents=True)
    config = {"method": method, "sigma": sigma, "epochs": 90, "batch_size": 256, **config}
    metrics = {"kept_epoch": 90, "best_epoch": 90, "epochs": 90, "test_accuracy": 99.0, "gnr": 98.0}
    metrics.update(steps=100, step_seconds=10.0, passes_per_image=1.0)
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "history.csv").write_text("epoch,val_loss\n1,0.5\n")
    rows = [f"{i}\t1\t{1 if i == 0 else 0}\t{r}\t{int(i == 0)}" for i, r in enumerate(radii)]
    (run / f"certify-sigma{sigma:g}.tsv").write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\n" + "\n".join(rows) + "\n"
    )
    return run


def test_rows_read_the_acr_from_the_tsv_and_refuse_two_runs_of_one_cell(tmp_path):
    _certified_run(tmp_path, "noise-a")
    (row,), _ = load_rows(tmp_path, "epochs")
    assert row["acr"] == pytest.approx(0.4) and row["budget"] == 90  # (0.8 + 0) / 2
    # certified accuracy counts correct predictions only, at r = 0 too (the wrong one has 0.3)
    assert row["at"] == {0.0: 50.0, 0.5: 50.0, 1.0: 0.0, 1.5: 0.0, 2.0: 0.0}
    _certified_run(tmp_path, "noise-b")  # a rerun's twin left beside it
    with pytest.raises(SystemExit, match="two runs of noise at sigma 0.5, budget 90"):
        load_rows(tmp_path, "epochs")


def test_a_second_seed_is_paired_with_its_first_seed_of_the_same_budget_or_steps(tmp_path):
    _certified_run(tmp_path, "noise-a")  # 100 steps
    _certified_run(tmp_path, "noise-b", seed=1, radii=(0.6, 0.6))  # the same budget
    _certified_run(tmp_path, "noise-c", seed=1, step_budget=100, epochs=100)  # its steps
    _certified_run(tmp_path, "noise-d", seed=1, step_budget=99, epochs=100)  # no such first
    (row,), pairs = load_rows(tmp_path, "epochs")  # second seeds are no rows
    assert row["run"] == "noise-a" and row["step_cost"] == 1.0
    assert [(a["run"], b["run"], b["label"], b["budget"]) for a, b in pairs] == [
        ("noise-a", "noise-b", "noise (seed 1)", 90),
        ("noise-a", "noise-c", "noise (seed 1)", 90),  # the budget its first seed had
    ]
    assert pairs[0][1]["acr"] == pytest.approx(0.3)  # (0.6 + 0) / 2


def row(method, acr, budget=90, compute=1.0, label=None, copies=0, passes=1.0, radii=None):
    r = {"method": method, "label": label or method, "sigma": 1.0, "acr": acr, "budget": budget}
    r.update(compute=compute, copies=copies, passes=passes, run=f"{label or method}-{budget}")
    return {**r, "radii": radii or {0: acr, 1: acr}}


def test_the_goal_sets_the_best_analytic_variant_against_consistency_at_its_budget():
    rows = [row("consistency", 1.7), row("consistency-analytic", 1.6),
            row("stability-analytic", 1.65), row("noise", 1.8),  # sampled: never the analytic side
            row("stability-analytic", 1.9, budget=30)]  # fmt: skip
    goal = [(k, a["label"], b["label"]) for k, a, b in comparisons(rows, "epochs", 1)]
    assert goal == [
        ("goal: best of 2 analytic vs consistency", "stability-analytic", "consistency")
    ]


def test_macer_analytic_meets_macer_in_the_goal_only_at_a_quarter_of_its_compute():
    """Measured compute decides in a study of seconds or epochs; in one of counted compute the
    budgets do (a measured 0.2502 is a step's rounding there)."""
    macer = row("macer", 1.5, compute=16.0)
    cheap, dear = row("macer-analytic", 1.6), row("macer-analytic", 1.6, compute=5.0, label="all")
    kinds = {(k, a["label"]) for k, a, _ in comparisons([macer, cheap, dear], "epochs", 1)}
    assert kinds == {
        ("goal: vs MACER at 1x the budget", "macer-analytic"),
        ("not in the goal: over a quarter at 1x the budget", "all"),
    }
    seconds = [{**macer, "budget": 240}, {**cheap, "budget": 60}, {**cheap, "budget": 15}]
    assert [a["budget"] for k, a, _ in comparisons(seconds, "s", 4) if "MACER" in k] == [60]
    rounded = [{**macer, "budget": 12}, {**cheap, "budget": 3, "compute": 4.003}]
    assert comparisons(rounded, CLEAN_EPOCHS, 4)[0][0] == "goal: vs MACER at 4x the budget"
    assert comparisons(rounded, "s", 4)[0][0].startswith("not in the goal")


def test_a_gap_between_runs_on_the_same_images_has_the_standard_error_of_their_differences():
    """One run 0.10 or 0.11 above the other on every image: the per-image differences (mean
    0.105, standard deviation 0.00513) resolve what the runs' own spread cannot."""
    b = row("noise", 1.0, radii={20 * i: 0.5 * (i % 5) for i in range(20)})
    a = row("macer", 1.1, radii={i: r + 0.1 + 0.01 * (i % 40 == 20) for i, r in b["radii"].items()})
    gap, two_se = acr_gap(a, b)
    assert gap == pytest.approx(0.105)
    assert two_se == pytest.approx(2 * 0.005130 / 20**0.5, rel=1e-3)


def _results(folder, command, date, runs):
    """A study's runs (or results) folder: its command, environment and run folders."""
    (folder / "mnist").mkdir(parents=True)
    (folder / "command.txt").write_text(command + "\n")
    made = {"date": date, "python": "3", "torch": "2", "gpu": None, "cpus": 2, "platform": "x"}
    (folder / "environment.json").write_text(json.dumps(made))
    for where, name, method, seconds in runs:
        run = _certified_run(folder / where, name, method)
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**metrics, "step_seconds": seconds}))


def test_a_partial_rerun_replaces_the_runs_of_its_cells_and_keeps_the_others(tmp_path, capsys):
    first = "python experiments/certified.py --study gpu --deadline 500"
    results, runs = tmp_path / "results", tmp_path / "runs"
    _results(results, first, "2026-11-30", [("mnist", "noise-s0.5-aaaaaaaa", "noise", 10.0),
             ("mnist", "consistency-s0.5-a5.0-bbbbbbbb", "consistency", 20.0)])  # fmt: skip
    again = "python experiments/certified.py --study gpu --methods noise,macer --deadline 540"
    _results(runs, again, "2026-12-01", [("mnist/runs", "noise-s0.5-cccccccc", "noise", 5.0),
             ("mnist/runs", "macer-s0.5-a16.0-dddddddd", "macer", 40.0)])  # fmt: skip

    export(runs, results, ["mnist"])
    names = sorted(p.name for p in (results / "mnist").iterdir())
    assert names == ["consistency-s0.5-a5.0-bbbbbbbb", "macer-s0.5-a16.0-dddddddd",
                     "noise-s0.5-cccccccc"]  # fmt: skip
    assert "replaced mnist/noise-s0.5-aaaaaaaa" in capsys.readouterr().out
    assert (results / "command.txt").read_text().splitlines() == [first, again]
    assert json.loads((results / "environment.json").read_text())["date"] == "2026-11-30"
    assert batches(results) == {"noise": "noise,macer", "macer": "noise,macer"}
    rows = {r["method"]: r for r in load_rows(results / "mnist", "epochs")[0]}
    assert rows["macer"]["step_cost"] == pytest.approx(8.0)  # against the noise run beside it
    assert rows["consistency"]["step_cost"] is None  # its noise run was replaced

    # a rerun of every cell: the results are the new runs alone, made where they say
    _certified_run(runs / "mnist" / "runs", "consistency-s0.5-a5.0-eeeeeeee", "consistency")
    export(runs, results, ["mnist"])
    assert (results / "command.txt").read_text().splitlines() == [again]
    assert json.loads((results / "environment.json").read_text())["date"] == "2026-12-01"


def test_the_spec_stops_each_second_seed_after_its_committed_first_seeds_steps():
    """The CPU spec's step budgets are typed in; each must be the steps its seed-0 run took."""
    first = {}
    for run in (ROOT / "docs" / "results" / "certified" / "mnist").iterdir():
        config = json.loads((run / "config.json").read_text())
        if not config.get("seed") and config.get("time_budget"):
            key = (config["method"], config["sigma"], config.get("samples", 0),
                   config.get("moment_depth", "first"))  # fmt: skip
            first.setdefault(key, set()).add(
                json.loads((run / "metrics.json").read_text())["steps"]
            )
    budgets = [c for c in expand(load_spec(ROOT / "experiments" / "certified.toml"))
               if c.get("step_budget")]  # fmt: skip
    assert len(budgets) == 24
    for c in budgets:
        key = (c["method"], c["sigma"], c.get("samples", 0), c.get("moment_depth", "first"))
        assert c["seed"] == 1 and c["step_budget"] in first.get(key, ()), c


def test_an_unknown_method_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "certified.py"), "--study", "gpu",
         "--methods", "macer,macr", "--stages", "export", "--runs", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--methods: macr not in certified-gpu.toml" in result.stderr


def test_every_number_in_the_findings_is_on_the_page_its_paragraph_links():
    """docs/findings.md sums the pages up by hand: each decimal in a paragraph that opens with a
    link to a study page stands on that page."""
    text = (pages.DOCS / "findings.md").read_text()
    chunks = pages.re.split(r"\n(?=\[docs/|## )", text)
    checked = 0
    for chunk in chunks:
        link = pages.re.match(r"\[docs/([a-z-]+)\.md\]", chunk)
        if link and link[1] in pages.PAGES:
            page = (pages.DOCS / f"{link[1]}.md").read_text()
            missing = [n for n in pages.re.findall(r"\d+\.\d+", chunk) if n not in page]
            assert not missing, f"{link[1]}: {missing}"
            checked += 1
    assert checked == len(pages.PAGES)


def test_the_deadline_stops_the_tightness_stage_without_a_traceback(tmp_path, capsys):
    """A measurement still running at the deadline is killed, said, and left for the next call."""
    import time

    from certified import TASK, tightness

    run = tmp_path / TASK / "runs" / "noise-s0.5-aaaaaaaa"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sigma": 0.5}))
    (run / "metrics.json").write_text("{}")
    tightness(tmp_path, "cpu", 1, until=time.time() + 0.2)  # less than importing torch takes
    assert "the deadline stopped the tightness of noise-s0.5-aaaaaaaa" in capsys.readouterr().err
    assert not (run / "tightness.json").exists()
