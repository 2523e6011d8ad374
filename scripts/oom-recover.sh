#!/usr/bin/env bash
# Restart the app through supervisorctl, then wait until /readyz answers 200. Safe to call concurrently:
# a lock makes the first caller do the one restart and the others return at once.
# Exit codes: 0 ready again | 3 another recovery is running | 4 supervisorctl restart failed |
#             5 not ready within ZIMAGE_RECOVER_TIMEOUT seconds (default 900)
# Only supervisorctl, on our own program: no name-matching kills, no GPU resets, no clock or power changes.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
conf=${ZIMAGE_SUPERVISOR_CONF:-$repo/deploy/supervisor/supervisord.conf}
run=${ZIMAGE_RUN_DIR:-$repo/run}
timeout=${ZIMAGE_RECOVER_TIMEOUT:-900}
host=${ZIMAGE_HOST:-127.0.0.1}
case "$host" in 0.0.0.0|"") host=127.0.0.1 ;; esac
url="http://$host:${ZIMAGE_PORT:-7860}/readyz"
say() { printf '%s oom-recover: %s\n' "$(date -Is)" "$*"; }

exec 9>"$run/oom-recover.lock"
if ! flock -n 9; then say "another recovery is running; not restarting twice"; exit 3; fi
say "restarting zimage (supervisorctl -c $conf restart zimage)"
if ! supervisorctl -c "$conf" restart zimage; then say "supervisorctl restart failed"; exit 4; fi
deadline=$(( $(date +%s) + timeout ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$url', timeout=5).status != 200)" \
      2>/dev/null; then
    say "ready again"; exit 0
  fi
  sleep 2
done
say "not ready after ${timeout}s"; exit 5
