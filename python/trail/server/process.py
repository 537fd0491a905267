"""`trail serve` as a child process, for benchmarks and tests that drive a real server: start it on
a free port (`--port 0`), read the URL from the line it prints once it listens, stop it with a
signal. Nothing here imports torch or aiohttp."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time


class ServeProcess:
    """`python -m trail.cli serve MODEL --port 0 ARGS...`; `url` once it printed where it listens.
    Its stderr is kept (`stderr()`); `stop()` returns its exit code."""

    def __init__(self, model: str, *args: str, timeout: float = 120.0, env: dict | None = None,
                 new_session: bool = False):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "trail.cli", "serve", model, "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ) if env is None else env, start_new_session=new_session)
        end = time.monotonic() + timeout
        line = ""
        while "listening on" not in line:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if not ready or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"trail serve did not start: {line!r} {self.stderr()[-3000:]}")
            line = self.proc.stdout.readline()
        self.url = line.split("listening on ")[1].split()[0]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
