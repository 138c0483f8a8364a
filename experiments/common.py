"""Helpers shared by the experiment scripts: run the ldmkit CLI, summarise per-seed results with 95% intervals
(ldmkit.eval.stats), compare two arms paired by seed, write markdown. Every experiment reports the same way."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ldmkit.eval.stats import format_interval, interval, metric_bounds, paired

T = TypeVar("T")


class Budget:
    """--budget CPU-HOURS: stop starting new runs once this invocation has used that much CPU time (wall time x
    cores). Every run is skipped once its outputs exist, so re-running the script continues where it stopped."""

    def __init__(self, hours: float | None, cores: int | None = None):
        self.hours, self.cores, self.start = hours, cores or os.cpu_count() or 1, time.time()

    def spent(self) -> float:
        return (time.time() - self.start) / 3600 * self.cores

    def allows(self) -> bool:
        if self.hours is not None and self.spent() >= self.hours:
            print(f"budget of {self.hours:g} CPU-hours spent ({self.spent():.2f}): re-run to continue", flush=True)
            return False
        return True


def sample_correct(run_dir, metrics_file: str = "metrics.json") -> list[float]:
    """Per sample of a run's evaluation (its last one, or the one written to metrics_file), 1 when the digit
    classifier labels it as conditioned, else 0 (the sample set's predictions.json, or the copy a record keeps):
    the values the two-level intervals resample."""
    metrics = json.loads((Path(run_dir) / metrics_file).read_text())
    if "sample_correct" in metrics:
        return metrics["sample_correct"]
    predictions = json.loads((Path(metrics["sample_set"]) / "predictions.json").read_text())
    return [float(a == b) for a, b in zip(predictions["labels"], predictions["predicted"])]


class Records:
    """An experiment's durable results: the small files of each finished step (its metrics with the per-sample
    correctness, probes, curves), copied from the run's folder into a folder kept in the repository. A step whose
    record exists is not run again and the summaries are built from the records alone, so losing runs/ (a new
    machine) costs only the unfinished steps. A step that needs a model whose run folder is gone trains it again
    (from the same seed: the same images, order and noise)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def of(self, run: Path) -> Path:
        """The record folder of a run folder (by its name)."""
        return self.root / Path(run).name

    def none_in(self, rows: list) -> bool:
        """True (and says so) when there is nothing to summarise: the records are then left as they are, not
        overwritten by an empty summary."""
        if not rows:
            print(f"nothing recorded yet in {self.root}: no summary written")
        return not rows

    def has(self, run: Path, name: str) -> bool:
        return (self.of(run) / name).is_file()

    def keep(self, run: Path, name: str) -> Path:
        """Copy run/name into the record (a metrics file with its samples' correctness), atomically: a record is
        whole or absent."""
        text = (Path(run) / name).read_text()
        if name.startswith("metrics") and name.endswith(".json"):
            metrics = json.loads(text)
            if "sample_set" in metrics and "class_agreement" in metrics:
                metrics["sample_correct"] = sample_correct(run, name)
            text = json.dumps(metrics, separators=(",", ":"))
        target = self.of(run) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{name}.{os.getpid()}-{threading.get_ident()}.partial")
        partial.write_text(text)
        os.replace(partial, target)
        return target

    def step(self, run: Path, name: str, budget: Budget, make: Callable[[], None], also: tuple[str, ...] = ()) -> bool:
        """Make run/name unless it is recorded (make: the commands that write it), then record it, after the files
        of `also` that the step wrote beside it. False when the budget stopped it."""
        if self.has(run, name):
            return True
        if not (Path(run) / name).is_file():
            if not budget.allows():
                return False
            make()
        for other in also:
            if (Path(run) / other).is_file():
                self.keep(run, other)
        self.keep(run, name)
        return True


def evaluate(run: Path, *args: str, store: Path | None = None) -> None:
    """`ldmkit eval RUN ARGS`, with the digit classifier shared by every run on the same digits (store/): trained by
    the first evaluation and copied into the others, so every arm is scored by the same classifier and it is
    trained once (training it is seeded: a copy equals what the run would train itself)."""
    import shutil

    import yaml

    store = store or run.parent / "classifiers"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data, ev = cfg["data"], cfg["eval"]
    side = data["resolution"] // (2 if ev.get("digit_layout") == "pairs" else 1)
    shared = store / f"digit-classifier-r{side}-h{data['held_out']}-e{ev['classifier_epochs']}.pt"
    own = run / "digit_classifier.pt"
    if shared.is_file() and not own.is_file():
        shutil.copyfile(shared, own)
    ldmkit("eval", str(run), *args)
    if own.is_file() and not shared.is_file():  # via a rename: runs in parallel never read a half-written copy
        store.mkdir(parents=True, exist_ok=True)
        partial = shared.with_name(f"{shared.name}.{os.getpid()}-{threading.get_ident()}.partial")
        shutil.copyfile(own, partial)
        os.replace(partial, shared)


_task = threading.local()  # the running task's log file and process environment (run_tasks)


def ldmkit(*args: str) -> None:
    """Run one ldmkit command in a fresh process (as a user would), failing loudly. Inside run_tasks with several
    jobs, its output goes to the task's log and its threads are the task's share of the cores."""
    command = [sys.executable, "-m", "ldmkit.cli", *args]
    log, env = getattr(_task, "log", None), getattr(_task, "env", None)
    # one write per line: the lines of tasks running at once do not interleave
    sys.stdout.write(f"+ {' '.join(command)}" + (f"  > {log}" if log else "") + "\n")
    sys.stdout.flush()
    if log is None:
        subprocess.run(command, check=True, env=env)
        return
    with open(log, "a") as f:
        f.write(f"+ {' '.join(command)}\n")
        f.flush()
        subprocess.run(command, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)


def run_tasks(tasks: dict[str, Callable[[], T]], jobs: int, logs: Path) -> dict[str, T]:
    """Run named tasks (each a chain of ldmkit commands), `jobs` at a time, in the order given; their results by name.
    With one job the commands print as they run. With more, each task's commands write to logs/<name>.log and run
    with cores // jobs threads (processes that each take every core slow each other down several-fold), so
    independent runs share a many-core machine or one GPU. A failing task does not stop the others: they finish,
    then the failures are raised together, naming their logs."""
    if jobs <= 1:
        return {name: task() for name, task in tasks.items()}
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def run(name: str, task: Callable[[], T]) -> T:
        _task.log, _task.env = logs / f"{name}.log", env
        try:
            return task()
        finally:
            _task.log = _task.env = None

    with ThreadPoolExecutor(jobs) as pool:
        futures = {name: pool.submit(run, name, task) for name, task in tasks.items()}
    results, failed = {}, []
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except subprocess.CalledProcessError:
            failed.append(name)
    if failed:
        raise SystemExit(f"{len(failed)} task(s) failed: " + ", ".join(f"{n} (see {logs / n}.log)" for n in failed))
    return results


def seeds_label(n: int) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} seed" + ("" if n == 1 else "s")


def sets(overrides: list[str]) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']."""
    return [a for o in overrides for a in ("--set", o)]


def summarise(results: list[dict], key: str = "arm") -> dict:
    """{arm: {"seeds": [...], metric: {mean, low, high, std, values}}} over the rows of each arm: the mean over seeds
    with its 95% interval (ldmkit.eval.stats.interval: Student's t over seeds, clipped to the values the metric can
    take; a metric given as a list of per-sample values counts by its per-seed mean, and with one seed its samples
    are bootstrapped)."""
    summary: dict = {}
    for arm in dict.fromkeys(r[key] for r in results):
        rows = [r for r in results if r[key] == arm]
        summary[arm] = {"seeds": [r.get("seed", 0) for r in rows]}
        for m in dict.fromkeys(k for r in rows for k in r if k not in (key, "seed")):
            by_seed = per_seed(rows, m, arm, key)
            if by_seed:
                values = list(by_seed.values())
                means = [statistics.fmean(v) if isinstance(v, list) else v for v in values]
                summary[arm][m] = {
                    **interval(values, bounds=metric_bounds(m)),
                    "std": statistics.stdev(means) if len(means) > 1 else 0.0,
                    "values": means,
                    # a probe not yet run leaves a seed out of this metric only
                    "seeds": list(by_seed),
                }
    return summary


def compare(results: list[dict], metric: str, a: str, b: str, key: str = "arm") -> dict:
    """Arm a minus arm b on `metric`, paired by seed (the same seeds and data order in both arms):
    ldmkit.eval.stats.paired, with its verdict."""
    return paired(per_seed(results, metric, a, key), per_seed(results, metric, b, key))


def per_seed(results: list[dict], metric: str, arm: str, key: str = "arm") -> dict:
    """{seed: value} of one arm's metric (a number, or a list of per-sample values), over the seeds whose rows have
    it; anything else in a row (a path, a note) is not a metric."""
    return {
        r.get("seed", 0): r[metric]
        for r in results
        if r[key] == arm and isinstance(r.get(metric), (int, float, list)) and not isinstance(r.get(metric), bool)
    }


def compare_all(results: list[dict], a: str, b: str, key: str = "arm") -> dict:
    """{metric: compare(...)} for every metric over the seeds whose rows in both arms have it (a probe not run yet
    leaves that seed out of its metrics only; each comparison counts its seeds)."""
    rows = [r for r in results if r[key] in (a, b)]
    names = sorted({m for r in rows for m in r if m not in (key, "seed")})
    shared = {m: per_seed(rows, m, a, key).keys() & per_seed(rows, m, b, key).keys() for m in names}
    return {m: compare(rows, m, a, b, key) for m in names if shared[m]}


def markdown(summary: dict) -> str:
    lines = []
    for arm, metrics in summary.items():
        lines.append(
            f"### {arm} ({seeds_label(len(metrics['seeds']))}: {', '.join(map(str, metrics['seeds']))})\n\n"
            "| metric | mean [95% interval] | std over seeds | per seed |\n|---|---|---|---|"
        )
        for name, s in metrics.items():
            if name != "seeds":
                by_seed = {seed: f"{v:.3f}" for seed, v in zip(s["seeds"], s["values"])}
                per_seed = " / ".join(by_seed.get(seed, "-") for seed in metrics["seeds"])
                lines.append(f"| {name} | {format_interval(s)} | {s['std']:.3f} | {per_seed} |")
        lines.append("")
    return "\n".join(lines)


def paired_markdown(comparisons: dict) -> list[str]:
    """Markdown lines of paired comparisons ({"a - b": {metric: compare(...)}}): difference, interval, verdict."""
    lines = []
    for name, per_metric in comparisons.items():
        lines += [f"### paired by seed: {name}", "", "| metric | difference [95% interval] | seeds | verdict |"]
        lines += ["|---|---|---|---|"]
        for m, d in per_metric.items():
            lines.append(f"| {m} | {format_interval(d)} | {d['seeds']} | {d['verdict']} |")
        lines.append("")
    return lines
