"""A server in a subprocess for the serving benchmarks (serve_load, serve_ttft, prefix_cache, soak):
a free loopback port, start and wait until a path answers 200, stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`cmd` (listening on `port`) for the length of a with-block; its output goes to `log` (a temp file by default).

    ready: the path that answers 200 once the server can take requests (/v1/models, or llmcli's /health).
    cwd: the working directory; `python -m llmcli` imports the llmcli package found there before
    any on PYTHONPATH, so a server of another tree must start inside that tree.
    """

    def __init__(self, name: str, cmd: list[str], port: int, *, env: dict[str, str] | None = None, ready: str = "/v1/models",
                 timeout: float = 900, log: Path | None = None, cwd: Path | None = None):  # fmt: skip
        self.name, self.cmd, self.port, self.ready, self.timeout, self.cwd = name, cmd, port, ready, timeout, cwd
        self.env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(log) if log else Path(tempfile.NamedTemporaryFile(prefix=f"llmcli-bench-{name}-", suffix=".log", delete=False).name)

    def __enter__(self) -> "ServerProcess":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.base + self.ready, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{self.name} did not answer {self.ready} within {self.timeout:.0f} s; log: {self.log}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (the server drains what is in flight), SIGKILL after a minute."""
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
