#!/usr/bin/env bash
# Restart the app through supervisorctl, then make sure /readyz answers 200. Safe to call concurrently:
# a lock makes the first caller do the one restart and the others return at once.
# Which service: the one whose run folder is $ZIMAGE_RUN_DIR (default <repo>/run), through
# $ZIMAGE_SUPERVISOR_CONF if set (the production monitor sets it), else as `scripts/supervisor.sh ctl` finds it.
# Which address: the one the running app wrote to <run folder>/zimage.url (scripts/serve.sh, at every start);
# the caller's ZIMAGE_HOST/ZIMAGE_PORT only where that file is missing.
# `supervisorctl restart` itself returns when the app is ready (see serve.sh); the /readyz poll after it is
# a check, and the wait where supervisord could not be told (it then marks RUNNING after startsecs).
# Exit codes: 0 ready again | 3 another recovery is running | 4 supervisorctl restart failed (or no run
#             folder) | 5 not ready within ZIMAGE_RECOVER_TIMEOUT seconds (default 900)
# Only supervisorctl, on our own program: no name-matching kills, no GPU resets, no clock or power changes.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
run=${ZIMAGE_RUN_DIR:-$repo/run}
timeout=${ZIMAGE_RECOVER_TIMEOUT:-900}
say() { printf '%s oom-recover: %s\n' "$(date -Is)" "$*"; }

ctl() {
  if [ -n "${ZIMAGE_SUPERVISOR_CONF:-}" ]; then
    supervisorctl -c "$ZIMAGE_SUPERVISOR_CONF" "$@"
  else
    "$repo/scripts/supervisor.sh" ctl "$@"
  fi
}

if [ ! -d "$run" ]; then say "no run folder $run (set ZIMAGE_RUN_DIR to the service's)"; exit 4; fi
if [ -s "$run/zimage.url" ]; then
  base=$(head -n1 "$run/zimage.url")
else
  host=${ZIMAGE_HOST:-127.0.0.1}
  case "$host" in 0.0.0.0|"") host=127.0.0.1 ;; ::|"[::]") host="[::1]" ;; \[*) ;; *:*) host="[$host]" ;; esac
  base="http://$host:${ZIMAGE_PORT:-7860}"
  say "no $run/zimage.url; using $base from this shell's ZIMAGE_HOST/ZIMAGE_PORT"
fi
url="$base/readyz"

exec 9>"$run/oom-recover.lock"
if ! flock -n 9; then say "another recovery is running; not restarting twice"; exit 3; fi
say "restarting zimage (run folder $run${ZIMAGE_SUPERVISOR_CONF:+, conf $ZIMAGE_SUPERVISOR_CONF}), then waiting for $url"
if ! ctl restart zimage; then say "supervisorctl restart failed"; exit 4; fi
deadline=$(( $(date +%s) + timeout ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if python3 -c "import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(opener.open(sys.argv[1], timeout=5).status != 200)" "$url" 2>/dev/null; then
    say "ready again"; exit 0
  fi
  sleep 2
done
say "not ready after ${timeout}s"; exit 5
