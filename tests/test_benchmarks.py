import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES_START = "<!-- tables: python -m benchmarks --markdown benchmarks/results.json -->"
TABLES_END = "<!-- end of tables -->"
SMOOTHING_START = (
    "<!-- smoothing: python -m benchmarks.smoothing --markdown benchmarks/smoothing.json -->"
)
SMOOTHING_END = "<!-- end of smoothing -->"


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-compile", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    lenet = data["steps"]["lenet-mnist"]
    assert {"clean", "moment", "augment2", "augment6", "tail_pass"} <= set(lenet["seconds"])
    assert {"moment", "augment6", "moment_over_floor"} <= set(lenet["ratio_to_clean"])
    assert lenet["ratio_to_clean"]["clean"] == 1.0
    assert {"gnr_seconds", "floor_seconds", "ratio"} <= set(data["gnr"])
    assert data["corruptions"]["ratio"] > 0 and data["corruptions"]["images"] == 100
    assert 0 < data["data_loading"]["share"] < 1
    attacks = data["attacks"]
    assert set(attacks["attacks"]) == {"pgd", "lbfgs", "fgsm", "aga", "aua", "deepfool"}
    assert all(
        a["ratio_to_floor"] > 0 and a["runs_per_image"] >= 1 for a in attacks["attacks"].values()
    )
    assert attacks["table1_seconds"] > 0 and attacks["lbfgs_reference"]["speedup"] > 0
    assert 0 < data["certify"]["ratio_to_floor"]
    assert {"clean", "moment"} <= set(data["memory"]["lenet-mnist"]["peak_mib"])
    assert data["keep_freed_memory"] is (platform.libc_ver()[0] == "glibc")  # kept on glibc
    assert {"fused", "unfused", "multiply"} == set(data["kernels"]["seconds"])
    assert {
        "steps lenet-mnist",
        "kernels",
        "gnr",
        "corruptions",
        "data_loading",
        "attacks",
        "certify",
        "memory",
    } == set(data["section_seconds"])
    assert all(seconds > 0 for seconds in data["section_seconds"].values())
    assert data["benchmark_seconds"] <= wall  # seconds, measured inside the process
    assert "ratio" in result.stdout


@pytest.mark.parametrize(
    "module, results, start, end",
    [
        ("benchmarks.__main__", "results.json", TABLES_START, TABLES_END),
        ("benchmarks.smoothing", "smoothing.json", SMOOTHING_START, SMOOTHING_END),
    ],
)
def test_performance_doc_embeds_the_committed_results(module, results, start, end):
    markdown = importlib.import_module(module).markdown
    tables = markdown(json.loads((ROOT / "benchmarks" / results).read_text()))
    doc = (ROOT / "docs" / "performance.md").read_text()
    begin = doc.index(start) + len(start)
    assert doc[begin : doc.index(end)].strip() == tables.strip()


@pytest.mark.slow
def test_heap_trace_records_both_allocators(tmp_path):
    out = tmp_path / "heap.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.heap", "--steps", "10", "--batch", "20"]
        + ["--method", "clean", "--json", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    data = json.loads(out.read_text())
    assert data["glibc_defaults"]["kept"] is False
    assert data["freed_memory_kept"]["kept"] is True
    for run in ("glibc_defaults", "freed_memory_kept"):
        assert len(data[run]["rss_mib_every_10_steps"]) == 1
        assert data[run]["peak_mib"] >= data[run]["rss_mib_every_10_steps"][0]


@pytest.mark.slow
def test_smoothing_benchmark_prices_every_method_against_its_flops(tmp_path):
    out = tmp_path / "smoothing.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.smoothing", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    methods = json.loads(out.read_text())["methods"]
    passes = {label: round(m["passes_per_image"], 1) for label, m in methods.items()}
    assert passes["clean"] == passes["noise"] == 1.0 and passes["macer"] == 16.0
    assert passes["consistency"] == passes["macer-analytic (1 noisy copy)"] == 2.0
    for m in methods.values():
        floor = m["passes_per_image"] * methods["clean"]["seconds"]
        assert m["ratio_to_floor"] == pytest.approx(m["seconds"] / floor)
    assert "step / floor" in result.stdout


def test_the_guide_quotes_the_committed_benchmark_runs():
    """The guide's performance paragraph is the committed results, not an older run's."""
    r = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    smoothing = json.loads((ROOT / "benchmarks" / "smoothing.json").read_text())["methods"]
    lenet, alexnet = r["steps"]["lenet-mnist"], r["steps"]["alexnet-cifar10"]
    resnet = r["steps"]["resnet18-cifar10"]
    memory = r["memory"]["lenet-mnist"]["peak_mib"]
    first = [m["ratio_to_floor"] for m in smoothing.values() if "moment_depth" not in m["settings"]]
    quoted = [
        f"{lenet['ratio_to_clean']['moment']:.2f}x a clean LeNet step",
        f"{lenet['ratio_to_clean']['moment_over_floor']:.2f}x the floor of a",
        f"{alexnet['ratio_to_clean']['moment']:.2f}x a clean AlexNet step at batch 128 "
        f"({alexnet['ratio_to_clean']['moment_over_floor']:.2f}x the floor)",
        f"{resnet['ratio_to_clean']['moment']:.2f}x a clean step of ResNet-18 at batch 128 "
        f"({resnet['ratio_to_clean']['moment_over_floor']:.2f}x the floor)",
        f"({lenet['ratio_to_clean']['augment21']:.1f}x for N = 21)",
        f"{r['gnr']['ratio']:.2f}x the floor of 31",
        f"{r['corruptions']['ratio']:.2f}x their 20 forward passes",
        f"{100 * r['data_loading']['share']:.2f}% of a clean",
        f"took {r['malloc_default']['seconds']['moment']:.3f} s instead of "
        f"{lenet['seconds']['moment']:.3f} s, for "
        f"+{100 * (memory['moment'] / memory['moment+glibc-malloc'] - 1):.0f}% peak memory",
        f"{min(first):.2f}x to {max(first):.2f}x that floor",
        f"{smoothing['macer-analytic (all layers)']['ratio_to_floor']:.2f}x for MACER",
        f"python -m benchmarks` ({round(r['benchmark_seconds'] / 60)} min here",
    ]
    readme = " ".join((ROOT / "docs" / "guide.md").read_text().split())
    assert [q for q in quoted if q not in readme] == []
