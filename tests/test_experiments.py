"""The experiment scripts' runner (experiments/common.py): runs in parallel, each with its log and its share of the
cores, and failures reported together after the others finish."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import common  # noqa: E402


def test_run_tasks_in_parallel_logs_each_task_and_reports_failures_after_the_others(tmp_path):
    threads = []

    def ok(name):
        common.ldmkit("--version")
        threads.append(common._task.env["OMP_NUM_THREADS"])
        return name

    def bad():
        common.ldmkit("no-such-command")

    tasks = {"first": lambda: ok("first"), "broken": bad, "second": lambda: ok("second")}
    with pytest.raises(SystemExit, match=r"1 task\(s\) failed: broken \(see .*broken\.log\)"):
        common.run_tasks(tasks, jobs=2, logs=tmp_path)
    # the tasks after the failing one still ran, each writing its command's output to its own log
    assert threads == [str(max(1, (os.cpu_count() or 1) // 2))] * 2
    assert "ldmkit" in (tmp_path / "second.log").read_text()
    assert "invalid choice: 'no-such-command'" in (tmp_path / "broken.log").read_text()
    # results come back by name, in the order given
    assert common.run_tasks({"b": lambda: ok("b"), "a": lambda: ok("a")}, jobs=2, logs=tmp_path) == {"b": "b", "a": "a"}
    # one job: the commands print as they run, no logs
    assert common.run_tasks({"only": lambda: 1}, jobs=1, logs=tmp_path / "none") == {"only": 1}
    assert not (tmp_path / "none").exists()


def test_summary_markdown_gives_each_arm_its_seeds_mean_interval_and_per_seed_values():
    rows = [
        {"arm": "a", "seed": 0, "agreement": [1.0] * 8 + [0.0] * 2, "fd": 20.0},
        {"arm": "a", "seed": 1, "agreement": [1.0] * 6 + [0.0] * 4, "fd": 30.0},
        {"arm": "b", "seed": 0, "agreement": [1.0] * 5 + [0.0] * 5, "fd": 40.0},
    ]
    summary = common.summarise(rows)
    assert summary["a"]["seeds"] == [0, 1] and summary["a"]["fd"]["values"] == [20.0, 30.0]
    assert summary["a"]["agreement"]["mean"] == pytest.approx(0.7)
    text = common.markdown(summary)
    assert "### a (2 seeds: 0, 1)" in text and "### b (1 seed: 0)" in text
    assert "| fd | 25.000 [20.000, 30.000] | 7.071 | 20.000 / 30.000 |" in text
    # one seed of per-sample values still has an interval (over its samples); one seed of one number has none
    assert "| agreement | 0.500 [" in text and "| fd | 40.000 | 0.000 | 40.000 |" in text
