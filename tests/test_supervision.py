"""The service under a real supervisord (the repo's conf, rendered into a temporary run folder): crashes,
hangs and fatal log lines are recovered without a manual step; stopping loses nothing; shutdown leaves no
process behind. Tests run in file order and share one supervisord; recovery times are printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import PIL.Image
import psutil
import pytest

from zimage.appprocess import ROOT, free_port, http
from zimage.outputs import OutputStore

SUPERVISOR = str(ROOT / "scripts" / "supervisor.sh")
COOLDOWN = 20
FATAL_LINE = ("2026-11-23 12:00:00,000 ERROR zimage.engine: fatal: device error: CUDA error: an illegal memory "
              "access was encountered (injected by the test); this process should be restarted\n")


class Supervised:
    def __init__(self, tmp: Path, cache_dir: Path):
        self.run_dir, self.outputs, self.port = tmp / "run", tmp / "outputs", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                    "ZIMAGE_RUN_DIR": str(self.run_dir), "ZIMAGE_MODEL": "tiny", "ZIMAGE_PORT": str(self.port),
                    "ZIMAGE_OUTPUTS": str(self.outputs), "ZIMAGE_CACHE_DIR": str(cache_dir), "ZIMAGE_WARMUP": "off",
                    "ZIMAGE_MONITOR_COOLDOWN": str(COOLDOWN), "ZIMAGE_HEALTH_TIMEOUT": "5",
                    "ZIMAGE_RECOVER_TIMEOUT": "240"}
        self.proc = subprocess.Popen([SUPERVISOR, "start", "-n"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

    def ctl(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([SUPERVISOR, "ctl", *args], env=self.env, capture_output=True, text=True, timeout=180)
        if check and out.returncode != 0:
            raise AssertionError(f"supervisorctl {' '.join(args)}: {out.returncode} {out.stdout} {out.stderr}")
        return out.stdout.strip()

    def pid(self, program: str = "zimage") -> int:
        out = self.ctl("pid", program, check=False)
        return int(out) if out.isdigit() else 0

    def ready(self) -> bool:
        try:
            return http("GET", self.url + "/readyz", timeout=5)[0] == 200
        except OSError:
            return False

    def wait_new_ready(self, old_pid: int, timeout: float = 240) -> tuple[int, float]:
        """Seconds until a process other than `old_pid` serves /readyz 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            pid = self.pid()
            if pid not in (0, old_pid) and self.ready():
                return pid, time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"no new ready zimage after {timeout}s; monitor log:\n{self.monitor_log()}")

    def monitor_log(self) -> str:
        path = self.run_dir / "monitor.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def sup(tmp_path_factory, cache_dir):
    s = Supervised(tmp_path_factory.mktemp("supervised"), cache_dir)
    try:
        deadline = time.monotonic() + 240
        while not s.ready():
            assert time.monotonic() < deadline and s.proc.poll() is None, "supervised app never became ready"
            time.sleep(0.5)
        yield s
    finally:
        if s.proc.poll() is None:  # a failed test must not leave supervisord and its children running
            for child in psutil.Process(s.proc.pid).children(recursive=True):
                if child.status() == psutil.STATUS_STOPPED:
                    child.send_signal(signal.SIGCONT)
            s.ctl("shutdown", check=False)
            try:
                s.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                s.proc.kill()


def test_control_socket_is_private_and_there_is_no_tcp_control(sup):
    sock = sup.run_dir / "supervisor.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o700"
    assert "inet_http_server" not in (ROOT / "deploy/supervisor/supervisord.conf").read_text().replace(
        "no inet_http_server", "")
    assert "zimage-monitor" in sup.ctl("status") and "zimage-health" in sup.ctl("status")


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
    print(f"burst of 5 fatal lines: one restart, ready after {seconds:.1f} s")


def test_supervisorctl_restart(sup):
    old = sup.pid()
    assert "started" in sup.ctl("restart", "zimage")
    new, seconds = sup.wait_new_ready(old)
    print(f"\nsupervisorctl restart: ready after {seconds:.1f} s")


def test_oom_recover_runs_one_restart_at_a_time(sup):
    env = {**sup.env, "ZIMAGE_SUPERVISOR_CONF": str(sup.run_dir / "supervisord.conf")}
    script = str(ROOT / "scripts" / "oom-recover.sh")
    first = subprocess.Popen([script], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3 and "another recovery" in second.stdout
    assert first.wait(timeout=300) == 0 and sup.ready()


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
    sup.ctl("shutdown")
    sup.proc.wait(timeout=90)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.5)
    assert not alive, f"left running: {[psutil.Process(p).cmdline() for p in alive]}"


def test_production_conf_parses_and_is_locked_down(tmp_path):
    """The production example, with its absolute folders moved under tmp_path, is a valid supervisord conf."""
    from supervisor.options import ServerOptions

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
    assert "[inet_http_server]" not in text and "chmod=0700" in text
    assert "ZIMAGE_AUTH=" not in text.replace(";   ZIMAGE_AUTH=", "")  # the secret lives in the env file
