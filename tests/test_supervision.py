"""The service under a real supervisord (the repo's conf, rendered into a temporary run folder, on a port that
is not the default): crashes, hangs and fatal log lines are recovered without a manual step; a restart
returns when the app is ready; stopping loses nothing; shutdown leaves no process behind; a start that fails
before it is ready ends FATAL instead of looping. Tests run in file order and share one supervisord;
recovery times are printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from contextlib import contextmanager
from pathlib import Path

import PIL.Image
import psutil
import pytest
from supervisor.xmlrpc import SupervisorTransport

from zimage.appprocess import ROOT, free_port, http
from zimage.outputs import OutputStore

SUPERVISOR = str(ROOT / "scripts" / "supervisor.sh")
OOM_RECOVER = str(ROOT / "scripts" / "oom-recover.sh")
COOLDOWN = 20
FATAL_LINE = ("2026-11-23 12:00:00,000 ERROR zimage.engine: fatal: device error: CUDA error: an illegal memory "
              "access was encountered (injected by the test); this process should be restarted\n")


class Supervised:
    def __init__(self, tmp: Path, cache_dir: Path, **env: str):
        self.run_dir, self.outputs, self.port = tmp / "run", tmp / "outputs", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                    "ZIMAGE_RUN_DIR": str(self.run_dir), "ZIMAGE_MODEL": "tiny", "ZIMAGE_PORT": str(self.port),
                    "ZIMAGE_OUTPUTS": str(self.outputs), "ZIMAGE_CACHE_DIR": str(cache_dir), "ZIMAGE_WARMUP": "off",
                    "ZIMAGE_MONITOR_COOLDOWN": str(COOLDOWN), "ZIMAGE_HEALTH_TIMEOUT": "5",
                    "ZIMAGE_RECOVER_TIMEOUT": "240", **env}
        for name in ("ZIMAGE_SUPERVISOR_CONF", "ZIMAGE_HOST"):  # nothing of the caller's shell leaks in
            self.env.pop(name, None)
        self.proc = subprocess.Popen([SUPERVISOR, "start", "-n"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

    def rpc(self):
        """supervisord's XML-RPC interface over the run folder's socket (cheaper than a supervisorctl call)."""
        sock = f"unix://{self.run_dir / 'supervisor.sock'}"
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, sock))

    def state(self, program: str = "zimage") -> str:
        try:
            return self.rpc().supervisor.getProcessInfo(program)["statename"]
        except (OSError, xmlrpc.client.Fault):
            return "?"

    def shutdown(self) -> None:
        """Stop supervisord and everything under it, whatever state a failed test left it in."""
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.status() == psutil.STATUS_STOPPED:
                    child.send_signal(signal.SIGCONT)
            self.ctl("shutdown", check=False)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def ctl(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([SUPERVISOR, "ctl", *args], env=self.env, capture_output=True, text=True, timeout=180)
        if check and out.returncode != 0:
            raise AssertionError(f"supervisorctl {' '.join(args)}: {out.returncode} {out.stdout} {out.stderr}")
        return out.stdout.strip()

    def pid(self, program: str = "zimage") -> int:
        out = self.ctl("pid", program, check=False)
        return int(out) if out.isdigit() else 0

    def ready(self) -> bool:
        return bool(self.readiness())

    def readiness(self) -> bool | None:
        """True/False from /readyz or a refused connection; None when the check itself timed out (a loaded CI
        machine), which says nothing about the app."""
        try:
            return http("GET", self.url + "/readyz", timeout=5)[0] == 200
        except TimeoutError:
            return None
        except OSError as exc:
            return None if "timed out" in str(exc) else False

    def wait_new_ready(self, old_pid: int, timeout: float = 240) -> tuple[int, float]:
        """Seconds until a process other than `old_pid` serves /readyz 200 and supervisord calls it RUNNING.
        Both: serve.sh's watcher marks it RUNNING a moment after the first 200, and httpok watches RUNNING
        programs only, so a test that hangs the app in between would wait for startsecs (600 s), not httpok."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            pid = self.pid()
            if pid not in (0, old_pid) and self.ready() and self.state() == "RUNNING":
                return pid, time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"no new ready zimage after {timeout}s; monitor log:\n{self.monitor_log()}")

    def log(self, name: str) -> str:
        path = self.run_dir / name
        return path.read_text() if path.exists() else ""

    def monitor_log(self) -> str:
        return self.log("monitor.log")


@contextmanager
def supervised(tmp: Path, cache_dir: Path, **env: str):
    s = Supervised(tmp, cache_dir, **env)
    try:
        yield s
    finally:
        s.shutdown()  # a failed test must not leave supervisord and its children running


@pytest.fixture(scope="module")
def sup(tmp_path_factory, cache_dir):
    with supervised(tmp_path_factory.mktemp("supervised"), cache_dir) as s:
        deadline = time.monotonic() + 240
        while not s.ready():
            assert time.monotonic() < deadline and s.proc.poll() is None, "supervised app never became ready"
            time.sleep(0.5)
        yield s


def test_control_socket_is_private_and_there_is_no_tcp_control(sup):
    sock = sup.run_dir / "supervisor.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o700"
    assert "inet_http_server" not in (ROOT / "deploy/supervisor/supervisord.conf").read_text().replace(
        "no inet_http_server", "")
    assert "zimage-monitor" in sup.ctl("status") and "zimage-health" in sup.ctl("status")
    # the readiness extension is loaded, and changes nothing for a pid that is not the one starting
    assert sup.rpc().zimage.markReady("zimage", 1) is False


def test_kill_9_during_generation_recovers_and_loses_nothing(sup):
    body = json.dumps({"prompt": "kill me", "n": 4, "size": "512x512", "steps": 1, "seed": 1}).encode()
    assert http("POST", sup.url + "/v1/images/generations", body, {"Content-Type": "application/json"})[0] == 200
    old = sup.pid()
    os.kill(old, signal.SIGKILL)  # right after the answer: the 4 PNGs are still being written
    new, seconds = sup.wait_new_ready(old)
    print(f"\nkill -9: new pid {new} ready after {seconds:.1f} s")
    assert not list(sup.outputs.rglob("*.tmp"))  # the restarted app removed any partial write
    for png in sup.outputs.rglob("*.png"):
        PIL.Image.open(png).verify()
    entries = OutputStore(sup.outputs, "tiny").recent(100)  # the index still reads
    assert all(Path(e["path"]).is_file() for e in entries)


def test_sigstop_hang_is_restarted_by_httpok(sup):
    old = sup.pid()
    os.kill(old, signal.SIGSTOP)
    new, seconds = sup.wait_new_ready(old, timeout=240)
    print(f"\nSIGSTOP: httpok restarted it, new pid {new} ready after {seconds:.1f} s")
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    assert "restarting" in (sup.run_dir / "health.log").read_text()


def restarts_in_monitor_log(sup) -> int:
    return sup.monitor_log().count("monitor: restart:")


def wait_recoveries_done(sup, count: int, timeout: float = 240) -> None:
    """oom-recover.sh returns after `supervisorctl restart` (which waits startsecs) and /readyz: later than the
    app is ready. The monitor reads the rest of a burst only then."""
    deadline = time.monotonic() + timeout
    while sup.monitor_log().count("oom-recover.sh exited") < count:
        assert time.monotonic() < deadline, sup.monitor_log()
        time.sleep(0.5)


def test_fatal_line_means_one_restart_and_a_burst_still_one(sup):
    before = restarts_in_monitor_log(sup)
    done_before = sup.monitor_log().count("oom-recover.sh exited")
    old = sup.pid()
    with open(sup.run_dir / "zimage.log", "a") as log:
        log.write(FATAL_LINE)
    new, seconds = sup.wait_new_ready(old)
    print(f"\nfatal line: restarted by the monitor, ready after {seconds:.1f} s")
    assert restarts_in_monitor_log(sup) == before + 1
    wait_recoveries_done(sup, done_before + 1)

    time.sleep(COOLDOWN)  # past the cooldown: a new burst may restart again, exactly once
    with open(sup.run_dir / "zimage.log", "a") as log:
        log.write(FATAL_LINE * 5)
    newer, seconds = sup.wait_new_ready(new)
    wait_recoveries_done(sup, done_before + 2)
    time.sleep(2)  # the other four lines are read now; give them every chance to cause a second restart
    assert sup.pid() == newer and restarts_in_monitor_log(sup) == before + 2
    assert sup.monitor_log().count("cooldown: not restarting again") >= 4
    assert sup.monitor_log().count("oom-recover.sh exited 0") >= 2, sup.monitor_log()
    assert f"127.0.0.1:{sup.port}/readyz" in sup.monitor_log()
    print(f"burst of 5 fatal lines: one restart, ready after {seconds:.1f} s")


def test_supervisorctl_restart_returns_when_ready(sup):
    """"started" means ready: `supervisorctl restart zimage` returns within a few seconds of the new process
    answering /readyz 200 (not startsecs later), /readyz is 200 when it returns, and `status` never says
    RUNNING while the new process is not ready."""
    old = sup.pid()
    t0 = time.monotonic()
    restart = subprocess.Popen([SUPERVISOR, "ctl", "restart", "zimage"], env=sup.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    went_down = first_ready = None
    states_while_not_ready = set()
    while restart.poll() is None and time.monotonic() - t0 < 180:
        ready, now = sup.readiness(), time.monotonic() - t0
        if ready is None:  # the check timed out: no evidence either way
            continue
        if not ready and went_down is None:
            went_down = now
        if went_down is not None and first_ready is None:
            if ready:
                first_ready = now
            else:
                states_while_not_ready.add(sup.state())
        time.sleep(0.1)
    out, _ = restart.communicate(timeout=60)
    returned = time.monotonic() - t0
    ready_at_return, state_at_return = sup.ready(), sup.state()
    print(f"\nsupervisorctl restart: /readyz 200 after {first_ready} s, returned after {returned:.1f} s "
          f"(states while not ready: {sorted(states_while_not_ready)}, at return: {state_at_return})")
    assert restart.returncode == 0 and "started" in out, out
    assert sup.pid() not in (0, old)
    assert ready_at_return, "supervisorctl restart returned before the app was ready"
    assert state_at_return == "RUNNING"
    assert went_down is not None and first_ready is not None, (went_down, first_ready)
    assert returned - first_ready <= 3, f"returned {returned - first_ready:.1f} s after /readyz was 200"
    assert "RUNNING" not in states_while_not_ready


def test_oom_recover_finds_the_service_from_its_run_folder(sup):
    """Called by hand with only ZIMAGE_RUN_DIR (no ZIMAGE_SUPERVISOR_CONF, no ZIMAGE_PORT in the caller's
    shell): it restarts this service (not the repo's run/) and waits on this service's port."""
    env = {k: v for k, v in sup.env.items() if k not in ("ZIMAGE_PORT", "ZIMAGE_SUPERVISOR_CONF")}
    env["ZIMAGE_RECOVER_TIMEOUT"] = "60"
    old = sup.pid()
    t0 = time.monotonic()
    out = subprocess.run([OOM_RECOVER], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    print(f"\noom-recover.sh by hand (run folder only): exit {out.returncode} after {seconds:.1f} s\n{out.stdout}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"127.0.0.1:{sup.port}/readyz" in out.stdout
    assert sup.pid() not in (0, old) and sup.ready()


def test_oom_recover_runs_one_restart_at_a_time(sup):
    # the caller's shell names another port: the service's own port is still the one waited on
    env = {**sup.env, "ZIMAGE_PORT": str(free_port()), "ZIMAGE_RECOVER_TIMEOUT": "60"}
    first = subprocess.Popen([OOM_RECOVER], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.run([OOM_RECOVER], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3 and "another recovery" in second.stdout
    assert first.wait(timeout=300) == 0 and sup.ready()
    assert f"127.0.0.1:{sup.port}/readyz" in first.stdout.read()


def test_stop_during_generation_finishes_cleanly(sup):
    answers = []
    body = json.dumps({"prompt": "slow one", "size": "1024x1024", "steps": 8, "n": 2, "seed": 3}).encode()

    def generate():
        try:
            answers.append(http("POST", sup.url + "/v1/images/generations", body,
                                {"Content-Type": "application/json"}, timeout=120)[0])
        except OSError as exc:
            answers.append(repr(exc))

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(3)
    sup.ctl("stop", "zimage")
    worker.join(timeout=120)
    assert answers and (answers[0] == 200 or "Error" in str(answers[0]) or answers[0] == 503), answers
    assert not list(sup.outputs.rglob("*.tmp"))
    for png in sup.outputs.rglob("*.png"):
        PIL.Image.open(png).verify()
    sup.ctl("start", "zimage")
    deadline = time.monotonic() + 240
    while not sup.ready():
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_shutdown_leaves_no_process(sup):
    root = psutil.Process(sup.proc.pid)
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    assert len(pids) >= 4  # supervisord, app, monitor (+ its tail), httpok
    # a generation in flight: the app drains it on SIGTERM, so the shutdown spans several of httpok's ticks
    body = json.dumps({"prompt": "last one", "size": "1024x1024", "steps": 8, "n": 2, "seed": 5}).encode()
    worker = threading.Thread(target=lambda: http("POST", sup.url + "/v1/images/generations", body,
                                                  {"Content-Type": "application/json"}, timeout=120), daemon=True)
    worker.start()
    time.sleep(2)
    t0 = time.monotonic()
    sup.ctl("shutdown")
    sup.proc.wait(timeout=90)
    print(f"\nshutdown with a generation in flight: {time.monotonic() - t0:.1f} s")
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.5)
    assert not alive, f"left running: {[psutil.Process(p).cmdline() for p in alive]}"


def test_health_log_is_quiet_about_planned_restarts_and_shutdown(sup):
    """The planned restarts and stops above, and the shutdown while a generation drained, left no "NOT
    restarting" line and no traceback in the log of httpok (zimage-health)."""
    health = sup.log("health.log")
    print(f"\nhealth.log:\n{health}")
    assert "NOT restarting" not in health
    assert "Traceback" not in health


def test_a_start_that_fails_before_ready_ends_fatal(tmp_path, cache_dir):
    """A model that cannot load fails after the port is bound and the server runs: supervisord retries it
    startretries (3) times, then gives up (FATAL) instead of restarting it forever."""
    with supervised(tmp_path, cache_dir, ZIMAGE_MODEL="nobody/not-in-the-cache") as bad:
        t0 = time.monotonic()
        while bad.state() != "FATAL":
            assert time.monotonic() - t0 < 240 and bad.proc.poll() is None, (bad.state(), bad.log("supervisord.log"))
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        time.sleep(3)  # the monitor must not start it again either
        assert bad.state() == "FATAL"
        sup_log, app_log = bad.log("supervisord.log"), bad.log("zimage.log")
        attempts = sup_log.count("spawned: 'zimage'")
        print(f"\nfailing start: FATAL after {seconds:.1f} s, {attempts} attempts")
        assert attempts == 4, sup_log
        assert app_log.count("serving on") == 4, app_log  # each attempt got as far as serving HTTP
        assert "success: zimage entered RUNNING" not in sup_log


def test_production_conf_parses_and_is_locked_down(tmp_path, monkeypatch):
    """The production example, with its absolute folders moved under tmp_path, is a valid supervisord conf
    (its readiness extension included, from deploy/supervisor as its header tells systemd)."""
    from supervisor.options import ServerOptions

    monkeypatch.syspath_prepend(str(ROOT / "deploy" / "supervisor"))

    text = (ROOT / "deploy/supervisor/zimage-production.conf").read_text()
    for folder in ("/run/zimage", "/var/log/zimage"):
        (tmp_path / folder.strip("/")).mkdir(parents=True)
        text = text.replace(folder, str(tmp_path / folder.strip("/")))
    conf = tmp_path / "production.conf"
    conf.write_text(text)
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    assert sorted(g.name for g in options.process_group_configs) == ["zimage", "zimage-health", "zimage-monitor"]
    assert "zimage" in [name for name, _factory, _extras in options.configroot.supervisord.rpcinterface_factories]
    app = next(g for g in options.process_group_configs if g.name == "zimage").process_configs[0]
    assert "scripts/serve.sh" in app.command and app.startretries == 3
    assert "[inet_http_server]" not in text and "chmod=0700" in text
    assert "ZIMAGE_AUTH=" not in text.replace(";   ZIMAGE_AUTH=", "")  # the secret lives in the env file
