"""Crash consistency: kill a training run at random moments (SIGKILL, some of them while a checkpoint is being
written, and SIGTERM stops), re-run the same command each time, and check that the finished run is bit-identical
to an uninterrupted one, that every checkpoint on disk verifies and is finite, and that log.jsonl is monotonic.

    python experiments/crash_consistency.py --kills 16 --out runs/crash

Prints one JSON record (and writes it to <out>/result.json). DiT-S/8 on the digits: checkpoints of about 0.4 GB,
so a kill can land inside a write. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldmkit.checkpoint import list_checkpoints, load_checkpoint, newest_intact_checkpoint

SETTINGS = [
    "model.preset=DiT-S/8",
    "model.in_channels=1",
    "model.input_size=32",
    "model.num_classes=10",
    "train.global_batch=16",
    "train.log_every_images=32",
    "train.checkpoint_every_images=160",
    "train.keep_checkpoints=2",
    "train.lr=0.0005",
    "sample.steps=2",
]


def command(config: Path, out: Path, images: int) -> list[str]:
    cmd = [sys.executable, "-m", "ldmkit.cli", "train", str(config), "--out", str(out)]
    for s in SETTINGS + [f"train.total_images={images}"]:
        cmd += ["--set", s]
    return cmd


def writing_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=16, help="interruptions in all (default 16)")
    ap.add_argument("--during-writes", type=int, default=6, help="of them, SIGKILLs aimed at a checkpoint write")
    ap.add_argument("--sigterms", type=int, default=3, help="of them, SIGTERM stops (checkpoint, exit 75)")
    ap.add_argument("--images", type=int, default=4800, help="training length (long enough for every interruption)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/crash")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "c.yaml"
    config.write_text("name: crash\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    t0 = time.time()
    subprocess.run(command(config, out / "straight", args.images), env=env, check=True, capture_output=True)
    straight_s = time.time() - t0

    run = out / "chaos"
    plan = ["write"] * args.during_writes + ["term"] * args.sigterms
    plan += ["kill"] * (args.kills - len(plan))
    rng.shuffle(plan)
    outcomes = []  # (what was aimed, whether a checkpoint write was in progress, exit code)
    for kind in plan:
        proc = subprocess.Popen(
            command(config, run, args.images), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if kind == "write":  # poll for a checkpoint being written, then kill inside it
            deadline = time.time() + straight_s
            while proc.poll() is None and time.time() < deadline and not writing_checkpoint(run):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(2.0, max(3.0, straight_s / 10)))
        in_write = writing_checkpoint(run)
        proc.send_signal(signal.SIGTERM if kind == "term" else signal.SIGKILL)
        outcomes.append((kind, in_write, proc.wait()))
    final = subprocess.run(command(config, run, args.images), env=env, capture_output=True, text=True)

    a, b = load_checkpoint(list_checkpoints(out / "straight")[-1]), load_checkpoint(list_checkpoints(run)[-1])
    identical = all(torch.equal(v, b[k][n]) for k in ("model", "ema") for n, v in a[k].items())
    finite = []
    for path in list_checkpoints(run):
        state = load_checkpoint(path)  # verifies the checksum, then loads
        finite.append(all(torch.isfinite(v).all() for k in ("model", "ema") for v in state[k].values()))
    images = [json.loads(line)["images"] for line in (run / "log.jsonl").read_text().splitlines()]
    killed = [o for o in outcomes if o[2] == -signal.SIGKILL]
    result = {
        "interruptions": len(outcomes),
        "sigkill": len(killed),
        "sigkill_during_a_checkpoint_write": sum(1 for o in killed if o[1]),
        "sigterm_stops_exit_75": sum(1 for o in outcomes if o[0] == "term" and o[2] == 75),
        "run_had_already_finished": sum(1 for o in outcomes if o[2] == 0),
        "exit_codes": [o[2] for o in outcomes],
        "final_exit_code": final.returncode,
        "images_seen": b["images_seen"],
        "bit_identical_to_uninterrupted": identical,
        "checkpoints_on_disk_verified_and_finite": bool(finite) and all(finite),
        "newest_intact": newest_intact_checkpoint(run)[0].name,
        "partial_writes_left": [p.name for p in (run / "checkpoints").glob("*.tmp")],
        "log_monotonic": images == sorted(set(images)),
        "uninterrupted_run_s": round(straight_s, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
