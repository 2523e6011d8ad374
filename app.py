"""Z-Image-Turbo studio: the web app (Gradio UI at /, JSON API, health, readiness, metrics).

    python app.py --model tiny                   # offline demo
    python app.py --host 0.0.0.0 --port 7860     # the real model, served to other machines
    python app.py --replicas 4                   # 4 engine replicas (one per GPU) on a local Ray instance

Every flag also reads ZIMAGE_<NAME> from the environment (flags win); `python app.py --help` lists them.
Exit codes: 0 clean shutdown, 1 start-up failed (port in use, model missing), 2 invalid settings.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading

from zimage import memory

memory.configure_allocator()  # before anything can initialise CUDA

from zimage.security import check_exposure  # noqa: E402
from zimage.settings import Settings, SettingsError  # noqa: E402

log = logging.getLogger("zimage.app")


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a busy port fails in a second, not after the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def main(argv: list[str] | None = None) -> int:
    from zimage.loading import quiet_libraries

    quiet_libraries()  # before anything imports diffusers (--attention validation does)
    try:
        settings = Settings.load(argv)
        check_exposure(settings)  # a non-loopback --host needs --auth, or --allow-public-no-auth on purpose
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}. Is another server "
              "running there (`supervisorctl -c deploy/supervisor/supervisord.conf status`)? Choose another port "
              "with --port or ZIMAGE_PORT.", file=sys.stderr)
        return 1

    # The model starts loading before Gradio and the web stack are imported (~10 s of imports on a GPU host),
    # so a restart overlaps the two instead of adding them.
    if settings.replicas:  # Ray Serve replicas behind this process; nothing imports Ray otherwise
        from zimage.replicas import RemoteEngine

        engine = RemoteEngine(settings)
        try:
            engine.connect()  # Ray (local or --ray-address) on this thread, before uvicorn: see connect()
        except Exception as exc:  # noqa: BLE001 - reported like any start-up failure
            print(f"error: cannot start or reach Ray: {exc}", file=sys.stderr)
            return 1
    else:
        from zimage.engine import Engine

        engine = Engine(settings)
    failures: list[BaseException] = []
    server = None

    def stop_on_failure(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    engine.start_in_background(stop_on_failure)

    import uvicorn

    from zimage.server import create_service

    service = create_service(settings, engine)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # SIGTERM: running and queued generations get `shutdown_grace` seconds, then are cancelled with a 503
            # + Retry-After, inside uvicorn's own graceful window (which would otherwise cut them with a 500).
            if not self.should_exit:
                timer = threading.Timer(settings.shutdown_grace, service.queue.stop,
                                        args=("the service is restarting; retry in a few seconds",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    # asyncio, h11 and no WebSocket protocol, named: ray[serve] installs uvloop, httptools and websockets, which
    # uvicorn's "auto" would pick instead of what this server was built and hardened on.
    server = Server(uvicorn.Config(service.app, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=settings.shutdown_grace + 10, loop="asyncio", http="h11",
                                   ws="none"))
    if failures:  # failed while the web stack was importing
        server.should_exit = True
    log.info("serving on http://%s:%d (model %s)", settings.host, settings.port, settings.model)
    try:
        server.run(sockets=[sock])
    finally:
        if settings.replicas:
            engine.shutdown()  # the Serve application (and a local Ray instance) goes with this process
    if failures:
        print(f"error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
