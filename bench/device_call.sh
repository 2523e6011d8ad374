#!/usr/bin/env bash
# The next device call for issue 19, most important first, under one deadline, so a call that starts late or is
# cut short still returns the measurements that matter (a failed machine start costs 1-2 minutes of the
# session's 30; on 2026-12-07 failed starts spent 1527 s of 1800 and no machine came). Run on the device from
# the repository root, with the bench wheels carried in .whl (../shared/GPU.md):
#     bash bench/device_call.sh SECONDS        # SECONDS: what the call may use (default 540)
# Writes under $OUT: lat-fp8/-bf16 (.json, .log) and prof-*.json (bench/latency.py, same-engine 8-bit attention
# A/B), att.json/.log (bench/attention.py --sweep): 8 files, what a call brings back; the kernel's GPU test
# (tests/test_gpu.py -k fp8_attention) prints to the call's output instead (a ninth file was left behind).
OUT=${OUT:?set OUT to a folder for the results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
export PYTHONUNBUFFERED=1
start=$SECONDS
budget=${1:-540}
left() { echo $((budget - (SECONDS - start))); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"

latency() {  # $1 variants, $2 name: Standard 1024², 10 runs, 8-bit attention switched in the same engine
  timeout "$(left)" python3 bench/latency.py --model random-full --shapes Standard:1:1 --runs 10 --skip-flops \
    --cache-dir /tmp/zc --ab fa8 --variants "$1" --out "$OUT/lat-$2.json" --profile-out "$OUT/prof-$2.json" \
    > "$OUT/lat-$2.log" 2>&1
  echo "latency $2: rc=$? at $((SECONDS - start)) s"
  grep '^{' "$OUT/lat-$2.log"  # per shape: the timings and the 8-bit attention A/B (bench/latency.py)
}

latency compiled+native+fp8 fp8
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k fp8_attention 2>&1 | grep -E "^E |passed|failed" | cut -c1-300 | tail -12
echo "pytest: rc=${PIPESTATUS[0]} at $((SECONDS - start)) s"
if [ "$(left)" -gt 200 ]; then latency compiled+native bf16; fi
if [ "$(left)" -gt 30 ]; then
  timeout "$(left)" python3 bench/attention.py --sweep --out "$OUT/att.json" > "$OUT/att.log" 2>&1
  echo "attention sweep: rc=$? at $((SECONDS - start)) s"; tail -25 "$OUT/att.log"
fi
