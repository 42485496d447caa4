#!/usr/bin/env bash
# One session on a GPU machine (issue 12), run from the repository root with gpu_data/ made by
# benchmarks/gpu_pack.sh:
#   1. jobs end to end through the service: redis-server, `isl serve` and `isl worker --device cuda`, scans uploaded
#      over HTTP (benchmarks/worker_job.py);
#   2. ISL's seconds per stage and per case on the GPU: `isl evaluate --device cuda` on the first test cases, with
#      the peak GPU memory;
#   3. `isl train --device cuda` of the head-and-neck bundle on the training and validation cases of
#      models/headneck_ct (the same split: see gpu_pack.sh), its configuration given CONFIGURE_MIN minutes;
#   4. `isl evaluate --device cuda` of that GPU-trained bundle on the same first test cases, when 60 s are left.
# Every step has its own limit so that the whole ends inside DEADLINE seconds. Results go to $OUT:
# nvidia_smi.txt, worker_job_gpu.json, evaluate_gpu.json, evaluate_gpu_memory.json, train_gpu.json (the trained
# bundle's metadata, when training ended), evaluate_gpu_trained.json, logs.tar.gz (every log, the evaluation figure,
# the bundle's card).
#
#     OUT=/tmp/out DEADLINE=540 bash benchmarks/gpu_session.sh
# A dry run on a CPU machine with the project's own environment (nothing unpacked):
#     OUT=/tmp/out PY=.venv/bin/python DATA=../shared/data/headneck_ct DEVICE=cpu EVAL_CASES=1 JOB_CASES=1 \
#         STEP_S=400 bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}
DEADLINE=${DEADLINE:-540}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
EVAL_CASES=${EVAL_CASES:-5}
JOB_CASES=${JOB_CASES:-2}
STEP_S=${STEP_S:-200}
STEPS=${STEPS:-1234}  # which of the steps to run (34 with a PROFILE=engine pack: it has no service for 1 and 2)
CONFIGURE_MIN=${CONFIGURE_MIN:-1}
T0=$(date +%s)
W=/tmp/isl_gpu
mkdir -p "$W" "$OUT"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia_smi.txt" 2>&1
nproc >> "$OUT/nvidia_smi.txt"
if [ -z "${DATA:-}" ]; then
    say "unpacking"
    mkdir -p /tmp/site /tmp/data
    tar xJf gpu_data/site.tar.xz -C /tmp/site &
    [ -f gpu_data/redis.tar.xz ] && tar xJf gpu_data/redis.tar.xz -C /tmp &
    tar xJf gpu_data/headneck_ct.tar.xz -C /tmp/data; wait
    for whl in gpu_data/*.whl; do [ -f "$whl" ] && python3 -m zipfile -e "$whl" /tmp/site; done
    find /tmp/data/headneck_ct -name '*.nii' -print0 | xargs -0 -P "$(nproc)" -n 4 gzip -1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/redis:$PATH
    DATA=/tmp/data/headneck_ct
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, monai, voxelmorph, SimpleITK; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'monai', monai.__version__)" 2>&1 | tee -a "$OUT/nvidia_smi.txt"
redis-server --version 2>&1 | tee -a "$OUT/nvidia_smi.txt"
$PY -c "import service.app, worker.tasks, worker.cli" || say "the service does not import: see above"

if [[ $STEPS == *1* ]]; then
say "1. jobs end to end through isl worker --device $DEVICE"
CASES=$(for c in openkbp_002 openkbp_003 openkbp_013; do echo --case $c; done | head -n "$JOB_CASES")
timeout "$STEP_S" $PY -m benchmarks.worker_job --model models/headneck_ct --dataset "$DATA" $CASES \
    --device "$DEVICE" --threads 8 --json "$OUT/worker_job_gpu.json" > "$W/worker_job.log" 2>&1
say "worker_job rc=$?"; tail -c 1500 "$W/worker_job.log"
fi

if [[ $STEPS == *2* ]]; then
say "2. isl evaluate --device $DEVICE on $EVAL_CASES test cases"
timeout "$STEP_S" $PY - "$DATA" "$W" "$OUT" "$DEVICE" "$EVAL_CASES" > "$W/evaluate.log" 2>&1 <<'EOF'
import json, sys, time
import torch
from worker.cli import main
data, w, out, device, cases = sys.argv[1:6]
t0 = time.perf_counter()
sys.argv = ["isl", "evaluate", "--device", device, "--dataset", data, "--model", "models/headneck_ct",
            "--json", f"{w}/evaluate_gpu.json", "--cases", cases]
try:
    main()
finally:
    gpu = torch.cuda.is_available()
    json.dump({"peak_gpu_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None,
               "peak_gpu_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if gpu else None,
               "wall_seconds": round(time.perf_counter() - t0, 1)}, open(f"{out}/evaluate_gpu_memory.json", "w"))
EOF
say "evaluate rc=$?"; tail -n 8 "$W/evaluate.log"; cp "$W/evaluate_gpu.json" "$OUT/" 2>/dev/null
fi

if [[ $STEPS == *3* ]]; then
say "3. isl train --device $DEVICE ($(( $(left) - 30 )) s left for it)"
timeout $(( $(left) - 30 )) $PY -m worker.cli -v train --device "$DEVICE" --dataset "$DATA" --out "$W/headneck_ct_gpu" \
    --holdout 5 --configure-minutes "$CONFIGURE_MIN" 2>&1 | while IFS= read -r line; do say "$line"; done > "$W/train.log"
say "train rc=${PIPESTATUS[0]}"; tail -n 12 "$W/train.log"
cp "$W/headneck_ct_gpu/bundle.json" "$OUT/train_gpu.json" 2>/dev/null
fi
if [[ $STEPS == *4* ]] && [ -f "$W/headneck_ct_gpu/bundle.json" ] && [ "$(left)" -gt 60 ]; then
say "4. isl evaluate --device $DEVICE of the GPU-trained bundle on $EVAL_CASES test cases"
timeout $(( $(left) - 15 )) $PY -m worker.cli evaluate --device "$DEVICE" --dataset "$DATA" \
    --model "$W/headneck_ct_gpu" --json "$OUT/evaluate_gpu_trained.json" --cases "$EVAL_CASES" > "$W/evaluate_trained.log" 2>&1
say "evaluate (GPU-trained) rc=$?"; tail -n 8 "$W/evaluate_trained.log"
fi
tar czf "$OUT/logs.tar.gz" -C "$W" --exclude='*.pt' . 2>/dev/null
say "done"; ls -la "$OUT"
