#!/usr/bin/env bash
# What a session with a lent GPU runs, as the device tool's command, one part per call
# (each call <= 10 minutes; no C++ build: the GPU paths do not need it):
#   bash bench/gpu_session.sh pending  # what the last GPU-less sessions built, first (~400 s, not yet timed):
#                                      # the GPU tests with their slowest, the probe (backward by rows, both
#                                      # routes at batch 1 and 32 by GPU time, host path, the Triton direct
#                                      # conv against cuDNN); then `models` (frozen captured: residual adds in
#                                      # ghost2's stores, which the accelerated rows now make too: GhostBottleneck-
#                                      # Residual; the stem and depthwise convs on Triton), then `ops`
#                                      # (its first call, plain and precompiled: ghostkernels.precompile)
#   bash bench/gpu_session.sh ops      # GPU tests, first call of accelerated GhostNet 1.0x, the op table
#   bash bench/gpu_session.sh models   # whole models: GhostNet 1.0x float16 at batch 256 and 1 first
#   bash bench/gpu_session.sh tune     # fill ghostkernels/triton_tuned.json for float16 (commit it)
#   bash bench/gpu_session.sh train    # #15's AMP training steps: GhostNet 1.0x b128, Ghost-ResNet-56 b256
#   bash bench/gpu_session.sh probe    # the op's stages timed apart (forward and backward), block-size variants,
#                                      # host path, ncu counters
# Results land in bench/results/ and are copied to $OUT, which the device tool brings back.
# A session's device time is now 15 minutes, machine start included (the device tool's status,
# budget_left_s 900): that is ops, then models if time is left; tune and train in later sessions.
# Seen on an H200 (2026-12-04): a machine start ~30 s; the GPU tests 125 s; the first call 17 s;
# an op-table row ~5 s (~10 s with compile and fwd+bwd); an e2e row (GhostNet 1.0x, six
# contenders, three compiles) ~75 s. Call `models` at once after `ops` (the machine stays warm
# 30 s) or give the machine back between calls. Second H200 session: `probe` with ncu 64 s; the
# GPU tests 197 s (275 tests); the batch-256 float16 forward table alone (--no-tests
# --no-first-call --no-backward) 86 s; one e2e row at batch 256 ~110 s (two more contenders since:
# frozen, frozen captured). The probe's backward and routes sections (added without a GPU) are not
# yet timed: `pending` runs them first.
set -uo pipefail
cd "$(dirname "$0")/.."
export GHOSTKERNELS_DISABLE_CPP=1 PYTHONPATH=. OPENBLAS_NUM_THREADS=1
OUT=${OUT:-/tmp/ghostkernels-gpu-session}
mkdir -p "$OUT"
# python3: the GPU image's interpreter with torch (a plain `python` may not be there)
device=$(python3 -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-'))")
case "${1:-}" in
  pending) python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu_report; print(gpu_report.run_tests(250))" \
             2>&1 | tee "$OUT/tests.log"
           python3 bench/gpu_probe.py --skip variants 2>&1 | tee "$OUT/probe.log" ;;
  ops) python3 bench/gpu_report.py --budget-s 420 2>&1 | tee "$OUT/gpu_report.log" ;;
  models) python3 bench/e2e.py --device cuda --budget-s 360 --profile 20 2>&1 | tee "$OUT/e2e.log" ;;
  tune) python3 bench/gpu_report.py --tune --dtype float16 --batch 256 2>&1 | tee "$OUT/tune.log"
        cp ghostkernels/triton_tuned.json "$OUT/" ;;
  train) python3 bench/train.py --device cuda --out "bench/results/$device-train.md" 2>&1 | tee "$OUT/train.log" ;;
  probe) python3 bench/gpu_probe.py "${@:2}" 2>&1 | tee "$OUT/probe.log"
         ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
         # --clock-control none: the card's clocks are left as they are
         timeout 200 "$ncu" --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
           --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
           python3 bench/gpu_probe.py --ncu > "$OUT/ncu.txt" 2>&1
         echo "ncu rc $?"
         grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|L1/TEX Hit|L2 Hit|Grid Size" \
           "$OUT/ncu.txt" | head -150 ;;
  *) echo "usage: bash bench/gpu_session.sh pending|ops|models|tune|train|probe" >&2; exit 2 ;;
esac
status=${PIPESTATUS[0]}
# This device's results only: the tool brings back at most 8 files from $OUT.
cp "bench/results/$device".* "bench/results/$device"-* "$OUT/" 2>/dev/null
exit "$status"
