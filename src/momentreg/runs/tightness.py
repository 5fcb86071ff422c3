"""The surrogate's tightness on trained runs: each run's tightness.json, one table over the
runs, and a report page with its figure (``momentreg tightness``)."""

from __future__ import annotations

from pathlib import Path

from momentreg.core.smoothing_losses import MACER_BETA
from momentreg.evaluation.tightness import ESTIMATES, tightness
from momentreg.files import atomic_write, write_json
from momentreg.runs.plots import plot_tightness
from momentreg.runs.run import load_run, test_subset
from momentreg.runs.rundir import TIGHTNESS_FILE
from momentreg.tables import markdown_table

__all__ = ["TIGHTNESS_INTRO", "tightness_of_runs", "tightness_table", "write_report"]

TIGHTNESS_INTRO = """# How faithful is the regularizer's surrogate?

Made by `{command}` (see `momentreg.evaluation.tightness`).
For the first {limit} test images and each input
noise level sigma, the expected logits E[f(x + n)] are estimated by Monte Carlo ({samples} draws per
image) and compared with

- **analytic**: tail(T(mu, s)), the paper's one-layer approximation that the regularizer trains
  with (`momentreg.expected_logits`);
- **linearized**: Bibi et al. (CVPR 2018)'s two-stage linearization, the tail replaced by its
  first-order expansion at the clean post-ReLU activations, then Theorem 1 exactly;
- **all_layers**: means and variances pushed through every layer, ReLUs exactly and max-pooling by
  Clark's moments, treating units as independent (`expected_logits(..., depth="all")`).

Errors are median relative L2 distances between logit vectors; the noise floor is the Monte Carlo
standard error on the same scale, below which an error cannot be resolved. Agreement is the share
of images whose expected argmax matches the Monte Carlo argmax.

The TV columns compare probabilities, as the randomized-smoothing losses' analytic variants use
them: the total variation between E[softmax(16 f(x + n))] (MACER's soft smoothed classifier, by
Monte Carlo from the same draws) and its analytic stand-ins, softmax(16 tail(T)) for **analytic**
and the pairwise-probit form for **all_layers** (`momentreg.core.smoothing_losses.analytic_probs`);
its floor is half the sum of the Monte Carlo standard errors of the probabilities.

"""


def tightness_of_runs(runs: list[Path], device, *, sigmas, limit: int = 50, samples: int = 2000,
                      batch: int = 20, seed: int = 0, data_dir=None, model: str | None = None,
                      progress: bool = True) -> dict[str, list[dict]]:  # fmt: skip
    """``tightness`` of each run's best model on its first ``limit`` test images, written to the
    run's tightness.json; returns run name -> rows (``model`` names a user factory, see
    ``run.load_run``)."""
    table = {}
    for run in runs:
        config, net = load_run(run, device, model)
        images, _ = test_subset(config, data_dir, limit)
        rows = tightness(
            net, images, sigmas, samples=samples, batch=batch, seed=seed, progress=progress
        )
        write_json(run / TIGHTNESS_FILE, {"rows": rows})
        table[run.name] = rows
    return table


def tightness_table(table: dict[str, list[dict]]) -> str:
    """Rows of ``tightness`` per run -> one Markdown table of errors and argmax agreement."""
    rows = [r for rs in table.values() for r in rs]
    names = [n for n in ESTIMATES if any(f"{n}_error_median" in r for r in rows)]
    b = f"{MACER_BETA:g}"
    soft = [n for n in names if any(f"{n}_tv_beta{b}_median" in r for r in rows)]
    header = ["run", "sigma", "MC noise floor"]
    header += [f"{n} error (median)" for n in names] + [f"{n} argmax agrees (%)" for n in names]
    header += [f"{n} TV, beta {b} (median)" for n in soft] + [f"MC TV floor, beta {b}"] * bool(soft)
    cells = [
        [run, f"{r['sigma']:g}", f"{r['mc_relative_se']:.4f}"]
        + [f"{r[f'{n}_error_median']:.4f}" for n in names]
        + [f"{r[f'{n}_argmax_agreement']:.1f}" for n in names]
        + [f"{r[f'{n}_tv_beta{b}_median']:.4f}" for n in soft]
        + [f"{r[f'mc_tv_floor_beta{b}']:.4f}"] * bool(soft)
        for run, rs in table.items()
        for r in rs
    ]
    return markdown_table(header, cells, align="l" + "r" * (len(header) - 1))


def write_report(table: dict[str, list[dict]], report: Path, command: str, limit: int,
                 samples: int) -> Path:  # fmt: skip
    """``report`` (Markdown: how the table was made, the table, the figure) and its .png."""
    report.parent.mkdir(parents=True, exist_ok=True)
    figure = report.with_suffix(".png")
    plot_tightness(table, figure)
    text = TIGHTNESS_INTRO.format(command=command, limit=limit, samples=samples)
    text += f"{tightness_table(table)}\n\n![relative error]({figure.name})\n"
    atomic_write(report, text.encode())
    return figure
