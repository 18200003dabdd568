"""A real server process on a free 127.0.0.1 port, for the test_server_* modules (no tests here).

`shared_server(model_dir)` starts one server per set of options for the whole session (loading a
model costs seconds on a 2-core CPU); `ServerProcess` runs a private one a test may kill.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

API_KEY = "test-key"
BASE_ARGS = ("--device", "cpu", "--no-access-log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m open_autoglm.server` with the given options; output goes to a log file."""

    def __init__(self, model_dir: Path, *args: str, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        tls = "--ssl-certfile" in args
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=args[args.index("--ssl-certfile") + 1])
                                              if tls else True)
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="autoglm-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "open_autoglm.server", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), *BASE_ARGS, *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def children(self) -> list[int]:
        """Pids whose parent is the server (it should start none)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids


_SHARED: dict[tuple, ServerProcess] = {}


def shared_server(model_dir: Path, *args: str) -> ServerProcess:
    """One server per (model, options) for the whole test session; stopped when Python exits."""
    key = (str(model_dir), args)
    server = _SHARED.get(key)
    if server is None or server.proc.poll() is not None:
        server = _SHARED[key] = ServerProcess(model_dir, *args).wait_ready()
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _SHARED.values():
        server.stop(10)


# The options of the server most tests share: room for 200 concurrent short requests.
MAIN_ARGS = ("--num-kv-blocks", "1024", "--max-num-seqs", "256", "--max-body-bytes", "65536")
