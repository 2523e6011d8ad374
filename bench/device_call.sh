#!/usr/bin/env bash
# The device calls for issue 19 (2026-12-07, fourth session), two back-to-back calls on one warm machine, most
# important first under one deadline. Run on the device from the repository root:
#   call 1, carry .whl-fa4a:           mkdir -p /tmp/fa4 && cp .whl-fa4a/* /tmp/fa4/ && bash bench/device_call.sh kernels 240
#       the GEMMs with epilogues against cuBLAS + the row kernels, with a tile sweep (bench/kernels.py --gemms-only);
#       the VAE attention as GEMMs against SDPA (bench/attention.py --vae). Needs only torch + Triton.
#   call 2, carry .whl and .whl-fa4b:  bash bench/device_call.sh latency 540
#       flash-attn-4 reassembled and installed (../shared/gpu/fetch-wheels.sh fa4); Standard 1024², 10 runs:
#       fp8 and bf16 with fused_gemms on and the same engine with them off (--ab fg), the VAE attention as GEMMs
#       where call 1 found it faster, then the fp8 defaults alone (the decode without it).
# Writes under $OUT (a call brings back 8 files).
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONUNBUFFERED=1
mode=${1:?kernels or latency}
start=$SECONDS
budget=${2:-540}
left() { echo $((budget - (SECONDS - start))); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv

if [ "$mode" = kernels ]; then
  python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
  timeout "$(left)" python3 bench/kernels.py --gemms-only --sweep --out "$OUT/gemm.json" > "$OUT/gemm.log" 2>&1
  echo "gemms: rc=$? at $((SECONDS - start)) s"; grep -v '^{' "$OUT/gemm.log" | tail -12
  cp "$OUT/gemm.json" /tmp/gemm.json 2>/dev/null  # call 2 reads the tiles from here (same machine)
  timeout "$(left)" python3 bench/attention.py --vae --out "$OUT/vae.json" > "$OUT/vae.log" 2>&1
  echo "vae attention: rc=$? at $((SECONDS - start)) s"; grep '^{' "$OUT/vae.log"
  cp "$OUT/vae.json" /tmp/vae.json 2>/dev/null
  exit 0
fi

# latency
if [ -f .whl-fa4b/NAME ] && [ -f /tmp/fa4/part-aa ]; then
  cat /tmp/fa4/part-aa .whl-fa4b/part-ab > "/tmp/fa4/$(cat .whl-fa4b/NAME)" && rm /tmp/fa4/part-aa
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls /tmp/fa4/*.whl 2>/dev/null) && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages || exit
attention=native
python3 -c "from flash_attn.cute import flash_attn_func" 2>/dev/null && attention=fa4
echo "attention: $attention"
config=()
[ -f /tmp/gemm.json ] && config=(--kernel-config /tmp/gemm.json)
vga=$(python3 - <<'EOF'
import json
try:
    rows = [r for r in json.load(open("/tmp/vae.json"))["rows"] if r["tokens"] == 16384 and "us" in r]
    sdpa = next(r["us"] for r in rows if "sdpa" in r["candidate"])
    gemm = next(r for r in rows if "gemm" in r["candidate"])
    print("+vga" if gemm["us"] < sdpa and gemm["finite"] and gemm["rel_l2_vs_fp32"] < 0.01 else "")
except Exception:
    print("")
EOF
)
echo "vae attention as GEMMs: ${vga:-no}"

latency() {  # $1 variants, $2 name, $3 --ab: Standard 1024², 10 runs
  timeout "$(left)" python3 bench/latency.py --model random-full --shapes Standard:1:1 --runs 10 --skip-flops \
    --cache-dir /tmp/zc --ab "$3" --variants "$1" "${config[@]}" --out "$OUT/lat-$2.json" > "$OUT/lat-$2.log" 2>&1
  echo "latency $2: rc=$? at $((SECONDS - start)) s"
  grep -E '^\{|launch parameters' "$OUT/lat-$2.log" | cut -c1-1500
}

latency "compiled+$attention+fp8+fg$vga" fp8 fg
if [ "$(left)" -gt 150 ]; then latency "compiled+$attention+fg$vga" bf16 fg; fi
if [ "$(left)" -gt 100 ]; then latency "compiled+$attention+fp8" fp8-defaults ""; fi
