"""Check that the reliability tests fail when a protection is removed (docs/reliability.md).

Each mutation takes one protection out of the source, runs the test that guards it, and puts the
file back (also on Ctrl-C). A protection whose test still passes is reported as MISSED.

    python scripts/check_tests_catch_faults.py            # all mutations (about 3 minutes)
    python scripts/check_tests_catch_faults.py "no tmp cleanup"
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELIABILITY = "tests/test_reliability.py::"
# name -> (file, original text, mutated text, the test that must fail)
SAFE_WRITE = """    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:"""
TORN_WRITE = (
    """    with open(path, "wb") as f:  # straight over the old file, paused halfway
        f.write(data[: len(data) // 2])
        f.flush()
        os.replace(path, path)  # a no-op where tests/pausing.py pauses a write
        f.write(data[len(data) // 2 :])
    return
"""
    + SAFE_WRITE
)
LOAD = "    train_set, val_set, test_set = load_splits(config)\n"
KILLS = RELIABILITY + "test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result"
MUTATIONS = {
    "non-atomic write": ("src/momentreg/files.py", SAFE_WRITE, TORN_WRITE, KILLS),
    "no tmp cleanup": (
        "src/momentreg/files.py",
        "        tmp.unlink(missing_ok=True)  # e.g.",
        "        pass  # e.g.",
        RELIABILITY + "test_full_disk_during_a_checkpoint_write_keeps_the_old_checkpoint",
    ),
    "no history rewrite": (
        "src/momentreg/training/loop.py",
        "        _write_history(out / HISTORY, state.history)\n",
        "        pass\n",
        KILLS,
    ),
    "no free-space check": (
        "src/momentreg/runs/run.py",
        "    if free < need:",
        "    if False:",
        RELIABILITY + "test_too_little_free_space_is_refused_before_anything_is_written",
    ),
    "no zero-variance guard": (
        "src/momentreg/core/moments.py",
        "    z = (mu / s).clamp(-1e3, 1e3)",
        "    z = mu / s",
        "tests/test_moments.py::test_relu_moments_never_nan_for_any_finite_input",
    ),
    "out dir before data": (
        "src/momentreg/runs/run.py",
        LOAD,
        "    out.mkdir(parents=True, exist_ok=True)\n" + LOAD,
        RELIABILITY + "test_random_train_command_lines_exit_0_or_2_and_leave_no_partial_run",
    ),
    "certification not continued": (
        "src/momentreg/evaluation/certify.py",
        "        generator.set_state(state)",
        "        pass",
        "tests/test_certify.py::test_a_certification_killed_halfway_continues_to_the_uninterrupted_rows",
    ),
    "partial of other weights continued": (
        "src/momentreg/runs/run.py",
        'kept.get("fingerprint") != fingerprint:',
        "False:",
        "tests/test_certify.py::test_an_interrupted_certification_of_other_weights_starts_over",
    ),
    "user error not caught": (
        "src/momentreg/cli/main.py",
        "    except MomentregError as e:",
        "    except ZeroDivisionError as e:",
        RELIABILITY + "test_random_evaluate_sweep_report_command_lines_exit_0_or_2",
    ),
    "one temporary file for every writer": (
        "src/momentreg/files.py",
        'tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")',
        'tmp = path.with_name(f".{path.name}.tmp")',
        RELIABILITY + "test_two_processes_writing_one_file_at_once_lose_nothing_and_leave_it_whole",
    ),
    "no lock on JSON updates": (
        "src/momentreg/files.py",
        "        fcntl.flock(lock, fcntl.LOCK_EX)",
        "        pass",
        RELIABILITY + "test_two_processes_writing_one_file_at_once_lose_nothing_and_leave_it_whole",
    ),
}


def check(name: str) -> bool:
    path, old, new, test = MUTATIONS[name]
    file = ROOT / path
    original = file.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{name}: the protected code changed; update this script")
    file.write_text(original.replace(old, new))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", test, "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        file.write_text(original)
    last = [line for line in result.stdout.splitlines() if line.strip()][-1]
    print(f"{name}: {'caught' if result.returncode else 'MISSED'} ({last})", flush=True)
    return result.returncode != 0


if __name__ == "__main__":
    names = sys.argv[1:] or list(MUTATIONS)
    sys.exit(0 if all([check(n) for n in names]) else 1)
