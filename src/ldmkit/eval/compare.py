"""`ldmkit report RUN...`: the comparison of runs (the point of an apples-to-apples study) as a markdown and a
CSV table of metrics, images seen, device hours and settings, and PNG plots: the small-N metric and the
validation loss against images seen (eval.jsonl), the training loss curves (log.jsonl), and the guidance
sweeps (eval/sweep.json, from `ldmkit eval --sweep-guidance`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..checkpoint import run_checkpoint
from ..config import RunConfig, build, diff_configs, load_config, to_dict
from .report import read_log

METRIC_KEYS = (
    "fid",
    "kid",
    "precision",
    "recall",
    "density",
    "coverage",
    "clip_score",
    "fd_effnetlite0",
    "class_agreement",
)


def _init_source(run_dir: Path) -> str:
    """The weights a run started from (its init.json), or '-' for a run trained from scratch."""
    init_file = run_dir / "init.json"
    return str(json.loads(init_file.read_text()).get("source", "?")) if init_file.is_file() else "-"


def run_summary(run_dir: Path) -> dict:
    """One row: settings (transfer ones included), images seen, device hours (training wall time x processes) and
    the last metrics."""
    run_dir = Path(run_dir)
    _, state, _ = run_checkpoint(run_dir)
    cfg = build(RunConfig, state["config"])
    log = read_log(run_dir)
    seconds = sum(r.get("interval_s", 0.0) * r.get("processes", 1) for r in log)
    device = log[-1].get("device", "?") if log else "?"
    row = {
        "run": cfg.name,
        "folder": str(run_dir),
        "backbone": cfg.model.name,
        "preset": cfg.model.preset,
        "conditioning": cfg.model.conditioning,
        "mechanism": cfg.conditioning.mechanism,
        "control": " ".join(cfg.conditioning.control) or "-",
        "padding": cfg.conditioning.padding if cfg.model.conditioning == "text" else "-",
        "objective": cfg.diffusion.objective,
        "data": f"{cfg.data.name} {cfg.data.resolution}px",
        "global_batch": cfg.train.global_batch,
        # transfer settings (docs/transfer.md): where the weights came from, the positions, the noise shift
        "init": _init_source(run_dir),
        "positions": (
            f"{cfg.model.pos_embed_resample} from {cfg.model.pos_embed_base_size}"
            if cfg.model.pos_embed_base_size
            else "-"
        ),
        "noise_shift": f"from {cfg.diffusion.shift_base_resolution}px" if cfg.diffusion.shift_base_resolution else "-",
        "lr": cfg.train.lr,
        "images_seen": state["images_seen"],
        f"{device}_hours": round(seconds / 3600, 4),
    }
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        row.update({k: metrics[k] for k in METRIC_KEYS if k in metrics})
        row.update({k: metrics[k] for k in ("num_images", "guidance_scale", "sampler", "steps") if k in metrics})
        if "sampling" in metrics:  # guidance schedule, interval, channels, skip layers, negatives, solver settings
            row["sampling"] = "; ".join(f"{k}={v}" for k, v in metrics["sampling"].items()) or "-"
    return row


def run_config_dict(run_dir: Path) -> dict:
    """A run's resolved config: its config.yaml (cheap), else the one its newest checkpoint records."""
    if (run_dir / "config.yaml").is_file():
        return to_dict(load_config(run_dir / "config.yaml"))
    return run_checkpoint(run_dir, require=("config",))[1]["config"]


def differing_keys(configs: list[dict], ignored=("name",)) -> list[str]:
    """The config keys whose values differ between the configs (dotted, sorted), less the ignored ones."""
    return sorted({k for c in configs[1:] for k in diff_configs(configs[0], c)} - set(ignored))


def shown_settings(cfg: dict, keys: list[str]) -> str:
    """'key=value' of up to three of keys in cfg ('..., ...' when there are more)."""

    def value(key: str):
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return ", ".join(f"{k}={value(k)}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def legend_labels(run_dirs: list[Path], configs: list[dict]) -> list[str]:
    """A legend label per run that names what differs: the run folder, then up to three config keys whose values
    differ between the runs (e.g. 'lr-high (train.lr=0.001)')."""
    differing = differing_keys(configs)
    labels = []
    for run_dir, cfg in zip(run_dirs, configs):
        shown = shown_settings(cfg, differing)
        labels.append(f"{Path(run_dir).name} ({shown})" if shown else Path(run_dir).name)
    return labels


def arm_table(configs: list[dict], rows: list[dict]) -> list[str]:
    """Markdown lines for runs that repeat one training config with different train.seed values (arms): each arm's
    metrics as mean [95% interval] over its seeds (ldmkit.eval.stats), and with two arms their difference paired by
    seed with its verdict. [] when no config was run with two seeds."""
    from .stats import format_interval, interval, metric_bounds, paired

    def arm_key(cfg: dict) -> str:
        rest = {k: v for k, v in cfg.items() if k != "name"}
        rest["train"] = {k: v for k, v in cfg.get("train", {}).items() if k != "seed"}
        return json.dumps(rest, sort_keys=True, default=str)

    arms: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        arms.setdefault(arm_key(cfg), []).append(i)
    if all(len(members) < 2 for members in arms.values()):
        return []
    firsts = [configs[members[0]] for members in arms.values()]
    differing = differing_keys(firsts, ("name", "train.seed"))
    label = lambda cfg: shown_settings(cfg, differing) or "all runs"  # noqa: E731

    metrics = [m for m in METRIC_KEYS if any(m in row for row in rows)]
    lines = ["", "## Arms: mean [95% interval] over training seeds", ""]
    lines += ["| arm | seeds | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    per_arm = []
    for members in arms.values():
        seeds = {configs[i]["train"].get("seed", 0): rows[i] for i in members}
        per_arm.append(seeds)
        cells = []
        for m in metrics:
            values = [row[m] for row in seeds.values() if isinstance(row.get(m), (int, float))]
            cells.append(format_interval(interval(values, bounds=metric_bounds(m))) if values else "")
        lines.append(f"| {label(configs[members[0]])} | {len(members)} | " + " | ".join(cells) + " |")
    if len(per_arm) == 2:
        a, b = (label(c) for c in firsts)
        lines += ["", f"Paired by seed, ({a}) - ({b}):", ""]
        for m in metrics:
            pairs = [{s: r[m] for s, r in arm.items() if isinstance(r.get(m), (int, float))} for arm in per_arm]
            if set(pairs[0]) & set(pairs[1]):
                d = paired(*pairs)
                lines.append(f"- {m}: {format_interval(d)} over {d['seeds']} seeds, {d['verdict']}")
    return lines


def write_comparison(runs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_summary(Path(r)) for r in runs]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths = {"csv": out_dir / "comparison.csv", "markdown": out_dir / "comparison.md"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    notes = [
        "",
        "Metrics are the runs' metrics.json (`ldmkit eval`); compare them only at equal num_images, sampler, steps, "
        "guidance scale and the other sampling settings (the sampling column). Device hours = training wall time x "
        "processes, from log.jsonl.",
    ]
    notes += arm_table([run_config_dict(Path(r)) for r in runs], rows)
    paths["markdown"].write_text("# Run comparison\n\n" + "\n".join(table) + "\n" + "\n".join(notes) + "\n")

    def plot(name: str, ylabel: str, series: list[tuple[str, list, list]], xlabel: str = "images seen"):
        series = [s for s in series if s[1]]
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)  # values as they are, no "+3.04e2"
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, bbox_inches="tight")  # nothing clipped
        plt.close(fig)
        paths[name] = out_dir / name

    configs = [run_config_dict(Path(r)) for r in runs]
    names = legend_labels([Path(r) for r in runs], configs)
    logs = [read_log(Path(r)) for r in runs]
    plot(
        "loss.png",
        "training loss",
        [(n, [r["images"] for r in log], [r["loss"] for r in log]) for n, log in zip(names, logs)],
    )
    evals = [read_log(Path(r), "eval.jsonl") for r in runs]
    plot(
        "val_loss.png",
        "validation loss (fixed batch, mean over levels)",
        [
            (
                n,
                [r["images"] for r in ev if "val_loss_mean" in r],
                [r["val_loss_mean"] for r in ev if "val_loss_mean" in r],
            )
            for n, ev in zip(names, evals)
        ],
    )
    for key in ("fid", "fd_effnetlite0", "class_agreement"):
        plot(
            f"{key}_vs_images.png",
            f"{key} (small-N, during training)",
            [
                (n, [r["images"] for r in ev if key in r], [r[key] for r in ev if key in r])
                for n, ev in zip(names, evals)
            ],
        )
    sweeps = []
    for n, r in zip(names, runs):
        file = Path(r) / "eval" / "sweep.json"
        if file.is_file():
            sweeps.append((n, json.loads(file.read_text())))
    for key in METRIC_KEYS:
        plot(
            f"guidance_sweep_{key}.png",
            key,
            [(n, [p["guidance_scale"] for p in s if key in p], [p[key] for p in s if key in p]) for n, s in sweeps],
            xlabel="guidance scale",
        )
    return paths
