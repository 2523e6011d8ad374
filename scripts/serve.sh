#!/usr/bin/env bash
# The command of supervisord's program `zimage`. It becomes `python app.py "$@"` (exec: the pid supervisord
# watches, signals and the log are the app's own), after
#   - writing the address the app answers on to $ZIMAGE_RUN_DIR/zimage.url, for scripts/oom-recover.sh (so a
#     caller's shell need not know the service's host and port);
#   - starting a watcher (under supervisord only) that polls /readyz and, on the first 200, calls
#     zimage.markReady (deploy/supervisor/zimage_readiness.py): supervisord moves the program from STARTING to
#     RUNNING then, not when startsecs have passed. So `supervisorctl start|restart zimage` returns when the
#     app is ready, and an exit before that is a failed start (BACKOFF, FATAL after startretries).
# The watcher ends when the app is ready, when it exits, or when supervisord no longer waits for it (startsecs
# ran out, stopped); it logs one line to the app's log.
# Host and port come from ZIMAGE_HOST / ZIMAGE_PORT, as the app reads them (the confs pass no --host/--port).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
host=${ZIMAGE_HOST:-127.0.0.1}
case "$host" in
  0.0.0.0|"") host=127.0.0.1 ;;
  ::|"[::]") host="[::1]" ;;
  \[*) ;;
  *:*) host="[$host]" ;;
esac
url="http://$host:${ZIMAGE_PORT:-7860}"

if [ -n "${ZIMAGE_RUN_DIR:-}" ]; then
  file=$ZIMAGE_RUN_DIR/zimage.url
  { printf '%s\n' "$url" > "$file.$$" && mv -f "$file.$$" "$file"; } ||
    echo "serve.sh: warning: cannot write $file (scripts/oom-recover.sh will use its caller's ZIMAGE_PORT)"
fi

read -r -d '' watcher <<'EOF'
import datetime, os, sys, time, urllib.request, xmlrpc.client
from supervisor.xmlrpc import Faults, SupervisorTransport

pid, url = int(sys.argv[1]), sys.argv[2]
env = os.environ
name = "%s:%s" % (env.get("SUPERVISOR_GROUP_NAME", "zimage"), env.get("SUPERVISOR_PROCESS_NAME", "zimage"))
rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", SupervisorTransport(None, None, env["SUPERVISOR_SERVER_URL"]))
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
t0 = time.monotonic()

def say(level, text):  # the app's log format
    now = datetime.datetime.now()
    print("%s,%03d %s zimage.ready: %s" % (now.strftime("%Y-%m-%d %H:%M:%S"), now.microsecond // 1000, level, text),
          flush=True)

def ready():
    try:
        with http.open(url, timeout=5) as resp:
            return resp.status == 200
    except Exception:
        return False

try:
    checked = 0.0
    while True:
        if ready():
            moved = rpc.zimage.markReady(name, pid)
            say("INFO", "%s answered 200 %.1f s after start; supervisord: %s" % (
                url, time.monotonic() - t0, "RUNNING" if moved else "was not waiting for it (unchanged)"))
            break
        if time.monotonic() - checked > 2:  # still the process supervisord is starting?
            info = rpc.supervisor.getProcessInfo(name)
            if info["pid"] != pid or info["statename"] != "STARTING":
                break
            checked = time.monotonic()
        time.sleep(0.25)
except Exception as exc:  # supervisord gone or shutting down, or the extension is not loaded
    if not isinstance(exc, xmlrpc.client.Fault) or exc.faultCode != Faults.SHUTDOWN_STATE:
        say("WARNING", "cannot tell supervisord the app is ready (%s); it marks it RUNNING after startsecs" % exc)
EOF

if [ -n "${SUPERVISOR_SERVER_URL:-}" ]; then
  # ( ... & ): the watcher is orphaned at once, so it never waits as a zombie child of the app
  ( python -c "$watcher" "$$" "$url/readyz" </dev/null & )
fi
cd "$repo" && exec python app.py "$@"
