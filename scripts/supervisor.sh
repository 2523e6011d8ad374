#!/usr/bin/env bash
# supervisord / supervisorctl for this repo, with the run folder in $ZIMAGE_RUN_DIR (default: <repo>/run).
#   scripts/supervisor.sh start [-n]          start supervisord (-n: stay in the foreground)
#   scripts/supervisor.sh ctl status          any supervisorctl command: restart zimage, tail -f zimage, ...
# With the default run folder this is exactly `supervisord|supervisorctl -c deploy/supervisor/supervisord.conf`,
# with deploy/supervisor on supervisord's PYTHONPATH (for the conf's [rpcinterface:zimage], zimage_readiness.py);
# with another one, that conf is rendered into the run folder with its run/ paths pointing there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
conf=$repo/deploy/supervisor/supervisord.conf
run=${ZIMAGE_RUN_DIR:-$repo/run}
mkdir -p "$run"
if [ "$(cd "$run" && pwd)" != "$repo/run" ]; then
  run=$(cd "$run" && pwd)
  # rendered at every call, then renamed into place: a supervisorctl reading it meanwhile (the monitor's
  # oom-recover.sh) never sees half a file
  sed -e "s#%(here)s/../../run#$run#g" -e "s#%(here)s/../..#$repo#g" "$conf" > "$run/supervisord.conf.$$"
  mv -f "$run/supervisord.conf.$$" "$run/supervisord.conf"
  conf=$run/supervisord.conf
fi
case "${1:-}" in
  start) shift
         export PYTHONPATH="$repo/deploy/supervisor${PYTHONPATH:+:$PYTHONPATH}"
         exec supervisord -c "$conf" "$@" ;;
  ctl) shift; exec supervisorctl -c "$conf" "$@" ;;
  *) echo "usage: $0 start [-n] | ctl <supervisorctl command>" >&2; exit 2 ;;
esac
