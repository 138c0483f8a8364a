"""Helpers shared by the experiment scripts: run the ldmkit CLI, summarise per-seed results, write markdown."""

from __future__ import annotations

import statistics
import subprocess
import sys


def ldmkit(*args: str) -> None:
    """Run one ldmkit command in a fresh process (as a user would), failing loudly."""
    command = [sys.executable, "-m", "ldmkit.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def sets(overrides: list[str]) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']."""
    return [a for o in overrides for a in ("--set", o)]


def summarise(results: list[dict], key: str = "arm") -> dict:
    """{arm: {"seeds": [...], metric: {mean, std, values}}} over the rows of each arm."""
    summary: dict = {}
    for arm in dict.fromkeys(r[key] for r in results):
        rows = [r for r in results if r[key] == arm]
        summary[arm] = {"seeds": [r.get("seed", 0) for r in rows]}
        for m in (k for k in rows[0] if k not in (key, "seed")):
            values = [r[m] for r in rows if isinstance(r.get(m), (int, float))]
            if values:
                summary[arm][m] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
    return summary


def markdown(summary: dict) -> str:
    lines = []
    for arm, metrics in summary.items():
        lines.append(
            f"### {arm} (seeds {', '.join(map(str, metrics['seeds']))})\n\n| metric | mean | std | per seed "
            "|\n|---|---|---|---|"
        )
        for name, s in metrics.items():
            if name != "seeds":
                lines.append(
                    f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {' / '.join(f'{v:.3f}' for v in s['values'])} |"
                )
        lines.append("")
    return "\n".join(lines)
