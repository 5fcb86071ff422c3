"""``momentreg demo``: LeNet trained clean, with N-fold augmentation and with the regularizer on
the bundled MNIST sample, then one table and one figure of how often predictions survive noise."""

from __future__ import annotations

from pathlib import Path

from momentreg.runs.run import RunConfig, prepare_out_dir, train_run
from momentreg.tables import fmt, markdown_table

__all__ = ["demo"]


def demo(out: Path, *, epochs: int = 3, folds: int = 6, augment_sigma: float = 0.5,
         moment_sigma: float = 1.0, alpha: float = 1.0, train_limit: int = 5000,
         gnr_limit: int = 1000, seed: int = 0, device: str = "cpu",
         progress: bool = True) -> str:  # fmt: skip
    """Train the three runs into ``out/<i>-<method>/`` (resuming finished ones), write
    ``out/table.md`` and ``out/consistency.png``; returns the table (Markdown)."""
    from momentreg.runs.plots import plot_consistency

    runs = {
        "clean": dict(method="clean"),
        f"augment N={folds} sigma={augment_sigma}": dict(
            method="augment", folds=folds, sigma=augment_sigma
        ),
        f"moment sigma={moment_sigma} alpha={alpha}": dict(
            method="moment", sigma=moment_sigma, alpha=alpha
        ),
    }
    common = dict(
        dataset="mnist-sample", epochs=epochs, lr=1e-3, batch_size=128, seed=seed, device=device,
        train_limit=train_limit, gnr_limit=gnr_limit,
    )  # fmt: skip
    prepare_out_dir(out, resume=True, force=False)
    results = {}
    for i, (label, settings) in enumerate(runs.items()):
        print(f"[{i + 1}/{len(runs)}] {label}", flush=True)
        config = RunConfig.from_settings({**common, **settings})
        results[label] = train_run(
            config, out / f"{i}-{settings['method']}", resume=True, progress=progress
        )
    header = ["method", "test accuracy (%)", "GNR", "training seconds"]
    rows = [
        [label, fmt(m["test_accuracy"]), fmt(m["gnr"]), fmt(m["train_seconds"], ".0f")]
        for label, m in results.items()
    ]
    table = markdown_table(header, rows, align="lrrr")
    (out / "table.md").write_text(table + "\n")
    plot_consistency(
        {label: m["gnr_curve"] for label, m in results.items()},
        out / "consistency.png",
        title="LeNet on the bundled MNIST sample",
    )
    return table
