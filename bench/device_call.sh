#!/usr/bin/env bash
# The device calls for issue 19. Run on the device from the repository root; writes under $OUT (8 files come back).
# Seventh session of 2026-12-07:
#   call 1, carry .whl and .whl-cfe (+ nvmath-python, cuda-core):  bash bench/device_call.sh caption 560
#       cuBLASLt's algorithms for the four block GEMMs (bench/gemm_algos.py), then Standard 1024², median of 10, the
#       caption refiner once per generation or at every step in one engine, runs alternating (--ab co): fp8, bf16;
#       then every preset with the defaults (5 runs each).
#   call 2, carry .whl and .whl-svc (the gradio stack):  bash bench/device_call.sh restart 560
#       the app's restart with an empty and a warm --cache-dir (bench/coldstart.py), then the consumer profiles.
# Eighth session (no machine came; for the next), carry .whl and .whl-cfe:  bash bench/device_call.sh c8 560
#       tests/test_gpu.py's cuDNN fp8 attention and cuBLASLt checks, then Standard fp8 with cuDNN's 8-bit attention in
#       the blocks and without it in the same engine (--ab c8), then the cuBLASLt GEMMs the same way, fp8 and bf16.
#   or:  bash bench/device_call.sh lt 560
#       Standard fp8 and bf16 with the blocks' GEMMs on cuBLASLt's timed algorithms, and off in the same engine
#       (--ab lt), then every candidate through zimage/lt_gemm.py, bf16 and e4m3 (bench/gemm_algos.py).
# Sixth session, carry .whl and .whl-cfe (nvidia-cudnn-frontend 1.32, cuda-bindings, cuda-pathfinder):
#   bash bench/device_call.sh overlap 540
#       Standard 1024², median of 10, the stages overlapped or not in one engine, runs alternating (--ab os), with the
#       host syncs of one generation listed (--sync-debug): fp8 with the VAE attention as GEMMs (vga), bf16 with it,
#       then fp8 without it (vga's A/B across two engines of the same machine), cuDNN's 8-bit attention alone
#       (bench/cudnn_fp8_attention.py), bf16 without vga.
#   call 2, carry .whl:  VGA=+vga bash bench/device_call.sh presets 540   (VGA= where vga lost)
#       the default configuration on the four presets (5 runs each), then Standard profiled (--profile-out).
# Fifth session (carry .whl, .whl-fa4a, then .whl-fa4b):  first 420 / fa4 540 / split 420 (docs/PERFORMANCE.md).
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONUNBUFFERED=1
mode=${1:?c8, caption, restart, lt, overlap, presets, first, fa4 or split}
start=$SECONDS
budget=${2:-540}
left() { echo $((budget - (SECONDS - start))); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
install_bench_wheels() {  # .whl (diffusers, torchao, ...) into /tmp/site, on the path
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
}
install_nvmath() {  # nvmath-python and its CUDA Python packages (.whl-cfe), for lt_gemm.py and bench/gemm_algos.py
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl-cfe/cuda_*.whl .whl-cfe/nvmath_python-*.whl
}
log_to_out() {  # $1 name, $2 log file: appended to one file under $OUT (a call brings back 8 files)
  { echo "==== $1"; cat "$2"; } >> "$OUT/logs.txt"
}
latency_run() {  # $1 name, then latency.py's arguments (Standard 1024², 10 runs unless they say otherwise)
  name=$1; shift
  timeout "$(left)" python3 bench/latency.py --model random-full --runs 10 --skip-flops --cache-dir /tmp/zc \
    --shapes Standard:1:1 "$@" --out "$OUT/lat-$name.json" > /tmp/lat-$name.log 2>&1
  echo "latency $name: rc=$? at $((SECONDS - start)) s"; grep -E '^\{' /tmp/lat-$name.log | cut -c1-1800
  log_to_out "$name" /tmp/lat-$name.log
}

if [ "$mode" = caption ]; then  # seventh session, call 1
  install_bench_wheels && install_nvmath || exit
  timeout 120 python3 bench/gemm_algos.py --budget 100 --out "$OUT/gemm-algos.json" > /tmp/gemm.log 2>&1
  echo "gemm algorithms: rc=$? at $((SECONDS - start)) s"; grep -v '^{' /tmp/gemm.log | tail -8
  log_to_out gemm /tmp/gemm.log
  latency_run fp8-co --variants compiled+native+fp8 --ab co
  latency_run bf16-co --variants compiled+native --ab co
  [ "$(left)" -gt 150 ] && latency_run presets --runs 5 --ab '' --shapes Draft:1:1,Standard:1:1,High:1:1,Ultra:1:1 \
    --variants compiled+native+fp8
  exit
fi

if [ "$mode" = c8 ]; then  # carry .whl, .whl-cfe: cuDNN's 8-bit attention in the fp8 blocks, then the cuBLASLt GEMMs
  install_bench_wheels && install_nvmath || exit
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl-cfe/nvidia_cudnn_frontend-*.whl || exit
  timeout 150 python3 -m pytest -q -x tests/test_gpu.py -k "cudnn or lt_gemms" > /tmp/gpu-tests.log 2>&1
  echo "gpu tests: rc=$? at $((SECONDS - start)) s"; tail -15 /tmp/gpu-tests.log
  log_to_out gpu-tests /tmp/gpu-tests.log
  latency_run fp8-c8 --variants compiled+native+fp8+c8 --ab c8
  grep -h "cuDNN fp8 attention" /tmp/lat-fp8-c8.log | sort | uniq -c | head
  [ "$(left)" -gt 150 ] && latency_run fp8-lt --variants compiled+native+fp8 --ab lt
  [ "$(left)" -gt 150 ] && latency_run bf16-lt --variants compiled+native --ab lt
  exit
fi

if [ "$mode" = lt ]; then  # carry .whl, .whl-cfe: the GEMMs on cuBLASLt's timed algorithms, on and off in one engine
  install_bench_wheels && install_nvmath || exit
  latency_run fp8-lt --variants compiled+native+fp8+lt --ab lt
  latency_run bf16-lt --variants compiled+native+lt --ab lt
  python3 - "$OUT"/lat-*-lt.json <<'PY'  # per GEMM shape: the chosen candidate's us against the heuristic's first
import json, sys
for path in sys.argv[1:]:
    for entry in json.load(open(path))["results"][:1]:
        for c in entry.get("lt_gemm_choices", []):
            t = c["times_us"]
            print(path.rsplit("/", 1)[-1], c["rows_in_out"], "e4m3" if c["e4m3"] else "bf16",
                  f"first {t[0]:.1f} us, chosen #{c['chosen']} {t[c['chosen']]:.1f} us of {len(t)}")
PY
  if [ "$(left)" -gt 90 ]; then  # every candidate at M = 4352 through lt_gemm.py, bf16 and e4m3
    timeout $(($(left) - 20)) python3 bench/gemm_algos.py --budget $(($(left) - 40)) --out "$OUT/gemm-algos-lt.json" \
      > /tmp/gemm.log 2>&1
    echo "gemm algorithms: rc=$? at $((SECONDS - start)) s"; grep -v '^{' /tmp/gemm.log | tail -14
    log_to_out gemm /tmp/gemm.log
  fi
  exit
fi

if [ "$mode" = restart ]; then  # seventh session, call 2: the app's restart, then the consumer profiles
  install_bench_wheels || exit
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-svc/*.whl || exit
  timeout 260 python3 bench/coldstart.py --model random-full --cache-dir /tmp/zcs --runs cold,warm --timeout 200 \
    --out "$OUT/coldstart.json" > /tmp/cs.log 2>&1
  echo "coldstart: rc=$? at $((SECONDS - start)) s"; tail -12 /tmp/cs.log
  log_to_out coldstart /tmp/cs.log
  for cap in 16 12; do
    [ "$(left)" -gt 100 ] || break
    timeout "$(left)" python3 bench/vram.py --profile ${cap}gb --limit $cap --compile on \
      --requests Standard:10,High:3,Ultra:2 --cache-dir /tmp/zv --out "$OUT/vram$cap.json" > /tmp/vram$cap.log 2>&1
    echo "vram ${cap}gb: rc=$? at $((SECONDS - start)) s"; tail -8 /tmp/vram$cap.log
    log_to_out vram$cap /tmp/vram$cap.log
  done
  exit
fi

if [ "$mode" = overlap ]; then  # sixth session: the stages overlapped; the VAE attention as GEMMs end to end
  install_bench_wheels || exit
  latency_run fp8-vga --variants compiled+native+fp8+vga --ab os --sync-debug
  latency_run bf16-vga --variants compiled+native+vga --ab os
  [ "$(left)" -gt 120 ] && latency_run fp8 --variants compiled+native+fp8 --ab os
  if [ -d .whl-cfe ] && [ "$(left)" -gt 50 ]; then  # cuDNN's 8-bit attention against its bf16 one (next lever?)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-cfe/*.whl
    timeout 50 python3 bench/cudnn_fp8_attention.py --out "$OUT/cudnn-fp8.json" > /tmp/cudnn.log 2>&1
    echo "cudnn fp8 attention: rc=$? at $((SECONDS - start)) s"; tail -20 /tmp/cudnn.log
    { echo "==== cudnn"; cat /tmp/cudnn.log; } >> "$OUT/logs.txt"
  fi
  [ "$(left)" -gt 130 ] && latency_run bf16 --variants compiled+native --ab os
  exit
fi

if [ "$mode" = presets ]; then  # sixth session, call 2: the defaults (fp8; VGA=+vga adds the VAE attention as GEMMs) on every preset, then a profile
  install_bench_wheels || exit
  vga=${VGA-}  # "+vga" where call 1 measured it faster end to end
  timeout "$(left)" python3 bench/latency.py --model random-full --runs 5 --skip-flops --cache-dir /tmp/zc --ab '' \
    --shapes Draft:1:1,Standard:1:1,High:1:1,Ultra:1:1 --variants "compiled+native+fp8$vga" \
    --out "$OUT/lat-presets.json" > /tmp/presets.log 2>&1
  echo "presets: rc=$? at $((SECONDS - start)) s"; grep -E '^\{' /tmp/presets.log | cut -c1-700
  { echo "==== presets"; cat /tmp/presets.log; } >> "$OUT/logs.txt"
  if [ "$(left)" -gt 100 ]; then
    timeout "$(left)" python3 bench/latency.py --model random-full --runs 10 --skip-flops --cache-dir /tmp/zc --ab '' \
      --shapes Standard:1:1 --variants "compiled+native+fp8$vga" --profile-out "$OUT/prof-fp8.json" \
      --out "$OUT/lat-fp8-profiled.json" > /tmp/prof.log 2>&1
    echo "profile: rc=$? at $((SECONDS - start)) s"; grep -v '^{' /tmp/prof.log | tail -25
    { echo "==== profile"; cat /tmp/prof.log; } >> "$OUT/logs.txt"
  fi
  exit
fi

if [ "$mode" = split ]; then  # fifth session: which fused GEMM lost, and the VAE attention as GEMMs end to end
  install_bench_wheels || exit
  echo '{"use": {"qkv_gemm": false, "swiglu_gemm": true}}' > /tmp/swiglu-only.json
  run() {  # $1 name, then latency.py's arguments
    name=$1; shift
    timeout "$(left)" python3 bench/latency.py --model random-full --runs 10 --skip-flops --cache-dir /tmp/zc "$@" \
      --out "$OUT/lat-$name.json" > "$OUT/lat-$name.log" 2>&1
    echo "latency $name: rc=$? at $((SECONDS - start)) s"; grep -E '^\{' "$OUT/lat-$name.log" | cut -c1-900
  }
  run bf16-swiglu --shapes Standard:1:1 --variants compiled+native+fg --ab fg --kernel-config /tmp/swiglu-only.json
  run fp8-vga --shapes Standard:1:1,High:1:1 --variants compiled+native+fp8+vga,compiled+native+fp8 --ab ""
  exit
fi

if [ "$mode" = first ]; then
  install_bench_wheels || exit
  mkdir -p /tmp/fa4 && cp .whl-fa4a/* /tmp/fa4/
  python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
  timeout 110 python3 bench/kernels.py --gemms-only --sweep --out "$OUT/gemm.json" > "$OUT/gemm.log" 2>&1
  echo "gemms: rc=$? at $((SECONDS - start)) s"; grep -v '^{' "$OUT/gemm.log" | tail -12
  cp "$OUT/gemm.json" /tmp/gemm.json 2>/dev/null  # call 2 reads the tiles from here (same machine)
  timeout 40 python3 bench/attention.py --vae --out "$OUT/vae.json" > "$OUT/vae.log" 2>&1
  echo "vae attention: rc=$? at $((SECONDS - start)) s"; grep '^{' "$OUT/vae.log"
  cp "$OUT/vae.json" /tmp/vae.json 2>/dev/null
else  # fa4: call 1's wheels are in /tmp/site on this machine, flash-attn-4's parts in /tmp/fa4 and .whl-fa4b
  [ -d /tmp/site/diffusers ] || { echo "a fresh machine: call 1's wheels are not here"; exit 3; }
  cat /tmp/fa4/part-aa .whl-fa4b/part-ab .whl-fa4b/part-ac > "/tmp/fa4/$(cat .whl-fa4b/NAME)" && rm /tmp/fa4/part-aa
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/fa4/*.whl || exit
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
fi
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
fg=${FG-+fg} ab=${AB-fg}  # the GEMMs with epilogues, unless their kernel failed in bench/kernels.py
python3 -c "import json, sys; sys.exit(any('error' in r for r in json.load(open('/tmp/gemm.json'))['kernels']))" \
  || { fg="" ab=""; echo "fused GEMMs failed in bench/kernels.py: not used"; }

latency() {  # $1 variants, $2 name, $3 --ab: Standard 1024², 10 runs
  timeout "$(left)" python3 bench/latency.py --model random-full --shapes Standard:1:1 --runs 10 --skip-flops \
    --cache-dir /tmp/zc --ab "$3" --variants "$1" "${config[@]}" --out "$OUT/lat-$2.json" > "$OUT/lat-$2.log" 2>&1
  echo "latency $2: rc=$? at $((SECONDS - start)) s"
  grep -E '^\{|launch parameters' "$OUT/lat-$2.log" | cut -c1-1500
}

if [ "$mode" = first ]; then
  latency "compiled+$attention+fp8$fg$vga" fp8 "$ab"
  if [ "$(left)" -gt 170 ]; then latency "compiled+$attention$fg$vga" bf16 "$ab"; fi
else
  latency "compiled+$attention+fp8$fg$vga" fa4-fp8 "$ab"
  if [ "$(left)" -gt 150 ]; then latency "compiled+$attention$fg$vga" fa4-bf16 "$ab"; fi
fi
