#!/usr/bin/env bash
# supervisor event listener (TICK_5): superlance's httpok restarts `zimage` when /healthz does not answer
# 200 within ZIMAGE_HEALTH_TIMEOUT seconds (default 10) while it is RUNNING (ready, see serve.sh).
# httpok as shipped checks the URL even when zimage is not RUNNING ("eager"), so every planned stop or restart
# logged "zimage not in RUNNING state, NOT restarting", and a tick during supervisord's shutdown ended in a
# traceback (every RPC call is refused then). Here it runs not eager (-E), a failed check is dropped when
# zimage is no longer RUNNING by then (stopped or restarted on purpose meanwhile), a shutdown is a quiet
# "nothing to check", and its lines carry a time.
host=${ZIMAGE_HOST:-127.0.0.1}
case "$host" in
  0.0.0.0|"") host=127.0.0.1 ;;
  ::|"[::]") host="[::1]" ;;
  \[*) ;;
  *:*) host="[$host]" ;;
esac

read -r -d '' quiet_httpok <<'EOF'
import sys, time, xmlrpc.client
from superlance import httpok
from supervisor.states import ProcessStates
from supervisor.xmlrpc import Faults


class Stamped:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        lines = text.rstrip("\n").split("\n")
        self.stream.write("".join("%s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), line) for line in lines))

    def flush(self):
        self.stream.flush()


class QuietHTTPOk(httpok.HTTPOk):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stderr = Stamped(sys.stderr)

    def listProcesses(self, state=None):
        try:
            return super().listProcesses(state)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode == Faults.SHUTDOWN_STATE:
                return []  # supervisord is shutting down: nothing to check
            raise

    def act(self, subject, msg):
        if not self.listProcesses(ProcessStates.RUNNING):
            return  # stopped or restarted on purpose while the check ran: not a hang
        self.stderr.write("%s: %s" % (subject, " ".join(line.strip() for line in msg.splitlines() if line.strip())))
        super().act(subject, msg)


httpok.HTTPOk = QuietHTTPOk
httpok.main(sys.argv)
EOF

exec python -c "$quiet_httpok" -E -p zimage -t "${ZIMAGE_HEALTH_TIMEOUT:-10}" "http://$host:${ZIMAGE_PORT:-7860}/healthz"
