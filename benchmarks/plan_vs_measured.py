"""`ldmkit plan`'s estimate against the measured peak memory of one training step, on the CPU (one process, fp32).

Each case runs in a fresh subprocess: the resident set size before the model exists, then the peak resident set
size (ru_maxrss) after two steps of forward, backward, AdamW and the EMA update on random latents. Their
difference is what the plan estimates as weights + gradients + optimizer + EMA + activations (`ddp`, one process,
no gradient buckets). Usage:

    .venv/bin/python benchmarks/plan_vs_measured.py            # prints a Markdown table
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = [
    # (name, config overrides, micro-batch)
    ("DiT-S/2, 32x32x4, class", ["model.preset=DiT-S/2"], 64),
    ("DiT-B/2, 32x32x4, class", ["model.preset=DiT-B/2"], 16),
    ("DiT-S/2, blocks checkpointed", ["model.preset=DiT-S/2", "train.activation_checkpointing=blocks"], 64),
    (
        "mmDiT-S/2, text (77 x 384)",
        [
            "model.name=mmdit",
            "model.preset=mmDiT-S/2",
            "model.conditioning=text",
            "model.context_dim=384",
            "model.pooled_dim=384",
            "text.encoder=minilm",
            "data.name=shards",
            "data.path=x.tar",
            "diffusion.objective=flow",
            "model.learn_sigma=false",
            "sample.sampler=euler",
        ],
        32,
    ),
]
COMMON = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000", "train.precision=fp32"]


def measure(overrides: list[str], batch: int) -> dict:
    """Run in a child process: (measured bytes, planned bytes) of one case."""
    code = f"""
import json, resource, torch
torch.set_num_threads(2)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
from ldmkit.config import load_config
from ldmkit.models.registry import build_model
from ldmkit.training.optim import build_optimizer
from ldmkit.training.state import EMA
from ldmkit.training.parallel import apply_activation_checkpointing
from ldmkit.training.plan import meta_inputs, plan_memory
cfg = load_config(overrides={overrides!r})
planned = [p for p in plan_memory(cfg, 1, {batch}) if p.mode == "ddp"
           and p.activation_checkpointing == cfg.train.activation_checkpointing][0]
x, t, cond = meta_inputs(cfg, {batch}, "cpu")
base = rss()
model = build_model(cfg.model, cfg.conditioning)
ema = EMA(model, cfg)
apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
optimizer = build_optimizer(model.parameters(), cfg.train)
for _ in range(2):
    model(x, t, cond).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model, 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"measured": peak - base, "planned": planned.total, "activations": planned.activations,
                   "parameters": planned.parameters}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    columns = ["case", "micro-batch", "parameters", "planned (GB)", "of which activations", "measured peak (GB)"]
    print("| " + " | ".join(columns + ["measured / planned"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides, batch in CASES:
        r = measure(COMMON + overrides, batch)
        gb = 2**30
        print(
            f"| {name} | {batch} | {r['parameters'] / 1e6:.1f}M | {r['planned'] / gb:.3f} | "
            f"{r['activations'] / gb:.3f} | {r['measured'] / gb:.3f} | {r['measured'] / r['planned']:.2f} |"
        )


if __name__ == "__main__":
    main()
