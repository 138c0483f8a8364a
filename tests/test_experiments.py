"""The experiment scripts' runner (experiments/common.py): runs in parallel, each with its log and its share of the
cores, and failures reported together after the others finish."""

import json
import os
import shutil
import subprocess
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
        {"arm": "c", "seed": 0, "fd": 10.0, "drift": 0.5},
        {"arm": "c", "seed": 1, "fd": 12.0},
    ]
    summary = common.summarise(rows)
    assert summary["a"]["seeds"] == [0, 1] and summary["a"]["fd"]["values"] == [20.0, 30.0]
    assert summary["a"]["agreement"]["mean"] == pytest.approx(0.7)
    text = common.markdown(summary)
    assert "### a (2 seeds: 0, 1)" in text and "### b (1 seed: 0)" in text
    # Student's t over two seeds: 25 +- t(0.975, 1) x 7.071 / sqrt(2) = 25 +- 63.531
    assert "| fd | 25.000 [-38.531, 88.531] | 7.071 | 20.000 / 30.000 |" in text
    # one seed of per-sample values still has an interval (over its samples); one seed of one number has none
    assert "| agreement | 0.500 [" in text and "| fd | 40.000 | 0.000 | 40.000 |" in text
    # a metric some seeds lack (a probe not run yet) shows which seed it comes from, not a shorter list
    assert "| drift | 0.500 | 0.000 | 0.500 / - |" in text


def test_a_paired_comparison_takes_each_metric_over_the_seeds_both_arms_have_it():
    rows = [
        {"arm": "a", "seed": 0, "fd": 20.0, "drift": 0.2},
        {"arm": "a", "seed": 1, "fd": 22.0, "drift": 0.3},
        {"arm": "a", "seed": 2, "fd": 21.0},  # its probe not run yet
        {"arm": "b", "seed": 0, "fd": 30.0, "drift": 0.5},
        {"arm": "b", "seed": 1, "fd": 33.0, "drift": 0.7},
        {"arm": "b", "seed": 2, "fd": 32.0, "drift": 0.6},
    ]
    for row in rows:
        row["run"] = f"runs/{row['arm']}-seed{row['seed']}"  # not a metric: neither compared nor summarised
    compared = common.compare_all(rows, "a", "b")
    assert compared["fd"]["seeds"] == 3 and compared["fd"]["mean"] == pytest.approx(-32.0 / 3)
    assert compared["drift"]["seeds"] == 2 and compared["drift"]["mean"] == pytest.approx(-0.35)
    assert "run" not in compared and "run" not in common.summarise(rows)["a"]


def _fake_run(run: Path, correct: list[int], fd: float) -> None:
    """A run folder as `ldmkit eval` leaves it: metrics.json naming its sample set, predictions beside the samples."""
    samples = run / "samples"
    samples.mkdir(parents=True)
    labels = list(range(len(correct)))
    predicted = [label if ok else (label + 1) % 10 for label, ok in zip(labels, correct)]
    (samples / "predictions.json").write_text(json.dumps({"labels": labels, "predicted": predicted}))
    metrics = {"sample_set": str(samples), "class_agreement": sum(correct) / len(correct), "fd_effnetlite0": fd}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_a_record_keeps_the_per_sample_correctness_so_the_run_folder_can_be_lost(tmp_path):
    run = tmp_path / "runs" / "additive-seed3"
    _fake_run(run, [1, 1, 0, 1], 31.5)
    (run / "probe-flip.json").write_text(json.dumps({"class_agreement": [0.9, 0.8]}))
    records = common.Records(tmp_path / "records")
    assert not records.has(run, "metrics.json")
    records.keep(run, "metrics.json")
    records.keep(run, "probe-flip.json")
    shutil.rmtree(tmp_path / "runs")
    record = records.of(run)
    assert record == tmp_path / "records" / "additive-seed3" and records.has(run, "metrics.json")
    assert common.sample_correct(record) == [1.0, 1.0, 0.0, 1.0]
    assert json.loads((record / "metrics.json").read_text())["fd_effnetlite0"] == 31.5
    assert json.loads((record / "probe-flip.json").read_text()) == {"class_agreement": [0.9, 0.8]}
    assert not list(record.glob("*.partial"))


def test_a_step_runs_once_records_what_it_wrote_and_stops_at_the_budget(tmp_path):
    records, run, made = common.Records(tmp_path / "records"), tmp_path / "runs" / "base-16-seed0", []

    def make():
        made.append(True)
        _fake_run(run, [1, 0], 20.0)
        (run / "eval.jsonl").write_text('{"images": 2500}\n')

    assert not records.step(run, "metrics.json", common.Budget(0), make, also=("eval.jsonl",))
    assert not made and not records.has(run, "metrics.json")
    assert records.step(run, "metrics.json", common.Budget(None), make, also=("eval.jsonl",))
    assert records.has(run, "eval.jsonl") and common.sample_correct(records.of(run)) == [1.0, 0.0]
    shutil.rmtree(run)  # recorded: neither made again nor stopped by a spent budget
    assert records.step(run, "metrics.json", common.Budget(0), make) and made == [True]


def _probe(control: str, level: float) -> dict:
    """A probe's output with the fields the conditioning summary reads, `level` moving every adherence figure."""
    n = 2 if control == "flip" else 3
    probe = {"class_agreement": [0.9] * n, "label_change_rate": 0.1, "feature_drift": level}
    if control == "original_size":
        probe.update(sharpness=[level * v for v in range(n)], size_sharpness_correlation=level)
    if control == "crop_size":
        probe.update(crop_iou=[1.0, level, level], crop_iou_if_ignored=[1.0, 0.5, 0.4])
    if control == "flip":
        probe.update(mirrored_class_agreement=[0.5, 0.5 + level / 2], flip_effect=level)
    return probe


def test_the_conditioning_summary_is_built_from_the_records_alone(tmp_path):
    """Every step recorded, no run folder at all: a re-run with no budget trains nothing and still writes the
    summary, the paired comparison, the guidance sweep and both plots into the records folder."""
    records = tmp_path / "records"
    for arm, level in (("additive", 0.2), ("disentangled", 0.6)):
        for seed in (0, 1):
            run = tmp_path / "lost" / f"{arm}-seed{seed}"
            _fake_run(run, [1] * (8 + seed) + [0] * (2 - seed), 30.0 - 5 * level + seed)
            for control in ("original_size", "crop_size", "flip"):
                names = [f"probe-{control}.json"] + ([f"probe-{control}-cg2.json"] if arm == "disentangled" else [])
                for name, shift in zip(names, (0.0, 0.1)):
                    (run / name).write_text(json.dumps(_probe(control, level + shift)))
            if arm == "disentangled":
                raised = json.loads((run / "metrics.json").read_text())
                raised["fd_effnetlite0"] += 4.0  # control guidance 2: the same samples' correctness, a worse FD
                (run / "metrics-cg2.json").write_text(json.dumps(raised))
            for name in [p.name for p in run.glob("*.json")]:
                common.Records(records).keep(run, name)
    shutil.rmtree(tmp_path / "lost")
    script = Path(__file__).resolve().parents[1] / "experiments" / "conditioning.py"
    out = tmp_path / "out"
    command = [sys.executable, str(script), "--seeds", "0,1", "--caption-seeds", "", "--sweep-seeds", "0,1"]
    command += ["--control-scales", "1,2", "--budget", "0", "--out", str(out), "--records", str(records)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert list(out.iterdir()) == []  # nothing trained, evaluated or probed
    summary = json.loads((records / "summary.json").read_text())
    assert summary["summary"]["disentangled"]["seeds"] == [0, 1]
    assert summary["summary"]["additive"]["class_agreement"]["mean"] == pytest.approx(0.85)
    paired = summary["paired"]["disentangled - additive"]
    assert paired["fd_effnetlite0"]["mean"] == pytest.approx(-2.0)
    assert paired["crop_size.crop_iou_gain"]["mean"] == pytest.approx(0.6 - 0.2)
    sweep = summary["sweep"]
    assert sweep["control guidance 2"]["original_size.size_sharpness_correlation"]["mean"] == pytest.approx(0.7)
    assert sweep["control guidance 1"]["original_size.size_sharpness_correlation"]["mean"] == pytest.approx(0.6)
    # control guidance 1 is the run's own evaluation (no metrics-cg1.json: it is not evaluated a second time)
    assert sweep["control guidance 1"]["class_agreement"] == summary["summary"]["disentangled"]["class_agreement"]
    raised = summary["sweep_paired"]["control guidance 2 - control guidance 1"]
    assert raised["fd_effnetlite0"]["mean"] == pytest.approx(4.0) and raised["fd_effnetlite0"]["seeds"] == 2
    assert raised["original_size.size_sharpness_correlation"]["mean"] == pytest.approx(0.1)
    text = (records / "summary.md").read_text()
    assert "### paired by seed: disentangled - additive" in text and "## control guidance sweep" in text
    assert "### paired by seed: control guidance 2 - control guidance 1" in text
    assert (records / "control_sweeps.png").stat().st_size > 0 and (records / "control_guidance.png").stat().st_size


def test_the_transfer_summary_is_built_from_the_records_alone(tmp_path):
    records = tmp_path / "records"
    for arm, ok in (("base-16", 9), ("ft32-interpolate-shift", 9), ("scratch-32", 7)):
        for seed in (0, 1):
            run = tmp_path / "lost" / f"{arm}-seed{seed}"
            _fake_run(run, [1] * (ok - seed) + [0] * (10 - ok + seed), 40.0 - 2 * ok)
            curve = [{"images": i * 2500, "class_agreement": ok * i / 30} for i in (1, 2, 3)]
            (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
            for name in ("metrics.json", "eval.jsonl"):
                common.Records(records).keep(run, name)
    shutil.rmtree(tmp_path / "lost")
    script = Path(__file__).resolve().parents[1] / "experiments" / "transfer.py"
    out = tmp_path / "out"
    command = [sys.executable, str(script), "--seeds", "0,1", "--modes", "interpolate-shift", "--skip-captions"]
    command += ["--budget", "0", "--out", str(out), "--records", str(records)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=Path(script).parents[1])
    assert list(out.iterdir()) == []  # nothing trained or evaluated
    summary = json.loads((records / "summary.json").read_text())
    assert summary["summary"]["scratch-32"]["class_agreement"]["mean"] == pytest.approx(0.65)
    paired = summary["paired"]["ft32-interpolate-shift - scratch-32"]
    assert paired["class_agreement"]["mean"] == pytest.approx(0.2) and paired["fd_effnetlite0"]["mean"] == -4.0
    assert [p["images"] for p in summary["runs"]["base-16"][0]["curve"]] == [2500, 5000, 7500]
    assert (records / "curves.png").stat().st_size > 0 and "| class_agreement |" in (records / "summary.md").read_text()


@pytest.mark.parametrize("name", ["conditioning.py", "transfer.py"])
def test_a_summary_with_nothing_recorded_writes_nothing(tmp_path, name):
    script = Path(__file__).resolve().parents[1] / "experiments" / name
    records = tmp_path / "records"
    command = [sys.executable, str(script), "--seeds", "0", "--budget", "0", "--out", str(tmp_path / "out")]
    command += ["--records", str(records), *(["--caption-seeds", ""] if name == "conditioning.py" else [])]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=Path(script).parents[1])
    assert f"nothing recorded yet in {records}: no summary written" in done.stdout
    assert not records.exists()
