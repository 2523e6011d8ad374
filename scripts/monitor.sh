#!/usr/bin/env bash
# Follows the app's log (ZIMAGE_APP_LOG, default <run folder>/zimage.log, across rotation) and restarts the app
# through oom-recover.sh (same run folder, ZIMAGE_RUN_DIR, and conf, ZIMAGE_SUPERVISOR_CONF) when it reads
#   - the engine's "fatal:" line (CUDA error, or too many OOMs: the process is not trustworthy any more),
#   - a "CUDA error" line,
#   - more than ZIMAGE_MONITOR_OOM_COUNT (5) "oom handled" lines within ZIMAGE_MONITOR_OOM_WINDOW (300) s.
# After a restart has finished it ignores further triggers for ZIMAGE_MONITOR_COOLDOWN (120) s, so a burst of lines
# causes one restart, not a storm. Warns (never restarts) when GPU memory use stays above
# ZIMAGE_MONITOR_GPU_WARN percent (90) for three checks in a row, where nvidia-smi exists.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log=${ZIMAGE_APP_LOG:-${ZIMAGE_RUN_DIR:-$here/../run}/zimage.log}
oom_count=${ZIMAGE_MONITOR_OOM_COUNT:-5}
oom_window=${ZIMAGE_MONITOR_OOM_WINDOW:-300}
cooldown=${ZIMAGE_MONITOR_COOLDOWN:-120}
gpu_warn=${ZIMAGE_MONITOR_GPU_WARN:-90}
say() { printf '%s monitor: %s\n' "$(date -Is)" "$*"; }

watch_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  local high=0 used total
  while sleep 30; do
    read -r used total < <(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits |
                           head -n1 | tr -d ',')
    if [ -n "${total:-}" ] && [ $(( used * 100 / total )) -ge "$gpu_warn" ]; then high=$(( high + 1 )); else high=0; fi
    [ "$high" -eq 3 ] && say "warning: GPU memory ${used}/${total} MiB above ${gpu_warn}% for 90 s (no restart)"
  done
}
watch_gpu &

last_restart=0
ooms=()
recover() {
  local now; now=$(date +%s)
  if [ $(( now - last_restart )) -lt "$cooldown" ]; then say "cooldown: not restarting again for: $1"; return; fi
  last_restart=$now
  ooms=()
  say "restart: $1"
  "$here/oom-recover.sh"
  say "oom-recover.sh exited $?"
  last_restart=$(date +%s)  # the cooldown runs from the end of the recovery: lines queued meanwhile are old news
}

say "watching $log (OOM limit $oom_count in ${oom_window}s, cooldown ${cooldown}s)"
while IFS= read -r line; do
  case "$line" in
    *"zimage.engine: fatal:"*) recover "fatal line: ${line:0:300}" ;;
    *"CUDA error"*) recover "CUDA error: ${line:0:300}" ;;
    *"oom handled"*)
      now=$(date +%s)
      kept=()
      for t in "${ooms[@]}" "$now"; do [ $(( now - t )) -le "$oom_window" ] && kept+=("$t"); done
      ooms=("${kept[@]}")
      say "oom handled (${#ooms[@]} within ${oom_window}s)"
      [ "${#ooms[@]}" -gt "$oom_count" ] && recover "${#ooms[@]} handled OOMs within ${oom_window}s"
      ;;
  esac
done < <(tail -F -n 0 "$log" 2>/dev/null)
