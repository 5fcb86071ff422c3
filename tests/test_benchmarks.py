import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-compile", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    lenet = data["steps"]["lenet-mnist"]
    assert {"clean", "moment", "augment2", "augment6", "tail_pass"} <= set(lenet["seconds"])
    assert {"moment", "augment6", "moment_over_floor"} <= set(lenet["ratio_to_clean"])
    assert lenet["ratio_to_clean"]["clean"] == 1.0
    assert {"gnr_seconds", "floor_seconds", "ratio"} <= set(data["gnr"])
    assert 0 < data["data_loading"]["share"] < 1
    assert set(data["attacks"]) == {"pgd", "lbfgs", "fgsm", "aga", "aua", "deepfool"}
    assert {"clean", "moment"} <= set(data["memory"]["lenet-mnist"]["peak_mib"])
    assert isinstance(data["keep_freed_memory"], bool)
    assert {"steps lenet-mnist", "gnr", "data_loading", "attacks", "memory"} == set(
        data["section_seconds"]
    )
    assert data["benchmark_seconds"] >= sum(data["section_seconds"].values())
    assert "ratio" in result.stdout
