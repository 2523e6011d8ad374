"""supervisord RPC extension: `zimage.markReady(name, pid)` lets a starting program say "ready", so that for
supervisord RUNNING means ready.

supervisord itself moves a program from STARTING to RUNNING when it has stayed up `startsecs` seconds: a
clock, not readiness. A short startsecs marks a loading app RUNNING (and a start that fails while loading
restarts forever, because only exits before startsecs count towards startretries and FATAL); a long one keeps
`supervisorctl start|restart` waiting and `status` saying STARTING long after the app is ready. With this
extension the program's launcher (scripts/serve.sh) calls markReady when /readyz first answers 200, so:
  - `supervisorctl start|restart zimage` returns as soon as the app is ready;
  - `status` says STARTING until ready and RUNNING from then;
  - startsecs (long) is the most a start may take; any exit before ready is a failed start: BACKOFF, and
    FATAL after startretries, so a start-up loop (port in use, bad settings, weights missing, warm-up fails)
    ends instead of repeating.

Loaded by supervisord through `[rpcinterface:zimage]` in the conf; this folder must be on supervisord's
PYTHONPATH (scripts/supervisor.sh puts it there). Written against supervisor==4.3.0 (requirements.txt): it
does what `Subprocess.transition()` does when startsecs have passed, no more.
"""

from __future__ import annotations

from supervisor.options import split_namespec
from supervisor.states import ProcessStates, SupervisorStates
from supervisor.xmlrpc import Faults, RPCError


class ReadinessInterface:
    def __init__(self, supervisord):
        self.supervisord = supervisord

    def markReady(self, name, pid):  # camelCase, like supervisord's own XML-RPC methods
        """Move the process `name` (program or group:program) from STARTING to RUNNING, if its pid is `pid`.

        @param string name  process name, or group:name
        @param int pid      the pid that answered ready (a late call for an older process changes nothing)
        @return boolean     True if it moved to RUNNING; False if it was not STARTING with that pid
        """
        group_name, process_name = split_namespec(name)
        group = self.supervisord.process_groups.get(group_name)
        process = group.processes.get(process_name) if group is not None else None
        if process is None:
            raise RPCError(Faults.BAD_NAME, name)
        if self.supervisord.options.mood < SupervisorStates.RUNNING:
            return False  # shutting down
        if process.pid != pid or process.get_state() != ProcessStates.STARTING:
            return False
        # as Subprocess.transition() does for STARTING -> RUNNING once startsecs have passed
        process.delay = 0
        process.backoff = 0
        process.change_state(ProcessStates.RUNNING)
        self.supervisord.options.logger.info(
            "success: %s entered RUNNING state, it answered ready (zimage.markReady)" % process.config.name)
        return True


def make_readiness_interface(supervisord, **config):
    return ReadinessInterface(supervisord)
