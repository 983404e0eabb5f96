"""`run_server`: the app under uvicorn, with the drain behaviour on SIGTERM (new requests get 503,
those in flight finish, then exit 0). Only uvicorn's public API: the socket is bound here and
handed to `Server.run(sockets=...)`, and the signal handler is `handle_exit`, overridden."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import Callable

import uvicorn
from fastapi import FastAPI

from llmcli.server.state import ServerState


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6; port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, notify: Callable[[str], None] | None = None, log_level: str = "warning") -> int:
    """Serve until SIGTERM/SIGINT (drain, then exit) and return the exit status (1 when the model failed to load)."""
    notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
    state: ServerState = app.state.llmcli
    try:
        sock = bind(host, port)
    except (OSError, OverflowError) as exc:
        notify(f"error: cannot listen on {host}:{port} ({exc.strerror if isinstance(exc, OSError) else exc}); is another server using the port? (choose another with --port)")
        return 1
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=None)
    server = DrainingServer(config, state, notify, sock)
    failed: list[BaseException] = []
    previous = state.on_load_error

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        notify(f"error: {exc}")
        server.should_exit = True
        if previous is not None:
            previous(exc)

    state.on_load_error = on_load_error
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits 3 when the app's startup fails
        if exc.code:
            notify("error: the server failed to start (run with --log-level info for uvicorn's reason)")
            return 1
        raise
    finally:
        sock.close()
    if signal.SIGINT in server.signals:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, after the drain: the caller's own handler (the CLI's: status 130)
    return 1 if failed else 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains: new requests get 503, running ones finish, then exit.

    A second signal stops at once (requests in flight are cancelled). SIGTERM then exits 0;
    after SIGINT, run_server raises it again under the caller's handler, so Ctrl-C still ends with status 130.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, notify: Callable[[str], None], sock: socket.socket):
        super().__init__(config)
        self.llmcli_state = state
        self.notify = notify
        self.sock = sock
        self.signals: list[int] = []
        self._drain_thread: threading.Thread | None = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        state = self.llmcli_state
        if state.load_error is not None or self.should_exit:
            return
        host, port = self.sock.getsockname()[:2]
        where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        extra = "" if state.loaded else " (loading the model; /health answers 503 until it is ready)"
        self.notify(f"llmcli: serving {state.model_name} on {where}{extra}")

    def handle_exit(self, sig, frame):
        # not uvicorn's handler: it would re-raise the signal after the shutdown through its own private list
        self.signals.append(sig)
        state = self.llmcli_state
        if self._drain_thread is not None:
            self.force_exit = True
            self.should_exit = True
            if state.service is not None:
                threading.Thread(target=state.service.shutdown, args=(False, 5.0), daemon=True).start()
            return
        # signal handlers must not block: the drain waits in a thread, then tells uvicorn to stop
        state.draining = True
        self._drain_thread = threading.Thread(target=self._drain, name="llmcli-drain", daemon=True)
        self._drain_thread.start()

    def _drain(self):
        service = self.llmcli_state.service
        if service is not None:
            self.notify(f"llmcli: draining: finishing {service.queue_depth + service.running} request(s) in flight, refusing new ones")
            service.shutdown(drain=True)
        self.should_exit = True
